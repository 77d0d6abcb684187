"""Checkpoints of a stacked training (circuits.zoo.ensemble), so a long stack survives an interruption.

A stack of 8 bracket seeds runs 20,000 steps (over an hour on a shared 2-core machine) and stores a
seed only when it finishes; a session stopped at step 15,000 would lose all of it. While a stack
trains, its complete state is written here every ``$CIRCUITS_STACK_CHECKPOINT_S`` seconds (default
300; 0 = never) and at each evaluation; the next `train_stack` of the same group resumes from it and
ends bitwise where the uninterrupted run would have (tests/test_ensemble.py).

Layout: ``<store root>/_stacks/<key>.safetensors``, one file written atomically (circuits.atomic): the
tensors (stacked parameters, AdamW moments and step counts, generator states as uint8 tensors) and,
in the safetensors header's metadata, the rest as JSON (step, the seeds, each seed's epoch position,
running loss and history). Never a pickle. ``_stacks`` is not a key name (keys start with a letter or
digit), so the store's scans never mistake it for an entry.

The key hashes the spec keys of the seeds actually in the stack when it was written (the spec names
the recipe, data, training code, torch version and backend): a seed that stopped early and was stored
is out of the stack and out of the key, which is what a rerun of the sweep (it trains only the seeds
the store lacks) asks for. A file that does not match, or does not parse, is ignored with one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import safetensors
import safetensors.torch
import torch

from circuits.atomic import write_bytes_atomic
from circuits.zoo.settings import seconds_from_env
from circuits.zoo.spec import spec_key

EVERY_ENV = "CIRCUITS_STACK_CHECKPOINT_S"
DEFAULT_EVERY_S = 300.0
FOLDER = "_stacks"
VERSION = 1


class BadCheckpoint(Exception):
    """A checkpoint that cannot be resumed from (the message says why, in a few words)."""


def every_s() -> float:
    """Seconds between time-based checkpoints ($CIRCUITS_STACK_CHECKPOINT_S); 0 = no checkpoints."""
    return seconds_from_env(EVERY_ENV, DEFAULT_EVERY_S, "seconds between stack checkpoints, 0 = none")


def group_key(specs: Sequence[dict]) -> str:
    """The key of a stack of these seeds' specs (in the stack's order)."""
    return spec_key({"stack_checkpoint": VERSION, "seeds": [spec_key(s) for s in specs]})


def path_for(root, key: str) -> Path:
    return Path(root) / FOLDER / f"{key}.safetensors"


def _digest(tensors: dict) -> str:
    """sha256 over the tensors' names and bytes: a flipped bit in the data is found, not resumed from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write(path: Path, tensors: dict, state: dict) -> int:
    """Write one checkpoint atomically; returns its size in bytes."""
    tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
    meta = {"state": json.dumps({**state, "version": VERSION}), "digest": _digest(tensors)}
    data = safetensors.torch.save(tensors, metadata=meta)
    write_bytes_atomic(path, data)
    return len(data)


def read(path: Path, key: str) -> tuple[dict, dict]:
    """(tensors, state) of the checkpoint at `path`, checked against `key`; BadCheckpoint if it is not
    one this code wrote for that key, intact."""
    try:
        data = path.read_bytes()
        tensors = safetensors.torch.load(data)
        with safetensors.safe_open(str(path), "pt") as fh:
            meta = fh.metadata() or {}
        state = json.loads(meta["state"])
    except Exception as e:  # noqa: BLE001 - any damage means "not resumable", never a crash
        raise BadCheckpoint(f"unreadable ({type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise BadCheckpoint(f"format {state.get('version') if isinstance(state, dict) else '?'}, not {VERSION}")
    if state.get("key") != key:
        raise BadCheckpoint("written for another stack")
    if meta.get("digest") != _digest(tensors):
        raise BadCheckpoint("its tensors do not match their digest")
    return tensors, state


def remove(path: Optional[Path]) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
