"""Records -> the run dict: what the plugin's test reports carry, joined into one JSON-able report.

Knows nothing about pytest beyond duck-typed test reports (``nodeid``, ``when``, ``outcome``,
``user_properties``...). Each main-run claim gets its ``controls``: how the same claim (same test
group, seed and name) fared on each control or targeted mutation, with value, requirement and margin.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable


__all__ = ["SCHEMA", "PROPS", "GENERIC_CONTROLS", "OUTCOME_KINDS", "RunCollector", "pass_rates", "rederive",
           "control_kind", "is_generic", "problem_tests", "run_errors", "outcome_counts"]

SCHEMA = 1
PROPS = ("circuits_test", "circuits_claim", "circuits_control", "circuits_model", "circuits_figure")
# controls that break the whole model or the data, whatever the claim is about: they show a claim is
# not trivially true, never that it is about the part it names (issue 15)
GENERIC_CONTROLS = frozenset({"untrained", "shuffle_labels"})

# The kinds of outcome a run counts, in the order the summary line, the page and the Markdown show them:
# (key, label, a problem?). A control / mutation run's outcome (the plugin's judge_control) is counted
# under its own key; a run its module's KNOWN_FAILURES documents is counted apart as "(+N known)". A new
# kind is one line here (and an outcome of that name from the plugin).
OUTCOME_KINDS: tuple[tuple[str, str, bool], ...] = (
    ("held", "claims held", False),
    ("known", "known failures", False),
    ("failed", "failed claims", True),
    ("no_teeth", "no-teeth", True),
    ("no_power", "no-power", True),
    ("unspecific", "unspecific", True),  # a claim that also holds pointed at another part of its kind
    ("error", "errors", True),
)
# One line each: what went wrong when a test or run measured nothing (report["errors"][i]["kind"]).
ERROR_KINDS = {
    "collection": "collection error",
    "fixture": "fixture error",
    "never_applied": "control never applied",
    "no_claims": "no claim recorded",
    "nonfinite": "NaN/inf value",
    "crash": "crash",
    "interrupted": "did not finish",
}


def control_kind(spec: str | None, run: dict | None = None) -> str:
    """"mutation" for the targeted mutations the plugin derives (``mutate:<what>``), else "control"."""
    if (spec or "").startswith("mutate:") or (run or {}).get("kind") == "mutation":
        return "mutation"
    if (spec or "").startswith("alt:") or (run or {}).get("kind") == "alternative":
        return "alternative"  # a specificity variant: the claim pointed at another part of its kind
    return "control"


def is_generic(spec: str | None) -> bool:
    return (spec or "").split(":", 1)[0] in GENERIC_CONTROLS


class RunCollector:
    """Accumulates what test reports carry in ``user_properties`` plus their outcomes.

    Safe to feed the setup, call and teardown reports of the same test: records are keyed, so the
    same record seen in several phases is kept once.
    """

    def __init__(self) -> None:
        self.tests: dict[str, dict] = {}
        self.claims: dict[tuple[str, str], dict] = {}
        self.control_runs: dict[str, dict] = {}
        self.models: dict[str, dict] = {}
        self.figures: dict[tuple[str, str], dict] = {}
        self.order: dict[str, int] = {}
        self.collection_errors: list[dict] = []

    def set_order(self, nodeids: Iterable[str]) -> None:
        """Collection order, so the report lists tests as the files define them (also under xdist)."""
        for nodeid in nodeids:
            self.order.setdefault(nodeid, len(self.order))

    @property
    def empty(self) -> bool:
        return not (self.claims or self.models or self.figures or self.control_runs or self.collection_errors or
                    any(t.get("circuits") for t in self.tests.values()))

    def add_collect_report(self, rep: Any) -> None:
        """A failed collection (an import error, an unknown control...): the report says so."""
        if rep.outcome == "failed":
            self.collection_errors.append({"nodeid": rep.nodeid, "message": _crash_message(rep) or
                                           str(getattr(rep, "longrepr", ""))[-800:]})

    def add_properties(self, nodeid: str, props: Iterable[tuple[str, Any]]) -> None:
        for entry in props:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and entry[0] in PROPS):
                continue
            key, val = entry
            if not isinstance(val, dict):
                continue
            if key == "circuits_test":
                t = self._test(nodeid)
                for k, v in val.items():
                    t.setdefault(k, v)
            elif key == "circuits_claim":
                self.claims[(nodeid, val.get("name", ""))] = {"nodeid": nodeid, **val}
            elif key == "circuits_control":
                self.control_runs[nodeid] = {"nodeid": nodeid, **val}
            elif key == "circuits_model":
                self.models.setdefault(_model_key(val), val)
            elif key == "circuits_figure":
                self.figures[(nodeid, val.get("name", ""))] = {"nodeid": nodeid, **val}

    def _test(self, nodeid: str) -> dict:
        if nodeid not in self.tests:
            self.tests[nodeid] = {"nodeid": nodeid, "outcome": None, "duration": 0.0, "phases": {},
                                  "message": None}
        return self.tests[nodeid]

    def add_test_report(self, rep: Any) -> None:
        """Feed one pytest TestReport (duck-typed: nodeid, when, outcome, duration, longrepr...)."""
        self.add_properties(rep.nodeid, getattr(rep, "user_properties", ()) or ())
        t = self._test(rep.nodeid)
        when, outcome = getattr(rep, "when", "call"), rep.outcome
        dur = float(getattr(rep, "duration", 0.0) or 0.0)
        t["phases"][when] = {"outcome": outcome, "duration": round(dur, 6)}
        t["duration"] = round(sum(p["duration"] for p in t["phases"].values()), 6)
        xfail = getattr(rep, "wasxfail", None)
        if when == "call" or (when == "setup" and outcome != "passed") or when not in ("setup", "teardown"):
            if outcome == "passed":
                t["outcome"] = "xpassed" if xfail is not None else "passed"
            elif outcome == "skipped":
                t["outcome"] = "xfailed" if xfail is not None else "skipped"
            else:
                t["outcome"] = "error" if when == "setup" else "failed"
            if xfail:
                t["xfail_reason"] = str(xfail)
            if outcome != "passed":
                t["message"] = _crash_message(rep)
        elif when == "teardown" and outcome == "failed":
            if t["outcome"] in (None, "passed", "xpassed"):
                t["outcome"] = "error"
            t["message"] = (t["message"] + " | " if t["message"] else "") + "teardown: " + _crash_message(rep)
        elif when == "setup" and t["outcome"] is None:
            t["outcome"] = "running"  # replaced by the call report; stays if the run is interrupted

    def add_interrupted(self, nodeid: str, props: Iterable[tuple[str, Any]]) -> None:
        """A test stopped by KeyboardInterrupt (no report of its call will come)."""
        self.add_properties(nodeid, props)
        t = self._test(nodeid)
        t["outcome"], t["message"] = "interrupted", "KeyboardInterrupt"

    def build(self, **meta: Any) -> dict:
        """The report dict (JSON-able). ``meta``: run_id, created, finished, exitstatus, ..."""
        rank = lambda nodeid: self.order.get(nodeid, len(self.order))  # noqa: E731
        tests = sorted((self._finish_test(t) for t in self.tests.values()), key=lambda t: rank(t["nodeid"]))
        claims = sorted((self._claim(c) for c in self.claims.values()), key=lambda c: rank(c["nodeid"]))
        report = {"schema": SCHEMA, **meta}
        report["tests"] = tests
        report["claims"] = claims
        report["control_runs"] = list(self.control_runs.values())
        report["models"] = list(self.models.values())
        report["figures"] = list(self.figures.values())
        report["collection_errors"] = list(self.collection_errors)
        report["modules"] = _modules(tests)
        _attach_controls(report)
        report["pass_rates"] = pass_rates(claims, tests)
        report["errors"] = run_errors(report)
        report["summary"] = _summary(report)
        from circuits.claims.core import _jsonable  # (numpy: imported when a report is built, not at plugin load)

        return _jsonable(report)

    def _finish_test(self, t: dict) -> dict:
        t = dict(t)
        t.setdefault("module", t["nodeid"].split("::")[0])
        t.setdefault("group", t["nodeid"])
        t.setdefault("control", None)
        t.setdefault("seed", None)
        t.setdefault("test", t["nodeid"].split("::")[-1])
        if t["outcome"] in (None, "running"):
            t["outcome"] = "not finished"
        return t

    def _claim(self, c: dict) -> dict:
        t = self.tests.get(c["nodeid"], {})
        out = dict(c)
        for k in ("module", "group", "test"):
            out.setdefault(k, t.get(k) or (c["nodeid"].split("::")[0] if k == "module" else c["nodeid"]))
        out["test_outcome"] = t.get("outcome")
        out["status"] = _status(out)
        return out


def _model_key(m: dict) -> str:
    return "|".join(str(m.get(k)) for k in ("name", "seed", "key", "content_hash", "source"))


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


def _status(c: dict) -> str:
    """PASS / FAIL / XFAIL for main claims; OK / HELD for claims measured on a control."""
    if c.get("control"):
        return "HELD" if c.get("passed") else "OK"
    if c.get("problem") and not c.get("passed"):
        return "ERROR"  # a NaN / inf / empty measurement: nothing was measured, so nothing failed
    if c.get("passed"):
        return "PASS"
    return "XFAIL" if c.get("test_outcome") == "xfailed" else "FAIL"


def _modules(tests: list[dict]) -> dict[str, dict]:
    mods: dict[str, dict] = {}
    for t in tests:
        m = mods.setdefault(t["module"], {"doc": t.get("module_doc") or "", "tests": 0})
        m["tests"] += 1
        if not m["doc"] and t.get("module_doc"):
            m["doc"] = t["module_doc"]
    return mods


def _attach_controls(report: dict) -> None:
    """Give each main-run claim a ``controls`` list: the same claim (test group, seed, name) measured on
    each control / mutation of its test, with the value, requirement and margin it got there."""
    tests = {t["nodeid"]: t for t in report["tests"]}
    runs = {r["nodeid"]: r for r in report["control_runs"]}
    ctl_tests: dict[tuple, list[dict]] = defaultdict(list)
    for t in report["tests"]:
        if t.get("control"):
            ctl_tests[(t["group"], t.get("seed"))].append(t)
    ctl_claims = {(c["group"], c.get("seed"), c.get("control"), c["name"]): c
                  for c in report["claims"] if c.get("control")}
    for c in report["claims"]:
        if c.get("control"):
            run = runs.get(c["nodeid"], {})
            c["control_outcome"] = run.get("outcome")
            c["control_kind"] = control_kind(c["control"], run)
            c["control_known"] = bool(run.get("known"))
            continue
        out = []
        for t in ctl_tests.get((c["group"], c.get("seed")), []):
            cc = ctl_claims.get((c["group"], c.get("seed"), t["control"], c["name"]))
            run = runs.get(t["nodeid"], {})
            entry = {"control": t["control"], "kind": control_kind(t["control"], run), "nodeid": t["nodeid"],
                     "known": bool(run.get("known"))}
            if cc is not None:
                # a run the plugin judged an error (never applied, a NaN value) showed nothing, whatever
                # its claims say; otherwise the claim held (no teeth / power) or failed as required
                held = "error" if run.get("outcome") == "error" else "held" if cc["passed"] else "failed"
                entry.update(outcome=held, value=cc.get("value"),
                             value_text=cc.get("value_text"), requirement=cc.get("requirement"), op=cc.get("op"),
                             margin=cc.get("margin"), message=cc.get("message"))
            else:
                why = run.get("message") or tests.get(t["nodeid"], {}).get("message") or "claim not recorded"
                # a control run skipped on purpose (e.g. of a claim refuted on this model) is no error
                entry.update(outcome="skipped" if t["outcome"] == "skipped" else "missing", value=None,
                             value_text=None, requirement=None, op=None, margin=None, message=why,
                             test_outcome=t["outcome"])
            out.append(entry)
        c["controls"] = out
        specs = [x["control"] for x in out]
        # the plugin's own verdict (no `about` target, only generic controls declared) wins; a report
        # built from records without it judges by the controls that ran
        flag = tests.get(c["nodeid"], {}).get("generic_only")
        c["generic_only"] = bool(flag) if flag is not None else bool(specs) and all(is_generic(s) for s in specs)
        # no control and no `about` at all: flagged apart from "generic controls only"
        none = tests.get(c["nodeid"], {}).get("no_controls")
        c["no_controls"] = bool(none) if none is not None else not specs
        # about(none="why"): the claims are about no part of a model, so no mutation is derived; the why shows
        c["about_none"] = tests.get(c["nodeid"], {}).get("about_none")


def pass_rates(claims: list[dict], tests: list[dict] | None = None) -> list[dict]:
    """Main-run claims grouped by (test without seed/control, claim name): pass rate over seeds.

    A seed whose main run ran but never reached the claim (the test failed earlier) counts as not
    passed, with ``None`` in ``seeds``, so a claim cannot look better by crashing on the bad seeds.
    """
    ran: dict[str, set] = defaultdict(set)
    for t in tests or []:
        if not t.get("control") and t.get("outcome") not in ("skipped", None):
            ran[t.get("group") or t["nodeid"]].add(t.get("seed"))
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for c in claims:
        if not c.get("control"):
            groups[(c["group"], c["name"])].append(c)
    rows = []
    for (group, name), cs in groups.items():
        seeds: dict[str, bool | None] = {str(c.get("seed")): bool(c["passed"]) for c in cs}
        for seed in sorted(ran.get(group, set()) - {c.get("seed") for c in cs}, key=str):
            seeds[str(seed)] = None  # the test ran on this seed but did not reach the claim
        n_pass = sum(v is True for v in seeds.values())
        # a known failure (strict xfail) is expected to fail: 0/2 is its success, not a red row
        expected = any(c.get("status") == "XFAIL" for c in cs)
        rows.append({"group": group, "module": cs[0].get("module"), "name": name, "n": len(seeds),
                     "passed": n_pass, "rate": n_pass / len(seeds), "seeds": dict(sorted(seeds.items())),
                     "expected_failure": expected})
    return rows


def problem_tests(report: dict) -> list[dict]:
    """Tests that failed / errored / did not finish, other than by a failing claim or a judged control run."""
    failing_claims = {c["nodeid"] for c in report.get("claims", []) if not c.get("passed") and not c.get("control")}
    failing_claims |= {r["nodeid"] for r in report.get("control_runs", []) if r.get("outcome") != "ok"}
    out = []
    for t in report.get("tests", []):
        if t["outcome"] in ("failed", "error", "not finished", "interrupted") and t["nodeid"] not in failing_claims:
            out.append(t)
    return out


def _test_error_kind(t: dict) -> str:
    if t["outcome"] in ("not finished", "interrupted"):
        return "interrupted"
    phases = t.get("phases") or {}
    if any((phases.get(when) or {}).get("outcome") == "failed" for when in ("setup", "teardown")):
        return "fixture"
    return "crash"


def run_errors(report: dict) -> list[dict]:
    """Every error of the run, one line each: {"nodeid", "kind" (an ERROR_KINDS key), "label", "message"}.
    Collection errors, fixture errors, crashes, control / mutation runs that measured nothing (never
    applied, no claim, a NaN value) and main-run claims whose value is NaN / inf: none is a failed claim."""
    out = [{"nodeid": e.get("nodeid"), "kind": "collection", "message": e.get("message")}
           for e in report.get("collection_errors", [])]
    for r in report.get("control_runs", []):
        if r.get("outcome") == "error":
            out.append({"nodeid": r.get("nodeid"), "kind": r.get("error_kind") or "never_applied",
                        "message": r.get("message")})
    for c in report.get("claims", []):
        if not c.get("control") and c.get("status") == "ERROR":
            out.append({"nodeid": c.get("nodeid"), "kind": "nonfinite", "message": c.get("message")})
    for t in problem_tests(report):
        out.append({"nodeid": t["nodeid"], "kind": _test_error_kind(t), "message": _first_line(t.get("message"))})
    for e in out:
        e["label"] = ERROR_KINDS.get(e["kind"], e["kind"])
    return out


def _first_line(text: str | None) -> str:
    lines = [ln for ln in str(text or "").splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def outcome_counts(report: dict) -> tuple[dict[str, int], dict[str, int]]:
    """(counts, known): OUTCOME_KINDS key -> number. Main-run claims give held / known / failed; each
    control or mutation run gives its outcome (``ok`` is not counted: that is the claim's power); the
    errors come from :func:`run_errors`. ``known``: control runs KNOWN_FAILURES documents, by outcome."""
    counts = {k: 0 for k, _, _ in OUTCOME_KINDS}
    known = {k: 0 for k, _, _ in OUTCOME_KINDS}
    for c in report.get("claims", []):
        if not c.get("control"):
            key = {"PASS": "held", "XFAIL": "known", "FAIL": "failed"}.get(c.get("status"))
            if key:
                counts[key] += 1
    for r in report.get("control_runs", []):
        outcome = r.get("outcome")
        if outcome in (None, "ok", "error"):  # errors: counted once, below
            continue
        target = known if r.get("known") else counts
        target[outcome] = target.get(outcome, 0) + 1
    counts["error"] = len(run_errors(report))
    return counts, known


def _summary(report: dict) -> dict:
    main = [c for c in report["claims"] if not c.get("control")]
    outcomes: dict[str, int] = defaultdict(int)
    for t in report["tests"]:
        outcomes[t["outcome"]] += 1
    runs = report["control_runs"]
    counts, known = outcome_counts(report)
    return {
        "claims": len(main),
        "passed": sum(c["status"] == "PASS" for c in main),
        "failed": sum(c["status"] == "FAIL" for c in main),
        "xfailed": sum(c["status"] == "XFAIL" for c in main),
        "control_runs": len(runs),
        "controls_ok": sum(r.get("outcome") == "ok" for r in runs),
        # a run its module's KNOWN_FAILURES documents (with a reason) is counted apart: not a new problem
        "controls_no_teeth": sum(r.get("outcome") == "no_teeth" and not r.get("known") for r in runs),
        "controls_no_power": sum(r.get("outcome") == "no_power" and not r.get("known") for r in runs),
        "controls_unspecific": sum(r.get("outcome") == "unspecific" and not r.get("known") for r in runs),
        "controls_known": sum(r.get("outcome") not in ("ok", "error") and bool(r.get("known")) for r in runs),
        "generic_only": sum(bool(c.get("generic_only")) for c in main),
        "no_controls": sum(bool(c.get("no_controls")) for c in main),
        "controls_error": sum(r.get("outcome") == "error" for r in runs),
        "outcomes": counts,  # by OUTCOME_KINDS key: what the summary line and the page count
        "outcomes_known": {k: v for k, v in known.items() if v},
        "errors": len(report.get("errors", [])),
        "tests": dict(outcomes),
        "models": len(report["models"]),
        "figures": len(report["figures"]),
    }


def rederive(report: dict) -> dict:
    """Recompute what :meth:`RunCollector.build` derives from the records (controls joined to claims,
    pass rates, summary) on a loaded report, so a page can be re-rendered from an older report.json."""
    for c in report.get("claims", []):
        c.pop("controls", None)
        c.pop("generic_only", None)
    report.setdefault("control_runs", [])
    report.setdefault("tests", [])
    report.setdefault("models", [])
    report.setdefault("figures", [])
    report.setdefault("not_run", [])
    _attach_controls(report)
    for c in report["claims"]:
        c["status"] = _status(c)
    report["pass_rates"] = pass_rates(report["claims"], report["tests"])
    report["errors"] = run_errors(report)
    report["summary"] = _summary(report)
    return report
