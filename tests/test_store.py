"""Tests of the content-addressed model store and the reference checkpoints (real files, real processes)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch

from circuits.zoo import checkpoints
from circuits.zoo import store as store_mod
from circuits.errors import CircuitsError, SettingError, StoreError
from circuits.zoo.store import (
    CardError,
    CorruptCheckpointError,
    CorruptCheckpointWarning,
    LockTimeoutError,
    MissingCheckpointError,
    ModelStore,
    SpecError,
    StaleCheckpointError,
    check_environment,
    default_cache_dir,
    default_root,
    load_reference,
    lock_timeout_from_env,
    save_reference,
    spec_key,
)

SPEC = {
    "model": {"d_model": 32, "n_heads": 4, "n_layers": 1},
    "data": {"task": "modadd", "p": 7},
    "seed": 0,
    "train": {"lr": 1e-3, "steps": 10},
    "code_version": "1",
    "torch": "2.13.0",
}


def make_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.W_E": torch.randn(7, 32, generator=g),
        "blocks.0.attn.W_Q": torch.randn(4, 32, 8, generator=g).transpose(1, 2),  # non-contiguous
        "blocks.0.ln.w": torch.ones(32, dtype=torch.float16),
        "steps": torch.tensor(10, dtype=torch.int64),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def saved_entry(root: Path) -> tuple[ModelStore, str, dict[str, torch.Tensor]]:
    s = ModelStore(root)
    key = spec_key(SPEC)
    sd = make_state()
    s.save(key, sd, {"spec": SPEC, "metrics": {"loss": 0.5}})
    return s, key, sd


def expect_corrupt_then_rebuild(s: ModelStore, key: str, fragment: str) -> None:
    with pytest.warns(CorruptCheckpointWarning) as rec:
        assert s.load(key) is None
    msg = str(rec[0].message)
    assert fragment in msg and key in msg, msg
    assert not s.entry_dir(key).exists()  # removed
    calls = []

    def build():
        calls.append(1)
        return make_state(), {}

    sd, card, created = s.get_or_create(SPEC, build)
    assert created and calls == [1]
    assert_same(sd, make_state())


# ---------------------------------------------------------------------------------------------- keys


def test_spec_key_is_canonical_and_full_length():
    reordered = {k: SPEC[k] for k in reversed(list(SPEC))}
    assert spec_key(SPEC) == spec_key(reordered)
    assert len(spec_key(SPEC)) == 64 and int(spec_key(SPEC), 16) >= 0
    assert spec_key(SPEC) != spec_key({**SPEC, "seed": 1})
    assert spec_key({"a": (1, 2)}) == spec_key({"a": [1, 2]})
    assert spec_key({"a": 1}) != spec_key({"a": 1.0})


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"lr": float("nan")}, "spec['lr']"),
        ({"x": {1: 2}}, "non-string key"),
        ({"x": [Path("/tmp")]}, "spec['x'][0]"),
        ({"w": torch.zeros(2)}, "not JSON-able"),
        ([1, 2], "must be a dict"),
    ],
)
def test_spec_key_rejects_non_json(bad, fragment):
    with pytest.raises(SpecError, match=None) as exc:
        spec_key(bad)
    assert fragment in str(exc.value)
    assert isinstance(exc.value, CircuitsError)


# ---------------------------------------------------------------------------------------------- roundtrip


def test_roundtrip(tmp_path):
    s, key, sd = saved_entry(tmp_path)
    got = s.load(key)
    assert got is not None
    loaded, card = got
    assert_same(loaded, {k: v.contiguous() for k, v in sd.items()})
    assert card["key"] == key and card["spec"] == SPEC and card["metrics"] == {"loss": 0.5}
    assert card["format_version"] == store_mod.FORMAT_VERSION and card["created"]
    assert card["content_hash"] == __import__("hashlib").sha256(s.weights_path(key).read_bytes()).hexdigest()
    assert s.entries() == [(key, card)]
    assert s.remove(key) and not s.remove(key)
    assert s.load(key) is None and s.entries() == []


def test_get_or_create_builds_once_and_records_spec(tmp_path):
    s = ModelStore(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return make_state(), {"metrics": {"acc": 1.0}, "wall_s": 1.5}

    sd1, card1, created1 = s.get_or_create(SPEC, build)
    sd2, card2, created2 = s.get_or_create(SPEC, build)
    assert (created1, created2) == (True, False) and calls == [1]
    assert_same(sd1, sd2)
    assert card1 == card2 and card2["spec"] == SPEC and card2["wall_s"] == 1.5 and "build_seconds" in card2
    _, _, created3 = s.get_or_create(SPEC, build, force=True)
    assert created3 and calls == [1, 1]
    with pytest.raises(TypeError, match="build\\(\\) must return"):
        s.get_or_create({"other": 1}, lambda: make_state())


def test_save_rejects_bad_cards(tmp_path):
    s = ModelStore(tmp_path)
    key = spec_key(SPEC)
    with pytest.raises(CircuitsError, match="card\\['metrics'\\]"):
        s.save(key, make_state(), {"metrics": torch.tensor(1.0)})
    with pytest.raises(CircuitsError, match="hashes to"):
        s.save(key, make_state(), {"spec": {**SPEC, "seed": 99}})
    with pytest.raises(ValueError, match="invalid key"):
        s.save("../escape", make_state(), {})
    assert s.load(key) is None  # nothing was written


# ---------------------------------------------------------------------------------------------- atomicity


def _visible_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def test_crash_before_weights_rename_leaves_no_entry(tmp_path, monkeypatch):
    s = ModelStore(tmp_path)
    key = spec_key(SPEC)

    def crash(src, dst):
        raise OSError("simulated crash between temp write and rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        s.save(key, make_state(), {"spec": SPEC})
    monkeypatch.undo()
    assert _visible_files(s.entry_dir(key)) == []  # no partial file under the final names
    assert list(s.entry_dir(key).glob("*.tmp")) == []  # the temp file was cleaned up too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unfinished write is "absent", not "corrupt"
        assert s.load(key) is None
    assert s.entries() == []


def test_crash_between_weights_and_card_leaves_no_entry(tmp_path, monkeypatch):
    s = ModelStore(tmp_path)
    key = spec_key(SPEC)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("card.json"):
            raise OSError("simulated crash before the card lands")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        s.save(key, make_state(), {"spec": SPEC})
    monkeypatch.undo()
    assert _visible_files(s.entry_dir(key)) == ["weights.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert s.load(key) is None
    _, _, created = s.get_or_create(SPEC, lambda: (make_state(), {}))
    assert created and s.load(key) is not None


def test_overwrite_crash_keeps_the_old_entry(tmp_path, monkeypatch):
    """A retrain that dies before its card lands leaves the old, good entry loadable (it used to
    delete the old card first, so a crash mid-way destroyed the entry it was replacing)."""
    s, key, sd = saved_entry(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("card.json"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        s.save(key, make_state(seed=1), {"spec": SPEC})
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = s.load(key)
    assert got is not None and got[1]["metrics"] == {"loss": 0.5}
    assert_same(got[0], {k: v.contiguous() for k, v in sd.items()})
    s.save(key, make_state(seed=1), {"spec": SPEC})  # a retrain that completes replaces it
    assert_same(s.load(key)[0], {k: v.contiguous() for k, v in make_state(seed=1).items()})
    assert len(list(s.entry_dir(key).glob("weights*.safetensors"))) == 1, "the replaced weights are removed"


def test_killed_writer_temp_files_are_swept(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    junk = s.entry_dir(key) / ".weights.safetensors.123.deadbeef.tmp"
    junk.write_bytes(b"partial")
    assert s.load(key) is not None  # ignored by readers
    s.save(key, make_state(), {"spec": SPEC})
    assert not junk.exists()


# ---------------------------------------------------------------------------------------------- corruption


def test_truncated_weights_warn_and_retrain(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    w = s.weights_path(key)
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    expect_corrupt_then_rebuild(s, key, "truncated")


def test_flipped_byte_same_size_is_a_hash_mismatch(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    w = s.weights_path(key)
    data = bytearray(w.read_bytes())
    size = len(data)
    data[-3] ^= 0x01  # inside the tensor payload: still a parseable safetensors file
    w.write_bytes(bytes(data))
    assert w.stat().st_size == size
    expect_corrupt_then_rebuild(s, key, "does not match the card's content_hash")


def test_corrupt_card_json(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    c = s.card_path(key)
    c.write_text(c.read_text()[:-10])
    expect_corrupt_then_rebuild(s, key, "not valid JSON")


def test_card_key_mismatch(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    c = s.card_path(key)
    card = json.loads(c.read_text())
    card["key"] = "0" * 64
    c.write_text(json.dumps(card))
    expect_corrupt_then_rebuild(s, key, "does not match the entry's key")


def test_missing_weights_with_card(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    s.weights_path(key).unlink()
    expect_corrupt_then_rebuild(s, key, "weights file is missing")


def test_valid_hash_but_not_safetensors(tmp_path):
    s, key, _ = saved_entry(tmp_path)
    garbage = b"\x80\x04not a safetensors file"  # starts like a pickle; must never be unpickled
    s.weights_path(key).write_bytes(garbage)
    c = s.card_path(key)
    card = json.loads(c.read_text())
    card.update(content_hash=__import__("hashlib").sha256(garbage).hexdigest(), size_bytes=len(garbage))
    card["card_hash"] = checkpoints._card_hash(card)  # a consistent card: only the weights are bad
    c.write_text(json.dumps(card))
    expect_corrupt_then_rebuild(s, key, "not a valid safetensors file")


# ---------------------------------------------------------------------------------------------- no pickle


def test_no_pickle_anywhere(tmp_path, monkeypatch):
    s, key, sd = saved_entry(tmp_path)
    raw = s.weights_path(key).read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 header size, then a JSON header
    header = json.loads(raw[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(sd)
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:8]  # neither pickle nor torch zip

    def forbidden(*a, **k):
        raise AssertionError("pickle/torch.load must not be used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    got = s.load(key)
    assert got is not None
    assert_same(got[0], {k: v.contiguous() for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------- roots


def test_env_var_overrides_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    s = ModelStore()
    assert s.root == tmp_path / "elsewhere"
    s.get_or_create(SPEC, lambda: (make_state(), {}))
    assert (tmp_path / "elsewhere" / spec_key(SPEC) / "card.json").is_file()
    assert default_cache_dir(tmp_path / "project") == tmp_path / "elsewhere"
    monkeypatch.delenv("CIRCUITS_CACHE")
    assert default_cache_dir(tmp_path / "project") == tmp_path / "project" / ".circuits-cache"
    monkeypatch.chdir(tmp_path)
    assert default_root() == tmp_path / ".circuits-cache" == ModelStore().root
    assert ModelStore(tmp_path / "x").root == tmp_path / "x"


def test_default_location_is_never_the_package_folder(tmp_path, monkeypatch):
    """Issue 16: an installed wheel must not write next to itself; the caller names the project root."""
    monkeypatch.delenv("CIRCUITS_CACHE", raising=False)
    monkeypatch.chdir(tmp_path)
    package = Path(store_mod.__file__).resolve().parents[1]  # circuits/, not circuits/zoo/
    assert package not in ModelStore().root.parents and ModelStore().root.parent == tmp_path


# ---------------------------------------------------------------------------------------------- locking

_WORKER = textwrap.dedent(
    """
    import hashlib, os, sys, time
    from pathlib import Path
    import torch
    from circuits.zoo.store import ModelStore

    root, counter, sync, idx = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
    (sync / f"ready-{idx}").touch()
    deadline = time.monotonic() + 60
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            sys.exit("never got the go signal")
        time.sleep(0.005)

    def build():
        time.sleep(1.0)
        with open(counter, "a") as fh:
            fh.write(f"built by {os.getpid()}\\n")
        g = torch.Generator().manual_seed(os.getpid())  # a second build would give different weights
        return {"w": torch.randn(16, 16, generator=g), "b": torch.randn(16, generator=g)}, {"builder": os.getpid()}

    sd, card, created = ModelStore(root).get_or_create({"model": "race", "seed": 0}, build)
    digest = hashlib.sha256(b"".join(sd[k].numpy().tobytes() for k in sorted(sd))).hexdigest()
    print(f"RESULT {int(created)} {digest} {card['content_hash']}")
    """
)


def test_concurrent_processes_build_exactly_once(tmp_path):
    root, counter, sync = tmp_path / "cache", tmp_path / "counter.txt", tmp_path / "sync"
    sync.mkdir()
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(root), str(counter), str(sync), str(i)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 60
        while len(list(sync.glob("ready-*"))) < n:
            assert time.monotonic() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
            time.sleep(0.01)
        (sync / "go").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [line.split()[1:] for out, _ in outs for line in out.splitlines() if line.startswith("RESULT")]
    assert len(results) == n
    assert counter.read_text().count("\n") == 1, counter.read_text()
    assert sorted(r[0] for r in results) == ["0"] * (n - 1) + ["1"]
    assert len({r[1] for r in results}) == 1  # identical tensors everywhere
    assert len({r[2] for r in results}) == 1


def test_lock_timeout_names_the_holder(tmp_path):
    holder = ModelStore(tmp_path)
    waiter = ModelStore(tmp_path, lock_timeout=0.2)
    key = spec_key(SPEC)
    with holder.lock(key, "build"):
        with pytest.raises(LockTimeoutError) as exc:
            waiter.get_or_create(SPEC, lambda: (make_state(), {}))
    msg = str(exc.value)
    assert f"pid {os.getpid()}" in msg and "'build'" in msg and "CIRCUITS_LOCK_TIMEOUT" in msg
    assert isinstance(exc.value, CircuitsError)
    _, _, created = waiter.get_or_create(SPEC, lambda: (make_state(), {}))  # free again
    assert created
    assert not (tmp_path / f"{key}.owner.json").exists()


# ---------------------------------------------------------------------------------------------- references


def test_reference_roundtrip_from_store_card(tmp_path):
    s = ModelStore(tmp_path / "cache")
    sd, card, _ = s.get_or_create(SPEC, lambda: (make_state(), {"metrics": {"loss": 0.1}}))
    ref_dir = tmp_path / "fixtures" / "models"
    ref_card = save_reference(ref_dir, "modadd-1l", sd, card)
    assert sorted(p.name for p in ref_dir.iterdir()) == ["modadd-1l.card.json", "modadd-1l.safetensors"]
    loaded, got_card = load_reference(ref_dir, "modadd-1l", SPEC)
    assert_same(loaded, sd)
    assert got_card == ref_card and got_card["key"] == spec_key(SPEC) and got_card["metrics"] == {"loss": 0.1}
    assert load_reference(ref_dir, "modadd-1l", spec_key(SPEC))[1] == got_card  # a key works too


def test_reference_missing(tmp_path):
    with pytest.raises(MissingCheckpointError) as exc:
        load_reference(tmp_path, "nope", SPEC)
    assert "python -m circuits train nope --update-reference" in str(exc.value)
    assert isinstance(exc.value, CircuitsError)


def test_reference_stale_lists_field_diff(tmp_path):
    save_reference(tmp_path, "ref", make_state(), {"spec": SPEC})
    current = json.loads(json.dumps(SPEC))
    current["model"]["d_model"] = 64
    current["train"]["warmup"] = 5
    del current["data"]["p"]
    with pytest.raises(StaleCheckpointError) as exc:
        load_reference(tmp_path, "ref", current)
    msg = str(exc.value)
    assert "code or config that produced it changed" in msg
    assert "model.d_model: 32 -> 64" in msg
    assert "train.warmup" in msg and "data.p" in msg
    assert "seed" not in msg.split("differ")[1].split("Refresh")[0]  # unchanged fields are not listed
    assert "python -m circuits train ref --update-reference" in msg and "pytest --circuits-retrain" in msg
    assert isinstance(exc.value, CircuitsError)


def test_reference_corruption_raises_and_keeps_files(tmp_path):
    save_reference(tmp_path, "ref", make_state(), {"spec": SPEC})
    w = tmp_path / "ref.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="ref.safetensors.*content_hash"):
        load_reference(tmp_path, "ref", SPEC)
    assert w.exists()  # committed files are never deleted automatically
    (tmp_path / "ref.card.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        load_reference(tmp_path, "ref", SPEC)


def test_save_reference_requires_spec(tmp_path):
    with pytest.raises(CircuitsError, match="spec"):
        save_reference(tmp_path, "ref", make_state(), {"metrics": {}})


# ---------------------------------------------------------------------------------------------- hardening


def test_cache_path_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    """It was a raw FileExistsError from mkdir, after training."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("CIRCUITS_CACHE", str(afile))
    with pytest.raises(StoreError, match="is not a folder; point \\$CIRCUITS_CACHE at a folder"):
        check_environment()
    with pytest.raises(StoreError, match="is not a folder"):
        ModelStore()
    monkeypatch.setenv("CIRCUITS_CACHE", str(afile / "below"))
    with pytest.raises(StoreError, match="its parent"):
        ModelStore().get_or_create(SPEC, lambda: pytest.fail("must not build"))


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf"])
def test_bad_lock_timeout_is_a_setting_error(value, monkeypatch):
    """It was a bare ValueError (a traceback in the CLI)."""
    monkeypatch.setenv("CIRCUITS_LOCK_TIMEOUT", value)
    with pytest.raises(SettingError, match="CIRCUITS_LOCK_TIMEOUT=.* is not a number of seconds") as exc:
        ModelStore("unused")
    assert isinstance(exc.value, CircuitsError)
    monkeypatch.setenv("CIRCUITS_LOCK_TIMEOUT", " 2.5 ")
    assert lock_timeout_from_env() == 2.5 == ModelStore("unused").lock_timeout


def test_lock_path_that_is_a_folder_is_one_clear_error(tmp_path):
    """It was a raw IsADirectoryError from filelock."""
    s = ModelStore(tmp_path)
    s.lock_path(spec_key(SPEC)).mkdir()
    with pytest.raises(StoreError, match=r"cannot lock model store entry .*a folder is where a file should be"):
        s.get_or_create(SPEC, lambda: pytest.fail("must not build"))


def test_full_disk_after_training_is_one_clear_error_and_no_half_entry(tmp_path, monkeypatch):
    """ENOSPC while writing the weights: a StoreError naming it; no entry (none was there), and
    over an existing entry the old one stays."""
    real_write = os.write
    import builtins

    real_open = builtins.open

    class FullFile:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

    def full_open(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        return FullFile(fh) if "x" in mode and str(path).endswith(".tmp") else fh

    s = ModelStore(tmp_path / "a")
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(StoreError, match="no space left on the device.*nothing was stored"):
        s.get_or_create(SPEC, lambda: (make_state(), {}))
    monkeypatch.undo()
    key = spec_key(SPEC)
    assert s.load(key) is None and _visible_files(s.entry_dir(key)) == []
    s2, key, sd = saved_entry(tmp_path / "b")
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(StoreError, match="the entry it was replacing is kept"):
        s2.get_or_create(SPEC, lambda: (make_state(seed=1), {}), force=True)
    monkeypatch.undo()
    assert_same(s2.load(key)[0], {k: v.contiguous() for k, v in sd.items()})
    assert real_write is os.write


def test_edited_card_metric_is_detected_as_tampered(tmp_path):
    """Card metrics were covered by no hash: an edited eval_acc reached the report."""
    s, key, _ = saved_entry(tmp_path)
    card = json.loads(s.card_path(key).read_text())
    card["metrics"]["loss"] = 0.01
    s.card_path(key).write_text(json.dumps(card))
    assert s.verify(key)[0] == "corrupt" and "edited" in s.verify(key)[1]
    expect_corrupt_then_rebuild(s, key, "edited after it was written")


def test_version_1_card_in_the_store_is_refused(tmp_path):
    """Issue 31: lowering format_version and deleting card_hash used to pass an edited card off as
    valid. A store entry always has card_hash (the store writes version 2 only): one without it is
    corrupt, and rebuilt."""
    s, key, sd = saved_entry(tmp_path)
    card = json.loads(s.card_path(key).read_text())
    del card["card_hash"]
    card["format_version"] = 1
    card["metrics"]["loss"] = 0.01  # the edit the hash would have caught
    s.card_path(key).write_text(json.dumps(card))
    assert s.verify(key)[0] == "corrupt" and "no card_hash" in s.verify(key)[1]
    expect_corrupt_then_rebuild(s, key, "no card_hash")


def test_version_1_reference_cards_load_only_when_listed(tmp_path):
    """Committed references written before card_hash keep loading: each is listed by its sha256 in
    the folder's legacy_cards.sha256; any edit of one (or a version-2 card with its hash dropped) is
    refused."""
    import hashlib

    spec = {"name": "m", "seed": 0}
    store_mod.save_reference(tmp_path, "m", {"w": torch.ones(2)}, {"spec": spec})
    _, card_path = store_mod.reference_paths(tmp_path, "m")
    card = json.loads(card_path.read_text())
    del card["card_hash"]
    card["format_version"] = 1
    card_path.write_text(json.dumps(card))
    with pytest.raises(store_mod.CorruptCheckpointError, match="no card_hash"):
        store_mod.load_reference(tmp_path, "m", spec)
    digest = hashlib.sha256(card_path.read_bytes()).hexdigest()
    (tmp_path / store_mod.LEGACY_CARDS_FILE).write_text(f"# listed\n{digest}  m.card.json\n")
    assert store_mod.load_reference(tmp_path, "m", spec)[1]["format_version"] == 1
    card["metrics"] = {"acc": 1.0}  # an edit of the listed card
    card_path.write_text(json.dumps(card))
    with pytest.raises(store_mod.CorruptCheckpointError, match="no card_hash"):
        store_mod.load_reference(tmp_path, "m", spec)


def test_committed_version_1_cards_are_all_listed():
    from circuits.zoo import registry as zoo

    legacy = store_mod.legacy_card_digests(zoo.REFERENCE_DIR)
    for card_path in sorted(zoo.REFERENCE_DIR.glob("*.card.json")):
        card = json.loads(card_path.read_text())
        if "card_hash" not in card:
            import hashlib

            assert hashlib.sha256(card_path.read_bytes()).hexdigest() in legacy, card_path.name


def test_entries_verify_reports_a_truncated_entry_as_damaged(tmp_path):
    """`list` showed a truncated entry as cached (entries() read the cards only)."""
    s, key, _ = saved_entry(tmp_path)
    w = s.weights_path(key)
    w.write_bytes(w.read_bytes()[:100])
    assert [k for k, _ in s.entries()] == [key]  # card only: still listed
    assert s.entries(verify=True) == []
    [(k, card, problem)] = s.damaged()
    assert k == key and "truncated" in problem and card["key"] == key
    assert s.verify(key)[0] == "corrupt" and s.card_path(key).exists(), "verify never removes"


_KILLED_RETRAIN = textwrap.dedent(
    """
    import os, sys, signal, torch
    from circuits import atomic
    from circuits.zoo.store import ModelStore
    real = atomic.write_bytes_atomic
    def write(path, data):
        real(path, data)
        if str(path).endswith(".safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)  # killed between the new weights and the new card
    import circuits.zoo.store as st
    st.write_bytes_atomic = write
    ModelStore(sys.argv[1]).get_or_create({"model": "killed"}, lambda: ({"w": torch.ones(4)}, {}), force=True)
    """
)


def test_retrain_killed_midway_keeps_the_old_entry(tmp_path):
    s = ModelStore(tmp_path)
    spec = {"model": "killed"}
    s.get_or_create(spec, lambda: ({"w": torch.zeros(4)}, {"metrics": {"acc": 0.5}}))
    proc = subprocess.run([sys.executable, "-c", _KILLED_RETRAIN, str(tmp_path)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd, card = s.load(spec_key(spec))
    assert torch.equal(sd["w"], torch.zeros(4)) and card["metrics"] == {"acc": 0.5}


def test_put_stores_bytes_built_elsewhere(tmp_path):
    import safetensors.torch

    s = ModelStore(tmp_path)
    data = safetensors.torch.save({"w": torch.arange(3.0)})
    card = s.put(SPEC, data, {"metrics": {"acc": 1.0}, "content_hash": "ignored"})
    sd, loaded = s.load(spec_key(SPEC))
    assert torch.equal(sd["w"], torch.arange(3.0)) and loaded == card and loaded["spec"] == SPEC
    with pytest.raises(CardError, match="not safetensors"):
        s.put(SPEC, b"garbage", {})


def test_waiting_build_lets_go_of_the_entry_lock(tmp_path):
    """Inside a build, build_lock_released() frees the entry's lock for a long wait (the training slot)
    and, if another process stored the entry meanwhile, the build is abandoned and that entry loaded."""
    from circuits.zoo.store import build_lock_released, current_build_label

    s = ModelStore(tmp_path, lock_timeout=5)
    other = ModelStore(tmp_path, lock_timeout=0.2)
    key = spec_key(SPEC)

    def build():
        assert current_build_label().startswith("model seed 0 (key ")
        assert other.holder(key) is not None  # held while building
        with build_lock_released():
            assert other.holder(key) is None  # free while waiting
            other.save(key, make_state(seed=5), {"spec": SPEC})  # another process finishes first
        pytest.fail("the build must be abandoned")

    sd, card, created = s.get_or_create(SPEC, build)
    assert not created
    assert_same(sd, {k: v.contiguous() for k, v in make_state(seed=5).items()})
    assert current_build_label() is None
    with build_lock_released():  # outside a build: nothing to release
        pass


# ---------------------------------------------------------------------------------------------- training slot


@pytest.fixture
def slot_path(tmp_path, monkeypatch):
    from circuits.zoo import train as T

    path = tmp_path / "slot" / "circuits-multithreaded-training.lock"
    path.parent.mkdir()
    monkeypatch.setattr(T, "training_slot_path", lambda: path)
    return path


def _hold_slot_in_thread(release: "threading.Event", during=None):
    """Another 'training' holding the slot (a thread: flock locks are per open file, so it conflicts)."""
    import threading

    from circuits.zoo import train as T

    entered = threading.Event()
    errors = []

    def run():
        try:
            with T.training_slot(2):
                entered.set()
                if during is not None:
                    during()
                release.wait(30)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)
            entered.set()

    t = threading.Thread(target=run)
    t.start()
    assert entered.wait(30)
    return t, errors


def test_training_slot_honours_the_lock_timeout_and_names_its_holder(slot_path, monkeypatch):
    """The slot used to wait forever, ignore CIRCUITS_LOCK_TIMEOUT and never say who held it."""
    import threading

    from circuits.zoo import train as T

    release = threading.Event()
    t, errors = _hold_slot_in_thread(release)
    try:
        owner = json.loads(slot_path.with_name("circuits-multithreaded-training.owner.json").read_text())
        assert owner["pid"] == os.getpid() and "on 2 threads" in owner["action"]
        monkeypatch.setenv("CIRCUITS_LOCK_TIMEOUT", "0.2")
        seen = []
        with pytest.raises(LockTimeoutError) as exc:
            with T.training_slot(2, progress=lambda *a: seen.append(a[2])):
                pass
        msg = str(exc.value)
        assert "0.2 s" in msg and f"pid {os.getpid()}" in msg and "CIRCUITS_LOCK_TIMEOUT" in msg
        assert "waiting" in seen[0] and f"pid {os.getpid()}" in seen[0]["waiting"]
        with T.training_slot(1):  # one thread: never waits
            pass
    finally:
        release.set()
        t.join()
    assert not errors
    with T.training_slot(2, timeout=0):  # free again, and the sidecar is gone
        assert T._slot_owner_path().exists()
    assert not T._slot_owner_path().exists()


def test_training_slot_waiter_lets_go_of_its_model_lock(slot_path, tmp_path):
    """While a build waits for the slot, the entry's lock is free (no lock-order deadlock); when the
    other process stores the model meanwhile, the waiter reuses it instead of training again."""
    import threading

    from circuits.zoo import train as T

    waiting = threading.Event()
    release = threading.Event()
    s = ModelStore(tmp_path / "store", lock_timeout=30)
    other = ModelStore(tmp_path / "store", lock_timeout=0.5)
    key = spec_key(SPEC)
    checks = []

    def meanwhile():
        assert waiting.wait(30)
        deadline = time.monotonic() + 30
        while other.holder(key) is not None:  # the waiter let go of the model lock
            assert time.monotonic() < deadline, "the waiter kept its model lock"
            time.sleep(0.02)
        checks.append("free")
        other.save(key, make_state(seed=7), {"spec": SPEC})  # trained by the slot's holder meanwhile
        release.set()

    t, errors = _hold_slot_in_thread(release, during=meanwhile)

    def build():
        with T.training_slot(2, progress=lambda *a: waiting.set(), timeout=30):
            pytest.fail("the build must be dropped: the model was stored while it waited")

    sd, card, created = s.get_or_create(SPEC, build)
    t.join()
    assert not errors and checks == ["free"] and not created
    assert_same(sd, {k: v.contiguous() for k, v in make_state(seed=7).items()})


def test_training_slot_lock_path_that_is_a_folder(slot_path):
    from circuits.zoo import train as T

    slot_path.mkdir()
    with pytest.raises(StoreError, match="cannot take the multi-threaded training slot .*a folder"):
        with T.training_slot(2):
            pass
