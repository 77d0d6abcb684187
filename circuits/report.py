"""Run reports: collect claim records, write report.json / report.md / report.html, compare runs.

Layout of a run (``<report-dir>/<run-id>/``)::

    report.json   every claim record, control outcome, model, figure, test outcome, machine info
    report.md     one table per hypothesis module (a CI job summary)
    report.html   one self-contained page: tables, figures, training curves, comparison
    figures/      the PNGs (also embedded in report.html)

``<report-dir>/latest`` holds the id of the newest run; ``<report-dir>/baseline/report.json`` is the
committed baseline (see :func:`set_baseline`). ``python -m circuits.report baseline [RUN]`` copies
a run there.

This module knows nothing about pytest beyond duck-typed test reports; the plugin feeds it.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from .atomic import write_bytes_atomic
from .claims import _jsonable, format_numbers
from .errors import CircuitsError

__all__ = [
    "SCHEMA",
    "ReportError",
    "ReportNotFoundError",
    "RunCollector",
    "write_run",
    "write_json_atomic",
    "render_markdown",
    "compare_reports",
    "load_report",
    "resolve_report",
    "set_baseline",
    "machine_info",
    "git_info",
    "claim_rows",
    "terminal_lines",
    "main",
]

SCHEMA = 1
PROPS = ("circuits_test", "circuits_claim", "circuits_control", "circuits_model", "circuits_figure")


class ReportError(CircuitsError, ValueError):
    """A report that cannot be read or written as asked."""


class ReportNotFoundError(ReportError, FileNotFoundError):
    """A run id or path that names no report.json; the message lists what was tried."""


# --- collecting ---------------------------------------------------------------------------------------


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
        report["summary"] = _summary(report)
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
    """Give each main-run claim a ``controls`` list: how the same claim fared on each control."""
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
            continue
        out = []
        for t in ctl_tests.get((c["group"], c.get("seed")), []):
            cc = ctl_claims.get((c["group"], c.get("seed"), t["control"], c["name"]))
            run = runs.get(t["nodeid"], {})
            if cc is not None:
                outcome = "held" if cc["passed"] else "failed"
                out.append({"control": t["control"], "outcome": outcome, "value_text": cc.get("value_text"),
                            "margin": cc.get("margin"), "message": cc.get("message"), "nodeid": t["nodeid"]})
            else:
                why = run.get("message") or tests.get(t["nodeid"], {}).get("message") or "claim not recorded"
                # a control run skipped on purpose (e.g. of a claim refuted on this model) is no error
                outcome = "skipped" if t["outcome"] == "skipped" else "missing"
                out.append({"control": t["control"], "outcome": outcome, "value_text": None, "margin": None,
                            "message": why, "nodeid": t["nodeid"], "test_outcome": t["outcome"]})
        c["controls"] = out


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
        rows.append({"group": group, "module": cs[0].get("module"), "name": name, "n": len(seeds),
                     "passed": n_pass, "rate": n_pass / len(seeds), "seeds": dict(sorted(seeds.items()))})
    return rows


def where(r: dict) -> str:
    """``test_acc[x] (seed 1) on control untrained``: a claim's place, for messages and tables."""
    text = (r.get("group") or r.get("nodeid") or "").split("::", 1)[-1]
    if r.get("seed") is not None:
        text += f" (seed {r['seed']})"
    if r.get("control"):
        text += f" on control {r['control']}"
    return text


def _summary(report: dict) -> dict:
    main = [c for c in report["claims"] if not c.get("control")]
    outcomes: dict[str, int] = defaultdict(int)
    for t in report["tests"]:
        outcomes[t["outcome"]] += 1
    runs = report["control_runs"]
    return {
        "claims": len(main),
        "passed": sum(c["status"] == "PASS" for c in main),
        "failed": sum(c["status"] == "FAIL" for c in main),
        "xfailed": sum(c["status"] == "XFAIL" for c in main),
        "control_runs": len(runs),
        "controls_ok": sum(r.get("outcome") == "ok" for r in runs),
        "controls_no_teeth": sum(r.get("outcome") == "no_teeth" for r in runs),
        "controls_error": sum(r.get("outcome") == "error" for r in runs),
        "tests": dict(outcomes),
        "models": len(report["models"]),
        "figures": len(report["figures"]),
    }


# --- environment ----------------------------------------------------------------------------------------


def machine_info(device: str = "cpu") -> dict:
    from importlib import metadata

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "numpy": version("numpy"),
        "pytest": version("pytest"),
        "circuits": version("pytest-circuits"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "device": device,
    }


def git_info(cwd: Path | str) -> dict:
    """Commit and dirty flag via ``git``; ``{"commit": None}`` where there is no git or no repo."""
    def run(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "branch": None}
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None,
            "branch": run("rev-parse", "--abbrev-ref", "HEAD")}


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


# --- writing --------------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write strict JSON (no NaN) via a temp file + os.replace, so readers never see half a file."""
    data = json.dumps(_jsonable(obj), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    write_bytes_atomic(Path(path), data.encode("utf-8"))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(Path(path), text.encode("utf-8"))


def write_run(report: dict, run_dir: Path, *, update_latest: bool = True) -> dict[str, Path]:
    """Write report.json first (the part that must survive), then report.md and report.html."""
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html"}
    write_json_atomic(paths["json"], report)
    if update_latest:
        write_text_atomic(run_dir.parent / "latest", report.get("run_id", run_dir.name) + "\n")
    write_text_atomic(paths["md"], render_markdown(report))
    from .report_html import render_html

    write_text_atomic(paths["html"], render_html(report, run_dir))
    return paths


# --- loading, baseline, comparison ------------------------------------------------------------------------


def resolve_report(ref: str | os.PathLike, report_dir: Path | str) -> Path:
    """The report.json named by ``ref``: a path (file or run dir), a run id, "latest" or "baseline"."""
    report_dir = Path(report_dir)
    ref_s = str(ref)
    tried: list[Path] = []
    p = Path(ref_s).expanduser()
    candidates = [p, p / "report.json"]
    if ref_s == "latest" and (report_dir / "latest").is_file():
        candidates.append(report_dir / (report_dir / "latest").read_text().strip() / "report.json")
    candidates.append(report_dir / ref_s / "report.json")
    for c in candidates:
        tried.append(c)
        if c.is_file():
            return c
    runs = sorted((d.name for d in report_dir.iterdir() if (d / "report.json").is_file()), reverse=True) \
        if report_dir.is_dir() else []
    avail = ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "") if runs else "none"
    raise ReportNotFoundError(
        f"no report for {ref_s!r}: tried {', '.join(str(t) for t in dict.fromkeys(tried))}; "
        f"runs in {report_dir}: {avail}")


def load_report(ref: str | os.PathLike, report_dir: Path | str = "reports") -> dict:
    path = resolve_report(ref, report_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read report {path}: {exc}") from None
    if not isinstance(data, dict) or "claims" not in data:
        raise ReportError(f"{path} is not a circuits report (no 'claims')")
    data.setdefault("_path", str(path))
    return data


def set_baseline(run_dir: Path | str, report_dir: Path | str | None = None) -> Path:
    """Copy a run's report.json (and report.md) to ``<report-dir>/baseline/``; returns the JSON path."""
    run_dir = Path(run_dir)
    src = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not src.is_file():
        raise ReportNotFoundError(f"no report.json at {src}")
    report_dir = Path(report_dir) if report_dir is not None else src.parent.parent
    dest = report_dir / "baseline"
    data = json.loads(src.read_text(encoding="utf-8"))
    data["baseline_of"] = data.get("run_id")
    write_json_atomic(dest / "report.json", data)
    if (src.parent / "report.md").is_file():
        shutil.copyfile(src.parent / "report.md", dest / "report.md")
    return dest / "report.json"


def _ckey(c: dict) -> tuple:
    return (c.get("group") or c.get("nodeid"), c.get("control"), c.get("seed"), c.get("name"))


def compare_reports(current: dict, previous: dict) -> dict:
    """Claims that flipped pass<->fail, how far each margin moved, and claims added / removed."""
    cur = {_ckey(c): c for c in current.get("claims", [])}
    prev = {_ckey(c): c for c in previous.get("claims", [])}
    moved, flipped = [], []
    for k in cur.keys() & prev.keys():
        a, b = prev[k], cur[k]
        ma, mb = a.get("margin"), b.get("margin")
        row = {"group": k[0], "control": k[1], "seed": k[2], "name": k[3], "module": b.get("module"),
               "before": bool(a.get("passed")), "after": bool(b.get("passed")),
               "value_before": a.get("value_text"), "value_after": b.get("value_text"),
               "margin_before": ma, "margin_after": mb,
               "delta": (mb - ma) if isinstance(ma, (int, float)) and isinstance(mb, (int, float)) else None}
        moved.append(row)
        if row["before"] != row["after"]:
            flipped.append(row)
    moved.sort(key=lambda r: -abs(r["delta"]) if r["delta"] is not None else 0.0)
    flipped.sort(key=lambda r: (r["after"], r["group"], r["name"]))
    brief = lambda c: {"group": c.get("group"), "control": c.get("control"), "seed": c.get("seed"),  # noqa: E731
                       "name": c.get("name"), "passed": bool(c.get("passed")), "value_text": c.get("value_text")}
    return {
        "against": {"run_id": previous.get("run_id"), "path": previous.get("_path"),
                    "created": previous.get("created"), "git": previous.get("git")},
        "flipped": flipped,
        "moved": moved,
        "added": [brief(cur[k]) for k in sorted(cur.keys() - prev.keys(), key=str)],
        "removed": [brief(prev[k]) for k in sorted(prev.keys() - cur.keys(), key=str)],
        "counts": {"matched": len(moved), "flipped": len(flipped),
                   "to_fail": sum(not r["after"] for r in flipped), "to_pass": sum(r["after"] for r in flipped)},
    }


# --- shared presentation ----------------------------------------------------------------------------------


def fmt_margin(m: Any) -> str:
    if not isinstance(m, (int, float)) or not math.isfinite(m):
        return "—"
    return ("+" if m >= 0 else "−") + format_numbers([abs(m)], [])[0]


def measured_text(c: dict) -> str:
    """``0.81 [0.74, 0.87]`` (point and CI) or the value alone."""
    v = c.get("value_text") or "—"
    ci = c.get("ci")
    if ci and ci.get("lo") is not None and ci.get("hi") is not None and c.get("value") is not None:
        lo, hi, _ = format_numbers([ci["lo"], ci["hi"], c["value"]], [])
        v += f" [{lo}, {hi}]"
    if c.get("units") and c.get("op") != "holds" and c.get("value") is not None:
        v += f" {c['units']}"
    return v


def op_text(c: dict) -> tuple[str, str]:
    """(operator, threshold) columns: (">=", "0.9"), ("≈", "1.0 ± 0.1"), ("in", "[0.2, 0.8]")."""
    req = c.get("requirement") or ""
    if c.get("op") == "holds":
        return "holds", ""
    if c.get("op") == "close_to":
        return "≈", req
    if c.get("op") == "between":
        return "in", req[3:] if req.startswith("in ") else req
    op, _, rest = req.partition(" ")
    return op, rest


def control_text(c: dict, compact: bool = False) -> str:
    parts = []
    for x in c.get("controls", []):
        marks = {"failed": "✓", "held": "✗ held", "missing": "! error", "skipped": "– skipped"}
        mark = marks.get(x["outcome"], x["outcome"])
        val = f" {x['value_text']}" if x.get("value_text") and not compact else ""
        parts.append(f"{x['control']} {mark}{val}")
    return "; ".join(parts)


def claim_rows(report: dict) -> dict[str, list[dict]]:
    """Main-run claims grouped by module, in report order."""
    mods: dict[str, list[dict]] = defaultdict(list)
    for c in report.get("claims", []):
        if not c.get("control"):
            mods[c.get("module") or "?"].append(c)
    return dict(mods)


def test_label(c: dict) -> str:
    """The test part of a nodeid (after the module path), with the seed if any."""
    return where({**c, "control": None})


def problem_tests(report: dict) -> list[dict]:
    """Tests that failed / errored / did not finish, other than by a failing claim."""
    failing_claims = {c["nodeid"] for c in report.get("claims", []) if not c.get("passed") and not c.get("control")}
    failing_claims |= {r["nodeid"] for r in report.get("control_runs", []) if r.get("outcome") != "ok"}
    out = []
    for t in report.get("tests", []):
        if t["outcome"] in ("failed", "error", "not finished", "interrupted") and t["nodeid"] not in failing_claims:
            out.append(t)
    return out


def headline(report: dict) -> str:
    s = report.get("summary", {})
    parts = [f"{s.get('passed', 0)}/{s.get('claims', 0)} claims passed"]
    if s.get("failed"):
        parts.append(f"{s['failed']} failed")
    if s.get("xfailed"):
        parts.append(f"{s['xfailed']} refuted (xfail)")
    if s.get("control_runs"):
        parts.append(f"controls {s.get('controls_ok', 0)}/{s['control_runs']} ok")
        if s.get("controls_no_teeth"):
            parts.append(f"{s['controls_no_teeth']} without teeth")
    t = s.get("tests", {})
    bad = t.get("failed", 0) + t.get("error", 0)
    parts.append(f"{sum(t.values())} tests" + (f" ({bad} failed/errored)" if bad else ""))
    return ", ".join(parts)


# --- markdown ---------------------------------------------------------------------------------------------


def _md(text: Any) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    """A short summary: one table per module, failures, comparison. Suitable for a CI job summary."""
    g = report.get("git") or {}
    commit = (g.get("commit") or "no git")[:10] + (" (dirty)" if g.get("dirty") else "")
    lines = [f"## circuits run `{report.get('run_id')}`", "",
             f"**{headline(report)}** · commit {commit} · {report.get('machine', {}).get('device', 'cpu')}"
             f" · {report.get('duration_s', 0):.1f} s", ""]
    if report.get("interrupted"):
        lines += ["> **Run interrupted**: results below are partial.", ""]
    for module, rows in claim_rows(report).items():
        lines += [f"### `{module}`", ""]
        doc = (report.get("modules", {}).get(module, {}).get("doc") or "").strip()
        if doc:
            lines += [f"> {_md(doc.splitlines()[0])}", ""]
        lines += ["| test | claim | measured | op | threshold | margin | result | controls |",
                  "|---|---|---|---|---|---:|---|---|"]
        for c in rows:
            op, thr = op_text(c)
            res = {"PASS": "✅ pass", "FAIL": "❌ **FAIL**", "XFAIL": "➖ xfail"}.get(c["status"], c["status"])
            lines.append(f"| {_md(test_label(c))} | `{_md(c['name'])}` | {_md(measured_text(c))} | {_md(op)} | "
                         f"{_md(thr)} | {fmt_margin(c.get('margin'))} | {res} | {_md(control_text(c, True))} |")
        lines.append("")
    rates = [r for r in report.get("pass_rates", []) if r["n"] > 1]
    if rates:
        lines += ["### Pass rate across seeds", "", "| test | claim | passed | rate |", "|---|---|---:|---:|"]
        for r in rates:
            lines.append(f"| {_md(r['group'].split('::', 1)[-1])} | `{_md(r['name'])}` | {r['passed']}/{r['n']} | "
                         f"{r['rate']:.0%} |")
        lines.append("")
    no_teeth = [r for r in report.get("control_runs", []) if r.get("outcome") != "ok"]
    probs = problem_tests(report)
    coll = report.get("collection_errors", [])
    if no_teeth or probs or coll:
        lines += ["### Problems", ""]
        for e in coll:
            lines.append(f"- collection error in `{_md(e['nodeid'])}`: {_md(e.get('message'))}")
        for r in no_teeth:
            lines.append(f"- `{_md(r['nodeid'])}`: {_md(r.get('message'))}")
        for t in probs:
            lines.append(f"- `{_md(t['nodeid'])}` {t['outcome']}: {_md(t.get('message'))}")
        lines.append("")
    cmp_ = report.get("compare")
    if cmp_:
        lines += _compare_md(cmp_)
    return "\n".join(lines).rstrip() + "\n"


def compare_display_rows(cmp_: dict, limit: int = 10) -> list[dict]:
    """What to show of a comparison: every flip, then the main-run claims whose margin moved most."""
    moved = [r for r in cmp_["moved"] if r["before"] == r["after"] and not r.get("control")
             and isinstance(r.get("delta"), (int, float)) and abs(r["delta"]) > 1e-12]
    return cmp_["flipped"] + moved[:limit]


def _compare_md(cmp_: dict) -> list[str]:
    who = cmp_["against"].get("run_id") or cmp_["against"].get("path")
    n = cmp_["counts"]
    lines = [f"### Compared with `{who}`", "",
             f"{n['matched']} claims matched, {n['flipped']} flipped "
             f"({n['to_fail']} now failing, {n['to_pass']} now passing), "
             f"{len(cmp_['added'])} new, {len(cmp_['removed'])} gone.", ""]
    rows = compare_display_rows(cmp_)
    if rows:
        lines += ["| test | claim | before | after | margin moved |", "|---|---|---|---|---:|"]
        for r in rows:
            b = ("pass" if r["before"] else "fail") + f" ({_md(r['value_before'])})"
            a = ("pass" if r["after"] else "**fail**") + f" ({_md(r['value_after'])})"
            flip = " ⇄ flipped" if r["before"] != r["after"] else ""
            lines.append(f"| {_md(where(r))} | `{_md(r['name'])}`{flip} | {b} | {a} | {fmt_margin(r['delta'])} |")
        lines.append("")
    return lines


# --- terminal ---------------------------------------------------------------------------------------------


def terminal_lines(report: dict, width: int = 120) -> list[tuple[str, dict]]:
    """Rows for the terminal summary: (text, markup) with markup like {"green": True}."""
    out: list[tuple[str, dict]] = []
    rows = [c for cs in claim_rows(report).values() for c in cs]
    if rows:
        table = [("test", "claim", "measured", "op", "threshold", "margin", "result")]
        marks = [{}]
        for c in rows:
            op, thr = op_text(c)
            table.append((_clip(test_label(c), 40), _clip(c["name"], 36), _clip(measured_text(c), 30), op,
                          _clip(thr, 20), fmt_margin(c.get("margin")), c["status"]))
            marks.append({"green": True} if c["status"] == "PASS" else
                         {"yellow": True} if c["status"] == "XFAIL" else {"red": True})
            for x in c.get("controls", []):
                res = {"failed": "OK (failed)", "held": "NO TEETH", "missing": "ERROR",
                       "skipped": "skipped"}[x["outcome"]]
                table.append(("", f"  ↳ control {_clip(x['control'], 24)}", _clip(x.get("value_text") or "-", 30),
                              "", "", fmt_margin(x.get("margin")), res))
                marks.append({"green": True} if x["outcome"] == "failed" else
                             {"yellow": True} if x["outcome"] == "skipped" else {"red": True})
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r, m in zip(table, marks):
            cells = [r[i].rjust(widths[i]) if i == 5 else r[i].ljust(widths[i]) for i in range(len(r))]
            out.append(("  ".join(cells).rstrip(), m if r is not table[0] else {"bold": True}))
    rates = [r for r in report.get("pass_rates", []) if r["n"] > 1]
    if rates:
        out.append(("", {}))
        out.append(("pass rate across seeds:", {"bold": True}))
        for r in rates:
            seeds = " ".join(f"{s}:{'P' if ok else ('F' if ok is False else '-')}" for s, ok in r["seeds"].items())
            out.append((f"  {r['group'].split('::', 1)[-1]} {r['name']}: {r['passed']}/{r['n']} ({r['rate']:.0%})"
                        f"  [{seeds}]", {"green": r["rate"] == 1.0, "red": r["rate"] < 1.0}))
    for r in report.get("control_runs", []):
        if r.get("outcome") != "ok":
            out.append((f"{r['nodeid']}: {r.get('message')}", {"red": True}))
    for e in report.get("collection_errors", []):
        out.append((f"collection error in {e['nodeid']}: {e.get('message')}", {"red": True}))
    cmp_ = report.get("compare")
    if cmp_:
        n = cmp_["counts"]
        who = cmp_["against"].get("run_id") or cmp_["against"].get("path")
        out.append(("", {}))
        out.append((f"compared with {who}: {n['matched']} matched, {n['flipped']} flipped, "
                    f"{len(cmp_['added'])} new, {len(cmp_['removed'])} gone", {"bold": True}))
        for r in compare_display_rows(cmp_, limit=5):
            flip = r["before"] != r["after"]
            verdict = f"{'pass' if r['before'] else 'fail'} -> {'pass' if r['after'] else 'fail'}, " if flip else ""
            out.append((f"  {'FLIPPED' if flip else 'moved  '} {where(r)} {r['name']}: {verdict}"
                        f"{r['value_before']} -> {r['value_after']} (margin {fmt_margin(r['delta'])})",
                        {"green": r["after"], "red": not r["after"]} if flip else {}))
    return out


def _clip(s: Any, n: int) -> str:
    s = str(s if s is not None else "")
    return s if len(s) <= n else s[: n - 1] + "…"


# --- CLI --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m circuits.report baseline [RUN] [--report-dir DIR]`` / ``show [RUN]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m circuits.report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("baseline", help="copy a run's report.json to <report-dir>/baseline/")
    b.add_argument("run", nargs="?", default="latest", help="run id or path (default: latest)")
    b.add_argument("--report-dir", default="reports")
    s = sub.add_parser("show", help="print a run's Markdown summary")
    s.add_argument("run", nargs="?", default="latest")
    s.add_argument("--report-dir", default="reports")
    args = ap.parse_args(argv)
    try:
        path = resolve_report(args.run, args.report_dir)
        if args.cmd == "baseline":
            dest = set_baseline(path.parent, args.report_dir)
            print(f"baseline <- {path.parent.name}: {dest}")
        else:
            print(render_markdown(load_report(path, args.report_dir)))
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
