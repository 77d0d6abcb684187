"""The primitive interventions on a model and its data: every claim, negative control, derived
mutation and scrub is built from these (``controls`` registers them as controls, ``mutations``
derives them from what a test is about, ``scrub`` and the hypotheses call them directly).

* ablations: ``zero_ablate_head`` / ``zero_ablate_mlp`` (the output set to zero in the weights),
  ``mean_ablate_head`` (the output replaced by its mean over a FIXED reference set of inputs, taken
  once), ``batch_mean_ablate_head`` / ``batch_mean_ablate_mlp`` (replaced by the mean over whatever
  batch is being evaluated, at run time);
* weight moves: ``permute_heads`` / ``swap_heads`` (the same function, indices naming other
  circuits), ``uniform_attention``, ``permute_positions``, ``randomise_read_in``, ``reinitialize``;
* patching and resampling: ``patch_activations``, ``resample_activations``, ``resample_together``;
* data: ``shuffle_labels``.

Every function returns a NEW object (the input is never modified), so a control can be applied to a
session-scoped model fixture without leaking into other tests. A bad head or layer is an
:class:`~circuits.errors.InputError`; a model without the part an edit needs (not a circuits
``HookedTransformer``) a one-line :class:`~circuits.errors.ControlError`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import torch

from circuits.errors import ControlError, InputError
from circuits.model.transformer import Attention, EmbeddingEditedError, HookedTransformer, TransformerBlock


def check_head(model: HookedTransformer, layer: int, head: int) -> None:
    """InputError unless the model has head ``layer``, ``head`` (the one head check of the library)."""
    if not 0 <= layer < model.cfg.n_layers or not 0 <= head < model.cfg.n_heads:
        raise InputError(f"no head L{layer}H{head}: the model has {model.cfg.n_layers} layers x "
                         f"{model.cfg.n_heads} heads")


def check_layer(model: HookedTransformer, layer: int, what: str = "layer") -> None:
    """InputError unless the model has layer ``layer``."""
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"no {what} L{layer}: the model has {model.cfg.n_layers} layers")


_NEEDS = {
    "attention": (lambda m: hasattr(m, "blocks") and hasattr(m.blocks[0], "attn") and hasattr(m.blocks[0].attn, "W_O"),
                  "blocks[l].attn with W_QKV / W_O (a circuits HookedTransformer)"),
    "mlp": (lambda m: hasattr(m, "blocks") and getattr(m.blocks[0], "mlp", None) is not None,
            "blocks[l].mlp (a circuits HookedTransformer with MLPs)"),
    "pos": (lambda m: hasattr(getattr(m, "pos_embed", None), "W_pos"),
            "a learned or sinusoidal positional embedding pos_embed.W_pos"),
    "embed": (lambda m: hasattr(m, "embed"), "an embedding module `embed` (W_E or a vector read-in W_in)"),
}


def _need(model: Any, what: str, edit: str) -> None:
    """A one-line ControlError unless ``model`` has the part ``edit`` changes (a foreign model)."""
    ok, needs = _NEEDS[what]
    try:
        good = ok(model)
    except (TypeError, IndexError, AttributeError):
        good = False
    if not good:
        raise ControlError(f"mutation {edit!r} needs a model with {needs}; got a "
                           f"{type(model).__module__}.{type(model).__qualname__}")


def _derangement(n: int, seed: int) -> list[int]:
    """A seeded random permutation of range(n) that moves every element (n >= 2)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen, device="cpu").tolist()  # the same order on every device
        if all(p != i for i, p in enumerate(perm)):
            return perm


def reinitialize(model: HookedTransformer, seed: int = 12345) -> HookedTransformer:
    """An untrained model of the same config (fresh random init; frozen one-hot/sinusoidal kept)."""
    new = copy.deepcopy(model)
    new.init_weights(seed)
    return new


@torch.no_grad()
def zero_ablate_head(model: HookedTransformer, layer: int, head: int) -> HookedTransformer:
    """Remove one head's output (its W_O slice set to zero; b_O, shared by all heads, is kept)."""
    check_head(model, layer, head)
    new = copy.deepcopy(model)
    new.blocks[layer].attn.W_O[head].zero_()
    return new


@torch.no_grad()
def zero_ablate_mlp(model: HookedTransformer, layer: int) -> HookedTransformer:
    """Remove one MLP's output entirely (W_out and b_out set to zero)."""
    if not 0 <= layer < model.cfg.n_layers or not model.cfg.d_mlp:
        raise InputError(f"no MLP in layer {layer}: model has {model.cfg.n_layers} layers, d_mlp={model.cfg.d_mlp}")
    new = copy.deepcopy(model)
    new.blocks[layer].mlp.W_out.zero_()
    new.blocks[layer].mlp.b_out.zero_()
    return new


def mean_ablate_head(model: HookedTransformer, layer: int, head: int, inputs: torch.Tensor) -> HookedTransformer:
    """Replace one head's output by its mean over the FIXED reference inputs `inputs` (per position,
    computed once here) via a permanent hook on `hook_z`. Means are taken over non-pad rows of each
    position when the model pads. (:func:`batch_mean_ablate_head` takes the mean over the batch
    being evaluated instead.)"""
    check_head(model, layer, head)
    name = f"blocks.{layer}.attn.hook_z"
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names=[name])
    z = cache[name][:, :, head]  # [batch, pos, d_head]
    pad = model.key_padding_mask(inputs)
    if pad is not None:
        keep = (~pad).to(z.dtype)[..., None]  # [batch, pos, 1]
        mean_z = (z * keep).sum(0) / keep.sum(0).clamp(min=1)  # [pos, d_head]
    else:
        mean_z = z.mean(0)  # [pos, d_head]
    new = copy.deepcopy(model)

    def replace(z: torch.Tensor, hook) -> torch.Tensor:
        z = z.clone()
        n = z.shape[1]
        z[:, :, head] = mean_z[:n].to(z.dtype)
        return z

    new.hook_dict[name].fns.append(replace)
    return new


@torch.no_grad()
def permute_heads(model: HookedTransformer, layer: int, perm: Optional[Sequence[int]] = None,
                  seed: int = 0) -> HookedTransformer:
    """Move whole heads (Q, K, V and O together) to new indices within `layer`.

    The model computes exactly the same function, but "head h" now names a different circuit: the
    control for claims pinned to a head index. `perm[i]` is the old head placed at index i; by default
    a seeded random derangement (no head stays put).
    """
    n = model.cfg.n_heads
    if perm is None:
        if n < 2:
            raise InputError("permute_heads needs at least 2 heads")
        perm = _derangement(n, seed)
    perm = list(perm)
    if sorted(perm) != list(range(n)):
        raise InputError(f"perm {perm} is not a permutation of range({n})")
    new = copy.deepcopy(model)
    attn = new.blocks[layer].attn
    attn.W_QKV.copy_(attn.W_QKV[:, perm])
    attn.b_QKV.copy_(attn.b_QKV[:, perm])
    attn.W_O.copy_(attn.W_O[perm])
    return new


def swap_heads(model: Any, layer: int, head: int, other: int | None = None) -> Any:
    """Exchange every weight of two heads of one layer (Q, K, V and O; ``other`` defaults to the next
    head): the same function, the two indices naming each other's circuit."""
    _need(model, "attention", "swap_head")
    n = model.cfg.n_heads
    if n < 2:
        raise ControlError(f"swap_head:L{layer}H{head}: layer {layer} has one head, nothing to swap with")
    other = (head + 1) % n if other is None else other
    perm = list(range(n))
    perm[head], perm[other] = other, head
    return permute_heads(model, layer, perm)


def uniform_attention(model: Any, layer: int, head: int) -> Any:
    """The head's queries set to zero: every allowed key gets the same score, so the head attends
    uniformly (its values and output map are kept)."""
    _need(model, "attention", "uniform_attention")
    check_head(model, layer, head)
    new = copy.deepcopy(model)
    with torch.no_grad():
        attn = new.blocks[layer].attn
        attn.W_QKV[0, head].zero_()
        attn.b_QKV[0, head].zero_()
    return new


def _batch_mean(x: torch.Tensor, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over the batch at each position, over non-padding rows when a pad mask is known."""
    if pad is None or pad.shape != x.shape[:2]:
        return x.mean(0, keepdim=True).expand_as(x)
    keep = (~pad).to(x.dtype).reshape(*pad.shape, *([1] * (x.ndim - 2)))
    mean = (x * keep).sum(0, keepdim=True) / keep.sum(0, keepdim=True).clamp(min=1)
    return mean.expand_as(x)


def _with_pad_tracker(model: Any) -> dict:
    """A permanent hook on hook_embed that notes which rows are padding (rows whose embedding is the
    pad token's), so batch means skip them; returns the state dict the mean hooks read."""
    state: dict = {"pad": None}
    pad_token = getattr(model.cfg, "pad_token", None)
    if pad_token is None or getattr(model.cfg, "d_input", 0) or "hook_embed" not in model.hook_dict:
        return state
    w_pad = model.embed.W_E[pad_token]

    def pad_of(x):  # [batch, pos, d_model] embeddings -> [batch, pos] padding rows
        return (x == w_pad.to(x.dtype)).all(-1)

    def note(x, hook):
        state["pad"] = pad_of(x)
        return None

    note.circuits_key = "pad_tracker"
    note.circuits_pad_state = (state, pad_of)  # for resample_together's last-block short cut (_last_block_means)

    model.hook_dict["hook_embed"].fns.append(note)
    return state


def _in_weights(model: Any, name: str, *args: int) -> Any:
    """The mutant a model makes in its weights for a hook-based mutation, or None: a model whose exact
    evaluation runs no hooks (``assoc_model.table_logits``) would otherwise evaluate the unmutated
    weights, and a claim would hold vacuously."""
    fn = getattr(model, "weight_mutation", None)
    return fn(name, *args) if callable(fn) else None


def batch_mean_ablate_head(model: Any, layer: int, head: int) -> Any:
    """The head's output (its ``hook_z`` slice) replaced, at run time, by its mean over the batch
    being evaluated at each position (non-padding rows only). (:func:`mean_ablate_head` takes the
    mean over a fixed reference set instead.)"""
    _need(model, "attention", "mean_ablate")
    check_head(model, layer, head)
    done = _in_weights(model, "mean_ablate", layer, head)
    if done is not None:
        return done
    new = copy.deepcopy(model)
    state = _with_pad_tracker(new)

    def replace(z, hook):
        z = z.clone()
        z[:, :, head] = _batch_mean(z[:, :, head], state["pad"])
        return z

    replace.circuits_key = f"mean_ablate:L{layer}H{head}"
    replace.circuits_batch_mean = (layer, head, state)  # what it does, for _last_block_means

    new.hook_dict[f"blocks.{layer}.attn.hook_z"].fns.append(replace)
    return new


def batch_mean_ablate_mlp(model: Any, layer: int) -> Any:
    """The MLP's output replaced, at run time, by its mean over the batch being evaluated at each
    position (non-padding rows only)."""
    _need(model, "mlp", "mean_ablate_mlp")
    check_layer(model, layer, "MLP layer")
    done = _in_weights(model, "mean_ablate_mlp", layer)
    if done is not None:
        return done
    new = copy.deepcopy(model)
    state = _with_pad_tracker(new)

    def replace(x, hook):
        return _batch_mean(x, state["pad"]).clone()

    replace.circuits_key = f"mean_ablate_mlp:L{layer}"
    new.hook_dict[f"blocks.{layer}.hook_mlp_out"].fns.append(replace)
    return new


def zero_ablate_attn(model: Any, layer: int) -> Any:
    """Every head of the layer removed (W_O zeroed: ``zero_ablate_head`` of each head, in one copy;
    b_O, no head's, is kept)."""
    _need(model, "attention", "zero_ablate_attn")
    check_layer(model, layer)
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.blocks[layer].attn.W_O.zero_()
    return new


def batch_mean_ablate_attn(model: Any, layer: int) -> Any:
    """Every head of the layer replaced by its batch mean at each position."""
    _need(model, "attention", "mean_ablate_attn")
    check_layer(model, layer)
    done = _in_weights(model, "mean_ablate_attn", layer)
    if done is not None:
        return done
    for head in range(model.cfg.n_heads):
        model = batch_mean_ablate_head(model, layer, head)
    return model


def permute_positions(model: Any, lo: int | None = None, hi: int | None = None, seed: int = 0) -> Any:
    """The positional embeddings of positions lo..hi (all by default) moved to other positions of
    that range (a seeded derangement: no position keeps its own)."""
    _need(model, "pos", "permute_positions")
    n_ctx = model.pos_embed.W_pos.shape[0]
    lo = 0 if lo is None else lo
    hi = n_ctx - 1 if hi is None else hi
    if not 0 <= lo < hi < n_ctx:
        raise ControlError(f"permute_positions:{lo}-{hi}: needs 0 <= a < b < n_ctx = {n_ctx}")
    perm = torch.tensor(_derangement(hi - lo + 1, seed))
    new = copy.deepcopy(model)
    with torch.no_grad():
        w = new.pos_embed.W_pos
        w[lo: hi + 1] = w[lo: hi + 1][perm].clone()
    return new


def randomise_read_in(model: Any, seed: int = 0) -> Any:
    """The token embedding (or the vector read-in) replaced by a fresh random initialisation of the
    same module; everything downstream is kept."""
    _need(model, "embed", "randomise_read_in")
    fresh = reinitialize(model, seed=seed + 1)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, q) in zip(new.embed.named_parameters(), fresh.embed.named_parameters()):
            if not p.requires_grad and torch.equal(p, q):
                continue  # a frozen one-hot embedding has nothing to randomise
            p.copy_(q)
    if all(torch.equal(p, q) for p, q in zip(new.embed.parameters(), model.embed.parameters())):
        raise ControlError("randomise_read_in: this model's read-in is fixed (one-hot); it has nothing to randomise")
    return new


LABEL_FIELDS = ("labels", "isbal", "targets", "y")


def shuffle_labels(data: Any, seed: int = 0) -> Any:
    """A copy of a dataclass dataset whose label field is randomly permuted (the features stay)."""
    if not dataclasses.is_dataclass(data):
        raise InputError(f"shuffle_labels needs a dataclass dataset, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(data)}
    field = next((f for f in LABEL_FIELDS if f in names), None)
    if field is None:
        raise InputError(f"{type(data).__name__} has none of the label fields {LABEL_FIELDS}")
    labels = getattr(data, field)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=gen, device="cpu")  # the same order on every device
    if isinstance(labels, torch.Tensor):
        perm = perm.to(labels.device)
    return dataclasses.replace(data, **{field: labels[perm]})


def patch_activations(model: HookedTransformer, inputs: torch.Tensor, source_inputs: torch.Tensor,
                      patches: Sequence[tuple[str, tuple]]) -> torch.Tensor:
    """Resampling ablation / activation patching: run `inputs`, but at each hook name replace the
    activation at `index` (an indexing tuple after the batch axis, e.g. `(1, 0)` = position 1, head
    0 of a [batch, pos, head, d_head] hook) by its value on `source_inputs` (row i from row i).

    Returns the patched model output. Source and target may differ in length only where `index`
    picks positions that exist in both: the patched slice must have the same shape on both sides
    (a length-1 source is never broadcast over the target's positions). Bad indices, positions,
    heads and shapes raise `InputError` naming the hook (`check_patch_index`), as in
    `resample_activations`.
    """
    if source_inputs.shape[0] != inputs.shape[0]:
        raise InputError(f"source batch {source_inputs.shape[0]} != target batch {inputs.shape[0]}")
    patches = _check_patches(patches)
    names = [n for n, _ in patches]
    model.resolve_hook_names(names)  # unknown names fail here, naming the hook
    src = capture_activations(model, source_inputs, names)  # the source run stops at the last patched hook
    hooks = [(n, _overwrite(idx, check_patch_index(n, src[n], idx, "the source"))) for n, idx in patches]
    with torch.no_grad():
        return model.run_with_hooks(inputs, fwd_hooks=hooks)


def _version(t: torch.Tensor) -> int:
    """t's in-place edit counter; -1 for an inference tensor, which has none (it cannot be edited
    outside inference_mode)."""
    try:
        return t._version
    except RuntimeError:
        return -1


class _Captured(Exception):
    """Raised by capture_activations' hook once every asked-for activation is saved."""


def capture_activations(model: HookedTransformer, x: torch.Tensor, names: Sequence[str],
                        **forward_kwargs) -> dict[str, torch.Tensor]:
    """{name: activation} of one forward of `x` at hook points `names` (after any hooks already on
    them, as run_with_cache saves them), running the forward only until the last of them fired: a
    patch's source run needs nothing after the patched layer (and no read-out). The values are those
    of the explicit sublayer that exposes them (as run_with_cache(defer=False)). forward_kwargs go to
    the forward (e.g. start_at_layer and resid)."""
    wanted = list(dict.fromkeys(model.resolve_hook_names(list(names))))
    store: dict[str, torch.Tensor] = {}

    def save(act: torch.Tensor, hook) -> None:
        store[hook.name] = act
        if len(store) == len(wanted):
            raise _Captured  # nothing after this point is needed (a permanent hook's side effects there are skipped)

    try:
        with torch.no_grad(), model.hooks([(n, save) for n in wanted]):
            model(x, **forward_kwargs)
    except _Captured:
        pass
    missing = [n for n in wanted if n not in store]
    if missing:
        raise InputError(f"the forward never reached hook point(s) {missing}: nothing to patch from")
    return store


def capture_by_length(model: HookedTransformer, inputs: torch.Tensor, names: Sequence[str],
                      rows: int = 128) -> dict[str, torch.Tensor]:
    """`capture_activations` of right-padded `inputs` run in length buckets of `rows` rows, each cut to
    its longest row: {name: [batch, pos, ...]} at the full width, zeros past each bucket's width (pad
    positions, which attention masks and no read-out reads). Only for captures in which every row is
    its own: no hook that sees the batch may fire before the last of `names` (the caller checks).
    Inputs without padding, or not right-padded, run in one batch. The bracket strings (mean 18 of
    42 positions) capture ~4x faster; the values agree with one batch to float rounding."""
    from circuits.analysis.measures import length_buckets  # here: measures imports scikit-learn at load

    n, P = inputs.shape[0], inputs.shape[1]
    kpm = model.key_padding_mask(inputs) if inputs.ndim == 2 else None
    lengths = None if kpm is None else (~kpm).sum(1)  # [batch]
    if lengths is None or bool((lengths == P).all()) or not torch.equal(
            kpm, torch.arange(P, device=inputs.device)[None, :] >= lengths[:, None]):
        return capture_activations(model, inputs, names)
    out: dict[str, torch.Tensor] = {}
    for index, width in length_buckets(lengths, n, rows):
        for name, value in capture_activations(model, inputs[index, :width], names).items():
            if value.ndim < 2 or value.shape[1] != width:  # e.g. a pattern, [batch, head, q, k]
                raise InputError(f"capture_by_length needs [batch, pos, ...] activations; {name} is "
                                 f"{list(value.shape)} for a [{len(index)}, {width}] bucket")
            if name not in out:
                out[name] = value.new_zeros((n, P, *value.shape[2:]))
            out[name][index, :width] = value
    return out


class PatchBatch:
    """Many patches of ONE target batch, each computing only what it changes.

    The clean forward of `inputs` is run once (here) and its residual entering every block kept;
    `patch(source_inputs, patches)` then returns `patch_activations(model, inputs, source_inputs,
    patches)` with the source run stopped at the last patched hook (`capture_activations`) and the
    target run resumed at the first patched block from the kept clean residual (the blocks before it
    cannot see the patch). Tested equal to patch_activations (tests/test_fast_paths.py).

    When every patch of that first block is on its attention's hook_z, the target run starts after
    the block's attention instead, from the clean z (kept on the first such patch; the patched heads
    and positions are overwritten, the others' z is what the target run would recompute: the same
    kernels on the same clean residual), so the block's projections and attention are not recomputed
    (`HookedTransformer.forward(resume_z=...)`).

    The kept residual is that of the model as it was here: a weight edited in place afterwards (seen
    through the parameters' version counters) or a hook point with a function attached (a permanent
    hook may depend on the batch it sees) makes `patch` run the whole target instead."""

    def __init__(self, model: HookedTransformer, inputs: torch.Tensor):
        self.model, self.inputs = model, inputs
        n = model.cfg.n_layers
        resume = [f"blocks.{l}.hook_resid_pre" for l in range(1, n)]
        with torch.no_grad():
            self.logits, cache = model.run_with_cache(inputs, names=resume)
        self._resid = {l: cache[f"blocks.{l}.hook_resid_pre"] for l in range(1, n)}  # [batch, pos, d_model]
        self._z: dict[int, torch.Tensor] = {}  # layer -> the clean hook_z [batch, pos, head, d_head], on first use
        self._state = self._model_state()

    def _model_state(self) -> tuple:
        """What the kept residual depends on besides `inputs`: every parameter (object and in-place
        version) and whether any hook point has a function attached."""
        params = tuple((id(p), _version(p)) for p in self.model.parameters())
        hooked = any(hp.fns for hp in self.model.hook_dict.values())
        return params, hooked, _version(self.inputs)

    def patch(self, source_inputs: torch.Tensor, patches: Sequence[tuple[str, tuple]]) -> torch.Tensor:
        model, inputs = self.model, self.inputs
        if source_inputs.shape[0] != inputs.shape[0]:
            raise InputError(f"source batch {source_inputs.shape[0]} != target batch {inputs.shape[0]}")
        patches = _check_patches(patches)
        names = [n for n, _ in patches]
        src = capture_activations(model, source_inputs, names)
        hooks = [(n, _overwrite(idx, check_patch_index(n, src[n], idx, "the source"))) for n, idx in patches]
        state = self._model_state()
        layer = _patch_layer(model, names) if state == self._state and not state[1] else 0
        with torch.no_grad():
            if layer:
                resume = dict(start_at_layer=layer, resid=self._resid[layer])
                if self._z_resumable(names, layer):
                    resume["resume_z"] = self._clean_z(layer)
                return model.run_with_hooks(inputs, fwd_hooks=hooks, **resume)
            return model.run_with_hooks(inputs, fwd_hooks=hooks)

    def _z_resumable(self, names: Sequence[str], layer: int) -> bool:
        """Whether the patched run may start after block `layer`'s attention: every patch in that block
        is on its hook_z, the model is a plain HookedTransformer with no torch module hook (checked
        with the hook points by the caller: none has a function)."""
        z_name = f"blocks.{layer}.attn.hook_z"
        here = [n for n in names if n.startswith(f"blocks.{layer}.")]
        if any(n != z_name for n in here):
            return False
        block = self.model.blocks[layer]
        return (type(self.model).forward is HookedTransformer.forward and type(block) is TransformerBlock
                and type(block.attn) is Attention and _no_torch_hooks(self.model))

    def _clean_z(self, layer: int) -> torch.Tensor:
        z = self._z.get(layer)
        if z is None:  # the clean run resumed at `layer`, stopped at its hook_z
            name = f"blocks.{layer}.attn.hook_z"
            z = self._z[layer] = capture_activations(self.model, self.inputs, [name], start_at_layer=layer,
                                                     resid=self._resid[layer])[name]
        return z


def _check_patches(patches) -> list[tuple[str, tuple]]:
    """`patches` as a list of (hook name, index tuple); InputError for anything else."""
    out = []
    for p in patches:
        if not isinstance(p, (tuple, list)) or len(p) != 2 or not isinstance(p[0], str):
            raise InputError(f"a patch is (hook name, index tuple), e.g. ('blocks.0.attn.hook_z', (1, 0)); got {p!r}")
        name, index = p
        if not isinstance(index, (tuple, list)):
            raise InputError(f"patch {name!r}: the index must be a tuple (e.g. (1,) for position 1, () for "
                             f"everything), got {type(index).__name__} {index!r}")
        out.append((name, tuple(index)))
    return out


def _index_part_ok(part) -> bool:
    if part is None or part is Ellipsis:
        return True
    if isinstance(part, bool):
        return False
    if isinstance(part, int) or (hasattr(part, "__index__") and not isinstance(part, torch.Tensor)):
        return True  # numpy integers too
    if isinstance(part, slice):
        return all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                   for b in (part.start, part.stop, part.step))
    if isinstance(part, torch.Tensor):
        return part.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8) or part.dtype == torch.bool
    if isinstance(part, (list, tuple)):
        return all(isinstance(i, int) and not isinstance(i, bool) for i in part)
    return False


def check_patch_index(name: str, act: torch.Tensor, index: tuple, side: str = "the activation") -> torch.Tensor:
    """act[:, *index] (the slice a patch reads or writes), or InputError naming the hook, the index
    and the activation's shape: a non-integer index (a string, a float, a bool), more indices than
    the activation has axes, or a position / head / unit that does not exist (also negative ones
    below -size). The one validation every patching helper uses."""
    for part in index:
        if not _index_part_ok(part):
            raise InputError(f"patch index {index!r} for {name!r}: {part!r} is not an int, slice or integer "
                             f"tensor (float indices are not rounded)")
    dims = sum(1 for part in index if part is not None and part is not Ellipsis)
    if dims > act.ndim - 1:
        raise InputError(f"patch index {index!r} has {dims} indices but {name!r} has only {act.ndim - 1} axes "
                         f"after the batch ({side}: shape {tuple(act.shape)})")
    for axis, part in enumerate(index, start=1):
        if part is Ellipsis or part is None:
            break  # positions after these are not checked one by one; torch's IndexError is wrapped below
        if not isinstance(part, (slice, torch.Tensor, list, tuple)) and not -act.shape[axis] <= int(part) < act.shape[axis]:
            raise InputError(f"patch index {index!r} does not exist in {name!r}: {part} is out of range for "
                             f"axis {axis} of size {act.shape[axis]} ({side}: shape {tuple(act.shape)})")
    try:
        value = act[(slice(None), *index)]
    except (IndexError, TypeError, RuntimeError) as exc:
        raise InputError(f"patch index {index!r} does not exist in {name!r} ({side}: shape "
                         f"{tuple(act.shape)}): {exc}") from None
    if value.numel() == 0 and act.numel():
        raise InputError(f"patch index {index!r} selects nothing in {name!r} ({side}: shape {tuple(act.shape)})")
    return value


def _patch_layer(model: HookedTransformer, names: Sequence[str]) -> int:
    """The first block a set of hook names can change (0 when any lies outside the blocks)."""
    layers = []
    for n in names:
        parts = n.split(".")
        if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
            return 0
        layers.append(int(parts[1]))
    return min(layers) if layers else 0


def resample_activations(model: HookedTransformer, inputs: torch.Tensor, patches: Sequence[tuple[str, tuple]],
                         source_rows: Sequence[torch.Tensor], lengths: Optional[torch.Tensor] = None,
                         batch_size: int = 2000) -> list[torch.Tensor]:
    """Resampling ablation for several resamplings of one batch: for each index tensor `rows` in
    `source_rows`, the output of `patch_activations(model, inputs, inputs[rows], patches)`.

    Faster than calling that once per resampling: the clean run is done once (the patched
    activations of row rows[i] are the clean ones of that row, and only the patched slices are
    kept), and each patched run starts at the first patched block from the clean residual there
    (the blocks before it cannot see the patch). With `lengths` (meaningful positions per row, the
    rest right-padding), rows run in length-sorted chunks cut to their longest row, as
    `analysis.predict` does; the patched positions must exist in every row's chunk, and the read-out
    must be first/last. Tested equal to patch_activations.
    """
    patches = _check_patches(patches)
    names = [n for n, _ in patches]
    model.resolve_hook_names(names)  # unknown names fail here, naming the hook
    n = inputs.shape[0]
    rows_list = [_check_rows(r, n, inputs.device) for r in source_rows]
    if lengths is None:
        chunks = [(torch.arange(n, device=inputs.device), inputs.shape[1])]
    else:
        if model.cfg.readout == "all":
            raise InputError("resample_activations(lengths=...) needs a first/last read-out: an 'all' "
                             "read-out's width would differ between chunks")
        from circuits.analysis.measures import length_buckets  # analysis imports sklearn: only when needed

        chunks = length_buckets(lengths, n, batch_size)
    layer = _resume_layer(model, names)
    resume = f"blocks.{layer}.hook_resid_pre"
    clean: dict[str, torch.Tensor] = {}  # name -> [n, ...]: the clean activation at the patched index
    resid: list[torch.Tensor] = []  # per chunk: the clean residual where the patched runs resume
    with torch.no_grad():
        for chunk, width in chunks:
            _, cache = model.run_with_cache(inputs[chunk, :width], names=names + ([resume] if layer else []))
            for name, index in patches:
                value = check_patch_index(name, cache[name], index, f"rows cut to {width} positions")
                if name not in clean:
                    clean[name] = value.new_empty((n, *value.shape[1:]))
                clean[name][chunk] = value
            if layer:
                resid.append(cache[resume])
    outputs = []
    for rows in rows_list:
        out = None
        for i, (chunk, width) in enumerate(chunks):
            hooks = [(name, _overwrite(index, clean[name][rows[chunk]])) for name, index in patches]
            with torch.no_grad():
                x = inputs[chunk, :width]
                part = _run_patched(model, x, hooks, layer, resid[i] if layer else None)
            if lengths is None:  # one chunk, rows in their own order
                out = part
            else:
                out = part.new_empty((n, *part.shape[1:])) if out is None else out
                out[chunk] = part
        outputs.append(out)
    return outputs


def _resume_layer(model: HookedTransformer, names: Sequence[str]) -> int:
    """The block a patched run may resume at from the clean residual: the first block the patches
    can change, or an earlier one holding a permanent hook. A permanent hook may depend on the batch
    it sees or keep state from it (a mean ablation's batch mean, the padding rows it noted at
    hook_embed), so none may be skipped: a resumed run runs every block from the resume point with
    its hooks, and refires those on hook_embed / hook_pos_embed on the patched batch (the forward
    refuses a resumed run whose embedding hook changes the embedding: `_run_patched` then runs the
    whole model). A model class with its own forward resumes only without permanent hooks."""
    layer = _patch_layer(model, names)
    own_forward = type(model).forward is HookedTransformer.forward
    for name, hp in model.hook_dict.items():
        if not hp.fns or not layer:
            continue
        if not own_forward:
            return 0
        if name in ("hook_embed", "hook_pos_embed"):
            continue  # refired by the resumed forward
        parts = name.split(".")
        if parts[0] == "blocks" and parts[1].isdigit():
            layer = min(layer, int(parts[1]))
        elif not name.startswith(("ln_final.", "unembed.")):  # after the blocks: runs in a resumed run too
            return 0
    return layer


def _run_patched(model: HookedTransformer, x: torch.Tensor, hooks: list, layer: int, resid) -> torch.Tensor:
    """model(x) with `hooks`, resumed at `layer` from `resid` (the whole model when layer is 0 or
    when a permanent hook on the embedding changes it, which a given residual cannot reflect)."""
    if layer:
        try:
            return model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=layer, resid=resid)
        except EmbeddingEditedError:
            pass
    return model.run_with_hooks(x, fwd_hooks=hooks)


def resample_together(model: HookedTransformer, inputs: torch.Tensor, patches: Sequence[tuple[str, tuple]],
                      groups: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Resampling ablation where each group of resamplings must share ONE forward: for each group
    (a list of index tensors `rows`), the outputs of `patch_activations(model, inputs,
    inputs[rows], patches)`, computed as one forward of `inputs` repeated once per `rows`. A model
    whose output depends on its batch (a mean-ablation mutation: the batch mean at run time) then
    sees the same batch for every resampling of a group, so a mean that moves with the sources
    cannot pass for the patched activation mattering.

    The clean run is done once for all groups (the patched slices of row rows[i] are the clean
    ones of that row), and each group's forward resumes at the first patched block from the clean
    residual, repeated (the blocks before it cannot see the patch); a permanent hook in an earlier
    block moves the resume point back to its block, and hooks on the embedding are refired on the
    repeated batch (see `_resume_layer`). Returns [group][set] outputs,
    each [n, ...]; tested equal to patch_activations and to the full forward.
    """
    patches = _check_patches(patches)
    names = [n for n, _ in patches]
    model.resolve_hook_names(names)  # unknown names fail here, naming the hook
    n = inputs.shape[0]
    groups = [[_check_rows(r, n, inputs.device) for r in group] for group in groups]
    if any(not group for group in groups):
        raise InputError("resample_together: every group needs at least one set of source rows")
    if _last_block_kv_only(model, names, [len(group) * n for group in groups], inputs):
        last = model.cfg.n_layers - 1
        resume = f"blocks.{last}.hook_resid_pre"
        # no hook before the last block's z (the checks above): each row's capture is its own, so
        # it runs in length buckets
        cache = capture_by_length(model, inputs, names + [resume])  # stops at the last of them
        clean = {name: check_patch_index(name, cache[name], index) for name, index in patches}
        return _resample_last_block_kv(model, inputs, patches, groups, clean, cache[resume])
    layer = _resume_layer(model, names)
    resume = f"blocks.{layer}.hook_resid_pre"
    cache = capture_activations(model, inputs, names + ([resume] if layer else []))  # stops at the last of them
    clean = {}
    for name, index in patches:
        clean[name] = check_patch_index(name, cache[name], index)
    outputs = []
    for group in groups:
        source = torch.cat(group)
        hooks = [(name, _overwrite(index, clean[name][source])) for name, index in patches]
        x = inputs.repeat(len(group), *([1] * (inputs.ndim - 1)))
        with torch.no_grad():
            out = _run_patched(model, x, hooks, layer, cache[resume].repeat(len(group), 1, 1) if layer else None)
        outputs.append(list(out.split(n)))
    return outputs


def _no_torch_hooks(model: torch.nn.Module) -> bool:
    """No torch module hook anywhere (on a module or global), no compiled module, no JIT trace: the
    functional short cut below would skip them."""
    g = torch.nn.modules.module
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks or torch._C._get_tracing_state()):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   or m._compiled_call_impl is not None for m in model.modules())


def _last_block_means(model: Any) -> Optional[dict]:
    """The model's permanent hooks, when they are batch-mean ablations of heads of its LAST block
    (`batch_mean_ablate_head`, each head once) and the padding trackers those read, as {head: the
    tracker's function of the embeddings giving the padding rows, or None without one}: {} for a
    model with no hook; None when there is any other hook (a mean ablation elsewhere, a user's hook)."""
    last = model.cfg.n_layers - 1
    z_name = f"blocks.{last}.attn.hook_z"
    trackers, means = [], {}
    for name, hp in model.hook_dict.items():
        for fn in hp.fns:
            tracker = getattr(fn, "circuits_pad_state", None)
            mean = getattr(fn, "circuits_batch_mean", None)
            if name == "hook_embed" and tracker is not None:
                trackers.append(tracker)
            elif name == z_name and mean is not None and mean[0] == last and mean[1] not in means:
                means[mean[1]] = mean[2]
            else:
                return None
    out = {}
    for head, state in means.items():
        pad_of = [p for s, p in trackers if s is state]
        if len(pad_of) > 1 or (not pad_of and state["pad"] is not None):
            return None  # a state set by something else than one tracker of this model: not ours to model
        out[head] = pad_of[0] if pad_of else None
    return out


def _last_block_kv_only(model: Any, names: Sequence[str], batch_sizes: Sequence[int],
                        inputs: Optional[torch.Tensor] = None) -> bool:
    """Whether `_resample_last_block_kv` computes what the resumed forwards compute: a plain
    HookedTransformer in eval mode, a first/last read-out (the forward then takes the read-out path
    through its last block for every group's batch), patches only on the last block's hook_k / hook_v,
    and no hook of any kind but batch-mean ablations of last-block heads (`_last_block_means`); with
    those, the read-out position must be the same in every row of `inputs` (each head's batch mean at
    that position is then all the read-out needs of it)."""
    from circuits.model import transformer as T

    if type(model).forward is not T.HookedTransformer.forward or model.training:
        return False
    last = model.cfg.n_layers - 1
    block = model.blocks[last]
    allowed = {f"blocks.{last}.attn.hook_k", f"blocks.{last}.attn.hook_v"}
    norms = (T.LayerNorm, torch.nn.Identity)
    return (model.cfg.readout in ("first", "last") and set(names) <= allowed
            and min(batch_sizes) >= T.READOUT_ONLY_MIN_BATCH
            and type(block) is T.TransformerBlock and type(block.attn) is T.Attention
            and type(block.ln1) in norms and type(model.unembed) is T.Unembed
            and (not block.has_mlp or (type(block.ln2) in norms and type(block.mlp) is T.MLP))
            and (model.cfg.normalization != "LN" or type(model.ln_final) is T.LayerNorm)
            and _means_ok(model, inputs) and _no_torch_hooks(model))


def _means_ok(model: Any, inputs: Optional[torch.Tensor]) -> bool:
    """No hook but last-block batch means, and with any of those one read-out position for every row."""
    means = _last_block_means(model)
    if means is None:
        return False
    if not means:
        return True
    if inputs is None:
        return False
    kpm = model.key_padding_mask(inputs)
    return model.cfg.readout == "first" or kpm is None or not bool(kpm.any())


def _resample_last_block_kv(model: HookedTransformer, inputs: torch.Tensor, patches: list, groups: list,
                            clean: dict, resid: torch.Tensor) -> list[list[torch.Tensor]]:
    """`resample_together` for patches of the last block's keys / values on a hook-free model
    (`_last_block_kv_only`): what each group's resumed forward computes, without repeating what does
    not depend on the group. The last block's LayerNorm, key/value projection and read-out query are
    computed once on the n clean rows (they are the same rows in every repeat) and gathered per group;
    attention runs per group only for the patched heads (the others' outputs at the read-out position
    are the clean ones); the output projection, MLP, final LayerNorm and unembedding then run on each
    group's batch as in the forward (`TransformerBlock.forward_at`). The same kernels on the same
    rows: equal to the resumed forwards (tests/test_fast_paths.py)."""
    import torch.nn.functional as F

    from circuits.model.transformer import _at

    n, P = inputs.shape[0], inputs.shape[1]
    block = model.blocks[model.cfg.n_layers - 1]
    attn = block.attn
    h, d = attn.n_heads, attn.d_head
    readout = model.cfg.readout
    kpm = model.key_padding_mask(inputs)  # [n, pos] or None
    if kpm is not None and not bool(kpm.any()):
        kpm = None
    heads = _patched_heads(patches, h)
    means = _last_block_means(model)  # {head: padding rows of embeddings, or None}: batch-mean-ablated heads
    with torch.no_grad():
        # the padding rows each mean ablation's tracker notes on hook_embed (row by row: the repeated
        # batch's are these, repeated)
        pads = {head: None if pad_of is None else pad_of(model.embed(inputs)) for head, pad_of in means.items()}
        x = block.ln1(resid)  # [n, pos, d_model]
        W, b = attn.W_QKV.view(3, h * d, -1), attn.b_QKV.view(3, h * d)
        kv = F.linear(x, W[1:].reshape(2 * h * d, -1), b[1:].reshape(-1)).view(n, P, 2, h, d)
        index = _readout_position(model, kpm, readout, n, P, inputs.device)
        q = F.linear(_at(x, index), W[0], b[0]).view(n, 1, h, d)  # [n, 1, head, d_head]
        mask = model._attention_mask(kpm, P, inputs.device)
        z = None
        if len(heads) < h:  # the unpatched heads' outputs at the read-out position: the clean ones
            k, v = kv.unbind(2)
            z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               attn_mask=mask.query_rows(index)).transpose(1, 2)  # [n, 1, head, d_head]
        sel = torch.tensor(heads, device=inputs.device)
        kv_heads = {"hook_k": kv[:, :, 0].index_select(2, sel), "hook_v": kv[:, :, 1].index_select(2, sel)}
        q_heads = q.index_select(2, sel)  # [n, 1, patched head, d_head]
        resid_at = _at(resid, index)  # [n, 1, d_model]
        outputs = []
        for group in groups:
            G = len(group)
            B = G * n
            rep = torch.arange(n, device=inputs.device).repeat(G)  # row of each repeat (inputs.repeat's order)
            source = torch.cat(group)
            kp = None if kpm is None else kpm.repeat(G, 1)
            index_b = index if isinstance(index, int) else index.repeat(G)
            acts = {}
            for key, value in kv_heads.items():
                acts[key] = value[rep]  # [B, pos, patched head, d_head]
            for name, index_p in patches:
                key = name.rsplit(".", 1)[1]
                acts[key][(slice(None), *_local_head_index(index_p, heads, h))] = clean[name][source].to(acts[key].dtype)
            z_p = F.scaled_dot_product_attention(
                q_heads[rep].transpose(1, 2), acts["hook_k"].transpose(1, 2), acts["hook_v"].transpose(1, 2),
                attn_mask=model._attention_mask(kp, P, inputs.device).query_rows(index_b)).transpose(1, 2)
            if z is None:
                z_b = z_p  # [B, 1, head, d_head]
            else:
                z_b = z[rep]
                z_b[:, :, sel] = z_p
            for head, pad in pads.items():  # the mean ablations' hook on hook_z, at the read-out position
                # (an int here, `_means_ok`): the mean over the group's batch, non-padding rows only
                pad_b = None if pad is None else pad[:, index:index + 1].repeat(G, 1)  # [B, 1]
                z_b[:, :, head] = _batch_mean(z_b[:, :, head], pad_b)
            out = F.linear(z_b.reshape(B, 1, h * d), attn.W_O.view(h * d, -1).t(), attn.b_O)  # [B, 1, d_model]
            out = resid_at[rep] + out
            if block.has_mlp:
                out = out + block.mlp(block.ln2(out))
            if model.cfg.normalization == "LN":
                out = model.ln_final(out)
            outputs.append(list(model.unembed(out)[:, 0].split(n)))
    return outputs


def _readout_position(model: HookedTransformer, kpm, readout: str, n: int, P: int, device):
    """The read-out position as HookedTransformer.forward's read-out path takes it: an int when the
    same in every row, else [n] (last non-pad position)."""
    if readout == "first" or (readout == "last" and kpm is None):
        return 0 if readout == "first" else P - 1
    return model._readout_index(kpm, readout, n, P, kpm.device)


def _int_head(index: tuple) -> bool:
    """Whether a patch index over [pos, head, d_head] names one head by an integer."""
    return (len(index) >= 2 and not isinstance(index[1], (bool, torch.Tensor)) and index[1] is not None
            and index[1] is not Ellipsis and hasattr(index[1], "__index__"))


def _patched_heads(patches: list, n_heads: int) -> list[int]:
    """The heads the patches touch (every head unless each index names one head by an integer)."""
    if not all(_int_head(index) for _, index in patches):
        return list(range(n_heads))
    return sorted({int(index[1]) % n_heads for _, index in patches})


def _local_head_index(index: tuple, heads: list[int], n_heads: int) -> tuple:
    """A patch index over [pos, head, d_head] translated to the gathered heads `heads`."""
    if len(heads) == n_heads:
        return index
    return (index[0], heads.index(int(index[1]) % n_heads), *index[2:])


def _check_rows(rows, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(rows, torch.Tensor):
        given = rows
    else:
        try:
            given = torch.as_tensor(rows)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InputError(f"source rows must be a [{n}] integer index tensor, got {type(rows).__name__}: {exc}") from None
    if given.dtype == torch.bool or given.is_floating_point() or given.is_complex():
        raise InputError(f"source rows must be integers, got dtype {given.dtype} (float rows are not rounded)")
    rows = given.to(device=device, dtype=torch.long)
    if rows.shape != (n,):
        raise InputError(f"source rows must be a [{n}] index tensor, got {tuple(rows.shape)}")
    if n and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise InputError(f"source rows must index the batch 0..{n - 1}")
    return rows


def _overwrite(index: tuple, value: torch.Tensor):
    """A hook setting act[:, *index] = value (a copy: the hooked activation may be a view). The
    target slice must have value's shape exactly: no broadcasting of a shorter source."""
    def patch(act: torch.Tensor, hook) -> torch.Tensor:
        target = check_patch_index(hook.name, act, index, "the patched run")
        if target.shape != value.shape:
            raise InputError(f"patch {index!r} on {hook.name!r}: the source slice has shape {tuple(value.shape)} "
                             f"but the target's is {tuple(target.shape)}; source and target must agree at the "
                             f"patched positions (a shorter source is not broadcast)")
        act = act.clone()
        act[(slice(None), *index)] = value.to(act.dtype)
        return act
    return patch
