"""One trainer for every zoo model: classification (cross-entropy) or regression (MSE) read-outs.

AdamW with linear warm-up then cosine decay; batches grouped by length (each batch is cut to its
longest sequence, so short strings do not pay for padding); held-out evaluation on a split generated
with a different seed; a metrics history for the report's training curves; optional early stop once
the held-out target is reached (checked only at evaluation points, so it stays deterministic).

Determinism: all randomness comes from explicit torch.Generators seeded from the recipe's seed, and
the loop runs with a fixed thread count, so the same seed gives bitwise-identical weights on one
machine (tests/test_train.py checks it in two fresh processes).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from circuits.devices import check_device
from circuits.errors import CircuitsError, InputError
from circuits.model.transformer import HookedTransformer

# Bumped whenever a change here alters what training produces: part of every model-store key, so a
# stale cached or reference checkpoint is detected instead of silently reused.
TRAIN_CODE_VERSION = "train-1"


@dataclass
class Split:
    """A dataset split as the trainer sees it."""

    inputs: torch.Tensor  # [n, pos] token ids or [n, pos, d_input] vectors
    targets: torch.Tensor  # [n] class ids, [n] floats (regression) or [n, pos] per-position targets
    lengths: Optional[torch.Tensor] = None  # [n] meaningful positions per row (rest is padding)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, idx: torch.Tensor) -> "Split":
        inputs, targets = self.inputs[idx], self.targets[idx]
        lengths = None if self.lengths is None else self.lengths[idx]
        if lengths is not None:  # cut to this batch's longest row: padding past it changes nothing
            width = int(lengths.max())
            inputs = inputs[:, :width]
            if targets.ndim == 2:
                targets = targets[:, :width]
        return Split(inputs, targets, lengths)


@dataclass
class TrainRecipe:
    steps: int = 3000  # optimiser steps (upper bound when target_metric stops early)
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_frac: float = 0.05  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    loss: str = "ce"  # "ce" (classification, also per position) or "mse" (regression)
    n_train: int = 100_000  # examples generated once for training (seed-derived), reshuffled per epoch
    n_eval: int = 10_000  # held-out examples, generated with a different seed
    eval_every: int = 500
    target_metric: Optional[float] = None  # stop at an eval point once held-out acc >= (or mse <=) it
    bucket_by_length: bool = True
    threads: int = 2  # torch threads during training (fixed, so results do not depend on the machine's default)
    # the last block computes only the read-out position while training (first/last read-outs): the
    # same gradients up to float rounding, ~20% less compute for a 3-layer model
    readout_only: bool = False
    fused_adamw: bool = False  # torch's fused AdamW kernel (~6% faster steps here; other rounding)
    # a final test set (its own seed), scored once after training: the early stop watched the eval
    # set, so its last reading is biased upwards; this one is not. 0 = none
    n_test: int = 0
    # weight of auxiliary per-position targets: with a first/last read-out and [n, pos] training
    # targets, the loss is cross-entropy at the read-out position plus aux_weight x the mean
    # cross-entropy over the other labelled positions (label < 0 = none), all positions scored by the
    # same unembedding. 0 = off (then [n, pos] targets mean a per-position task)
    aux_weight: float = 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        for late in ("readout_only", "fused_adamw", "n_test", "aux_weight"):  # added later: recorded
            if not d[late]:                                # only when on, so earlier models' keys stay valid
                del d[late]
        return d


@dataclass
class TrainResult:
    history: list = field(default_factory=list)  # [{step, loss, lr, elapsed, eval_*...}]
    final: dict = field(default_factory=dict)  # final held-out metrics
    wall_time: float = 0.0
    steps: int = 0


# Data seeds stay below 2**62: torch.Generator takes 64-bit seeds, and task code adds small offsets.
_DATA_SEED_LIMIT = 2**62


def _fit(value: int, stream: str) -> int:
    """``value`` itself when it fits (every seed below ~1.5e12: the keys and data of every model
    trained so far are unchanged); else a 62-bit hash of it and its stream. Model seeds go up to
    2**63-1 (circuits.zoo.seeds), where the products below overflow torch's seed type."""
    if value < _DATA_SEED_LIMIT:
        return value
    import hashlib

    digest = hashlib.sha256(f"{stream}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _DATA_SEED_LIMIT


def data_seeds(seed: int) -> tuple[int, int]:
    """(train data seed, held-out data seed) for a model seed: disjoint streams by construction."""
    return _fit(1_000_003 * (seed + 1), "train"), _fit(2_000_003 * (seed + 1) + 7, "eval")


def final_test_seed(seed: int) -> int:
    """The final test set's data seed for a model seed (TrainRecipe.n_test): apart from both above."""
    return _fit(3_000_017 * (seed + 1) + 11, "test")


def lr_at(step: int, recipe: TrainRecipe) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.lr * (recipe.min_lr_frac + (1 - recipe.min_lr_frac) * cos)


def batches(split: Split, batch_size: int, gen: torch.Generator, bucket: bool):
    """One epoch of index batches. With bucketing, rows are sorted by length (random tie-break) and
    cut into batches; the batch order is shuffled, so every batch is nearly padding-free."""
    n = len(split)
    if bucket and split.lengths is not None:
        jitter = torch.rand(n, generator=gen)
        order = torch.argsort(split.lengths.double().cpu() + jitter)  # (.cpu(): no-op on the CPU)
    else:
        order = torch.randperm(n, generator=gen)
    chunks = list(order.split(batch_size))
    for i in torch.randperm(len(chunks), generator=gen).tolist():
        yield chunks[i]


def compute_loss(model: HookedTransformer, b: Split, loss: str, readout_only: Optional[bool] = None,
                 aux_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-example 'correct' or squared error) for a batch."""
    if aux_weight and b.targets.ndim == 2:
        return _loss_with_aux_targets(model, b, loss, aux_weight)
    out = model(b.inputs, readout_only=readout_only)
    if loss == "ce":
        if b.targets.ndim == 2:  # per-position classification: [batch, pos, classes]
            logits = out.reshape(-1, out.shape[-1])
            tgt = b.targets.reshape(-1)
            keep = tgt >= 0  # negative targets mark positions without a label
            value = F.cross_entropy(logits[keep], tgt[keep])
            return value, (logits[keep].argmax(-1) == tgt[keep]).float()
        return F.cross_entropy(out, b.targets), (out.argmax(-1) == b.targets).float()
    if loss == "mse":
        pred = out.squeeze(-1)
        err = (pred - b.targets).pow(2)
        return err.mean(), err
    raise InputError(f"unknown loss {loss!r}; use 'ce' or 'mse'")


def _loss_with_aux_targets(model: HookedTransformer, b: Split, loss: str, weight: float):
    """TrainRecipe.aux_weight: the read-out position's label is the task; the other positions'
    labels are auxiliary targets. Correctness is the read-out position's only."""
    if loss != "ce" or model.cfg.readout not in ("first", "last"):
        raise InputError(f"auxiliary targets need loss='ce' and a first/last read-out, got loss={loss!r}, "
                         f"readout={model.cfg.readout!r}")
    out = model(b.inputs, readout="all")  # [batch, pos, classes]
    if b.targets.shape != out.shape[:2]:
        raise InputError(f"auxiliary targets must be [batch, pos] = {list(out.shape[:2])}, got {list(b.targets.shape)}")
    rows = torch.arange(out.shape[0], device=out.device)
    at = model.readout_positions(b.inputs)  # [batch]
    main_logits, main_targets = out[rows, at], b.targets[rows, at]  # [batch, classes], [batch]
    aux = b.targets.clone()
    aux[rows, at] = -1  # [batch, pos], -1 = no auxiliary label
    keep = aux >= 0
    value = F.cross_entropy(main_logits, main_targets)
    if keep.any():
        value = value + weight * F.cross_entropy(out[keep], aux[keep])
    return value, (main_logits.argmax(-1) == main_targets).float()


@torch.no_grad()
def evaluate(model: HookedTransformer, split: Split, loss: str, batch_size: int = 2048) -> dict:
    was_training = model.training
    model.eval()
    total, parts = 0.0, []
    gen = torch.Generator().manual_seed(0)
    for idx in batches(split, batch_size, gen, bucket=True):
        b = split.batch(idx)
        value, per = compute_loss(model, b, loss)
        total += float(value) * len(idx)
        parts.append(per)
    model.train(was_training)
    per = torch.cat(parts)
    out = {"eval_loss": total / len(split)}
    if loss == "ce":
        out["eval_acc"] = float(per.double().mean())  # float32 would make 9995/10000 < 0.9995
    else:
        out["eval_mse"] = float(per.mean())
    return out


def _reached(metrics: dict, recipe: TrainRecipe) -> bool:
    if recipe.target_metric is None:
        return False
    if recipe.loss == "ce":
        return metrics["eval_acc"] >= recipe.target_metric
    return metrics["eval_mse"] <= recipe.target_metric


_DEVICE: contextvars.ContextVar[str] = contextvars.ContextVar("circuits_train_device", default="cpu")


@contextlib.contextmanager
def on_device(device: str):
    """Trainings started inside run on ``device`` (checked with check_device); the trained model is
    handed back on the CPU, as callers (evaluation, the store) expect. A context, not a parameter, so
    every family's training function gets it without a signature change."""
    token = _DEVICE.set(check_device(device))
    try:
        yield
    finally:
        _DEVICE.reset(token)


def _to(split: Split, device: str) -> Split:
    lengths = None if split.lengths is None else split.lengths.to(device)
    return Split(split.inputs.to(device), split.targets.to(device), lengths)


def train(model: HookedTransformer, train_split: Split, eval_split: Split, recipe: TrainRecipe,
          seed: int, progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainResult:
    """Train `model` in place. `progress(step, total_steps, metrics)` is called ~once a second."""
    old_threads = torch.get_num_threads()
    threads = recipe.threads or old_threads
    device = _DEVICE.get()
    if device != "cpu":  # batches are drawn with CPU generators either way: same order on any device
        model.to(device)
        train_split, eval_split = _to(train_split, device), _to(eval_split, device)
    with training_slot(threads, progress):
        torch.set_num_threads(threads)
        try:
            return _train(model, train_split, eval_split, recipe, seed, progress)
        finally:
            torch.set_num_threads(old_threads)
            if device != "cpu":
                model.to("cpu")


def training_slot_path() -> Path:
    return Path(tempfile.gettempdir()) / "circuits-multithreaded-training.lock"


def _slot_owner_path() -> Path:
    return training_slot_path().with_name("circuits-multithreaded-training.owner.json")


_slot_depth = threading.local()


@contextlib.contextmanager
def training_slot(threads: int, progress=None, timeout: Optional[float] = None):
    """A training on more than one thread holds the machine's multi-threaded training slot (a file
    lock), so two of them (e.g. in two xdist workers) run one after the other: at once they
    oversubscribe the cores, and two 2-thread bracket trainings on 2 cores ran 5x slower side by side
    (92 s each for 2,000 steps) than one after the other (18 s). One-thread trainings run freely.

    The holder writes who it is (pid, host, model) next to the lock; a waiter gives up after
    ``timeout`` seconds (default ``$CIRCUITS_LOCK_TIMEOUT``) with a LockTimeoutError naming it. Inside
    a model-store build the waiter lets go of that model's lock while it waits (store.
    build_lock_released), so nobody holds one lock while waiting for the other, and if another
    process stores the model meanwhile this build is dropped and theirs reused. Re-entrant per thread."""
    if threads <= 1 or getattr(_slot_depth, "n", 0):
        yield
        return
    from filelock import FileLock, Timeout

    from circuits.zoo.store import (LOCK_TIMEOUT_ENV, LockTimeoutError, _os_error, build_lock_released, current_build_label,
                        describe_owner, lock_timeout_from_env, owner_record)
    from circuits.atomic import write_bytes_atomic

    timeout = lock_timeout_from_env() if timeout is None else float(timeout)
    path, owner = training_slot_path(), _slot_owner_path()
    lock = FileLock(str(path))
    held = False
    try:
        try:
            lock.acquire(timeout=0)
            held = True
        except Timeout:
            holder = describe_owner(owner)
            if progress is not None:
                progress(0, 1, {"waiting": f"for the multi-threaded training slot: {holder}"})
            with build_lock_released():
                try:
                    lock.acquire(timeout=timeout)
                    held = True
                except Timeout:
                    raise LockTimeoutError(
                        f"waited {timeout:g} s for the machine's multi-threaded training slot ({path}): "
                        f"{describe_owner(owner)}. Wait for that training, train on one thread, or raise "
                        f"${LOCK_TIMEOUT_ENV} (seconds)."
                    ) from None
    except BaseException as e:
        if held:
            lock.release()
        if isinstance(e, OSError) and not isinstance(e, CircuitsError):  # e.g. the lock path is a folder
            raise _os_error(e, f"cannot take the multi-threaded training slot {path}") from None
        raise
    action = f"training {current_build_label() or 'a model'} on {threads} threads"
    with contextlib.suppress(OSError):
        write_bytes_atomic(owner, json.dumps(owner_record(action, model=current_build_label())).encode())
    _slot_depth.n = 1
    try:
        yield
    finally:
        _slot_depth.n = 0
        with contextlib.suppress(OSError):
            owner.unlink()
        lock.release()


def _train(model, train_split, eval_split, recipe, seed, progress) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=tuple(recipe.betas), **({"fused": True} if recipe.fused_adamw else {"foreach": True}),
    )
    result = TrainResult()
    start = last_report = time.perf_counter()
    step, running, n_running = 0, 0.0, 0
    model.train()
    epoch = iter(())
    while step < recipe.steps:
        idx = next(epoch, None)
        if idx is None:
            epoch = batches(train_split, recipe.batch_size, gen, recipe.bucket_by_length)
            continue
        lr = lr_at(step, recipe)
        for group in opt.param_groups:
            group["lr"] = lr
        value, _ = compute_loss(model, train_split.batch(idx), recipe.loss, recipe.readout_only or None,
                                recipe.aux_weight)
        opt.zero_grad(set_to_none=True)
        value.backward()
        if recipe.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip, foreach=True)
        opt.step()
        step += 1
        running += value.item()
        n_running += 1
        last = step == recipe.steps
        if step % recipe.eval_every == 0 or last:
            row = {"step": step, "loss": running / n_running, "lr": lr,
                   "elapsed": round(time.perf_counter() - start, 3), **evaluate(model, eval_split, recipe.loss)}
            result.history.append(row)
            running, n_running = 0.0, 0
            if progress:
                progress(step, recipe.steps, row)
                last_report = time.perf_counter()
            if _reached(row, recipe):
                break
        elif progress and time.perf_counter() - last_report > 1.0:
            progress(step, recipe.steps, {"loss": value.item(), "lr": lr})
            last_report = time.perf_counter()
    model.eval()
    result.steps = step
    result.wall_time = time.perf_counter() - start
    result.final = dict(result.history[-1]) if result.history else evaluate(model, eval_split, recipe.loss)
    return result


class TerminalProgress:
    """A one-line progress bar on a stream (stderr by default), redrawn in place."""

    def __init__(self, label: str, stream=None, width: int = 28):
        self.label, self.stream, self.width = label, stream or sys.stderr, width
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        frac = step / max(total, 1)
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items()
                         if k in ("loss", "eval_acc", "eval_mse", "eval_loss") and isinstance(v, float))
        if isinstance(metrics.get("waiting"), str):
            shown = "waiting " + metrics["waiting"]
        elapsed = time.perf_counter() - self.start
        self.stream.write(f"\r{self.label} [{bar}] {step}/{total} {elapsed:5.1f}s {shown}   ")
        self.stream.flush()

    def done(self, message: str = "") -> None:
        self.stream.write(f"\r{self.label} done in {time.perf_counter() - self.start:.1f}s {message}\n")
        self.stream.flush()
