"""The terminal summary after the tests: a row per claim and per control (value, requirement, margin),
the robustness view across seeds, problems, the comparison, and a one-line summary last."""

from __future__ import annotations

import dataclasses
from typing import Any

from circuits.records import Run, RunKind, as_run
from circuits.report.compare import NOISE_FLOOR_TEXT, compare_display_rows
from circuits.report.text import NAME_LIMIT, TEXT_LIMIT, visible
from circuits.report.views import (claim_rows, fmt_margin, has_problems, known_control_runs, measured_text, not_run_text,
                    one_line_summary, op_text, problem_lines, rate_text, robustness, specificity, specificity_text,
                    test_label, where)

__all__ = ["terminal_lines"]

CONTROL_RESULT = {"failed": "OK (failed)", "missing": "ERROR", "error": "ERROR", "skipped": "skipped"}


def terminal_lines(report: Run | dict, width: int = 120) -> list[tuple[str, dict]]:
    """Rows for the terminal summary: (text, markup) with markup like {"green": True}. Text from tests
    is shown through `visible` (no escape sequence, newline or bidi override reaches the terminal)."""
    report = as_run(report)
    out: list[tuple[str, dict]] = []
    rows = [c for cs in claim_rows(report).values() for c in cs]
    if rows:
        table = [("test", "claim", "measured", "op", "threshold", "margin", "result")]
        marks = [{}]
        for c in rows:
            op, thr = op_text(c)
            status = c.status + (" (generic controls only)" if c.generic_only else
                                 " (no controls)" if c.no_controls else
                                 " (about no part)" if c.about_none else "")
            table.append((_clip(test_label(c), 40), _clip(c.name, 36), _clip(measured_text(c), 30), op,
                          _clip(thr, 20), fmt_margin(c.margin), status))
            marks.append({"green": True} if c.status == "PASS" else
                         {"yellow": True} if c.status == "XFAIL" else {"red": True})
            for x in c.controls:
                if x.kind == RunKind.ALTERNATIVE:
                    continue  # one specificity row per claim below, not one per alternative
                held = "NO POWER" if x.kind == RunKind.MUTATION else "NO TEETH"
                res = CONTROL_RESULT.get(x.outcome, held)
                if x.outcome == "held" and x.known:
                    res = f"{held} (known)"
                xop, xthr = op_text(x) if x.requirement else ("", "")
                spec = x.spec_name  # without its prefix: the kind says it is a mutation
                table.append(("", f"  ↳ {x.kind} {_clip(spec, 26)}",
                              _clip(x.value_text or "-", 30), xop, _clip(xthr, 20),
                              fmt_margin(x.margin), res))
                marks.append({"green": True} if x.outcome == "failed" else
                             {"yellow": True} if x.outcome == "skipped" or x.known else {"red": True})
            spec_row = next((r for r in specificity(dataclasses.replace(report, claims=[c]))), None)
            if spec_row is not None:
                k = len(spec_row.held)
                table.append(("", "  ↳ specificity", _clip(f"{k} of {spec_row.n} alternatives hold", 30), "", "",
                              "", "OK (specific)" if not k else "known" if spec_row.known else "UNSPECIFIC"))
                marks.append({"green": True} if not k else {"yellow": True} if spec_row.known else {"red": True})
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        for r, m in zip(table, marks):
            cells = [r[i].rjust(widths[i]) if i == 5 else r[i].ljust(widths[i]) for i in range(len(r))]
            out.append(("  ".join(cells).rstrip(), m if r is not table[0] else {"bold": True}))
    rob = robustness(report)
    if rob:
        out.append(("", {}))
        out.append(("pass rate across seeds (per claim; reference first):", {"bold": True}))
        for r in rob:
            ref = r.reference
            ref_t = "" if ref is None else f"ref {'P' if ref.passed else 'F'} {ref.value_text}; "
            seeds = " ".join(f"{s.seed}:{_seed_mark(s)}{'⇄' if s.flip else ''}" for s in r.seeds)
            ok = r.expected_failure or r.rate == 1.0
            out.append((f"  {_name(r.test)} {_name(r.name)}: {rate_text(r)}  [{ref_t}{seeds}]",
                        {"green": ok, "red": not ok}))
    for r in known_control_runs(report):
        out.append((f"{r.nodeid}: known ({r.message})", {"yellow": True}))
    for p in problem_lines(report):  # one line each, by kind
        out.append((f"{p.kind.upper()} {p.nodeid}: {p.message}", {"red": True}))
    cmp_ = report.compare
    if cmp_:
        n = cmp_.counts
        who = cmp_.against.run_id or cmp_.against.path
        not_run = f", {n.not_run} not run in this run" if n.not_run else ""
        out.append(("", {}))
        out.append((f"compared with {who}: {n.matched} matched, {n.flipped} flipped, "
                    f"{n.moved} moved, {len(cmp_.added)} new, {len(cmp_.removed)} gone{not_run} "
                    f"({NOISE_FLOOR_TEXT})", {"bold": True}))
        for r in compare_display_rows(cmp_, limit=5):
            verdict = f"{'pass' if r.before else 'fail'} -> {'pass' if r.after else 'fail'}, " if r.flipped else ""
            out.append((f"  {'FLIPPED' if r.flipped else 'moved  '} {_name(where(r))} {_name(r.name)}: {verdict}"
                        f"{r.value_before} -> {r.value_after} (margin {fmt_margin(r.delta)})",
                        {"green": r.after, "red": not r.after} if r.flipped else {}))
    if rows or report.tests:
        out.append(("", {}))
        if not_run_text(report):
            out.append((not_run_text(report), {}))
        bad = has_problems(report)
        out.append((one_line_summary(report), {"bold": True, "red": bad, "green": not bad}))
    return [(visible(text, TEXT_LIMIT), markup) for text, markup in out]  # what the parts above left raw


def _name(s: Any) -> str:
    return visible(s, NAME_LIMIT)


def _seed_mark(s: Any) -> str:
    """P passed, F failed, x failed as a known failure expects, - stopped before the claim."""
    if s.passed:
        return "P"
    if s.status == "XFAIL":
        return "x"
    return "F" if s.reached else "-"


def _clip(s: Any, n: int) -> str:
    s = visible(s, None)
    return s if len(s) <= n else s[: n - 1] + "…"
