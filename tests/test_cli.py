"""The CLI validates before it trains, reuses what the store has, and waits for a training in progress."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_run import run_cli

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# the CLI with the tiny test model registered, in real processes racing for the store's lock (a go-file
# lines them up)
CLI_WITH_TINY = """
import os, sys, time
sys.path.insert(0, {tests!r})
from test_train_zoo import tiny_entry
from circuits import cli
from circuits.zoo import registry as zoo
zoo.register(tiny_entry())
real = zoo.train_entry
def counted(entry, seed, *a, **k):
    with open(os.environ["TRAIN_LOG"], "a") as fh:
        fh.write(f"{{os.getpid()}}\\n")
    time.sleep(float(os.environ.get("TRAIN_SLEEP", "0")))  # a longer training, so the other one waits
    return real(entry, seed, *a, **k)
zoo.train_entry = counted
go = os.environ.get("GO_FILE")
while go and not os.path.exists(go):
    time.sleep(0.01)
sys.exit(cli.main(sys.argv[1:]))
"""


def cli(*args, env=None, tiny=False, cwd=None):
    """The CLI in this process (tests/cli_run.py); the racing test below uses real processes."""
    return run_cli(*args, env=env, tiny=tiny, cwd=cwd)


def one_line_error(out, fragment):
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("device, fragment", [("banana", "'banana' is not a device"),
                                              ("cuda", "CUDA is not available"), ("cpu:3", "use cpu")])
def test_train_bad_device_fails_before_training(device, fragment, tmp_path):
    """It trained the whole model, stored it, then died in model.to with a torch traceback."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    log = tmp_path / "trained.log"
    out = cli("train", "tiny_brackets", "--device", device, tiny=True,
              env={"CIRCUITS_CACHE": str(tmp_path / "c"), "TRAIN_LOG": str(log)})
    one_line_error(out, fragment)
    assert not log.exists() and not (tmp_path / "c").exists(), "nothing trained, nothing written"


@pytest.mark.parametrize("env, fragment", [
    ({"CIRCUITS_LOCK_TIMEOUT": "abc"}, "CIRCUITS_LOCK_TIMEOUT='abc' is not a number of seconds"),
    ({"CIRCUITS_CACHE": "FILE"}, "is not a folder"),
])
def test_train_bad_environment_fails_before_training(env, fragment, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    env = {k: (str(afile) if v == "FILE" else v) for k, v in env.items()}
    env.setdefault("CIRCUITS_CACHE", str(tmp_path / "c"))
    log = tmp_path / "trained.log"
    out = cli("train", "tiny_brackets", tiny=True, env={**env, "TRAIN_LOG": str(log)})
    one_line_error(out, fragment)
    assert not log.exists()


def test_train_huge_seed_is_one_clear_error(tmp_path):
    """Seeds >= 2**63 were a ValueError traceback."""
    out = cli("train", "brackets", "--seed", str(2**64), env={"CIRCUITS_CACHE": str(tmp_path)})
    one_line_error(out, "too large")
    out = cli("sweep", "brackets", "--seeds", "0-99999999999999999999", env={"CIRCUITS_CACHE": str(tmp_path)})
    one_line_error(out, "too large")


def test_train_reuses_and_force_retrains(tmp_path):
    env = {"CIRCUITS_CACHE": str(tmp_path / "c"), "TRAIN_LOG": str(tmp_path / "trained.log")}
    first = cli("train", "tiny_brackets", "--seed", "1", tiny=True, env=env)
    assert first.returncode == 0, first.stderr
    again = cli("train", "tiny_brackets", "--seed", "1", tiny=True, env=env)
    assert again.returncode == 0 and "already in the model store" in again.stderr, again.stderr
    assert (tmp_path / "trained.log").read_text().count("\n") == 1, "the second call reused it"
    forced = cli("train", "tiny_brackets", "--seed", "1", "--force", tiny=True, env=env)
    assert forced.returncode == 0 and "done in" in forced.stderr, forced.stderr
    assert (tmp_path / "trained.log").read_text().count("\n") == 2


def test_two_processes_train_once_and_the_second_waits(tmp_path):
    """Four `train` calls for one model trained it four times; now one trains, the other waits for it."""
    go = tmp_path / "go"
    env = {**os.environ, "CIRCUITS_CACHE": str(tmp_path / "c"), "TRAIN_LOG": str(tmp_path / "trained.log"),
           "GO_FILE": str(go), "TRAIN_SLEEP": "3"}
    script = CLI_WITH_TINY.format(tests=str(TESTS))
    procs = [subprocess.Popen([sys.executable, "-c", script, "train", "tiny_brackets", "--seed", "2"], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert (tmp_path / "trained.log").read_text().count("\n") == 1, outs
    errs = " ".join(err for _, err in outs)
    assert "reused from the model store" in errs, errs


def test_list_shows_a_truncated_entry_as_corrupt(tmp_path, monkeypatch):
    """`list` reported a truncated entry as cached."""
    sys.path.insert(0, str(TESTS))
    from test_train_zoo import tiny_entry

    from circuits import cli as C
    from circuits.zoo import registry as zoo
    from circuits.zoo.store import ModelStore, spec_key

    entry = tiny_entry()
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path))
    zoo.load(entry.name, seed=2, store=ModelStore(tmp_path))
    assert C._status(entry.name)[1] == "cached seeds [2]"
    w = ModelStore(tmp_path).weights_path(spec_key(entry.spec(2)))
    w.write_bytes(w.read_bytes()[:50])
    assert C._status(entry.name)[1] == "not cached, corrupt seeds [2] (retrained on use)"


def test_sweep_bad_settings_are_one_line(tmp_path):
    out = cli("sweep", "brackets", "--seeds", "0-1", "--device", "banana", env={"CIRCUITS_CACHE": str(tmp_path)})
    one_line_error(out, "not a device")
    out = cli("sweep", "brackets", "--seeds", "0-1", "--workers", "0", env={"CIRCUITS_CACHE": str(tmp_path)})
    one_line_error(out, "workers must be a positive integer")
    out = cli("sweep", "nope", "--seeds", "0", env={"CIRCUITS_CACHE": str(tmp_path)})
    one_line_error(out, "unknown model 'nope'")


def test_card_shows_the_test_accuracys_interval(capsys):
    """The bracket reference's card: its 100k-string test accuracy and the Wilson 95% interval."""
    from circuits.cli import main

    assert main(["card", "brackets"]) == 0
    card = json.loads(capsys.readouterr().out)
    acc, wil = card["metrics"]["test_acc"], card["test_acc_wilson95"]
    assert wil["n_test"] == 100_000 and wil["lo"] < acc < wil["hi"] and wil["hi"] - wil["lo"] < 0.0005
