"""Causal scrubbing: path-specific resampling hypotheses, scored by the fraction of loss recovered.

A hypothesis (Redwood Research, "Causal Scrubbing: Results on a Paren Balance Checker", 2022) says
which paths of the model compute which feature of the input. Scrubbing evaluates the model on a
"treeified" copy in which every path the hypothesis names reads an input that *agrees with the input
of its parent on the named feature*, and every path it does not name reads a random input. If the
hypothesis is right, the loss barely moves.

Writing one down::

    from circuits.analysis.scrub import Path, Hypothesis, scrub

    hyp = Hypothesis("1b", {                       # direct paths to the logits at the read-out
        "1.0": Path(count_open), "2.0": Path(count_open),
        "2.1": Path(horizon),
    })
    result = scrub(model, toks, labels, [hyp])[0]  # ScrubResult: losses, fraction recovered (CIs)

A :class:`Path` names a feature (a tensor of per-example values: two inputs *agree* when their values
are equal; or :data:`EXACT` = the parent's own input; or :data:`RANDOM` = unconditionally resampled)
and optionally what that path's *inputs* must agree on, recursively. For an attention head the inputs
are keyed by position (``{1: Path(...)}``: the head's input residual at position 1) and by ``"mask"``
(the key padding mask); a position's inputs are keyed by the components of the residual there
(``{"0.0": Path(...), "embed": Path(...)}``), each of which may recurse again if it is a head. A
component may be replaced by a function of the input (``Path(f, approx=Approx(phi, g))``: the
component's output is written as ``phi + (output - phi)``; ``phi`` reads an input agreeing on ``g``,
the remainder is unnamed, so random) - the write-up's experiment 2b.

Semantics (where the write-up leaves a detail open, the choice is ours and said here):

* The root reads the real input x, and the loss is scored against x's label.
* Every node of the hypothesis draws its own input agreeing with its parent's input on its feature
  (from the evaluated data set: sampling includes the example itself, as the write-up's samplers
  draw from the data set conditioned on the feature). Every node with named inputs draws ONE
  further random input for all of its unnamed parts (per example, per node; the root's is "the one
  random input" that every unnamed direct path reads).
* A head's key padding mask comes with its unnamed parts (the node's random input) unless the
  hypothesis names ``"mask"`` (experiment 3 names it: agree on the input length).
* The random-logit baseline scores each x with the model's output on the root's random input: the
  same draw the unnamed paths read (common random numbers), so a hypothesis that names nothing
  recovers exactly 0 and the baseline's noise cancels in the ratio.
* Fraction recovered = ``1 - scrubbed / baseline`` (how the write-up reports it) and, beside it,
  ``(baseline - scrubbed) / (baseline - clean)``. Intervals are bootstraps over the examples (the
  fractions: the studentized bootstrap of their ratio of means, ``scrub_result``), each example's
  losses averaged over the ``n_draws`` resampling draws: they cover the
  data set's sampling noise and the resampling noise together (an interval over 5 draws alone,
  each a mean over the same data set, passed simulated claims at their threshold 15.6% of the
  time instead of at most 2.5%: circuits/claims/calibration.py, the README's calibration table).

Implementation: the model runs ONCE per data set (``ScrubData``): the final residual's decomposition
at the read-out, and the residual entering every block with each component's output at every
position. A hypothesis is then evaluated by gathering rows of those tensors by source index
(vectorised over examples) and recomputing only what a recursive node needs: a head's output from a
patched input (its LayerNorm, query at one position, keys and values at all positions), then
``ln_final`` and the unembedding. The recomposed clean logits equal the model's to float rounding
(tests/test_scrub.py). Components are kept at the positions scrubs read (``component_at_position``),
not at every position; within one ``scrub`` call a recomputed head output is handed out again to a
hypothesis that asks for the same one on the same draws (``_HeadMemo``: a hypothesis's wrong
variants share its unchanged paths), the same numbers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from circuits.analysis.measures import has_hooks, loss_recovered, loss_recovered_ci, undefined_loss_gap
from circuits.errors import ScrubError, did_you_mean
from circuits.model.transformer import HookedTransformer
from circuits.claims.stats import Estimate, bootstrap_ci, expanded_level, ratio_of_means_interval

__all__ = ["EXACT", "RANDOM", "Approx", "Path", "Hypothesis", "ScrubData", "ScrubResult", "scrub",
           "sample_agreeing", "scrub_claim", "scrub_result", "component_label", "Variant", "wrong_variants",
           "independent_feature", "margin_over", "scrub_beats_variants_claim", "scrub_holds_claim", "named_heads"]

EXACT = "exact"  # the parent's own input
RANDOM = "random"  # an unconditionally resampled input

Feature = Union[str, torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class Approx:
    """Replace a component's output by ``values`` (a function of the input, [n, d_model]) plus the
    remainder ``output - values``: ``values`` reads an input agreeing on ``feature``, the remainder is
    left unnamed (it reads the node's random input)."""

    values: torch.Tensor
    feature: Feature


@dataclass(frozen=True)
class Path:
    """One node of a hypothesis: the feature its input must agree on (with its parent's input) and,
    optionally, what its own inputs must agree on (see the module docstring for the keys)."""

    feature: Feature
    inputs: Mapping[Any, "Path"] = field(default_factory=dict)
    approx: Optional[Approx] = None


@dataclass(frozen=True)
class Hypothesis:
    """Named direct paths to the logits (component -> Path); everything else is unnamed (random)."""

    name: str
    paths: Mapping[str, Path]

    @staticmethod
    def identity(model: HookedTransformer, name: str = "identity") -> "Hypothesis":
        """Every direct path from the input itself: scrubbing is then the clean run."""
        return Hypothesis(name, {label: Path(EXACT) for label in final_labels(model)})


def final_labels(model: HookedTransformer, layer: Optional[int] = None) -> list[str]:
    """Labels of the residual's components entering block ``layer`` (None = the final residual), in
    the order of ``ActivationCache.decompose_resid``."""
    cfg = model.cfg
    n = cfg.n_layers if layer is None else layer
    labels = ["embed"] + (["pos_embed"] if cfg.positional != "none" else [])
    for l in range(n):
        labels += [f"L{l}H{h}" for h in range(cfg.n_heads)] + ([f"L{l}.mlp"] if cfg.d_mlp else [])
    return labels + ["biases"]


_HEAD_LABEL = re.compile(r"^L(\d+)H(\d+)$")
_HEAD = re.compile(r"^(?:L(\d+)H(\d+)|(\d+)\.(\d+)|a(\d+)\.h(\d+))$")
_MLP = re.compile(r"^(?:L(\d+)\.mlp|m(\d+)|mlp(\d+))$")


def component_label(name: str, choices: Sequence[str]) -> str:
    """'1.0' / 'a1.h0' / 'L1H0' -> 'L1H0'; 'm2' / 'mlp2' / 'L2.mlp' -> 'L2.mlp'; checked against
    ``choices`` (ScrubError naming the closest ones otherwise)."""
    label = name
    if isinstance(name, str):
        m = _HEAD.match(name)
        if m:
            l, h = [g for g in m.groups() if g is not None]
            label = f"L{l}H{h}"
        m = _MLP.match(name)
        if m:
            label = f"L{[g for g in m.groups() if g is not None][0]}.mlp"
    if label not in choices:
        raise ScrubError(f"unknown component {name!r} here (components: {', '.join(choices)})"
                         + (did_you_mean(str(name), choices) if isinstance(name, str) else ""))
    return label


# --- samplers ---------------------------------------------------------------------------------------


def _classes(feature: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Class id per example [n] of a feature array [n] or [n, k] (equal rows = one class)."""
    values = torch.as_tensor(feature)
    if values.ndim not in (1, 2) or values.shape[0] != n:
        raise ScrubError(f"feature {what} has shape {tuple(values.shape)}; need [{n}] or [{n}, k], one "
                         f"value per example of the data ({n} examples)")
    if values.is_floating_point() and bool(torch.isnan(values).any()):
        raise ScrubError(f"feature {what} has NaN values (NaN never equals NaN: no example would agree)")
    return torch.unique(values, dim=0, return_inverse=True)[1] if values.ndim == 2 else \
        torch.unique(values, return_inverse=True)[1]


class _Sampler:
    """Draws, for each example, a random example of the same class (vectorised)."""

    def __init__(self, classes: torch.Tensor):
        self.classes = classes  # [n]
        self.order = torch.argsort(classes, stable=True)  # examples grouped by class
        counts = torch.bincount(classes)
        self.counts = counts
        self.starts = torch.cumsum(counts, 0) - counts

    def __call__(self, like: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        k = self.classes[like]  # [n] class of each parent input
        u = torch.rand(like.shape[0], generator=gen, dtype=torch.float64)
        counts = self.counts[k]
        offset = (u * counts).long().clamp_max_(counts - 1)
        return self.order[self.starts[k] + offset]


def sample_agreeing(feature: Feature, gen: torch.Generator, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """For each example i, the index of a random example j with ``feature[j] == feature[like[i]]``
    (like = every example itself by default): [n] LongTensor. ``feature`` is an array [n] or [n, k];
    the draw includes i itself (sampling from the data conditioned on the feature)."""
    if isinstance(feature, str):
        raise ScrubError(f"sample_agreeing needs a feature array, got {feature!r}")
    values = torch.as_tensor(feature)
    n = values.shape[0] if values.ndim else 0
    like = torch.arange(n) if like is None else like
    return _Sampler(_classes(values, n, "array"))(like, gen)


# --- the data a hypothesis is evaluated on ---------------------------------------------------------


class ScrubData:
    """One run of the model on the data, keeping what scrubbing gathers from.

    toks: [n, pos] token ids; labels: [n] class ids. The model must read out at the first position
    (every input's read-out is then the same position, so rows from different inputs line up).

    like: a ScrubData of another model on the same tokens (a mutant's unmutated model): where this
    model's embeddings and first blocks have the same weights (and neither model has a hook), their
    activations are taken from it and this model runs from the first block that differs (forward's
    start_at_layer, on the same batches): the numbers of the full run (tested), without recomputing
    the unchanged layers."""

    def __init__(self, model: HookedTransformer, toks: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
                 like: Optional["ScrubData"] = None):
        cfg = model.cfg
        # sources' read-outs must line up: the first position, or the last when every row has the
        # same length (no padding: Tracr-compiled models read their output at a token position)
        if cfg.readout not in ("first", "last"):
            raise ScrubError(f"scrubbing supports models that read out at the first or last position, this one reads {cfg.readout!r}")
        if not isinstance(toks, torch.Tensor) or toks.ndim != 2:
            raise ScrubError(f"toks must be a [n, pos] token tensor, got {type(toks).__name__} "
                             f"{tuple(getattr(toks, 'shape', ()))}")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (toks.shape[0],):
            raise ScrubError(f"labels must be [{toks.shape[0]}] (one per example), got {tuple(labels.shape)}")
        self.model, self.toks, self.labels = model, toks, labels
        self.n, self.width = toks.shape
        names = ["hook_embed"] + (["hook_pos_embed"] if cfg.positional != "none" else [])
        for l in range(cfg.n_layers):
            names += [f"blocks.{l}.hook_resid_pre", f"blocks.{l}.attn.hook_z"]
            names += [f"blocks.{l}.hook_mlp_out"] if cfg.d_mlp else []
        final = f"blocks.{cfg.n_layers - 1}.hook_resid_post"
        self.readout = model.readout_positions(toks)  # [n]
        if bool((self.readout != self.readout[0]).any()):
            raise ScrubError("a 'last' read-out must be the same position in every row to scrub (sequences of "
                             f"one length, no padding); these rows read out at positions {sorted(set(self.readout.tolist()))}")
        self.readout_pos = int(self.readout[0])  # the same in every row
        self.batch_size = batch_size
        start = _shared_layers(model, toks, batch_size, like)
        # what the scrubs read: every name at every position, the final residual at the read-out
        cache = _fill_scrub_cache(model, toks, names, final, self.readout_pos, batch_size, like, start)
        self.final_resid = cache.pop(final)  # [n, d]
        self._cache = cache
        self.rows = torch.arange(self.n)
        pad = model.key_padding_mask(toks)
        self.pad = pad if pad is not None else torch.zeros_like(toks, dtype=torch.bool)  # [n, pos]
        self.final_labels = final_labels(model)
        self._outputs: dict[str, torch.Tensor] = {}
        self._at: dict[tuple, torch.Tensor] = {}
        with torch.no_grad():
            self.clean_logits = self.logits(self.final_resid)
        self._samplers: dict[int, tuple[Any, _Sampler]] = {}
        self._ln1: dict[int, torch.Tensor] = {}
        self._head_inputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    # components' outputs at every position, computed on first use
    def output(self, label: str) -> torch.Tensor:
        """A component's output [n, pos, d_model] (heads without b_O; "biases" = every b_O). A head's is
        computed on each call (z @ W_O, the same numbers each time; the scrubs keep only the positions
        they read, ``component_at_position``); the others are the cache's tensors or views."""
        if label in self._outputs:
            return self._outputs[label]
        out = self._compute_output(label)
        if not _HEAD_LABEL.match(label):
            self._outputs[label] = out
        return out

    def _compute_output(self, label: str) -> torch.Tensor:
        c, cfg = self._cache, self.model.cfg
        if label == "embed":
            return c["hook_embed"]
        if label == "pos_embed":
            return c["hook_pos_embed"].expand(self.n, -1, -1)
        if label == "biases":  # summed over every layer: per layer, see resid_in
            b = sum(blk.attn.b_O.detach() for blk in self.model.blocks)
            return b.expand(self.n, self.width, -1)
        m = re.match(r"^L(\d+)H(\d+)$", label)
        if m:
            l, h = int(m.group(1)), int(m.group(2))
            z = c[f"blocks.{l}.attn.hook_z"][:, :, h]  # [n, pos, d_head]
            return z @ self.model.blocks[l].attn.W_O[h].detach()
        l = int(label[1:].split(".")[0])
        return c[f"blocks.{l}.hook_mlp_out"]

    def component(self, label: str, layer: Optional[int]) -> torch.Tensor:
        """A component's contribution [n, pos, d] to the residual entering ``layer`` (None = final):
        the same as ``output`` except "biases", which sums the b_O of the layers before it."""
        if label != "biases":
            return self.output(label)
        n_layers = self.model.cfg.n_layers if layer is None else layer
        b = torch.zeros(self.model.cfg.d_model)
        for blk in self.model.blocks[:n_layers]:
            b = b + blk.attn.b_O.detach()
        return b.expand(self.n, self.width, -1)

    def component_at_position(self, label: str, layer: Optional[int], p: int) -> torch.Tensor:
        """``component(label, layer)[:, p]`` [n, d] (a contiguous copy), kept: the rows a scrub gathers
        at one position, without keeping a head's output at every position ([n, pos, d] per head)."""
        key = (label, layer if label == "biases" else None, p)
        hit = self._at.get(key)
        if hit is None:
            hit = self._at[key] = self.component(label, layer)[:, p].clone()
        return hit

    def resid_in(self, layer: int) -> torch.Tensor:
        return self._cache[f"blocks.{layer}.hook_resid_pre"]  # [n, pos, d]

    def head_inputs(self, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ln1 of the clean residual entering ``layer`` [n, pos, d], the head's clean keys and values
        [n, pos, d_head]), computed on first use. A scrubbed head input is mostly rows of the clean
        residual, and LayerNorm and the projections act row by row, so gathering these rows gives
        what recomputing them on the gathered residual gives (bit for bit on CPU: tested), without
        the [n, pos, d] LayerNorm and projections per head per draw."""
        key = (layer, head)
        if key not in self._head_inputs:
            attn = self.model.blocks[layer].attn
            with torch.no_grad():
                if layer not in self._ln1:
                    self._ln1[layer] = self.model.blocks[layer].ln1(self.resid_in(layer))  # [n, pos, d]
                h = self._ln1[layer]
                self._head_inputs[key] = (h, h @ attn.W_K[head] + attn.b_K[head], h @ attn.W_V[head] + attn.b_V[head])
        return self._head_inputs[key]

    def logits(self, resid: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.ln_final(resid) if m.cfg.normalization == "LN" else resid
        return m.unembed(x)  # [n, d_vocab_out]

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.double(), self.labels, reduction="none")  # [n]

    def sampler(self, feature: torch.Tensor, what: str) -> _Sampler:
        key = id(feature)
        hit = self._samplers.get(key)
        if hit is None or hit[0] is not feature:  # keep the tensor alive so its id stays unique
            hit = (feature, _Sampler(_classes(feature, self.n, what)))
            self._samplers[key] = hit
        return hit[1]


def _layer_of(name: str) -> Optional[int]:
    return int(name.split(".")[1]) if name.startswith("blocks.") else None


def _shared_layers(model: HookedTransformer, toks: torch.Tensor, batch_size: int, like: Optional[ScrubData]) -> int:
    """The block a run of ``model`` may start at, taking the earlier blocks' activations from
    ``like`` (0: run it all): the first block whose weights differ from like's model's (at most the
    last block), where both models are of one type and config, with the same embeddings and no hook
    function or torch module hook, and like ran on the same tokens in the same batches."""
    if like is None or like.model is model:
        return 0
    other = like.model
    if type(other) is not type(model) or other.cfg != model.cfg or like.batch_size != batch_size:
        return 0
    if not (like.toks is toks or (like.toks.shape == toks.shape and like.toks.device == toks.device
                                  and torch.equal(like.toks, toks))):
        return 0
    for m in (model, other):
        if has_hooks(m):
            return 0
        if any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules()):
            return 0
    a, b = model.state_dict(), other.state_dict()
    if a.keys() != b.keys():
        return 0

    def same(k):
        return a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k])

    # what the blocks read: every weight outside the blocks but the final LayerNorm and unembedding
    if not all(same(k) for k in a if _layer_of(k) is None and not k.startswith(("ln_final.", "unembed."))):
        return 0
    n_layers = model.cfg.n_layers
    first = next((l for l in range(n_layers) if not all(same(k) for k in a if _layer_of(k) == l)), n_layers)
    return min(first, n_layers - 1)


def _fill_scrub_cache(model: HookedTransformer, toks: torch.Tensor, names: list, final: str, readout: int,
                    batch_size: int, like: Optional[ScrubData], start: int) -> dict:
    """``names``'s activations [n, pos, ...] and ``final``'s at position ``readout`` [n, d], from the
    model's run (``run_with_cache``) on ``toks`` batch by batch, as ``run_in_batches`` runs it, each
    batch copied into the whole tensors as it comes (no list of batches and concatenation: half the
    peak memory). With ``start`` > 0 the names before block ``start`` are like's (the same tensors)
    and the model runs from block ``start`` on like's residual there."""
    run = [nm for nm in names if start == 0 or (_layer_of(nm) is not None and _layer_of(nm) >= start)] + [final]
    resid = like.resid_in(start) if start else None
    n = toks.shape[0]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, n, batch_size):
            kw = dict(start_at_layer=start, resid=resid[i:i + batch_size]) if start else {}
            _, c = model.run_with_cache(toks[i:i + batch_size], names=run, **kw)
            for nm in run:
                v = c[nm] if nm != final else c[nm][:, readout]
                if nm not in out:
                    out[nm] = v.new_empty((n, *v.shape[1:]))
                out[nm][i:i + v.shape[0]] = v
    cached = {nm: out[nm] if nm in out else like._cache[nm] for nm in names}
    cached[final] = out[final]
    return cached


# --- evaluating one hypothesis for one draw ----------------------------------------------------------


class _Draw:
    def __init__(self, data: ScrubData, gen: torch.Generator, memo: Optional["_HeadMemo"] = None):
        self.d, self.gen, self.memo = data, gen, memo

    def random(self) -> torch.Tensor:
        return torch.randint(self.d.n, (self.d.n,), generator=self.gen)

    def source(self, feature: Feature, like: torch.Tensor, where: str) -> torch.Tensor:
        if isinstance(feature, str):
            if feature == EXACT:
                return like
            if feature == RANDOM:
                return self.random()
            raise ScrubError(f"{where}: feature {feature!r} is neither an array nor EXACT / RANDOM")
        return self.d.sampler(torch.as_tensor(feature), where)(like, self.gen)

    def final_resid(self, hyp: Hypothesis, rest: torch.Tensor) -> torch.Tensor:
        d = self.d
        resid = d.final_resid[rest]  # every unnamed path: the root's one random input (a gather: a copy)
        seen = set()
        for name, node in hyp.paths.items():
            label = component_label(name, d.final_labels)
            if label in seen:
                raise ScrubError(f"hypothesis {hyp.name!r} names {label} twice")
            seen.add(label)
            where = f"hypothesis {hyp.name!r}, {label}"
            src = self.source(node.feature, d.rows, where)
            out = self.component_at(label, None, d.readout_pos, node, src, where)
            # the named path's row replaces the random input's row of the same component
            resid += out - d.component_at_position(label, None, d.readout_pos)[rest]
        return resid

    def component_at(self, label: str, layer: Optional[int], pos: int, node: Path,
                     src: torch.Tensor, where: str) -> torch.Tensor:
        """The output [n, d] of component ``label`` at position ``pos`` (the same in every row) for the
        node ``node`` whose input is ``src``, as read by the residual entering ``layer``."""
        d = self.d
        if node.approx is not None:
            if node.inputs:
                raise ScrubError(f"{where}: a Path has either inputs or approx, not both")
            phi = torch.as_tensor(node.approx.values)
            d_model = d.model.cfg.d_model
            if phi.shape != (d.n, d_model):
                raise ScrubError(f"{where}: approx values have shape {tuple(phi.shape)}, need [{d.n}, {d_model}]")
            rest = self.random()
            s_phi = self.source(node.approx.feature, src, where + " approx")
            return phi[s_phi] + d.component_at_position(label, layer, pos)[rest] - phi[rest]
        if not node.inputs:
            return d.component_at_position(label, layer, pos)[src]
        m = _HEAD_LABEL.match(label)
        if not m:
            raise ScrubError(f"{where}: only attention heads' inputs can be named, not {label}'s")
        layer_h, head = int(m.group(1)), int(m.group(2))
        if self.memo is None:
            return self.head_output(layer_h, head, torch.full((d.n,), pos, dtype=torch.long), node, src, where)
        return self.memo.head_output(self, layer_h, head, pos, node, src, where)

    def head_output(self, layer: int, head: int, qpos: torch.Tensor, node: Path, src: torch.Tensor,
                    where: str) -> torch.Tensor:
        """Head (layer, head)'s output [n, d] at query positions ``qpos`` [n], its input residual
        built per position from the sources ``node`` names (the rest from one random input)."""
        d, model = self.d, self.d.model
        rest = self.random()
        resid = d.resid_in(layer)
        # the head's input residual, per position: a clean row (source[:, p]) or, where a position's
        # components are named, a residual composed here (composed[p], [n, d])
        source = rest[:, None].repeat(1, d.width)  # [n, pos]
        composed: dict[int, torch.Tensor] = {}
        moved: set = set()  # positions whose clean row is not rest's
        mask_src = rest
        labels = final_labels(model, layer)
        for key, child in node.inputs.items():
            w = f"{where} <- {key!r}"
            if key == "mask":
                if child.inputs or child.approx is not None:
                    raise ScrubError(f"{w}: the mask has no inputs to name")
                mask_src = self.source(child.feature, src, w)
                continue
            if isinstance(key, bool) or not isinstance(key, int) or not -d.width <= key < d.width:
                raise ScrubError(f"{w}: a head's inputs are keyed by position (an int in [0, {d.width})) "
                                 f"or 'mask', got {key!r}")
            p = key % d.width
            s_p = self.source(child.feature, src, w)
            if child.approx is not None:
                raise ScrubError(f"{w}: approx applies to a component, not to a position")
            if not child.inputs:
                source[:, p] = s_p
                moved.add(p)
                composed.pop(p, None)
                continue
            r_p = self.random()
            x_p = resid[r_p, p]  # [n, d] (a gather: a copy)
            seen = set()
            for name, grand in child.inputs.items():
                label = component_label(name, labels)
                if label in seen:
                    raise ScrubError(f"{w}: {label} named twice")
                seen.add(label)
                wc = f"{w} <- {label}"
                s_c = self.source(grand.feature, s_p, wc)
                x_p += self.component_at(label, layer, p, grand, s_c, wc) - d.component_at_position(label, layer, p)[r_p]
            composed[p] = x_p
        return self._attend(layer, head, source, composed, qpos, d.pad[mask_src], (rest, moved))

    def _attend(self, layer: int, head: int, source: torch.Tensor, composed: Mapping[int, torch.Tensor],
                qpos: torch.Tensor, pad: torch.Tensor, base: Optional[tuple] = None) -> torch.Tensor:
        """One head (LayerNorm included) on an input residual given per position as a clean row,
        ``source`` [n, pos], or a composed one, ``composed[p]`` [n, d]; query at qpos [n]. Clean rows'
        LayerNorm, keys and values are gathered from ``ScrubData.head_inputs``; only composed
        positions are recomputed. The same numbers as running the head on the assembled residual
        (tests/test_scrub.py: ``_attend_reference``)."""
        d = self.d
        block, cfg = d.model.blocks[layer], d.model.cfg
        attn = block.attn
        h_clean, k_clean, v_clean = d.head_inputs(layer, head)
        k, v = _gather_rows(k_clean, source, base), _gather_rows(v_clean, source, base)  # [n, pos, d_head]
        h_q = h_clean[source[d.rows, qpos], qpos]  # [n, d]: the query position's normalised input
        for p, x_p in composed.items():
            h_p = block.ln1(x_p)  # [n, d]
            k[:, p] = h_p @ attn.W_K[head] + attn.b_K[head]
            v[:, p] = h_p @ attn.W_V[head] + attn.b_V[head]
            at = qpos == p
            h_q[at] = h_p[at]
        q = h_q @ attn.W_Q[head] + attn.b_Q[head]  # [n, d_head]
        scores = torch.einsum("nd,npd->np", q, k) / math.sqrt(attn.d_head)  # [n, pos]
        blocked = pad.clone()
        if cfg.attention == "causal":
            blocked |= torch.arange(d.width)[None, :] > qpos[:, None]
        blocked &= ~blocked.all(-1, keepdim=True)  # as the model: a fully masked row attends everywhere
        pattern = scores.masked_fill(blocked, float("-inf")).softmax(-1)  # [n, pos]
        z = torch.einsum("np,npd->nd", pattern, v)
        return z @ attn.W_O[head]  # [n, d]


class _HeadMemo:
    """A scrub call's recomputed head outputs, handed out again where another hypothesis of the call
    asks for the same one: the same head at the same query position for the same Path object (the
    unchanged paths of a wrong variant are its hypothesis's own objects) with the same input rows and
    the same generator state (the same draws of that draw: the samplers and random inputs take the
    same number of numbers whatever a feature's values), so the same numbers. A hit also sets the
    generator to where the computation left it. Up to ``size`` outputs, least recently used first out
    (a hypothesis's variants ask for its outputs one after another)."""

    def __init__(self, size: int = 48):
        self.size = size
        self.entries: dict = {}
        self.hits = self.misses = 0

    def head_output(self, draw: "_Draw", layer: int, head: int, pos: int, node: Path, src: torch.Tensor,
                    where: str) -> torch.Tensor:
        state = draw.gen.get_state()
        key = (layer, head, pos, id(node), hash(state.numpy().tobytes()), hash(src.numpy().tobytes()))
        hit = self.entries.pop(key, None)
        if hit is not None and hit[0] is node and torch.equal(hit[1], src) and torch.equal(hit[2], state):
            self.entries[key] = hit  # the most recently used
            self.hits += 1
            draw.gen.set_state(hit[3])
            return hit[4]
        self.misses += 1
        out = draw.head_output(layer, head, torch.full((draw.d.n,), pos, dtype=torch.long), node, src, where)
        self.entries[key] = (node, src, state, draw.gen.get_state(), out)
        while len(self.entries) > self.size:
            self.entries.pop(next(iter(self.entries)))
        return out


def _gather_rows(table: torch.Tensor, source: torch.Tensor, base: Optional[tuple] = None) -> torch.Tensor:
    """table[source[i, p], p] for every (i, p): [n, pos, ...]. ``base`` = (rows [n], moved): source
    is ``rows`` at every position but those in ``moved``; with few moved, whole rows are gathered
    and the moved positions overwritten (a row gather is ~3x faster than a per-element one);
    otherwise one index_select on the flattened table (~2x faster than advanced indexing with two
    index tensors). Either way copies of the table's entries: the values do not depend on the way."""
    n, width = source.shape
    if base is not None and 4 * len(base[1]) <= width:
        rows, moved = base
        out = table.index_select(0, rows)  # the rows table[rows] gives, ~5x faster (5,000 x 42 x 28)
        for p in moved:
            out[:, p] = table[source[:, p], p]
        return out
    flat = table.reshape(table.shape[0] * width, *table.shape[2:])
    index = (source * width + torch.arange(width)[None, :]).reshape(-1)
    return flat.index_select(0, index).view(n, width, *table.shape[2:])


# --- results -------------------------------------------------------------------------------------


@dataclass
class ScrubResult:
    name: str
    clean: float  # mean loss of the model
    scrubbed: Estimate  # mean loss of the scrubbed model (over draws)
    baseline: Estimate  # mean loss with each input scored by the model's output on a random input
    recovered: Estimate  # 1 - scrubbed / baseline (the write-up's "loss recovered")
    normalised: Estimate  # (baseline - scrubbed) / (baseline - clean)
    scrubbed_draws: np.ndarray = field(repr=False, default=None)
    baseline_draws: np.ndarray = field(repr=False, default=None)
    scrubbed_examples: np.ndarray = field(repr=False, default=None)  # [n]: each example's loss over the draws
    baseline_examples: np.ndarray = field(repr=False, default=None)
    n_examples: int = 0

    def summary(self) -> str:
        return (f"{self.name}: loss {self.scrubbed.point:.4g} (clean {self.clean:.4g}, random-logit baseline "
                f"{self.baseline.point:.4g}); recovered {self.recovered.point:.3f} "
                f"[{self.recovered.lo:.3f}, {self.recovered.hi:.3f}], normalised {self.normalised.point:.3f} "
                f"({len(self.scrubbed_draws)} draws x {self.n_examples} examples)")


def _recovered(s, b, axis=-1):
    """The write-up's "loss recovered", 1 - scrubbed / baseline: the gap measured from a perfect model."""
    return loss_recovered(s, 0.0, b, axis=axis)


def _recovered_jackknife(s, b):
    """Leave-one-example-out values of :func:`_recovered`, in closed form (for its BCa interval)."""
    n = len(s)
    return 1 - (s.sum() - s) / (b.sum() - b) if n > 1 else np.full(n, np.nan)


def _normalised_jackknife(s, b, c):
    """Leave-one-example-out values of :func:`_normalised`, in closed form."""
    b_rest = b.sum() - b
    return (b_rest - (s.sum() - s)) / (b_rest - (c.sum() - c))


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _normalised(s, b, c, axis=-1):
    return loss_recovered(s, c, b, axis=axis)


def _fraction_estimate(samples: tuple, statistic, jackknife, u: np.ndarray, v: np.ndarray, n_resamples: int,
                       seed: int, *, clean, baseline, patched) -> Estimate:
    """The interval of a fraction ``1 - mean(u) / mean(v)`` (u, v: per-example losses over the
    draws, paired): the studentized bootstrap of the ratio of means on the log scale
    (``stats.ratio_of_means_interval``), at the expanded level, its quantiles read at the (B + 1)
    alpha order statistic. BCa of ``statistic`` on ``samples`` (the former rule, on the same
    resamples) where the data are unusable (its Estimate says why) or that is undefined: a mean
    loss not positive (the normalised fraction of a scrubbed model better than the clean one) or a
    resample with no spread (a hypothesis that names nothing: scrubbed == baseline in every draw).

    Why: BCa of this fraction passed a simulated claim at its threshold 2.77% [2.55%, 3.00%] of 20,000
    times (2,000 examples x 5 draws, nominal 2.5%; 500 x 5: 2.93% [2.71%, 3.17%]). Heavy-tailed losses
    make a data set's spread track its ratio (one missing the rare large scrubbed losses has both a low
    ratio and a small standard error), and 1,000 resamples read by interpolation sit ~0.1 point past the
    nominal tail; the bootstrap-t divides each resample by its own standard error, which carries that
    dependence into the interval, and the order statistic removes the finite-B excess: 2.54% [2.33%,
    2.76%] on the same 20,000 (500 x 5: 2.55% [2.34%, 2.78%]; README, calibration)."""
    if undefined_loss_gap(clean, baseline, patched) is None and all(np.all(np.isfinite(x)) for x in samples) \
            and len(u) >= 3:
        point = float(statistic(*samples, axis=-1))
        lo, hi = ratio_of_means_interval(u, v, expanded_level(0.95, len(u)), n_resamples, seed)
        if all(math.isfinite(x) for x in (point, lo, hi)):
            return Estimate(point, 1 - hi, 1 - lo, 0.95, "studentized", len(u), statistic.__name__)
    # the former rule, under the one rule for a gap that cannot be divided by (loss_recovered_ci)
    return loss_recovered_ci(samples, statistic, clean=clean, baseline=baseline, patched=patched, paired=True,
                             method="BCa", n_resamples=n_resamples, seed=seed, jackknife=jackknife)


def scrub_result(name: str, clean, scrubbed, baseline, *, seed: int = 0, n_resamples: int = 1000) -> ScrubResult:
    """A ScrubResult from per-example losses: ``scrubbed`` / ``baseline`` [n_draws, n], ``clean`` [n]
    (or one number: the clean mean loss, exact). The intervals bootstrap the examples (paired), each
    example's losses averaged over the draws, with generator ``seed``."""
    s, b = np.asarray(scrubbed, dtype=np.float64), np.asarray(baseline, dtype=np.float64)  # [draws, n]
    c = np.broadcast_to(np.asarray(clean, dtype=np.float64), s.shape[1:])  # [n]
    s_ex, b_ex = s.mean(0), b.mean(0)  # [n]: each example over the draws
    boot = dict(paired=True, method="percentile", n_resamples=n_resamples, seed=seed)
    c_ex = np.array(c)
    return ScrubResult(
        name=name, clean=float(c.mean()),
        scrubbed=bootstrap_ci(s_ex, _mean, **boot), baseline=bootstrap_ci(b_ex, _mean, **boot),
        # the fractions, 1 - (a ratio of mean losses): the studentized interval of the ratio
        # (_fraction_estimate); a zero loss gap (a baseline loss of 0; for normalised, baseline =
        # clean) makes them undefined Estimates, whose claims fail stating the losses
        recovered=_fraction_estimate((s_ex, b_ex), _recovered, _recovered_jackknife, s_ex, b_ex, n_resamples, seed,
                                     clean=0.0, baseline=b_ex, patched={"scrubbed": s_ex}),
        normalised=_fraction_estimate((s_ex, b_ex, c_ex), _normalised, _normalised_jackknife, s_ex - c_ex, b_ex - c_ex,
                                      n_resamples, seed, clean=c_ex, baseline=b_ex, patched={"scrubbed": s_ex}),
        scrubbed_draws=s.mean(1), baseline_draws=b.mean(1), n_examples=s.shape[1],
        scrubbed_examples=s_ex, baseline_examples=b_ex)


def scrub(model: HookedTransformer, toks_or_data: Union[torch.Tensor, ScrubData], labels=None,
          hypotheses: Sequence[Hypothesis] = (), *, n_draws: int = 8, seed: int = 0) -> list[ScrubResult]:
    """Scrub each hypothesis on the data (``n_draws`` resampling draws each, generator seeded with
    ``(seed, draw)``: every hypothesis sees the same root random inputs in a draw)."""
    data = toks_or_data if isinstance(toks_or_data, ScrubData) else ScrubData(model, toks_or_data, labels)
    if data.model is not model:
        raise ScrubError("the ScrubData was built for another model")
    if isinstance(hypotheses, Hypothesis):
        hypotheses = [hypotheses]
    if not isinstance(n_draws, int) or n_draws < 1:
        raise ScrubError(f"n_draws must be a positive int, got {n_draws!r}")
    clean = data.loss(data.clean_logits).numpy()  # [n]
    results = []
    memo = _HeadMemo()
    with torch.no_grad():
        for hyp in hypotheses:
            if not isinstance(hyp, Hypothesis):
                raise ScrubError(f"expected a Hypothesis, got {type(hyp).__name__}")
            s_draws, b_draws = [], []
            for k in range(n_draws):
                gen = torch.Generator().manual_seed(1_000_003 * seed + k)
                draw = _Draw(data, gen, memo)
                rest = draw.random()  # the root's random input: unnamed paths and the baseline
                s_draws.append(data.loss(data.logits(draw.final_resid(hyp, rest))).numpy())  # [n]
                b_draws.append(data.loss(data.clean_logits[rest]).numpy())
            results.append(scrub_result(hyp.name, clean, np.stack(s_draws), np.stack(b_draws), seed=seed))
    return results


def scrub_claim(claim, name: str, result: ScrubResult, at_least: float):
    """Claim that ``result`` recovers at least ``at_least`` of the loss (``1 - scrubbed/baseline``,
    decided on the bootstrap interval's lower bound), with the losses in the claim's note."""
    __tracebackhide__ = True
    return claim.at_least(f"{name}: fraction of loss recovered", result.recovered, at_least,
                          note=_note(result))


def scrub_control_claim(claim, name: str, result: ScrubResult, at_most: float):
    """Claim that a control hypothesis recovers at most ``at_most`` (on the interval's upper bound)."""
    __tracebackhide__ = True
    return claim.at_most(f"{name}: fraction of loss recovered", result.recovered, at_most, note=_note(result))


def _note(r: ScrubResult) -> str:
    return (f"scrubbed loss {r.scrubbed.point:.4g}, clean {r.clean:.4g}, random-logit baseline "
            f"{r.baseline.point:.4g}; normalised (baseline - scrubbed)/(baseline - clean) = "
            f"{r.normalised.point:.4f}; {len(r.scrubbed_draws)} draws x {r.n_examples} examples")


# --- wrong variants: power and specificity of a hypothesis ---------------------------------------------
#
# A hypothesis that recovers the loss says little if a wrong story recovers as much. Its wrong
# variants: each named path's feature replaced by an INDEPENDENT feature of the same distribution (its
# values permuted across examples: the same classes and class sizes, unrelated to the input), and each
# named head replaced by a head the hypothesis does not name (the same feature, read by another head).
# A hypothesis holds when it recovers what it should AND beats its best wrong variant by a stated
# margin, with separated intervals (scrub_beats_variants_claim).


@dataclass(frozen=True)
class Variant:
    """A wrong variant of a hypothesis, with the named heads whose story it changes (a mutation of one
    of those heads is judged against the variants that touch it)."""

    hypothesis: Hypothesis
    touches: frozenset


def independent_feature(feature: Feature, gen: torch.Generator) -> torch.Tensor:
    """The feature's values permuted across examples: the same marginal distribution and cardinality,
    independent of each example's input."""
    values = torch.as_tensor(feature)
    return values[torch.randperm(values.shape[0], generator=gen)]


def named_heads(hyp: Hypothesis) -> set:
    """Every head label the hypothesis names, at any depth ("L1H0")."""
    out: set = set()

    def walk(key, node: Path) -> None:
        if isinstance(key, str) and _HEAD.match(key):
            out.add(component_label(key, [key]) if key.startswith("L") else _as_label(key))
        for k, child in node.inputs.items():
            if isinstance(child, Path):
                walk(k, child)
            elif isinstance(child, Mapping):  # a position's components
                for k2, c2 in child.items():
                    walk(k2, c2)

    for key, node in hyp.paths.items():
        walk(key, node)
    return out


def _as_label(name: str) -> str:
    m = _HEAD.match(name)
    l, h = [g for g in m.groups() if g is not None]
    return f"L{l}H{h}"


def _min_layer(node: Path) -> int:
    """The lowest layer a head can sit in and still read this node's named inputs (a component of
    layer l is an input of layers > l only)."""
    need = 0
    for child in node.inputs.values():
        parts = child.inputs if isinstance(child, Path) else child
        for k in (parts or {}):
            m = _HEAD.match(k) if isinstance(k, str) else None
            mm = _MLP.match(k) if isinstance(k, str) else None
            if m:
                need = max(need, int([g for g in m.groups() if g is not None][0]) + 1)
            elif mm:
                need = max(need, int([g for g in mm.groups() if g is not None][0]) + 1)
    return need


def wrong_variants(hyp: Hypothesis, model: HookedTransformer, seed: int = 0, replace_heads: str | None = "all",
                   nested: bool = True) -> list[Variant]:
    """The hypothesis's wrong variants: for each named direct path (and, with ``nested``, each named
    input of one), the same hypothesis with that path's feature replaced by an independent copy; for
    each pair of named direct paths reading different features, the two features exchanged; for
    each named direct-path head, the same hypothesis with that head replaced by each head it does not
    name that can read the named inputs (``replace_heads="all"``), or only by those of the nearest
    layer at or below its own that has such a head (``"nearest"``: its unnamed siblings, else the
    layer below), or by none (None)."""
    gen = torch.Generator().manual_seed(seed)
    out: list[Variant] = []
    for key, node in hyp.paths.items():
        label = _as_label(key) if isinstance(key, str) and _HEAD.match(key) else key
        if isinstance(node.feature, str):
            continue  # EXACT / RANDOM: nothing to replace
        paths = dict(hyp.paths)
        paths[key] = Path(independent_feature(node.feature, gen), node.inputs, node.approx)
        out.append(Variant(Hypothesis(f"{hyp.name} | {label} reads an independent feature", paths),
                           frozenset({label})))
        if nested:
            for pos, child in node.inputs.items():
                parts = child.inputs if isinstance(child, Path) else {}
                for comp, sub in parts.items():
                    if isinstance(sub.feature, str):
                        continue
                    fresh = independent_feature(sub.feature, gen)
                    approx = None if sub.approx is None else Approx(sub.approx.values, fresh)  # phi reads it too
                    new_parts = {**parts, comp: Path(fresh, sub.inputs, approx)}
                    new_inputs = {**node.inputs, pos: Path(child.feature, new_parts, child.approx)}
                    paths = dict(hyp.paths)
                    paths[key] = Path(node.feature, new_inputs, node.approx)
                    sub_label = _as_label(comp) if _HEAD.match(comp) else comp
                    out.append(Variant(Hypothesis(f"{hyp.name} | {label}'s input {pos}: {sub_label} reads an "
                                                  "independent feature", paths),
                                       frozenset({label} | ({sub_label} if _HEAD.match(comp) else set()))))
    named = [k for k, node in hyp.paths.items() if not isinstance(node.feature, str)]
    for i, a in enumerate(named):  # two named paths' features exchanged: a head swap makes this one right
        for b in named[i + 1:]:
            fa, fb = hyp.paths[a].feature, hyp.paths[b].feature
            if torch.equal(torch.as_tensor(fa), torch.as_tensor(fb)):
                continue
            la, lb = (_as_label(k) if isinstance(k, str) and _HEAD.match(k) else k for k in (a, b))
            paths = dict(hyp.paths)
            paths[a] = Path(fb, hyp.paths[a].inputs, hyp.paths[a].approx)
            paths[b] = Path(fa, hyp.paths[b].inputs, hyp.paths[b].approx)
            out.append(Variant(Hypothesis(f"{hyp.name} | {la} and {lb} exchange features", paths),
                               frozenset({la, lb})))
    if replace_heads not in (None, "all", "nearest"):
        raise ScrubError(f"replace_heads must be 'all', 'nearest' or None, got {replace_heads!r}")
    if replace_heads:
        top = {(_as_label(k) if isinstance(k, str) and _HEAD.match(k) else k) for k in hyp.paths}
        heads = [f"L{l}H{h}" for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
        for key, node in hyp.paths.items():
            if not (isinstance(key, str) and _HEAD.match(key)):
                continue
            label = _as_label(key)
            layer_of = lambda h: int(h[1:h.index("H")])  # noqa: E731
            free = [h for h in heads if h not in top and layer_of(h) >= _min_layer(node)]
            if replace_heads == "nearest":
                below = [layer_of(h) for h in free if layer_of(h) <= layer_of(label)]
                free = [h for h in free if below and layer_of(h) == max(below)]
            for other in free:
                paths = {(other if k == key else k): v for k, v in hyp.paths.items()}
                out.append(Variant(Hypothesis(f"{hyp.name} | {label} replaced by {other}", paths),
                                   frozenset({label})))
    return out


def margin_over(result: ScrubResult, others: Sequence[ScrubResult]) -> tuple[Estimate, ScrubResult]:
    """(recovered(result) - recovered(best of ``others``), bootstrapped over the examples (paired: the
    draws share their root random inputs), each example's losses averaged over the draws; the best
    other). All must come from one ``scrub`` call's seed."""
    best = max(others, key=lambda r: r.recovered.point)
    if best.scrubbed_examples is None or not np.array_equal(best.baseline_examples, result.baseline_examples):
        raise ScrubError(f"{best.name!r} and {result.name!r} were not scrubbed on the same draws")

    def gap(s_h, s_v, b, axis=-1):
        return _recovered(s_h, b, axis=axis) - _recovered(s_v, b, axis=axis)

    # paired over the examples, each averaged over the shared draws (as every scrub interval)
    est = loss_recovered_ci((result.scrubbed_examples, best.scrubbed_examples, result.baseline_examples), gap,
                            clean=0.0, baseline=result.baseline_examples, paired=True, method="percentile",
                            n_resamples=1000, seed=0, name="recovered(hypothesis) - recovered(best wrong variant)",
                            patched={"scrubbed": result.scrubbed_examples, "best variant": best.scrubbed_examples})
    return est, best


def scrub_holds_claim(claim, name: str, result: ScrubResult, at_least: float, variants, margin: float):
    """A scrubbing hypothesis holds: it recovers at least ``at_least`` AND at least ``margin`` more than
    its best wrong variant. One claim on the smaller of the two excesses (bootstrapped together over
    the paired draws, decided on the lower bound: each alone can survive a mutation the other
    catches), then the intervals' separation from the best variant's. ``variants``: their results, or
    a callable returning them, not called when the recovery's whole interval is below the bar (the
    claim fails whatever they give: the recovery's excess is recorded, its note says so)."""
    __tracebackhide__ = True
    if result.recovered.undefined:  # no loss gap to recover (loss_recovered_ci): the claim fails as measured
        return claim.at_least(f"{name}: min(recovered - {at_least:g}, recovered - best wrong variant - {margin:g})",
                              result.recovered, 0.0, note=f"the wrong variants were not scrubbed; {_note(result)}")
    if result.recovered.hi < at_least:
        rec = result.recovered
        below = Estimate(rec.point - at_least, rec.lo - at_least, rec.hi - at_least, level=rec.level, n=rec.n,
                         method=rec.method, statistic="recovered - bar")
        return claim.at_least(f"{name}: min(recovered - {at_least:g}, recovered - best wrong variant - {margin:g})",
                              below, 0.0, note=f"recovered {rec.point:.3f} [{rec.lo:.3f}, {rec.hi:.3f}] is below the "
                              f"bar {at_least:g} over its whole interval, so the wrong variants were not scrubbed "
                              f"(the smaller excess is at most this one); {_note(result)}")
    variants = list(variants() if callable(variants) else variants)
    est, best = margin_over(result, variants)

    def holds(s_h, s_v, b, axis=-1):
        rec = _recovered(s_h, b, axis=axis)
        return np.minimum(rec - at_least, rec - _recovered(s_v, b, axis=axis) - margin)

    value = loss_recovered_ci((result.scrubbed_examples, best.scrubbed_examples, result.baseline_examples), holds,
                              clean=0.0, baseline=result.baseline_examples, paired=True, method="percentile",
                              n_resamples=1000, seed=0, name="min(recovered - bar, recovered - best wrong variant - margin)",
                              patched={"scrubbed": result.scrubbed_examples, "best variant": best.scrubbed_examples})
    listing = "; ".join(f"{v.name.split(' | ', 1)[-1]} {v.recovered.point:.3f}"
                        for v in sorted(variants, key=lambda v: -v.recovered.point))
    claim.at_least(f"{name}: min(recovered - {at_least:g}, recovered - best wrong variant - {margin:g})", value, 0.0,
                   note=f"recovered {result.recovered.point:.3f} [{result.recovered.lo:.3f}, {result.recovered.hi:.3f}]"
                        f" (bar {at_least:g}); best wrong variant {best.name.split(' | ', 1)[-1]} "
                        f"{best.recovered.point:.3f} [{best.recovered.lo:.3f}, {best.recovered.hi:.3f}], margin "
                        f"{est.point:.3f} [{est.lo:.3f}, {est.hi:.3f}] (needs {margin:g}); all {len(variants)}: "
                        f"{listing}; {_note(result)}")
    return claim.at_least(f"{name}: lower bound - best wrong variant's upper bound",
                          result.recovered.lo - best.recovered.hi, 0.0,
                          note=f"{result.recovered.lo:.3f} vs {best.recovered.hi:.3f}")


def scrub_beats_variants_claim(claim, name: str, result: ScrubResult, variants: Sequence[ScrubResult],
                               margin: float):
    """Claim that ``result`` recovers at least ``margin`` more than its best wrong variant (paired
    bootstrap over draws, on the lower bound), and that their intervals are separated."""
    __tracebackhide__ = True
    est, best = margin_over(result, variants)
    listing = "; ".join(f"{v.name.split(' | ', 1)[-1]} {v.recovered.point:.3f}"
                        for v in sorted(variants, key=lambda v: -v.recovered.point))
    rec = claim.at_least(f"{name}: recovered - recovered(best wrong variant)", est, margin,
                         note=f"best wrong variant: {best.name.split(' | ', 1)[-1]} {best.recovered.point:.3f} "
                              f"[{best.recovered.lo:.3f}, {best.recovered.hi:.3f}]; all {len(variants)}: {listing}")
    if est.undefined:  # no loss gap (loss_recovered_ci): no interval to separate either
        return rec
    return claim.at_least(f"{name}: lower bound - best wrong variant's upper bound", result.recovered.lo - best.recovered.hi,
                          0.0, note=f"{result.recovered.lo:.3f} vs {best.recovered.hi:.3f}")
