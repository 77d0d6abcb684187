"""circuits.heap: freed memory kept in glibc's heap (the main job's setting, hypotheses/conftest.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from circuits import heap
from circuits.errors import SettingError

# In a fresh interpreter (mallopt is process-wide): glibc's mmapped bytes (mallinfo2's hblkhd) while a
# 40 MiB tensor is alive, less those before it, after keep_freed_memory() or not. Prints "<applied> <bytes>".
PROBE = r"""
import ctypes, sys, torch
from circuits.heap import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory()
before = libc.mallinfo2().hblkhd
t = torch.ones(10 * 2**20)  # 40 MiB: above glibc's largest default threshold (32 MiB), below ours
print(applied, libc.mallinfo2().hblkhd - before)
"""


def _glibc_with_mallinfo2() -> bool:
    lib = heap._glibc()
    return lib is not None and hasattr(lib, "mallinfo2")


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
@pytest.mark.parametrize("mode, applied", [("keep", True), ("system", False)])
def test_a_large_tensor_comes_from_the_heap_only_when_kept(mode, applied, monkeypatch):
    monkeypatch.setenv(heap.HEAP_ENV, mode)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(applied)
    mmapped = int(out[1])
    if applied:
        assert mmapped < 2**20, f"{mmapped} bytes mmapped with the heap kept"
    else:  # glibc's default: a 40 MiB block is mmapped on its own
        assert mmapped >= 40 * 2**20, f"only {mmapped} bytes mmapped under glibc's defaults"


@pytest.mark.parametrize("kwargs", [{"mmap_threshold": -1}, {"trim_threshold": 2**31}, {"top_pad": 1.5},
                                    {"mmap_threshold": True}])
def test_bad_values_are_refused_before_anything_is_set(kwargs, monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: pytest.fail("mallopt reached"))
    monkeypatch.setattr(heap, "_applied", False)
    name = next(iter(kwargs))
    with pytest.raises(SettingError, match=name):
        heap.keep_freed_memory(**kwargs)


def test_an_unknown_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv(heap.HEAP_ENV, "kepp")
    with pytest.raises(SettingError, match=r"\$CIRCUITS_HEAP='kepp'.*'keep' or 'system'"):
        heap.keep_freed_memory()


def test_system_mode_leaves_glibc_alone(monkeypatch):
    monkeypatch.setenv(heap.HEAP_ENV, "system")
    monkeypatch.setattr(heap, "_glibc", lambda: pytest.fail("mallopt reached"))
    monkeypatch.setattr(heap, "_applied", False)
    assert heap.keep_freed_memory() is False


def test_without_glibc_it_is_a_no_op(monkeypatch):
    monkeypatch.delenv(heap.HEAP_ENV, raising=False)
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    monkeypatch.setattr(heap, "_applied", False)
    assert heap.keep_freed_memory() is False
