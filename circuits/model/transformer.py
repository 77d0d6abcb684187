"""One hooked transformer for every seed, with TransformerLens hook names, weight names and layouts.

Classes appear in data-flow order: config, embeddings, LayerNorm, attention, MLP, block, unembed, model.
Every module's parameters carry TransformerLens's names (`W_E, W_pos, W_Q[h, d_model, d_head], ...,
W_O[h, d_head, d_model], b_O, W_in, W_out, W_U, b_U`), so `model.state_dict()` *is* a TL state dict
(plus our read-in weights when a model has them).

Speed: each sublayer has a fused fast path (F.layer_norm, scaled_dot_product_attention, fused QKV
matmul) taken whenever none of its internal hook points is active; activating a hook point switches that
one sublayer to the explicit path that exposes the intermediate tensor. Both paths compute the same
function (tested to float tolerance in float32 and float64).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from circuits.model.cache import ActivationCache, Deferred, head_results
from circuits.errors import ConfigError, InputError
from circuits.model.hooks import HookedRootModule, HookPoint, NamesFilter

_module_globals = nn.modules.module  # torch's global module hooks live here


class _Sublayer(nn.Module):
    """A module called many times per forward: `__call__` goes straight to `forward` unless torch
    hooks of any kind are registered on it (or globally), torch.compile wraps it or a JIT trace is
    running, when nn.Module's own call runs as usual. nn.Module.__call__ costs two Python frames and a
    dozen dict checks per call, ~20 calls per forward: a few percent of a batch-1 forward."""

    def __call__(self, *args, **kwargs):
        if (self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks
                or self._compiled_call_impl is not None or _module_globals._global_forward_hooks
                or _module_globals._global_forward_pre_hooks or _module_globals._global_backward_hooks
                or _module_globals._global_backward_pre_hooks or torch._C._get_tracing_state()):
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)


@dataclass
class TransformerConfig:
    n_layers: int
    d_model: int
    n_ctx: int  # longest sequence the positional embedding (and input checks) allow
    n_heads: int
    d_head: int = 0  # 0 = d_model // n_heads (must divide); explicit values may differ (seed 002: 3 x 1)
    d_mlp: int = 0  # 0 = attention-only blocks (no MLP, no ln2)
    d_vocab: int = 0  # token vocabulary; 0 when the model reads vectors through a linear read-in
    d_vocab_out: int = 0  # logits per read-out position (1 = scalar regression); 0 = d_vocab
    d_input: int = 0  # width of vector inputs for the linear read-in (seed 003); 0 = token inputs
    act_fn: Literal["relu", "gelu", "gelu_new"] = "relu"  # gelu_new = GPT-2's tanh approximation
    normalization: Optional[Literal["LN"]] = "LN"  # pre-LN before each sublayer + final LN, or None
    attention: Literal["bidirectional", "causal"] = "bidirectional"
    pad_token: Optional[int] = None  # keys holding this token are masked out of every attention row
    positional: Literal["learned", "sinusoidal", "none"] = "learned"
    embed: Literal["learned", "one_hot"] = "learned"  # one_hot = frozen identity (needs d_model == d_vocab)
    unembed: Literal["learned", "one_hot"] = "learned"  # one_hot = frozen identity, no bias
    readout: Literal["first", "last", "all"] = "all"  # which positions' logits forward() returns
    ln_eps: float = 1e-5
    init_range: float = 0.02  # std of the normal init of every weight matrix (GPT-2 / TL default)
    seed: Optional[int] = None  # seeds the initialisation when given

    def __post_init__(self) -> None:
        if self.d_head == 0:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_head=0 asks for d_head = d_model / n_heads, but d_model={self.d_model} is not "
                    f"divisible by n_heads={self.n_heads}; set d_head explicitly or change n_heads"
                )
            self.d_head = self.d_model // self.n_heads
        if self.d_vocab_out == 0:
            self.d_vocab_out = self.d_vocab
        problems = []
        for f in ("n_layers", "d_model", "n_ctx", "n_heads", "d_head", "d_vocab_out"):
            if getattr(self, f) <= 0:
                problems.append(f"{f}={getattr(self, f)} must be positive")
        if (self.d_vocab > 0) == (self.d_input > 0):
            problems.append(f"exactly one of d_vocab ({self.d_vocab}) and d_input ({self.d_input}) must be > 0")
        if self.embed == "one_hot" and self.d_model != self.d_vocab:
            problems.append(f"one-hot embed needs d_model == d_vocab (got {self.d_model} != {self.d_vocab})")
        if self.unembed == "one_hot" and self.d_model != self.d_vocab_out:
            problems.append(f"one-hot unembed needs d_model == d_vocab_out (got {self.d_model} != {self.d_vocab_out})")
        if self.positional == "sinusoidal" and self.d_model % 2:
            problems.append(f"sinusoidal positions need an even d_model (got {self.d_model})")
        if self.pad_token is not None and not (0 <= self.pad_token < max(self.d_vocab, 1)):
            problems.append(f"pad_token={self.pad_token} is not a token id in [0, {self.d_vocab})")
        for f, allowed in (("act_fn", ("relu", "gelu", "gelu_new")), ("normalization", ("LN", None)),
                           ("attention", ("bidirectional", "causal")),
                           ("positional", ("learned", "sinusoidal", "none")),
                           ("embed", ("learned", "one_hot")), ("unembed", ("learned", "one_hot")),
                           ("readout", ("first", "last", "all"))):
            if getattr(self, f) not in allowed:
                problems.append(f"{f}={getattr(self, f)!r} is not one of {allowed}")
        if problems:
            raise ConfigError("inconsistent TransformerConfig: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown TransformerConfig fields {unknown}")
        return cls(**d)


def sinusoidal_positions(n_ctx: int, d_model: int) -> torch.Tensor:
    """Fixed encoding of 'Attention is all you need' (sin on even, cos on odd dims), as ARENA's."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]  # [n_ctx, 1]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # [d_model/2]
    W = torch.zeros(n_ctx, d_model, dtype=torch.float64)  # [n_ctx, d_model]
    W[:, 0::2] = torch.sin(pos * freq)
    W[:, 1::2] = torch.cos(pos * freq)
    return W.float()


class Embed(_Sublayer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.embed == "one_hot":
            self.W_E = nn.Parameter(torch.eye(cfg.d_vocab), requires_grad=False)  # [d_vocab, d_model]
        else:
            self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))  # [d_vocab, d_model]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dtype != torch.int64 and tokens.dtype != torch.int32:  # F.embedding takes only these
            tokens = tokens.long()
        try:
            return F.embedding(tokens, self.W_E)  # [batch, pos, d_model]
        except IndexError:  # cheaper than validating every batch up front; only bad input gets here
            bad = tokens[(tokens < 0) | (tokens >= self.W_E.shape[0])]
            raise InputError(
                f"token id {int(bad[0])} is out of the vocabulary [0, {self.W_E.shape[0]}) "
                f"({bad.numel()} bad tokens in this batch)"
            ) from None


class ReadIn(_Sublayer):
    """Linear read-in of vector inputs (seed 003): the vector-input analogue of Embed."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_input, cfg.d_model))  # [d_input, d_model]
        self.b_in = nn.Parameter(torch.zeros(cfg.d_model))  # [d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W_in.t(), self.b_in)  # [batch, pos, d_model]


class PosEmbed(_Sublayer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.positional == "sinusoidal":  # fixed, but kept in the state dict as TL/ARENA do
            self.W_pos = nn.Parameter(sinusoidal_positions(cfg.n_ctx, cfg.d_model), requires_grad=False)
        else:
            self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))  # [n_ctx, d_model]

    def forward(self, n_pos: int) -> torch.Tensor:
        return self.W_pos[:n_pos]  # [pos, d_model]


class LayerNorm(_Sublayer):
    """TL's LayerNorm: hook_scale [batch, pos, 1] and hook_normalized (before w, b) exposed."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.ln_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))  # [d_model]
        self.b = nn.Parameter(torch.zeros(cfg.d_model))  # [d_model]
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.hook_scale.fns or self.hook_normalized.fns):
            return F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        scale, normalized = layer_norm_parts(x, self.eps, self._identity_affine())
        hooked_scale = self.hook_scale(scale)
        if hooked_scale is not scale:  # a hook edited the scale: normalise with the edited one
            normalized = (x - x.mean(-1, keepdim=True)) / hooked_scale
        normalized = self.hook_normalized(normalized)
        return torch.addcmul(self.b, normalized, self.w)  # [batch, pos, d_model]

    def _identity_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ones, zeros) like w, made once per dtype/device and kept out of the state dict."""
        unit = self.__dict__.get("_unit")
        w = self.w
        if unit is None or unit[0].dtype != w.dtype or unit[0].device != w.device:
            # ordinary tensors even when first made under inference_mode: native_layer_norm saves its
            # weight for backward, which an inference tensor cannot be in a later training step
            with torch.inference_mode(False):
                unit = (torch.ones(w.shape, dtype=w.dtype, device=w.device),
                        torch.zeros(w.shape, dtype=w.dtype, device=w.device))
            self.__dict__["_unit"] = unit
        return unit


def layer_norm_parts(x: torch.Tensor, eps: float, unit: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hook_scale [..., 1], hook_normalized [..., d_model]) of a LayerNorm's input x; `unit` is its
    (ones, zeros). A function of its arguments only, so a cache can compute it later from the cached
    input (see HookedTransformer.run_with_cache).

    One kernel for both: native_layer_norm returns (normalized, mean, 1/scale); aten::var is ~10x
    slower on CPU for these shapes. Given weight 1 and bias 0 rather than None: its no-weight branch
    is a scalar loop on CPU, 1.8x slower at [1000, 42, 56] (x * 1 + 0 is exact)."""
    normalized, _, rstd = torch.native_layer_norm(x, unit[0].shape, unit[0], unit[1], eps)
    return rstd.reciprocal(), normalized


class Attention(_Sublayer):
    """Multi-head attention with heads as a tensor axis.

    Q, K and V weights live in one fused parameter `W_QKV` [3, head, d_head, d_model] (nn.Linear
    layout) so the projection is a single GEMM with no per-call copy; `W_Q`, `W_K`, `W_V`
    ([head, d_model, d_head]) and `b_Q`, `b_K`, `b_V` ([head, d_head]) are views of it with TL's names
    and layouts (in-place edits write through), and the state dict uses TL's keys.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        h, m, d = cfg.n_heads, cfg.d_model, cfg.d_head
        self.n_heads, self.d_head = h, d
        self.causal = cfg.attention == "causal"
        self.W_QKV = nn.Parameter(torch.empty(3, h, d, m))  # [q|k|v, head, d_head, d_model]
        self.b_QKV = nn.Parameter(torch.zeros(3, h, d))  # [q|k|v, head, d_head]
        self.W_O = nn.Parameter(torch.empty(h, d, m))  # [head, d_head, d_model]
        self.b_O = nn.Parameter(torch.zeros(m))  # [d_model]
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, head, d_head]
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], masked entries -1e5
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # [batch, pos, head, d_model], per-head output without b_O

    # TL-named views of the fused parameters
    W_Q = property(lambda self: self.W_QKV[0].transpose(1, 2))  # [head, d_model, d_head]
    W_K = property(lambda self: self.W_QKV[1].transpose(1, 2))  # [head, d_model, d_head]
    W_V = property(lambda self: self.W_QKV[2].transpose(1, 2))  # [head, d_model, d_head]
    b_Q = property(lambda self: self.b_QKV[0])  # [head, d_head]
    b_K = property(lambda self: self.b_QKV[1])  # [head, d_head]
    b_V = property(lambda self: self.b_QKV[2])  # [head, d_head]
    _TL_KEYS = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name in self._TL_KEYS:
            t = getattr(self, name)
            destination[prefix + name] = t if keep_vars else t.detach()
        destination[prefix + "W_O"] = self.W_O if keep_vars else self.W_O.detach()
        destination[prefix + "b_O"] = self.b_O if keep_vars else self.b_O.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        fused = {}
        for name in self._TL_KEYS:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            target = getattr(self, name)
            if state_dict[key].shape != target.shape:
                error_msgs.append(f"size mismatch for {key}: expected {tuple(target.shape)}, "
                                  f"got {tuple(state_dict[key].shape)}")
                continue
            fused[name] = state_dict[key]
        with torch.no_grad():
            for name, value in fused.items():
                getattr(self, name).copy_(value)
        # W_O and b_O are ordinary parameters: let nn.Module load them (and flag leftovers)
        super()._load_from_state_dict(
            {k: v for k, v in state_dict.items() if k[len(prefix):] not in self._TL_KEYS},
            prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        for k in list(missing_keys):
            if k in (prefix + "W_QKV", prefix + "b_QKV"):
                missing_keys.remove(k)

    def forward(self, x: torch.Tensor, mask: "AttentionMask") -> torch.Tensor:
        """x: [batch, pos, d_model] -> attention output [batch, pos, d_model] (sum of heads + b_O)."""
        return self.project(self.z_of(x, mask))

    def z_of(self, x: torch.Tensor, mask: "AttentionMask") -> torch.Tensor:
        """x: [batch, pos, d_model] -> z [batch, pos, head, d_head] after hook_z (the hooks from hook_q
        to hook_z run here): forward up to the output projection."""
        B, P, _ = x.shape
        h, d = self.n_heads, self.d_head
        qkv = F.linear(x, self.W_QKV.view(3 * h * d, -1), self.b_QKV.view(-1))  # [batch, pos, 3*head*d_head]
        q, k, v = qkv_views = qkv.view(B, P, 3, h, d).unbind(2)  # each [batch, pos, head, d_head]
        if self.hook_q.fns or self.hook_k.fns or self.hook_v.fns:
            q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)  # [batch, pos, head, d_head]
        if self.hook_attn_scores.fns or self.hook_pattern.fns:  # only these need the explicit path
            # q, k, v still qkv's views (no hook replaced them; an in-place edit is in qkv): a
            # head-major gather copies all three in one go
            fused = qkv if (q is qkv_views[0] and k is qkv_views[1] and v is qkv_views[2]) else None
            z = self._scores_pattern_z(q, k, v, mask, fused)  # [batch, pos, head, d_head]
        else:
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [batch, head, pos, d_head]
                attn_mask=mask.sdpa_mask(), is_causal=self.causal and mask.causal_only,
            ).transpose(1, 2)  # [batch, pos, head, d_head]
        if self.hook_z.fns:
            z = self.hook_z(z)  # [batch, pos, head, d_head]
        return z

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """z [batch, pos, head, d_head] -> the attention output [batch, pos, d_model] (hook_result runs
        here): forward from hook_z on."""
        if self.hook_result.fns:
            result = self.hook_result(head_results(z, self.W_O))  # [batch, pos, head, d_model]
            return _sum_heads(result).add_(self.b_O)  # [batch, pos, d_model] (the sum is a fresh tensor)
        B, P, h, d = z.shape
        return F.linear(z.reshape(B, P, h * d), self.W_O.view(h * d, -1).t(), self.b_O)  # [batch, pos, d_model]

    def forward_at(self, x: torch.Tensor, mask: "AttentionMask", index: Union[int, torch.Tensor]) -> torch.Tensor:
        """forward's output at one query position per row (index: [batch], or an int for the same
        position in every row) -> [batch, 1, d_model], projecting that position's query only (keys
        and values need every position). Of the hooks, only hook_k and hook_v run (on every position)."""
        B, P, _ = x.shape
        h, d = self.n_heads, self.d_head
        W, b = self.W_QKV.view(3, h * d, -1), self.b_QKV.view(3, h * d)
        x_q = _at(x, index)  # [batch, 1, d_model]
        q = F.linear(x_q, W[0], b[0]).view(B, 1, h, d)  # [batch, 1, head, d_head]
        kv = F.linear(x, W[1:].reshape(2 * h * d, -1), b[1:].reshape(-1))  # [batch, pos, 2*head*d_head]
        k, v = kv.view(B, P, 2, h, d).unbind(2)  # each [batch, pos, head, d_head]
        k, v = self.hook_k(k), self.hook_v(v)  # every position, as on the full path
        z = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # [batch, head, 1 or pos, d_head]
            attn_mask=mask.query_rows(index),
        ).transpose(1, 2)  # [batch, 1, head, d_head]
        return F.linear(z.reshape(B, 1, h * d), self.W_O.view(h * d, -1).t(), self.b_O)  # [batch, 1, d_model]

    def _explicit_attention(self, q, k, v, mask: "AttentionMask") -> torch.Tensor:
        """Attention with every intermediate exposed (q, k, v, scores, pattern, z hooks), for
        subclasses computing q, k, v their own way. q, k, v: [batch, pos, head, d_head] views."""
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)  # [batch, pos, head, d_head]
        return self.hook_z(self._scores_pattern_z(q, k, v, mask))  # [batch, pos, head, d_head]

    def _scores_pattern_z(self, q, k, v, mask: "AttentionMask", qkv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention with its scores and pattern exposed. q, k, v: [batch, pos, head, d_head] (any
        strides); qkv: [batch, pos, 3*head*d_head] when q, k, v are still its views (one head-major
        copy of all three then). Scores, pattern and z are computed head-major (batch index h*B + b)
        and exposed as views: scores and pattern [batch, head, query_pos, key_pos] over [head, batch,
        query_pos, key_pos], z [batch, pos, head, d_head] over [head, batch, pos, d_head], so the
        per-head results are one bmm on z as it lies (`head_results`). See `attention_scores` for
        the two ways of computing them (the same values)."""
        B, P, h, d = q.shape
        if _gathers_heads(q, k, v):
            if qkv is not None:
                qh, kh, vh = qkv.view(B, P, 3, h, d).permute(2, 3, 0, 1, 4).reshape(3, h * B, P, d).unbind(0)
            else:
                qh, kh, vh = (t.permute(2, 0, 1, 3).reshape(h * B, t.shape[1], d) for t in (q, k, v))
            scores = _gathered_scores(qh, kh, mask, B, h)  # [batch, head, query_pos, key_pos]
        else:
            vh = None
            scores = _per_head_scores(q, k, mask)  # [batch, head, query_pos, key_pos]
        pattern = self.hook_pattern(_softmax_keys(self.hook_attn_scores(scores)))  # [batch, head, q, k]
        if vh is None and _tracks_grad(pattern, v):  # out= takes no autograd (a hook's pattern may need it)
            vh = v.permute(2, 0, 1, 3).reshape(h * B, P, d)  # [head*batch, pos, d_head]
        if vh is not None:
            p = pattern.transpose(0, 1).reshape(h * B, P, -1)  # a view unless a hook replaced the pattern
            z = torch.bmm(p, vh).view(h, B, P, d)  # [head, batch, pos, d_head]
        else:
            z = torch.empty((h, B, P, d), dtype=v.dtype, device=v.device)  # [head, batch, pos, d_head]
            for i in range(h):
                torch.bmm(pattern[:, i], v[:, :, i], out=z[i])  # [batch, pos, d_head]
        return z.permute(1, 2, 0, 3)  # [batch, pos, head, d_head], a view of the head-major z


# The explicit attention computes each head's scores and z with its own batched GEMM on that head's
# strided q[:, :, h], k, v (written into its slice of a head-major tensor with out=) from this many
# batch x positions, and below it gathers q, k, v head-major (one copy) for a single batched GEMM over
# every (head, batch) pair. Bracket model's shapes (2 heads of 28, 42 positions), 1 thread, min of 9
# interleaved, the attention from the QKV projection to z, gathered / per head: batch 1 38 / 61 us,
# 4 104 / 121, 16 366 / 371, 32 706 / 721, 64 1.50 / 1.38 ms (the same values, bit for bit).
PER_HEAD_MIN_TOKENS = 2048


def _gathers_heads(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> bool:
    """Whether the explicit attention gathers q, k (, v) head-major rather than going head by head:
    below PER_HEAD_MIN_TOKENS, and whenever autograd records (out= takes no autograd)."""
    return (q.shape[0] * q.shape[1] < PER_HEAD_MIN_TOKENS or _tracks_grad(q, k)
            or (v is not None and _tracks_grad(v)))


def _tracks_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on these (then out= variants may not be used)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sum_heads(result: torch.Tensor) -> torch.Tensor:
    """The sum over heads of per-head outputs [batch, pos, head, d_model], head by head in order (for
    two heads exactly result.sum(2)): each head's slice of a head-major result is contiguous, and
    sum's zero-filled output and strided reduction are skipped. A fresh tensor [batch, pos, d_model]."""
    heads = result.unbind(2)
    if len(heads) == 1:
        return heads[0].clone()
    total = torch.add(heads[0], heads[1])
    for head in heads[2:]:
        total.add_(head)
    return total


def _softmax_keys(scores: torch.Tensor) -> torch.Tensor:
    """scores.softmax(-1) in scores' own layout: a head-major view ([batch, head, q, k] over
    [head, batch, q, k] storage) is normalised as its base (softmax would copy a non-contiguous input
    first), the result the same view of a head-major pattern. The same values as scores.softmax(-1)."""
    if scores.dim() == 4 and not scores.is_contiguous():
        base = scores.transpose(0, 1)
        if base.is_contiguous():
            return base.softmax(-1).transpose(0, 1)
    return scores.softmax(-1)


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: "AttentionMask") -> torch.Tensor:
    """hook_attn_scores: q k^T / sqrt(d_head) with masked entries shifted by MASKED_SCORE.
    q, k: [batch, pos, head, d_head] -> [batch, head, query_pos, key_pos] (a view of a head-major
    [head, batch, query_pos, key_pos] tensor). (A function of its arguments only, so a cache can
    compute it later from the cached q and k: see run_with_cache.) Gathered head-major or head by head
    as the explicit attention chooses (`_gathers_heads`): the same values."""
    if _gathers_heads(q, k):
        B, P, h, d = q.shape
        qh, kh = (t.permute(2, 0, 1, 3).reshape(h * B, t.shape[1], d) for t in (q, k))  # [head*batch, pos, d_head]
        return _gathered_scores(qh, kh, mask, B, h)
    return _per_head_scores(q, k, mask)


def _gathered_scores(qh: torch.Tensor, kh: torch.Tensor, mask: "AttentionMask", B: int, h: int) -> torch.Tensor:
    """Scores from q, k gathered head-major ([head*batch, pos, d_head]): one batched GEMM."""
    P, d, K = qh.shape[1], qh.shape[2], kh.shape[1]
    scale = 1.0 / math.sqrt(d)
    additive = mask.additive_heads(qh.dtype, B, h)  # [head*batch, 1 or q, k], [q, k] or None
    if additive is None:
        scores = torch.bmm(qh, kh.transpose(1, 2)).mul_(scale)  # [head*batch, query_pos, key_pos]
    else:  # one kernel for matmul, scale and mask: scores = mask + scale * q k^T
        scores = torch.baddbmm(additive, qh, kh.transpose(1, 2), alpha=scale)
    return scores.view(h, B, P, K).transpose(0, 1)  # [batch, head, query_pos, key_pos]


def _per_head_scores(q: torch.Tensor, k: torch.Tensor, mask: "AttentionMask") -> torch.Tensor:
    """Scores head by head: one batched GEMM on q[:, :, h] and k[:, :, h] as they lie (strided
    [batch, pos, d_head]; no head-major copy), written into that head's slice of a head-major
    tensor. Not under autograd (out=)."""
    B, P, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    additive = mask.additive_rows(q.dtype)  # [batch or 1, 1 or q, k], [q, k] or None
    scores = torch.empty((h, B, P, k.shape[1]), dtype=q.dtype, device=q.device)
    for i in range(h):
        kt = k[:, :, i].transpose(1, 2)  # [batch, d_head, key_pos]
        if additive is None:
            torch.bmm(q[:, :, i], kt, out=scores[i])  # [batch, query_pos, key_pos]
        else:  # one kernel for matmul, scale and mask: scores = mask + scale * q k^T
            torch.baddbmm(additive, q[:, :, i], kt, alpha=scale, out=scores[i])
    if additive is None:
        scores.mul_(scale)
    return scores.transpose(0, 1)  # [batch, head, query_pos, key_pos]


class AttentionMask:
    """Built once per forward and shared by every layer.

    A query row whose keys are all masked (a pad query before any real token, as with left padding)
    is opened to every key: -inf masking would give it NaNs that leak into every later position
    through `pattern @ v`, and a finite fill would give it float noise. Its output is meaningless
    either way (it is padding) but now finite and identical on the fast and explicit paths. Masked
    scores in `hook_attn_scores` are shifted by MASKED_SCORE (-1e5, ARENA's convention), so they
    softmax to exactly 0. Masks are built on first use, so a forward with neither padding nor
    attention hooks never pays for them.
    """

    def __init__(self, blocked: Optional[torch.Tensor], causal_only: bool):
        self.blocked = blocked  # [batch or 1, 1, query_pos or 1, key_pos] bool, True = masked
        self.causal_only = causal_only
        self._additive: Optional[torch.Tensor] = None
        self._allowed: Optional[torch.Tensor] = None
        self._additive_heads: Optional[tuple] = None  # ((dtype, batch, heads), [head*batch, 1 or q, k])

    def allowed(self) -> Optional[torch.Tensor]:
        """True = may attend, with fully masked rows opened; None when nothing is masked."""
        if self.blocked is not None and self._allowed is None:
            allowed = ~self.blocked
            self._allowed = allowed | ~allowed.any(-1, keepdim=True)
        return self._allowed

    def query_rows(self, index: Union[int, torch.Tensor]) -> Optional[torch.Tensor]:
        """`allowed()` for one query position per row (index: [batch], or an int for the same in
        every row): [batch or 1, 1, 1, key_pos]."""
        allowed = self.allowed()  # [query_pos, key_pos] (causal only) or [batch or 1, 1, query_pos or 1, key_pos]
        if allowed is not None and allowed.ndim == 2:
            allowed = allowed[None, None]  # [1, 1, query_pos, key_pos]
        if allowed is None or allowed.shape[2] == 1:
            return allowed
        if isinstance(index, int):
            return allowed[:, :, index:index + 1]  # [batch or 1, 1, 1, key_pos]
        rows = allowed.expand(index.shape[0], -1, -1, -1)[torch.arange(index.shape[0], device=index.device), :, index]
        return rows[:, :, None, :]  # [batch, 1, 1, key_pos]

    def sdpa_mask(self) -> Optional[torch.Tensor]:
        """SDPA's bool mask (its float-mask kernels are ~20% slower on CPU); None when only a causal
        mask applies, which SDPA's is_causal does itself."""
        return None if self.causal_only else self.allowed()

    def additive(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The same mask as 0 / MASKED_SCORE floats for the explicit path, or None."""
        allowed = self.allowed()
        if allowed is not None and (self._additive is None or self._additive.dtype != dtype):
            fill = max(MASKED_SCORE, torch.finfo(dtype).min / 2)
            zeros = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
            self._additive = zeros.masked_fill_(~allowed, fill)
        return self._additive

    def additive_rows(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """`additive` without its head axis, for one head's [batch, query_pos, key_pos] scores:
        [batch or 1, 1 or query_pos, key_pos] ([query_pos, key_pos] for a causal-only mask), a view;
        or None."""
        additive = self.additive(dtype)
        if additive is None or additive.dim() == 2:
            return additive
        return additive[:, 0]  # [batch or 1, 1 or q, k]

    def additive_heads(self, dtype: torch.dtype, B: int, h: int) -> Optional[torch.Tensor]:
        """`additive_rows` expanded to [head*batch, 1 or query_pos, key_pos] (head-major, as the
        explicit attention's gathered GEMM) and made once per forward (every layer shares it); a
        causal-only [query_pos, key_pos] broadcasts as it is; or None."""
        cached = self._additive_heads
        if cached is not None and cached[0] == (dtype, B, h):
            return cached[1]
        additive = self.additive_rows(dtype)
        if additive is not None and additive.dim() == 3:
            additive = additive.expand(h, B, -1, -1).reshape(h * B, *additive.shape[1:])  # [head*batch, 1 or q, k]
        self._additive_heads = ((dtype, B, h), additive)
        return additive


MASKED_SCORE = -1e5  # what masked attention scores become (finite: see AttentionMask)


class MLP(_Sublayer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))  # [d_model, d_mlp]
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))  # [d_mlp]
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))  # [d_mlp, d_model]
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))  # [d_model]
        self.act = {"relu": F.relu, "gelu": F.gelu,
                    "gelu_new": lambda x: F.gelu(x, approximate="tanh")}[cfg.act_fn]
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(F.linear(x, self.W_in.t(), self.b_in))  # [batch, pos, d_mlp]
        post = self.hook_post(self.act(pre))  # [batch, pos, d_mlp]
        return F.linear(post, self.W_out.t(), self.b_out)  # [batch, pos, d_model]


class TransformerBlock(_Sublayer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        use_ln = cfg.normalization == "LN"
        self.ln1 = LayerNorm(cfg) if use_ln else nn.Identity()
        self.attn = Attention(cfg)
        self.has_mlp = cfg.d_mlp > 0
        if self.has_mlp:
            self.ln2 = LayerNorm(cfg) if use_ln else nn.Identity()
            self.mlp = MLP(cfg)
        self.hook_resid_pre = HookPoint()  # [batch, pos, d_model]
        self.hook_attn_out = HookPoint()  # [batch, pos, d_model]
        if self.has_mlp:  # attention-only blocks have neither (as in TransformerLens): they would never fire
            self.hook_resid_mid = HookPoint()  # [batch, pos, d_model]
            self.hook_mlp_out = HookPoint()  # [batch, pos, d_model]
        self.hook_resid_post = HookPoint()  # [batch, pos, d_model]

    def forward(self, resid_pre: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)  # [batch, pos, d_model]
        attn_out = self.hook_attn_out(self.attn(self.ln1(resid_pre), mask))  # [batch, pos, d_model]
        if not self.has_mlp:  # attention-only: resid_post is resid_pre + attn_out (no resid_mid hook)
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)  # [batch, pos, d_model]
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))  # [batch, pos, d_model]
        return self.hook_resid_post(resid_mid + mlp_out)  # [batch, pos, d_model]

    def forward_at(self, resid_pre: torch.Tensor, mask: AttentionMask, index: Union[int, torch.Tensor]) -> torch.Tensor:
        """forward's output at one position per row (index: [batch] or an int) -> [batch, 1, d_model]. What
        the last block of a first/last read-out needs: only that position's query, attention output
        and MLP (a third of a 3-layer model's compute is the other positions of its last block).
        Hooks that would see one position must be inactive (see FULL_POSITION_HOOKS). With a hook on
        the attention's q, scores, pattern or z (READOUT_ATTENTION_HOOKS), attention runs for every
        query position (the hooks see them all, as on the full path) and the rest of the block at
        `index` only."""
        resid_pre = self.hook_resid_pre(resid_pre)  # [batch, pos, d_model]
        attn = self.attn
        if attn.hook_z.fns or attn.hook_q.fns or attn.hook_pattern.fns or attn.hook_attn_scores.fns:
            z = attn.z_of(self.ln1(resid_pre), mask)  # [batch, pos, head, d_head]
            attn_out = attn.project(_at(z, index))  # [batch, 1, d_model]
        else:
            attn_out = attn.forward_at(self.ln1(resid_pre), mask, index)  # [batch, 1, d_model]
        resid_mid = _at(resid_pre, index) + attn_out  # [batch, 1, d_model]
        if not self.has_mlp:
            return resid_mid
        return resid_mid + self.mlp(self.ln2(resid_mid))  # [batch, 1, d_model]

    def forward_from_z(self, resid_pre: torch.Tensor, z: torch.Tensor, mask: AttentionMask,
                       index: Union[None, int, torch.Tensor] = None) -> torch.Tensor:
        """forward (index None: [batch, pos, d_model]) or forward_at (an index: [batch, 1, d_model]) from
        the attention's hook_z on, given resid_pre (this block's input) and z: what the attention
        computes from it, before hook_z's functions (which run here). What a patch of hook_z needs when
        the clean run's z is kept (interventions.PatchBatch): the block's query, key and value
        projections and attention are not recomputed. The hook points before hook_z do not run: the
        model's forward refuses a resume while any of them has a function attached."""
        attn = self.attn
        z = attn.hook_z(z)  # [batch, pos, head, d_head]
        if index is not None:
            resid_mid = _at(resid_pre, index) + attn.project(_at(z, index))  # [batch, 1, d_model]
            if not self.has_mlp:
                return resid_mid
            return resid_mid + self.mlp(self.ln2(resid_mid))  # [batch, 1, d_model]
        attn_out = self.hook_attn_out(attn.project(z))  # [batch, pos, d_model]
        if not self.has_mlp:
            return self.hook_resid_post(resid_pre + attn_out)
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)  # [batch, pos, d_model]
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))  # [batch, pos, d_model]
        return self.hook_resid_post(resid_mid + mlp_out)  # [batch, pos, d_model]


def _at(x: torch.Tensor, index: Union[int, torch.Tensor]) -> torch.Tensor:
    """x [batch, pos, ...] at one position per row (index: [batch], or an int) -> [batch, 1, ...]."""
    if isinstance(index, int):
        return x[:, index:index + 1]  # a view
    return x[torch.arange(x.shape[0], device=x.device), index][:, None]


class Unembed(_Sublayer):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        if cfg.unembed == "one_hot":
            self.W_U = nn.Parameter(torch.eye(cfg.d_model), requires_grad=False)  # [d_model, d_vocab_out]
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out), requires_grad=False)  # [d_vocab_out]
        else:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))  # [d_model, d_vocab_out]
            self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out))  # [d_vocab_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.W_U.t(), self.b_U)  # [..., d_vocab_out]


# Hooks of the last block that TransformerBlock.forward_at still runs on every position (a key/value
# patch at the last layer keeps the fast read-out path)
FULL_POSITION_HOOKS = ("hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_k", "attn.hook_v")
# Hooks of the last block that keep the read-out path but make its attention run for every query
# position (they see every position; the output projection and MLP still run at the read-out only):
# a patch of a head's z or pattern at the last layer costs one block's attention, not the whole block
READOUT_ATTENTION_HOOKS = ("attn.hook_q", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z")


# The read-out path (TransformerBlock.forward_at) saves the other positions' compute of the last block
# but launches a few more kernels (a separate query projection; a gather for "last" with padding, a
# slice otherwise); for one row that overhead matches the saving (bracket model, 1 thread, CPU time,
# interleaved: 0.771 vs 0.762 ms), from 2 rows it wins (0.896 vs 0.929 ms; 4 rows 1.23 vs 1.31).
READOUT_ONLY_MIN_BATCH = 2


# run_with_cache(defer=None) defers named entries from this many batch x positions (a cache of every
# hook point is eager at every size since issue 33's third round). Bracket model, 1 thread, caching
# every hook point, interleaved (busy 2-core machine; / the plain forward): batch 1: eager 1.21, deferred
# unread 1.63, deferred and read 2.91; batch 16 (672 tokens): 1.33, 1.27, 1.77; batch 64 (2688): 1.53,
# 1.15, 2.39. Eager costs about what deferred-unread does up to ~1000 tokens and less once read.
# Since the explicit attention copies q, k, v head-major in one go and per-head results are one bmm
# (issue 33; CPU time per call, min of 9 interleaved, / our read-out forward): batch 64 (2,688 tokens)
# eager, every entry read 1.44, deferred unread 1.38, deferred and read 2.07; batch 256 (10,752): 1.86,
# 1.21, 2.18. Eager now costs what deferring saves at 2,688 tokens and is far cheaper once read.
DEFER_MIN_TOKENS = 4096


class EmbeddingEditedError(InputError):
    """A resumed forward (start_at_layer) met a hook that changed the embedding: see _refire_embed_hooks."""


class _Deferral:
    """Hook points (`outputs`, in the order of fn's results) whose values one function computes from
    the values of the hook points `sources` (after every hook on them: what the forward computes
    from), plus the forward's attention mask when `needs_mask`, plus `fixed()`: what of `owner` it
    needs, taken when caching starts (a weight copy, so a later edit does not reach the cache). Built
    once per model (deepcopy maps owner and hook points to the copy's); see _plan_deferred."""

    __slots__ = ("outputs", "sources", "fn", "owner", "needs_mask")

    def __init__(self, outputs, sources, fn, owner=None, needs_mask=False):
        self.outputs, self.sources, self.fn, self.owner, self.needs_mask = outputs, sources, fn, owner, needs_mask

    def fixed(self) -> tuple:
        owner = self.owner
        if owner is None:
            return ()
        if type(owner) is LayerNorm:
            return (owner.eps, owner._identity_affine())  # constants (not weights): shared, not copied
        return (_weight_copy(owner.W_O),)  # an Attention


class _Shared:
    """One deferral's results, computed on the first read of any of them; then its inputs are let go."""

    __slots__ = ("fn", "args", "values")

    def __init__(self, fn, args):
        self.fn, self.args, self.values = fn, args, None

    def value(self, j: int) -> torch.Tensor:
        if self.values is None:
            self.values, self.args = self.fn(*self.args), None
        return self.values[j]


def _head_results_of(z: torch.Tensor, W_O: torch.Tensor) -> tuple[torch.Tensor]:
    return (head_results(z, W_O),)  # [batch, pos, head, d_model]


def _scores_and_pattern(q: torch.Tensor, k: torch.Tensor, mask: "AttentionMask") -> tuple[torch.Tensor, torch.Tensor]:
    scores = attention_scores(q, k, mask)  # [batch, head, query_pos, key_pos]
    return scores, _softmax_keys(scores)  # as Attention._scores_pattern_z computes them


def _layer_norm_parts_of(x: torch.Tensor, eps: float, unit) -> tuple[torch.Tensor, torch.Tensor]:
    if unit[0].dtype != x.dtype or unit[0].device != x.device:  # a model run on inputs of another dtype
        unit = (torch.ones(x.shape[-1], dtype=x.dtype, device=x.device),
                torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device))
    return layer_norm_parts(x, eps, unit)  # (scale, normalized), as LayerNorm.forward computes them


def _weight_copy(w: torch.Tensor) -> torch.Tensor:
    return w.clone() if not torch.is_grad_enabled() else w.detach().clone()


class HookedTransformer(HookedRootModule):
    """Token (or vector) inputs -> logits at the configured read-out position(s).

    forward(x, key_padding_mask=None, readout=None):
      x: LongTensor [batch, pos] of token ids, or FloatTensor [batch, pos, d_input] with a read-in.
      key_padding_mask: [batch, pos] bool, True = padding (derived from cfg.pad_token for tokens).
      readout: override cfg.readout ("first" -> [batch, d_vocab_out], "last" -> [batch, d_vocab_out]
        at each row's last non-pad position, "all" -> [batch, pos, d_vocab_out]).
    """

    _mask_sink: Optional[list] = None  # set by run_with_cache: deferred attention scores need the mask

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ReadIn(cfg) if cfg.d_input else Embed(cfg)
        self.hook_embed = HookPoint()  # [batch, pos, d_model]
        if cfg.positional != "none":
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = HookPoint()  # [batch, pos, d_model] (an expanded view, as TL)
        self.blocks = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        _warn_causal_first_readout(cfg)
        if cfg.normalization == "LN":
            self.ln_final = LayerNorm(cfg)
        self.unembed = Unembed(cfg)
        self.init_weights(cfg.seed)
        self.setup_hooks()

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Normal(0, init_range) for every trainable matrix; zeros for biases, LN as identity."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim >= 2 and not name.rsplit(".", 1)[-1].startswith("b_"):  # b_QKV is 3-D but a bias
                p.copy_(torch.randn(p.shape, generator=gen) * self.cfg.init_range)
            elif name.endswith(".w"):
                p.fill_(1.0)
            else:
                p.zero_()

    # --- input checks: cheap attribute checks only, so the hot path stays fast -----------------------
    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(x, torch.Tensor):
            raise InputError(f"model input must be a torch.Tensor, got {type(x).__name__}")
        if cfg.d_input:
            if not x.is_floating_point() or x.ndim != 3 or x.shape[-1] != cfg.d_input:
                raise InputError(
                    f"this model reads vectors: expected a float tensor [batch, pos, {cfg.d_input}], "
                    f"got {x.dtype} of shape {tuple(x.shape)}"
                )
        else:
            if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
                raise InputError(f"token input must be an integer tensor [batch, pos], got dtype {x.dtype}")
            if x.ndim != 2:
                raise InputError(f"token input must have shape [batch, pos], got {tuple(x.shape)}")
        if x.device != self.param_device:
            raise InputError(f"model input is on device {x.device} but the model is on {self.param_device}; "
                             f"move the input with .to({str(self.param_device)!r}) (or the model with .to())")
        if x.shape[1] > cfg.n_ctx:
            raise InputError(f"sequence length {x.shape[1]} exceeds n_ctx={cfg.n_ctx}")
        if x.shape[1] == 0:
            raise InputError("empty sequence (pos = 0)")

    def run_with_cache(self, *args, names: NamesFilter = None, names_filter: NamesFilter = None,
                       detach: bool = True, defer: Optional[bool] = None, remove_batch_dim: bool = False,
                       **kwargs) -> tuple[object, ActivationCache]:
        """Forward once and return (output, ActivationCache) holding only the hook points asked for.

        names (or TransformerLens's names_filter): None (every hook point), a name, a list of names,
        or a predicate on names. Other keyword arguments go to forward().

        defer: values the forward does not need are computed on first read instead (`Deferred`, see
        _plan_deferred): attention scores and pattern (the forward then runs fused attention),
        LayerNorm scale and normalized (fused LayerNorm), per-head results. Each is the same function
        of the same tensors as in the forward that exposes it, so the cache holds the same values.
        defer=False computes every value in the forward (explicit sublayers): cheaper whenever the
        entry is read (a deferred one, read, costs the fused sublayer plus the explicit one;
        benchmarks/bench_forward.py: cache_all_read vs cache_all_eager), and at small batches cheaper
        even when none is. defer=True defers whatever it can.

        defer=None (the default) chooses by what the caller asks for:
          - every hook point (names None): eager at every size. A cache of everything is read whole
            or nearly (decompositions, TL-style analyses), and the deferral only saves on entries
            that go unread: read, a deferred entry costs the fused sublayer plus the explicit one
            (bracket model, batch 1000, CPU time / our read-out forward: every entry read 1.41-1.45x
            eager against 1.89-1.94x deferred; nothing read 1.38-1.45x against 1.27-1.34x; README,
            Speed). Its peak memory is the deferred cache's once read (the explicit attention makes
            no head-major copy of q, k, v at these sizes). Pass defer=True to cache everything but
            read a few entries.
          - names given (a name, a list or a predicate): eager below DEFER_MIN_TOKENS batch x
            positions, deferred from there. Asking for a pattern then leaves the forward on its
            fused paths, so every other cached value is bitwise what a cache without it holds
            (tested: tests/test_fast_paths.py), and an entry asked for but not read costs nothing.
          The values are the same either way (tested equal at 1e-6 in float32, 1e-12 in float64).

        remove_batch_dim (TransformerLens's): for a batch of one, every cached value without its batch
        axis (the cache then holds plain tensors; its decompositions expect the batch axis)."""
        if remove_batch_dim:
            return self._run_with_cache_unbatched(args, kwargs, names=names, names_filter=names_filter,
                                                  detach=detach, defer=defer)
        points = self._cache_points(names, names_filter)
        if defer is None:
            if names is None and names_filter is None:
                defer = False  # every hook point: eager (see above)
            else:
                x = args[0] if args else kwargs.get("x")
                defer = not (isinstance(x, torch.Tensor) and x.ndim >= 2
                             and x.shape[0] * x.shape[1] < DEFER_MIN_TOKENS)
        plan = self._plan_deferred(points) if detach and defer else None
        if plan is None:
            out, store = self._run_caching(points, detach, args, kwargs)
            return out, ActivationCache(store, self)
        wanted, deferrals, run = plan
        masks: list[AttentionMask] = []
        self.__dict__["_mask_sink"] = masks
        try:
            out, store = self._run_caching(run, detach, args, kwargs)
        finally:
            self.__dict__.pop("_mask_sink", None)
        late: dict[str, Deferred] = {}
        for d, fixed in deferrals:
            try:
                inputs = [store[hp.name] for hp in d.sources]
            except KeyError:  # the forward never reached this block (start_at_layer): nothing to cache
                continue
            if d.needs_mask:
                if not masks:  # forward() hands it over before running any block
                    continue
                inputs.append(masks[0])
            shared = _Shared(d.fn, (*inputs, *fixed))
            for j, hp in enumerate(d.outputs):
                if hp in wanted:
                    late[hp.name] = Deferred(shared.value, j)
        entries: dict[str, object] = {}
        for hp in points:  # hook-point order, as the eager cache has
            name = hp.name
            value = store.get(name)
            if value is None:
                value = late.get(name)
                if value is None:
                    continue
            entries[name] = value
        return out, ActivationCache(entries, self)

    def _plan_deferred(self, points: list[HookPoint]):
        """(set of points, [(deferral, its fixed arguments)], hook points to run with a saving hook) for
        the requested hook points the cache computes on first read rather than the forward, or None
        when there are none.

        A deferral applies when none of its hook points has a function attached (a user hook must
        see the value in the forward, and an edit must flow on). Its sources are captured when not
        asked for; they cost nothing (q, k, z, resid_pre and resid_mid exist on the fast paths).
        (Not with detach=False: a gradient must reach the weights through the value.)"""
        wanted = set(points)
        found = []
        skip: set[HookPoint] = set()
        capture: dict[HookPoint, None] = {}
        for d in self._deferrals:
            first, last = d.outputs[0], d.outputs[-1]
            if (first in wanted or last in wanted) and not (first.fns or last.fns):
                found.append((d, d.fixed()))
                skip.update(d.outputs)
                for hp in d.sources:
                    if hp not in wanted:
                        capture[hp] = None
        if not found:
            return None
        return wanted, found, [hp for hp in points if hp not in skip] + list(capture)

    def key_padding_mask(self, tokens: torch.Tensor) -> Optional[torch.Tensor]:
        if self.cfg.pad_token is None or self.cfg.d_input:
            return None
        return tokens == self.cfg.pad_token  # [batch, pos]

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                readout: Optional[str] = None, *, start_at_layer: int = 0,
                resid: Optional[torch.Tensor] = None, readout_only: Optional[bool] = None,
                return_resid: bool = False, return_type: Optional[str] = "logits",
                targets: Optional[torch.Tensor] = None, resume_z: Optional[torch.Tensor] = None):
        """start_at_layer=l with resid = blocks.l.hook_resid_pre's value runs only blocks l.. (x still
        gives the padding mask and read-out positions): what a patch at layer l needs to recompute.
        Functions on hook_embed / hook_pos_embed still run, on x's embeddings (they may note the batch
        for a later hook); one that changes them is an InputError (resid cannot reflect the change).
        resume_z (with start_at_layer=l): block l's blocks.l.attn.hook_z value as its attention computes
        it from resid (before hook_z's functions, which run): block l starts after its attention
        (`TransformerBlock.forward_from_z`), what a patch of hook_z needs; the hook points of block l
        before hook_z must have no function attached (they would not run).

        readout_only: whether the last block computes only the read-out position (first/last
        read-outs; the outputs and their gradients are the same up to float rounding). None = in eval
        mode, for batches of READOUT_ONLY_MIN_BATCH rows or more. Either way a hook in the last block that would see one position turns it off.

        return_resid: also return the final residual stream (ln_final's input) at the read-out
        position(s), [batch, (pos,) d_model], as (logits, resid). It is what a hook on the last
        block's hook_resid_post would give there, without switching the read-out path off.

        return_type (TransformerLens's): "logits" (default), "loss", "both" (logits, loss) or None;
        see _tl_loss for the loss, `targets=` for a classifier's labels."""
        self._check_return_type(return_type, targets, return_resid)
        self._check_input(x)
        if key_padding_mask is None:
            key_padding_mask = self.key_padding_mask(x)
        elif (key_padding_mask.shape != x.shape[:2] or key_padding_mask.dtype != torch.bool
              or key_padding_mask.device != x.device):
            raise InputError(f"key_padding_mask must be bool {tuple(x.shape[:2])} on {x.device}, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)} on {key_padding_mask.device}")
        if key_padding_mask is not None and not bool(key_padding_mask.any()):
            key_padding_mask = None  # nothing to mask: let attention take its unmasked fast kernel
        mask = self._attention_mask(key_padding_mask, x.shape[1], x.device)
        if self._mask_sink is not None and not self._mask_sink:  # for run_with_cache (not a nested forward)
            self._mask_sink.append(mask)
        if start_at_layer:
            resid = self._check_resume(x, start_at_layer, resid)  # [batch, pos, d_model]
            if resume_z is not None:
                self._check_resume_z(start_at_layer, resid, resume_z)
            if self.hook_embed.fns or (self.cfg.positional != "none" and self.hook_pos_embed.fns):
                self._refire_embed_hooks(x)
        elif resume_z is not None:
            raise InputError("resume_z is block start_at_layer's z: pass start_at_layer (and resid) with it")
        else:
            resid = self.hook_embed(self.embed(x))  # [batch, pos, d_model]
            if self.cfg.positional != "none":
                pos_embed = self.pos_embed(x.shape[1])  # [pos, d_model]
                if self.hook_pos_embed.fns:  # hooks see [batch, pos, d_model], as TL's; the sum broadcasts alike
                    pos_embed = self.hook_pos_embed(pos_embed.expand(x.shape[0], -1, -1))
                resid = resid + pos_embed  # [batch, pos, d_model]
        readout = readout or self.cfg.readout
        if readout_only is None:  # a single row: the full last block is as fast (see READOUT_ONLY_MIN_BATCH)
            readout_only = not self.training and x.shape[0] >= READOUT_ONLY_MIN_BATCH
        if readout_only and readout != "all" and not any(hp.fns for hp in self._last_block_hooks):
            # one read-out position: the last block computes only that position (its hooks that see
            # every position on this path too - resid_pre, ln1, k, v - may be active)
            blocks = self.blocks._modules  # not self.blocks[a:b]: slicing builds a new ModuleList per call
            last = len(blocks) - 1
            first = start_at_layer
            if resume_z is not None and first < last:
                resid = blocks[str(first)].forward_from_z(resid, resume_z, mask)  # [batch, pos, d_model]
                first += 1
            for i in range(first, last):
                resid = blocks[str(i)](resid, mask)  # [batch, pos, d_model]
            if readout == "first" or (readout == "last" and key_padding_mask is None):
                index = 0 if readout == "first" else x.shape[1] - 1  # the same in every row: a slice, no gather
            else:
                index = self._readout_index(key_padding_mask, readout, x.shape[0], x.shape[1], x.device)
            if resume_z is not None and start_at_layer == last:
                resid = blocks[str(last)].forward_from_z(resid, resume_z, mask, index)  # [batch, 1, d_model]
            else:
                resid = blocks[str(last)].forward_at(resid, mask, index)  # [batch, 1, d_model]
        else:
            later = itertools.islice(self.blocks, start_at_layer, None)
            if resume_z is not None:
                resid = next(later).forward_from_z(resid, resume_z, mask)  # [batch, pos, d_model]
            for block in later:
                resid = block(resid, mask)  # [batch, pos, d_model]
            resid = self._select_readout(resid, key_padding_mask, readout)  # [batch, pos or 1, d_model]
        resid_final = resid  # [batch, pos or 1, d_model]
        if self.cfg.normalization == "LN":
            resid = self.ln_final(resid)
        logits = self.unembed(resid)  # [batch, pos or 1, d_vocab_out]
        if readout != "all":
            logits, resid_final = logits[:, 0], resid_final[:, 0]  # [batch, d_vocab_out], [batch, d_model]
        if return_type != "logits":
            return self._tl_return(logits, x, return_type, targets, readout)
        return (logits, resid_final) if return_resid else logits

    def _refire_embed_hooks(self, x: torch.Tensor) -> None:
        """A resumed forward still runs the functions on hook_embed / hook_pos_embed, on x's embeddings:
        a hook there may note something about the batch that a later hook reads (a mean ablation's
        padding rows). One that changes the embedding raises InputError: `resid` cannot reflect it."""
        points = [(self.hook_embed, lambda: self.embed(x))]
        if self.cfg.positional != "none":
            points.append((self.hook_pos_embed, lambda: self.pos_embed(x.shape[1]).expand(x.shape[0], -1, -1)))
        for hp, value_of in points:
            if hp.fns:
                value = value_of()  # [batch, pos, d_model]
                if hp(value) is not value:
                    raise EmbeddingEditedError(f"start_at_layer: a hook on {hp.name} changed the embedding, which the "
                                     f"given resid (computed before it) cannot reflect; run the whole model")

    def _check_resume(self, x: torch.Tensor, layer, resid) -> torch.Tensor:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 < layer < self.cfg.n_layers:
            raise InputError(f"start_at_layer must be an int in 1..{self.cfg.n_layers - 1}, got {layer!r}")
        want = (x.shape[0], x.shape[1], self.cfg.d_model)
        if not isinstance(resid, torch.Tensor) or tuple(resid.shape) != want or resid.device != x.device:
            got = (f"{tuple(resid.shape)} on {resid.device}" if isinstance(resid, torch.Tensor)
                   else type(resid).__name__)
            raise InputError(f"start_at_layer={layer} needs resid = blocks.{layer}.hook_resid_pre of shape "
                             f"{list(want)} on {x.device}, got {got}")
        return resid

    def _check_resume_z(self, layer: int, resid: torch.Tensor, z) -> None:
        block = self.blocks[layer]
        want = (resid.shape[0], resid.shape[1], self.cfg.n_heads, self.cfg.d_head)
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != want or z.device != resid.device:
            got = f"{tuple(z.shape)} on {z.device}" if isinstance(z, torch.Tensor) else type(z).__name__
            raise InputError(f"resume_z needs blocks.{layer}.attn.hook_z's value of shape {list(want)} on "
                             f"{resid.device}, got {got}")
        if type(block) is not TransformerBlock or type(block.attn) is not Attention:
            raise InputError("resume_z needs the plain TransformerBlock and Attention")
        before = [block.hook_resid_pre, block.attn.hook_q, block.attn.hook_k, block.attn.hook_v,
                  block.attn.hook_attn_scores, block.attn.hook_pattern]
        if isinstance(block.ln1, LayerNorm):
            before += [block.ln1.hook_scale, block.ln1.hook_normalized]
        g = _module_globals
        if (g._global_forward_hooks or g._global_forward_pre_hooks or torch._C._get_tracing_state()
                or any(m._forward_hooks or m._forward_pre_hooks or m._compiled_call_impl is not None
                       for m in (block, block.attn))):
            raise InputError(f"resume_z: blocks.{layer} (or its attention) has a torch module hook, which a "
                             f"block started at hook_z would skip; resume at the block's start")
        active = [hp.name for hp in before if hp.fns]
        if active:
            raise InputError(f"resume_z: hook point(s) {active} come before blocks.{layer}.attn.hook_z and would not "
                             f"run; resume at the block's start (start_at_layer with resid only)")

    def _attention_mask(self, key_pad: Optional[torch.Tensor], P: int, device) -> AttentionMask:
        blocked = None if key_pad is None else key_pad[:, None, None, :]  # [batch, 1, 1, key_pos]
        causal_only = False
        if self.cfg.attention == "causal":
            future = torch.ones(P, P, dtype=torch.bool, device=device).triu(1)  # [query_pos, key_pos]
            causal_only = blocked is None  # SDPA then applies the causal mask itself (is_causal)
            blocked = future if blocked is None else blocked | future  # [batch or 1, 1, q, k]
        return AttentionMask(blocked, causal_only)

    def absent_hook_hint(self, name: str) -> str:
        """Why a hook name TransformerLens models may have is not on this one ('' when no reason)."""
        import re

        m = re.fullmatch(r"blocks\.(\d+)\.(hook_resid_mid|hook_mlp_out|hook_mlp_in|mlp\.\w+|ln2\.\w+)", name)
        if m is None or self.cfg.d_mlp:
            return ""
        return (f"; this model is attention-only (d_mlp=0), so its blocks have no MLP hook points and no "
                f"hook_resid_mid (the residual after attention is blocks.{m.group(1)}.hook_resid_post)")

    def setup_hooks(self) -> None:
        super().setup_hooks()
        last = f"blocks.{self.cfg.n_layers - 1}."
        # the last block's hooks that would see one position on the read-out path (forward_at); the
        # others (FULL_POSITION_HOOKS) see every position there too. A plain list in __dict__ (not a
        # registered module list): checked on every inference forward
        keep = FULL_POSITION_HOOKS + READOUT_ATTENTION_HOOKS
        self.__dict__["_last_block_hooks"] = [hp for n, hp in self.hook_dict.items() if n.startswith(last)
                                              and n[len(last):] not in keep]
        # what run_with_cache may compute on first read (see _plan_deferred), built once; only for
        # this class's own forward and blocks, whose data flow the deferrals restate (a subclass
        # overriding them, as assoc_model's, caches every value in its forward)
        deferrals = []
        own = type(self).forward is HookedTransformer.forward
        for block in self.blocks if own else ():
            if type(block) is not TransformerBlock or type(block.attn) is not Attention:
                continue
            attn = block.attn
            lns = [(block.ln1, block.hook_resid_pre)] + ([(block.ln2, block.hook_resid_mid)] if block.has_mlp else [])
            for ln, source in lns:
                if isinstance(ln, LayerNorm):
                    deferrals.append(_Deferral((ln.hook_scale, ln.hook_normalized), (source,),
                                               _layer_norm_parts_of, owner=ln))
            deferrals.append(_Deferral((attn.hook_attn_scores, attn.hook_pattern), (attn.hook_q, attn.hook_k),
                                       _scores_and_pattern, needs_mask=True))
            deferrals.append(_Deferral((attn.hook_result,), (attn.hook_z,), _head_results_of, owner=attn))
        self.__dict__["_deferrals"] = deferrals

    def readout_positions(self, x: torch.Tensor, readout: Optional[str] = None) -> torch.Tensor:
        """The position each row's first/last read-out reads (the last non-pad token for "last"): [batch]."""
        self._check_input(x)
        pad = self.key_padding_mask(x)
        pad = pad if pad is not None and bool(pad.any()) else None
        return self._readout_index(pad, readout or self.cfg.readout, x.shape[0], x.shape[1], x.device)

    def _readout_index(self, key_pad, readout: str, B: int, P: int, device) -> torch.Tensor:
        """The read-out position of every row: [batch]."""
        if readout == "first":
            return torch.zeros(B, dtype=torch.long, device=device)
        if readout == "last":
            if key_pad is None:
                return torch.full((B,), P - 1, dtype=torch.long, device=device)
            return (~key_pad).long().cumsum(1).argmax(1)  # index of the last non-pad position
        raise InputError(f"readout={readout!r} is not one of ('first', 'last', 'all')")

    def _select_readout(self, resid, key_pad, readout: str) -> torch.Tensor:
        # LN and unembed act per position, so selecting before them gives the same logits and only
        # computes what is read; ln_final's hooks then see [batch, 1, ...] for first/last read-outs.
        if readout == "all":
            return resid
        if readout == "first":
            return resid[:, :1]  # [batch, 1, d_model]
        if readout == "last" and key_pad is None:
            return resid[:, -1:]  # [batch, 1, d_model]
        index = self._readout_index(key_pad, readout, resid.shape[0], resid.shape[1], resid.device)
        return resid[torch.arange(resid.shape[0], device=resid.device), index][:, None]  # [batch, 1, d_model]

    # --- TransformerLens conveniences: weights stacked over layers, return_type, remove_batch_dim ---------
    # (as TL's HookedTransformer names and shapes them; read-only views of the parameters)

    @property
    def W_E(self) -> torch.Tensor:
        """[d_vocab, d_model] token embedding."""
        if not isinstance(self.embed, Embed):
            raise ConfigError("this model reads vectors (d_input): its read-in is model.embed.W_in [d_input, d_model]")
        return self.embed.W_E

    @property
    def W_pos(self) -> torch.Tensor:
        """[n_ctx, d_model] positional embedding."""
        if self.cfg.positional == "none":
            raise ConfigError("this model has no positional embedding (positional='none')")
        return self.pos_embed.W_pos

    W_U = property(lambda self: self.unembed.W_U)  # [d_model, d_vocab_out]
    b_U = property(lambda self: self.unembed.b_U)  # [d_vocab_out]
    W_Q = property(lambda self: self._stack_attn("W_Q"))  # [n_layers, n_heads, d_model, d_head]
    W_K = property(lambda self: self._stack_attn("W_K"))  # [n_layers, n_heads, d_model, d_head]
    W_V = property(lambda self: self._stack_attn("W_V"))  # [n_layers, n_heads, d_model, d_head]
    W_O = property(lambda self: self._stack_attn("W_O"))  # [n_layers, n_heads, d_head, d_model]
    b_Q = property(lambda self: self._stack_attn("b_Q"))  # [n_layers, n_heads, d_head]
    b_K = property(lambda self: self._stack_attn("b_K"))  # [n_layers, n_heads, d_head]
    b_V = property(lambda self: self._stack_attn("b_V"))  # [n_layers, n_heads, d_head]
    b_O = property(lambda self: self._stack_attn("b_O"))  # [n_layers, d_model]
    W_in = property(lambda self: self._stack_mlp("W_in"))  # [n_layers, d_model, d_mlp]
    b_in = property(lambda self: self._stack_mlp("b_in"))  # [n_layers, d_mlp]
    W_out = property(lambda self: self._stack_mlp("W_out"))  # [n_layers, d_mlp, d_model]
    b_out = property(lambda self: self._stack_mlp("b_out"))  # [n_layers, d_model]

    def _stack_attn(self, name: str) -> torch.Tensor:
        return torch.stack([getattr(block.attn, name) for block in self.blocks])

    def _stack_mlp(self, name: str) -> torch.Tensor:
        if not self.cfg.d_mlp:
            raise ConfigError(f"{name}: this model is attention-only (d_mlp = 0): it has no MLP weights")
        return torch.stack([getattr(block.mlp, name) for block in self.blocks])

    _RETURN_TYPES = ("logits", "loss", "both", None)

    def _check_return_type(self, return_type, targets, return_resid: bool) -> None:
        if return_type not in self._RETURN_TYPES:
            raise InputError(f"return_type={return_type!r} is not one of {self._RETURN_TYPES}")
        if return_type != "logits" and return_resid:
            raise InputError("return_resid=True returns (logits, resid): use it with return_type='logits'")
        if targets is not None and return_type not in ("loss", "both"):
            raise InputError("targets= is the loss's labels: pass return_type='loss' or 'both' with it")

    def _tl_return(self, logits: torch.Tensor, x: torch.Tensor, return_type, targets, readout: str):
        if return_type is None:
            return None
        loss = self._tl_loss(logits, x, targets, readout)
        return loss if return_type == "loss" else (logits, loss)

    def _tl_loss(self, logits: torch.Tensor, x: torch.Tensor, targets, readout: str) -> torch.Tensor:
        """Mean cross-entropy. With `targets` (a classifier's labels: [batch] for a first/last read-out,
        [batch, pos] for "all"), against them; without, TransformerLens's next-token loss, which needs
        token inputs, readout "all" and d_vocab_out == d_vocab (pad positions are not masked)."""
        if targets is not None:
            want = tuple(logits.shape[:-1])
            if tuple(targets.shape) != want or targets.dtype != torch.long:
                raise InputError(f"targets must be long {want} (one label per read-out), got "
                                 f"{targets.dtype} {tuple(targets.shape)}")
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device))
        if readout != "all" or self.cfg.d_input or self.cfg.d_vocab_out != self.cfg.d_vocab:
            raise InputError("return_type='loss' without targets= is TransformerLens's next-token loss: it needs "
                             "token inputs, readout='all' and d_vocab_out == d_vocab; for a classifier pass "
                             "targets= (the labels)")
        log_probs = logits[:, :-1].log_softmax(-1)  # [batch, pos - 1, d_vocab]
        return -log_probs.gather(-1, x[:, 1:, None]).mean()

    def _run_with_cache_unbatched(self, args, kwargs, **cache_kwargs):
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] != 1:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"remove_batch_dim=True needs a batch of one, got input {shape}")
        out, cache = self.run_with_cache(*args, **cache_kwargs, **kwargs)
        return out, ActivationCache({name: cache[name][0] for name in cache}, self)


def _warn_causal_first_readout(cfg: TransformerConfig) -> None:
    """Under causal attention position 0 attends only to itself, so a "first" read-out sees the first
    token alone: a TL checkpoint (causal by default) read that way measures nothing of the rest."""
    if cfg.attention == "causal" and cfg.readout == "first":
        import warnings

        warnings.warn("readout='first' with causal attention: position 0 sees only the first token, so the "
                      "read-out ignores the rest of the sequence (read 'last', or use attention='bidirectional' "
                      "if the model was trained that way)", UserWarning, stacklevel=3)

