"""A plain PyTorch transformer of the bracket architecture with no hook points at all: the speed
baseline for `bench_forward.py`. Idiomatic nanoGPT-style code (fused QKV nn.Linear, SDPA,
nn.LayerNorm); `from_hooked` copies a HookedTransformer's weights so both compute the same function
(checked in tests/test_model.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PlainBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_mlp)
        self.fc2 = nn.Linear(d_mlp, d_model)

    def forward(self, x, attn_mask):
        B, P, M = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, P, 3, self.n_heads, -1).unbind(2)
        z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=attn_mask)
        x = x + self.proj(z.transpose(1, 2).reshape(B, P, M))
        return x + self.fc2(F.relu(self.fc1(self.ln2(x))))


class PlainTransformer(nn.Module):
    def __init__(self, d_vocab=5, d_model=56, n_heads=2, d_mlp=56, n_layers=3, n_ctx=42, n_out=2, pad=1):
        super().__init__()
        self.pad = pad
        self.embed = nn.Embedding(d_vocab, d_model)
        self.register_buffer("pos", torch.zeros(n_ctx, d_model))
        self.blocks = nn.ModuleList(PlainBlock(d_model, n_heads, d_mlp) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_out)

    def forward(self, tokens):
        pad = tokens == self.pad
        mask = ~pad[:, None, None, :] if bool(pad.any()) else None
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln_f(x[:, 0]))

    @classmethod
    @torch.no_grad()
    def from_hooked(cls, model) -> "PlainTransformer":
        c = model.cfg
        plain = cls(c.d_vocab, c.d_model, c.n_heads, c.d_mlp, c.n_layers, c.n_ctx, c.d_vocab_out, c.pad_token)
        plain.embed.weight.copy_(model.embed.W_E)
        plain.pos.copy_(model.pos_embed.W_pos)
        for pb, hb in zip(plain.blocks, model.blocks):
            a = hb.attn
            W = torch.stack([a.W_Q, a.W_K, a.W_V]).permute(0, 1, 3, 2).reshape(-1, c.d_model)  # [3*h*d, m]
            pb.qkv.weight.copy_(W)
            pb.qkv.bias.copy_(torch.stack([a.b_Q, a.b_K, a.b_V]).reshape(-1))
            pb.proj.weight.copy_(a.W_O.reshape(-1, c.d_model).t())
            pb.proj.bias.copy_(a.b_O)
            for pl, hl in ((pb.ln1, hb.ln1), (pb.ln2, hb.ln2)):
                pl.weight.copy_(hl.w); pl.bias.copy_(hl.b)
            pb.fc1.weight.copy_(hb.mlp.W_in.t()); pb.fc1.bias.copy_(hb.mlp.b_in)
            pb.fc2.weight.copy_(hb.mlp.W_out.t()); pb.fc2.bias.copy_(hb.mlp.b_out)
        plain.ln_f.weight.copy_(model.ln_final.w); plain.ln_f.bias.copy_(model.ln_final.b)
        plain.head.weight.copy_(model.unembed.W_U.t()); plain.head.bias.copy_(model.unembed.b_U)
        return plain
