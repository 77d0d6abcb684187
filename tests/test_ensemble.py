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
