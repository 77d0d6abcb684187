"""circuits.zoo.ensemble: K seeds trained as one stacked model.

The stacked forward is each model's forward (float32 tolerance); a seed's loss curve and weights
after a short run agree with the single trainer's within stated tolerances; within the backend a
seed is bitwise reproducible (here and in a fresh process); a seed that stops early leaves the
stack without disturbing the others; each seed is its own store entry under a key naming the
backend, loadable through zoo.load; the sweep trains stacks through its pool.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_zoo import tiny_entry  # noqa: E402

from circuits.zoo import ensemble
from circuits.zoo import registry as zoo  # noqa: E402
from circuits.zoo.ensemble import BACKEND, BACKEND_ENV, StackedTransformer, train_stack, width_groups  # noqa: E402
from circuits.zoo.store import ModelStore, spec_key  # noqa: E402
from circuits.zoo.registry import train_entry  # noqa: E402

# What "agree" means against the single trainer, after SHORT_STEPS steps (measured: loss curves to
# ~1e-8 relative, weights to ~1e-7 absolute for brackets; the bounds leave room for other BLAS builds)
SHORT_STEPS = 20
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4


def short(entry, steps: int = SHORT_STEPS, n_train: int = 1500, **recipe):
    r = replace(entry.recipe, steps=steps, eval_every=steps // 2, n_train=n_train, n_eval=400, n_test=0,
                threads=1, target_metric=None, warmup_steps=5, **recipe)
    return replace(entry, recipe=r)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- the forward


def _tokens(entry, n: int, seed: int) -> torch.Tensor:
    split = entry.make_split(n, seed)
    if split.lengths is None:
        return split.inputs
    width = int(split.lengths.max())
    return split.inputs[:, :width]


@pytest.mark.parametrize("name", ["brackets", "palindromes", "skip_trigrams_h1"])
@pytest.mark.parametrize("readout", [None, "all"])
def test_the_stacked_forward_is_each_models_forward(name, readout):
    if name not in zoo.names():
        name = next(n for n in zoo.names() if n.startswith(name.split("_h")[0]))
    entry = zoo.get_entry(name)
    models = [entry.new_model(s) for s in (3, 4, 5)]
    for m in models:  # trained-looking weights: LN gains and biases away from 1 and 0
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    stack = StackedTransformer(models)
    toks = torch.stack([_tokens(entry, 16, s) for s in (1, 2, 3)]) if entry.config.pad_token is None else None
    if toks is None:  # brackets: the three seeds' batches have different padding
        parts = [_tokens(entry, 16, s) for s in (1, 2, 3)]
        width = max(t.shape[1] for t in parts)
        pad = entry.config.pad_token
        toks = torch.stack([torch.cat([t, torch.full((16, width - t.shape[1]), pad)], 1) for t in parts])
    got = stack.forward(toks, readout=readout)
    for k, m in enumerate(models):
        want = m(toks[k], readout=readout)
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5)
    if readout is None:  # the read-out-only last block gives the same logits
        torch.testing.assert_close(stack.forward(toks, readout_only=True), got, rtol=1e-5, atol=1e-5)


def test_width_groups_keep_padding_bounded_and_cover_every_seed():
    widths = [4, 42, 6, 40, 5, 22, 20, 4]
    groups = width_groups(widths)
    assert sorted(j for g in groups for j in g) == list(range(len(widths)))
    for g in groups:
        lo, hi = min(widths[j] for j in g), max(widths[j] for j in g)
        assert hi <= lo * ensemble.WIDTH_SLACK + 2, (g, lo, hi)
    assert width_groups([12] * 5) == [[0, 1, 2, 3, 4]]


# ---------------------------------------------------------------------------------- against single


def _compare(entry, seeds, weight_atol=WEIGHT_ATOL):
    stacked = train_stack(entry, seeds)
    for s in seeds:
        model, card = stacked[s]
        ref_model, ref_card = train_entry(entry, s)
        assert card["backend"] == BACKEND and card["ensemble"]["group"] == list(seeds)
        got = [row["loss"] for row in card["history"]]
        want = [row["loss"] for row in ref_card["history"]]
        assert [r["step"] for r in card["history"]] == [r["step"] for r in ref_card["history"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=LOSS_RTOL, atol=0,
                                   msg=lambda m: f"seed {s}: loss curve {got} vs single {want}: {m}")
        gap = max((a - b).abs().max().item() for a, b in zip(model.state_dict().values(),
                                                              ref_model.state_dict().values()))
        assert weight_atol is None or gap <= weight_atol, \
            f"seed {s}: weights differ from the single training's by {gap:.3g} > {weight_atol}"
        for key in ("eval_loss",):
            assert abs(card["metrics"][key] - ref_card["metrics"][key]) <= 1e-4, (key, card["metrics"], ref_card["metrics"])
        assert abs(card["metrics"]["eval_acc"] - ref_card["metrics"]["eval_acc"]) <= 1 / 400 + 1e-12


def test_brackets_seeds_train_as_they_would_alone():
    """The default recipe's path: auxiliary per-position targets, length-bucketed batches padded
    across seeds into width groups, per-seed clipping, fused AdamW."""
    _compare(short(zoo.get_entry("brackets")), [0, 1, 2])


def test_tutorial_style_dropout_draws_each_seeds_own_masks():
    """brackets@arena_like: dropout masks from each seed's generator, embedding scale folded."""
    _compare(short(zoo.get_entry("brackets@arena_like")), [0, 1])


def test_palindrome_seeds_train_as_they_would_alone():
    """Loss curve and metrics only: at lr 3e-3 Adam's first steps are near +-lr for every element
    (m / sqrt(v) ~ sign(g)), so a rounding-level difference in a near-zero gradient moves a weight by
    up to ~lr (measured 1e-4 after 10 steps) while the function stays the same."""
    _compare(short(zoo.get_entry("palindromes"), steps=10, batch_size=64), [0, 1, 2], weight_atol=None)


# --------------------------------------------------------------------------------- reproducibility

DIGEST_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from test_ensemble import short, _digest
from circuits.zoo import registry as zoo
from circuits.zoo.ensemble import train_stack
out = train_stack(short(zoo.get_entry("brackets")), [0, 1])
print(_digest(out[1][0]))
"""


def test_a_seed_is_bitwise_reproducible_within_the_backend():
    entry = short(zoo.get_entry("brackets"))
    first = {s: _digest(m) for s, (m, _) in train_stack(entry, [0, 1]).items()}
    again = {s: _digest(m) for s, (m, _) in train_stack(entry, [0, 1]).items()}
    assert first == again
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", DIGEST_SCRIPT.format(tests=str(Path(__file__).resolve().parent))],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == first[1], "a fresh process trained seed 1 to other bytes"


def test_a_seed_that_stops_early_leaves_the_others_undisturbed():
    entry = short(zoo.get_entry("palindromes"), steps=12, batch_size=64)
    free = train_stack(entry, [0, 1, 2])
    first_acc = {s: card["history"][0]["eval_acc"] for s, (_, card) in free.items()}
    lo, hi = min(first_acc.values()), max(first_acc.values())
    assert lo < hi, f"the seeds' first evaluations tie ({first_acc}): pick other seeds"
    stopping = replace(entry, recipe=replace(entry.recipe, target_metric=hi))
    log = []
    out = train_stack(stopping, [0, 1, 2], on_done=lambda s, m, c: log.append((s, c["steps"])))
    stopped = [s for s, a in first_acc.items() if a >= hi]
    for s in (0, 1, 2):
        want_steps = 6 if s in stopped else 12
        assert out[s][1]["steps"] == want_steps
        gap = max((a - b).abs().max().item() for a, b in zip(out[s][0].state_dict().values(),
                                                              free[s][0].state_dict().values()))
        if s not in stopped:  # trained on in a smaller stack: the same function, up to rounding
            assert gap <= WEIGHT_ATOL, f"seed {s}: {gap}"
    assert [s for s, _ in log][: len(stopped)] == sorted(stopped), "a stopped seed is handed back at once"


# ------------------------------------------------------------------------------ store and sweep


def test_the_key_names_the_backend_and_references_stay_single(monkeypatch):
    entry = zoo.get_entry("brackets")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    single = entry.spec(7)
    assert "train_backend" not in single
    monkeypatch.setenv(BACKEND_ENV, "ensemble")
    assert entry.spec(7)["train_backend"] == BACKEND and spec_key(entry.spec(7)) != spec_key(single)
    assert zoo.load("brackets").source == "reference"  # committed references keep their single key
    monkeypatch.setenv(BACKEND_ENV, "stacked")
    with pytest.raises(Exception, match="training backend 'stacked'"):
        entry.spec(7)


def test_stacked_seeds_are_store_entries_that_zoo_load_finds(tmp_path, monkeypatch):
    from circuits.zoo.sweep import run_sweep

    entry = tiny_entry("tiny_stacked")
    zoo.ZOO[entry.name] = entry
    try:
        log = io.StringIO()
        result = run_sweep(entry, [0, 1, 2], root=tmp_path, workers=1, stream=log, ensemble=2)
        assert result.ok and sorted(result.trained) == [0, 1, 2], log.getvalue()
        assert "in a stack of 2" in log.getvalue() and "in a stack of 1" in log.getvalue()
        monkeypatch.setenv(BACKEND_ENV, "ensemble")
        store = ModelStore(tmp_path)
        for s in (0, 1, 2):
            _, card = store.load(spec_key(entry.spec(s)))
            assert card["spec"]["train_backend"] == BACKEND and card["ensemble"]["K"] == (2 if s < 2 else 1)
        loaded = zoo.load(entry.name, 1, store=store)
        assert loaded.source == "cache"
        again = run_sweep(entry, [0, 1, 2], root=tmp_path, workers=1, stream=io.StringIO(), ensemble=2)
        assert sorted(again.reused) == [0, 1, 2] and not again.trained
        monkeypatch.delenv(BACKEND_ENV)
        assert store.load(spec_key(entry.spec(1))) is None, "a single-trainer key never finds a stacked model"
    finally:
        zoo.ZOO.pop(entry.name, None)


def test_ray_stacks_store_the_local_stacks_bytes(tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra: pip install 'pytest-circuits[ray]'")
    from circuits.zoo.sweep import run_sweep

    entry = tiny_entry("tiny_stacked_ray")
    local = run_sweep(entry, [0, 1], root=tmp_path / "local", workers=1, stream=io.StringIO(), ensemble=2)
    remote = run_sweep(entry, [0, 1], root=tmp_path / "ray", workers=1, stream=io.StringIO(), ensemble=2,
                       backend="ray")
    assert local.ok and remote.ok and sorted(remote.trained) == [0, 1]
    os.environ[BACKEND_ENV] = "ensemble"
    try:
        for s in (0, 1):
            key = spec_key(entry.spec(s))
            a, b = ModelStore(tmp_path / "local").load(key), ModelStore(tmp_path / "ray").load(key)
            assert a[1]["content_hash"] == b[1]["content_hash"], f"seed {s}: ray stored other bytes"
    finally:
        os.environ.pop(BACKEND_ENV, None)


def test_the_plugin_option_selects_the_stacked_trainers_keys(pytester):
    pytester.makepyfile(test_env="""
        import os
        def test_backend():
            assert os.environ.get("CIRCUITS_TRAIN_BACKEND") == "ensemble"
    """)
    env_before = os.environ.get(BACKEND_ENV)
    assert pytester.runpytest_subprocess("--circuits-ensemble", "0", "-q").ret == 0
    bad = pytester.runpytest_subprocess("--circuits-ensemble", "-1", "-q")
    assert bad.ret != 0 and "--circuits-ensemble must be >= 0" in bad.stderr.str()
    assert os.environ.get(BACKEND_ENV) == env_before


def test_a_sweep_workers_share_of_the_cores_caps_the_recipes_threads(monkeypatch):
    """Two workers of a 2-core pool each training a recipe that asks for 2 threads oversubscribe the
    cores (a stacked bracket step measured 2-5x slower); a sweep's stack worker sets its share."""
    entry = tiny_entry("tiny_threads")
    entry = replace(entry, recipe=replace(entry.recipe, threads=2, steps=2, eval_every=2))
    asked = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), real(n)))
    monkeypatch.setenv(ensemble.MAX_THREADS_ENV, "1")
    train_stack(entry, [0, 1])
    assert asked[0] == 1, asked
    asked.clear()
    monkeypatch.delenv(ensemble.MAX_THREADS_ENV)
    train_stack(entry, [0, 1])
    assert asked[0] == 2, asked


# ------------------------------------------------------------------------ resumable stacks (checkpoints)


class _Stop(Exception):
    """The test's interruption (a session stopped mid-stack)."""


def _resumable(entry, steps: int = 20):
    """Evaluations every 5 steps, 7 batches an epoch: a checkpoint after step 9 is mid-epoch, mid-window."""
    return replace(entry, recipe=replace(entry.recipe, steps=steps, eval_every=5, n_train=200, n_eval=100,
                                         threads=1, warmup_steps=5, n_test=0))


def _same(a: dict, b: dict, seeds) -> None:
    """Bitwise the same weights, and the same cards but for wall-clock fields."""
    def plain(card):
        return {k: ([{f: v for f, v in row.items() if f != "elapsed"} for row in v] if k == "history" else
                    {f: x for f, x in v.items() if f != "elapsed"} if k == "metrics" else v)
                for k, v in card.items() if k != "wall_time"}

    for s in seeds:
        wa, wb = a[s][0].state_dict(), b[s][0].state_dict()
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f"seed {s}: the resumed weights differ"
        assert plain(a[s][1]) == plain(b[s][1]), f"seed {s}: the resumed card differs"


def _interrupted(entry, seeds, root, at_step: int, **kw):
    """Train until the evaluation at `at_step`, then stop as a killed session would (no clean-up)."""
    def progress(seed, step, total, metrics):
        if step == at_step:
            raise _Stop

    with pytest.raises(_Stop):
        train_stack(entry, seeds, checkpoint_root=root, progress=progress, **kw)


def _checkpoints(root) -> list:
    folder = Path(root) / ensemble.stack_checkpoint.FOLDER
    return sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []


@pytest.mark.parametrize("name", ["tiny", "brackets@arena_like"])
def test_an_interrupted_stack_resumes_to_the_same_bytes(name, tmp_path, monkeypatch):
    """A checkpoint after every step (the timer at ~0): the last one before the interruption at step 10
    is after step 9, mid-epoch (the epoch redrawn and 2 batches skipped) with a running loss of 4 steps.
    tiny: length-bucketed bracket data, fused AdamW; arena_like: each seed's dropout generator too."""
    entry = (_resumable(tiny_entry("tiny_resume", fast=True)) if name == "tiny" else
             _resumable(zoo.get_entry(name), steps=12))
    seeds = [0, 1]
    straight = train_stack(entry, seeds)
    monkeypatch.setenv(ensemble.stack_checkpoint.EVERY_ENV, "1e-9")
    _interrupted(entry, seeds, tmp_path, at_step=10)
    assert len(_checkpoints(tmp_path)) == 1
    lines = []
    resumed = train_stack(entry, seeds, checkpoint_root=tmp_path, say=lines.append)
    assert len(lines) == 1 and "resume from their stack checkpoint at step 9/" in lines[0], lines
    _same(straight, resumed, seeds)
    assert _checkpoints(tmp_path) == [], "the checkpoint outlived its stack"


def test_a_seed_that_stopped_before_the_checkpoint_is_not_in_the_resumed_stack(tmp_path, monkeypatch):
    """Seed 1 reaches its target at step 5 and is handed back (stored, in a sweep); the interruption at
    step 10 leaves a checkpoint of seeds 0 and 2, which a rerun (the seeds the store lacks) resumes."""
    entry = _resumable(tiny_entry("tiny_resume_stop"))
    seeds = [0, 1, 2]
    current = {}
    real_reached = ensemble._reached

    def progress(seed, step, total, metrics):  # _reached is asked right after, for the same seed
        current["seed"] = seed

    monkeypatch.setattr(ensemble, "_reached", lambda row, recipe: current["seed"] == 1 or real_reached(row, recipe))
    straight = train_stack(entry, seeds, progress=progress)
    assert straight[1][1]["steps"] == 5 and straight[0][1]["steps"] == 20
    monkeypatch.setenv(ensemble.stack_checkpoint.EVERY_ENV, "0.000000001")
    done = []

    def stopping(seed, step, total, metrics):
        progress(seed, step, total, metrics)
        if step == 10:
            raise _Stop

    with pytest.raises(_Stop):
        train_stack(entry, seeds, checkpoint_root=tmp_path, progress=stopping, on_done=lambda s, m, c: done.append(s))
    assert done == [1] and len(_checkpoints(tmp_path)) == 1
    lines = []
    resumed = train_stack(entry, [0, 2], checkpoint_root=tmp_path, progress=progress, say=lines.append)
    assert "seeds [0, 2] resume from their stack checkpoint at step 9/20" in lines[0], lines
    _same(straight, resumed, [0, 2])  # the cards name the first group, [0, 1, 2]
    assert resumed[0][1]["ensemble"]["group"] == seeds and _checkpoints(tmp_path) == []


def test_a_damaged_or_foreign_checkpoint_is_ignored_with_one_line(tmp_path, monkeypatch):
    entry = _resumable(tiny_entry("tiny_resume_bad"), steps=10)
    monkeypatch.setenv(ensemble.stack_checkpoint.EVERY_ENV, "1e-9")
    path = ensemble._Checkpoints(entry, tmp_path)._path([0, 1])
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 100)
    lines = []
    out = train_stack(entry, [0, 1], checkpoint_root=tmp_path, say=lines.append)
    assert len(lines) == 1 and "ignored (unreadable" in lines[0] and "start at step 0" in lines[0], lines
    assert out[1][1]["steps"] == 10 and _checkpoints(tmp_path) == []
    # a good checkpoint under another stack's name: its key does not match the name it was found by
    _interrupted(entry, [0, 1], tmp_path, at_step=10)
    (good,) = _checkpoints(tmp_path)
    other = ensemble._Checkpoints(entry, tmp_path)._path([1, 0])
    (tmp_path / ensemble.stack_checkpoint.FOLDER / good).rename(other)
    assert ensemble._Checkpoints(entry, tmp_path, lines.append).resume([1, 0], [], None, None) is None
    assert "ignored (written for another stack)" in lines[-1] and not other.exists()


def test_the_checkpoint_interval_setting(monkeypatch):
    env = ensemble.stack_checkpoint.EVERY_ENV
    monkeypatch.delenv(env, raising=False)
    assert ensemble.stack_checkpoint.every_s() == ensemble.stack_checkpoint.DEFAULT_EVERY_S
    monkeypatch.setenv(env, "0")
    assert ensemble.stack_checkpoint.every_s() == 0
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv(env, bad)
        with pytest.raises(Exception, match=env):
            ensemble.stack_checkpoint.every_s()


def test_a_rerun_plans_the_same_stacks_less_their_stored_seeds():
    from circuits.zoo.sweep import stack_plan

    assert stack_plan(range(6), 2, 3) == [[0, 1, 2], [3, 4, 5]]
    assert stack_plan(range(6), 2, 3, todo=[0, 2, 3, 4, 5]) == [[0, 2], [3, 4, 5]]
    assert stack_plan(range(6), 2, 0, todo=[4, 5]) == [[4, 5]]  # automatic: sized on all the run's seeds


def test_a_rerun_sweep_stack_resumes_its_checkpoint_in_the_store(tmp_path, monkeypatch):
    """The sweep's stack (sweep.train_stacks) checkpoints under its store; interrupted, a rerun stores
    the bytes an uninterrupted sweep stores."""
    from circuits.zoo import sweep

    entry = _resumable(tiny_entry("tiny_resume_sweep"), steps=10)
    sweep.train_stacks(entry, [0, 1], root=tmp_path / "straight", stream=io.StringIO())
    monkeypatch.setenv(ensemble.stack_checkpoint.EVERY_ENV, "1e-9")
    real = sweep._EvalLines.__call__

    def interrupting(self, step, total, metrics):
        if step == 10:
            raise _Stop
        real(self, step, total, metrics)

    monkeypatch.setattr(sweep._EvalLines, "__call__", interrupting)
    with pytest.raises(_Stop):
        sweep.train_stacks(entry, [0, 1], root=tmp_path / "resumed", stream=io.StringIO())
    assert len(_checkpoints(tmp_path / "resumed")) == 1
    monkeypatch.setattr(sweep._EvalLines, "__call__", real)
    log = io.StringIO()
    assert sweep.train_stacks(entry, [0, 1], root=tmp_path / "resumed", stream=log) == {0: "trained", 1: "trained"}
    assert "resume from their stack checkpoint at step 9/10" in log.getvalue(), log.getvalue()
    monkeypatch.setenv(BACKEND_ENV, "ensemble")
    for s in (0, 1):
        key = spec_key(entry.spec(s))
        a, b = ModelStore(tmp_path / "straight").load(key), ModelStore(tmp_path / "resumed").load(key)
        assert a[1]["content_hash"] == b[1]["content_hash"], f"seed {s}: the resumed sweep stored other bytes"
    assert _checkpoints(tmp_path / "resumed") == []
