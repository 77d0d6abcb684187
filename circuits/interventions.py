"""Model and data transformations used by claims and their negative controls.

Every function returns a NEW object (the input is never modified), so a control can be applied to a
session-scoped model fixture without leaking into other tests.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional, Sequence

import torch

from .errors import InputError
from .model import HookedTransformer


def _check_head(model: HookedTransformer, layer: int, head: int) -> None:
    if not 0 <= layer < model.cfg.n_layers or not 0 <= head < model.cfg.n_heads:
        raise InputError(
            f"no head L{layer}H{head}: model has {model.cfg.n_layers} layers x {model.cfg.n_heads} heads"
        )


def reinitialize(model: HookedTransformer, seed: int = 12345) -> HookedTransformer:
    """An untrained model of the same config (fresh random init; frozen one-hot/sinusoidal kept)."""
    new = copy.deepcopy(model)
    new.init_weights(seed)
    return new


@torch.no_grad()
def zero_ablate_head(model: HookedTransformer, layer: int, head: int) -> HookedTransformer:
    """Remove one head's output (its W_O slice set to zero; b_O, shared by all heads, is kept)."""
    _check_head(model, layer, head)
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
    """Replace one head's output by its mean over `inputs` (per position) via a permanent hook on
    `hook_z`. Means are taken over non-pad rows of each position when the model pads."""
    _check_head(model, layer, head)
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
        gen = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=gen, device="cpu").tolist()
            if all(p != i for i, p in enumerate(perm)):
                break
    perm = list(perm)
    if sorted(perm) != list(range(n)):
        raise InputError(f"perm {perm} is not a permutation of range({n})")
    new = copy.deepcopy(model)
    attn = new.blocks[layer].attn
    attn.W_QKV.copy_(attn.W_QKV[:, perm])
    attn.b_QKV.copy_(attn.b_QKV[:, perm])
    attn.W_O.copy_(attn.W_O[perm])
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

    Returns the patched model output. Sources are padded/truncated to the target's length only when
    the indexed positions exist in both.
    """
    if source_inputs.shape[0] != inputs.shape[0]:
        raise InputError(f"source batch {source_inputs.shape[0]} != target batch {inputs.shape[0]}")
    names = [n for n, _ in patches]
    with torch.no_grad():
        _, src = model.run_with_cache(source_inputs, names=names)

    hooks = [(n, _overwrite(idx, src[n][(slice(None), *idx)])) for n, idx in patches]
    with torch.no_grad():
        return model.run_with_hooks(inputs, fwd_hooks=hooks)


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
        from .analysis import length_buckets  # analysis imports sklearn: only when needed

        chunks = length_buckets(lengths, n, batch_size)
    layer = _resume_layer(model, names)
    resume = f"blocks.{layer}.hook_resid_pre"
    clean: dict[str, torch.Tensor] = {}  # name -> [n, ...]: the clean activation at the patched index
    resid: list[torch.Tensor] = []  # per chunk: the clean residual where the patched runs resume
    with torch.no_grad():
        for chunk, width in chunks:
            _, cache = model.run_with_cache(inputs[chunk, :width], names=names + ([resume] if layer else []))
            for name, index in patches:
                try:
                    value = cache[name][(slice(None), *index)]
                except IndexError as exc:
                    raise InputError(f"patch index {index} does not exist in {name} of shape "
                                     f"{tuple(cache[name].shape)} (rows cut to {width} positions)") from exc
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
                part = (model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=layer, resid=resid[i]) if layer
                        else model.run_with_hooks(x, fwd_hooks=hooks))
            if lengths is None:  # one chunk, rows in their own order
                out = part
            else:
                out = part.new_empty((n, *part.shape[1:])) if out is None else out
                out[chunk] = part
        outputs.append(out)
    return outputs


def _resume_layer(model: HookedTransformer, names: Sequence[str]) -> int:
    """The block a patched run may resume at from the clean residual: the first block the patches
    can change, or 0 (a full run) when the model has permanent hooks. A permanent hook may depend
    on the batch it sees or keep state from it (a mean ablation's batch mean, the padding rows it
    noted at hook_embed): a resumed run skips the hooks before the resume point, and with them
    whatever they would have noted about the patched batch."""
    if any(hp.fns for hp in model.hook_dict.values()):
        return 0
    return _patch_layer(model, names)


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
    residual, repeated (the blocks before it cannot see the patch); on a model with permanent hooks
    every group runs the full model instead (see `_resume_layer`). Returns [group][set] outputs,
    each [n, ...]; tested equal to patch_activations and to the full forward.
    """
    names = [n for n, _ in patches]
    model.resolve_hook_names(names)  # unknown names fail here, naming the hook
    n = inputs.shape[0]
    groups = [[_check_rows(r, n, inputs.device) for r in group] for group in groups]
    if any(not group for group in groups):
        raise InputError("resample_together: every group needs at least one set of source rows")
    layer = _resume_layer(model, names)
    resume = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names=names + ([resume] if layer else []))
    clean = {}
    for name, index in patches:
        try:
            clean[name] = cache[name][(slice(None), *index)]
        except IndexError as exc:
            raise InputError(f"patch index {index} does not exist in {name} of shape "
                             f"{tuple(cache[name].shape)}") from exc
    outputs = []
    for group in groups:
        source = torch.cat(group)
        hooks = [(name, _overwrite(index, clean[name][source])) for name, index in patches]
        x = inputs.repeat(len(group), *([1] * (inputs.ndim - 1)))
        with torch.no_grad():
            if layer:
                resid = cache[resume].repeat(len(group), 1, 1)
                out = model.run_with_hooks(x, fwd_hooks=hooks, start_at_layer=layer, resid=resid)
            else:
                out = model.run_with_hooks(x, fwd_hooks=hooks)
        outputs.append(list(out.split(n)))
    return outputs


def _check_rows(rows, n: int, device: torch.device) -> torch.Tensor:
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    if rows.shape != (n,):
        raise InputError(f"source rows must be a [{n}] index tensor, got {tuple(rows.shape)}")
    if n and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise InputError(f"source rows must index the batch 0..{n - 1}")
    return rows


def _overwrite(index: tuple, value: torch.Tensor):
    """A hook setting act[:, *index] = value (a copy: the hooked activation may be a view)."""
    def patch(act: torch.Tensor, hook) -> torch.Tensor:
        act = act.clone()
        act[(slice(None), *index)] = value.to(act.dtype)
        return act
    return patch
