"""Vectorised multi-seed training (issue 34): K seeds of one zoo entry trained as one stacked model.

A tiny model's training step is mostly per-kernel overhead (small matrices); K seeds trained one
after another pay it K times. Here every parameter carries a leading ensemble axis [K, ...] and each
op runs once for all K seeds (batched matmuls, one fused AdamW call), so the overhead is paid once.

Each seed is trained as `circuits.zoo.train` would train it alone: its own initialisation
(`entry.new_model(seed)`), its own training / held-out / test data (`train.data_seeds`,
`final_test_seed`), its own batch order (a generator seeded with the seed, drawing the same epochs),
the same learning-rate schedule, per-seed gradient clipping (the global norm of that seed's
gradients), AdamW with the same groups, and its own early stop (a seed that reaches the target
leaves the stack at that evaluation point and is handed back at once). Evaluation and the final
test set run on the seed's own HookedTransformer, with `train.evaluate`, as a single training's do.

What differs from a single training is float rounding only: batched matmuls add in another order,
and on length-bucketed data (brackets) a seed's batch is padded to the longest of the K seeds' batches
at that step (pad keys are masked, pad labels ignored: the same function). `tests/test_ensemble.py`
bounds the gap on a short run; the trained weights are stored under their own key (the spec names
the backend, `BACKEND`), so a seed trained here never stands in for a single training's or back.
Within this backend a seed's weights are bitwise reproducible for the same group of seeds (the
padding depends on the group); the card records the group.

Supported: the HookedTransformer family on token inputs (every built-in transformer task), with
training-time extras given by the entry's `train_fn.ensemble_extras(entry)` (the bracket census's
tutorial-style dropout and embedding scale). Anything else raises NotStackable; the sweep
(`circuits.zoo.sweep.train_stacks`) then trains those seeds one by one with the single trainer.

Given a `checkpoint_root` (the sweep passes its store's root), a stack writes its complete state
there every $CIRCUITS_STACK_CHECKPOINT_S seconds and at each evaluation, and a later stack of the same
seeds resumes from it bitwise (circuits.zoo.stack_checkpoint).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from circuits.devices import check_device
from circuits.errors import CircuitsError, InputError, SettingError
from circuits.zoo import stack_checkpoint
from circuits.zoo.train import (Split, TrainResult, _reached, batches, data_seeds, evaluate, final_test_seed,
                    lr_at)

__all__ = ["BACKEND", "BACKEND_ENV", "NotStackable", "StackedTransformer", "backend", "stackable", "train_stack",
           "train_many", "check_backend"]

BACKEND = "ensemble-1"  # named in the store key of every model this module trains (bump on a change)
BACKEND_ENV = "CIRCUITS_TRAIN_BACKEND"  # "single" (default) or "ensemble": which trainer zoo.load uses
BACKENDS = ("single", "ensemble")


# set by a sweep's stack worker: the most threads one stack may use (the cores over the workers)
MAX_THREADS_ENV = "CIRCUITS_STACK_MAX_THREADS"


class NotStackable(CircuitsError):
    """The entry's model or recipe is outside what the stacked trainer computes."""


def check_backend(value) -> str:
    if value not in BACKENDS:
        raise SettingError(f"training backend {value!r}: use one of {', '.join(BACKENDS)} (${BACKEND_ENV})")
    return value


def backend() -> str:
    """The training backend zoo.load and the sweep use for a model the store lacks ($CIRCUITS_TRAIN_BACKEND)."""
    return check_backend(os.environ.get(BACKEND_ENV, "single") or "single")


# ------------------------------------------------------------------------------------------- the model


def stackable(entry) -> Optional[str]:
    """None when `entry` can be trained here, else why not (one line)."""
    from circuits.model.transformer import TransformerConfig

    cfg = entry.config
    if entry.build_model is not None or not isinstance(cfg, TransformerConfig):
        return f"{entry.name}: not the HookedTransformer family"
    if entry.train_fn is not None and not hasattr(entry.train_fn, "ensemble_extras"):
        return f"{entry.name}: its train_fn has no ensemble_extras"
    if entry.make_split is None:
        return f"{entry.name}: no make_split"
    if cfg.d_input:
        return f"{entry.name}: vector inputs (read-in) are not stacked"
    if entry.recipe.loss not in ("ce", "mse"):
        return f"{entry.name}: loss {entry.recipe.loss!r}"
    return None


class StackedTransformer:
    """K HookedTransformers' parameters stacked on a leading axis, and their forward as batched ops.

    params: name -> [K, *shape] leaf tensors, named as HookedTransformer.named_parameters(); frozen
    ones (sinusoidal W_pos, one-hot embeddings) are stacked too, without gradients. The forward is the
    HookedTransformer's fast path restated with an ensemble axis; tests/test_ensemble.py checks it
    against K separate models to float tolerance."""

    def __init__(self, models: Sequence[torch.nn.Module], device: str = "cpu"):
        self.cfg = models[0].cfg
        self.names = [n for n, _ in models[0].named_parameters()]
        self.trainable = {n for n, p in models[0].named_parameters() if p.requires_grad}
        self.shapes = {n: tuple(p.shape) for n, p in models[0].named_parameters()}
        self.params = {}
        for n in self.names:
            stacked = torch.stack([dict(m.named_parameters())[n].detach() for m in models]).to(device)
            self.params[n] = stacked.requires_grad_(n in self.trainable)

    def subset(self, rows: torch.Tensor) -> "StackedTransformer":
        """The seeds `rows` ([K'] index) as a stack whose parameters are differentiable gathers of
        this one's (a step on a width group: gradients flow back into the full stack)."""
        sub = object.__new__(StackedTransformer)
        sub.cfg, sub.names, sub.trainable, sub.shapes = self.cfg, self.names, self.trainable, self.shapes
        sub.params = {n: p.index_select(0, rows) for n, p in self.params.items()}
        return sub

    @property
    def K(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def keep(self, rows: torch.Tensor) -> dict:
        """Drop the seeds not in `rows` (a [K'] index): returns old param -> new param, for the optimiser."""
        moved = {}
        for n in self.names:
            old = self.params[n]
            new = old.detach()[rows].clone().requires_grad_(n in self.trainable)
            moved[old] = new
            self.params[n] = new
        return moved

    def write_into(self, k: int, model: torch.nn.Module) -> torch.nn.Module:
        """Seed k's weights copied into `model` (a HookedTransformer of the same config), on the CPU."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(self.params[n][k].detach().to(p.device))
        return model

    # --- forward --------------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, readout: Optional[str] = None, readout_only: bool = False,
                extras: Optional["Extras"] = None, widths: Optional[list] = None) -> torch.Tensor:
        """tokens: [K, batch, pos] -> logits [K, batch, d_vocab_out] (first/last) or [K, batch, pos, d_vocab_out]."""
        cfg, p = self.cfg, self.params
        K, B, P = tokens.shape
        readout = readout or cfg.readout
        pad = None
        if cfg.pad_token is not None:
            pad = tokens == cfg.pad_token  # [K, batch, pos]
            if not bool(pad.any()):
                pad = None
        offsets = (torch.arange(K, device=tokens.device) * cfg.d_vocab)[:, None, None]  # [K, 1, 1]
        W_E = p["embed.W_E"]  # [K, d_vocab, d_model]
        resid = F.embedding(tokens.long() + offsets, W_E.reshape(K * cfg.d_vocab, -1))  # [K, batch, pos, d_model]
        if extras is not None and extras.embed_scale != 1.0:
            resid = resid * extras.embed_scale
        if cfg.positional != "none":
            resid = resid + p["pos_embed.W_pos"][:, None, :P]  # [K, 1, pos, d_model]
        allowed = None  # [K*batch, 1, 1, key_pos] True = may attend (fully masked rows opened)
        if pad is not None or cfg.attention == "causal":
            blocked = (pad if pad is not None else torch.zeros(K, B, P, dtype=torch.bool, device=tokens.device))
            blocked = blocked.reshape(K * B, 1, 1, P)
            if cfg.attention == "causal":
                blocked = blocked | torch.ones(P, P, dtype=torch.bool, device=tokens.device).triu(1)
            allowed = ~blocked
            allowed = allowed | ~allowed.any(-1, keepdim=True)
        if extras is not None:
            resid = extras.dropout(resid, widths)
        explicit = extras is not None and extras.p > 0
        n = cfg.n_layers
        fast_last = readout_only and readout != "all" and not explicit and (readout == "first" or pad is None)
        for layer in range(n):
            at = None
            if fast_last and layer == n - 1:
                at = 0 if readout == "first" else P - 1
            resid = self._block(layer, resid, allowed, at, extras, widths)  # [K, batch, pos or 1, d_model]
        if resid.shape[2] != 1 and readout != "all":
            if readout == "first":
                resid = resid[:, :, :1]
            elif pad is None:
                resid = resid[:, :, -1:]
            else:
                last = (~pad).long().cumsum(-1).argmax(-1)  # [K, batch]
                resid = resid.gather(2, last[:, :, None, None].expand(-1, -1, 1, resid.shape[-1]))
        if cfg.normalization == "LN":
            resid = self._ln("ln_final", resid)
        W_U, b_U = p["unembed.W_U"], p["unembed.b_U"]  # [K, d_model, d_vocab_out], [K, d_vocab_out]
        shape = resid.shape
        logits = torch.baddbmm(b_U[:, None], resid.reshape(K, -1, shape[-1]), W_U).view(*shape[:-1], -1)
        return logits[:, :, 0] if readout != "all" else logits

    def _ln(self, name: str, x: torch.Tensor) -> torch.Tensor:
        w, b = self.params[f"{name}.w"], self.params[f"{name}.b"]  # [K, d_model]
        y = F.layer_norm(x, (x.shape[-1],), eps=self.cfg.ln_eps)
        view = (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],)
        return torch.addcmul(b.view(view), y, w.view(view))

    def _block(self, layer: int, resid: torch.Tensor, allowed, at: Optional[int], extras, widths) -> torch.Tensor:
        cfg, p = self.cfg, self.params
        pre = f"blocks.{layer}."
        K, B, P, D = resid.shape
        h, d = cfg.n_heads, cfg.d_head
        x = self._ln(pre + "ln1", resid) if cfg.normalization == "LN" else resid
        W_QKV = p[pre + "attn.W_QKV"].reshape(K, 3 * h * d, D)  # [K, 3*h*d, d_model]
        b_QKV = p[pre + "attn.b_QKV"].reshape(K, 1, 3 * h * d)
        qkv = torch.baddbmm(b_QKV, x.reshape(K, B * P, D), W_QKV.transpose(1, 2))  # [K, batch*pos, 3*h*d]
        q, k, v = qkv.view(K * B, P, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [K*batch, head, pos, d_head]
        if at is not None:
            q = q[:, :, at:at + 1]  # [K*batch, head, 1, d_head]
        mask = allowed
        if mask is not None and at is not None:
            mask = mask[:, :, at:at + 1] if mask.shape[2] != 1 else mask
        if extras is not None and extras.p > 0:  # explicit: dropout acts on the pattern
            scale = 1.0 / math.sqrt(d)
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [K*batch, head, q, k]
            if mask is not None:
                scores = scores.masked_fill(~mask, -1e5)
            pattern = scores.softmax(-1).view(K, B, h, P, P)
            pattern = extras.dropout(pattern, widths, square=True).view(K * B, h, P, P)
            z = torch.matmul(pattern, v)
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=False)  # [K*batch, head, pos or 1, d_head]
        Q = z.shape[2]
        z = z.transpose(1, 2).reshape(K, B * Q, h * d)
        W_O = p[pre + "attn.W_O"].reshape(K, h * d, D)
        attn_out = torch.baddbmm(p[pre + "attn.b_O"][:, None], z, W_O).view(K, B, Q, D)
        if extras is not None:
            attn_out = extras.dropout(attn_out, widths)
        base = resid if at is None else resid[:, :, at:at + 1]
        resid_mid = base + attn_out
        if cfg.d_mlp <= 0:
            return resid_mid
        x = self._ln(pre + "ln2", resid_mid) if cfg.normalization == "LN" else resid_mid
        W_in, W_out = p[pre + "mlp.W_in"], p[pre + "mlp.W_out"]  # [K, d_model, d_mlp], [K, d_mlp, d_model]
        hidden = torch.baddbmm(p[pre + "mlp.b_in"][:, None], x.reshape(K, B * Q, D), W_in)
        hidden = _ACT[cfg.act_fn](hidden).view(K, B, Q, -1)
        if extras is not None:
            hidden = extras.dropout(hidden, widths)
        mlp_out = torch.baddbmm(p[pre + "mlp.b_out"][:, None], hidden.reshape(K, B * Q, -1), W_out).view(K, B, Q, D)
        if extras is not None:
            mlp_out = extras.dropout(mlp_out, widths)
        return resid_mid + mlp_out


_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class Extras:
    """Training-time extras of a stacked training (what a family's train_fn adds by hooks on a single
    model): token embeddings times `embed_scale`; dropout `p` at the tutorial scaffold's sites, its
    masks drawn from each seed's own generator with that seed's own batch shape, in the single
    training's hook order (so a seed gets the same masks as alone)."""

    embed_scale: float = 1.0
    p: float = 0.0
    gens: list = field(default_factory=list)  # one torch.Generator per stacked seed
    training: bool = True

    def keep(self, rows: list) -> None:
        self.gens = [self.gens[i] for i in rows]

    def subset(self, rows: list) -> "Extras":
        return Extras(self.embed_scale, self.p, [self.gens[i] for i in rows], self.training)

    def dropout(self, x: torch.Tensor, widths: Optional[list], square: bool = False) -> torch.Tensor:
        """x: [K, batch, pos, ...] or, square, [K, batch, head, pos, pos]; widths: each seed's own
        (rows, pos) of its batch before padding (its masks have that shape, as when it trains alone)."""
        if not self.training or self.p == 0.0:
            return x
        masks = torch.ones(x.shape, dtype=x.dtype)  # padded rows / positions keep 1 (they carry no loss)
        for k, gen in enumerate(self.gens):
            n, w = (x.shape[1], x.shape[3 if square else 2]) if widths is None else widths[k]
            if square:
                target = masks[k, :n, :, :w, :w]
            else:
                target = masks[k, :n, :min(w, x.shape[2])]
            if target.is_contiguous():  # the seed's whole slot: drawn in place, the same numbers as below
                target.bernoulli_(1.0 - self.p, generator=gen)
            else:
                target.copy_(torch.empty(target.shape, dtype=x.dtype).bernoulli_(1.0 - self.p, generator=gen))
        return x * masks.to(x.device) / (1.0 - self.p)


# ------------------------------------------------------------------------------------------- training


def _stack_batches(parts: list, pad_token: Optional[int], batch_size: int):
    """Each seed's batch (a Split) -> (inputs [K, batch, pos], targets [K, batch(, pos)], row weights
    [K, batch], widths): rows padded to `batch_size` (weight 0), positions to the longest batch."""
    width = max(b.inputs.shape[1] for b in parts)
    widths = [(b.inputs.shape[0], b.inputs.shape[1]) for b in parts]  # each seed's own (rows, pos)
    rows = max(batch_size, max(len(b) for b in parts))
    inputs, targets, weights = [], [], []
    for b in parts:
        x, t = b.inputs, b.targets
        n, w = x.shape[0], x.shape[1]
        if w < width or n < rows:
            if w < width and pad_token is None:
                raise NotStackable("batches of different widths need a pad token")
            fill = pad_token if pad_token is not None else 0
            x = torch.cat([x, torch.full((n, width - w), fill, dtype=x.dtype, device=x.device)], 1)
            x = torch.cat([x, torch.full((rows - n, width), fill, dtype=x.dtype, device=x.device)], 0)
            if t.ndim == 2:
                t = torch.cat([t, torch.full((n, width - w), -1, dtype=t.dtype, device=t.device)], 1)
                t = torch.cat([t, torch.full((rows - n, width), -1, dtype=t.dtype, device=t.device)], 0)
            else:
                t = torch.cat([t, torch.zeros(rows - n, dtype=t.dtype, device=t.device)], 0)
        wt = torch.zeros(rows, device=x.device)
        wt[:n] = 1.0
        inputs.append(x)
        targets.append(t)
        weights.append(wt)
    return torch.stack(inputs), torch.stack(targets), torch.stack(weights), widths


WIDTH_SLACK = 1.25  # a width group's longest batch is at most this times its shortest, plus 2 positions


def width_groups(widths: Sequence[int]) -> list:
    """The seeds of one step (by their batch widths) in groups of similar width, each run as one
    stacked forward padded to its own longest batch: padding all K batches to the longest of all cost
    the bracket model about 2x its compute (bucketed batches run from 4 to 42 positions). Equal widths
    (unbucketed data) give one group. Deterministic in the widths."""
    order = sorted(range(len(widths)), key=lambda j: (widths[j], j))
    groups, current, first = [], [], None
    for j in order:
        if current and widths[j] > first * WIDTH_SLACK + 2:
            groups.append(sorted(current))
            current = []
        if not current:
            first = widths[j]
        current.append(j)
    groups.append(sorted(current))
    return groups


def _per_seed_loss(stack: StackedTransformer, inputs, targets, weights, recipe, extras, widths) -> torch.Tensor:
    """Each seed's mean training loss, as train.compute_loss computes it for that seed alone: [K]."""
    cfg = stack.cfg
    K, B = inputs.shape[:2]
    if recipe.aux_weight and targets.ndim == 3:
        if recipe.loss != "ce" or cfg.readout not in ("first", "last"):
            raise InputError("auxiliary targets need loss='ce' and a first/last read-out")
        out = stack.forward(inputs, readout="all", extras=extras, widths=widths)  # [K, batch, pos, classes]
        if cfg.readout == "first":
            at = torch.zeros(K, B, dtype=torch.long, device=inputs.device)
        else:
            pad = inputs == cfg.pad_token if cfg.pad_token is not None else torch.zeros_like(inputs, dtype=torch.bool)
            at = (~pad).long().cumsum(-1).argmax(-1)  # [K, batch]
        C = out.shape[-1]
        main_logits = out.gather(2, at[:, :, None, None].expand(-1, -1, 1, C))[:, :, 0]  # [K, batch, classes]
        main_t = targets.gather(2, at[:, :, None])[:, :, 0].clamp_min(0)  # [K, batch] (padded rows: weight 0)
        main = F.cross_entropy(main_logits.reshape(K * B, C), main_t.reshape(-1), reduction="none").view(K, B)
        main = (main * weights).sum(1) / weights.sum(1)
        aux_t = targets.scatter(2, at[:, :, None], -1)  # [K, batch, pos]
        keep = (aux_t >= 0).float()
        aux = F.cross_entropy(out.reshape(-1, C), aux_t.clamp_min(0).reshape(-1), reduction="none").view_as(keep)
        n_aux = keep.sum((1, 2))
        aux = (aux * keep).sum((1, 2)) / n_aux.clamp_min(1.0)
        return main + recipe.aux_weight * torch.where(n_aux > 0, aux, torch.zeros_like(aux))
    out = stack.forward(inputs, readout_only=bool(recipe.readout_only), extras=extras, widths=widths)
    if recipe.loss == "ce":
        if targets.ndim == 3:  # per-position classification: out [K, batch, pos, classes]
            C = out.shape[-1]
            keep = (targets >= 0).float()
            ce = F.cross_entropy(out.reshape(-1, C), targets.clamp_min(0).reshape(-1), reduction="none").view_as(keep)
            return (ce * keep).sum((1, 2)) / keep.sum((1, 2))
        C = out.shape[-1]
        ce = F.cross_entropy(out.reshape(K * B, C), targets.reshape(-1), reduction="none").view(K, B)
        return (ce * weights).sum(1) / weights.sum(1)
    err = (out.squeeze(-1) - targets).pow(2)  # [K, batch]
    return (err * weights).sum(1) / weights.sum(1)


def _optimizer_order(stack: StackedTransformer) -> list:
    """The trainable parameters in the optimiser's order: decayed (matrices) first, then the rest."""
    decay = [stack.params[n] for n in stack.names if n in stack.trainable and len(stack.shapes[n]) >= 2]
    no_decay = [stack.params[n] for n in stack.names if n in stack.trainable and len(stack.shapes[n]) < 2]
    return decay + no_decay


def _make_optimizer(stack: StackedTransformer, recipe):
    decay = [stack.params[n] for n in stack.names if n in stack.trainable and len(stack.shapes[n]) >= 2]
    no_decay = [stack.params[n] for n in stack.names if n in stack.trainable and len(stack.shapes[n]) < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=tuple(recipe.betas), **({"fused": True} if recipe.fused_adamw else {"foreach": True}))


def _rebuild_optimizer(old, stack: StackedTransformer, moved: dict, rows: torch.Tensor, recipe):
    new = _make_optimizer(stack, recipe)
    for old_p, new_p in moved.items():
        state = old.state.get(old_p)
        if not state:
            continue
        new.state[new_p] = {k: (v if k == "step" else v[rows].clone()) for k, v in state.items()}
    return new


def _clip_per_seed(params: list, max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ applied to each seed's own gradients (the ensemble axis is dim 0)."""
    grads = [p.grad for p in params if p.grad is not None]
    K = grads[0].shape[0]
    norms = torch.stack([torch.linalg.vector_norm(g.reshape(K, -1), 2.0, dim=1) for g in grads])  # [params, K]
    total = torch.linalg.vector_norm(norms, 2.0, dim=0)  # [K]
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # [K]
    for g in grads:
        g.mul_(coef.view(K, *([1] * (g.ndim - 1))))


@dataclass
class SeedRun:
    """One seed's training state inside the stack."""

    seed: int
    train_split: Split
    eval_split: Split
    gen: torch.Generator
    data_time: float
    epoch: object = None
    epoch_state: Optional[torch.Tensor] = None  # gen's state where the current epoch's draws start
    consumed: int = 0  # batches of the current epoch taken (a resume redraws the epoch and skips them)
    running: float = 0.0
    n_running: int = 0
    result: TrainResult = field(default_factory=TrainResult)


def train_stack(entry, seeds: Sequence[int], *, device: str = "cpu", progress: Optional[Callable] = None,
                on_done: Optional[Callable] = None, checkpoint_root=None, say: Optional[Callable] = None) -> dict:
    """Train `seeds` of `entry` as one stacked model. Returns seed -> (model, card), the cards as
    zoo.train_entry writes them plus ``backend`` and ``ensemble`` (the group). `on_done(seed, model,
    card)` is called as each seed finishes (early stop or the last step), so a long run stores its
    models as they come. `progress(seed, step, total, metrics)` once per evaluation and per seed.
    `checkpoint_root`: a folder (the store's root) for this stack's checkpoints; a checkpoint of these
    seeds found there is resumed from. `say(line)`: resumed / ignored checkpoints (default stderr)."""
    why = stackable(entry)
    if why:
        raise NotStackable(why)
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise InputError(f"ensemble: seeds repeat in {seeds}")
    device = check_device(device)
    recipe = entry.recipe
    threads = recipe.threads or torch.get_num_threads()
    cap = os.environ.get(MAX_THREADS_ENV)
    if cap and cap.isdigit() and int(cap) > 0:  # a sweep worker's share of the cores
        threads = min(threads, int(cap))
    old_threads = torch.get_num_threads()
    ckpt = _Checkpoints(entry, checkpoint_root, say) if checkpoint_root is not None else None
    runs = []
    for seed in seeds:
        train_seed, eval_seed = data_seeds(seed)
        t0 = time.perf_counter()
        tr = (entry.make_train_split or entry.make_split)(recipe.n_train, train_seed)
        ev = entry.make_split(recipe.n_eval, eval_seed)
        runs.append(SeedRun(seed, tr, ev, torch.Generator().manual_seed(seed), time.perf_counter() - t0))
    models = [entry.new_model(s) for s in seeds]
    stack = StackedTransformer(models, device)
    extras = None
    options = getattr(entry.train_fn, "ensemble_extras", None)
    if options is not None:
        opts = dict(options(entry))  # {embed_scale, p, seed_offset}: what the family's train_fn adds
        offset = int(opts.pop("seed_offset", 0))
        extras = Extras(**opts, gens=[torch.Generator().manual_seed(s + offset) for s in seeds])
    resume = ckpt.resume(seeds, runs, stack, extras) if ckpt is not None else None
    out = {}
    torch.set_num_threads(threads)
    try:
        _loop(entry, stack, runs, models, extras, device, progress, on_done, out, ckpt, resume)
    finally:
        torch.set_num_threads(old_threads)
    return out


def stack_step(stack: StackedTransformer, opt, parts: list, recipe, extras, device: str, lr: float) -> list:
    """One optimiser step of every stacked seed on its own batch (parts[k], a Split): the seeds in
    width groups (width_groups), each group one stacked forward; one backward, per-seed clipping, one
    AdamW step. Returns each seed's loss."""
    for group_ in opt.param_groups:
        group_["lr"] = lr
    values = [0.0] * len(parts)
    total = None
    for members in width_groups([b.inputs.shape[1] for b in parts]):
        inputs, targets, weights, widths = _stack_batches([parts[j] for j in members], stack.cfg.pad_token,
                                                          recipe.batch_size)
        inputs, targets, weights = inputs.to(device), targets.to(device), weights.to(device)
        whole = len(members) == len(parts)
        sub = stack if whole else stack.subset(torch.tensor(members, device=device))
        sub_extras = extras if extras is None or whole else extras.subset(members)
        losses = _per_seed_loss(sub, inputs, targets, weights, recipe, sub_extras, widths)  # [group]
        total = losses.sum() if total is None else total + losses.sum()
        for j, v in zip(members, losses.detach().cpu().tolist()):
            values[j] = v
    opt.zero_grad(set_to_none=True)
    total.backward()
    if recipe.grad_clip:
        _clip_per_seed([stack.params[n] for n in stack.names if n in stack.trainable], recipe.grad_clip)
    opt.step()
    return values


def _next_batch(r: SeedRun, recipe) -> torch.Tensor:
    """The seed's next batch of indices, starting a new epoch when one runs out."""
    while True:
        idx = next(r.epoch, None) if r.epoch is not None else None
        if idx is not None:
            r.consumed += 1
            return idx
        r.epoch_state = r.gen.get_state()  # the epoch's draws happen at its first batch, from here
        r.consumed = 0
        r.epoch = batches(r.train_split, recipe.batch_size, r.gen, recipe.bucket_by_length)


def _loop(entry, stack, runs, models, extras, device, progress, on_done, out, ckpt=None, resume=None) -> None:
    recipe = entry.recipe
    group = [r.seed for r in runs] if resume is None else resume["group"]  # the card's group: the first one
    opt = _make_optimizer(stack, recipe)
    step, elapsed = 0, 0.0
    if resume is not None:
        _load_optimizer(opt, resume["opt"])
        step, elapsed = resume["step"], resume["elapsed"]
    start = time.perf_counter() - elapsed  # a resumed stack's clock goes on from its checkpoint's
    active = list(range(len(runs)))  # indices into runs/models of the seeds still in the stack
    while active and step < recipe.steps:
        parts = [runs[i].train_split.batch(_next_batch(runs[i], recipe)) for i in active]
        values = stack_step(stack, opt, parts, recipe, extras, device, lr_at(step, recipe))
        step += 1
        for j, i in enumerate(active):
            runs[i].running += values[j]
            runs[i].n_running += 1
        last = step == recipe.steps
        evaluated = step % recipe.eval_every == 0 or last
        if evaluated:
            lr = lr_at(step - 1, recipe)
            finished = []
            for j, i in enumerate(active):
                r = runs[i]
                model = stack.write_into(j, models[i])
                if extras is not None and extras.embed_scale != 1.0:  # the stored model has the scale folded
                    with torch.no_grad():                           # into W_E (exact), as train_fn does
                        model.embed.W_E.mul_(extras.embed_scale)
                row = {"step": step, "loss": r.running / r.n_running, "lr": lr,
                       "elapsed": round(time.perf_counter() - start, 3),
                       **evaluate(model, r.eval_split, recipe.loss)}
                r.result.history.append(row)
                r.running, r.n_running = 0.0, 0
                if progress:
                    progress(r.seed, step, recipe.steps, row)
                if last or _reached(row, recipe):
                    r.result.steps = step
                    finished.append(j)
            for j in finished:
                i = active[j]
                _finish(entry, runs[i], models[i], extras, start, group, on_done, out)
            if finished and len(finished) < len(active):
                rows = torch.tensor([j for j in range(len(active)) if j not in finished], device=device)
                moved = stack.keep(rows)
                opt = _rebuild_optimizer(opt, stack, moved, rows, recipe)
                if extras is not None:
                    extras.keep(rows.tolist())
            active = [i for j, i in enumerate(active) if j not in finished]
        if ckpt is not None and active and step < recipe.steps and (evaluated or ckpt.due()):
            ckpt.save([runs[i] for i in active], stack, opt, extras, step, time.perf_counter() - start, group)
    if ckpt is not None:
        ckpt.done()


def _load_optimizer(opt, saved: dict) -> None:
    """AdamW's per-parameter state (moments, step counts) from a checkpoint; the groups' settings are
    the recipe's (the learning rate is set at every step)."""
    fresh = opt.state_dict()
    opt.load_state_dict({"state": saved, "param_groups": fresh["param_groups"]})


class _Checkpoints:
    """Where and when one stack's checkpoints are written, and resuming from one (stack_checkpoint)."""

    def __init__(self, entry, root, say: Optional[Callable] = None):
        self.entry, self.root = entry, root
        self.every = stack_checkpoint.every_s()
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.path = None  # the file this stack wrote last (or resumed from)
        self.last = time.perf_counter()
        self.sizes, self.seconds = [], []  # each write's bytes and seconds (the overhead, for a report)

    def _path(self, seeds) -> Path:
        specs = [self.entry.spec(s, backend="ensemble") for s in seeds]
        return stack_checkpoint.path_for(self.root, stack_checkpoint.group_key(specs))

    def due(self) -> bool:
        return self.every > 0 and time.perf_counter() - self.last >= self.every

    def save(self, active_runs: list, stack, opt, extras, step: int, elapsed: float, group: list) -> None:
        if self.every <= 0:
            return
        t0 = time.perf_counter()
        seeds = [r.seed for r in active_runs]
        path = self._path(seeds)
        tensors = {f"param.{n}": p for n, p in stack.params.items()}
        for idx, state in opt.state_dict()["state"].items():
            for k, v in state.items():
                tensors[f"opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta = {}
        for j, r in enumerate(active_runs):
            tensors[f"gen.{r.seed}"] = r.gen.get_state()
            if r.epoch_state is not None:
                tensors[f"epoch.{r.seed}"] = r.epoch_state
            if extras is not None:
                tensors[f"dropout.{r.seed}"] = extras.gens[j].get_state()
            meta[str(r.seed)] = {"consumed": r.consumed, "running": r.running, "n_running": r.n_running,
                                 "history": r.result.history}
        state = {"key": path.stem, "seeds": seeds, "group": list(group), "step": step, "elapsed": elapsed,
                 "runs": meta}
        try:
            size = stack_checkpoint.write(path, tensors, state)
        except OSError as e:  # a full disk must not stop the training: it only loses the resume point
            self.say(f"    {self.entry.name}: cannot write the stack checkpoint {path} ({e}); training on")
            return
        if self.path is not None and self.path != path:  # seeds left the stack: its old key is gone
            stack_checkpoint.remove(self.path)
        self.path, self.last = path, time.perf_counter()
        self.sizes.append(size)
        self.seconds.append(self.last - t0)

    def done(self) -> None:
        stack_checkpoint.remove(self.path)
        self.path = None

    def resume(self, seeds: list, runs: list, stack, extras) -> Optional[dict]:
        """Load the checkpoint of exactly these seeds into runs / stack / extras, if there is a good one:
        returns what _loop needs (step, elapsed, group, optimiser state), else None (a bad file is
        reported, removed, and replaced by this stack's own)."""
        path = self._path(seeds)
        if not path.exists():
            return None
        try:
            tensors, state = stack_checkpoint.read(path, path.stem)
            plan = _resume_plan(self.entry.recipe, seeds, runs, stack, extras, tensors, state)
        except stack_checkpoint.BadCheckpoint as e:
            self.say(f"    {self.entry.name}: stack checkpoint {path.name} ignored ({e}); "
                     f"seeds {seeds} start at step 0")
            stack_checkpoint.remove(path)
            return None
        plan["apply"]()
        self.path = path
        self.say(f"    {self.entry.name}: seeds {seeds} resume from their stack checkpoint at step "
                 f"{state['step']}/{self.entry.recipe.steps} ({path})")
        return {k: plan[k] for k in ("step", "elapsed", "group", "opt")}


def _resume_plan(recipe, seeds, runs, stack, extras, tensors: dict, state: dict) -> dict:
    """Check a checkpoint against this stack (BadCheckpoint if it does not fit) and return its values
    with an `apply` that writes them in: nothing changes before everything is checked."""
    bad = stack_checkpoint.BadCheckpoint
    try:
        step, elapsed, group = int(state["step"]), float(state["elapsed"]), [int(s) for s in state["group"]]
        if state["seeds"] != seeds or not 0 < step < recipe.steps:
            raise bad(f"seeds {state['seeds']} at step {step}")
        params = {}
        for n, p in stack.params.items():
            t = tensors[f"param.{n}"]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise bad(f"{n} is {list(t.shape)} {t.dtype}, the stack's {list(p.shape)} {p.dtype}")
            params[n] = t
        opt = {}
        for name, t in tensors.items():
            if name.startswith("opt."):
                _, idx, k = name.split(".", 2)
                opt.setdefault(int(idx), {})[k] = t
        order = _optimizer_order(stack)  # the index AdamW's state_dict gives each parameter
        for idx, moments in opt.items():
            fits = 0 <= idx < len(order) and all(k == "step" or v.shape == order[idx].shape
                                                  for k, v in moments.items())
            if not fits:
                raise bad(f"optimiser state {idx} does not fit the stack")
        restored, dropout = [], []
        for r in runs:
            info = state["runs"][str(r.seed)]
            gen = torch.Generator()
            gen.set_state(tensors[f"gen.{r.seed}"])
            epoch, epoch_state = None, tensors.get(f"epoch.{r.seed}")
            if epoch_state is not None:  # redraw the epoch from its start and skip the batches taken
                gen.set_state(epoch_state)
                epoch = batches(r.train_split, recipe.batch_size, gen, recipe.bucket_by_length)
                for _ in range(int(info["consumed"])):
                    if next(epoch, None) is None:
                        raise bad(f"seed {r.seed}: its epoch has fewer than {info['consumed']} batches")
                if not torch.equal(gen.get_state(), tensors[f"gen.{r.seed}"]):
                    raise bad(f"seed {r.seed}: its epoch does not redraw to the saved batch order")
            restored.append((gen, epoch, epoch_state, int(info["consumed"]), float(info["running"]),
                             int(info["n_running"]), list(info["history"])))
            if extras is not None:
                d = torch.Generator()
                d.set_state(tensors[f"dropout.{r.seed}"])
                dropout.append(d)
    except bad:
        raise
    except Exception as e:  # noqa: BLE001 - a missing field or a bad value: not this code's checkpoint
        raise bad(f"{type(e).__name__}: {e}") from None

    def apply():
        with torch.no_grad():
            for n, t in params.items():
                stack.params[n].copy_(t.to(stack.params[n].device))
        for r, (gen, epoch, epoch_state, consumed, running, n_running, history) in zip(runs, restored):
            r.gen, r.epoch, r.epoch_state, r.consumed = gen, epoch, epoch_state, consumed
            r.running, r.n_running, r.result.history = running, n_running, history
        if extras is not None:
            extras.gens = dropout

    return {"step": step, "elapsed": elapsed, "group": group, "opt": opt, "apply": apply}


def _finish(entry, r: SeedRun, model, extras, start, group, on_done, out) -> None:
    recipe = entry.recipe
    model.eval()
    res = r.result
    res.wall_time = time.perf_counter() - start
    res.final = dict(res.history[-1])
    train_seed, eval_seed = data_seeds(r.seed)
    card = {"metrics": res.final, "history": res.history, "steps": res.steps,
            "wall_time": round(res.wall_time + r.data_time, 3),
            "data_seeds": {"train": train_seed, "eval": eval_seed},
            "backend": BACKEND, "ensemble": {"group": list(group), "K": len(group)}}
    if recipe.n_test:
        seed_test = final_test_seed(r.seed)
        test = evaluate(model, entry.make_split(recipe.n_test, seed_test), recipe.loss)
        card["metrics"] = {**res.final, **{k.replace("eval_", "test_"): v for k, v in test.items()}}
        card["data_seeds"]["test"] = seed_test
    r.train_split = r.eval_split = None  # let the data go as seeds finish
    out[r.seed] = (model, card)
    if on_done is not None:
        on_done(r.seed, model, card)


def train_many(entry, seeds: Sequence[int], *, device: str = "cpu", progress=None, on_done=None,
               ensemble: Optional[int] = None, checkpoint_root=None, say=None) -> dict:
    """`seeds` of `entry` in stacks of at most `ensemble` seeds (None or 0: all at once), one stack after
    another. Returns seed -> (model, card). NotStackable for an entry outside the stacked trainer.
    `checkpoint_root`, `say`: as train_stack's."""
    seeds = list(seeds)
    why = stackable(entry)
    if why:
        raise NotStackable(why)
    if ensemble is not None and (isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 0):
        raise SettingError(f"--ensemble must be a non-negative integer (0 = automatic), got {ensemble!r}")
    size = ensemble or len(seeds)
    out = {}
    for i in range(0, len(seeds), size):
        out.update(train_stack(entry, seeds[i:i + size], device=device, progress=progress, on_done=on_done,
                               checkpoint_root=checkpoint_root, say=say))
    return out
