"""Activation cache with exact decompositions of the residual stream.

Stacks are tensors [component, batch, pos, d_model] with a list of labels, TransformerLens style:
"embed", "pos_embed", "L{l}H{h}" (one per head, W_O bias kept apart), "L{l}.mlp", and "biases" (the
summed b_O of the included layers). Their sum equals the cached residual exactly (up to float addition
order), which `tests/test_cache.py` checks for every layer in float32 and float64.

Layer indices: `layer=l` is the residual entering block l (`blocks.l.hook_resid_pre`); `layer=None` or
`layer=n_layers` is the residual after the last block (the final LayerNorm's input).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Iterator, Optional, Union

import torch

from .errors import CircuitsError, HookNameError, InputError
from .model import head_results

if TYPE_CHECKING:
    from .model import HookedTransformer

PosSel = Union[None, int, slice]


def _sel(x: torch.Tensor, pos: PosSel, dim: int) -> torch.Tensor:
    """Select positions along `dim`, keeping the axis (an int becomes a length-1 slice)."""
    if pos is None:
        return x
    if isinstance(pos, int):
        pos = slice(pos, pos + 1 if pos != -1 else None)
    return x[(slice(None),) * dim + (pos,)]


def decomposition_hook_names(model: "HookedTransformer", layer: Optional[int] = None) -> list[str]:
    """Hook names a cache needs for `decompose_resid(layer)` (plus the final LN scale when it exists)."""
    n = model.cfg.n_layers if layer is None else layer
    names = ["hook_embed"] + (["hook_pos_embed"] if model.cfg.positional != "none" else [])
    for l in range(n):
        names.append(f"blocks.{l}.attn.hook_z")
        if model.cfg.d_mlp:
            names.append(f"blocks.{l}.hook_mlp_out")
    names += [f"blocks.{l}.hook_resid_pre" for l in range(model.cfg.n_layers)]
    names.append(f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")
    if model.cfg.normalization == "LN":
        names.append("ln_final.hook_scale")
    return names


class ActivationCache(Mapping):
    """Read-only mapping hook name -> activation, with decomposition helpers that need the model."""

    def __init__(self, store: dict[str, torch.Tensor], model: "HookedTransformer"):
        self._store = store
        self.model = model

    # --- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._store[name]
        except KeyError:
            if name in self.model.hook_dict:
                raise HookNameError(
                    f"{name!r} is a hook point but was not cached; pass it in run_with_cache(names=...) "
                    f"(cached: {len(self._store)} names)"
                ) from None
            self.model.resolve_hook_names([name])  # raises with closest-name suggestions
            raise

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    # --- per-head outputs --------------------------------------------------------------------------
    def head_results(self, layer: int) -> torch.Tensor:
        """Per-head outputs [batch, pos, head, d_model] of block `layer`, without b_O (hook_result)."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self._store:
            return self._store[name]
        W_O = self.model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        z = self[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        return head_results(z, W_O.detach().to(z.dtype))

    # --- residual decomposition --------------------------------------------------------------------
    def _check_layer(self, layer: Optional[int]) -> int:
        n = self.model.cfg.n_layers
        layer = n if layer is None else layer
        if not isinstance(layer, int) or not 0 <= layer <= n:
            raise InputError(f"layer must be an int in [0, {n}] or None (= after the last block), got {layer!r}")
        return layer

    def decompose_resid(self, layer: Optional[int] = None, pos: PosSel = None) -> tuple[torch.Tensor, list[str]]:
        """Components [n_components, batch, pos, d_model] and labels that sum to the residual at `layer`."""
        layer = self._check_layer(layer)
        cfg = self.model.cfg
        embed = _sel(self["hook_embed"], pos, 1)  # [batch, pos, d_model]
        parts, labels = [embed], ["embed"]
        if cfg.positional != "none":
            parts.append(_sel(self["hook_pos_embed"], pos, 1).expand_as(embed))
            labels.append("pos_embed")
        bias = torch.zeros(embed.shape[-1], dtype=embed.dtype, device=embed.device)  # [d_model]
        for l in range(layer):
            heads = _sel(self.head_results(l), pos, 1)  # [batch, pos, head, d_model]
            parts.extend(heads.unbind(2))
            labels.extend(f"L{l}H{h}" for h in range(cfg.n_heads))
            if cfg.d_mlp:
                parts.append(_sel(self[f"blocks.{l}.hook_mlp_out"], pos, 1))
                labels.append(f"L{l}.mlp")
            bias = bias + self.model.blocks[l].attn.b_O.detach().to(bias.dtype)
        parts.append(bias.expand_as(embed))
        labels.append("biases")
        return torch.stack(parts), labels

    def residual(self, layer: Optional[int] = None, pos: PosSel = None) -> torch.Tensor:
        """The cached residual the decomposition at `layer` must sum to: [batch, pos, d_model]."""
        layer = self._check_layer(layer)
        n = self.model.cfg.n_layers
        name = f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"
        return _sel(self[name], pos, 1)

    def accumulated_resid(self, layer: Optional[int] = None, pos: PosSel = None) -> tuple[torch.Tensor, list[str]]:
        """Residual after 0..layer blocks: [layer + 1, batch, pos, d_model] with labels."""
        layer = self._check_layer(layer)
        stack = [self.residual(l, pos) for l in range(layer + 1)]
        labels = [f"resid_pre {l}" if l < self.model.cfg.n_layers else "final" for l in range(layer + 1)]
        return torch.stack(stack), labels

    # --- LayerNorm and directions ------------------------------------------------------------------
    def apply_ln_to_stack(self, stack: torch.Tensor, ln: str = "ln_final", pos: PosSel = None) -> torch.Tensor:
        """Apply a cached LayerNorm's centring and scale (not its w, b) to each component of `stack`.

        Because LN is linear once its scale is frozen, the components then sum to `ln.hook_normalized`.
        ln: "ln_final" or "blocks.{l}.ln1" / "blocks.{l}.ln2". The final LN sees only the read-out
        positions (first/last read-outs cache it at [batch, 1, 1]): pass the stack at those positions.
        """
        if self.model.cfg.normalization != "LN":
            raise CircuitsError("this model has no LayerNorm (normalization=None): nothing to apply")
        scale = _sel(self[f"{ln}.hook_scale"], pos, 1)  # [batch, pos, 1]
        if stack.shape[-3:-1] != scale.shape[:2]:
            raise InputError(
                f"stack positions {tuple(stack.shape[-3:-1])} do not match the cached {ln} scale "
                f"{tuple(scale.shape[:2])} [batch, pos]; select matching positions with pos="
            )
        centred = stack - stack.mean(-1, keepdim=True)  # [component, batch, pos, d_model]
        return centred / scale


def project(stack: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Project a stack [..., d_model] onto `direction` [d_model]: returns [...]."""
    if direction.ndim != 1 or direction.shape[0] != stack.shape[-1]:
        raise InputError(f"direction must be [d_model={stack.shape[-1]}], got {tuple(direction.shape)}")
    return stack @ direction.to(stack.dtype)
