"""What the three outputs show, as data: per-module roll-up, claims grouped by test, each control's
value, the power matrix, the per-claim robustness view across seeds, the model metrics in reading
order, the one-line summary. Markdown, HTML and terminal only format these, so they cannot disagree.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from dataclasses import dataclass, field

from circuits.claims.core import format_numbers
from circuits.records import (GENERIC_CONTROLS, OUTCOME_KINDS, ClaimResult, ControlCell,
                       Record, Run, RunKind, TestResult, as_run)
from circuits.report.collect import control_kind, outcome_counts, problem_tests, run_errors
from circuits.report.machine import commit_text

__all__ = ["fmt_margin", "measured_text", "op_text", "control_text", "claim_rows", "test_label", "where",
           "problem_tests", "headline", "summary_counts", "one_line_summary", "module_rollup", "anchor",
           "test_groups", "power_matrix", "robustness", "wilson_interval", "held_out", "held_out_text", "ordered_metrics",
           "binding_text", "commit_text", "outcome_items", "problem_lines", "not_run_groups", "not_run_text",
           "has_problems", "run_errors", "OUTCOME_KINDS", "specificity", "specificity_text"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


# --- numbers and claim cells ------------------------------------------------------------------------------


def fmt_margin(m: Any) -> str:
    if not isinstance(m, (int, float)) or not math.isfinite(m):
        return "—"
    return ("+" if m >= 0 else "−") + format_numbers([abs(m)], [])[0]


def measured_text(c: ClaimResult | dict) -> str:
    """``0.81 [0.74, 0.87]`` (point and CI) or the value alone."""
    c = ClaimResult.from_json(c)
    v = c.value_text or "—"
    ci = c.ci
    if ci is not None and ci.lo is not None and ci.hi is not None and c.value is not None:
        lo, hi, _ = format_numbers([ci.lo, ci.hi, c.value], [])
        v += f" [{lo}, {hi}]"
    if c.units and c.op != "holds" and c.value is not None:
        v += f" {c.units}"
    return v


def op_text(c: ClaimResult | ControlCell | dict) -> tuple[str, str]:
    """(operator, threshold) columns: (">=", "0.9"), ("≈", "1.0 ± 0.1"), ("in", "[0.2, 0.8]"): the claim
    record carries them (``op_symbol``, ``threshold_text``); nothing re-parses the requirement text."""
    if isinstance(c, dict):
        c = ClaimResult.from_json(c)
    return c.op_symbol, c.threshold_text


CONTROL_MARKS = {"failed": "✓", "held": "✗ held", "missing": "! error", "error": "! error", "skipped": "– skipped"}


def control_text(x: ControlCell) -> str:
    """One control of a claim: ``untrained ✓ 2716 (needs >= 5000, margin −2284)``."""
    known = x.outcome == "held" and x.known
    mark = "✗ held (known)" if known else CONTROL_MARKS.get(x.outcome, x.outcome)
    text = f"{x.control} {mark}"
    if x.value_text:
        text += f" {x.value_text}"
        if x.requirement and x.op != "holds":
            text += f" (needs {x.requirement}, margin {fmt_margin(x.margin)})"
    return text


def binding_text(c: ClaimResult) -> str:
    """A claim's binding (which component a role resolved to), where the claim records one."""
    b = c.extra.get("binding") if isinstance(c.extra, dict) else None
    if not b:
        return ""
    if isinstance(b, dict):
        return ", ".join(f"{k}={v}" for k, v in b.items())
    return str(b)


# --- grouping ----------------------------------------------------------------------------------------------


def claim_rows(report: Run | dict) -> dict[str, list[ClaimResult]]:
    """Main-run claims grouped by module, in report order."""
    mods: dict[str, list[ClaimResult]] = defaultdict(list)
    for c in as_run(report).claims:
        if not c.control:
            mods[c.module or "?"].append(c)
    return dict(mods)


def where(r: Any, *, on_control: bool = True) -> str:
    """``test_acc[x] (seed 1) on control untrained``: a claim's place (a claim or compare row), for
    messages and tables."""
    text = (r.group or getattr(r, "nodeid", None) or "").split("::", 1)[-1]
    if r.seed is not None:
        text += f" (seed {r.seed})"
    if on_control and r.control:
        text += f" on control {r.control}"
    return text


def test_label(c: ClaimResult) -> str:
    """The test part of a nodeid (after the module path), with the seed if any."""
    return where(c, on_control=False)


def anchor(text: str) -> str:
    """An HTML id for a module or test."""
    return "m-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def _figure_test(tests: dict[str, TestResult], f: Any) -> TestResult:
    """The test that drew a figure (a bare record of its id when the report lacks the test)."""
    nodeid = f.nodeid or ""
    return tests.get(nodeid) or TestResult(nodeid=nodeid, module=nodeid.split("::")[0], group=nodeid)


def modules_in_order(report: Run | dict) -> list[str]:
    """Modules with claims first (report order), then modules that only drew figures."""
    run = as_run(report)
    mods = list(claim_rows(run))
    tests = {t.nodeid: t for t in run.tests}
    for f in run.figures:
        m = _figure_test(tests, f).module
        if m not in mods:
            mods.append(m)
    return mods


def test_function(group: str) -> str:
    """``m.py::test_sweep[3]`` -> ``m.py::test_sweep``: parametrized cases share one heading."""
    return group.split("[", 1)[0] if group.endswith("]") else group


def case_label(group: str) -> str:
    """The parametrization of a test group (``3`` for ``test_sweep[3]``), or ""."""
    return group[group.index("[") + 1:-1] if group.endswith("]") and "[" in group else ""


@dataclass
class TestGroup(Record):
    """A test function of a module (its parametrized cases together): its main-run claims and the
    figures its cases drew, as (test, figure) pairs."""

    group: str = ""
    doc: str = ""
    claims: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    anchor: str = ""


def test_groups(report: Run | dict, module: str) -> list[TestGroup]:
    """The module's test functions in order (parametrized cases together), each with its main-run
    claims and the figures its cases drew (main runs first, controls last)."""
    run = as_run(report)
    tests = {t.nodeid: t for t in run.tests}
    groups: dict[str, TestGroup] = {}

    def group(key: str, t: TestResult | None) -> TestGroup:
        fn = test_function(key)
        if fn not in groups:
            groups[fn] = TestGroup(group=fn, anchor=anchor(fn))
        if t is not None and t.doc and not groups[fn].doc:
            groups[fn].doc = t.doc
        return groups[fn]

    for c in claim_rows(run).get(module, []):
        group(c.group or c.nodeid, tests.get(c.nodeid)).claims.append(c)
    for f in run.figures:
        t = _figure_test(tests, f)
        if t.module != module:
            continue
        group(t.group or f.nodeid or "", t).figures.append((t, f))
    order = lambda tf: (tf[0].control is not None,  # noqa: E731
                        tf[0].seed if isinstance(tf[0].seed, int) else -1, tf[0].control or "")
    for g in groups.values():
        g.figures.sort(key=order)
    return list(groups.values())


def unexpected_control_runs(report: Run | dict) -> list:
    """Control / mutation runs whose claims held (no teeth, no power) or that errored, other than those
    the module's KNOWN_FAILURES documents."""
    return [r for r in as_run(report).control_runs if r.outcome != "ok" and not r.known]


@dataclass(frozen=True)
class ProblemLine(Record):
    """One thing a reader must look at: ``kind`` a label ("crash", "failed claim", "no teeth"...)."""

    kind: str = ""
    nodeid: str | None = None
    message: str | None = None


def problem_lines(report: Run | dict) -> list[ProblemLine]:
    """Everything a reader must look at, one line each: errors by kind (collection, fixture,
    never-applied control, NaN/inf value, crash), failed claims, then control / mutation runs whose
    claims held (no teeth / no power) that no KNOWN_FAILURES documents."""
    run = as_run(report)
    out = [ProblemLine(kind=e.label, nodeid=e.nodeid, message=e.message) for e in run_errors(run)]
    out += [ProblemLine(kind="failed claim", nodeid=c.nodeid, message=c.message) for c in run.claims
            if not c.control and c.status == "FAIL"]
    out += [ProblemLine(kind=(r.outcome or "").replace("_", " "), nodeid=r.nodeid, message=r.message)
            for r in unexpected_control_runs(run) if r.outcome != "error"]
    return out


@dataclass(frozen=True)
class NotRunGroup(Record):
    """Tests deselected at collection for one reason, and the option that runs them."""

    reason: str = ""
    option: str = ""
    n: int = 0
    nodeids: list = field(default_factory=list)


def not_run_groups(report: Run | dict) -> list[NotRunGroup]:
    """Tests deselected at collection, by why."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for r in as_run(report).not_run:
        groups[(r.reason or "", r.option or "")].append(r.nodeid or "")
    return [NotRunGroup(reason=reason, option=option, n=len(ids), nodeids=ids)
            for (reason, option), ids in groups.items()]


def not_run_text(report: Run | dict) -> str:
    """``not run: 35 full-sweep grid tests (run with --circuits-full-sweep), ...`` or ""."""
    groups = not_run_groups(report)
    if not groups:
        return ""
    return "not run: " + ", ".join(f"{g.n} {g.reason} (run with {g.option})" for g in groups)


def known_control_runs(report: Run | dict) -> list:
    """Control / mutation runs whose claims held, as the module's KNOWN_FAILURES says (with its reason)."""
    return [r for r in as_run(report).control_runs if r.outcome != "ok" and r.known]


# --- summaries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts(Record):
    """The one-line summary's numbers: ``outcomes`` / ``known`` by OUTCOME_KINDS key (``known``: control
    runs the modules' KNOWN_FAILURES document), and the flags ``generic_only`` / ``no_controls``."""

    outcomes: dict = field(default_factory=dict)
    known: dict = field(default_factory=dict)
    generic_only: int = 0
    no_controls: int = 0
    claims: int = 0
    tests: int = 0


def summary_counts(report: Run | dict) -> Counts:
    """The one-line summary's numbers (:class:`Counts`)."""
    run = as_run(report)
    s = run.summary
    counts, known = outcome_counts(run)
    return Counts(outcomes=counts, known=known, generic_only=s.generic_only, no_controls=s.no_controls,
                  claims=s.claims, tests=sum(s.tests.values()))


@dataclass(frozen=True)
class OutcomeItem(Record):
    """One OUTCOME_KINDS count: its key, label, number, known number, whether it is a problem, text."""

    key: str = ""
    label: str = ""
    n: int = 0
    known: int = 0
    problem: bool = False
    text: str = ""


def outcome_items(report: Run | dict) -> list[OutcomeItem]:
    """The summary's counts in OUTCOME_KINDS order."""
    n = summary_counts(report)
    items = []
    for key, label, problem in OUTCOME_KINDS:
        known, count = n.known.get(key, 0), n.outcomes.get(key, 0)
        text = f"{count} {label}" + (f" (+{known} known)" if known else "")
        items.append(OutcomeItem(key=key, label=label, n=count, known=known, problem=problem, text=text))
    return items


def has_problems(report: Run | dict) -> bool:
    """Whether any outcome counted as a problem is non-zero (the summary is red then)."""
    return any(i.problem and i.n for i in outcome_items(report))


def one_line_summary(report: Run | dict, *, with_path: bool = True) -> str:
    """``circuits: 143 claims held, 26 known failures, 0 failed claims, 0 no-teeth (+7 known), 0 no-power,
    0 errors — report: PATH``: every OUTCOME_KINDS count, never folded into another."""
    run = as_run(report)
    n = summary_counts(run)
    text = "circuits: " + ", ".join(i.text for i in outcome_items(run))
    if n.generic_only:
        text += f", {n.generic_only} with generic controls only"
    if n.no_controls:
        text += f", {n.no_controls} without controls"
    if run.interrupted:
        text += " (interrupted: partial)"
    if run.html_path and with_path:
        text += f" — report: {run.html_path}"
    return text


def headline(report: Run | dict) -> str:
    s = as_run(report).summary
    parts = [f"{s.passed}/{s.claims} claims passed"]
    if s.failed:
        parts.append(f"{s.failed} failed")
    if s.xfailed:
        parts.append(f"{s.xfailed} known failures")
    if s.control_runs:
        parts.append(f"controls {s.controls_ok}/{s.control_runs} ok")
        if s.controls_no_teeth:
            parts.append(f"{s.controls_no_teeth} without teeth")
        if s.controls_no_power:
            parts.append(f"{s.controls_no_power} without power")
        if s.controls_unspecific:
            parts.append(f"{s.controls_unspecific} unspecific")
        if s.controls_known:
            parts.append(f"{s.controls_known} known to pass (documented)")
    if s.generic_only:
        parts.append(f"{s.generic_only} with generic controls only")
    bad = s.tests.get("failed", 0) + s.tests.get("error", 0)
    parts.append(f"{sum(s.tests.values())} tests" + (f" ({bad} failed/errored)" if bad else ""))
    return ", ".join(parts)


@dataclass(frozen=True)
class ModuleRow(Record):
    """One hypotheses module (system) of the run: claim counts, control cells, figures, time."""

    module: str = ""
    anchor: str = ""
    doc: str = ""
    claims: int = 0
    held: int = 0
    known: int = 0
    failed: int = 0
    errors: int = 0
    controls_failed: int = 0
    controls_held: int = 0  # held and not documented: a problem
    controls_known: int = 0  # a documented known miss is counted (and coloured) as known, not as a problem
    controls_total: int = 0
    generic_only: int = 0
    no_controls: int = 0
    figures: int = 0
    duration: float = 0.0


def module_rollup(report: Run | dict) -> list[ModuleRow]:
    """One row per hypotheses module (system): claim counts, control cells, figures, time."""
    run = as_run(report)
    rows = []
    by_mod = claim_rows(run)
    errors = run_errors(run)
    for module in modules_in_order(run):
        cs = by_mod.get(module, [])
        cells = [x for c in cs for x in c.controls]
        mod_tests = [t for t in run.tests if t.module == module]
        mod_ids = {t.nodeid for t in mod_tests}
        info = run.modules.get(module)
        doc = (info.doc if info else "").strip()
        rows.append(ModuleRow(
            module=module, anchor=anchor(module), doc=doc.split("\n\n")[0].replace("\n", " "),
            claims=len(cs), held=sum(c.status == "PASS" for c in cs), known=sum(c.status == "XFAIL" for c in cs),
            failed=sum(c.status == "FAIL" for c in cs),
            errors=sum(e.nodeid in mod_ids or (e.nodeid or "").split("::")[0] == module for e in errors),
            controls_failed=sum(x.outcome == "failed" for x in cells),
            controls_held=sum(x.outcome == "held" and not x.known for x in cells),
            controls_known=sum(x.outcome == "held" and bool(x.known) for x in cells),
            controls_total=sum(x.outcome in ("failed", "held", "missing", "error") for x in cells),
            generic_only=sum(bool(c.generic_only) for c in cs), no_controls=sum(bool(c.no_controls) for c in cs),
            figures=sum(1 for f in run.figures if (f.nodeid or "").split("::")[0] == module),
            duration=sum(t.duration or 0.0 for t in mod_tests)))
    return rows


# --- power matrix ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PowerRow(Record):
    claim: ClaimResult = field(default_factory=ClaimResult)
    cells: dict = field(default_factory=dict)  # spec -> ControlCell


@dataclass(frozen=True)
class PowerMatrix(Record):
    columns: list = field(default_factory=list)  # [(spec, kind)]
    rows: list = field(default_factory=list)  # [PowerRow]


def power_matrix(report: Run | dict, module: str) -> PowerMatrix | None:
    """Claims x every control / mutation spec that ran in ``module``.

    ``columns``: [(spec, kind)] with kind "control" or "mutation" (controls first); ``rows``: one per
    main-run claim that has any control, with ``cells`` {spec: the claim's control cell}. A cell failed
    as required is the claim's power; one that held is "no teeth" (a control) or "no power" (a mutation).
    """
    run = as_run(report)
    runs = {r.nodeid: r for r in run.control_runs}
    specs: dict[str, str] = {}
    for t in run.tests:
        if t.module == module and t.control:
            specs.setdefault(t.control, control_kind(t.control, runs.get(t.nodeid)))
    specs = {k: v for k, v in specs.items() if v != RunKind.ALTERNATIVE}  # those have their own view: specificity()
    if not specs:
        return None
    columns = sorted(specs.items(), key=lambda kv: (kv[1] == RunKind.MUTATION, kv[0] not in GENERIC_CONTROLS, kv[0]))
    rows = []
    for c in claim_rows(run).get(module, []):
        cells = {x.control: x for x in c.controls if x.kind != RunKind.ALTERNATIVE}
        if cells:
            rows.append(PowerRow(claim=c, cells=cells))
    return PowerMatrix(columns=columns, rows=rows)


def cell_verdict(x: ControlCell | None) -> tuple[str, str]:
    """(css class, short verdict) of one power-matrix cell."""
    if x is None:
        return "na", ""
    if x.outcome == "failed":
        return "ok", "fails ✓"
    if x.outcome == "held":
        if x.known:  # documented in the module's KNOWN_FAILURES: known, not a new problem
            return "known", "known"
        return "bad", {RunKind.MUTATION.value: "no power", RunKind.ALTERNATIVE.value: "unspecific"}.get(x.kind,
                                                                                                      "no teeth")
    if x.outcome == "skipped":
        return "muted", "skipped"
    return "bad", "error"


# --- specificity ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecificityRow(Record):
    """A main-run claim's alternatives: ``n`` that ran, ``held`` those on which it also holds, ``best``
    the one whose margin came closest to (or past) the requirement, ``known`` the KNOWN_FAILURES reason."""

    claim: ClaimResult = field(default_factory=ClaimResult)
    module: str = ""
    n: int = 0
    held: list = field(default_factory=list)  # [ControlCell]
    best: ControlCell | None = None
    known: str | None = None


def specificity(report: Run | dict, module: str | None = None) -> list[SpecificityRow]:
    """Per main-run claim with specificity variants (the claim pointed at each alternative of the part
    it names), see :class:`SpecificityRow`."""
    run = as_run(report)
    runs = {r.nodeid: r for r in run.control_runs}
    rows = []
    for mod, cs in claim_rows(run).items():
        if module is not None and mod != module:
            continue
        for c in cs:
            alts = [x for x in c.controls if x.kind == RunKind.ALTERNATIVE and x.outcome in ("held", "failed")]
            if not alts:
                continue
            held = [x for x in alts if x.outcome == "held"]
            scored = [x for x in alts if isinstance(x.margin, (int, float))]
            best = max(scored, key=lambda x: x.margin) if scored else None
            known = next((runs[x.nodeid].known for x in held if x.nodeid in runs and runs[x.nodeid].known), None)
            rows.append(SpecificityRow(claim=c, module=mod, n=len(alts), held=held, best=best, known=known))
    return rows


def specificity_text(row: SpecificityRow) -> str:
    """``"0 of 5 alternatives also hold (best: rebind:count_head,L2H1 0.0065, margin -0.01)"``."""
    held = ", ".join(f"{x.spec_name} {x.value_text}" for x in row.held)
    text = f"{len(row.held)} of {row.n} alternatives also hold"
    if held:
        text += f": {held}"
    elif row.best is not None:
        b = row.best
        text += f" (closest: {b.spec_name} {b.value_text}, margin {fmt_margin(b.margin)})"
    if row.held and row.known:
        text += " [known]"
    return text


# --- robustness across seeds -------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 1) when n == 0.

    centre = (p + z²/2n) / (1 + z²/n), half width = z / (1 + z²/n) * sqrt(p(1-p)/n + z²/4n²).
    Unlike p ± z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0/n or n/n.
    """
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class HeldOut(Record):
    """A model's held-out test accuracy and its Wilson 95% interval over ``n_test`` examples."""

    test_acc: float = 0.0
    n_test: int = 0
    lo: float = 0.0
    hi: float = 1.0


def held_out(metrics: dict | None, n_test: int | None) -> HeldOut | None:
    """A model's held-out test accuracy with its Wilson 95% interval over the test set's size
    (issue 17: a 10k set cannot certify 99.9%, a 100k one can to about +-0.02%); None without both."""
    acc = (metrics or {}).get("test_acc")
    if not isinstance(acc, (int, float)) or not n_test:
        return None
    lo, hi = wilson_interval(int(round(acc * n_test)), int(n_test))
    return HeldOut(test_acc=float(acc), n_test=int(n_test), lo=lo, hi=hi)


def held_out_text(h: HeldOut | None) -> str:
    """``test_acc 99.965% [99.951%, 99.975%] on 100,000 fresh`` (empty without a test set)."""
    if not h:
        return ""
    return f"test_acc {h.test_acc:.3%} [{h.lo:.3%}, {h.hi:.3%}] (Wilson 95%, {h.n_test:,} held out)"


@dataclass(frozen=True)
class SeedCell(Record):
    """A claim on one seed: reached or not, passed, its value, margin and binding, whether it flipped
    against the reference."""

    seed: Any = None
    reached: bool = True
    passed: bool = False
    status: str = ""
    value_text: str = "—"
    margin: float | None = None
    binding: str = ""
    flip: bool = False


@dataclass(frozen=True)
class Reference(Record):
    value_text: str | None = None
    passed: bool = False
    margin: float | None = None
    status: str | None = None
    source: str = ""  # "this run", or the compared run's id


@dataclass(frozen=True)
class RobustnessRow(Record):
    """A claim across seeds: the reference, each seed, the pass rate with a Wilson 95% interval."""

    group: str = ""
    module: str | None = None
    name: str = ""
    test: str = ""
    reference: Reference | None = None
    seeds: list = field(default_factory=list)  # [SeedCell]
    n: int = 0
    passed: int = 0
    rate: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    expected_failure: bool = False
    flips: int = 0


def robustness(report: Run | dict) -> list[RobustnessRow]:
    """Per claim across seeds: the reference, each seed (value, margin, binding, flip), the pass rate
    with a Wilson 95% interval. Empty unless some main-run claim carries a seed."""
    run = as_run(report)
    main = [c for c in run.claims if not c.control]
    if not any(c.seed is not None for c in main):
        return []
    cmp_ = run.compare
    who = (cmp_.against.run_id if cmp_ else None) or "compared run"
    refs = {(r.group, r.name): Reference(value_text=r.value_text, passed=bool(r.passed), margin=r.margin,
                                         status=r.status, source=who)
            for r in ((cmp_.reference if cmp_ else None) or [])}
    for c in main:  # a reference run inside this report wins over the compared one
        if c.seed is None:
            refs[(c.group, c.name)] = Reference(value_text=c.value_text, passed=bool(c.passed), margin=c.margin,
                                                status=c.status, source="this run")
    rates = {(r.group, r.name): r for r in run.pass_rates}
    groups: dict[tuple, list[ClaimResult]] = defaultdict(list)
    for c in main:
        if c.seed is not None:
            groups[(c.group, c.name)].append(c)
    rows = []
    for (group, name), cs in groups.items():
        ref = refs.get((group, name))
        seeds = []
        for c in sorted(cs, key=lambda c: (str(type(c.seed)), c.seed)):
            flip = ref is not None and ref.passed != bool(c.passed)
            seeds.append(SeedCell(seed=c.seed, passed=bool(c.passed), status=c.status, value_text=measured_text(c),
                                  margin=c.margin, binding=binding_text(c), flip=flip))
        rate = rates.get((group, name))
        for seed, ok in (rate.seeds if rate else {}).items():
            if ok is None:  # the test ran on this seed but stopped before the claim
                seeds.append(SeedCell(seed=seed, reached=False, status="NOT REACHED"))
        n, k = len(seeds), sum(s.passed for s in seeds)
        lo, hi = wilson_interval(k, n)
        rows.append(RobustnessRow(group=group, module=cs[0].module, name=name, test=group.split("::", 1)[-1],
                                  reference=ref, seeds=seeds, n=n, passed=k, rate=k / n if n else 0.0, lo=lo, hi=hi,
                                  expected_failure=any(c.status == "XFAIL" for c in cs),
                                  flips=sum(s.flip for s in seeds)))
    return rows


def rate_text(r: RobustnessRow) -> str:
    """``2/3 (67%) Wilson 95% [21%, 94%]``; a known failure says so."""
    text = f"{r.passed}/{r.n} ({r.rate:.0%}) Wilson 95% [{r.lo:.0%}, {r.hi:.0%}]"
    if r.expected_failure:
        text += " — known failure: expected to fail"
    return text


# --- models ------------------------------------------------------------------------------------------------


def _metric_rank(key: str) -> tuple:
    if key == "test_acc":
        return (0, "")
    if key == "test_loss":
        return (1, "")
    if key.startswith("test_"):
        return (2, key)
    if key.startswith("eval_"):
        return (3, key)
    return (4, "")  # the rest keep the card's order (sorted() is stable)


def ordered_metrics(metrics: dict | None) -> list[tuple[str, Any]]:
    """Scalar metrics, held-out first: test_acc, test_loss, other test_*, eval_*, then the rest."""
    items = [(k, v) for k, v in (metrics or {}).items() if k != "history" and not isinstance(v, (dict, list))]
    return sorted(items, key=lambda kv: _metric_rank(kv[0]))


def metrics_text(metrics: dict | None, limit: int = 6) -> str:
    items = ordered_metrics(metrics)[:limit]
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in items)


GROUND_TRUTH_CLAIM = re.compile(r"^(TRUE|FALSE) ([A-Za-z-]+)(?: \(([^)]*)\))?: ")


def ground_truth_matrix(report: Run | dict) -> dict | None:
    """The confusion matrix of claims about models whose mechanism is known (Tracr-compiled: claim
    names "TRUE <type>: ..." / "FALSE <type> (<how>): ... is refuted", hypotheses/test_ground_truth.py),
    per claim type: {"types": {type: {"true_pass", "true_fail", "false_pass", "false_fail"}},
    "total": the same summed, "wrong": [names of wrong verdicts]}. A FALSE claim's record holds when
    the false claim failed, so its verdict "pass" is that record failing. None when no such claims ran."""
    types: dict[str, dict[str, int]] = {}
    wrong: list[str] = []
    for c in as_run(report).claims:
        m = GROUND_TRUTH_CLAIM.match(c.name or "")
        if c.control or not m:
            continue
        truth, kind = m.group(1).lower(), m.group(2)
        claim_passed = bool(c.passed) if truth == "true" else not c.passed
        cell = f"{truth}_{'pass' if claim_passed else 'fail'}"
        row = types.setdefault(kind, {"true_pass": 0, "true_fail": 0, "false_pass": 0, "false_fail": 0})
        row[cell] += 1
        if cell in ("true_fail", "false_pass"):
            wrong.append(c.name)
    if not types:
        return None
    total = {k: sum(r[k] for r in types.values()) for k in ("true_pass", "true_fail", "false_pass", "false_fail")}
    return {"types": dict(sorted(types.items())), "total": total, "wrong": wrong}


def ground_truth_table(report: Run | dict) -> list[str]:
    """`ground_truth_matrix` as Markdown table lines (empty when no ground-truth claims ran)."""
    gt = ground_truth_matrix(report)
    if gt is None:
        return []
    lines = ["| claim type | TRUE, passed | TRUE, failed | FALSE, passed | FALSE, failed | verdicts right |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind, r in [*gt["types"].items(), ("all", gt["total"])]:
        n = sum(r.values())
        right = r["true_pass"] + r["false_fail"]
        label = f"**{kind}**" if kind == "all" else kind
        lines.append(f"| {label} | {r['true_pass']} | {r['true_fail']} | {r['false_pass']} | {r['false_fail']} | "
                     f"{right} / {n} |")
    return lines
