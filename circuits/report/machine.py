"""Where and from what a run ran: machine, library versions, git commit. The one place that asks.

A leaf module (but for the records): the collector stores what these return, and the renderers show it through
:func:`commit_text` / :func:`versions_text`, so a change of wording happens here once.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from circuits.records import GitInfo, MachineInfo, as_run

__all__ = ["machine_info", "git_info", "now_iso", "commit_text", "versions_text"]


def machine_info(device: str = "cpu") -> MachineInfo:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return MachineInfo(platform=platform.platform(), machine=platform.machine(), python=platform.python_version(),
                       torch=version("torch"), numpy=version("numpy"), pytest=version("pytest"),
                       circuits=version("pytest-circuits"), cpu_count=os.cpu_count(), cpus_usable=usable,
                       device=device)


def git_info(cwd: Path | str) -> GitInfo:
    """Commit, dirty flag and branch via ``git``; all None where there is no git or no repo."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return GitInfo()
    status = run("status", "--porcelain", "--untracked-files=no")
    return GitInfo(commit=commit, dirty=bool(status) if status is not None else None,
                   branch=run("rev-parse", "--abbrev-ref", "HEAD"))


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def commit_text(report: Any, dirty_mark: str = " (dirty)") -> str:
    """``1a2b3c4d5e (dirty)``, or ``no git`` (``report``: a :class:`~circuits.records.Run`)."""
    g = as_run(report).git
    return (g.commit or "no git")[:10] + (dirty_mark if g.dirty else "")


def versions_text(report: Any) -> str:
    m = as_run(report).machine
    return f"python {m.python}, torch {m.torch}, numpy {m.numpy}, pytest {m.pytest}, circuits {m.circuits}"
