"""Activation cache with exact decompositions of the residual stream.

Stacks are tensors [component, batch, pos, d_model] with a list of labels, TransformerLens style.
`head_decomposition` splits the residual into "embed", "pos_embed", "L{l}H{h}" (one per head, W_O bias
kept apart), "L{l}.mlp", and "biases" (the summed b_O of the included layers); TransformerLens's own
spellings are here too: `decompose_resid` (per sublayer: "{l}_attn_out", "{l}_mlp_out") and
`stack_head_results` (per head). Each sums to the cached residual exactly (up to float addition
order), which `tests/test_cache.py` checks for every layer in float32 and float64.

Keys: a hook name, or TransformerLens's shorthand resolved as its `utils.get_act_name` does
(`cache["pattern", 0]` is `blocks.0.attn.hook_pattern`, `cache["resid_pre", -1]` the last block's,
`cache["scale", 1, "ln2"]` `blocks.1.ln2.hook_scale`, `cache["embed"]` `hook_embed`).

Layer indices: `layer=l` is the residual entering block l (`blocks.l.hook_resid_pre`); `layer=None` or
`layer=n_layers` (or -1 in the TransformerLens-named methods) is the residual after the last block
(the final LayerNorm's input).

Import order: this module imports neither `model` nor `hooks` (the model imports it); it reads what it
needs from the model object it is given (`cfg`, `hook_dict`, `blocks[l].attn.W_O / b_O`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from circuits.errors import CircuitsError, HookNameError, InputError, did_you_mean

PosSel = Union[None, int, slice]
# TransformerLens's pos_slice: an int drops the position axis, a slice / index list keeps it
PosSlice = Union[None, int, slice, Sequence[int], torch.Tensor]


def head_results(z: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """Per-head outputs z[b,p,h,:] @ W_O[h]: [batch, pos, head, d_model] (a view of a head-major
    [head, batch, pos, d_model] tensor).

    One GEMM per head over every (batch, pos) row: z gathered head-major once (no copy when z is the
    explicit attention's, a view of a head-major tensor), then a single bmm, at every size (no
    broadcast copies of W_O as a batched matmul over (batch, head) has, no einsum planning). (Here rather than in `model`, which uses it too, so the cache needs nothing above it
    in the import order.)
    """
    B, P, h, d = z.shape
    r = torch.bmm(z.permute(2, 0, 1, 3).reshape(h, B * P, d), W_O)  # [head, batch*pos, d_model]
    return r.view(h, B, P, -1).permute(1, 2, 0, 3)  # [batch, pos, head, d_model]


def _check_position(pos, size: int, what: str = "pos") -> None:
    """InputError unless `pos` is an int position that exists among `size` (negative counts from
    the end, down to -size): an out-of-range position must not select an empty tensor."""
    if isinstance(pos, (bool, float)) or not hasattr(pos, "__index__") or isinstance(pos, torch.Tensor):
        raise InputError(f"{what} must be an int position, a slice or None, got {type(pos).__name__} {pos!r}")
    pos = pos.__index__()
    if not -size <= pos < size:
        raise InputError(f"{what}={pos} is out of range: the cached activations have {size} positions "
                         f"(valid: {-size}..{size - 1})")


def _check_slice(pos: slice, size: int, what: str = "pos") -> None:
    if any(b is not None and (isinstance(b, bool) or not isinstance(b, int)) for b in (pos.start, pos.stop, pos.step)):
        raise InputError(f"{what}={pos!r}: slice bounds must be ints or None")
    if len(range(size)[pos]) == 0:
        raise InputError(f"{what}={pos!r} selects no position of the {size} cached")


def _sel(x: torch.Tensor, pos: PosSel, dim: int) -> torch.Tensor:
    """Select positions along `dim`, keeping the axis (an int becomes a length-1 slice). A position
    that does not exist raises InputError (an empty selection would sum to a silent zero)."""
    if pos is None:
        return x
    size = x.shape[dim]
    if isinstance(pos, slice):
        _check_slice(pos, size)
    else:
        _check_position(pos, size)
        pos = int(pos)
        pos = slice(pos, pos + 1 if pos != -1 else None)
    return x[(slice(None),) * dim + (pos,)]


def _pos_slice(x: torch.Tensor, pos_slice: PosSlice, dim: int) -> torch.Tensor:
    """TransformerLens's Slice.apply along `dim`: None = all, int = that position (axis dropped),
    slice, or a list/tensor of positions (axis kept). Positions that do not exist raise InputError."""
    if pos_slice is None:
        return x
    size = x.shape[dim]
    if isinstance(pos_slice, slice):
        _check_slice(pos_slice, size, "pos_slice")
        return x[(slice(None),) * dim + (pos_slice,)]
    if not isinstance(pos_slice, (bool, float, torch.Tensor)) and hasattr(pos_slice, "__index__"):
        _check_position(pos_slice, size, "pos_slice")
        return x[(slice(None),) * dim + (int(pos_slice),)]
    if isinstance(pos_slice, torch.Tensor):
        if pos_slice.dtype == torch.bool or pos_slice.is_floating_point() or pos_slice.is_complex() or pos_slice.ndim != 1:
            raise InputError(f"pos_slice must be a 1-D list of int positions, got dtype {pos_slice.dtype}, "
                             f"shape {tuple(pos_slice.shape)} (float positions are not rounded)")
        positions = pos_slice.tolist() if pos_slice.device.type != "meta" else None
    else:
        positions = list(pos_slice) if isinstance(pos_slice, (list, tuple, range)) else None
        if positions is None or any(isinstance(p, bool) or not isinstance(p, int) for p in positions):
            raise InputError(f"pos_slice must be None, an int, a slice or a list of int positions, got {pos_slice!r} "
                             "(float positions are not rounded)")
    if positions is not None:
        bad = [p for p in positions if not -size <= p < size]
        if bad:
            raise InputError(f"pos_slice positions {bad} are out of range: the cached activations have {size} positions")
        index = torch.tensor([p % size for p in positions], dtype=torch.long, device=x.device)
    else:  # a meta tensor: nothing to check
        index = pos_slice.to(device=x.device, dtype=torch.long)
    return x.index_select(dim, index)


# TransformerLens's shorthand for hook names (its utils.get_act_name), re-implemented from its docs
_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ACT_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
              "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_ATTN_ACTS = {"q", "k", "v", "z", "rot_q", "rot_k", "result", "pattern", "attn_scores"}
_MLP_ACTS = {"pre", "post", "mid", "pre_linear"}
_LN_ACTS = {"scale", "normalized"}


def act_name(name: str, layer: Optional[int] = None, layer_type: Optional[str] = None) -> str:
    """The full hook name for TransformerLens's shorthand: ("pattern", 0) -> blocks.0.attn.hook_pattern,
    ("resid_pre", 1) -> blocks.1.hook_resid_pre, ("scale", 0, "ln1") -> blocks.0.ln1.hook_scale,
    "embed" -> hook_embed, "scale" -> ln_final.hook_scale, "k6a" -> blocks.6.attn.hook_k. A full name
    comes back unchanged."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    m = re.fullmatch(r"([a-z]+)(\d+)([a-z]?.*)", name)
    if m is not None:  # "k6a", "pattern0": name, layer, layer type in one word
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or None
    name = _ACT_ALIAS.get(name, name)
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIAS:
        layer_type = _LAYER_TYPE_ALIAS[layer_type]
    full = "" if layer is None else f"blocks.{layer}."
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in _LN_ACTS and layer is None:
        full = f"ln_final.{full}"
    return full


def decomposition_hook_names(model: Any, layer: Optional[int] = None) -> list[str]:
    """Hook names a cache needs for `head_decomposition(layer)` (plus the final LN scale when it exists)."""
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


class Deferred:
    """A cache entry computed on first read, as fn(*args), from values fixed when the cache was made
    (the model's run_with_cache stores what its forward does not need this way: see
    `HookedTransformer.run_with_cache`). It must return what the forward's hook would have seen."""

    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable[..., torch.Tensor], *args: Any):
        self.fn, self.args = fn, args


class ActivationCache(Mapping):
    """Read-only mapping hook name -> activation, with decomposition helpers that need the model.

    `model` is any hooked model with `cfg`, `hook_dict` and TransformerLens-named blocks (duck-typed,
    so this module needs nothing from `model`). A `Deferred` value in `store` is computed on first
    read and kept; iteration, `len` and `in` do not compute it."""

    def __init__(self, store: dict[str, Any], model: Any):
        self._store = store
        self.model = model

    # --- mapping ---------------------------------------------------------------------------------
    def _value(self, name: str) -> torch.Tensor:
        value = self._store[name]
        if type(value) is Deferred:
            value = self._store[name] = value.fn(*value.args)
        return value

    def __getitem__(self, key: Union[str, tuple]) -> torch.Tensor:
        try:
            value = self._store[key]  # a full hook name: the common case, one dict lookup
        except (KeyError, TypeError):  # TypeError: an unhashable key (a list)
            pass
        else:
            return value if type(value) is not Deferred else self._value(key)
        name = self._resolve(key)
        if name in self._store:
            return self._value(name)
        shown = repr(key) if name == key else f"{key!r} (= {name!r})"
        if name in self.model.hook_dict:
            raise HookNameError(
                f"{shown} is a hook point but was not cached; pass it in run_with_cache(names=...) "
                f"(cached: {len(self._store)} names)"
            )
        why = getattr(self.model, "absent_hook_hint", None)
        hint = (why(name) if why is not None else "") or did_you_mean(name, self.model.hook_dict, cutoff=0.5)
        raise HookNameError(f"unknown hook name {shown}{hint} (this model has {len(self.model.hook_dict)} "
                            f"hook points; see model.hook_dict)")

    def _resolve(self, key: Union[str, tuple]) -> str:
        """A hook name, or TransformerLens's (name, layer[, layer_type]) with negative layers counted
        from the end, as its ActivationCache does."""
        if isinstance(key, str):
            return key if key in self.model.hook_dict else act_name(key)
        if isinstance(key, tuple) and 1 <= len(key) <= 3 and isinstance(key[0], str):
            name, layer, layer_type = (*key, None, None)[:3]
            if layer is not None:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise HookNameError(f"cache key {key!r}: the layer must be an int, got {layer!r}")
                if layer < 0:
                    layer += self.model.cfg.n_layers
            return act_name(name, layer, layer_type)
        raise HookNameError(f"cache keys are hook names or TransformerLens-style (name, layer[, layer_type]) "
                            f"tuples such as ('pattern', 0); got {key!r}")

    def __contains__(self, key: object) -> bool:
        try:
            if key in self._store:  # without computing a deferred entry
                return True
            return self._resolve(key) in self._store
        except (HookNameError, TypeError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    # --- per-head outputs --------------------------------------------------------------------------
    def head_results(self, layer: int) -> torch.Tensor:
        """Per-head outputs [batch, pos, head, d_model] of block `layer`, without b_O (hook_result)."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self._store:
            return self._value(name)
        z = self[f"blocks.{layer}.attn.hook_z"]  # [batch, pos, head, d_head]
        W_O = self.model.blocks[layer].attn.W_O  # [head, d_head, d_model]
        return head_results(z, W_O.detach().to(z.dtype))

    # --- residual decomposition --------------------------------------------------------------------
    def _check_layer(self, layer: Optional[int], tl: bool = False) -> int:
        """None (or, TransformerLens style, -1) = after the last block; else 0..n_layers."""
        n = self.model.cfg.n_layers
        if layer is None or (tl and layer == -1):
            return n
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= n:
            also = ", -1" if tl else ""
            raise InputError(f"layer must be an int in [0, {n}]{also} or None (= after the last block), "
                             f"got {layer!r}")
        return layer

    def head_decomposition(self, layer: Optional[int] = None, pos: PosSel = None) -> tuple[torch.Tensor, list[str]]:
        """Components [n_components, batch, pos, d_model] and labels that sum to the residual at
        `layer`: embed, pos_embed, one per head ("L{l}H{h}"), one per MLP ("L{l}.mlp"), and "biases"
        (the summed b_O). `pos` selects positions and keeps the axis."""
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

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice: PosSlice = None, incl_embeds: bool = True,
                        return_labels: bool = False, *, pos: PosSel = None):
        """TransformerLens's decompose_resid: the residual entering block `layer` (with mlp_input,
        entering its MLP) as one component per sublayer: [n_components, batch, pos, d_model], labels
        "embed", "pos_embed", "{l}_attn_out", "{l}_mlp_out". mode "attn" / "mlp" keeps only that
        sublayer kind; incl_embeds=False drops the embeddings. With every part it sums to the residual.
        apply_ln divides by the LayerNorm scale that reads this residual (centred, as
        `apply_ln_to_stack`). Returns the stack, or (stack, labels) with return_labels.

        (The older call `decompose_resid(layer, pos=p)` returning per-head components and labels is
        `head_decomposition`; it still works here, with a DeprecationWarning.)
        """
        if pos is not None:
            warnings.warn("decompose_resid(layer, pos=...) is the per-head decomposition: call "
                          "head_decomposition(layer, pos=...) (decompose_resid now has TransformerLens's "
                          "per-sublayer semantics)", DeprecationWarning, stacklevel=2)
            return self.head_decomposition(layer, pos)
        if mode not in ("all", "attn", "mlp"):
            raise InputError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        layer = self._check_layer(layer, tl=True)
        n = self.model.cfg.n_layers
        if mlp_input and layer >= n:
            raise InputError(f"mlp_input=True needs a block's MLP: layer must be in [0, {n - 1}], got {layer}")
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
            if self.model.cfg.positional != "none":
                parts.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        has_mlp = bool(self.model.cfg.d_mlp)
        for l in range(layer + (1 if mlp_input else 0)):
            if mode != "mlp":
                parts.append(self[f"blocks.{l}.hook_attn_out"])
                labels.append(f"{l}_attn_out")
            if mode != "attn" and has_mlp and l < layer:
                parts.append(self[f"blocks.{l}.hook_mlp_out"])
                labels.append(f"{l}_mlp_out")
        if not parts:
            raise InputError(f"decompose_resid(layer={layer}, mode={mode!r}, incl_embeds={incl_embeds}) "
                             "selects no component")
        shape = torch.broadcast_shapes(*(p.shape for p in parts))  # pos_embed may be [1, pos, d_model]
        stack = torch.stack([_pos_slice(p.expand(shape), pos_slice, 1) for p in parts])
        if apply_ln:
            stack = self._apply_tl_ln(stack, layer, mlp_input, pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: Optional[int] = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice: PosSlice = None, apply_ln: bool = False):
        """TransformerLens's stack_head_results: every head's output (without b_O) in the blocks before
        `layer` (-1 / None / n_layers = all), [layer * n_heads, batch, pos, d_model] in (layer, head)
        order, labels "L{l}H{h}". incl_remainder appends "remainder" = the residual minus the heads,
        so the stack sums to the residual entering block `layer`. apply_ln as in decompose_resid.
        Computed from hook_z and W_O when hook_result was not cached."""
        layer = self._check_layer(layer, tl=True)
        if layer == 0:
            raise InputError("stack_head_results(layer=0) has no heads before it: layer must be in "
                             f"[1, {self.model.cfg.n_layers}], -1 or None")
        heads = [self.head_results(l).movedim(2, 0) for l in range(layer)]  # each [head, batch, pos, d_model]
        stack = _pos_slice(torch.cat(heads), pos_slice, 2)  # [layer*head, batch, pos, d_model]
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(self.model.cfg.n_heads)]
        if incl_remainder:
            resid = _pos_slice(self.residual(layer), pos_slice, 1)
            stack = torch.cat([stack, (resid - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self._apply_tl_ln(stack, layer, False, pos_slice)
        return (stack, labels) if return_labels else stack

    def _apply_tl_ln(self, stack: torch.Tensor, layer: int, mlp_input: bool, pos_slice: PosSlice) -> torch.Tensor:
        """Centre each component and divide by the cached scale of the LayerNorm that reads the
        residual at `layer` (ln2 with mlp_input, ln1, or ln_final after the last block)."""
        if self.model.cfg.normalization != "LN":
            raise CircuitsError("this model has no LayerNorm (normalization=None): nothing to apply")
        n = self.model.cfg.n_layers
        ln = "ln_final" if layer == n else f"blocks.{layer}.ln{2 if mlp_input else 1}"
        scale = self[f"{ln}.hook_scale"]  # [batch, pos, 1]
        if ln == "ln_final" and scale.shape[1] != self.residual(None).shape[1]:
            raise InputError("the final LayerNorm was cached at the read-out position only; use "
                             "apply_ln_to_stack(stack at that position, pos=...) instead of apply_ln=True")
        scale = _pos_slice(scale, pos_slice, 1)
        return (stack - stack.mean(-1, keepdim=True)) / scale

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

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    ln: str = "ln_final", pos: PosSel = None) -> torch.Tensor:
        """TransformerLens's ``cache.logit_attrs``: each component's share of the logit of `tokens` (minus
        `incorrect_tokens`'s), the component through ln_final's centring and scale, dotted with W_U's column.

        residual_stack [component, batch, pos, d_model] at the positions ln_final saw (a first/last
        read-out: one, [.., 1, d_model]); tokens: an output index, or a tensor [batch] / [batch, pos].
        Returns [component, batch, pos]. As TL's, the LayerNorm's w and b are not applied (TL folds them
        into W_U by default; with an unfolded LayerNorm the attributions sum to the logit difference only
        after w scales W_U)."""
        model = self.model
        W_U = model.unembed.W_U  # [d_model, d_vocab_out]

        def directions(t) -> torch.Tensor:
            t = torch.as_tensor(t, device=W_U.device)
            if t.dtype not in (torch.int64, torch.int32) or ((t < 0) | (t >= W_U.shape[1])).any():
                raise InputError(f"tokens must be output indices in [0, {W_U.shape[1]}), got {t.tolist()}")
            d = W_U[:, t.long()]  # [d_model, *t.shape]
            d = d.movedim(0, -1)  # [*t.shape, d_model]
            return d[:, None, :] if t.ndim == 1 else d  # [batch, 1, d_model] for one token per row

        direction = directions(tokens)
        if incorrect_tokens is not None:
            direction = direction - directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, ln=ln, pos=pos)  # [component, batch, pos, d_model]
        return (scaled * direction.to(scaled.dtype)).sum(-1)


def project(stack: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """Project a stack [..., d_model] onto `direction` [d_model]: returns [...]."""
    if direction.ndim != 1 or direction.shape[0] != stack.shape[-1]:
        raise InputError(f"direction must be [d_model={stack.shape[-1]}], got {tuple(direction.shape)}")
    return stack @ direction.to(stack.dtype)
