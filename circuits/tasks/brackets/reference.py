"""The published ARENA bracket classifier and its 100,000 strings, shipped with the package.

`arena_model(device=...)` loads the checkpoint into our `HookedTransformer`; `arena_data(n)` gives the
strings (the first `n`, or all) as a `BracketData`. Both read only the package's own files
(`circuits.paths.arena_dir()`), each checked against the sha256 recorded in its `checksums.json`
before it is read: a corrupt or edited file is a `ShippedFileError` naming it, never a model that
quietly differs from the published one. Provenance: `arena_dir() / "SOURCE.md"`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch

from circuits.errors import InputError, ShippedFileError
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.paths import arena_dir
from circuits.tasks.brackets import data as B

WEIGHTS = "brackets_model.safetensors"
DATA = "brackets_data.json.gz"
CHECKSUMS = "checksums.json"
N_EVAL = 5000  # the seed analyses the first 5,000 strings of the published data
ARENA_ROLES = {"count_head": (2, 0), "negative_head": (2, 1)}  # the seed's heads 2.0 and 2.1

# SOURCE.md's architecture (the published checkpoint's, not a zoo recipe; tests check it equals the
# `brackets` zoo entry's, so claims compare like with like)
ARENA_CONFIG = dict(n_layers=3, d_model=56, n_ctx=B.N_CTX, n_heads=2, d_head=28, d_mlp=56, d_vocab=B.VOCAB,
                    d_vocab_out=2, act_fn="relu", normalization="LN", pad_token=B.PAD,
                    positional="sinusoidal", readout="first")


def arena_config() -> TransformerConfig:
    return TransformerConfig(**ARENA_CONFIG)


@lru_cache(maxsize=4)
def _recorded(folder: Path) -> dict:
    path = folder / CHECKSUMS
    try:
        sums = json.loads(path.read_text())["shipped"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShippedFileError(f"{path}: cannot read the recorded checksums ({type(e).__name__}: {e}); "
                               "reinstall the package") from None
    return sums


def verified_path(name: str) -> Path:
    """The shipped file `name`, after checking its sha256 against checksums.json (both read from
    `arena_dir()` on every call: the check costs ~2 ms, and a file replaced meanwhile is caught)."""
    folder = arena_dir()
    path = folder / name
    expected = _recorded(folder).get(name)
    if expected is None:
        raise ShippedFileError(f"{path}: no checksum recorded for it in {folder / CHECKSUMS}")
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise ShippedFileError(f"{path}: cannot read the shipped file ({e.strerror or e}); reinstall the package") from None
    if actual != expected:
        raise ShippedFileError(f"{path}: sha256 {actual[:16]}... does not match the recorded {expected[:16]}... "
                               "(the file is corrupt or was edited; restore it with git or reinstall the package)")
    return path


def arena_state_dict() -> dict[str, torch.Tensor]:
    """The published TransformerLens state dict, as shipped (TL's mask/IGNORE buffers included)."""
    from safetensors.torch import load_file

    return load_file(str(verified_path(WEIGHTS)))


def arena_model(device: str | torch.device = "cpu", flush_subnormals: bool = True) -> HookedTransformer:
    """The published checkpoint in our model, in eval mode, on `device`, its subnormal weights set
    to zero (`flush_subnormals_`: the same logits, bit for bit, at a fraction of the CPU time);
    `flush_subnormals=False`: the file's weights as published."""
    from circuits.model.convert import flush_subnormals_, load_tl_state_dict

    model = load_tl_state_dict(HookedTransformer(arena_config()), arena_state_dict())
    if flush_subnormals:
        flush_subnormals_(model)
    return model.to(device).eval()


def _rows() -> list:
    path = verified_path(DATA)
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, ValueError) as e:  # cannot happen past the checksum unless it was recorded wrong
        raise ShippedFileError(f"{path}: not gzip'd JSON ({type(e).__name__}: {e})") from None


def arena_data(n: Optional[int] = N_EVAL) -> B.BracketData:
    """The first `n` published (string, is_balanced) rows (all 100,000 with n=None), each stored
    label checked against our `is_balanced` (a disagreement would make every claim about
    "balanced" meaningless). Tensors on the CPU: callers move them to their device."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise InputError(f"n must be None or a non-negative int, got {n!r}")
    return _arena_data(arena_dir(), n)


@lru_cache(maxsize=8)
def _arena_data(folder: Path, n: Optional[int]) -> B.BracketData:
    rows = _rows()
    rows = rows[:n] if n is not None else rows
    data = B.BracketData.from_strings([s for s, _ in rows])
    stored = torch.tensor([b for _, b in rows], dtype=torch.bool)  # [batch]
    wrong = (stored != data.isbal).nonzero().squeeze(-1)
    if wrong.numel():
        shown = ", ".join(f"row {i} {rows[i][0]!r} labelled {rows[i][1]}" for i in wrong[:5].tolist())
        raise B.ReferenceDataError(f"{folder / DATA}: {wrong.numel()} label(s) disagree with is_balanced: {shown}")
    return data
