"""The one rule for a device name (``--device`` of the CLI, ``--circuits-device`` of the plugin, the
``device=`` of training): ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and only where torch can use it on
this machine. Checked before any work starts, so a typo does not cost a trained model."""

from __future__ import annotations

import re

from circuits.errors import SettingError

__all__ = ["check_device", "DEVICES"]

DEVICES = "cpu, cuda, cuda:N or mps"
_DEVICE_RE = re.compile(r"(cpu|cuda|mps)(:\d+)?")


def check_device(device, option: str = "--device") -> str:
    """``device`` (stripped) if torch can use it here, else a :class:`SettingError` naming ``option``
    (the setting the value came from) and the fix. torch is imported only for cuda / mps."""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device.strip()):
        raise SettingError(f"{option} {device!r} is not a device: expected {DEVICES}")
    device = device.strip()
    kind, _, index = device.partition(":")
    if kind == "cpu":
        if index not in ("", "0"):
            raise SettingError(f"{option} {device!r}: use cpu")
        return device
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            raise SettingError(f"{option} {device!r}: CUDA is not available on this machine (use {option} cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise SettingError(f"{option} {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise SettingError(f"{option} {device!r}: MPS is not available on this machine (use {option} cpu)")
    elif kind == "mps" and index:
        raise SettingError(f"{option} {device!r}: use mps")
    return device
