"""A hand-weighted transformer whose only path to the logits is known: ground truth for circuit metrics.

Two attention-only layers of two heads, no LayerNorm, uniform attention everywhere (W_Q = W_K = 0),
read-out at position 0. The residual has six named dimensions::

    0 token value t     1 constant 1     2 mean t - THRESHOLD (L0H0)     3 L0H1's output (read by nobody)
    4 mean of dim 2 (L1H0)               5 L1H1's output (read by nobody)

* ``tok`` writes (t, 1) into dims 0, 1; positions are embedded as zeros;
* ``L0H0`` averages t - THRESHOLD (dims 0, 1) into dim 2; ``L0H1`` copies dim 1 into dim 3;
* ``L1H0`` averages dim 2 into dim 4; ``L1H1`` averages dim 0 into dim 5;
* the logits read dim 4 only: ``logit_1 - logit_0 = 2 (mean t - THRESHOLD)``; the label is 1 when
  the mean token exceeds THRESHOLD. No biases: under zero ablation the empty circuit's logits are 0.

So the task's only path is ``tok -> L0H0.v -> L0H0 -> L1H0.v -> L1H0 -> logits`` (3 edges); every
other edge has exactly zero effect under any ablation, and the model is linear in every edge (uniform
attention), so a first-order attribution is exact. `tests/test_circuit_metrics.py` checks every
metric against its formula on it.
"""

from __future__ import annotations

import torch

from circuits.model.transformer import HookedTransformer, TransformerConfig

__all__ = ["TRUE_EDGES", "THRESHOLD", "build", "make_inputs", "labels"]

TRUE_EDGES = ("tok -> L0H0.v", "L0H0 -> L1H0.v", "L1H0 -> logits")
THRESHOLD = 2.0
N_POS = 6
VOCAB = 5  # tokens 0..4


@torch.no_grad()
def build(dtype: torch.dtype = torch.float32) -> HookedTransformer:
    cfg = TransformerConfig(n_layers=2, d_model=6, n_ctx=N_POS, n_heads=2, d_head=1, d_mlp=0, d_vocab=VOCAB,
                            d_vocab_out=2, normalization=None, readout="first", seed=0)
    model = HookedTransformer(cfg)
    for p in model.parameters():
        p.zero_()
    model.embed.W_E[:, 0] = torch.arange(VOCAB, dtype=torch.float32)  # dim 0: the token's value
    model.embed.W_E[:, 1] = 1.0  # dim 1: a constant
    a0, a1 = model.blocks[0].attn, model.blocks[1].attn
    # W_QKV [q|k|v, head, d_head, d_model]; W_O [head, d_head, d_model]
    a0.W_QKV[2, 0, 0, 0] = 1.0
    a0.W_QKV[2, 0, 0, 1] = -THRESHOLD
    a0.W_O[0, 0, 2] = 1.0  # L0H0: dim 0 - THRESHOLD * dim 1 -> dim 2
    a0.W_QKV[2, 1, 0, 1] = 1.0
    a0.W_O[1, 0, 3] = 1.0  # L0H1: dim 1 -> dim 3
    a1.W_QKV[2, 0, 0, 2] = 1.0
    a1.W_O[0, 0, 4] = 1.0  # L1H0: dim 2 -> dim 4
    a1.W_QKV[2, 1, 0, 0] = 1.0
    a1.W_O[1, 0, 5] = 1.0  # L1H1: dim 0 -> dim 5
    model.unembed.W_U[4, 0] = -1.0
    model.unembed.W_U[4, 1] = 1.0
    return model.to(dtype).eval()


def make_inputs(n: int, seed: int = 0) -> torch.Tensor:
    """n random token strings [n, N_POS]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, N_POS), generator=gen)


def labels(toks: torch.Tensor) -> torch.Tensor:
    """1 where the mean token exceeds THRESHOLD: [n]."""
    return (toks.double().mean(1) > THRESHOLD).long()
