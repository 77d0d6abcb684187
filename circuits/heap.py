"""Keep freed memory in the process's heap (glibc ``mallopt``), so that the next tensor of the same size
reuses it instead of asking the kernel for fresh, zeroed pages.

Why: glibc serves an allocation above its mmap threshold (128 KiB, adapting up to 32 MiB) with a fresh
``mmap`` and gives it back on free. A claim that builds [5,000 strings x 42 positions x ...] activations
(47 MiB each, a pattern 70 MiB) over and over then pays a page fault per 4 KiB page, in the kernel, every
time: ``hypotheses/test_brackets.py`` spent 43 of its 121 CPU seconds in system time that way (1 thread,
2026-12-07). With the thresholds raised the freed blocks stay in the heap and are reused (system time
~2 s), at the price of a higher peak RSS (the heap is not trimmed back). torch's CPU allocator calls
glibc's malloc, so this covers tensors.

Process-wide and irreversible for the process's lifetime in effect (freed memory stays mapped), so it is
opt-in: ``hypotheses/conftest.py`` turns it on for the main job (``$CIRCUITS_HEAP=system`` keeps glibc's
defaults). A no-op, returning False, where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from circuits.errors import SettingError

__all__ = ["keep_freed_memory", "HEAP_ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "TOP_PAD"]

HEAP_ENV = "CIRCUITS_HEAP"
# mallopt's parameter numbers (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# Allocations up to 64 MiB come from the heap; the heap's top is given back only above 256 MiB free.
# hypotheses/test_brackets.py, 1 thread, one process each (2026-12-07 16:2x-16:3x UTC, load 2-3): glibc's
# defaults 78.4 user + 42.9 sys CPU s, peak RSS 1.74 GB; 64 / 256 MiB: 75.7 + 1.6, 2.52 GB; 256 / 512 MiB:
# 74.0 + 2.2, 3.15 GB; 1 GiB / 2 GiB (64 MiB top pad): 73.5 + 1.8, 2.88 GB. The smallest thresholds that
# remove the system time hold the least memory.
MMAP_THRESHOLD = 64 * 2**20
TRIM_THRESHOLD = 256 * 2**20
TOP_PAD = 0

_applied: bool = False


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD,
                      top_pad: int = TOP_PAD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (see the module docstring). True when set
    (or already set by an earlier call), False where there is no glibc or ``$CIRCUITS_HEAP=system``.
    Values must be ints in [0, 2**31 - 1] (mallopt takes a C int); anything else is a SettingError, as
    is an unknown ``$CIRCUITS_HEAP``."""
    global _applied
    mode = os.environ.get(HEAP_ENV, "").strip().lower()
    if mode not in ("", "keep", "system"):
        raise SettingError(f"${HEAP_ENV}={mode[:40]!r}: expected 'keep' or 'system' (glibc's defaults)")
    if mode == "system":
        return False
    values = {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold, "top_pad": top_pad}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
            raise SettingError(f"keep_freed_memory: {name}={value!r} must be an int in [0, 2**31 - 1] bytes")
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    for param, value in ((_M_MMAP_THRESHOLD, mmap_threshold), (_M_TRIM_THRESHOLD, trim_threshold),
                         (_M_TOP_PAD, top_pad)):
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            raise SettingError(f"glibc refused mallopt({param}, {value})")
    _applied = True
    return True
