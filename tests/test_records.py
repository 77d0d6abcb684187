"""The run's records (circuits.records): JSON in and out, schema-1 reports still read and compared,
one definition of each constant, and the plugin's declared hooks (circuits.plugin.hookspecs)."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from circuits import records as R
from circuits.claims.core import Claims

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "reports" / "baseline" / "report.json"


def _claims():
    sink = []
    c = Claims(sink.append, raise_on_failure=False)
    c.at_least("acc", 0.95, 0.9)
    c.close_to("ratio", 1.02, 1.0, atol=0.1)
    c.between("frac", 0.5, 0.2, 0.8, units="bits")
    c.holds("sorted", True)
    c.at_most("loss", float("nan"), 1.0)
    return sink


def test_claim_records_carry_their_requirement_columns_and_round_trip():
    recs = _claims()
    assert [(r.op_symbol, r.threshold_text) for r in recs] == [
        (">=", "0.90"), ("≈", "1.00 ± 0.10"), ("in", "[0.2, 0.8] bits"), ("holds", ""), ("<=", "1")]
    # the text shown is built from the columns, so a reader never needs to split it
    assert [r.requirement for r in recs] == [">= 0.90", "1.00 ± 0.10", "in [0.2, 0.8] bits", "holds", "<= 1"]
    for r in recs:
        again = R.ClaimRecord.from_json(json.loads(json.dumps(r.to_json())))
        assert again.to_json() == r.to_json()
    assert recs[-1].to_json()["value"] is None and recs[-1].value_text == "nan"  # NaN never reaches JSON


def test_a_schema_1_claim_gets_its_columns_from_the_text_it_showed():
    old = {"name": "x", "op": "between", "requirement": "in [0.2, 0.8]", "passed": True, "value": 0.5}
    assert (R.ClaimRecord.from_json(old).op_symbol, R.ClaimRecord.from_json(old).threshold_text) == ("in", "[0.2, 0.8]")
    old = {"name": "y", "op": "at_least", "requirement": ">= 5000", "passed": False}
    assert (R.ClaimRecord.from_json(old).op_symbol, R.ClaimRecord.from_json(old).threshold_text) == (">=", "5000")


def test_run_kinds_and_ids_are_built_in_one_place():
    assert R.control_id(R.MAIN) == "main"
    assert R.control_id("untrained") == "control=untrained"
    assert R.control_id(R.MUTATION_PREFIX + "zero_ablate:L1H0") == "mutation=zero_ablate:L1H0"
    assert R.control_id(R.ALTERNATIVE_PREFIX + "L0H1") == "alternative=L0H1"
    assert R.run_kind("mutate:x") is R.RunKind.MUTATION and f"{R.run_kind('alt:x')}" == "alternative"
    assert R.spec_name("mutate:zero_ablate:L1H0") == "zero_ablate:L1H0" and R.is_generic("untrained")


def test_each_constant_is_defined_once():
    """GENERIC_CONTROLS, MAIN, the prefixes, OUTCOME_KINDS and CACHE_ENV: one assignment in the package."""
    sources = {p: p.read_text() for p in (ROOT / "circuits").rglob("*.py")}
    for name, value in [("GENERIC_CONTROLS", None), ("OUTCOME_KINDS", None), ("MAIN", '"main"'),
                        ("MUTATION_PREFIX", '"mutate:"'), ("ALTERNATIVE_PREFIX", '"alt:"'), ("CACHE_ENV", None)]:
        defs = [p.name for p, text in sources.items() if re.search(rf"^{name}\s*(:[^=]*)?=", text, re.M)]
        assert len(defs) == 1, (name, defs)
    for literal in ('"mutate:"', '"alt:"'):
        where = [p.name for p, text in sources.items() if literal in text]
        assert where == ["records.py"], (literal, where)


def test_a_committed_schema_1_report_is_read_rendered_and_compared():
    from circuits import report as rp

    raw = json.loads(BASELINE.read_text())
    assert raw.get("schema", 1) == 1  # (the committed baseline predates schema 2)
    run = rp.load_report(BASELINE, BASELINE.parent)
    assert isinstance(run, R.Run) and run.schema == R.SCHEMA and run.schema_read == 1
    assert all(c.op_symbol for c in run.claims)
    assert run.path == str(BASELINE)
    cmp_ = rp.compare_reports(rp.rederive(run), run)
    assert cmp_.counts["matched"] == len(raw["claims"]) and cmp_.counts["flipped"] == 0
    again = R.Run.from_json(json.loads(json.dumps(rp.rederive(run).to_json())))
    assert again.to_json()["schema"] == R.SCHEMA and "_path" not in again.to_json()
    assert again.summary == rp.rederive(run).summary


def test_a_new_run_compares_with_a_schema_1_report(pytester):
    """``--circuits-compare`` with a report written before schema 2 (no requirement columns)."""
    pytester.makepyfile(test_m='''
        def test_acc(claim):
            claim.at_least("acc", 0.95, 0.9)
    ''')
    result = pytester.runpytest("--circuits-run-id", "new", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    new = json.loads((pytester.path / "reports" / "new" / "report.json").read_text())
    assert new["schema"] == R.SCHEMA and new["claims"][0]["op_symbol"] == ">="
    old = json.loads(json.dumps(new))
    old["schema"] = 1
    for c in old["claims"]:
        c.pop("op_symbol"), c.pop("threshold_text")
        c["margin"] = 0.01  # the old run's margin: moved since
    old_dir = pytester.path / "reports" / "old"
    old_dir.mkdir()
    (old_dir / "report.json").write_text(json.dumps(old))
    result = pytester.runpytest("--circuits-run-id", "again", "--circuits-compare", "old", "-p", "no:randomly")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["compared with new: 1 matched, 0 flipped, 1 moved*"])
    cmp_ = json.loads((pytester.path / "reports" / "again" / "report.json").read_text())["compare"]
    assert cmp_["counts"]["matched"] == 1 and cmp_["moved"][0]["margin_before"] == 0.01


def _readme_conftest() -> str:
    """The README's declared-hooks example: the conftest this test runs is the one the README shows."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n# conftest.py \(declared hooks\)\n(.*?)```", text, re.S)
    assert block, "the README's declared-hooks example is gone"
    return block.group(1)


KNOWN_BY_HOOK = _readme_conftest()


def test_known_failures_come_from_the_declared_hook_and_from_a_module_table(pytester):
    pytester.makeconftest(KNOWN_BY_HOOK)
    pytester.makepyfile(test_vendored='''
        def test_refuted(claim):
            claim.at_least("acc", 0.5, 0.9)
    ''', test_own='''
        KNOWN_FAILURES = {"test_refuted": "refuted, listed by the module"}

        def test_refuted(claim):
            claim.at_least("acc", 0.5, 0.9)
    ''')
    result = pytester.runpytest("-rx", "--circuits-no-report", "-p", "no:randomly")
    result.assert_outcomes(xfailed=2)
    result.stdout.fnmatch_lines(["*test_own.py::test_refuted*listed by the module*",
                                 "*test_vendored.py::test_refuted*listed by the conftest*"])


def test_two_reasons_for_one_known_failure_are_an_error(pytester):
    pytester.makeconftest(KNOWN_BY_HOOK.replace("test_vendored", "test_own"))
    pytester.makepyfile(test_own='''
        KNOWN_FAILURES = {"test_refuted": "another reason"}

        def test_refuted(claim):
            claim.at_least("acc", 0.5, 0.9)
    ''')
    result = pytester.runpytest("--circuits-no-report", "-p", "no:randomly")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "is given two reasons" in result.stderr.str() + result.stdout.str()


def test_sweep_plans_come_from_the_declared_hook_and_from_a_module_function(pytester):
    pytester.makeconftest('''
def pytest_circuits_sweep_plan(options, module, items):
    return [("from_conftest", (7,))] if options.full_sweep else []
''')
    mod = pytester.makepyfile(test_grid='''
def circuits_sweep_plan(options, items):
    return [("from_module", (0, 1))]

def test_x():
    pass
''')
    config = pytester.parseconfigure(mod)
    from circuits.plugin.zoo_fixtures import sweep_plan

    items = [SimpleNamespace(fixturenames=[], module=pytester.getmodulecol(mod).obj)]
    plan = sweep_plan(SimpleNamespace(seeds=(), full_sweep=True, model_name=lambda n: n), items, config.hook)
    assert plan == {(7,): ["from_conftest"], (0, 1): ["from_module"]}
    no_hook = sweep_plan(SimpleNamespace(seeds=(), full_sweep=True, model_name=lambda n: n), items)
    assert no_hook == {(0, 1): ["from_module"]}
