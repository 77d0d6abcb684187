"""`python -m circuits ...` run inside the test process: the same `cli.main`, its exit code, stdout and
stderr as a `subprocess.CompletedProcess`, without the ~2-3 s a fresh interpreter spends importing torch
(the CLI tests made ~25 such processes). Tests that need real processes (two trainings racing for the
store's lock, bitwise determinism across processes, the `python -m circuits` entry point itself) keep
using subprocesses.

An exception escaping `cli.main` propagates, so a test that once checked "no Traceback in stderr" still
fails on one. What goes through `warnings` or `logging` reaches pytest's capture, not `stderr` here. Environment variables, the working directory, torch's thread count and the zoo's
registry are restored afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def _environ(env: dict):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update({k: str(v) for k, v in env.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _chdir(path):  # contextlib.chdir is Python 3.11+
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _tiny_registered():
    """The tiny bracket model registered, and each training appended to $TRAIN_LOG (after sleeping
    $TRAIN_SLEEP seconds), as the subprocess helper of test_cli.py does."""
    from circuits.zoo import registry as zoo
    from test_train_zoo import tiny_entry

    real = zoo.train_entry

    def counted(entry, seed, *a, **k):
        with open(os.environ["TRAIN_LOG"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(float(os.environ.get("TRAIN_SLEEP", "0")))
        return real(entry, seed, *a, **k)

    entry = tiny_entry()
    had = zoo.ZOO.get(entry.name)
    zoo.ZOO[entry.name] = entry
    zoo.train_entry = counted
    try:
        yield
    finally:
        zoo.train_entry = real
        if had is None:
            zoo.ZOO.pop(entry.name, None)
        else:
            zoo.ZOO[entry.name] = had


def run_cli(*args, env=None, tiny: bool = False, cwd=None) -> subprocess.CompletedProcess:
    from circuits import cli

    out, err = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_environ(env or {}))
        stack.enter_context(_chdir(cwd or REPO))
        if tiny:
            stack.enter_context(_tiny_registered())
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["python", "-m", "circuits", *map(str, args)], code, out.getvalue(),
                                       err.getvalue())
