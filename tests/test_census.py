"""circuits.zoo.census: the recipe x claim table from pytest reports, and the whole census end to end on a
tiny registered zoo entry and a tiny hypothesis module (trains once, then reproduces from the store)."""

from __future__ import annotations

import io
import json
import sys
import textwrap
from pathlib import Path

import pytest

from circuits.zoo import census as C
from circuits.zoo import registry as zoo
from circuits.errors import InputError, UnknownModelError

TESTS = Path(__file__).resolve().parent


# --- the table from reports ----------------------------------------------------------------------------


def _claim(group, name, seed, passed, value=1.0):
    return {"nodeid": f"{group}[main]", "group": group, "name": name, "seed": seed, "passed": passed,
            "value": value, "control": None, "status": "PASS" if passed else "FAIL"}


def _test(group, seed, outcome="passed"):
    return {"nodeid": f"{group}[main-seed={seed}]", "group": group, "seed": seed, "outcome": outcome, "control": None}


def test_cells_count_seeds_and_unreached_claims_as_not_passed():
    g = "m.py::TestOurs::test_a"
    report = {"claims": [_claim(g, "x", 0, True), _claim(g, "x", 1, False),
                         {**_claim(g, "x", 0, False), "control": "shuffle"},  # a control run: not a main claim
                         _claim("m.py::TestFixed::test_a", "x", None, True)],
              "tests": [_test(g, 0), _test(g, 1), _test(g, 2, "failed"), _test(g, 3, "skipped")]}
    seeded = C.cells(report, seeded=True)
    assert list(seeded) == ["TestOurs"]
    by_seed = seeded["TestOurs"]["test_a: x"]
    # seed 2 ran but never reached the claim: counted, not passed; seed 3 skipped: not counted
    assert {s: v["passed"] for s, v in by_seed.items()} == {"0": True, "1": False, "2": None}
    assert C._summarise(by_seed)["passed"] == 1 and C._summarise(by_seed)["n"] == 3
    fixed = C.cells(report, seeded=False)
    assert list(fixed) == ["TestFixed"] and fixed["TestFixed"]["test_a: x"]["None"]["passed"] is True


def test_claims_of_different_subjects_share_a_column():
    ref = {"claims": [_claim("m.py::TestArena::test_a", "x", None, True),
                      _claim("m.py::TestOurs::test_a", "x", None, False),
                      _claim("m.py::TestOurs::test_b", "y", None, True)], "tests": []}
    census = C.Census(name="brackets", module="m.py", seeds=[], recipes=[])
    C.build_table(census, {}, ref, root=None)
    assert census.columns == ["test_a: x", "test_b: y"]
    labels = {r["label"]: r for r in census.rows}
    assert labels["reference: TestArena"]["claims"]["test_a: x"]["passed"] == 1
    assert labels["reference: TestOurs"]["claims"]["test_a: x"]["passed"] == 0
    assert "test_b: y" not in labels["reference: TestArena"]["claims"]
    md = C.markdown(census)
    assert "| reference: TestArena | pass | – |" in md and "| reference: TestOurs | FAIL | pass |" in md


def test_wilson_interval_of_a_test_accuracy():
    from circuits.report.views import wilson_interval as wilson

    lo, hi = wilson(99_900, 100_000)
    assert lo < 0.999 < hi and hi - lo == pytest.approx(0.000392, abs=2e-5)  # +-0.02% at 100k
    lo10, hi10 = wilson(9_990, 10_000)
    assert (hi10 - lo10) > 3 * (hi - lo)  # a 10k set cannot certify 99.9% (issue 17)


def test_bad_input_is_one_clear_error(tmp_path):
    module = tmp_path / "test_m.py"
    module.write_text("")
    with pytest.raises(UnknownModelError, match="unknown variant 'nope'"):
        C._check("brackets", ["default", "nope"], [0], str(module))
    with pytest.raises(InputError, match="is not a file"):
        C._check("brackets", ["default"], [0], str(tmp_path / "missing.py"))
    with pytest.raises(InputError, match="at least one seed"):
        C._check("brackets", ["default"], [], str(module))
    with pytest.raises(InputError, match="--jobs must be a positive integer, got 0"):
        C.run_census("brackets", ["default"], [0], str(module), jobs=0, train=False)


def test_brackets_recipes_have_their_own_store_keys():
    from circuits.zoo.store import spec_key

    keys = {r: spec_key(zoo.get_entry(C.zoo_name("brackets", r)).spec(1))
            for r in ("default", "label_only", "originators", "arena_like")}
    assert len(set(keys.values())) == 4
    # adding the variants left the reference's spec alone: the committed checkpoints still load
    for name in ("brackets", "palindromes", "icl"):
        zoo.load(name)


def test_arena_like_training_hooks_are_training_only_and_fold_into_the_embedding():
    """Dropout acts only in training mode; the sqrt(d_model) embedding scale folded into W_E gives the
    hooked model's outputs exactly."""
    import math

    import torch

    from circuits.tasks.brackets import data as B

    entry = zoo.get_entry("brackets@arena_like")
    model = entry.new_model(0)
    toks = B.generate(64, seed=1).toks
    attached = B._tutorial_training_hooks(model, 0.1, math.sqrt(56), torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        hooked = model(toks)
        model.train()
        dropped = model(toks)
        model.eval()
        for point, fn in attached:
            point.fns.remove(fn)
        model.embed.W_E.mul_(math.sqrt(56))
        folded = model(toks)
    assert not torch.allclose(dropped, hooked)  # dropout on while training
    torch.testing.assert_close(folded, hooked, rtol=1e-5, atol=1e-5)


# --- end to end ----------------------------------------------------------------------------------------


TINY_ZOO = """
import sys
sys.path.insert(0, {tests!r})
from dataclasses import replace
from test_train_zoo import tiny_entry

_BASE = tiny_entry("tiny_census")
ENTRY = replace(_BASE, reference_seeds=(), recipe=replace(_BASE.recipe, n_test=500),
                variants={{"slow": {{"recipe": {{"lr": 1e-5}}}}}})
"""

CONFTEST = """
from circuits.zoo import registry as zoo
import tiny_zoo
zoo.register(tiny_zoo.ENTRY, "conftest")
"""

MODULE = '''
import torch
from circuits.zoo import registry as zoo


class TestTiny:
    def test_weights_moved(self, tiny_census_model, zoo_seed, claim):
        # the default recipe (lr 3e-3) moves W_E from its initialisation; the "slow" one (lr 1e-5) cannot
        init = zoo.get_entry("tiny_census").new_model(zoo_seed)
        moved = float((tiny_census_model.embed.W_E - init.embed.W_E).abs().max())
        claim.at_least("max |W_E - init|", moved, 0.01)

    def test_seed_zero(self, tiny_census_model, zoo_seed, claim):
        claim.at_least("seed is 0", float(zoo_seed == 0), 1.0)
'''


@pytest.fixture
def tiny_project(tmp_path, monkeypatch):
    (tmp_path / "tiny_zoo.py").write_text(TINY_ZOO.format(tests=str(TESTS)))
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_tiny_census.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "store"))
    import tiny_zoo

    zoo.register(tiny_zoo.ENTRY)
    yield tmp_path
    zoo.ZOO.pop("tiny_census", None)
    zoo._SOURCES.pop("tiny_census", None)
    sys.modules.pop("tiny_zoo", None)


@pytest.mark.slow
def test_census_end_to_end_then_from_the_store(tiny_project):
    log = io.StringIO()
    census, paths = C.run_census("tiny_census", ["default", "slow"], [0, 1], "test_tiny_census.py",
                                 out=tiny_project / "out", root=tiny_project / "store", reference=False,
                                 acc_target=0.6, jobs=2, stream=log)  # both rows side by side
    text = log.getvalue()
    assert text.count("trained in") == 4, text  # 2 recipes x 2 seeds
    assert "[census slow]" in text and "--circuits-variant tiny_census@slow" in text
    rows = {r["label"]: r for r in census.rows}
    assert set(rows) == {"default", "slow"}
    zero = rows["default"]["claims"]["test_seed_zero: seed is 0"]
    assert (zero["passed"], zero["n"]) == (1, 2) and zero["seeds"]["0"]["passed"] and not zero["seeds"]["1"]["passed"]
    assert rows["default"]["claims"]["test_weights_moved: max |W_E - init|"]["passed"] == 2
    assert rows["slow"]["claims"]["test_weights_moved: max |W_E - init|"]["passed"] == 0
    acc = rows["default"]["accuracy"]["0"]
    assert acc["lo"] < acc["test_acc"] < acc["hi"] and acc["n_test"] == zoo.get_entry("tiny_census").recipe.n_test
    saved = json.loads(paths["json"].read_text())
    assert saved["columns"] == census.columns and paths["png"].stat().st_size > 0
    assert "| default | 2/2 | 1/2 |" in paths["md"].read_text()
    # each row records the commit its claims ran at (the tiny project has no git)
    assert saved["commits"] == {"default": "no git", "slow": "no git"}
    assert "Claims ran at: default no git, slow no git" in paths["md"].read_text()

    again = io.StringIO()
    census2, _ = C.run_census("tiny_census", ["default", "slow"], [0, 1], "test_tiny_census.py",
                              out=tiny_project / "out", root=tiny_project / "store", reference=False,
                              acc_target=0.6, stream=again)
    assert "trained in" not in again.getvalue() and again.getvalue().count("in the store, reused") == 4
    assert [r["claims"] for r in census2.rows] == [r["claims"] for r in census.rows]
    # the claims were not rerun either: both rows' runs are reused, no pytest process started
    assert again.getvalue().count("reused") >= 6 and " -m pytest " not in again.getvalue()
    assert again.getvalue().count("module, package, arguments and models unchanged") == 2

    # train nothing: a recipe's row covers only its stored seeds (seed 5 was never trained)
    partial, _ = C.run_census("tiny_census", ["slow"], [1, 5], "test_tiny_census.py", out=tiny_project / "out",
                              root=tiny_project / "store", reference=False, train=False, stream=io.StringIO())
    assert partial.recipe_seeds == {"slow": [1]} and partial.rows[0]["seeds"] == [1]

    # a changed hypothesis module is another input (no stored run matches it), and --rerun runs the
    # claims again whatever is stored (one real pytest process for both: each costs seconds)
    module = tiny_project / "test_tiny_census.py"
    row_dir = next(p.parent for p in (tiny_project / "out").rglob(C.INPUTS_FILE))
    saved = json.loads((row_dir / C.INPUTS_FILE).read_text())
    assert C.stored_run(row_dir, saved) is not None
    module.write_text(module.read_text() + "\n# edited\n")
    edited = C.run_inputs(str(module), saved["args"], saved["models"], saved["main_only"])
    assert edited["module"] != saved["module"] and C.stored_run(row_dir, edited) is None
    forced = io.StringIO()
    C.run_census("tiny_census", ["default"], [0, 1], "test_tiny_census.py", out=tiny_project / "out",
                 root=tiny_project / "store", reference=False, rerun=True, stream=forced)
    assert " -m pytest " in forced.getvalue()


def test_a_run_is_reused_only_when_its_inputs_are_equal(tmp_path):
    run_dir = tmp_path / "census-x"
    run_dir.mkdir()
    (run_dir / "report.json").write_text("{}")
    inputs = {"module": "a", "package": "b", "args": ["--circuits-seeds", "0"], "main_only": True,
              "models": [{"name": "m", "seed": 0, "content_hash": "h"}]}
    assert C.stored_run(run_dir, inputs) is None  # never recorded: an interrupted run
    (run_dir / C.INPUTS_FILE).write_text(json.dumps(inputs))
    assert C.stored_run(run_dir, inputs) == run_dir / "report.json"
    for changed in ({"module": "a2"}, {"package": "b2"}, {"args": ["--circuits-seeds", "1"]},
                    {"models": [{"name": "m", "seed": 0, "content_hash": "retrained"}]}):
        assert C.stored_run(run_dir, {**inputs, **changed}) is None, changed
    (run_dir / C.INPUTS_FILE).write_text("{not json")
    assert C.stored_run(run_dir, inputs) is None


def test_survival_gives_rates_with_intervals_and_flags_a_reference_that_most_seeds_contradict():
    census = C.Census(name="x", module="m.py", seeds=list(range(10)), recipes=["default"])
    census.columns = ["test_a: holds", "test_b: fails on most"]
    census.rows = [
        {"label": "reference: TestOurModel", "kind": "reference", "seeds": [None], "accuracy": {},
         "claims": {"test_a: holds": {"passed": 1, "n": 1, "seeds": {}},
                    "test_b: fails on most": {"passed": 1, "n": 1, "seeds": {}}}},
        {"label": "default", "kind": "recipe", "seeds": list(range(10)), "accuracy": {},
         "claims": {"test_a: holds": {"passed": 9, "n": 10, "seeds": {}},
                    "test_b: fails on most": {"passed": 2, "n": 10, "seeds": {}}}},
    ]
    rows = {r["claim"]: r for r in C.survival(census)}
    a, b = rows["test_a: holds"], rows["test_b: fails on most"]
    assert (a["passed"], a["n"], a["flags"]) == (9, 10, [])
    assert a["lo"] < 0.9 < a["hi"] and b["lo"] < 0.2 < b["hi"]
    assert b["flags"] and "most seeds fail (2/10)" in b["flags"][0] and b["reference"] == {"reference: TestOurModel": True}
    md = C.markdown(census)
    assert "| default | C2 test_b: fails on most | 2/10 | 20% |" in md and "**differs**" in md
    page = C.html(census)
    assert "background:#fde" in page and page.count("<tr") == 1 + 2 + 1
