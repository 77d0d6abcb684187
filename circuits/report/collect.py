"""Records -> the run: what the plugin's test reports carry, joined into one :class:`~circuits.records.Run`.

Knows nothing about pytest beyond duck-typed test reports (``nodeid``, ``when``, ``outcome``,
``user_properties``...). The records arrive as JSON (``user_properties`` cross process boundaries
under xdist) and are read back through :mod:`circuits.records`; everything below works on records.
Each main-run claim gets its ``controls``: how the same claim (same test group, seed and name) fared
on each control or targeted mutation, with value, requirement and margin.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any, Iterable

from circuits.records import (ERROR_KINDS, GENERIC_CONTROLS, OUTCOME_KINDS, PROP_CLAIM, PROP_CONTROL, PROP_FIGURE, PROP_MODEL,
                       PROP_TEST, PROPS, SCHEMA, ClaimResult, CollectionError, ControlCell, ControlRun, ErrorLine,
                       FigureRecord, ModelInfo, ModuleInfo, PassRate, RecordError, Run, RunKind, Summary, TestMeta,
                       TestResult, as_run, is_generic, run_kind)

__all__ = ["SCHEMA", "PROPS", "GENERIC_CONTROLS", "OUTCOME_KINDS", "ERROR_KINDS", "RunCollector", "pass_rates",
           "rederive", "control_kind", "is_generic", "problem_tests", "run_errors", "outcome_counts"]


def control_kind(spec: str | None, run: ControlRun | None = None) -> str:
    """"mutation" / "alternative" for the runs the plugin derives (``mutate:<what>``, ``alt:<what>``),
    else "control" (a run record whose kind says mutation / alternative wins)."""
    if run is not None and run.kind in (RunKind.MUTATION.value, RunKind.ALTERNATIVE.value):
        return run.kind
    return str(run_kind(spec or ""))


@dataclasses.dataclass
class _TestState:
    """A test's outcome while its reports arrive (setup, call, teardown), then a TestResult."""

    nodeid: str
    meta: TestMeta | None = None
    outcome: str | None = None
    phases: dict = dataclasses.field(default_factory=dict)
    message: str | None = None
    xfail_reason: str | None = None

    @property
    def duration(self) -> float:
        return round(sum(p["duration"] for p in self.phases.values()), 6)


class RunCollector:
    """Accumulates what test reports carry in ``user_properties`` plus their outcomes.

    Safe to feed the setup, call and teardown reports of the same test: records are keyed, so the
    same record seen in several phases is kept once.
    """

    def __init__(self) -> None:
        self.tests: dict[str, _TestState] = {}
        self.claims: dict[tuple[str, str], ClaimResult] = {}
        self.control_runs: dict[str, ControlRun] = {}
        self.models: dict[str, ModelInfo] = {}
        self.figures: dict[tuple[str, str], FigureRecord] = {}
        self.order: dict[str, int] = {}
        self.collection_errors: list[CollectionError] = []

    def set_order(self, nodeids: Iterable[str]) -> None:
        """Collection order, so the report lists tests as the files define them (also under xdist)."""
        for nodeid in nodeids:
            self.order.setdefault(nodeid, len(self.order))

    @property
    def empty(self) -> bool:
        return not (self.claims or self.models or self.figures or self.control_runs or self.collection_errors or
                    any(t.meta is not None for t in self.tests.values()))

    def add_collect_report(self, rep: Any) -> None:
        """A failed collection (an import error, an unknown control...): the report says so."""
        if rep.outcome == "failed":
            self.collection_errors.append(CollectionError(nodeid=rep.nodeid, message=_crash_message(rep) or
                                                          str(getattr(rep, "longrepr", ""))[-800:]))

    def add_properties(self, nodeid: str, props: Iterable[tuple[str, Any]]) -> None:
        for entry in props:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in PROPS):
                continue
            key, val = entry
            if not isinstance(val, dict):
                continue
            try:
                self._add_record(nodeid, key, val)
            except RecordError:  # another plugin's property of the same name: not ours
                continue

    def _add_record(self, nodeid: str, key: str, val: dict) -> None:
        if key == PROP_TEST:
            t = self._test(nodeid)
            if t.meta is None:
                t.meta = TestMeta.from_json(val)
        elif key == PROP_CLAIM:
            c = ClaimResult.from_json({**val, "nodeid": nodeid})
            self.claims[(nodeid, c.name)] = c
        elif key == PROP_CONTROL:
            self.control_runs[nodeid] = dataclasses.replace(ControlRun.from_json(val), nodeid=nodeid)
        elif key == PROP_MODEL:
            m = ModelInfo.from_json(val)
            self.models.setdefault(m.identity, m)
        elif key == PROP_FIGURE:
            f = dataclasses.replace(FigureRecord.from_json(val), nodeid=nodeid)
            self.figures[(nodeid, f.name)] = f

    def _test(self, nodeid: str) -> _TestState:
        if nodeid not in self.tests:
            self.tests[nodeid] = _TestState(nodeid)
        return self.tests[nodeid]

    def add_test_report(self, rep: Any) -> None:
        """Feed one pytest TestReport (duck-typed: nodeid, when, outcome, duration, longrepr...)."""
        self.add_properties(rep.nodeid, getattr(rep, "user_properties", ()) or ())
        t = self._test(rep.nodeid)
        when, outcome = getattr(rep, "when", "call"), rep.outcome
        dur = float(getattr(rep, "duration", 0.0) or 0.0)
        t.phases[when] = {"outcome": outcome, "duration": round(dur, 6)}
        xfail = getattr(rep, "wasxfail", None)
        if when == "call" or (when == "setup" and outcome != "passed") or when not in ("setup", "teardown"):
            if outcome == "passed":
                t.outcome = "xpassed" if xfail is not None else "passed"
            elif outcome == "skipped":
                t.outcome = "xfailed" if xfail is not None else "skipped"
            else:
                t.outcome = "error" if when == "setup" else "failed"
            if xfail:
                t.xfail_reason = str(xfail)
            if outcome != "passed":
                t.message = _crash_message(rep)
        elif when == "teardown" and outcome == "failed":
            if t.outcome in (None, "passed", "xpassed"):
                t.outcome = "error"
            t.message = (t.message + " | " if t.message else "") + "teardown: " + _crash_message(rep)
        elif when == "setup" and t.outcome is None:
            t.outcome = "running"  # replaced by the call report; stays if the run is interrupted

    def add_interrupted(self, nodeid: str, props: Iterable[tuple[str, Any]]) -> None:
        """A test stopped by KeyboardInterrupt (no report of its call will come)."""
        self.add_properties(nodeid, props)
        t = self._test(nodeid)
        t.outcome, t.message = "interrupted", "KeyboardInterrupt"

    def build_run(self, **meta: Any) -> Run:
        """The run's report. ``meta``: run_id, created, duration_s, exitstatus, machine, git, ..."""
        rank = lambda nodeid: self.order.get(nodeid, len(self.order))  # noqa: E731
        tests = sorted((self._finish_test(t) for t in self.tests.values()), key=lambda t: rank(t.nodeid))
        by_id = {t.nodeid: t for t in tests}
        claims = sorted((self._claim(c, by_id.get(c.nodeid)) for c in self.claims.values()),
                        key=lambda c: rank(c.nodeid))
        run = Run.from_json(meta)
        run.schema = SCHEMA
        run.tests, run.claims = tests, claims
        run.control_runs = list(self.control_runs.values())
        run.models = list(self.models.values())
        run.figures = list(self.figures.values())
        run.collection_errors = list(self.collection_errors)
        run.modules = _modules(tests)
        return _derive(run)

    def build(self, **meta: Any) -> dict:
        """:meth:`build_run` as report.json's JSON."""
        return self.build_run(**meta).to_json()

    def _finish_test(self, t: _TestState) -> TestResult:
        meta = t.meta.to_json() if t.meta is not None else {
            "module": t.nodeid.split("::")[0], "group": t.nodeid, "test": t.nodeid.split("::")[-1], "circuits": False}
        outcome = "not finished" if t.outcome in (None, "running") else t.outcome
        return TestResult.from_json({**meta, "nodeid": t.nodeid, "outcome": outcome, "duration": t.duration,
                                     "phases": dict(t.phases), "message": t.message, "xfail_reason": t.xfail_reason})

    def _claim(self, c: ClaimResult, t: TestResult | None) -> ClaimResult:
        module = c.nodeid.split("::")[0]
        return dataclasses.replace(c, module=(t.module if t else "") or module, group=(t.group if t else "") or c.nodeid,
                                   test=(t.test if t else "") or c.nodeid, test_outcome=t.outcome if t else None)


def _crash_message(rep: Any) -> str:
    lr = getattr(rep, "longrepr", None)
    if lr is None:
        return ""
    if isinstance(lr, tuple) and len(lr) == 3:  # a skip: (path, lineno, reason)
        return str(lr[2])
    crash = getattr(lr, "reprcrash", None)
    msg = getattr(crash, "message", None)
    if not msg:
        text = str(lr).strip().splitlines()
        e_lines = [ln[1:].strip() for ln in text if ln.startswith("E ")]
        msg = e_lines[0] if e_lines else (text[-1] if text else "")
    return msg[:800]


def _status(c: ClaimResult) -> str:
    """PASS / FAIL / XFAIL for main claims; OK / HELD for claims measured on a control."""
    if c.control:
        return "HELD" if c.passed else "OK"
    if c.problem and not c.passed:
        return "ERROR"  # a NaN / inf / empty measurement: nothing was measured, so nothing failed
    if c.passed:
        return "PASS"
    return "XFAIL" if c.test_outcome == "xfailed" else "FAIL"


def _modules(tests: list[TestResult]) -> dict[str, ModuleInfo]:
    docs: dict[str, str] = {}
    counts: dict[str, int] = defaultdict(int)
    for t in tests:
        counts[t.module] += 1
        if not docs.get(t.module) and t.module_doc:
            docs[t.module] = t.module_doc
    return {m: ModuleInfo(doc=docs.get(m, ""), tests=n) for m, n in counts.items()}


def _attach_controls(run: Run) -> None:
    """Give each main-run claim a ``controls`` list: the same claim (test group, seed, name) measured on
    each control / mutation of its test, with the value, requirement and margin it got there."""
    tests = {t.nodeid: t for t in run.tests}
    runs = {r.nodeid: r for r in run.control_runs}
    ctl_tests: dict[tuple, list[TestResult]] = defaultdict(list)
    for t in run.tests:
        if t.control:
            ctl_tests[(t.group, t.seed)].append(t)
    ctl_claims = {(c.group, c.seed, c.control, c.name): c for c in run.claims if c.control}
    for c in run.claims:
        if c.control:
            r = runs.get(c.nodeid)
            c.control_outcome = r.outcome if r else None
            c.control_kind = control_kind(c.control, r)
            c.control_known = bool(r and r.known)
            continue
        out = []
        for t in ctl_tests.get((c.group, c.seed), []):
            cc = ctl_claims.get((c.group, c.seed, t.control, c.name))
            r = runs.get(t.nodeid)
            cell = ControlCell(control=t.control or "", kind=control_kind(t.control, r), nodeid=t.nodeid,
                               known=bool(r and r.known))
            if cc is not None:
                # a run the plugin judged an error (never applied, a NaN value) showed nothing, whatever
                # its claims say; otherwise the claim held (no teeth / power) or failed as required
                cell.outcome = "error" if r and r.outcome == "error" else "held" if cc.passed else "failed"
                cell.value, cell.value_text, cell.requirement = cc.value, cc.value_text, cc.requirement
                cell.op, cell.op_symbol, cell.threshold_text = cc.op, cc.op_symbol, cc.threshold_text
                cell.margin, cell.message = cc.margin, cc.message
            else:
                # a control run skipped on purpose (e.g. of a claim refuted on this model) is no error
                cell.outcome = "skipped" if t.outcome == "skipped" else "missing"
                cell.message = (r.message if r else None) or t.message or "claim not recorded"
                cell.test_outcome = t.outcome
            out.append(cell)
        c.controls = out
        t = tests.get(c.nodeid)
        # the plugin's own verdict (no `about` target, only generic controls declared) wins; a report
        # built from records without it judges by the controls that ran
        flag = t.generic_only if t is not None else None
        c.generic_only = bool(flag) if flag is not None else bool(out) and all(is_generic(x.control) for x in out)
        # no control and no `about` at all: flagged apart from "generic controls only"
        none = t.no_controls if t is not None else None
        c.no_controls = bool(none) if none is not None else not out
        # about(none="why"): the claims are about no part of a model, so no mutation is derived; the why shows
        c.about_none = t.about_none if t is not None else None


def pass_rates(claims: list, tests: list | None = None) -> list[PassRate]:
    """Main-run claims grouped by (test without seed/control, claim name): pass rate over seeds.

    A seed whose main run ran but never reached the claim (the test failed earlier) counts as not
    passed, with ``None`` in ``seeds``, so a claim cannot look better by crashing on the bad seeds.
    """
    claims = [ClaimResult.from_json(c) for c in claims]
    ran: dict[str, set] = defaultdict(set)
    for t in (TestResult.from_json(t) for t in tests or []):
        if not t.control and t.outcome not in ("skipped", None):
            ran[t.group or t.nodeid].add(t.seed)
    groups: dict[tuple[str, str], list[ClaimResult]] = defaultdict(list)
    for c in claims:
        if not c.control:
            groups[(c.group, c.name)].append(c)
    rows = []
    for (group, name), cs in groups.items():
        seeds: dict[str, bool | None] = {str(c.seed): bool(c.passed) for c in cs}
        for seed in sorted(ran.get(group, set()) - {c.seed for c in cs}, key=str):
            seeds[str(seed)] = None  # the test ran on this seed but did not reach the claim
        n_pass = sum(v is True for v in seeds.values())
        # a known failure (strict xfail) is expected to fail: 0/2 is its success, not a red row
        expected = any(c.status == "XFAIL" for c in cs)
        rows.append(PassRate(group=group, module=cs[0].module, name=name, n=len(seeds), passed=n_pass,
                             rate=n_pass / len(seeds), seeds=dict(sorted(seeds.items())), expected_failure=expected))
    return rows


def problem_tests(report: Any) -> list[TestResult]:
    """Tests that failed / errored / did not finish, other than by a failing claim or a judged control run."""
    run = as_run(report)
    failing = {c.nodeid for c in run.claims if not c.passed and not c.control}
    failing |= {r.nodeid for r in run.control_runs if r.outcome != "ok"}
    return [t for t in run.tests if t.outcome in ("failed", "error", "not finished", "interrupted")
            and t.nodeid not in failing]


def _test_error_kind(t: TestResult) -> str:
    if t.outcome in ("not finished", "interrupted"):
        return "interrupted"
    if any((t.phases.get(when) or {}).get("outcome") == "failed" for when in ("setup", "teardown")):
        return "fixture"
    return "crash"


def run_errors(report: Any) -> list[ErrorLine]:
    """Every error of the run, one line each (:class:`~circuits.records.ErrorLine`; its kind an ERROR_KINDS
    key). Collection errors, fixture errors, crashes, control / mutation runs that measured nothing
    (never applied, no claim, a NaN value) and main-run claims whose value is NaN / inf: none is a
    failed claim."""
    run = as_run(report)
    out = [(e.nodeid, "collection", e.message) for e in run.collection_errors]
    out += [(r.nodeid, r.error_kind or "never_applied", r.message) for r in run.control_runs if r.outcome == "error"]
    out += [(c.nodeid, "nonfinite", c.message) for c in run.claims if not c.control and c.status == "ERROR"]
    out += [(t.nodeid, _test_error_kind(t), _first_line(t.message)) for t in problem_tests(run)]
    return [ErrorLine(nodeid=n, kind=k, label=ERROR_KINDS.get(k, k), message=m) for n, k, m in out]


def _first_line(text: str | None) -> str:
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def outcome_counts(report: Any) -> tuple[dict[str, int], dict[str, int]]:
    """(counts, known): OUTCOME_KINDS key -> number. Main-run claims give held / known / failed; each
    control or mutation run gives its outcome (``ok`` is not counted: that is the claim's power); the
    errors come from :func:`run_errors`. ``known``: control runs KNOWN_FAILURES documents, by outcome."""
    run = as_run(report)
    counts = {k: 0 for k, _, _ in OUTCOME_KINDS}
    known = {k: 0 for k, _, _ in OUTCOME_KINDS}
    for c in run.claims:
        if not c.control:
            key = {"PASS": "held", "XFAIL": "known", "FAIL": "failed"}.get(c.status)
            if key:
                counts[key] += 1
    for r in run.control_runs:
        if r.outcome in (None, "ok", "error"):  # errors: counted once, below
            continue
        target = known if r.known else counts
        target[r.outcome] = target.get(r.outcome, 0) + 1
    counts["error"] = len(run_errors(run))
    return counts, known


def _summary(run: Run) -> Summary:
    main = [c for c in run.claims if not c.control]
    outcomes: dict[str, int] = defaultdict(int)
    for t in run.tests:
        outcomes[t.outcome] += 1
    runs = run.control_runs
    counts, known = outcome_counts(run)
    unknown = lambda outcome: sum(r.outcome == outcome and not r.known for r in runs)  # noqa: E731
    return Summary(
        claims=len(main),
        passed=sum(c.status == "PASS" for c in main),
        failed=sum(c.status == "FAIL" for c in main),
        xfailed=sum(c.status == "XFAIL" for c in main),
        control_runs=len(runs),
        controls_ok=sum(r.outcome == "ok" for r in runs),
        # a run its module's KNOWN_FAILURES documents (with a reason) is counted apart: not a new problem
        controls_no_teeth=unknown("no_teeth"),
        controls_no_power=unknown("no_power"),
        controls_unspecific=unknown("unspecific"),
        controls_known=sum(r.outcome not in ("ok", "error") and bool(r.known) for r in runs),
        generic_only=sum(bool(c.generic_only) for c in main),
        no_controls=sum(bool(c.no_controls) for c in main),
        controls_error=sum(r.outcome == "error" for r in runs),
        outcomes=counts,  # by OUTCOME_KINDS key: what the summary line and the page count
        outcomes_known={k: v for k, v in known.items() if v},
        errors=len(run.errors),
        tests=dict(outcomes),
        models=len(run.models),
        figures=len(run.figures),
    )


def _derive(run: Run) -> Run:
    """What a run's records imply: controls joined to claims, statuses, pass rates, errors, summary."""
    _attach_controls(run)
    for c in run.claims:
        c.status = _status(c)
    run.pass_rates = pass_rates(run.claims, run.tests)
    run.errors = run_errors(run)
    run.summary = _summary(run)
    return run


def rederive(report: Any) -> Run:
    """Recompute what :meth:`RunCollector.build_run` derives from the records (controls joined to claims,
    pass rates, summary) on a loaded report (any schema), so a page can be re-rendered from an older
    report.json."""
    run = as_run(report)
    for c in run.claims:
        c.controls, c.generic_only, c.no_controls = [], False, False
    return _derive(run)
