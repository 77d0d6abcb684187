"""The vocabulary claims are written in: small pure functions over a model and its cache.

Each is tested against a slow obvious version in tests/test_analysis.py.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Callable, Hashable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LinearRegression

from circuits.model.cache import ActivationCache, decomposition_hook_names, project
from circuits.errors import CircuitsError, InputError
from circuits.model.transformer import HookedTransformer


def tensor_bytes(t: torch.Tensor) -> bytes:
    """A tensor's values as raw bytes (on the CPU, contiguous), for digests of what it holds."""
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def weights_digest(model: torch.nn.Module) -> str:
    """Identity of the function a model computes: its weights, and any permanent hooks (a mean
    ablation is a hook). Controls build new model objects; a deterministic one (e.g. `untrained`
    with its fixed seed) gets the same digest each time, so its results can be shared."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(tensor_bytes(t))
    for name, hp in getattr(model, "hook_dict", {}).items():
        if hp.fns:
            h.update(name.encode())
            h.update(repr([_hook_token(f) for f in hp.fns]).encode())
    return h.hexdigest()


def has_hooks(model: torch.nn.Module) -> bool:
    """Whether a function is attached to any hook point of `model` (a mutation's permanent hook, or
    one of an enclosing `hooks()` block). Such a model's rows may not be computed independently (a
    batch-mean ablation takes the mean over the batch), so a caller that would split or subset a
    batch for speed must run it as it is."""
    return any(hp.fns for hp in getattr(model, "hook_dict", {}).values())


def _hook_token(fn: Callable) -> str:
    """What identifies a permanent hook in a digest: its ``circuits_key`` (set by the mutations, so
    the same mutation rebuilt shares results), else a random token stored on the function. Never
    ``id(fn)``: ids are reused once a function is freed, and a later mutant would then be served an
    earlier one's results."""
    token = getattr(fn, "circuits_key", None)
    if token is None:
        token = "uid:" + uuid.uuid4().hex
        try:
            fn.circuits_key = token
        except AttributeError:  # a bound method or builtin: cannot carry a token
            token = f"obj:{id(fn)}:{getattr(fn, '__qualname__', type(fn).__name__)}"
    return str(token)


class ModelMemo:
    """Results computed once per (model function, key) for a session: claims on one model, and
    controls that leave the model alone (data controls) or rebuild the same one, share them."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, Hashable], Any] = {}

    def get(self, model: torch.nn.Module, key: Hashable, compute: Callable[[], Any]) -> Any:
        k = (weights_digest(model), key)
        if k not in self._values:
            self._values[k] = compute()
        return self._values[k]

    def clear(self) -> None:
        self._values.clear()


def length_buckets(lengths: torch.Tensor, n: int, batch_size: int) -> list[tuple[torch.Tensor, int]]:
    """Rows in length order cut into chunks of `batch_size`, each with its longest row's length:
    running a chunk cut to that width skips the right-padding's compute. [(rows, width), ...]"""
    if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (n,):
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise InputError(f"lengths must be a [{n}] tensor (one length per row), got {got}")
    return [(rows, int(lengths[rows].max())) for rows in torch.argsort(lengths).split(batch_size)]


def run_in_batches(model: HookedTransformer, inputs: torch.Tensor, names=None, batch_size: int = 2000,
                   keep: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
                   lengths: Optional[torch.Tensor] = None) -> ActivationCache:
    """run_with_cache over a large input in chunks (no grad), concatenated along the batch.

    Every chunk keeps the full width of `inputs` so positions line up across chunks. `keep(name,
    activation)` may cut each activation down before it is stored (e.g. `at_position(0)`), which
    saves most of the memory and time when a claim reads only one position.

    With `lengths` (meaningful positions per row, the rest right-padding masked from attention),
    rows run in length order, each chunk cut to its longest row, as `predict` does. Only positions
    every row has may then be kept (`keep` is required), and attention patterns come back padded
    to the full key width with zeros, which is what the full-width run gives a masked key.
    """
    if lengths is None:
        stores: dict[str, list[torch.Tensor]] = {}
        with torch.no_grad():
            for i in range(0, inputs.shape[0], batch_size):
                _, cache = model.run_with_cache(inputs[i:i + batch_size], names=names)
                for k, v in cache.items():
                    stores.setdefault(k, []).append(keep(k, v) if keep else v)
        return ActivationCache({k: torch.cat(v) for k, v in stores.items()}, model)
    if keep is None:
        raise InputError("run_in_batches(lengths=...) needs keep= selecting positions every row has, "
                         "e.g. at_position(0): the other positions' widths differ between chunks")
    full = inputs.shape[1]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for chunk, width in length_buckets(lengths, inputs.shape[0], batch_size):
            _, cache = model.run_with_cache(inputs[chunk, :width], names=names)
            for k, v in cache.items():
                if k.endswith("hook_attn_scores"):
                    raise InputError(f"{k} holds masked scores that depend on the padded width; "
                                     "cache it without lengths=")
                v = keep(k, v)
                if k.endswith("hook_pattern") and width < full:
                    v = F.pad(v, (0, full - width))  # [batch, head, query, key_pos]: masked keys get 0
                if k not in out:
                    out[k] = v.new_empty((inputs.shape[0], *v.shape[1:]))
                elif v.shape[1:] != out[k].shape[1:]:
                    raise InputError(f"keep() left {k} with width-dependent shape {tuple(v.shape)}; with "
                                     "lengths= it must select positions every row has")
                out[k][chunk] = v
    return ActivationCache(out, model)


def at_position(pos: int) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """A `keep` for run_in_batches: every activation at one (query) position, axis kept (length 1)."""
    def keep(name: str, act: torch.Tensor) -> torch.Tensor:
        if name.endswith(("hook_pattern", "hook_attn_scores")):
            return act[:, :, pos:pos + 1]  # [batch, head, 1, key_pos]
        return act[:, pos:pos + 1]  # [batch, 1, ...]
    return keep


def predict(model: HookedTransformer, inputs: torch.Tensor, batch_size: int = 500,
            lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Model outputs for a large input, in chunks without grad: [n, ...]. (Chunks of 500 keep a
    block's activations in cache: the 50k distinct bracket strings take ~1.8 s vs ~2.4 s at 2,000.)

    With `lengths` (meaningful positions per row, the rest right-padding), rows are processed in
    length order and each chunk is cut to its longest row, which skips the padding's compute; only
    valid for read-outs that do not depend on the padded width (first, or last with a pad token).
    """
    with torch.no_grad():
        if lengths is None:
            return torch.cat([model(inputs[i:i + batch_size]) for i in range(0, inputs.shape[0], batch_size)])
        out = None
        for chunk, width in length_buckets(lengths, inputs.shape[0], batch_size):
            part = model(inputs[chunk, :width])
            if out is None:
                out = part.new_empty((inputs.shape[0], *part.shape[1:]))
            out[chunk] = part
        return out


def logit_direction(model: HookedTransformer, positive: int, negative: int) -> torch.Tensor:
    """Unembedding direction whose dot product is logit[positive] - logit[negative]: [d_model]."""
    W_U = model.unembed.W_U.detach()  # [d_model, d_vocab_out]
    return W_U[:, positive] - W_U[:, negative]


def ln_final_io(cache: ActivationCache, pos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of the final LayerNorm at one position: [batch, d_model] each.

    The output is the LN's full output (normalized * w + b). For first/last read-outs the model
    only normalises the read-out position, which must then be `pos`.
    """
    model = cache.model
    if model.cfg.normalization != "LN":
        raise CircuitsError("this model has no final LayerNorm")
    x = cache.residual(None)  # [batch, pos, d_model]
    normalized = cache["ln_final.hook_normalized"]  # [batch, pos or 1, d_model]
    if normalized.shape[1] == 1 and x.shape[1] > 1:  # read-out only: position 0 (first) by design
        if model.cfg.readout != "first" or pos != 0:
            raise InputError(f"the final LN was cached at the read-out position only; pos={pos} unavailable")
        y = normalized[:, 0]
    else:
        y = normalized[:, pos]
    ln = model.ln_final
    return x[:, pos], y * ln.w.detach() + ln.b.detach()


def linear_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[LinearRegression, float]:
    """Least-squares affine fit y ~ x (sklearn LinearRegression) and its r^2 on the same data."""
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise InputError(f"linear_fit needs matching row counts >= 2, got {x.shape[0]} and {y.shape[0]}")
    X, Y = x.double().cpu().numpy(), y.double().cpu().numpy()
    fit = LinearRegression().fit(X, Y)
    return fit, float(fit.score(X, Y))


def pull_back(fit: LinearRegression, direction: torch.Tensor) -> torch.Tensor:
    """A direction in the fit's output space pulled back to its input space: coef^T @ direction,
    float64 on the direction's device (the fit itself lives in numpy on the CPU)."""
    coef = torch.as_tensor(fit.coef_, dtype=torch.float64, device=direction.device)  # [out, in]
    if direction.ndim != 1 or (coef.ndim == 2 and direction.shape[0] != coef.shape[0]):
        raise InputError(f"direction must be [{coef.shape[0]}] (the fit's output width), got {tuple(direction.shape)}")
    return coef.T @ direction.double()  # [in]


def component_contributions(cache: ActivationCache, direction: torch.Tensor, pos: int = 0,
                            layer: Optional[int] = None) -> tuple[torch.Tensor, list[str]]:
    """Each residual component's projection on `direction` at `pos`: ([n_components, batch], labels)."""
    stack, labels = cache.head_decomposition(layer, pos=pos)  # [component, batch, 1, d_model]
    return project(stack[:, :, 0].double(), direction.double()), labels


def heads_by_mean_difference(values: torch.Tensor, labels: list[str], mask: torch.Tensor) -> list[tuple[str, float]]:
    """Components ranked by mean(values | mask) - mean(values | ~mask), largest first."""
    if mask.all() or (~mask).all():
        raise InputError("need examples on both sides of the mask")
    diff = values[:, mask].mean(1) - values[:, ~mask].mean(1)  # [component]
    order = torch.argsort(diff, descending=True)
    return [(labels[i], float(diff[i])) for i in order]


def attention_from(cache: ActivationCache, layer: int, head: int, query: int = 0) -> torch.Tensor:
    """Attention probabilities of one head from one query position: [batch, key_pos]."""
    return cache[f"blocks.{layer}.attn.hook_pattern"][:, head, query]


def head_label(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def parse_label(label: str) -> tuple[int, int]:
    if not (label.startswith("L") and "H" in label):
        raise InputError(f"{label!r} is not a head label like 'L2H0'")
    layer, head = label[1:].split("H")
    return int(layer), int(head)


def decomposition_names(model: HookedTransformer) -> list[str]:
    """Hook names needed for final-position decompositions plus the final LN (re-exported)."""
    names = decomposition_hook_names(model)
    if model.cfg.normalization == "LN":
        names.append("ln_final.hook_normalized")
    return names


def cross_entropy_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.double(), labels.long(), reduction="none")


# The smallest loss gap ``baseline - clean`` (nats, in size) a loss recovered is a fraction of: below
# it (0 included) the fraction is undefined. One rule for every use: elementwise loss_recovered is NaN
# there, and a claim's loss_recovered_ci is an Estimate that is ``undefined`` (a failed claim).
LOSS_GAP_ATOL = 1e-12


def loss_gap_defined(clean: Any, baseline: Any) -> Any:
    """Whether the gap ``baseline - clean`` can be the denominator of :func:`loss_recovered`: finite
    and at least :data:`LOSS_GAP_ATOL` in size (elementwise over arrays of mean losses)."""
    with np.errstate(all="ignore"):
        gap = np.asarray(baseline, dtype=np.float64) - np.asarray(clean, dtype=np.float64)
        ok = np.isfinite(gap) & (np.abs(gap) >= LOSS_GAP_ATOL)
    return bool(ok) if ok.ndim == 0 else ok


def loss_recovered(patched: Any, clean: Any, baseline: Any, axis: Optional[int] = None) -> Any:
    """The fraction of the loss gap an intervention keeps (the one "loss recovered" of the library)::

        loss_recovered = (baseline - patched) / (baseline - clean)

    1 when the patched loss is the clean one, 0 when it is the baseline's (a random resample, an
    ablation), negative when worse. NaN where the gap is not :func:`loss_gap_defined` (not finite, or
    below ``LOSS_GAP_ATOL`` = 1e-12 nats in size: 0/0 when the baseline intervention changes
    nothing). ``patched``, ``clean`` and ``baseline`` are mean losses (numbers or arrays,
    elementwise); with ``axis`` they are per-example losses, each averaged along ``axis`` first (a
    plain number is taken as a mean already), so the function is a statistic
    :func:`circuits.stats.bootstrap_ci` can resample (paired samples ``(patched, clean, baseline)``). The causal-scrubbing write-up's "loss recovered",
    ``1 - scrubbed / baseline``, is ``clean=0``: the gap measured from a perfect model.

    A claim does not take this NaN: it takes :func:`loss_recovered_ci`, which turns an undefined gap
    into a failed claim stating the losses."""
    if axis is not None:
        patched, clean, baseline = (np.mean(x, axis=axis) if np.ndim(x) else x for x in (patched, clean, baseline))
    p, c, b = (np.asarray(x, dtype=np.float64) for x in (patched, clean, baseline))
    gap = b - c
    with np.errstate(all="ignore"):
        out = np.where(loss_gap_defined(c, b), (b - p) / gap, np.nan)
    return float(out) if out.ndim == 0 else out


def _measured_losses(clean: Any, baseline: Any, patched: Any) -> str:
    """'measured mean losses: baseline b, clean c, <label> p, ...' (each argument averaged)."""
    mean = lambda x: float(np.mean(np.asarray(x, dtype=np.float64)))  # noqa: E731
    text = f"measured mean losses: baseline {mean(baseline):.6g}, clean {mean(clean):.6g}"
    if patched is not None:
        items = patched.items() if isinstance(patched, dict) else [("patched", patched)]
        text += "".join(f", {label} {mean(x):.6g}" for label, x in items)
    return text


def undefined_loss_gap(clean: Any, baseline: Any, patched: Any = None) -> Optional[str]:
    """None when the loss gap of these losses is :func:`loss_gap_defined`, else why not, naming the
    measured mean losses: the reason a claim on their loss recovered fails. Each argument is a
    number or per-example losses (averaged); ``patched`` may be a dict ``{label: losses}``."""
    with np.errstate(all="ignore"):
        c, b = (float(np.mean(np.asarray(x, dtype=np.float64))) for x in (clean, baseline))
        gap = b - c
    if loss_gap_defined(c, b):
        return None
    why = (f"it is {gap:.3g}, not finite" if not np.isfinite(gap) else
           "the baseline loss equals the clean loss, so the baseline intervention changes nothing" if gap == 0 else
           f"{gap:.3g} is below {LOSS_GAP_ATOL:g} in size")
    return f"loss gap baseline - clean: {why}; {_measured_losses(clean, baseline, patched)}"


def loss_recovered_ci(data: tuple, statistic: Optional[Callable] = None, *, clean: Any = None, baseline: Any = None,
                      patched: Any = None, name: Optional[str] = None, **bootstrap: Any):
    """A claim's loss recovered: ``bootstrap_ci(data, statistic, name=name, **bootstrap)`` for a
    statistic built on :func:`loss_recovered` (default: ``loss_recovered`` itself, with ``data`` =
    ``(patched, clean, baseline)`` per-example losses and ``clean`` / ``baseline`` / ``patched``
    taken from it), under the library's one rule for a gap it cannot divide by.

    The rule: when the whole sample's gap ``mean(baseline) - mean(clean)`` is not
    :func:`loss_gap_defined` (0, or below ``LOSS_GAP_ATOL`` in size, or not finite), the fraction is
    undefined and NO claim on it can hold (a claim that an intervention keeps or loses a share of
    the loss presupposes a loss to share; with none, e.g. a resampled input that is the same in
    every source string, the part's input demonstrably does not matter). The result is then an
    Estimate with ``undefined`` set (point and bounds NaN, no ``problem``): a claim on it fails as a
    measured failure whose message states the baseline, clean and patched losses
    (:func:`undefined_loss_gap`), on a main run and on a control run alike (a control whose claim
    fails this way did its job). The same holds when the sample's gap is defined but the gap of
    some bootstrap resamples is not (it rests on a few examples): the fraction has no bounded
    interval. It is never mapped to a number that could pass. Pass ``clean`` / ``baseline``
    (per-example losses or numbers) for any other statistic, and ``patched`` (losses or
    ``{label: losses}``) to have them named."""
    from dataclasses import replace

    from circuits.claims.stats import Estimate, bootstrap_ci  # the claims layer: only when a claim asks

    if statistic is None:
        statistic = loss_recovered
        if clean is None and baseline is None:
            patched, clean, baseline = (data[0] if patched is None else patched), data[1], data[2]
    if clean is None or baseline is None:
        raise InputError("loss_recovered_ci: pass clean= and baseline= (the losses the gap is measured between)")
    why = undefined_loss_gap(clean, baseline, patched)
    if why is not None:
        n = max((int(np.size(x)) for x in (data if isinstance(data, tuple) else (data,))), default=0)
        nan = float("nan")
        return Estimate(nan, nan, nan, bootstrap.get("level", 0.95), bootstrap.get("method", "BCa"), n,
                        name or getattr(statistic, "__name__", "loss_recovered"), None, undefined=why)
    est = bootstrap_ci(data, statistic, name=name, **bootstrap)
    if est.problem and np.isfinite(est.point):
        # a defined fraction with an undefined interval: with finite losses (bootstrap_ci reports
        # others before its point) only resamples whose gap is below LOSS_GAP_ATOL do that
        with np.errstate(all="ignore"):
            gaps = np.asarray(baseline, dtype=np.float64) - np.asarray(clean, dtype=np.float64)
        of = f" ({int(np.sum(np.abs(gaps) >= LOSS_GAP_ATOL))} of {gaps.size} examples have a gap)" if gaps.ndim else ""
        return replace(est, problem=None, undefined=(
            f"loss gap baseline - clean below {LOSS_GAP_ATOL:g} on some bootstrap resamples{of}, so the fraction "
            f"{est.point:.4g} has no bounded interval; {_measured_losses(clean, baseline, patched)}"))
    return est
