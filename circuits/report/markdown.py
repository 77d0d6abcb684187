"""report.md: the run as GitHub-flavoured Markdown (the CI job summary).

Everything that comes from a test (claim names, details, reasons, messages) is escaped: a job summary
renders HTML, so a claim named ``<script>`` or containing ``|`` must come out as text, not markup.
"""

from __future__ import annotations

import html
import re
from typing import Any

from circuits.records import Comparison, Run, RunKind, as_run
from circuits.report.compare import NOISE_FLOOR_TEXT, compare_display_rows
from circuits.report.machine import commit_text
from circuits.report.text import NAME_LIMIT, TEXT_LIMIT, visible
from circuits.report.views import (cell_verdict, held_out, claim_rows, control_text, fmt_margin, headline, measured_text, module_rollup,
                    one_line_summary, op_text, power_matrix, problem_lines, rate_text, robustness, test_label,
                    known_control_runs, not_run_groups, specificity,
                    specificity_text, where)

__all__ = ["render_markdown", "md_escape", "md_code"]

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#~!{}])")


def md_escape(text: Any, limit: int = TEXT_LIMIT) -> str:
    """Text that renders as itself in a GFM table cell: control / bidi characters shown as escapes and
    cut to `limit` (`visible`), HTML entities, markdown punctuation escaped."""
    s = html.escape(visible(str(text if text is not None else "").replace("\r", " ").replace("\n", " "), limit),
                    quote=False)
    return _MD_SPECIAL.sub(r"\\\1", s)


def md_code(text: Any) -> str:
    """A code span, when the text can be one safely (no backtick, no HTML); escaped text otherwise."""
    s = visible(str(text if text is not None else "").replace("\n", " "), NAME_LIMIT)
    if "`" in s or re.search(r"[<>&]", s):
        return md_escape(s)
    return "`" + s.replace("|", "\\|") + "`"


RESULT = {"PASS": "✅ pass", "FAIL": "❌ **FAIL**", "XFAIL": "➖ known failure"}


def render_markdown(report: Run | dict) -> str:
    """Summary, roll-up per module, robustness, claims per module with control values, power matrices."""
    report = as_run(report)
    lines = [f"## circuits run {md_code(report.run_id)}", "",
             f"**{md_escape(headline(report))}** · commit {md_code(commit_text(report))} · "
             f"{md_escape(report.machine.device)} · "
             f"{report.duration_s or 0:.1f} s", "",
             md_escape(one_line_summary(report, with_path=False)), ""]
    if report.interrupted:
        lines += ["> **Run interrupted**: results below are partial.", ""]
    lines += _rollup(report)
    lines += _problems(report)
    if report.compare:
        lines += _compare_md(report.compare)
    lines += _robustness(report)
    for module, rows in claim_rows(report).items():
        lines += [f"### {md_code(module)}", ""]
        info = report.modules.get(module)
        doc = (info.doc if info else "").strip()
        if doc:
            lines += [f"> {md_escape(doc.splitlines()[0])}", ""]
        lines += ["| test | claim | measured | op | threshold | margin | result | controls (value, margin) |",
                  "|---|---|---|---|---|---:|---|---|"]
        for c in rows:
            op, thr = op_text(c)
            badge = (" ⚠ generic controls only" if c.generic_only else
                     f" (about no part: {md_escape(c.about_none)})" if c.about_none else "")
            ctl = "<br>".join(md_escape(control_text(x)) for x in c.controls
                             if x.kind != RunKind.ALTERNATIVE) or "—"  # alternatives: the specificity table
            lines.append(f"| {md_escape(test_label(c), NAME_LIMIT)} | {md_escape(c.name, NAME_LIMIT)}{badge} | "
                         f"{md_escape(measured_text(c))} | {md_escape(op)} | {md_escape(thr)} | "
                         f"{fmt_margin(c.margin)} | {RESULT.get(c.status, c.status)} | {ctl} |")
        lines.append("")
        lines += _power(report, module)
        lines += _specificity(report, module)
    lines += _held_out(report)
    lines += _ground_truth(report)
    return "\n".join(lines).rstrip() + "\n"


def _ground_truth(report: Run) -> list[str]:
    """Claims about Tracr-compiled models (mechanism known): right and wrong verdicts per claim type."""
    from circuits.report.views import ground_truth_matrix, ground_truth_table

    table = ground_truth_table(report)
    if not table:
        return []
    wrong = ground_truth_matrix(report)["wrong"]
    return ["### Ground truth: verdicts on compiled models", "", *table, "",
            *([f"Wrong verdicts: {md_escape('; '.join(wrong))}", ""] if wrong else [])]


def _held_out(report: Run) -> list[str]:
    """Each model's held-out test accuracy with its Wilson 95% interval (models with a test set)."""
    rows = [(m, held_out(m.metrics, m.n_test)) for m in report.models]
    rows = [(m, h) for m, h in rows if h]
    if not rows:
        return []
    lines = ["### Models: held-out accuracy", "", "| model | seed | source | test accuracy [Wilson 95%] | test set |",
             "|---|---|---|---|---:|"]
    for m, h in rows:
        lines.append(f"| {md_code(m.name)} | {md_escape(m.seed)} | {md_escape(m.source)} | "
                     f"{h.test_acc:.3%} [{h.lo:.3%}, {h.hi:.3%}] | {h.n_test:,} |")
    return lines + [""]


def _rollup(report: Run) -> list[str]:
    rows = module_rollup(report)
    if not rows:
        return []
    lines = ["| system (module) | claims | held | known failures | failed | errors | controls failed as required "
             "(+ known misses) | generic only | no controls | figures |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        known = f" (+{r.controls_known} known)" if r.controls_known else ""
        lines.append(f"| {md_code(r.module)} | {r.claims} | {r.held} | {r.known} | {r.failed} | "
                     f"{r.errors} | {r.controls_failed}/{r.controls_total}{known} | "
                     f"{r.generic_only} | {r.no_controls} | {r.figures} |")
    return lines + [""]


def _problems(report: Run) -> list[str]:
    probs = problem_lines(report)
    known = known_control_runs(report)
    lines = []
    if probs:  # first: what a reader must look at, one line each by kind
        lines += ["### Problems", ""]
        lines += [f"- **{md_escape(p.kind)}** {md_code(p.nodeid)}: {md_escape(p.message)}"
                  for p in probs] + [""]
    for g in not_run_groups(report):
        lines += [f"*Not run:* {g.n} {md_escape(g.reason)} (run with {md_code(g.option)})", ""]
    if known:
        lines += ["### Claims known to hold under a control (the module's KNOWN_FAILURES, with reasons)", ""]
        lines += [f"- {md_code(r.nodeid)}: {md_escape(r.message)} *Known:* {md_escape(r.known)}"
                  for r in known] + [""]
    return lines


def _robustness(report: Run) -> list[str]:
    rows = robustness(report)
    if not rows:
        return []
    lines = ["### Pass rate across seeds (robustness per claim)", "",
             "| test | claim | reference | seeds (value, margin, binding) | passed |", "|---|---|---|---|---|"]
    for r in rows:
        ref = r.reference
        ref_t = "—" if ref is None else (f"{'pass' if ref.passed else 'fail'} {md_escape(ref.value_text)} "
                                        f"({md_escape(ref.source)})")
        cells = []
        for s in r.seeds:
            verdict = ("pass" if s.passed else "expected fail" if s.status == "XFAIL" else
                       "not reached" if not s.reached else "**fail**")
            extra = f", {md_escape(s.binding)}" if s.binding else ""
            flip = " ⇄ flipped" if s.flip else ""
            cells.append(f"seed {md_escape(s.seed)}: {verdict} {md_escape(s.value_text)} "
                         f"({fmt_margin(s.margin)}{extra}){flip}")
        lines.append(f"| {md_escape(r.test, NAME_LIMIT)} | {md_escape(r.name, NAME_LIMIT)} | {ref_t} | {'<br>'.join(cells)} | "
                     f"{md_escape(rate_text(r))} |")
    return lines + [""]


def _power(report: Run, module: str) -> list[str]:
    pm = power_matrix(report, module)
    if not pm or not pm.rows:
        return []
    head = [f"{md_escape(spec)}{' (mutation)' if kind == RunKind.MUTATION else ''}" for spec, kind in pm.columns]
    lines = ["<details><summary>power matrix: each claim on each control / mutation</summary>", "",
             "| claim | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for row in pm.rows:
        c = row.claim
        cells = []
        for spec, _ in pm.columns:
            x = row.cells.get(spec)
            cls, verdict = cell_verdict(x)
            if x is None:
                cells.append("")
            else:
                val = f" {md_escape(x.value_text)} ({fmt_margin(x.margin)})" if x.value_text else ""
                cells.append(("**" + verdict + "**" if cls == "bad" else verdict) + val)
        lines.append(f"| {md_escape(test_label(c), NAME_LIMIT)} {md_escape(c.name, NAME_LIMIT)} | " + " | ".join(cells) + " |")
    return lines + ["", "</details>", ""]


def _specificity(report: Run, module: str) -> list[str]:
    rows = specificity(report, module)
    if not rows:
        return []
    lines = ["Specificity: each claim pointed at every alternative of the part it names", "",
             "| claim | alternatives that also hold | verdict |", "|---|---|---|"]
    for r in rows:
        c = r.claim
        verdict = ("specific" if not r.held else "unspecific (known: " + md_escape(r.known) + ")"
                   if r.known else "**unspecific**")
        lines.append(f"| {md_escape(test_label(c))} {md_escape(c.name)} | {md_escape(specificity_text(r))} | "
                     f"{verdict} |")
    return lines + [""]


def _compare_md(cmp_: Comparison) -> list[str]:
    who = cmp_.against.run_id or cmp_.against.path
    n = cmp_.counts
    text = (f"{n.matched} claims matched, {n.flipped} flipped ({n.to_fail} now failing, {n.to_pass} now passing), "
            f"{n.moved} moved, {len(cmp_.added)} new, {len(cmp_.removed)} gone")
    if n.not_run:
        text += f", {n.not_run} not run in this run"
    lines = [f"### Compared with {md_code(who)}", "", text + f" ({md_escape(NOISE_FLOOR_TEXT)}).", ""]
    rows = compare_display_rows(cmp_)
    if rows:
        lines += ["| test | claim | before | after | margin moved |", "|---|---|---|---|---:|"]
        for r in rows:
            b = ("pass" if r.before else "fail") + f" ({md_escape(r.value_before)})"
            a = ("pass" if r.after else "**fail**") + f" ({md_escape(r.value_after)})"
            flip = " ⇄ flipped" if r.flipped else ""
            lines.append(f"| {md_escape(where(r))} | {md_escape(r.name, NAME_LIMIT)}{flip} | {b} | {a} | "
                         f"{fmt_margin(r.delta)} |")
        lines.append("")
    return lines
