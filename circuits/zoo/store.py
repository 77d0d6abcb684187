"""Content-addressed store for trained model weights (the model zoo's cache).

Spec keys are :mod:`circuits.zoo.spec`'s, the store's folder and lock timeout :mod:`circuits.zoo.settings`',
the weight/card files :mod:`circuits.zoo.checkpoints`'; this module holds the store itself and its locks.

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
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
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
from circuits.errors import CircuitsError, StoreError
from circuits.zoo.spec import SpecError, canonical_json, spec_diff, spec_key  # noqa: F401
from circuits.zoo.settings import CACHE_ENV, LOCK_TIMEOUT_ENV, check_cache_dir, check_environment, default_cache_dir, default_root, lock_timeout_from_env  # noqa: F401
from circuits.zoo.checkpoints import CARD_FILE, CardError, CheckpointError, CorruptCheckpointError, CorruptCheckpointWarning, FORMAT_VERSION, LEGACY_CARDS_FILE, MissingCheckpointError, StaleCheckpointError, WEIGHTS_FILE, _NAME_RE, _Problem, _RESERVED, _WEIGHTS_RE, _check_name, _full_card, _now, _os_error, _prepare_tensors, _read_card, _read_weights, legacy_card_digests, load_reference, reference_paths, save_reference  # noqa: F401

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
#: Room a build needs beyond its weights (card, history, temporary files), see ModelStore.check_free_space.
MIN_FREE_BYTES = 4 << 20
#: How often a waiting process logs who holds the lock it waits for.
_LOCK_POLL = 15.0


class LockTimeoutError(CircuitsError, TimeoutError):
    """Another process held a store lock for longer than the lock timeout."""


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
