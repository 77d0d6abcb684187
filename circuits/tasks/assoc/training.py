"""Training a model of the family on a law: ``train_assoc`` (full batch on the exact expected loss, or
sampled mini-batches like the seed's and the authors' `train.py`), Adam, deterministic for a seed. It
reuses ``circuits.zoo.train.TrainResult``; one-layer models train through ``assoc_model.table_logits``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from circuits.tasks.assoc.model import AssocTransformer, check_rows, table_logits
from circuits.errors import InputError
from circuits.zoo.train import TrainResult
from circuits.tasks.assoc.laws import DTYPE, Law, _check_int
from circuits.tasks.assoc.lowrank import LowRank

TRAIN_CODE_VERSION = "assoc-train-1"  # bump when train_assoc changes what training produces

# ------------------------------------------------------------------------------------------------
# training


@dataclass
class AssocRecipe:
    """How a model of the family is trained (Adam; deterministic for a seed)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 0  # 0 = full batch: the exact expected loss over all contexts (weights P(c));
    #                      > 0 = that many contexts sampled from the law per step, as the seed
    loss: str = "next_token"  # "next_token": CE on the (sampled or expected) next token; "divergence": KL to pi
    betas: tuple = (0.9, 0.999)  # torch's Adam defaults, as the seed
    schedule: str = "constant"  # "constant" (the seed's notebook), "cosine" or "linear" (the paper's
    #                             sweeps: LinearLR), both ending at final_lr_frac * lr
    final_lr_frac: float = 0.05
    eval_every: int = 100
    threads: int = 1
    rows: str = "all"  # with batch_size > 0, which contexts' logits a step computes: "all" (every context,
    #                    then the batch is picked from them) or "batch" (only the sampled ones, as the
    #                    authors' train.py; the same loss, N^S / batch_size times fewer rows, other bits)

    def __post_init__(self) -> None:
        _check_int("steps", self.steps)
        _check_int("batch_size", self.batch_size, 0)
        _check_int("eval_every", self.eval_every)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if self.loss not in ("next_token", "divergence"):
            raise InputError(f"loss must be 'next_token' or 'divergence', got {self.loss!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise InputError(f"schedule must be 'constant', 'cosine' or 'linear', got {self.schedule!r}")
        if not (isinstance(self.final_lr_frac, (int, float)) and 0 < self.final_lr_frac <= 1):
            raise InputError(f"final_lr_frac must be in (0, 1], got {self.final_lr_frac!r}")
        if self.rows not in ("all", "batch"):
            raise InputError(f"rows must be 'all' or 'batch', got {self.rows!r}")
        if self.rows == "batch" and not self.batch_size:
            raise InputError("rows='batch' needs sampled batches (batch_size > 0); full batch computes every context")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if self.schedule == "constant":  # no end point: keeps the keys of constant-rate models unchanged
            del d["final_lr_frac"]
        if self.rows == "all":  # the original behaviour: keeps the keys of existing models unchanged
            del d["rows"]
        return d


def scheduled_lr(recipe: AssocRecipe, step: int) -> float:
    """The learning rate of `step` (0-based) under the recipe's schedule."""
    end, t = recipe.final_lr_frac, step / recipe.steps
    if recipe.schedule == "cosine":
        return recipe.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t)))
    if recipe.schedule == "linear":
        return recipe.lr * (1 - (1 - end) * t)
    return recipe.lr


def context_logits(model: nn.Module, law: Law, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model's logits on every context of the law: [N^S, N] (with gradients); with `rows`
    (context indices, [B]) on those contexts only: [B, N]."""
    if rows is not None:  # checked here: the fallbacks below would index silently (negative) or deep in torch
        rows = check_rows(rows, law.N ** law.S)
    if isinstance(model, LowRank):
        logits = model.all_logits()
        return logits if rows is None else logits[rows]
    if isinstance(model, AssocTransformer) and model.acfg.n_layers == 1:
        try:
            return table_logits(model, rows)
        except InputError:
            pass
    return model(law.contexts() if rows is None else law.contexts()[rows])


@torch.no_grad()
def evaluate(model: nn.Module, law: Law) -> dict:
    """Exact metrics over the law: divergence, expected loss, accuracy."""
    was = model.training
    model.eval()
    logits = context_logits(model, law).to(DTYPE)
    model.train(was)
    loss = law.expected_loss(logits)
    return {"divergence": loss - law.entropy(), "loss": loss, "accuracy": law.accuracy(logits)}


def train_assoc(model: nn.Module, law: Law, recipe: AssocRecipe, seed: int,
                progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainResult:
    """Train `model` in place on `law`; returns circuits.zoo.train.TrainResult (history of exact metrics)."""
    if getattr(model, "acfg", None) is not None and (model.acfg.d_vocab != law.N or model.acfg.n_ctx != law.S):
        raise InputError(f"model reads {model.acfg.n_ctx} tokens of {model.acfg.d_vocab}, the law has "
                         f"contexts of {law.S} tokens of {law.N}")
    old = torch.get_num_threads()
    torch.set_num_threads(recipe.threads or old)
    try:
        return _train(model, law, recipe, seed, progress)
    finally:
        torch.set_num_threads(old)


def _train(model, law, recipe, seed, progress) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult()
    if not params:  # everything frozen (the seed's "nothing trained" freezer): evaluate only
        model.eval()
        result.final = {"step": 0, **evaluate(model, law)}
        result.final["acc"] = result.final["accuracy"]
        result.history.append(dict(result.final))
        return result
    opt = torch.optim.Adam(params, lr=recipe.lr, betas=tuple(recipe.betas))
    dtype = params[0].dtype
    w = law.context_probs().to(dtype)  # [N^S]
    pi = law.next_token_probs().to(dtype)  # [N^S, N]
    keep = torch.nonzero(w > 0).squeeze(1)
    entropy = law.entropy()
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        lr = scheduled_lr(recipe, step)
        for g in opt.param_groups:
            g["lr"] = lr
        if recipe.batch_size:  # sampled contexts, as the seed's data loader (with replacement)
            idx = torch.multinomial(w, recipe.batch_size, replacement=True, generator=gen)
            if recipe.rows == "batch":
                logp = torch.log_softmax(context_logits(model, law, idx), -1)  # [B, N]
            else:
                logp = torch.log_softmax(context_logits(model, law)[idx], -1)  # [N^S, N] -> [B, N]
            if recipe.loss == "next_token":
                y = torch.multinomial(pi[idx], 1, generator=gen).squeeze(1)
                loss = F.nll_loss(logp, y)
            else:
                loss = -(pi[idx] * logp).sum(-1).mean()
        else:
            logp = torch.log_softmax(context_logits(model, law)[keep], -1)
            loss = -(w[keep, None] * pi[keep] * logp).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            row = {"step": step + 1, "loss": loss.item() - (entropy if recipe.loss == "divergence" else 0.0),
                   "lr": lr, "elapsed": round(time.perf_counter() - start, 3), **evaluate(model, law)}
            row["acc"] = row["accuracy"]
            result.history.append(row)
            if progress:
                progress(step + 1, recipe.steps, row)
    model.eval()
    result.steps = recipe.steps
    result.wall_time = time.perf_counter() - start
    result.final = dict(result.history[-1])
    return result
