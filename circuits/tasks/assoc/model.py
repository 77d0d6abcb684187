"""The model family of seed 004 (associative memory in attention-only transformers).

Dana, Pydi & Chevaleyre, "Memorization in Attention-only Transformers" (AISTATS 2025), study

    T(t) = W_U ( e(t_S) + pos_S + sum_h W_O^h W_V^h A^h(t) )

token and position embeddings of width d, H parallel heads of width d_h reading the whole context
(t_1..t_S) and writing into the residual at the last position, no LayerNorm and no biases, an optional
MLP after the heads. The seed's code adds switches: drop the residual connection around the heads,
feed the query/key or the value side with the position embedding only or the token stream only, and
freeze the embedding, the Q/K/V weights, W_O or the unembedding during training.

The authors' architecture (their repository leodana2000/Transformer_Attentional_Memory, `models.py`,
class `Transformer`, which `experiments.ipynb` builds for every experiment through `AoT(d, N, 1, H,
d_h, 1, 3, pi)`), ``head_maps="shared"`` (the default):

* ``__init__``: `word_emb` Linear(d, N) and `unemb` Linear(d, N) (bias-free, PyTorch's default
  uniform +-1/sqrt(d)); `pos_emb` Linear(d_h, context) -- positions have the *head* width d_h; H
  `nn.MultiheadAttention(d_h, 1, bias=False)` in parallel (Xavier in_proj [3 d_h, d_h], out_proj
  d_h -> d_h, +-1/sqrt(d_h)); one `linear_compress` Linear(d, d_h) and one `linear_decompress`
  Linear(d_h, d) shared by all heads; the MLP is Linear(d, W, bias) -> GELU -> Linear(W, d, no bias).
* ``forward``: compressed = compress(res) + pos when d != d_h, else res + pos (positions never enter
  the residual: ``pos_in_residual=False``); the H modules' outputs are summed in the d_h space and
  decompressed once; res = decompressed + res; then the MLP (residual); logits = unemb(res).

So for d = d_h there are no maps and each head owns its d_h -> d output map: exactly our
HookedTransformer layout (the experiment-1 references are unchanged). For d != d_h the heads share a
d_h-dimensional bottleneck: the attention's total contribution has rank <= d_h, not min(H d_h, d).
Here that is `W_compress` [d, d_h] and `W_decompress` [d_h, d] on the model, the attention of width
d_h (W_Q/K/V [H, d_h, d_h], W_O [H, d_h, d_h]) and W_pos [S, d_h].
``head_maps="per_head"`` keeps our earlier form under its own name: each head maps d -> d_h -> d
itself (W_Q [H, d, d_h], W_O [H, d_h, d]) and positions have width d. The two coincide when d = d_h,
so `to_dict` leaves the field out there (the store keys of d = d_h models are unchanged).

`AssocTransformer` is our `HookedTransformer` (same hook names, weight names and layouts, same state
dict) plus those switches. With the default switches its forward *is* the parent's (tested: identical
logits); a switch only changes what the attention reads or whether the residual is kept:

* ``qk_input`` / ``ov_input``: "both" (ln1 of the residual, i.e. token + position), "token" (the
  residual without the position embedding) or "position" (the position embedding alone);
* ``residual=False``: the block returns the attention output alone (the seed's skip_res_connection);
* ``pos_in_residual=False``: the seed code's variant where positions enter only the attention
  inputs and never the residual stream (the paper's formula, and our default, keeps pos_S);
* ``freeze``: any of "E", "pos", "QKV", "O", "U" (requires_grad off after initialisation);
* ``biases=False`` (default, the paper's model): b_Q/b_K/b_V, b_O and b_U are kept at zero and frozen,
  so the logits are W_U times a d-dimensional vector and have rank <= d (what Proposition 1 needs);
* ``init="torch"`` (default): PyTorch's default scales for the seed's modules (nn.Linear embeddings,
  nn.MultiheadAttention's Xavier Q/K/V and Linear output), which is what the paper's sweeps started
  from; ``init="normal"`` is the parent's N(0, init_range).
* ``mlp_depth`` > 1: an MLP with that many hidden layers of width d_mlp (GELU), as the seed's.

`build_model(cfg)` builds it from an `AssocConfig`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from circuits.errors import ConfigError, InputError
from circuits.model.hooks import HookPoint
from circuits.model.transformer import MLP, Attention, AttentionMask, HookedTransformer, PosEmbed, TransformerBlock, TransformerConfig

Source = Literal["both", "token", "position"]
FREEZABLE = ("E", "pos", "QKV", "O", "U")
_SOURCES = ("both", "token", "position")


@dataclass
class AssocConfig:
    """One member of the family. Field names follow the paper: N tokens, S context tokens, d, H, d_h."""

    d_vocab: int  # N: tokens in the vocabulary (inputs and outputs)
    n_ctx: int  # S: context length; the model predicts the next token at position S - 1
    d_model: int  # d: width of the embeddings and the residual stream
    n_heads: int  # H: parallel attention heads
    d_head: int  # d_h: width of each head
    n_layers: int = 1
    d_mlp: int = 0  # MLP width; 0 = attention-only
    mlp_depth: int = 1  # hidden layers of the MLP (the seed's `depth`)
    act_fn: Literal["relu", "gelu", "gelu_new"] = "gelu"  # the seed's MLP uses GELU
    normalization: Optional[Literal["LN"]] = None  # the paper's AoT has no LayerNorm
    attention: Literal["bidirectional", "causal"] = "causal"
    residual: bool = True  # False = the seed's skip_res_connection: resid_post = attention output
    qk_input: Source = "both"  # what queries and keys read
    ov_input: Source = "both"  # what values read
    pos_in_residual: bool = True  # False = positions only enter attention inputs (the seed's code)
    biases: bool = False  # False = no b_QKV / b_O / b_U (kept at zero, frozen), as the paper
    freeze: tuple = ()  # subset of FREEZABLE, frozen after initialisation
    init: Literal["torch", "normal"] = "torch"
    init_range: float = 0.02  # std of init="normal"
    seed: Optional[int] = None
    # "shared": the authors' one d -> d_h compression and one d_h -> d decompression around all heads
    # (models.py); "per_head": each head owns its maps (our earlier form). Same model when d = d_h.
    head_maps: Literal["shared", "per_head"] = "shared"

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.freeze, str):
            problems.append(f"freeze={self.freeze!r} must be a tuple of group names, e.g. ('E', 'U')")
        elif all(f in FREEZABLE for f in self.freeze):  # canonical order, so equal configs hash alike
            self.freeze = tuple(sorted(set(self.freeze), key=FREEZABLE.index))
        for f in ("d_vocab", "n_ctx", "d_model", "n_heads", "d_head", "n_layers", "mlp_depth"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                problems.append(f"{f}={v!r} must be a positive integer")
        if isinstance(self.d_mlp, bool) or not isinstance(self.d_mlp, int) or self.d_mlp < 0:
            problems.append(f"d_mlp={self.d_mlp!r} must be an integer >= 0")
        if self.mlp_depth > 1 and self.d_mlp == 0:
            problems.append(f"mlp_depth={self.mlp_depth} needs an MLP (d_mlp > 0)")
        for f in ("qk_input", "ov_input"):
            if getattr(self, f) not in _SOURCES:
                problems.append(f"{f}={getattr(self, f)!r} is not one of {_SOURCES}")
        bad = [] if isinstance(self.freeze, str) else [f for f in self.freeze if f not in FREEZABLE]
        if bad:
            problems.append(f"freeze={self.freeze!r}: {bad} not in {FREEZABLE}")
        if self.init not in ("torch", "normal"):
            problems.append(f"init={self.init!r} is not 'torch' or 'normal'")
        if self.head_maps not in ("shared", "per_head"):
            problems.append(f"head_maps={self.head_maps!r} is not 'shared' or 'per_head'")
        elif self.compressed and not problems:
            # the authors' forward adds positions after compression and reads the whole residual
            if self.pos_in_residual:
                problems.append("head_maps='shared' with d_model != d_head adds positions (width d_head) to the "
                                "compressed residual only: set pos_in_residual=False, or head_maps='per_head'")
            if self.qk_input != "both" or self.ov_input != "both":
                problems.append("head_maps='shared' with d_model != d_head has no qk_input/ov_input switches")
            if self.init != "torch":
                problems.append("head_maps='shared' with d_model != d_head uses init='torch' (the authors')")
        if problems:
            raise ConfigError("inconsistent AssocConfig: " + "; ".join(problems))

    @property
    def compressed(self) -> bool:
        """The authors' shared d -> d_h -> d maps are in the model (head_maps="shared", d != d_h)."""
        return self.head_maps == "shared" and self.d_model != self.d_head

    @property
    def is_plain(self) -> bool:
        """True when the forward is exactly HookedTransformer's (no switch changes the data flow)."""
        return (self.residual and self.qk_input == "both" and self.ov_input == "both" and self.pos_in_residual
                and self.mlp_depth == 1 and not self.compressed)

    def transformer_config(self) -> TransformerConfig:
        """The parent's config: the architecture without the switches."""
        return TransformerConfig(n_layers=self.n_layers, d_model=self.d_model, n_ctx=self.n_ctx,
                                 n_heads=self.n_heads, d_head=self.d_head, d_mlp=self.d_mlp,
                                 d_vocab=self.d_vocab, act_fn=self.act_fn, normalization=self.normalization,
                                 attention=self.attention, positional="learned", readout="last",
                                 init_range=self.init_range, seed=self.seed)

    def n_params(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in build_model(self).parameters() if p.requires_grad or not trainable_only)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["freeze"] = list(self.freeze)
        if self.d_model == self.d_head:  # both forms are one model: keys of d = d_h models unchanged
            del d["head_maps"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AssocConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown AssocConfig fields {unknown}")
        d = dict(d)
        if "freeze" in d:
            d["freeze"] = tuple(d["freeze"])
        return cls(**d)


class SplitAttention(Attention):
    """Attention whose queries/keys and values may read different inputs (same weights and hooks)."""

    def forward(self, x: torch.Tensor, mask: AttentionMask, x_v: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x_v is None or x_v is x:
            return super().forward(x, mask)
        B, P = max(x.shape[0], x_v.shape[0]), x.shape[1]
        h, d = self.n_heads, self.d_head
        x_v = x_v.expand(B, -1, -1)  # a position-only input arrives as [1, pos, d_model]
        x = x.expand(B, -1, -1)
        qk = F.linear(x, self.W_QKV[:2].reshape(2 * h * d, -1), self.b_QKV[:2].reshape(-1))  # [b, p, 2*h*d]
        q, k = qk.view(B, P, 2, h, d).unbind(2)  # each [batch, pos, head, d_head]
        v = F.linear(x_v, self.W_QKV[2].reshape(h * d, -1), self.b_QKV[2].reshape(-1)).view(B, P, h, d)
        z = self._explicit_attention(q, k, v, mask)  # [batch, pos, head, d_head]
        if self.hook_result.fns:
            result = self.hook_result(torch.einsum("bphd,hdm->bphm", z, self.W_O))  # [b, p, head, d_model]
            return result.sum(2) + self.b_O
        return F.linear(z.reshape(B, P, h * d), self.W_O.view(h * d, -1).t(), self.b_O)  # [b, p, d_model]


class DeepMLP(nn.Module):
    """The seed's MLP: Linear(d, w) -> act -> [Linear(w, w) -> act] * (depth - 1) -> Linear(w, d).

    W_in / b_in / W_out / b_out keep the parent MLP's names; the hidden layers are W_hidden[i].
    hook_pre is the first layer's pre-activation, hook_post the last hidden layer's activation.
    """

    def __init__(self, cfg: TransformerConfig, depth: int):
        super().__init__()
        w = cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, w))  # [d_model, d_mlp]
        self.b_in = nn.Parameter(torch.zeros(w))  # [d_mlp]
        self.W_hidden = nn.ParameterList(nn.Parameter(torch.empty(w, w)) for _ in range(depth - 1))  # [d_mlp, d_mlp]
        self.b_hidden = nn.ParameterList(nn.Parameter(torch.zeros(w)) for _ in range(depth - 1))  # [d_mlp]
        self.W_out = nn.Parameter(torch.empty(w, cfg.d_model))  # [d_mlp, d_model]
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))  # [d_model]
        self.act = MLP(cfg).act
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # [batch, pos, d_mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.hook_pre(F.linear(x, self.W_in.t(), self.b_in)))  # [batch, pos, d_mlp]
        for W, b in zip(self.W_hidden, self.b_hidden):
            h = self.act(F.linear(h, W.t(), b))
        h = self.hook_post(h)
        return F.linear(h, self.W_out.t(), self.b_out)  # [batch, pos, d_model]


class AssocBlock(TransformerBlock):
    """A block with the seed's switches; with none active it defers to TransformerBlock.forward."""

    def __init__(self, cfg: TransformerConfig, acfg: AssocConfig):
        super().__init__(cfg)
        # compressed: the heads read and write the d_h-wide compressed stream (the authors' modules)
        self.attn = SplitAttention(replace(cfg, d_model=acfg.d_head) if acfg.compressed else cfg)
        if acfg.mlp_depth > 1:
            self.mlp = DeepMLP(cfg, acfg.mlp_depth)
        self.acfg = acfg

    def _input(self, source: str, resid_pre: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        a = self.acfg
        if source == "position":
            return pos  # [1, pos, d_model]
        if source == "token":
            return self.ln1(resid_pre - pos if a.pos_in_residual else resid_pre)
        return self.ln1(resid_pre) if a.pos_in_residual else self.ln1(resid_pre) + pos

    def forward(self, resid_pre: torch.Tensor, mask: AttentionMask, pos: Optional[torch.Tensor] = None,
                maps: Optional[tuple] = None) -> torch.Tensor:
        a = self.acfg
        if a.is_plain or pos is None:
            return super().forward(resid_pre, mask)
        resid_pre = self.hook_resid_pre(resid_pre)  # [batch, pos, d_model]
        if a.compressed:  # models.py forward: compress(res) + pos -> sum of heads -> decompress
            W_compress, W_decompress = maps
            x = self.ln1(resid_pre) @ W_compress + pos  # [batch, pos, d_head]
            attn_out = self.hook_attn_out(self.attn(x, mask) @ W_decompress)  # [batch, pos, d_model]
        else:
            x_qk = self._input(a.qk_input, resid_pre, pos)
            x_v = x_qk if a.ov_input == a.qk_input else self._input(a.ov_input, resid_pre, pos)
            if x_qk.shape[0] != resid_pre.shape[0] and x_v is x_qk:  # both position-only
                x_qk = x_v = x_qk.expand(resid_pre.shape[0], -1, -1)
            attn_out = self.hook_attn_out(self.attn(x_qk, mask, x_v))  # [batch, pos, d_model]
        resid_mid = resid_pre + attn_out if a.residual else attn_out
        if not self.has_mlp:
            return self.hook_resid_post(resid_mid)
        resid_mid = self.hook_resid_mid(resid_mid)
        mlp_out = self.hook_mlp_out(self.mlp(self.ln2(resid_mid)))  # [batch, pos, d_model]
        return self.hook_resid_post(resid_mid + mlp_out)


class AssocTransformer(HookedTransformer):
    """HookedTransformer + the seed's switches; reads S tokens and returns [batch, N] next-token logits."""

    def __init__(self, acfg: AssocConfig):
        self.acfg = acfg  # a plain attribute may precede nn.Module.__init__; init_weights reads it
        super().__init__(acfg.transformer_config())
        self.blocks = nn.ModuleList(AssocBlock(self.cfg, acfg) for _ in range(self.cfg.n_layers))
        if acfg.compressed:  # the authors' shared maps (one pair for all heads and layers) and d_h-wide positions
            self.pos_embed = PosEmbed(replace(self.cfg, d_model=acfg.d_head))  # [n_ctx, d_head]
            self.W_compress = nn.Parameter(torch.empty(acfg.d_model, acfg.d_head))  # [d_model, d_head]
            self.W_decompress = nn.Parameter(torch.empty(acfg.d_head, acfg.d_model))  # [d_head, d_model]
        if not acfg.biases:  # the authors' modules are bias-free except the MLP's first layer
            for name, p in self.named_parameters():
                if name.endswith(("attn.b_QKV", "attn.b_O", "mlp.b_out")) or name == "unembed.b_U":
                    p.requires_grad_(False)
        self.init_weights(acfg.seed)  # again: the blocks are new
        self._apply_freeze()
        self.setup_hooks()

    def _apply_freeze(self) -> None:
        groups = self.parameter_groups()
        for g in self.acfg.freeze:
            for p in groups[g]:
                p.requires_grad_(False)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The seed's freezable groups: E, pos, QKV, O, U (every layer's Q/K/V in QKV, W_O in O)."""
        return {
            "E": [self.embed.W_E],
            "pos": [self.pos_embed.W_pos],
            "QKV": [b.attn.W_QKV for b in self.blocks],
            "O": [b.attn.W_O for b in self.blocks],
            "U": [self.unembed.W_U],
        }

    # -- the plugin's hook-based mutations, made in the weights: table_logits (the exact evaluation on
    # every context, what the claims score) runs no hooks, so a hook would leave the claims unmutated --

    def weight_mutation(self, name: str, *args: int) -> Optional["AssocTransformer"]:
        """``mean_ablate`` (layer, head), ``mean_ablate_attn`` (layer), ``mean_ablate_mlp`` (layer) of
        :mod:`circuits.claims.mutations` as weight edits: the batch mean over every context (the batch
        table_logits evaluates) at the last position, the only one a one-layer model reads out. None
        (the hooks do it) for another name or a deeper model, which table_logits refuses anyway."""
        if self.acfg.n_layers != 1 or name not in ("mean_ablate", "mean_ablate_attn", "mean_ablate_mlp"):
            return None
        if name == "mean_ablate_mlp":
            return self.without_mlp("mean")
        return self.without_heads(args[1:] if name == "mean_ablate" else range(self.acfg.n_heads), "mean")

    @torch.no_grad()
    def head_output_means(self) -> torch.Tensor:
        """Each head's output at the last position averaged over every context (uniformly): [H, d_out],
        d_out being the attention's output width (d_h for the authors' compressed models, else d).
        Kept until a weight changes (a tensor's version counts its in-place edits): a claim's controls
        and mutations mean-ablate the same reference model several times."""
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        kept = self.__dict__.get("_head_output_means")
        if kept is not None and kept[0] == key:
            return kept[1].clone()
        a = self.acfg
        _, cache = self.run_with_cache(all_contexts(a.d_vocab, a.n_ctx), names=["blocks.0.attn.hook_z"])
        z = cache["blocks.0.attn.hook_z"][:, -1]  # [n_contexts, H, d_h]
        means = torch.einsum("he,hem->hm", z.mean(0), self.blocks[0].attn.W_O)
        self.__dict__["_head_output_means"] = (key, means)
        return means.clone()

    @torch.no_grad()
    def without_heads(self, heads, mode: str = "zero") -> "AssocTransformer":
        """A copy with `heads`' outputs removed ("zero": their W_O zeroed) or replaced by their mean over
        every context ("mean": W_O zeroed, the mean output added to b_O, which no head owns)."""
        if mode not in ("zero", "mean"):
            raise InputError(f"without_heads: mode {mode!r} is not 'zero' or 'mean'")
        H = self.acfg.n_heads
        heads = list(heads)
        if not heads or any(not (isinstance(h, int) and 0 <= h < H) for h in heads):
            raise InputError(f"without_heads: heads {heads} must be a non-empty list in 0..{H - 1}")
        means = self.head_output_means() if mode == "mean" else None
        new = copy.deepcopy(self)
        attn = new.blocks[0].attn
        for h in heads:
            attn.W_O[h].zero_()
            if means is not None:
                attn.b_O.add_(means[h].to(attn.b_O.dtype))
        return new

    @torch.no_grad()
    def without_mlp(self, mode: str = "zero") -> "AssocTransformer":
        """A copy with the MLP's output removed ("zero": W_out and b_out zeroed) or replaced by its mean
        over every context at the last position ("mean": W_out zeroed, the mean in b_out)."""
        if mode not in ("zero", "mean"):
            raise InputError(f"without_mlp: mode {mode!r} is not 'zero' or 'mean'")
        a = self.acfg
        if not a.d_mlp:
            raise InputError("without_mlp: the model has no MLP (d_mlp = 0)")
        mean = None
        if mode == "mean":
            _, cache = self.run_with_cache(all_contexts(a.d_vocab, a.n_ctx), names=["blocks.0.hook_mlp_out"])
            mean = cache["blocks.0.hook_mlp_out"][:, -1].mean(0)  # [d]
        new = copy.deepcopy(self)
        mlp = new.blocks[0].mlp
        mlp.W_out.zero_()
        mlp.b_out.zero_()
        if mean is not None:
            mlp.b_out.copy_(mean.to(mlp.b_out.dtype))
        return new

    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """Initialise every trainable weight (frozen ones keep their values, zero biases stay zero)."""
        if self.acfg.init == "normal":
            return HookedTransformer.init_weights(self, seed)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        a = self.acfg
        d_in = a.d_head if a.compressed else a.d_model  # width the heads read
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name == "embed.W_E" or name == "unembed.W_U":
                bound = 1 / math.sqrt(a.d_model)  # nn.Linear(d, N).weight
            elif name == "pos_embed.W_pos":
                bound = 1 / math.sqrt(d_in)  # nn.Linear(d, N) ours; the authors' Linear(d_h, context)
            elif name == "W_compress":
                bound = 1 / math.sqrt(a.d_model)  # linear_compress = nn.Linear(d, d_h)
            elif name == "W_decompress":
                bound = 1 / math.sqrt(a.d_head)  # linear_decompress = nn.Linear(d_h, d)
            elif leaf == "W_QKV":
                bound = math.sqrt(6 / (d_in + 3 * a.d_head))  # Xavier on the stacked [3 d_h, d_in] in_proj
            elif leaf == "W_O":
                bound = 1 / math.sqrt(a.d_head)  # out_proj nn.Linear(d_h, d)
            elif leaf == "b_in":
                bound = 1 / math.sqrt(a.d_model)  # the MLP's first nn.Linear(d, W) keeps its bias
            elif p.ndim >= 2 and not leaf.startswith("b_"):
                bound = 1 / math.sqrt(p.shape[0])  # MLP nn.Linear(fan_in, fan_out): [fan_in, fan_out] here
            elif name.endswith(".w"):
                p.fill_(1.0)
                continue
            else:
                p.zero_()
                continue
            p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) * bound)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                readout: Optional[str] = None, *, start_at_layer: int = 0,
                resid: Optional[torch.Tensor] = None, readout_only: Optional[bool] = None) -> torch.Tensor:
        a = self.acfg
        if a.is_plain:
            return super().forward(x, key_padding_mask, readout, start_at_layer=start_at_layer, resid=resid,
                                   readout_only=readout_only)
        if start_at_layer:
            raise InputError("start_at_layer needs the plain member of the family (no switches)")
        if key_padding_mask is not None:
            raise InputError("AssocTransformer with switches takes no key_padding_mask (sequences are not padded)")
        self._check_input(x)
        resid = self.hook_embed(self.embed(x))  # [batch, pos, d_model]
        pos = self.hook_pos_embed(self.pos_embed(x.shape[1]).expand(x.shape[0], -1, -1))  # [batch, pos, d_model]
        if a.pos_in_residual:
            resid = resid + pos
        mask = self._attention_mask(None, x.shape[1], x.device)
        pos1 = pos[:1]  # [1, pos, d_model or d_head]
        maps = (self.W_compress, self.W_decompress) if a.compressed else None
        for block in self.blocks:
            resid = block(resid, mask, pos1, maps)
        readout = readout or self.cfg.readout
        resid = self._select_readout(resid, None, readout)
        if self.cfg.normalization == "LN":
            resid = self.ln_final(resid)
        logits = self.unembed(resid)
        return logits if readout == "all" else logits[:, 0]


def build_model(acfg: AssocConfig) -> AssocTransformer:
    return AssocTransformer(acfg)


def all_contexts(n_vocab: int, n_ctx: int) -> torch.Tensor:
    """Every context (t_1..t_S) in row-major order: [N^S, S]; row i is i written in base N."""
    grid = torch.arange(n_vocab)
    if n_ctx == 1:
        return grid[:, None]
    return torch.cartesian_prod(*([grid] * n_ctx))


MAX_GRID = 2_000_000  # N^S * H above this: table_logits refuses (use the model's forward in batches)


def table_logits(model: AssocTransformer, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's logits on every context at once: [N^S, N], rows in `all_contexts` order; with
    `rows` (context indices into that order, [B], repeats allowed) only those contexts: [B, N].

    Exactly `model(all_contexts(N, S))` (tested to float tolerance for every switch), computed from
    per-token tables instead of per-sequence activations: with one layer, a query depends only on the
    last token and a key/value only on its own token and position, so Q, K, V and V W_O are tables
    over the N tokens, and only the attention scores and the weighted sum need the N^S grid. That is
    ~10x fewer operations than the forward on N^S sequences for the seed's sizes, with gradients
    (the full-batch trainer uses it). Hooks are not run; one layer only.
    """
    a = model.acfg
    if a.n_layers != 1:
        raise InputError(f"table_logits needs a one-layer model (got n_layers={a.n_layers}); use model(x)")
    hooked = [name for name, hp in model.hook_dict.items() if hp.fns]
    if hooked:  # a hook-based mutation here would leave the table unmutated: a claim could hold vacuously
        raise InputError(f"table_logits runs no hooks, and {', '.join(hooked)} have some: evaluate model(x), "
                         "or make the change in the weights (AssocTransformer.weight_mutation)")
    N, S, H, dh = a.d_vocab, a.n_ctx, a.n_heads, a.d_head
    if rows is not None:
        rows = check_rows(rows, N ** S)
    if N ** S * H > MAX_GRID:
        raise InputError(f"table_logits: N^S * H = {N ** S * H} exceeds {MAX_GRID}; evaluate model(x) in batches")
    block = model.blocks[0]
    attn = block.attn
    E = model.embed.W_E  # [N, d]
    P = model.pos_embed.W_pos[:S]  # [S, d] ([S, d_h] compressed)
    R = E[None] + P[:, None] if a.pos_in_residual else E[None].expand(S, -1, -1)  # resid_pre [S, N, d]

    def source(kind: str) -> torch.Tensor:  # the attention input, [S, N or 1, d]
        if a.compressed:  # the authors' compress(res) + pos: [S, N, d_h]
            return block.ln1(R) @ model.W_compress + P[:, None]
        if kind == "position":
            return P[:, None]
        if kind == "token":
            return block.ln1(R - P[:, None] if a.pos_in_residual else R)
        return block.ln1(R) if a.pos_in_residual else block.ln1(R) + P[:, None]

    X_qk = source(a.qk_input)
    X_v = X_qk if a.ov_input == a.qk_input else source(a.ov_input)
    W_Q, W_K, W_V = attn.W_Q, attn.W_K, attn.W_V  # [H, d, dh]
    W_O = attn.W_O @ model.W_decompress if a.compressed else attn.W_O  # [H, dh, d]: decompression is linear
    b_O = attn.b_O @ model.W_decompress if a.compressed else attn.b_O  # [d]
    q = torch.einsum("nd,hde->nhe", X_qk[S - 1], W_Q) + attn.b_Q  # [N or 1, H, dh] (last token)
    k = torch.einsum("snd,hde->snhe", X_qk, W_K) + attn.b_K  # [S, N or 1, H, dh]
    vo = torch.einsum("snd,hde,hem->snhm", X_v, W_V, W_O) + torch.einsum(
        "he,hem->hm", attn.b_V, W_O)  # [S, N or 1, H, d]: each value already through its head's W_O

    def on_axes(t: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        """View a [n_a, (n_b,) ...rest] tensor on the S grid axes `axes` (others singleton)."""
        shape = [1] * S
        for i, ax in enumerate(axes):
            shape[ax] = t.shape[i]
        return t.reshape(*shape, *t.shape[len(axes):])

    scale = 1.0 / math.sqrt(dh)
    scores = []
    for p in range(S - 1):  # score of key position p < S: q(t_S) . k_p(t_p), on grid axes (p, S)
        scores.append(on_axes(torch.einsum("ahe,bhe->abh", k[p], q) * scale, (p, S - 1)))
    scores.append(on_axes((k[S - 1] * q).sum(-1) * scale, (S - 1,)))  # the last token with itself
    grid = torch.broadcast_shapes(*(s.shape for s in scores))
    scores = torch.stack([s.expand(grid) for s in scores])  # [S, N.., H]
    pattern = (scores - scores.amax(0, keepdim=True)).exp()  # softmax over key positions (a size-S
    pattern = pattern / pattern.sum(0, keepdim=True)  # softmax on a non-last axis is slow on CPU)
    letters = "abcdefg"[:S]
    out = b_O
    for p in range(S):  # sum_h pattern[.., h, p] * vo_p[t_p, h, :] without materialising [N.., H, d]
        if vo[p].shape[0] == 1:
            term = torch.einsum(f"{letters}h,hm->{letters}m", pattern[p], vo[p][0])
        else:
            term = torch.einsum(f"{letters}h,{letters[p]}hm->{letters}m", pattern[p], vo[p])
        out = out + term  # [N.., d]
    last = on_axes(R[S - 1], (S - 1,))  # [1.., N, d]
    if rows is not None:  # the attention above costs O(N^S H); what follows costs O(rows d d_mlp + rows N)
        out = out.expand(*([N] * S), -1).reshape(N ** S, -1)[rows]  # [B, d]
        last = R[S - 1][rows % N]  # [B, d]
    resid = last + out if a.residual else out
    if a.d_mlp:
        resid = resid + block.mlp(block.ln2(resid))
    if a.normalization == "LN":
        resid = model.ln_final(resid)
    logits = model.unembed(resid)  # [N.., N] (broadcast up to the full grid), or [B, N] on rows
    if rows is not None:
        return logits
    return logits.expand(*([N] * S), -1).reshape(N ** S, -1)


def check_rows(rows, n_contexts: int) -> torch.Tensor:
    """`rows` as context indices into the `all_contexts` order (a 1-D integer tensor in range), or one
    clear InputError."""
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int64, torch.int32):
        raise InputError(f"rows must be a 1-D integer tensor of context indices, got "
                         f"{getattr(rows, 'shape', type(rows).__name__)} {getattr(rows, 'dtype', '')}".rstrip())
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_contexts):
        raise InputError(f"rows must index the {n_contexts} contexts (0..{n_contexts - 1}), got "
                         f"{int(rows.min())}..{int(rows.max())}")
    return rows.long()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


__all__ = ["AssocConfig", "AssocTransformer", "SplitAttention", "DeepMLP", "AssocBlock", "build_model", "all_contexts", "table_logits", "check_rows",
           "FREEZABLE", "trainable_parameters"]
