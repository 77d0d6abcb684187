"""TransformerLens both ways: state dicts (our parameter names are TL's) and configs.

Into ours: `load_tl_checkpoint(path, config)` builds a model from our `TransformerConfig` or a TL
`HookedTransformerConfig` (object or dict) and loads a TL checkpoint file. TL checkpoints carry
buffers we do not keep (`blocks.*.attn.mask`, `blocks.*.attn.IGNORE`); they are dropped on load.
Every missing, unexpected or mis-shaped key is named in one `StateDictError`.

Into TL: `to_transformer_lens(model)` gives `(config dict, state dict)` that TL's `HookedTransformer`
loads with `strict=True`: `HookedTransformer(HookedTransformerConfig(**cfg)).load_state_dict(sd)`.
TL has no word for some of our config (pad-key masking, the read-out position, fixed sinusoidal
or one-hot embeddings); the weights carry the embeddings exactly, and `tl_key_mask_hooks` gives the
pad masking as TL hooks: TL's `attention_mask=` argument is ignored by bidirectional attention.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from circuits.errors import ConfigError, StateDictError
from circuits.model.transformer import MASKED_SCORE, HookedTransformer, TransformerConfig

TL_IGNORED_SUFFIXES = (".attn.mask", ".attn.IGNORE", ".attn.rotary_sin", ".attn.rotary_cos")


def check_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise StateDictError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: v for k, v in state_dict.items() if not k.endswith(TL_IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    misshaped = [
        f"{k}: expected {expected[k]}, got {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if isinstance(given[k], torch.Tensor) and tuple(given[k].shape) != expected[k]
    ]
    not_tensors = sorted(k for k, v in given.items() if not isinstance(v, torch.Tensor))
    raise_key_problems("state dict does not fit this model", missing, unexpected, misshaped, not_tensors)


def raise_key_problems(what: str, missing, unexpected, misshaped, not_tensors=()) -> None:
    """One StateDictError naming every problem found, or nothing when there is none."""
    problems = []
    if missing:
        problems.append(f"missing keys: {sorted(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {sorted(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {misshaped}")
    if not_tensors:
        problems.append(f"values that are not tensors: {sorted(not_tensors)}")
    if problems:
        raise StateDictError(f"{what}: " + "; ".join(problems))


def load_tl_state_dict(model: HookedTransformer, state_dict: dict[str, torch.Tensor]) -> HookedTransformer:
    """Load a TransformerLens-format state dict into `model` (in place) after checking every key."""
    check_state_dict(model, state_dict)
    own = model.state_dict()
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))
    return model


def flush_subnormals_(model: torch.nn.Module) -> int:
    """Set every subnormal floating-point parameter (0 < |w| < finfo.tiny: weight decay's leftovers) to
    zero, in place; returns how many there were. x86 CPUs run a matmul that meets subnormal operands
    several times slower (the ARENA checkpoint's 2,470 of them made a full pass through its last block
    4x slower), and such a weight moves a float32 sum only when every other term is that small too:
    the ARENA logits stay bitwise equal (tests/test_convert.py)."""
    n = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                sub = (p != 0) & (p.abs() < torch.finfo(p.dtype).tiny)
                k = int(sub.sum())
                if k:
                    p.masked_fill_(sub, 0.0)
                    n += k
    return n


def to_tl_state_dict(model: HookedTransformer) -> dict[str, torch.Tensor]:
    """The model's weights as a TL state dict (detached, contiguous CPU copies: W_Q etc. are views
    of the fused W_QKV, and safetensors refuses non-contiguous tensors)."""
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


def load_tl_checkpoint(path: Union[str, Path], cfg: Union[TransformerConfig, Mapping[str, Any], Any],
                       flush_subnormals: bool = False, **ours: Any) -> HookedTransformer:
    """Build a model from `cfg` and load a TL checkpoint file: safetensors, or a torch file read with
    `weights_only=True` (never unpickled). `cfg` is our `TransformerConfig`, a dict of its fields,
    or a TL `HookedTransformerConfig` (or its `to_dict()`); `ours` sets what TL has no word for
    (`pad_token=`, `readout=`, see `from_tl_config`). `flush_subnormals=True` zeroes the file's
    subnormal weights (`flush_subnormals_`): much faster on x86 CPUs when weight decay left some, but
    an edit of the weights, so it is asked for, never done behind the caller's back."""
    cfg = as_config(cfg, **ours)
    path = Path(path)
    if not path.is_file():
        raise StateDictError(f"no checkpoint file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a pickle, a truncated or foreign file: never unpickled
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StateDictError(f"could not read {path} as safetensors ({first}); a file named .safetensors "
                                 "must be one (a torch file, read with weights_only=True, needs its own "
                                 "suffix such as .pt)") from None
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a corrupt or pickled-object file: say which and why
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StateDictError(f"could not read {path} as a weights-only torch file: {first}") from None
    if not isinstance(sd, dict):
        raise StateDictError(f"{path} does not hold a state dict (got {type(sd).__name__})")
    model = load_tl_state_dict(HookedTransformer(cfg), sd)
    if flush_subnormals:
        flush_subnormals_(model)
    return model


# --- configs both ways -------------------------------------------------------------------------------
# TL config fields that describe machinery our model does not have, with the value that means "off".
# A TL config that turns one on cannot be represented here: refused by name, never silently dropped.
_TL_OFF = {
    "positional_embedding_type": "standard", "gated_mlp": False, "parallel_attn_mlp": False,
    "n_key_value_heads": None, "final_rms": False, "uses_rms_norm": False, "post_embedding_ln": False,
    "scale_attn_by_inverse_layer_idx": False, "use_local_attn": False, "attn_types": None,
    "use_qk_norm": False, "attn_scores_soft_cap": -1.0, "output_logits_soft_cap": -1.0,
    "num_experts": None, "use_normalization_before_and_after": False, "use_attention_sinks": False,
    "use_attn_scale": True, "use_logn_attn": False, "clip_qkv": None, "rotary_dim": None,
}
# our fields TL cannot express: from_tl_config takes them as keywords, tl_extras lists a model's
_OURS_ONLY = ("pad_token", "readout", "positional", "embed", "unembed")


def to_tl_config(cfg: TransformerConfig) -> dict:
    """A `HookedTransformerConfig(**d)` dict for `cfg` (JSON-able). What TL cannot express is left to
    the weights (sinusoidal / absent positions, one-hot embeddings: `to_transformer_lens` writes them
    as plain weights) or to hooks (`tl_key_mask_hooks` for pad keys); `tl_extras(cfg)` lists it."""
    if cfg.d_input:
        raise ConfigError(f"TransformerLens has no linear read-in: this model reads {cfg.d_input}-dim vectors "
                          "(d_input), so it has no TL equivalent")
    return {
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_ctx": cfg.n_ctx, "n_heads": cfg.n_heads,
        "d_head": cfg.d_head, "d_mlp": cfg.d_mlp or None, "attn_only": cfg.d_mlp == 0,
        "d_vocab": cfg.d_vocab, "d_vocab_out": cfg.d_vocab_out, "act_fn": cfg.act_fn,
        "normalization_type": cfg.normalization, "attention_dir": cfg.attention, "eps": cfg.ln_eps,
        "positional_embedding_type": "standard", "initializer_range": cfg.init_range, "seed": cfg.seed,
        "default_prepend_bos": False,  # our tokens are given, never a string TL would prepend BOS to
    }


def tl_extras(cfg: TransformerConfig) -> dict:
    """Our fields that a TL config cannot carry, where they differ from what `from_tl_config` assumes:
    `from_tl_config(to_tl_config(cfg), **tl_extras(cfg)) == cfg`."""
    base = TransformerConfig(n_layers=1, d_model=2, n_ctx=1, n_heads=1, d_vocab=2)
    return {f: getattr(cfg, f) for f in _OURS_ONLY if getattr(cfg, f) != getattr(base, f)}


def from_tl_config(tl_cfg: Union[Mapping[str, Any], Any], **ours: Any) -> TransformerConfig:
    """Our `TransformerConfig` from a TL `HookedTransformerConfig` (object or dict; fields it leaves
    out take TL's defaults). `ours` sets what TL has no word for: `pad_token` (masked keys),
    `readout` ("first" / "last" / "all"; default "all", TL's), `positional` ("sinusoidal" when
    W_pos is fixed), `embed` / `unembed` ("one_hot"). A TL feature we do not implement (rotary
    positions, RMS norm, gated MLPs, ...) is a ConfigError naming each."""
    d = tl_cfg.to_dict() if hasattr(tl_cfg, "to_dict") else dict(tl_cfg)
    unknown = sorted(set(ours) - set(_OURS_ONLY))
    if unknown:
        raise ConfigError(f"from_tl_config takes only {list(_OURS_ONLY)} as extra fields, got {unknown}")
    missing = [k for k in ("n_layers", "d_model", "n_ctx", "d_head", "act_fn") if d.get(k) is None]
    if missing:
        raise ConfigError(f"TL config lacks {missing} (HookedTransformerConfig needs them)")
    unsupported = [f"{k}={d[k]!r}" for k, off in _TL_OFF.items() if k in d and d[k] != off]
    norm = d.get("normalization_type", "LN")
    if norm == "LNPre":  # TL's folded LayerNorm: the same function once its w, b go back in
        unsupported.append("normalization_type='LNPre' (LayerNorm with w and b folded into the next weights: "
                           "load the checkpoint with fold_ln=False in TransformerLens, or export it unfolded, "
                           "so that normalization_type='LN')")
    elif norm not in ("LN", None):
        unsupported.append(f"normalization_type={norm!r} (only 'LN' or None)")
    n_heads = d.get("n_heads", -1)
    if n_heads in (-1, None):
        n_heads = d["d_model"] // d["d_head"]
    scale = d.get("attn_scale")
    if scale is not None and not math.isclose(float(scale), math.sqrt(d["d_head"]), rel_tol=1e-9):
        unsupported.append(f"attn_scale={float(scale)} (ours is sqrt(d_head) = {math.sqrt(d['d_head']):g})")
    if unsupported:
        raise ConfigError("TL config uses what our HookedTransformer does not implement: " + ", ".join(unsupported))
    attn_only = bool(d.get("attn_only", False))
    d_vocab = d.get("d_vocab", -1)
    d_vocab_out = d.get("d_vocab_out", -1)
    if d_vocab in (-1, None):
        raise ConfigError("TL config has no d_vocab (TL infers it from a tokenizer; give it explicitly)")
    fields = dict(
        n_layers=d["n_layers"], d_model=d["d_model"], n_ctx=d["n_ctx"], n_heads=n_heads, d_head=d["d_head"],
        d_mlp=0 if attn_only else (d.get("d_mlp") or 4 * d["d_model"]), d_vocab=d_vocab,
        d_vocab_out=d_vocab if d_vocab_out in (-1, None) else d_vocab_out, act_fn=d["act_fn"],
        normalization=norm, attention=d.get("attention_dir", "causal"), ln_eps=d.get("eps", 1e-5),
        init_range=float(d["initializer_range"]) if d.get("initializer_range", -1.0) not in (-1.0, None)
        else 0.8 / math.sqrt(d["d_model"]),  # TL's default
        seed=d.get("seed"),
    )
    return TransformerConfig(**{**fields, **ours})


def as_config(cfg: Union[TransformerConfig, Mapping[str, Any], Any], **ours: Any) -> TransformerConfig:
    """Our config from ours, a dict of our fields, or a TL config (object or dict): a dict with TL's
    `normalization_type` or `attention_dir` keys, or any object with `to_dict()`, is read as TL's."""
    if isinstance(cfg, TransformerConfig):
        if ours:
            raise ConfigError(f"extra fields {sorted(ours)} apply to a TL config; set them on the TransformerConfig")
        return cfg
    if hasattr(cfg, "to_dict") or (isinstance(cfg, Mapping) and {"normalization_type", "attention_dir",
                                                                  "positional_embedding_type"} & set(cfg)):
        return from_tl_config(cfg, **ours)
    if isinstance(cfg, Mapping):
        return TransformerConfig.from_dict({**cfg, **ours})
    raise ConfigError(f"expected a TransformerConfig, a dict, or a TL HookedTransformerConfig, got {type(cfg).__name__}")


# --- into TransformerLens ----------------------------------------------------------------------------
def _tl_buffers(tl_cfg: dict) -> dict[str, torch.Tensor]:
    """The attention buffers TL's strict load expects, as the installed TL makes them (their shape
    changed across TL versions); without TL, those of TL 3.x, the last with HookedTransformer."""
    try:
        from transformer_lens import HookedTransformerConfig
        from transformer_lens.components import Attention
    except Exception:  # not installed (or a TL without HookedTransformer)
        return {"mask": torch.empty((0, 0), dtype=torch.bool), "IGNORE": torch.tensor(-math.inf)}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = Attention(HookedTransformerConfig(**{**tl_cfg, "n_layers": 1, "device": "cpu"}))
    return {k: v.detach().clone() for k, v in attn.named_buffers() if k in ("mask", "IGNORE")}


def to_transformer_lens(model: HookedTransformer) -> tuple[dict, dict[str, torch.Tensor]]:
    """`(tl_config_dict, state_dict)` for TL's `HookedTransformer`, strict-loadable:

        cfg, sd = to_transformer_lens(model)
        tl_model = HookedTransformer(HookedTransformerConfig(**cfg))
        tl_model.load_state_dict(sd, strict=True)

    Positions TL cannot express (fixed sinusoids, none) and one-hot embeddings become plain
    weights with the same values; TL's per-layer `mask` / `IGNORE` buffers are added. Pad keys:
    pass `fwd_hooks=tl_key_mask_hooks(tokens != pad)` to `run_with_hooks` (see README)."""
    cfg = model.cfg
    tl_cfg = to_tl_config(cfg)
    sd = to_tl_state_dict(model)
    ref = next(iter(sd.values()))
    if "pos_embed.W_pos" not in sd:  # positional="none": a zero table adds nothing, as no table does
        sd["pos_embed.W_pos"] = torch.zeros(cfg.n_ctx, cfg.d_model, dtype=ref.dtype)
    buffers = _tl_buffers(tl_cfg)
    for l in range(cfg.n_layers):
        for name, value in buffers.items():
            sd[f"blocks.{l}.attn.{name}"] = value.clone()
    return tl_cfg, sd


def tl_key_mask_hooks(keep: torch.Tensor) -> list:
    """TL `fwd_hooks` that mask attention to the keys where `keep` [batch, pos] is False (pad keys),
    as our model does with `pad_token`: every layer's `hook_attn_scores` gets MASKED_SCORE there.

        tl_model.run_with_hooks(tokens, fwd_hooks=tl_key_mask_hooks(tokens != PAD))

    TL's own `attention_mask=` argument only reaches causal attention: a bidirectional TL model
    given it attends to pad keys anyway (logits off by up to 14 on the bracket model)."""
    if not isinstance(keep, torch.Tensor) or keep.dim() != 2:
        raise ConfigError(f"keep must be a [batch, pos] tensor (True = a real token), got "
                          f"{tuple(keep.shape) if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    blocked = ~keep.bool()[:, None, None, :]  # [batch, 1, 1, key_pos]

    def hook(scores: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return scores.masked_fill(blocked.to(scores.device), MASKED_SCORE)

    return [(lambda name: name.endswith("attn.hook_attn_scores"), hook)]
