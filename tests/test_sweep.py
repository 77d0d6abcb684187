"""circuits.zoo.sweep: the local pool fills the store and reuses it; Ray gives the same bytes; failures by name."""

from __future__ import annotations

import io
import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_zoo import tiny_entry  # noqa: E402

from circuits.zoo.store import ModelStore, spec_key  # noqa: E402
from circuits.zoo.sweep import run_sweep  # noqa: E402
from circuits.tasks.brackets import data as B  # noqa: E402


def failing_split(n, seed):
    """A task whose data generation fails (module level: workers import it by reference)."""
    raise RuntimeError(f"no data for seed {seed}")


def _hashes(root, entry, seeds):
    store = ModelStore(root)
    out = {}
    for s in seeds:
        got = store.load(spec_key(entry.spec(s)))
        assert got is not None, f"seed {s} missing from {root}"
        out[s] = got[1]["content_hash"]
    return out


def test_local_sweep_fills_the_store_then_reuses_it(tmp_path):
    entry = tiny_entry()
    log = io.StringIO()
    result = run_sweep(entry, [0, 1, 2], root=tmp_path, workers=2, stream=log)
    assert result.ok and sorted(result.trained) == [0, 1, 2] and result.reused == []
    lines = log.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines] == ["[1/3", "[2/3", "[3/3"] and all("trained in" in ln for ln in lines)
    hashes = _hashes(tmp_path, entry, [0, 1, 2])
    assert len(set(hashes.values())) == 3
    again = run_sweep(entry, [0, 1, 2, 3], root=tmp_path, workers=2, stream=io.StringIO())
    assert sorted(again.reused) == [0, 1, 2] and again.trained == [3]
    assert _hashes(tmp_path, entry, [0, 1, 2]) == hashes, "reused, not retrained"


def test_failed_trainings_are_retried_then_reported_by_seed(tmp_path):
    entry = replace(tiny_entry("tiny_failing"), make_split=failing_split)
    log = io.StringIO()
    result = run_sweep(entry, [4], root=tmp_path, workers=1, stream=log)
    assert not result.ok and list(result.failed) == [4]
    assert "no data for seed" in result.failed[4] and "FAILED after 2 tries" in log.getvalue()


def test_ray_backend_gives_the_local_backends_bytes(tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra: pip install 'pytest-circuits[ray]'")
    entry = tiny_entry()
    local = run_sweep(entry, [0, 1], root=tmp_path / "local", workers=2, stream=io.StringIO())
    log = io.StringIO()
    remote = run_sweep(entry, [0, 1], root=tmp_path / "ray", backend="ray", workers=2, stream=log)
    assert local.ok and remote.ok, (local.failed, remote.failed, log.getvalue())
    assert sorted(remote.trained) == [0, 1] and "(ray)" in log.getvalue()
    assert _hashes(tmp_path / "ray", entry, [0, 1]) == _hashes(tmp_path / "local", entry, [0, 1])
    for s in (0, 1):  # the weight files themselves, byte for byte
        a = ModelStore(tmp_path / "local").weights_path(spec_key(entry.spec(s))).read_bytes()
        b = ModelStore(tmp_path / "ray").weights_path(spec_key(entry.spec(s))).read_bytes()
        assert a == b


def test_a_committed_reference_seed_is_never_trained(tmp_path):
    """Every loader serves a reference seed from fixtures/models, so a sweep that trained it would
    spend minutes on a model nobody reads: it is listed as committed and left alone."""
    from circuits.zoo import registry as zoo

    entry = zoo.get_entry("brackets")
    log = io.StringIO()
    result = run_sweep(entry, list(entry.ref_seeds()), root=tmp_path, workers=1, stream=log)
    assert result.ok and result.trained == [] and sorted(result.reused) == sorted(entry.ref_seeds())
    assert "committed reference checkpoint, not trained" in log.getvalue()
    assert not any(tmp_path.iterdir()), "nothing written to the store"


def test_a_stale_or_damaged_reference_is_not_counted_as_committed(tmp_path, monkeypatch):
    """A committed file of an older spec would fail every loader: the sweep must train that seed."""
    import json
    import shutil

    from circuits.zoo import registry as zoo
    from circuits.zoo.store import reference_paths
    from circuits.zoo.sweep import _has_reference

    entry = zoo.get_entry("brackets")
    seed = entry.ref_seeds()[0]
    for path in reference_paths(zoo.REFERENCE_DIR, entry.reference_name(seed)):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(zoo, "REFERENCE_DIR", tmp_path)
    assert _has_reference(entry, seed)
    _, card_path = reference_paths(tmp_path, entry.reference_name(seed))
    card = json.loads(card_path.read_text())
    card_path.write_text(json.dumps({**card, "key": "0" * 64}))
    assert not _has_reference(entry, seed)
    card_path.write_text("{not json")
    assert not _has_reference(entry, seed)


def test_a_pool_worker_ends_when_its_sweep_is_killed(tmp_path):
    """Killing `python -m circuits sweep` used to leave its spawned workers training for minutes."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    child = ("import os, time, sys; from circuits.zoo.sweep import _exit_with_parent; "
             "_exit_with_parent(poll_s=0.1); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import subprocess, sys, time; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}, sys.argv[1]]); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent, str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        child_pid = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(child_pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the worker outlived its killed parent by 30 s")
    finally:
        proc.kill()


def test_pytest_seeds_trains_what_the_tests_need_up_front_through_the_sweep(pytester, monkeypatch):
    """`pytest --circuits-seeds 0-1`: the collected tests' models are trained before the first test by the
    sweep runner (parallel, one progress view), and read from the store on the next run. The entry is
    registered in the project's conftest (test_mutations.py runs its variants)."""
    from test_mutations import ZOO_CONFTEST

    monkeypatch.setenv("CIRCUITS_CACHE", str(pytester.path / "cache"))
    pytester.makeconftest(ZOO_CONFTEST)
    pytester.makepyfile(test_user='''
        def test_width(mine_model, claim, circuits_options):
            claim.holds("a trained model of the entry", mine_model.cfg.d_model == 8)
            with open("name.txt", "w") as f:
                f.write(circuits_options.model_name("mine"))
    ''')
    # subprocesses: a conftest is imported once per session, as in real use
    first = pytester.runpytest_subprocess("--circuits-no-report", "--circuits-seeds", "0-1")
    first.assert_outcomes(passed=2)
    assert (pytester.path / "name.txt").read_text() == "mine"
    err = first.stderr.str()
    assert "mine seed 0: trained in" in err and "mine seed 1: trained in" in err, err
    again = pytester.runpytest_subprocess("--circuits-no-report", "--circuits-seeds", "0-1")
    again.assert_outcomes(passed=2)
    assert again.stderr.str().count("in the store, reused") == 2 and "trained in" not in again.stderr.str()
    # --collect-only trains nothing
    collected = pytester.runpytest_subprocess("--circuits-no-report", "--circuits-seeds", "2", "--collect-only")
    assert "mine seed 2" not in collected.stderr.str()


def test_one_pool_over_several_entries_and_patterns(tmp_path, capsys):
    """`sweep 'pattern'`: a grid of entries in one pool; unknown names and empty patterns are one line."""
    from circuits import cli
    from circuits.zoo import registry as zoo
    from circuits.errors import InputError, UnknownModelError
    from circuits.zoo.sweep import run_sweeps

    a, b = tiny_entry("tiny_grid_a"), tiny_entry("tiny_grid_b")
    log = io.StringIO()
    results = run_sweeps([a, b], [1, 2], root=tmp_path, workers=2, stream=log)
    assert list(results) == ["tiny_grid_a", "tiny_grid_b"]
    assert all(r.ok and sorted(r.trained) == [1, 2] for r in results.values())
    lines = log.getvalue().splitlines()
    assert [ln.split()[0] for ln in lines] == ["[1/4", "[2/4", "[3/4", "[4/4"]
    _hashes(tmp_path, a, [1, 2]), _hashes(tmp_path, b, [1, 2])  # both entries' seeds are in the store
    zoo.register(a)
    zoo.register(b)
    try:
        assert cli.sweep_names("tiny_grid_*") == ["tiny_grid_a", "tiny_grid_b"]
        assert cli.sweep_names("brackets@label_o?ly") == ["brackets@label_only"]
        with pytest.raises(InputError, match=r"no zoo entry matches 'nothing_\*'"):
            cli.sweep_names("nothing_*")
        with pytest.raises(UnknownModelError):
            cli.sweep_names("nothing")
    finally:
        for e in (a, b):
            zoo.ZOO.pop(e.name, None)
            zoo._SOURCES.pop(e.name, None)


def test_the_sweep_plan_reads_fixtures_under_seeds_and_each_modules_plan():
    """What `pytest --circuits-seeds` / `--circuits-full-sweep` trains up front: the zoo fixtures the tests use (under
    --circuits-seeds, through --circuits-variant) and each module's circuits_sweep_plan(options), once per name."""
    from types import ModuleType, SimpleNamespace

    from circuits.plugin.session import RunOptions
    from circuits.plugin.zoo_fixtures import SWEEP_PLAN, sweep_plan

    grid = ModuleType("grid_module")
    setattr(grid, SWEEP_PLAN, lambda o, its: [("assoc_exp6_H01", (0, 1)), ("assoc_exp6_H05", (0, 1))]
            if o.full_sweep and len(its) == 2 else [])
    items = [SimpleNamespace(fixturenames=["brackets_model", "claim"], module=grid),
             SimpleNamespace(fixturenames=["brackets_model", "palindromes_model"], module=grid)]

    def options(**kw):
        return SimpleNamespace(seeds=kw.get("seeds", ()), full_sweep=kw.get("full_sweep", False),
                               model_name=lambda n: dict(kw.get("variants", ())).get(n, n))

    assert sweep_plan(options(), items) == {}
    assert sweep_plan(options(seeds=(1, 2)), items) == {(1, 2): ["brackets", "palindromes"]}
    assert sweep_plan(options(seeds=(3,), variants=[("brackets", "brackets@arena_like")]), items) == {
        (3,): ["brackets@arena_like", "palindromes"]}
    assert sweep_plan(options(full_sweep=True), items) == {(0, 1): ["assoc_exp6_H01", "assoc_exp6_H05"]}
    broken = ModuleType("broken_module")
    setattr(broken, SWEEP_PLAN, lambda o, its: 1 / 0)
    with pytest.raises(pytest.UsageError, match="broken_module.circuits_sweep_plan: ZeroDivisionError"):
        sweep_plan(options(full_sweep=True), [SimpleNamespace(fixturenames=[], module=broken)])
    # the real options carry the fields the plan reads
    assert {"seeds", "full_sweep"} <= set(RunOptions.__dataclass_fields__) and hasattr(RunOptions, "model_name")


def test_the_assoc_full_sweep_plans_the_experiments_its_selected_tests_name(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "hypotheses"))
    import test_assoc_memory as T

    def plan(full, *names):
        return T.circuits_sweep_plan(SimpleNamespace(full_sweep=full, seeds=()),
                                     [SimpleNamespace(name=n) for n in names])

    assert plan(False, "test_exp1_accuracy_matches_the_paper[main-1]") == []
    no_seeds = T.circuits_sweep_plan(SimpleNamespace(full_sweep=True, seeds=None), [SimpleNamespace(name="exp6")])
    assert len(no_seeds) == 6 and no_seeds[0][1] == (0, 1, 2, 3, 4)  # without --circuits-seeds, options.seeds is None
    exp6 = plan(True, "test_sweep_accuracy_matches_the_paper[main-exp6-5]")
    assert [n for n, _ in exp6] == [f"assoc_exp6_H{h:02d}" for h in (1, 5, 9, 13, 17, 21)]
    assert all(seeds == (0, 1, 2, 3, 4) for _, seeds in exp6)
    both = [n for n, _ in plan(True, "test_exp1_accuracy_grows_linearly_with_heads[main]",
                               "test_exp5_mlp_stores_more_per_parameter_than_attention[main]")]
    assert both[:7] == [f"assoc_exp1_d10_H{h:02d}" for h in (1, 6, 11, 16, 21, 26, 31)]
    assert {n.split("_H")[0] for n in both[7:]} == {"assoc_exp5_attn", "assoc_exp5_mlp"}


def test_the_assoc_capacity_bound_runs_on_the_seeds_asked_for(monkeypatch):
    """`--circuits-full-sweep --circuits-seeds 3-4` checks the bound on seeds 3 and 4 only, the seeds the sweep plan trains
    (it once took seeds 0-4 regardless, and waited on models nobody had asked to train)."""
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "hypotheses"))
    import test_assoc_memory as T

    def seeds_of(full, seeds):
        opts = SimpleNamespace(full_sweep=full, seeds=seeds)
        monkeypatch.setattr(T, "get_plugin", lambda config: SimpleNamespace(options=opts))
        ids = [p.id for p in T._bound_configs(None, full)]
        return {i.rsplit("-seed", 1)[1] for i in ids if i.startswith(("exp1-", "exp5_"))}

    assert seeds_of(True, (3, 4)) == {"3", "4"}
    assert seeds_of(True, None) == {"0", "1", "2", "3", "4"}
    assert seeds_of(False, None) == {str(s) for s in T.A.EXP1_DEFAULT_SEEDS}


def test_eval_lines_show_held_out_metrics_and_the_assoc_familys_accuracy():
    from circuits.zoo.sweep import _EvalLines

    out = io.StringIO()
    lines = _EvalLines("m seed 0", 0.0, out)
    lines(10, 100, {"eval_acc": 0.5, "loss": 1.0})
    lines(20, 100, {"accuracy": 0.25, "loss": 1.0, "lr": 0.1})
    lines(30, 100, {"loss": 1.0})  # nothing worth a line
    text = out.getvalue().splitlines()
    assert len(text) == 2 and "eval_acc=0.5" in text[0] and "accuracy=0.25" in text[1]
    assert "loss" not in out.getvalue() and "lr" not in out.getvalue()
