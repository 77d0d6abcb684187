"""Model configurations shared by the library's tests: one per seed's architecture, plus a causal
padded one, and `perturbed_model`, which moves every bias and LayerNorm weight off its init (zeros /
ones) so that identities exercise the bias terms too."""

from __future__ import annotations

from typing import Union

import torch

from circuits.model.transformer import HookedTransformer, TransformerConfig

CONFIGS = {
    # seed 000: the ARENA bracket classifier
    "brackets": dict(n_layers=3, d_model=56, n_ctx=42, n_heads=2, d_mlp=56, d_vocab=5, d_vocab_out=2,
                     pad_token=1, positional="sinusoidal", readout="first", normalization="LN"),
    # seed 002: one attention-only causal layer, one-hot embed / unembed, heads of width 1, no LN
    "attn_only": dict(n_layers=1, d_model=11, n_ctx=8, n_heads=3, d_head=1, d_mlp=0, d_vocab=11,
                      normalization=None, attention="causal", positional="none", embed="one_hot",
                      unembed="one_hot", readout="last"),
    # seed 003: causal GELU model reading vectors through a linear read-in, scalar output
    "read_in": dict(n_layers=2, d_model=16, n_ctx=12, n_heads=2, d_mlp=32, d_vocab=0, d_input=3,
                    d_vocab_out=1, act_fn="gelu", attention="causal", positional="learned", readout="last"),
    # seed 001: palindromes, no LN, bidirectional ReLU, padded
    "palindrome": dict(n_layers=2, d_model=32, n_ctx=12, n_heads=2, d_head=16, d_mlp=64, d_vocab=6,
                       d_vocab_out=2, pad_token=5, normalization=None, positional="learned", readout="first"),
    # causal attention *and* padding (the combined mask), tanh-GELU, LN, read-out last
    "causal_padded": dict(n_layers=2, d_model=24, n_ctx=10, n_heads=3, d_mlp=16, d_vocab=7, d_vocab_out=3,
                          pad_token=0, act_fn="gelu_new", attention="causal", readout="last"),
}
BRACKETS, ATTN_ONLY, READ_IN, PALINDROME = (CONFIGS[k] for k in ("brackets", "attn_only", "read_in", "palindrome"))


@torch.no_grad()
def perturb(model: HookedTransformer, seed: int = 1, scale: float = 0.3) -> HookedTransformer:
    """Move every trainable bias and LayerNorm weight away from its init (zeros / ones)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.requires_grad and (p.ndim == 1 or name.endswith("b_QKV")):
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * scale)
    return model


def perturbed_model(cfg: Union[str, dict], *, seed: int = 0, dtype=torch.float32,
                    init_range: float = 0.2) -> HookedTransformer:
    cfg = CONFIGS[cfg] if isinstance(cfg, str) else cfg
    model = perturb(HookedTransformer(TransformerConfig(**cfg, seed=seed, init_range=init_range)), seed=seed + 1)
    return model.to(dtype).eval()
