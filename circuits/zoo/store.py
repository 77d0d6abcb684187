"""Content-addressed store for trained model weights, plus committed reference checkpoints.

Keys
----
A model is identified by a *spec*: a JSON-able dict that the caller builds from everything that
determines the trained weights (model config, data recipe, seed, training recipe, training-code
version, torch version). :func:`spec_key` hashes a canonical JSON encoding of it (sorted keys, no
whitespace, strict JSON: no NaN/inf, string keys only) with sha256 and returns the full 64-char hex
digest.  Note ``1`` and ``1.0`` are different specs; tuples are encoded as lists.

Cache location
--------------
:func:`default_root` is where :class:`ModelStore` keeps its entries when no ``root`` is given:

:func:`default_cache_dir` ``(root)`` is where a :class:`ModelStore` keeps its entries:

* ``$CIRCUITS_CACHE`` if that environment variable is set and non-empty (``~`` is expanded);
* otherwise ``<root>/.circuits-cache``, where ``root`` is the caller's project folder (the pytest
  plugin passes its rootdir, the CLI the current directory) -- never the package's own folder, so an
  installed wheel does not write next to itself. ``ModelStore()`` without a root uses the current
  directory.

``$CIRCUITS_LOCK_TIMEOUT`` (seconds, default 7200) bounds how long a process waits for another one
that is building the same model (and for the machine's multi-threaded training slot,
:func:`circuits.zoo.train.training_slot`). Bad values of either are a :class:`SettingError`;
:func:`check_environment` checks both up front (the CLI calls it before any training).

Layout
------
::

    <root>/<key>/weights.safetensors   the tensors (safetensors format; never pickle); a replacement
                                       of an existing entry is written as weights-<sha16>.safetensors
    <root>/<key>/card.json             metadata naming its weights file; written last, so its presence
                                       marks a complete entry, and replacing it is the one atomic step
                                       that switches an entry from the old weights to the new ones
    <root>/<key>.lock                  inter-process lock (filelock), left in place on purpose
    <root>/<key>.owner.json            who holds the lock right now (for the timeout message)

The card adds ``key``, ``content_hash`` (sha256 of the weights file bytes), ``created`` (UTC,
ISO 8601), ``format_version``, ``weights_file``, ``size_bytes`` and ``card_hash`` (sha256 of the
card's own canonical JSON without that field: an edited metric is detected) to the caller's fields;
:meth:`ModelStore.get_or_create` also records the ``spec``.  Every file is written to a temporary
file in the same directory and moved into place with :func:`os.replace`.

A damaged entry (unparseable or edited card, key mismatch, missing/truncated/modified weights, bad
safetensors) is reported with a :class:`CorruptCheckpointWarning`, removed, and treated as absent,
so the caller simply retrains.

Reference checkpoints
---------------------
Small checkpoints committed to the repository (``fixtures/models/``) are stored flat as
``<dir>/<name>.safetensors`` + ``<dir>/<name>.card.json`` (see :func:`save_reference` and
:func:`load_reference`).  They are never deleted automatically; problems raise
:class:`MissingCheckpointError`, :class:`CorruptCheckpointError` or :class:`StaleCheckpointError`.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import filelock
import safetensors.torch
import torch

from circuits.atomic import write_bytes_atomic
from circuits.errors import CircuitsError, SettingError, StoreError

__all__ = [
    "FORMAT_VERSION",
    "LEGACY_CARDS_FILE",
    "MIN_FREE_BYTES",
    "CardError",
    "CheckpointError",
    "CorruptCheckpointError",
    "CorruptCheckpointWarning",
    "LockTimeoutError",
    "MissingCheckpointError",
    "ModelStore",
    "SpecError",
    "StaleCheckpointError",
    "canonical_json",
    "check_environment",
    "default_cache_dir",
    "default_root",
    "legacy_card_digests",
    "lock_timeout_from_env",
    "load_reference",
    "reference_paths",
    "save_reference",
    "spec_diff",
    "spec_key",
]

log = logging.getLogger(__name__)

# 2: the card carries card_hash (required from this version on; version-1 cards, e.g. committed
# references written before it, still load)
FORMAT_VERSION = 2
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
CACHE_ENV = "CIRCUITS_CACHE"
LOCK_TIMEOUT_ENV = "CIRCUITS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 7200.0
#: Room a build needs beyond its weights (card, history, temporary files), see ModelStore.check_free_space.
MIN_FREE_BYTES = 4 << 20
#: How often a waiting process logs who holds the lock it waits for.
_LOCK_POLL = 15.0
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


# --------------------------------------------------------------------------------------------------
# errors and warnings


class SpecError(CircuitsError, TypeError, ValueError):
    """A spec that cannot be hashed: not strict JSON (the message names the offending field)."""


class CardError(CircuitsError, TypeError, ValueError):
    """A card (checkpoint metadata) that cannot be stored as JSON or contradicts its key."""


class LockTimeoutError(CircuitsError, TimeoutError):
    """Another process held a store lock for longer than the lock timeout."""


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


# --------------------------------------------------------------------------------------------------
# canonical JSON and keys


def _normalize(obj: Any, path: str, *, allow_nan: bool, what: type[Exception]) -> Any:
    """A plain-JSON copy of ``obj`` (dict/list/str/int/float/bool/None), or ``what`` naming the field."""
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not allow_nan and not math.isfinite(obj):
            raise what(f"{path} is {obj!r}; non-finite floats are not allowed here")
        return float(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise what(f"{path} has a non-string key {k!r} ({type(k).__name__}); JSON keys must be str")
            out[str(k)] = _normalize(v, f"{path}[{k!r}]", allow_nan=allow_nan, what=what)
        return out
    if isinstance(obj, (list, tuple)):
        return [_normalize(v, f"{path}[{i}]", allow_nan=allow_nan, what=what) for i, v in enumerate(obj)]
    raise what(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__} ({obj!r:.80}), which is not JSON-able; "
        "use str/int/float/bool/None, lists and dicts with str keys (convert tensors/arrays/paths/enums first)"
    )


def canonical_json(spec: Mapping[str, Any]) -> str:
    """The canonical JSON text of ``spec`` that :func:`spec_key` hashes."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"a spec must be a dict, got {type(spec).__name__}")
    plain = _normalize(spec, "spec", allow_nan=False, what=SpecError)
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def spec_key(spec: Mapping[str, Any]) -> str:
    """sha256 hex digest (64 chars) of the canonical JSON of ``spec``; :class:`SpecError` if not JSON-able."""
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "<spec>": obj}


def _short(value: Any, limit: int = 100) -> str:
    try:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spec_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable lines naming the (dotted) spec fields that differ between ``old`` and ``new``."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for field in sorted(set(a) | set(b)):
        if field not in b:
            lines.append(f"- {field}: {_short(a[field])} (only in the reference)")
        elif field not in a:
            lines.append(f"+ {field}: {_short(b[field])} (only in the current spec)")
        elif _short(a[field], 10**9) != _short(b[field], 10**9):
            lines.append(f"~ {field}: {_short(a[field])} -> {_short(b[field])}")
    return lines


# --------------------------------------------------------------------------------------------------
# file helpers


def default_cache_dir(root: str | os.PathLike[str]) -> Path:
    """``$CIRCUITS_CACHE`` if set (and non-empty), else ``<root>/.circuits-cache``
    (:func:`circuits.paths.cache_dir`, the one rule)."""
    from circuits.paths import cache_dir

    return cache_dir(Path(root).expanduser())


def default_root() -> Path:
    """:func:`default_cache_dir` of the current directory (what ``ModelStore()`` uses)."""
    return default_cache_dir(Path.cwd())


def lock_timeout_from_env() -> float:
    """``$CIRCUITS_LOCK_TIMEOUT`` in seconds (default 7200); :class:`SettingError` unless a number >= 0."""
    env = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not env:
        return DEFAULT_LOCK_TIMEOUT
    try:
        value = float(env)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SettingError(f"${LOCK_TIMEOUT_ENV}={env!r} is not a number of seconds >= 0 "
                           f"(e.g. {LOCK_TIMEOUT_ENV}=600; unset it for the default {DEFAULT_LOCK_TIMEOUT:g})")
    return value


def check_cache_dir(path: Path) -> Path:
    """``path`` if it can hold a model store: a folder, or not there yet below a folder we may write
    to. :class:`StoreError` naming the path otherwise (nothing is created here)."""
    from circuits.paths import check_output_dir

    hint = f"point ${CACHE_ENV} at a folder" if os.environ.get(CACHE_ENV, "").strip() else f"set ${CACHE_ENV}"
    try:
        return check_output_dir(path, "the model store", hint)
    except ValueError as e:
        raise StoreError(str(e)) from None


def check_environment(root: str | os.PathLike[str] | None = None) -> tuple[Path, float]:
    """Validate ``$CIRCUITS_CACHE`` (through the store folder it selects: :func:`default_cache_dir` of
    ``root``, default the current directory) and ``$CIRCUITS_LOCK_TIMEOUT`` before any work starts:
    ``(store folder, lock timeout)``, or the first problem as a one-line error."""
    folder = default_cache_dir(root) if root is not None else default_root()
    return check_cache_dir(folder), lock_timeout_from_env()


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


def owner_record(action: str, **extra: Any) -> dict[str, Any]:
    """Who is doing what: the sidecar written next to a lock, read back by :func:`describe_owner`."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "action": action, "since": _now(),
            "command": " ".join(sys.argv)[:300], **extra}


def describe_owner(owner_path: Path) -> str:
    """One phrase naming the holder recorded in ``owner_path`` (for lock-timeout messages)."""
    return _describe_owner(owner_path)


def _describe_owner(owner_path: Path) -> str:
    try:
        info = json.loads(owner_path.read_text())
    except (OSError, ValueError):
        return "the holder is unknown (no owner record; it may be another tool or an older version)"
    pid, host = info.get("pid"), info.get("host")
    text = (
        f"it is held by pid {pid} on host {host!r}, doing {info.get('action')!r} since {info.get('since')}"
        f" (command: {info.get('command')!r})"
    )
    if host == socket.gethostname() and isinstance(pid, int):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            text += "; that process no longer exists, so the owner record is stale and the lock is held elsewhere"
        except PermissionError:
            pass
    return text


# --------------------------------------------------------------------------------------------------
# the store


class _BuiltMeanwhile(Exception):
    """Internal: while this build waited with its lock released, another process stored the entry."""


class _Build:
    """The build :meth:`ModelStore.get_or_create` is running in this thread (a context variable), so
    code deep inside ``build()`` (the trainer's training slot) can name the model it trains and let go
    of the entry's lock while it waits for something else."""

    def __init__(self, store: "ModelStore", key: str, label: str, before: str | None) -> None:
        self.store, self.key, self.label, self.before = store, key, label, before


_BUILD: contextvars.ContextVar[_Build | None] = contextvars.ContextVar("circuits_store_build", default=None)


def current_build_label() -> str | None:
    """``"<name> seed <seed> (key <16 hex>)"`` of the store build running in this thread, else None."""
    b = _BUILD.get()
    return None if b is None else b.label


@contextlib.contextmanager
def build_lock_released() -> Iterator[None]:
    """Inside a store build: release the entry's lock for the body (a long wait for something else,
    e.g. the machine's training slot), take it back afterwards, and if another process stored the entry
    meanwhile, abandon this build (get_or_create then loads that entry). Waiting while holding the
    entry's lock would block everyone wanting this model, and two locks taken in opposite orders by two
    processes deadlock. Outside a build (or when the caller holds the lock itself too) a no-op."""
    b = _BUILD.get()
    released = b is not None and b.store._release_for_wait(b.key)
    if not released:
        yield
        return
    try:
        yield
    except BaseException:
        b.store._retake_after_wait(b.key)
        raise
    b.store._retake_after_wait(b.key)
    if b.store._card_digest(b.key) != b.before and b.store._readable(b.key):
        raise _BuiltMeanwhile(b.key)


class ModelStore:
    """Content-addressed cache of trained weights under ``root`` (default: :func:`default_root`)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, lock_timeout: float | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_root()
        if self.root.exists() and not self.root.is_dir():  # checked here, before any training starts
            check_cache_dir(self.root)
        self.lock_timeout = float(lock_timeout_from_env() if lock_timeout is None else lock_timeout)
        self._locks: dict[str, filelock.FileLock] = {}
        self._locks_guard = threading.Lock()
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # paths --------------------------------------------------------------------------------------
    def entry_dir(self, key: str) -> Path:
        return self.root / _check_name(key, "key")

    def weights_path(self, key: str) -> Path:
        """The weights file the entry's card names (``weights.safetensors`` when there is no card)."""
        name = WEIGHTS_FILE
        with contextlib.suppress(OSError, ValueError, AttributeError):
            named = json.loads(self.card_path(key).read_text()).get("weights_file")
            if isinstance(named, str) and _WEIGHTS_RE.fullmatch(named):
                name = named
        return self.entry_dir(key) / name

    def card_path(self, key: str) -> Path:
        return self.entry_dir(key) / CARD_FILE

    def lock_path(self, key: str) -> Path:
        return self.root / f"{_check_name(key, 'key')}.lock"

    def _owner_path(self, key: str) -> Path:
        return self.root / f"{key}.owner.json"

    # locking ------------------------------------------------------------------------------------
    def _lock_for(self, key: str) -> filelock.FileLock:
        with self._locks_guard:
            lock = self._locks.get(key)
            if lock is None:
                lock = self._locks[key] = filelock.FileLock(str(self.lock_path(key)))
            return lock

    def _mkdir_root(self) -> None:
        check_cache_dir(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _os_error(e, f"cannot create the model store folder {self.root}") from None

    def _write_owner(self, key: str, action: str) -> None:
        self._local.__dict__.setdefault("actions", {})[key] = action
        with contextlib.suppress(OSError):
            write_bytes_atomic(self._owner_path(key), json.dumps(owner_record(action, key=key)).encode())

    @contextlib.contextmanager
    def lock(self, key: str, action: str = "lock") -> Iterator[None]:
        """Hold the inter-process lock of ``key`` (re-entrant within a thread of this store object)."""
        _check_name(key, "key")
        depths: dict[str, int] = self._local.__dict__.setdefault("depths", {})
        lock = self._lock_for(key)
        outermost = depths.get(key, 0) == 0
        if outermost:
            self._mkdir_root()
            self._acquire(lock, key)
            self._write_owner(key, action)
        else:
            lock.acquire()  # re-entrant: returns at once
        depths[key] = depths.get(key, 0) + 1
        try:
            yield
        finally:
            depths[key] -= 1
            if depths[key] == 0:
                del depths[key]
                with contextlib.suppress(OSError):
                    self._owner_path(key).unlink()
            if lock.is_locked:  # (released and not retaken only if retaking failed: nothing to release)
                lock.release()

    def _release_for_wait(self, key: str) -> bool:
        """Let go of ``key``'s lock for a wait inside a build; False (nothing done) unless this thread
        holds it exactly once (a caller holding it around get_or_create keeps it)."""
        depths = self._local.__dict__.get("depths", {})
        lock = self._lock_for(key)
        if depths.get(key) != 1 or lock.lock_counter != 1:
            return False
        with contextlib.suppress(OSError):
            self._owner_path(key).unlink()
        lock.release()
        return True

    def _retake_after_wait(self, key: str) -> None:
        self._acquire(self._lock_for(key), key)
        self._write_owner(key, self._local.__dict__.get("actions", {}).get(key, "build"))

    def _acquire(self, lock: filelock.FileLock, key: str) -> None:
        start = time.monotonic()
        deadline = start + self.lock_timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                lock.acquire(timeout=max(0.0, min(_LOCK_POLL, remaining)))
                return
            except filelock.Timeout:
                waited = time.monotonic() - start
                holder = _describe_owner(self._owner_path(key))
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(
                        f"could not lock model store entry {key} ({self.lock_path(key)}) within "
                        f"{self.lock_timeout:g} s: {holder}. Another process is probably still training this model; "
                        f"wait for it, or raise ${LOCK_TIMEOUT_ENV} (seconds). The lock is released automatically "
                        "when its holder exits."
                    ) from None
                log.info("waiting %.0f s for the lock of %s: %s", waited, key, holder)
            except OSError as e:  # e.g. the .lock path is a folder, or the store is read-only
                raise _os_error(e, f"cannot lock model store entry {key} ({self.lock_path(key)})") from None

    def holder(self, key: str) -> str | None:
        """Who holds ``key``'s lock right now (another process, or another store object), else None."""
        if not self.lock_path(key).exists():
            return None
        probe = filelock.FileLock(str(self.lock_path(key)), thread_local=False)
        try:
            probe.acquire(timeout=0)
        except filelock.Timeout:
            return _describe_owner(self._owner_path(key))
        except OSError as e:
            raise _os_error(e, f"cannot lock model store entry {key} ({self.lock_path(key)})") from None
        probe.release()
        return None

    # core operations ----------------------------------------------------------------------------
    def save(self, key: str, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any]) -> dict[str, Any]:
        """Atomically write ``state_dict`` and ``card`` under ``key``; returns the full card.

        An existing entry stays loadable until the new one is complete: the new weights go to a file
        of their own, and replacing the card is the single step that switches to them."""
        return self._save(key, _prepare_tensors(state_dict), card)

    def _save(self, key: str, tensors: dict[str, torch.Tensor], card: Mapping[str, Any]) -> dict[str, Any]:
        data = safetensors.torch.save(tensors, metadata={"format": "pt"})
        with self.lock(key, "save"):
            entry = self.entry_dir(key)
            old = None
            if self.card_path(key).exists():
                old = self.weights_path(key).name
            name = WEIGHTS_FILE if old is None else f"weights-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
            full, card_bytes = _full_card(key, card, name, data)  # validate before touching disk
            try:
                if entry.is_dir():  # leftovers of writers killed mid-write (safe: we hold the lock)
                    for tmp in entry.glob(".*.tmp"):
                        with contextlib.suppress(OSError):
                            tmp.unlink()
                entry.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(entry / name, data)
                write_bytes_atomic(entry / CARD_FILE, card_bytes)  # the commit point
            except OSError as e:
                kept = "; the entry it was replacing is kept" if old is not None else "; nothing was stored"
                raise _os_error(e, f"cannot write model store entry {key} ({len(data)} bytes of weights)",
                                kept) from None
            for stale in entry.glob("weights*.safetensors"):  # the replaced weights, no card names them now
                if stale.name != name:
                    with contextlib.suppress(OSError):
                        stale.unlink()
            return full

    def _read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        card_path = self.card_path(key)
        if not card_path.exists():
            return None  # absent, or a write that never finished (no card = not an entry)
        card = _read_card(card_path, key)
        name = card.get("weights_file", WEIGHTS_FILE)
        if not isinstance(name, str) or not _WEIGHTS_RE.fullmatch(name):
            raise _Problem(card_path, f"the card names no valid weights file (weights_file={name!r})")
        return _read_weights(self.entry_dir(key) / name, card), card

    def _card_digest(self, key: str) -> str | None:
        try:
            return hashlib.sha256(self.card_path(key).read_bytes()).hexdigest()
        except OSError:
            return None

    def _readable(self, key: str) -> bool:
        try:
            return self._read(key) is not None
        except _Problem:
            return False

    def verify(self, key: str) -> tuple[str, str]:
        """``("ok" | "absent" | "corrupt", detail)``: the whole entry checked (card, hashes, safetensors),
        read-only (a corrupt entry is not removed; :meth:`load` removes it)."""
        try:
            return ("ok", "") if self._read(key) is not None else ("absent", "")
        except _Problem as p:
            return "corrupt", f"{p.path.name}: {p.problem}"

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(state_dict, card)``, or None if absent.  A corrupt entry is warned about, removed, and None returned."""
        _check_name(key, "key")
        try:
            return self._read(key)
        except _Problem:
            pass
        # Re-check under the lock: a writer may have been mid-save; only a still-bad entry is removed.
        with self.lock(key, "repair"):
            try:
                return self._read(key)
            except _Problem as p:
                self._rmtree(key)  # raises StoreError when it cannot: then nothing claims it was removed
                warnings.warn(
                    CorruptCheckpointWarning(
                        f"corrupt model store entry {key}: {p.path}: {p.problem}; removed it, the model will be rebuilt"
                    ),
                    stacklevel=2,
                )
                return None

    def check_free_space(self, expected_bytes: int | None = None) -> None:
        """StoreError before a build when the store's filesystem has too little room left for its
        result: twice ``expected_bytes`` (the weights, and the new file beside a replaced one) plus
        MIN_FREE_BYTES for the card and temporary files. Found after a long training, a full disk
        would waste it. A filesystem that cannot say (an OSError) is not checked."""
        probe = self.root
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        try:
            free = shutil.disk_usage(probe).free
        except OSError:
            return
        needed = 2 * max(int(expected_bytes or 0), 0) + MIN_FREE_BYTES
        if free < needed:
            mib = 1 << 20
            raise StoreError(f"model store {self.root}: only {free / mib:.1f} MiB free on its filesystem, a build "
                             f"needs about {needed / mib:.1f} MiB (weights {int(expected_bytes or 0) / mib:.1f} MiB "
                             f"x 2 + {MIN_FREE_BYTES / mib:.0f} MiB); free some space or point ${CACHE_ENV} at "
                             "another disk (checked before training, so none is wasted)")

    def get_or_create(
        self,
        spec: Mapping[str, Any],
        build: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
        *,
        force: bool = False,
        expected_bytes: int | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], bool]:
        """Load the entry for ``spec`` or build it (exactly once across processes); ``(state_dict, card, created)``.

        ``build()`` returns ``(state_dict, extra_card_fields)``; the saved card holds those fields, the spec,
        ``build_seconds`` (unless given) and the store's own fields; ``expected_bytes`` (the weights' size,
        when known) sizes the free-space check made before ``build()`` runs.  ``force=True`` rebuilds even if present
        (unless another process stores a fresh one while this build waits, see :func:`build_lock_released`);
        the old entry stays loadable until the rebuilt one is complete.
        """
        key = spec_key(spec)
        plain_spec = json.loads(canonical_json(spec))
        if not force:
            got = self.load(key)  # fast path, no lock
            if got is not None:
                return got[0], got[1], False
        with self.lock(key, "build"):
            if not force:
                got = self.load(key)  # someone may have built it while we waited
                if got is not None:
                    return got[0], got[1], False
            self.check_free_space(expected_bytes)
            label = f"{plain_spec.get('name', 'model')} seed {plain_spec.get('seed', '?')} (key {key[:16]})"
            token = _BUILD.set(_Build(self, key, label, self._card_digest(key)))
            t0 = time.perf_counter()
            try:
                result = build()
            except _BuiltMeanwhile:
                got = self.load(key)
                if got is not None:
                    return got[0], got[1], False
                raise StoreError(f"model store entry {key} was stored by another process and then vanished") from None
            finally:
                _BUILD.reset(token)
            seconds = time.perf_counter() - t0
            if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], Mapping)):
                raise TypeError(
                    f"build() must return (state_dict, extra_card_fields: dict), got {type(result).__name__}"
                )
            state_dict, extra = result
            card = dict(extra)
            if "spec" in card and card["spec"] != plain_spec:
                raise CardError("build() returned a card field 'spec' that differs from the spec being built")
            card["spec"] = plain_spec
            card.setdefault("build_seconds", round(seconds, 3))
            tensors = _prepare_tensors(state_dict)
            full = self._save(key, tensors, card)
            return tensors, full, True

    def put(self, spec: Mapping[str, Any], weights: bytes, card: Mapping[str, Any]) -> dict[str, Any]:
        """Store weights built elsewhere (e.g. a Ray worker): safetensors ``weights`` bytes and the card's
        fields; the spec is recorded and checked like :meth:`get_or_create`'s. Returns the full card."""
        try:
            tensors = safetensors.torch.load(weights)  # parses, never unpickles
        except Exception as e:  # noqa: BLE001 - any parse failure means bad bytes
            raise CardError(f"the weights sent for {spec_key(spec)[:16]} are not safetensors ({e})") from None
        key = spec_key(spec)
        plain_spec = json.loads(canonical_json(spec))
        fields = {k: v for k, v in card.items() if k not in _RESERVED}
        if "spec" in fields and fields["spec"] != plain_spec:
            raise CardError("the card's 'spec' differs from the spec it is stored under")
        fields["spec"] = plain_spec
        return self._save(key, tensors, fields)

    def entries(self, verify: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """``(key, card)`` of every complete entry whose card parses, sorted by key; with ``verify``,
        only entries whose weights also check out (see :meth:`damaged` for the others)."""
        out = []
        for key, card, problem in self._scan(verify):
            if problem is None:
                out.append((key, card))
        return out

    def damaged(self) -> list[tuple[str, dict[str, Any] | None, str]]:
        """``(key, card or None, problem)`` of every entry that would not load (fully verified)."""
        return [(k, c, p) for k, c, p in self._scan(True) if p is not None]

    def unreadable(self) -> dict[str, str]:
        """``{key: problem}`` of every entry whose card cannot be read at all (so :meth:`entries`
        cannot say which model it held); read-only."""
        return {k: p for k, c, p in self._scan(False) if c is None and p is not None}

    def _scan(self, verify: bool) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if not entry.is_dir() or not _NAME_RE.fullmatch(entry.name):
                continue
            card_path = entry / CARD_FILE
            if not card_path.exists():
                continue  # a write in progress or one that never finished: not an entry
            try:
                card = _read_card(card_path, entry.name)
            except _Problem as p:
                yield entry.name, None, f"{p.path.name}: {p.problem}"
                continue
            if verify:
                status, detail = self.verify(entry.name)
                if status != "ok":
                    yield entry.name, card, detail or status
                    continue
            yield entry.name, card, None

    def remove(self, key: str) -> bool:
        """Delete the entry; True if there was one."""
        with self.lock(key, "remove"):
            return self._rmtree(key)

    def _rmtree(self, key: str) -> bool:
        entry = self.entry_dir(key)
        if not entry.exists():
            return False
        card = entry / CARD_FILE
        try:  # first, so a half-removed entry is never seen as complete
            if card.is_dir() and not card.is_symlink():
                shutil.rmtree(card)
            else:
                card.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise _os_error(e, f"cannot remove model store entry {key}") from None
        shutil.rmtree(entry, ignore_errors=True)
        if card.exists() or card.is_symlink():
            raise StoreError(f"cannot remove model store entry {key}: {card} is still there")
        return True


# --------------------------------------------------------------------------------------------------
# reference checkpoints (committed, never deleted automatically)


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
