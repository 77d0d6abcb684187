"""A checkpoint on disk: a safetensors file and its JSON card, written atomically and checked on read;
committed reference checkpoints.

Small checkpoints committed to the repository (``fixtures/models/``) are stored flat as
``<dir>/<name>.safetensors`` + ``<dir>/<name>.card.json`` (see :func:`save_reference` and
:func:`load_reference`).  They are never deleted automatically; problems raise
:class:`MissingCheckpointError`, :class:`CorruptCheckpointError` or :class:`StaleCheckpointError`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from circuits.atomic import write_bytes_atomic
from circuits.errors import CircuitsError, StoreError
from circuits.zoo.spec import SpecError, _normalize, spec_diff, spec_key

__all__ = ["FORMAT_VERSION", "LEGACY_CARDS_FILE", "CardError", "CheckpointError", "CorruptCheckpointError", "CorruptCheckpointWarning", "MissingCheckpointError", "StaleCheckpointError", "legacy_card_digests", "load_reference", "reference_paths", "save_reference"]

# 2: the card carries card_hash (required from this version on; version-1 cards, e.g. committed
# references written before it, still load)
FORMAT_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
_RESERVED = ("key", "content_hash", "created", "format_version", "weights_file", "size_bytes", "card_hash")
_WEIGHTS_RE = re.compile(r"weights(-[0-9a-f]{16})?\.safetensors")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")


def _refresh_hint(name: str) -> str:
    """The command that rewrites a reference file stem ``name`` (``<entry>`` or ``<entry>_s<seed>``)."""
    import re as _re

    m = _re.fullmatch(r"(.+)_s(\d+)", name)
    target = f"{m.group(1)} --seed {m.group(2)}" if m else name
    return f"`python -m circuits train {target} --update-reference` or `pytest --circuits-retrain`"


class CardError(CircuitsError, TypeError, ValueError):
    """A card (checkpoint metadata) that cannot be stored as JSON or contradicts its key."""


class CheckpointError(CircuitsError):
    """Base class of the reference-checkpoint errors."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """The reference checkpoint does not exist."""


class CorruptCheckpointError(CheckpointError):
    """The checkpoint's files are damaged (bad card, hash mismatch, truncated or unreadable weights)."""


class StaleCheckpointError(CheckpointError):
    """The reference checkpoint was produced from a different spec (code/config changed)."""


class CorruptCheckpointWarning(UserWarning):
    """A cache entry was damaged; it has been removed and will be rebuilt."""


class _Problem(Exception):
    """Internal: what is wrong with which file."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def _os_error(e: OSError, doing: str, then: str = "") -> StoreError:
    """One clear line for an OSError of the store (full disk, permissions, a folder in a file's place)."""
    if e.errno == errno.ENOSPC:
        why = "no space left on the device"
    elif e.errno == errno.EDQUOT:
        why = "disk quota exceeded"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (or a read-only file system)"
    elif e.errno == errno.EISDIR:
        why = "a folder is where a file should be; remove it"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = "a file is where a folder should be; remove it or move the store"
    else:
        why = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    return StoreError(f"{doing}: {why}{where}{then}")


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid {what} {name!r}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' '_' or '-'"
        )
    return name


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses aliasing)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a dict of str -> Tensor, got {type(state_dict).__name__}")
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state_dict.items():
        if not isinstance(name, str):
            raise TypeError(f"state_dict key {name!r} is a {type(name).__name__}, not str")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(t).__name__}, not a torch.Tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def _full_card(
    key: str, card: Mapping[str, Any], weights_name: str, data: bytes
) -> tuple[dict[str, Any], bytes]:
    if not isinstance(card, Mapping):
        raise CardError(f"card must be a dict, got {type(card).__name__}")
    plain = _normalize(card, "card", allow_nan=True, what=CardError)
    if "key" in plain and plain["key"] != key:
        raise CardError(f"card['key'] is {plain['key']!r} but the entry is being saved under key {key!r}")
    if "spec" in plain:
        got = spec_key(plain["spec"])
        if got != key:
            raise CardError(f"card['spec'] hashes to {got}, not to the key {key!r} it is being saved under")
    plain.pop("card_hash", None)  # a card read back from a store: recomputed below
    plain.update(
        key=key,
        content_hash=hashlib.sha256(data).hexdigest(),
        created=_now(),
        format_version=FORMAT_VERSION,
        weights_file=weights_name,
        size_bytes=len(data),
    )
    plain["card_hash"] = _card_hash(plain)
    text = json.dumps(plain, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return plain, text.encode("utf-8")


def _card_hash(card: Mapping[str, Any]) -> str:
    """sha256 of the card's canonical JSON without ``card_hash`` itself (NaN metrics allowed): the
    weights are covered by ``content_hash``, everything else the card says (metrics, history) by this."""
    rest = {k: v for k, v in card.items() if k != "card_hash"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_pair(
    weights_path: Path, card_path: Path, key: str, tensors: dict[str, torch.Tensor], card: Mapping[str, Any]
) -> dict[str, Any]:
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    full, card_bytes = _full_card(key, card, weights_path.name, data)  # validate before touching disk
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        card_path.unlink()  # the entry is incomplete until the new card lands
    write_bytes_atomic(weights_path, data)
    write_bytes_atomic(card_path, card_bytes)
    return full


LEGACY_CARDS_FILE = "legacy_cards.sha256"


def legacy_card_digests(directory: Path) -> frozenset[str]:
    """sha256 of each version-1 card (written before cards carried ``card_hash``) that a reference
    folder vouches for, one per line in ``<directory>/legacy_cards.sha256`` (``<sha256>  <file>``)."""
    try:
        text = (Path(directory) / LEGACY_CARDS_FILE).read_text(encoding="utf-8")
    except OSError:
        return frozenset()
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip() and not line.startswith("#"))


def _read_card(card_path: Path, key: str | None, legacy: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The card at ``card_path``, checked: a valid object, a version this code reads, a key that
    matches, and its ``card_hash``. A card without ``card_hash`` (format version 1) is accepted only
    when ``legacy`` lists its file's sha256: otherwise lowering the version and deleting the hash
    would pass an edited card off as valid."""
    try:
        if card_path.is_dir():
            raise _Problem(card_path, "the card is a folder, not a file")
        raw = card_path.read_bytes()
    except OSError as e:
        raise _Problem(card_path, f"cannot read the card ({e})") from None
    try:
        card = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Problem(card_path, f"the card is not valid JSON ({e})") from None
    if not isinstance(card, dict):
        raise _Problem(card_path, f"the card is a JSON {type(card).__name__}, not an object")
    version = card.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _Problem(card_path, f"the card has no valid format_version (got {version!r})")
    if version > FORMAT_VERSION:
        raise _Problem(card_path, f"format_version {version} is newer than this code supports ({FORMAT_VERSION})")
    if not isinstance(card.get("content_hash"), str) or not _HEX64_RE.fullmatch(card["content_hash"]):
        raise _Problem(card_path, f"the card has no valid content_hash (got {card.get('content_hash')!r})")
    if not isinstance(card.get("key"), str):
        raise _Problem(card_path, f"the card has no key (got {card.get('key')!r})")
    if key is not None and card["key"] != key:
        raise _Problem(card_path, f"the card's key {card['key']!r} does not match the entry's key {key!r}")
    if "card_hash" in card or version >= 2:
        if card.get("card_hash") != _card_hash(card):
            raise _Problem(card_path, "the card was edited after it was written (its card_hash does not match its "
                                      "contents: metrics or other fields changed)")
    elif hashlib.sha256(raw).hexdigest() not in legacy:
        raise _Problem(card_path, f"the card has no card_hash (format_version {version}) and is not a listed "
                                  f"version-1 card ({LEGACY_CARDS_FILE}): an edited card with its integrity "
                                  "hash removed is refused")
    if "spec" in card:
        try:
            got = spec_key(card["spec"])
        except SpecError as e:
            raise _Problem(card_path, f"the card's spec cannot be hashed ({e})") from None
        if got != card["key"]:
            raise _Problem(card_path, f"the card's spec hashes to {got}, not to its key {card['key']}")
    return card


def _read_weights(weights_path: Path, card: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    try:
        data = weights_path.read_bytes()
    except FileNotFoundError:
        raise _Problem(weights_path, "the weights file is missing although its card exists") from None
    except OSError as e:
        raise _Problem(weights_path, f"cannot read the weights file ({e})") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["content_hash"]:
        size = card.get("size_bytes")
        detail = ""
        if isinstance(size, int) and size != len(data):
            detail = f"; it is {len(data)} bytes, the card says {size}" + (
                " (truncated)" if len(data) < size else ""
            )
        raise _Problem(
            weights_path,
            f"sha256 {digest[:16]}... does not match the card's content_hash {card['content_hash'][:16]}...{detail}",
        )
    try:
        return safetensors.torch.load(data)  # never unpickles
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise _Problem(weights_path, f"not a valid safetensors file ({type(e).__name__}: {e})") from None


def reference_paths(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """``(<dir>/<name>.safetensors, <dir>/<name>.card.json)``."""
    _check_name(name, "reference name")
    d = Path(directory)
    return d / f"{name}.safetensors", d / f"{name}.card.json"


def save_reference(
    directory: str | os.PathLike[str], name: str, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any]
) -> dict[str, Any]:
    """Write a reference checkpoint; ``card`` must contain the ``spec`` (its key is computed from it).

    A card loaded from a :class:`ModelStore` can be passed as is; its store fields are recomputed.
    """
    if not isinstance(card, Mapping) or not isinstance(card.get("spec"), Mapping):
        raise CardError(f"reference {name!r}: the card must contain the training 'spec' (a dict)")
    weights_path, card_path = reference_paths(directory, name)
    key = spec_key(card["spec"])
    return _write_pair(weights_path, card_path, key, _prepare_tensors(state_dict), card)


def load_reference(
    directory: str | os.PathLike[str], name: str, expected_spec: Mapping[str, Any] | str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load and verify a reference checkpoint made from ``expected_spec`` (a spec dict, or its key).

    Raises :class:`MissingCheckpointError`, :class:`CorruptCheckpointError` or :class:`StaleCheckpointError`.
    """
    weights_path, card_path = reference_paths(directory, name)
    if isinstance(expected_spec, str):
        expected_key, expected = expected_spec, None
    else:
        expected_key, expected = spec_key(expected_spec), expected_spec
    hint = _refresh_hint(name)
    if not card_path.exists():
        if weights_path.exists():
            raise CorruptCheckpointError(
                f"reference checkpoint {name!r}: {card_path} is missing although {weights_path} exists. "
                f"Restore it from git or regenerate it with {hint}."
            )
        raise MissingCheckpointError(
            f"no reference checkpoint {name!r} in {Path(directory)} (looked for {weights_path.name} and "
            f"{card_path.name}). Create it with {hint}."
        )
    try:
        card = _read_card(card_path, None, legacy_card_digests(Path(directory)))
    except _Problem as p:
        raise CorruptCheckpointError(
            f"reference checkpoint {name!r} is corrupt: {p.path}: {p.problem}. "
            f"Restore it with `git checkout -- {p.path}` or regenerate it with {hint}."
        ) from None
    if card["key"] != expected_key:
        lines = [
            f"reference checkpoint {name!r} ({card_path}) is stale: the code or config that produced it changed "
            f"(its spec key is {card['key'][:16]}..., the current spec's is {expected_key[:16]}...)."
        ]
        if expected is None:
            lines.append("No current spec was given, so the differing fields cannot be listed.")
        elif not isinstance(card.get("spec"), Mapping):
            lines.append("Its card records no spec, so the differing fields cannot be listed.")
        else:
            diff = spec_diff(card["spec"], expected)
            lines.append("Spec fields that differ (reference -> current):")
            lines.extend(f"  {line}" for line in diff or ["(none by value; the encodings differ, e.g. 1 vs 1.0)"])
        lines.append(f"Refresh it with {hint}.")
        raise StaleCheckpointError("\n".join(lines))
    try:
        tensors = _read_weights(weights_path, card)
    except _Problem as p:
        raise CorruptCheckpointError(
            f"reference checkpoint {name!r} is corrupt: {p.path}: {p.problem}. "
            f"Restore it with `git checkout -- {p.path}` or regenerate it with {hint}."
        ) from None
    return tensors, card
