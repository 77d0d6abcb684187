"""The pytest plugin, end to end, through ``pytester``: records, controls, seeds, xdist, compare, bad input.

Most runs are in-process (fast); the xdist run uses a subprocess as it must.
"""

import json

import pytest

from circuits.plugin.pytest_plugin import parse_seeds, strip_params

CONFTEST = '''
import pytest
from circuits.claims.controls import register_control


class Model:
    def __init__(self, acc, seed=None):
        self.acc, self.seed = acc, seed


def _scramble(model, seed=0):
    return Model(0.40, model.seed)


def _weak(model, seed=0):
    return Model(model.acc - 0.01, model.seed)


def _ablate(model, *heads, seed=0):
    return Model(0.20 if (2, 0) in heads else model.acc, model.seed)


register_control("scramble", kind="model", fn=_scramble, replace=True)
register_control("weak", kind="model", fn=_weak, replace=True)
register_control("ablate", kind="model", fn=_ablate, head_args=True, replace=True)
register_control("flip", kind="data", fn=lambda d, seed=0: [1 - v for v in d], replace=True)


@pytest.fixture(scope="session")
def base_model(request, zoo_seed):
    from circuits.plugin.pytest_plugin import note_model

    acc = 0.97 if zoo_seed is None else 0.88 + 0.03 * zoo_seed   # seed 0 fails, 1 and 2 pass
    note_model(request, {"name": "toy", "seed": zoo_seed, "source": "trained", "key": "k%s" % zoo_seed,
                         "wall_time": 0.5, "metrics": {"acc": acc,
                         "history": [{"step": i, "loss": 1.0 / (i + 1), "acc": min(1.0, i / 10)} for i in range(20)]}})
    return Model(acc, zoo_seed)


@pytest.fixture
def model(base_model, control):
    return control.apply_model(base_model)


@pytest.fixture(scope="session")
def head_roles(base_model):
    return {"count_head": (2, 0)}
'''


@pytest.fixture
def project(pytester):
    pytester.makeconftest(CONFTEST)
    return pytester


def load(pytester, run_id=None):
    reports = pytester.path / "reports"
    run_id = run_id or (reports / "latest.txt").read_text().strip()
    text = (reports / run_id / "report.json").read_text()
    return json.loads(text)  # strict JSON: no NaN


def claims_of(report, control=None):
    return {(c["test"], c["name"]): c for c in report["claims"] if c.get("control") == control}


def test_records_survive_failures_crashes_and_interrupts(project):
    project.makepyfile(test_a='''
        import pytest

        def test_two_then_raise(claim):
            claim.at_least("first", 0.95, 0.9)
            claim.at_most("second", 0.1, 0.5, units="bits", note="leak")
            raise RuntimeError("crash after recording")

        def test_failing_claim(claim):
            claim.at_least("L2H0.open_prop_r", 0.62, 0.9)
            claim.at_least("never_reached", 1.0, 0.0)

        def test_bad_values(claim):
            claim.at_least("nan", float("nan"), 0.5)

        def test_empty(claim):
            claim.at_least("empty", claim.sample([]), 0.5)

        def test_interrupted(claim):
            claim.holds("before_interrupt", True)
            raise KeyboardInterrupt

        def test_never_runs(claim):
            claim.holds("x", True)
    ''')
    result = project.runpytest("--circuits-run-id", "crashy", no_reraise_ctrlc=True)
    result.stdout.fnmatch_lines(["*L2H0.open_prop_r = 0.62, claim needs >= 0.90 (short by 0.28)*",
                                 "*circuits claims*", "*circuits: *report.html*"])
    report = load(project, "crashy")
    claims = claims_of(report)
    assert {k[1] for k in claims} == {"first", "second", "L2H0.open_prop_r", "nan", "empty", "before_interrupt"}
    assert claims[("test_two_then_raise", "first")]["passed"] is True
    assert claims[("test_two_then_raise", "second")]["units"] == "bits"
    assert claims[("test_two_then_raise", "second")]["test_outcome"] == "failed"
    assert claims[("test_failing_claim", "L2H0.open_prop_r")]["margin"] == pytest.approx(-0.28)
    nan = claims[("test_bad_values", "nan")]
    assert nan["passed"] is False and nan["value"] is None and nan["value_text"] == "nan" and nan["problem"] == "value is NaN"
    assert claims[("test_empty", "empty")]["problem"] == "empty sample"
    # by kind: one failed claim; NaN and an empty sample are errors (nothing was measured), as are the
    # crash after recording and the interrupted test: never folded into "failed"
    assert report["interrupted"] is True and report["summary"]["failed"] == 1
    assert report["summary"]["outcomes"]["error"] == 4
    assert sorted((e["kind"], e["nodeid"].split("::")[1]) for e in report["errors"]) == [
        ("crash", "test_two_then_raise"), ("interrupted", "test_interrupted"), ("nonfinite", "test_bad_values"),
        ("nonfinite", "test_empty")]
    assert claims[("test_bad_values", "nan")]["status"] == "ERROR"
    outcomes = {t["test"]: t["outcome"] for t in report["tests"]}
    assert outcomes["test_two_then_raise"] == "failed" and "test_never_runs" not in outcomes
    assert outcomes["test_interrupted"] == "interrupted"
    assert (project.path / "reports" / "latest.txt").read_text().strip() == "crashy"
    assert (project.path / "reports" / "latest" / "report.html").is_file()  # a symlink to the run
    for name in ("report.md", "report.html"):
        assert (project.path / "reports" / "crashy" / name).is_file()


def test_a_skipped_control_run_is_shown_as_skipped_not_as_an_error(project):
    project.makepyfile(test_skipctl='''
        import pytest

        @pytest.mark.controls("scramble")
        def test_refuted_here(model, claim, control):
            if not control.is_main:
                pytest.skip("refuted on this model: its control has nothing to test")
            claim.at_least("acc", model.acc, 0.5)
    ''')
    result = project.runpytest("--circuits-run-id", "skipctl")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*control scramble*skipped*"])
    main = claims_of(load(project, "skipctl"))[("test_refuted_here[main]", "acc")]
    assert [x["outcome"] for x in main["controls"]] == ["skipped"]


def test_controls_invert_and_no_teeth_fails(project):
    project.makepyfile(test_ctl='''
        import pytest

        @pytest.mark.controls("scramble", "weak", "ablate:count_head", "ablate:L1H1")
        def test_accuracy(model, claim):
            claim.at_least("acc", model.acc, 0.9)

        @pytest.mark.controls("flip")
        def test_data_control(model, claim, control):
            labels = control.apply_data([1, 1, 1, 0])
            claim.at_least("frac_ones", sum(labels) / len(labels), 0.6)

        @pytest.mark.controls("scramble")
        def test_never_applies(claim):
            claim.at_least("x", 1.0, 0.5)

        @pytest.mark.controls("scramble")
        def test_no_claims_on_control(model, claim):
            if not control_is_main(model):
                return
            claim.at_least("x", model.acc, 0.5)

        def control_is_main(model):
            return model.acc > 0.5
    ''')
    result = project.runpytest("-v", "--circuits-run-id", "ctl")
    result.stdout.fnmatch_lines([
        "*test_accuracy[[]main[]] PASSED*",
        "*test_accuracy[[]control=scramble[]] PASSED*",
        "*test_accuracy[[]control=weak[]] FAILED*",
        "*test_accuracy[[]control=ablate:count_head[]] PASSED*",
        "*test_accuracy[[]control=ablate:L1H1[]] FAILED*",
        "*test_data_control[[]control=flip[]] PASSED*",
    ])
    result.stdout.fnmatch_lines(["*no teeth: claim 'acc' = 0.96 also holds on control 'weak' (needs >= 0.90)*"])
    result.stdout.fnmatch_lines(["*control 'scramble' was never applied*"])
    result.stdout.fnmatch_lines(["*the control run recorded no claims*"])
    result.assert_outcomes(passed=7, failed=4)
    report = load(project, "ctl")
    runs = {r["nodeid"].split("::")[1]: r for r in report["control_runs"]}
    assert runs["test_accuracy[control=scramble]"]["outcome"] == "ok"
    assert runs["test_accuracy[control=scramble]"]["message"].startswith("control OK: claim 'acc' failed on control")
    assert runs["test_accuracy[control=weak]"]["outcome"] == "no_teeth"
    assert runs["test_never_applies[control=scramble]"]["outcome"] == "error"
    main = claims_of(report)[("test_accuracy[main]", "acc")]
    assert main["group"].endswith("::test_accuracy")
    assert {x["control"]: x["outcome"] for x in main["controls"]} == {
        "scramble": "failed", "weak": "held", "ablate:count_head": "failed", "ablate:L1H1": "held"}
    on_weak = [c for c in report["claims"] if c.get("control") == "weak"][0]
    assert on_weak["passed"] is True and on_weak["status"] == "HELD" and on_weak["control_outcome"] == "no_teeth"
    assert report["summary"]["controls_no_teeth"] == 2
    md = (project.path / "reports" / "ctl" / "report.md").read_text()
    assert "scramble ✓" in md and "weak ✗ held" in md


def test_bad_input_is_reported_clearly(project):
    project.makepyfile(test_bad='''
        import pytest

        def test_duplicate(claim):
            claim.at_least("acc", 0.95, 0.9)
            claim.at_least("acc", 0.97, 0.9)

        def test_not_a_figure(figures):
            figures.add("scatter", [1, 2, 3])

        def test_string_value(claim):
            claim.at_least("acc", "0.95", 0.9)

        def test_seed_default(zoo_seed, circuits_options):
            assert zoo_seed is None and circuits_options.seeds is None and circuits_options.device == "cpu"
    ''', test_unknown_control='''
        import pytest

        @pytest.mark.controls("nosuch:L1H1")
        def test_x(claim):
            claim.at_least("a", 1.0, 0.5)
    ''')
    result = project.runpytest("--circuits-run-id", "badcoll")
    result.stdout.fnmatch_lines([
        "*unknown control 'nosuch' in spec 'nosuch:L1H1'; known controls: ablate, *flip*untrained*",
    ])
    (err,) = load(project, "badcoll")["collection_errors"]  # the run still leaves a report saying why
    assert err["nodeid"] == "test_unknown_control.py" and "unknown control 'nosuch'" in err["message"]
    result = project.runpytest("test_bad.py", "--circuits-run-id", "bad")
    result.stdout.fnmatch_lines([
        "*DuplicateClaimError: claim name 'acc' is used twice in this test*",
        "*TypeError: figures.add('scatter', ...) needs a matplotlib.figure.Figure, got builtins.list*",
        "*ClaimValueError: claim 'acc': value is a str*",
    ])
    result.assert_outcomes(passed=1, failed=3)
    report = load(project, "bad")
    (dup,) = [c for c in report["claims"] if c["test"] == "test_duplicate"]
    assert dup["value"] == 0.95  # the first record is kept
    (s,) = [c for c in report["claims"] if c["test"] == "test_string_value"]
    assert s["passed"] is False and s["problem"].startswith("wrong kind")


@pytest.mark.parametrize("args, words", [
    (["--circuits-seeds", "5-2"], "--circuits-seeds '5-2': range end 2 is before its start 5"),
    (["--circuits-seeds=-1"], "'-1' is not a seed"),
    (["--circuits-seeds", "zero"], "'zero' is not a seed"),
    (["--circuits-compare", "missing"], "--circuits-compare: no report for 'missing'"),
    (["--circuits-device", "tpu"], "--circuits-device 'tpu' is not a device: expected cpu, cuda, cuda:N or mps"),
    (["--circuits-run-id", "latest"], "--circuits-run-id 'latest'"),
])
def test_bad_options_are_usage_errors(pytester, args, words):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert words in result.stderr.str()


def test_seeds_parametrise_and_pass_rate(project):
    project.makepyfile(test_seeded='''
        def test_acc(model, claim):
            claim.at_least("acc", model.acc, 0.9)

        def test_no_zoo(claim):
            claim.at_least("plain", 1.0, 0.5)
    ''')
    result = project.runpytest("-v", "--circuits-seeds", "0-2", "--circuits-run-id", "seeds")
    result.stdout.fnmatch_lines(["*test_acc[[]seed=0[]] FAILED*", "*test_acc[[]seed=1[]] PASSED*",
                                 "*test_acc[[]seed=2[]] PASSED*", "*test_no_zoo PASSED*",
                                 "*pass rate across seeds*", "*test_acc acc: 2/3 (67%)*"])
    report = load(project, "seeds")
    rates = {r["name"]: r for r in report["pass_rates"]}
    assert rates["acc"]["n"] == 3 and rates["acc"]["passed"] == 2 and rates["acc"]["seeds"] == {
        "0": False, "1": True, "2": True}
    assert rates["plain"]["n"] == 1
    assert sorted(m["seed"] for m in report["models"]) == [0, 1, 2]
    assert report["options"]["seeds"] == [0, 1, 2]
    assert "Pass rate across seeds" in (project.path / "reports" / "seeds" / "report.md").read_text()


def test_compare_finds_flipped_claims(project, monkeypatch):
    project.makepyfile(test_cmp='''
        import os

        def test_acc(claim):
            claim.at_least("steady", 0.5 + float(os.environ["ACC"]) / 10, 0.5)
            claim.at_least("acc", float(os.environ["ACC"]), 0.9)
    ''')
    monkeypatch.setenv("ACC", "0.95")
    project.runpytest("--circuits-run-id", "before").assert_outcomes(passed=1)
    monkeypatch.setenv("ACC", "0.85")
    result = project.runpytest("--circuits-run-id", "after", "--circuits-compare", "before")
    result.stdout.fnmatch_lines(["*compared with before: 2 matched, 1 flipped*",
                                 "*FLIPPED test_acc acc: pass -> fail, 0.95 -> 0.85 (margin −0.1*"])
    cmp_ = load(project, "after")["compare"]
    assert [r["name"] for r in cmp_["flipped"]] == ["acc"]
    assert cmp_["flipped"][0]["delta"] == pytest.approx(-0.10)
    steady = [r for r in cmp_["moved"] if r["name"] == "steady"][0]
    assert steady["before"] and steady["after"] and steady["delta"] == pytest.approx(-0.01)
    html = (project.path / "reports" / "after" / "report.html").read_text()
    md = (project.path / "reports" / "after" / "report.md").read_text()
    assert "Compared with" in html and "flipped" in html and "Compared with `before`" in md
    # a path works too, and so does the baseline
    from circuits.report import set_baseline

    set_baseline(project.path / "reports" / "before")
    result = project.runpytest("--circuits-run-id", "vs-base", "--circuits-compare", "baseline", "--circuits-no-report")
    result.stdout.fnmatch_lines(["*compared with before: 2 matched, 1 flipped*"])
    assert not (project.path / "reports" / "vs-base").exists()


def test_xdist_one_complete_report_with_figures_and_models(project):
    project.makepyfile(test_par='''
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pytest

        @pytest.mark.controls("scramble")
        def test_acc(model, claim, figures):
            claim.at_least("acc", model.acc, 0.9)
            fig, ax = plt.subplots(figsize=(3, 2))
            ax.plot([0, 1], [0, model.acc])
            figures.add("curve", fig, caption="accuracy")
            assert plt.get_fignums() == []   # added figures are closed

        @pytest.mark.parametrize("k", range(4))
        def test_many(k, claim):
            claim.between("k", k, 0, 10)
            if k == 3:
                raise ValueError("worker-side crash")
    ''')
    result = project.runpytest_subprocess("-n", "2", "--circuits-seeds", "1,2", "--circuits-run-id", "par",
                                          "-p", "no:cacheprovider")
    result.assert_outcomes(passed=7, failed=1)
    report = load(project, "par")
    main = [c for c in report["claims"] if not c.get("control")]
    assert len(main) == 2 + 4  # acc on 2 seeds; k x 4 (test_many uses no zoo fixture, so no seeds)
    assert len([c for c in report["claims"] if c.get("control") == "scramble"]) == 2
    assert len(report["tests"]) == 2 * 2 + 4 and len(report["control_runs"]) == 2
    assert {m["seed"] for m in report["models"]} == {1, 2}
    assert len(report["figures"]) == 2  # main runs only: the scramble control's figures are not drawn
    run_dir = project.path / "reports" / "par"
    for f in report["figures"]:
        assert (run_dir / f["path"]).stat().st_size > 1000
    html = (run_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and html.count("<svg") == 2  # figures + training curves
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert report["pass_rates"] and {r["name"]: r["n"] for r in report["pass_rates"]}["acc"] == 2


def test_no_report_and_helpers(pytester):
    pytester.makepyfile("def test_x(claim):\n    claim.at_least('a', 1.0, 0.5)\n")
    result = pytester.runpytest("--circuits-no-report")
    result.stdout.fnmatch_lines(["*circuits claims*", "*a*1.0*>=*0.5*PASS*"])
    assert not (pytester.path / "reports").exists()
    pytester.makepyfile("def test_x():\n    pass\n")  # no circuits fixtures: no report directory
    pytester.runpytest()
    assert not (pytester.path / "reports").exists()


def test_parse_seeds_and_strip_params():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4) and parse_seeds("1,3") == (1, 3) and parse_seeds("2") == (2,)
    assert parse_seeds("0-1, 5") == (0, 1, 5)
    for bad in ("5-2", "-1", "", "a", "1,,2", "1.5"):
        with pytest.raises(ValueError, match="--circuits-seeds"):
            parse_seeds(bad)
    assert strip_params("m.py::t[main-seed=3]", ["main", "seed=3"]) == "m.py::t"
    assert strip_params("m.py::t[x1-control=zero_ablate:L2H0-seed=0]", ["control=zero_ablate:L2H0", "seed=0"]) == "m.py::t[x1]"
    assert strip_params("m.py::t[a-main-b]", ["main"]) == "m.py::t[a-b]"
    assert strip_params("m.py::t", ["main"]) == "m.py::t"


# --- first-run hygiene: deselected, not skipped; the cache provider on -----------------------------------

HYGIENE_TESTS = '''
import pytest

@pytest.mark.full_sweep
def test_grid(claim):
    claim.holds("grid", True)

def test_ok(claim):
    claim.holds("ok", True)

def test_bad(claim):
    claim.at_least("x", 0.1, 0.5)
'''


def test_full_sweep_tests_are_deselected_listed_and_lf_works(pytester):
    pytester.makepyfile(test_h=HYGIENE_TESTS)
    first = pytester.runpytest("--circuits-run-id", "one")
    first.assert_outcomes(passed=1, failed=1, deselected=1)  # deselected, never a wall of skips
    first.stdout.fnmatch_lines(["not run: 1 full-sweep grid tests (run with --circuits-full-sweep)"])
    report = load(pytester, "one")
    assert report["not_run"] == [{"nodeid": "test_h.py::test_grid", "reason": "full-sweep grid tests",
                                  "option": "--circuits-full-sweep"}]
    # --lf reruns the failed test only (the plugin leaves pytest's cache provider alone)
    lf = pytester.runpytest("--lf", "--circuits-no-report")
    lf.assert_outcomes(failed=1)
    lf.stdout.fnmatch_lines(["*rerun previous 1 failure*"])
    pytester.runpytest("--circuits-full-sweep", "--circuits-no-report").assert_outcomes(passed=2, failed=1)
    # under xdist the controller's report lists what the workers deselected
    par = pytester.runpytest_subprocess("-n", "2", "--circuits-run-id", "par")
    par.assert_outcomes(passed=1, failed=1)
    assert [r["nodeid"] for r in load(pytester, "par")["not_run"]] == ["test_h.py::test_grid"]


def test_the_repository_leaves_the_cache_provider_on():
    import tomllib
    from pathlib import Path

    ini = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    addopts = ini["tool"]["pytest"]["ini_options"]["addopts"]
    assert "cacheprovider" not in addopts, addopts  # --lf / --ff need it


def test_plugin_start_up_imports_nothing_heavy(tmp_path):
    """In a project that never uses circuits, loading the plugin (and configuring it) imports its own
    few small modules only: no numpy, torch, scipy, matplotlib (with every other plugin's autoload off,
    so what `-X importtime` lists is pytest's and ours). The wheel-installed variant of this check is
    in tests/test_packaging.py."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "pytest", "-p", "circuits.plugin.pytest_plugin",
                             "-q", "-p", "no:cacheprovider"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in result.stderr.splitlines() if ln.startswith("import time:")}
    assert "circuits.plugin.session" in imported  # (the plugin module itself is imported through pytest's rewrite hook)
    heavy = {"numpy", "torch", "scipy", "matplotlib", "sklearn", "safetensors"} & imported
    assert not heavy, f"the plugin's start-up imported {sorted(heavy)}"
