"""Hugging Face GPT-2 interop: a `transformers.GPT2Model` (plus a linear read-in / read-out) to our
weights and back, as seed 003's `format_flat_weights` does by hand.

GPT-2 stores its linear maps as `Conv1D` modules whose weight is laid out [in, out] (the transpose of
`nn.Linear`), and fuses Q, K and V into one `c_attn` whose output is concat([q, k, v]), each of
them concat over heads. The mapping, per layer l (m = d_model, h heads of width d, m = h * d):

==============================================  ==============================================
GPT-2 (`GPT2Model` state dict)                  ours (TransformerLens names and layouts)
==============================================  ==============================================
wpe.weight [n_ctx, m]                           pos_embed.W_pos [n_ctx, m]
wte.weight [vocab, m]                           embed.W_E [vocab, m] (token models only)
h.l.ln_1.weight / .bias                         blocks.l.ln1.w / .b
h.l.attn.c_attn.weight [m, 3m]                  W_Q, W_K, W_V [h, m, d]: columns (q|k|v, head, d)
h.l.attn.c_attn.bias [3m]                       b_Q, b_K, b_V [h, d]
h.l.attn.c_proj.weight [m, m] / .bias           blocks.l.attn.W_O [h, d, m] (rows (head, d)) / b_O
h.l.ln_2.weight / .bias                         blocks.l.ln2.w / .b
h.l.mlp.c_fc.weight [m, d_mlp] / .bias          blocks.l.mlp.W_in [m, d_mlp] / b_in
h.l.mlp.c_proj.weight [d_mlp, m] / .bias        blocks.l.mlp.W_out [d_mlp, m] / b_out
ln_f.weight / .bias                             ln_final.w / .b
read-in nn.Linear weight [m, d_input] / bias    embed.W_in [d_input, m] (transposed) / b_in
read-out nn.Linear weight [out, m] / bias       unembed.W_U [m, out] (transposed) / b_U
==============================================  ==============================================

A read-in model does not use `wte` (inputs arrive as `inputs_embeds`); `to_gpt2` fills it with zeros
of the requested vocabulary size. GPT-2's attention has biases, LayerNorm eps 1e-5, the tanh GELU
("gelu_new"), pre-LN blocks and a final LN: `check_gpt2_compatible` refuses a config that differs.

The seed's model class (Garg et al.'s `TransformerModel`) keeps the three parts as `_read_in`,
`_backbone` and `_read_out`; `from_seed_state_dict` / `to_seed_state_dict` read and write that flat
layout, so the seed's checkpoint converts with one call. `transformers` is only needed to build a
real `GPT2Model` (`gpt2_config`, `GPT2ReadIn`); the conversions are plain tensor maps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from torch import nn

from circuits.errors import ConfigError, StateDictError
from circuits.model.convert import raise_key_problems
from circuits.model.transformer import HookedTransformer, TransformerConfig

__all__ = [
    "check_gpt2_compatible", "from_gpt2", "to_gpt2", "from_seed_state_dict", "to_seed_state_dict",
    "gpt2_config", "GPT2ReadIn", "from_gpt2_module", "to_gpt2_module",
]

# Buffers some transformers versions keep in a GPT2Model state dict (the causal mask); not weights.
GPT2_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
_ACT = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu"}  # our act_fn -> GPT2Config's


def check_gpt2_compatible(cfg: TransformerConfig) -> None:
    """Raise ConfigError naming every way `cfg` differs from what a GPT-2 block computes."""
    problems = []
    if cfg.normalization != "LN":
        problems.append(f"normalization={cfg.normalization!r} (GPT-2 has pre-LN blocks and a final LN)")
    if cfg.attention != "causal":
        problems.append(f"attention={cfg.attention!r} (GPT-2 attention is causal)")
    if cfg.positional != "learned":
        problems.append(f"positional={cfg.positional!r} (GPT-2 learns its positions, wpe)")
    if cfg.d_mlp <= 0:
        problems.append("d_mlp=0 (every GPT-2 block has an MLP)")
    if cfg.n_heads * cfg.d_head != cfg.d_model:
        problems.append(f"n_heads * d_head = {cfg.n_heads * cfg.d_head} != d_model = {cfg.d_model}")
    if cfg.embed != "learned" or cfg.unembed != "learned":
        problems.append("one-hot embed / unembed (GPT-2 weights are learned)")
    if cfg.pad_token is not None:
        problems.append(f"pad_token={cfg.pad_token} (GPT2Model has no pad-key masking built in)")
    if problems:
        raise ConfigError("this config is not a GPT-2: " + "; ".join(problems))


def _take(sd: Mapping[str, torch.Tensor], key: str, shape: tuple, missing: list, misshaped: list):
    if key not in sd:
        missing.append(key)
        return None
    t = sd[key]
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        misshaped.append(f"{key}: expected {shape}, got {got}")
        return None
    return t.detach()


def from_gpt2(backbone: Mapping[str, torch.Tensor], cfg: TransformerConfig,
              read_in: Optional[Mapping[str, torch.Tensor]] = None,
              read_out: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """Our (TL-format) state dict from a GPT2Model state dict and the read-in / read-out Linears'.

    read_in: {"weight": [d_model, d_input], "bias": [d_model]} (required when cfg.d_input > 0; for
    a token model the embedding is `wte`). read_out: {"weight": [d_vocab_out, d_model], "bias"}.
    Every missing, unexpected or mis-shaped key is named in one StateDictError.
    """
    check_gpt2_compatible(cfg)
    m, h, d, f, L = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers
    missing, misshaped = [], []
    used = set()

    def take(key, shape):
        used.add(key)
        return _take(backbone, key, shape, missing, misshaped)

    out: dict[str, Optional[torch.Tensor]] = {}
    out["pos_embed.W_pos"] = take("wpe.weight", (cfg.n_ctx, m))
    if cfg.d_input:
        if "wte.weight" in backbone:
            used.add("wte.weight")  # present in every GPT2Model, unused with a read-in
        if read_in is None:
            raise StateDictError("this model has a linear read-in: pass read_in={'weight', 'bias'}")
        ri_missing, ri_shaped = [], []
        w = _take(read_in, "weight", (m, cfg.d_input), ri_missing, ri_shaped)
        b = _take(read_in, "bias", (m,), ri_missing, ri_shaped)
        missing += [f"read_in.{k}" for k in ri_missing]
        misshaped += [f"read_in.{k}" for k in ri_shaped]
        out["embed.W_in"] = None if w is None else w.t()
        out["embed.b_in"] = b
    else:
        out["embed.W_E"] = take("wte.weight", (cfg.d_vocab, m))
    for l in range(L):
        p, q = f"h.{l}.", f"blocks.{l}."
        out[q + "ln1.w"] = take(p + "ln_1.weight", (m,))
        out[q + "ln1.b"] = take(p + "ln_1.bias", (m,))
        w_qkv = take(p + "attn.c_attn.weight", (m, 3 * m))
        b_qkv = take(p + "attn.c_attn.bias", (3 * m,))
        if w_qkv is not None:
            W = w_qkv.reshape(m, 3, h, d).permute(1, 2, 0, 3)  # [q|k|v, head, d_model, d_head]
            out[q + "attn.W_Q"], out[q + "attn.W_K"], out[q + "attn.W_V"] = W.unbind(0)
        if b_qkv is not None:
            out[q + "attn.b_Q"], out[q + "attn.b_K"], out[q + "attn.b_V"] = b_qkv.reshape(3, h, d).unbind(0)
        w_o = take(p + "attn.c_proj.weight", (m, m))
        out[q + "attn.W_O"] = None if w_o is None else w_o.reshape(h, d, m)
        out[q + "attn.b_O"] = take(p + "attn.c_proj.bias", (m,))
        out[q + "ln2.w"] = take(p + "ln_2.weight", (m,))
        out[q + "ln2.b"] = take(p + "ln_2.bias", (m,))
        out[q + "mlp.W_in"] = take(p + "mlp.c_fc.weight", (m, f))
        out[q + "mlp.b_in"] = take(p + "mlp.c_fc.bias", (f,))
        out[q + "mlp.W_out"] = take(p + "mlp.c_proj.weight", (f, m))
        out[q + "mlp.b_out"] = take(p + "mlp.c_proj.bias", (m,))
    out["ln_final.w"] = take("ln_f.weight", (m,))
    out["ln_final.b"] = take("ln_f.bias", (m,))
    if read_out is None:
        raise StateDictError("pass read_out={'weight', 'bias'}: GPT2Model has no output layer")
    ro_missing, ro_shaped = [], []
    w = _take(read_out, "weight", (cfg.d_vocab_out, m), ro_missing, ro_shaped)
    b = _take(read_out, "bias", (cfg.d_vocab_out,), ro_missing, ro_shaped)
    missing += [f"read_out.{k}" for k in ro_missing]
    misshaped += [f"read_out.{k}" for k in ro_shaped]
    out["unembed.W_U"] = None if w is None else w.t()
    out["unembed.b_U"] = b
    unexpected = [k for k in backbone if k not in used and not k.endswith(GPT2_IGNORED_SUFFIXES)]
    raise_key_problems("GPT-2 state dict does not fit this config", missing, unexpected, misshaped)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def to_gpt2(state: Mapping[str, torch.Tensor], cfg: TransformerConfig, vocab_size: Optional[int] = None
            ) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(GPT2Model state dict, read-in Linear state dict or None, read-out Linear state dict) from our
    state dict (e.g. `model.state_dict()`). For a read-in model `wte` is zeros of `vocab_size` rows
    (default 1): it is never read. The inverse of `from_gpt2`."""
    check_gpt2_compatible(cfg)
    from circuits.model.convert import check_state_dict

    check_state_dict(HookedTransformer(cfg), dict(state))
    m, h, d, L = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers
    s = {k: v.detach() for k, v in state.items()}
    W_pos = s["pos_embed.W_pos"]
    sd = {"wpe.weight": W_pos}
    if cfg.d_input:
        sd["wte.weight"] = torch.zeros(vocab_size or 1, m, dtype=W_pos.dtype)
        read_in = {"weight": s["embed.W_in"].t(), "bias": s["embed.b_in"]}
    else:
        if vocab_size not in (None, cfg.d_vocab):
            raise ConfigError(f"vocab_size={vocab_size} differs from this token model's d_vocab={cfg.d_vocab}")
        sd["wte.weight"] = s["embed.W_E"]
        read_in = None
    for l in range(L):
        p, q = f"h.{l}.", f"blocks.{l}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = s[q + "ln1.w"], s[q + "ln1.b"]
        W = torch.stack([s[q + "attn.W_Q"], s[q + "attn.W_K"], s[q + "attn.W_V"]])  # [3, head, d_model, d_head]
        sd[p + "attn.c_attn.weight"] = W.permute(2, 0, 1, 3).reshape(m, 3 * m)
        sd[p + "attn.c_attn.bias"] = torch.stack([s[q + "attn.b_Q"], s[q + "attn.b_K"], s[q + "attn.b_V"]]).reshape(3 * m)
        sd[p + "attn.c_proj.weight"] = s[q + "attn.W_O"].reshape(h * d, m)
        sd[p + "attn.c_proj.bias"] = s[q + "attn.b_O"]
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = s[q + "ln2.w"], s[q + "ln2.b"]
        sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = s[q + "mlp.W_in"], s[q + "mlp.b_in"]
        sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = s[q + "mlp.W_out"], s[q + "mlp.b_out"]
    sd["ln_f.weight"], sd["ln_f.bias"] = s["ln_final.w"], s["ln_final.b"]
    read_out = {"weight": s["unembed.W_U"].t(), "bias": s["unembed.b_U"]}

    def c(x):
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in x.items()}

    return c(sd), (c(read_in) if read_in is not None else None), c(read_out)


_PREFIXES = ("_backbone.", "_read_in.", "_read_out.")


def from_seed_state_dict(sd: Mapping[str, torch.Tensor], cfg: TransformerConfig) -> dict[str, torch.Tensor]:
    """Our state dict from the seed's flat `TransformerModel` state dict (`_read_in.*`,
    `_backbone.*` = a GPT2Model, `_read_out.*`)."""
    parts: dict[str, dict] = {p: {} for p in _PREFIXES}
    stray = []
    for k, v in sd.items():
        prefix = next((p for p in _PREFIXES if k.startswith(p)), None)
        if prefix is None:
            stray.append(k)
        else:
            parts[prefix][k[len(prefix):]] = v
    if stray:
        raise StateDictError(f"keys outside _read_in / _backbone / _read_out: {sorted(stray)}")
    return from_gpt2(parts["_backbone."], cfg, read_in=parts["_read_in."] or None, read_out=parts["_read_out."])


def to_seed_state_dict(state: Mapping[str, torch.Tensor], cfg: TransformerConfig,
                       vocab_size: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The seed's flat `TransformerModel` layout from our state dict (inverse of from_seed_state_dict)."""
    backbone, read_in, read_out = to_gpt2(state, cfg, vocab_size)
    out = {f"_backbone.{k}": v for k, v in backbone.items()}
    out.update({f"_read_in.{k}": v for k, v in (read_in or {}).items()})
    out.update({f"_read_out.{k}": v for k, v in read_out.items()})
    return out


# --- real transformers modules (need the optional `hf` extra) -------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("this needs the optional dependency `transformers`: pip install 'pytest-circuits[hf]'") from e
    return transformers


def gpt2_config(cfg: TransformerConfig, vocab_size: Optional[int] = None, **overrides):
    """A `transformers.GPT2Config` computing what `cfg` computes (no dropout, no KV cache).

    vocab_size: rows of `wte` (default: cfg.d_vocab for token models, 1 for read-in models).
    """
    check_gpt2_compatible(cfg)
    transformers = _transformers()
    kwargs = dict(
        vocab_size=vocab_size or (cfg.d_vocab if cfg.d_vocab else 1), n_positions=cfg.n_ctx,
        n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_mlp,
        activation_function=_ACT[cfg.act_fn], layer_norm_epsilon=cfg.ln_eps,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
        scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
        bos_token_id=None, eos_token_id=None,  # GPT-2's 50256 is outside a small vocabulary
    )
    kwargs.update(overrides)
    return transformers.GPT2Config(**kwargs)


class GPT2ReadIn(nn.Module):
    """The seed's model class with a real `transformers.GPT2Model`: read-in Linear -> GPT-2 backbone
    (inputs_embeds) -> read-out Linear, returning the read-out at the last position [batch, out]
    (or at every position, [batch, pos, out], with all_positions=True).

    Attribute names are the seed's (`_read_in`, `_backbone`, `_read_out`), so its state dict is the
    seed's checkpoint layout.
    """

    def __init__(self, config, d_input: int, d_out: int = 1):
        super().__init__()
        transformers = _transformers()
        self._read_in = nn.Linear(d_input, config.n_embd)
        self._backbone = transformers.GPT2Model(config)
        self._read_out = nn.Linear(config.n_embd, d_out)

    def forward(self, x: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        hidden = self._backbone(inputs_embeds=self._read_in(x)).last_hidden_state  # [batch, pos, d_model]
        if all_positions:
            return self._read_out(hidden)  # [batch, pos, d_out]
        return self._read_out(hidden[:, -1])  # [batch, d_out]


def from_gpt2_module(module: "GPT2ReadIn", cfg: TransformerConfig) -> HookedTransformer:
    """Our hooked model with the weights of a `GPT2ReadIn` (read-in config)."""
    from circuits.model.convert import load_tl_state_dict

    state = from_seed_state_dict(module.state_dict(), cfg)
    dtype = next(module.parameters()).dtype
    return load_tl_state_dict(HookedTransformer(cfg).to(dtype), state).eval()


def to_gpt2_module(model: HookedTransformer, vocab_size: Optional[int] = None) -> "GPT2ReadIn":
    """A `GPT2ReadIn` (real transformers GPT2Model inside) with our read-in model's weights."""
    cfg = model.cfg
    if not cfg.d_input:
        raise ConfigError("to_gpt2_module builds the seed's read-in model; this model reads tokens")
    dtype = next(model.parameters()).dtype
    module = GPT2ReadIn(gpt2_config(cfg, vocab_size), cfg.d_input, cfg.d_vocab_out).to(dtype)
    sd = to_seed_state_dict(model.state_dict(), cfg, vocab_size)
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(GPT2_IGNORED_SUFFIXES)]
    if missing or unexpected:
        raise StateDictError(f"GPT2ReadIn did not take the converted weights: missing {missing}, unexpected {unexpected}")
    return module.eval()
