"""report.html: one self-contained page (inline CSS, PNGs as data URIs, no script, no external resource).

Reading order: the run's headline and a roll-up per system (hypotheses module) that is also the table
of contents; problems; the comparison; the robustness view across seeds; then each module, test by
test, with the test's claims (each control's value and margin beside them) directly followed by the
figures that test drew; the module's power matrix; models; tests; the run's machine and commit.

Figures are shown at the content column's width (small ones at 1.6x their pixels); clicking one
enlarges it with a CSS ``:target`` lightbox (the figure element itself goes full screen, so the image
is embedded once).
"""

from __future__ import annotations

import base64
import html
import struct
from pathlib import Path
from typing import Any

from circuits.records import ClaimResult, Comparison, ModelInfo, Run, RunKind, as_run, spec_name
from circuits.report.text import visible
from circuits.report.compare import NOISE_FLOOR_TEXT, compare_display_rows
from circuits.report.machine import commit_text, versions_text
from circuits.report.views import (anchor, case_label, test_function, cell_verdict, fmt_margin, headline, held_out, held_out_text,
                    known_control_runs, measured_text, metrics_text, module_rollup, modules_in_order, one_line_summary,
                    not_run_groups, op_text, outcome_items, power_matrix, problem_lines, rate_text, robustness,
                    specificity, specificity_text, test_groups, where, TestGroup)  # noqa: F401

__all__ = ["render_html"]

COLUMN_PX = 1176  # the content column: main's max-width minus its padding
SMALL_FIGURE_SCALE = 1.6

CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --pass:#1a7f37; --pass-bg:#dafbe1;
  --fail:#cf222e; --fail-bg:#ffebe9; --warn:#9a6700; --warn-bg:#fff8c5; --accent:#0969da; }
* { box-sizing: border-box; }
html { scroll-behavior:smooth; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:var(--ink); background:#fff; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 60px; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
h1 { font-size:26px; margin:0 0 4px; font-weight:650; letter-spacing:-.01em; }
h2 { font-size:20px; margin:44px 0 6px; padding-bottom:6px; border-bottom:2px solid var(--line); font-weight:650; }
h2 code { font-size:18px; }
h3 { font-size:16px; margin:26px 0 6px; font-weight:620; }
h3 .sub { font-weight:400; }
code, .mono { font-family: ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,monospace; font-size:13px; }
.sub { color:var(--muted); font-size:13.5px; }
.lead { color:#3d444d; margin:4px 0 14px; max-width:960px; font-style:italic; }
.oneline { font-weight:600; margin:10px 0 0; }
.pills { display:flex; flex-wrap:wrap; gap:8px; margin:14px 0 6px; }
.pill { border-radius:999px; padding:3px 12px; font-size:13.5px; font-weight:600; background:var(--bg);
  border:1px solid var(--line); }
.pill.pass { background:var(--pass-bg); color:var(--pass); border-color:#aceebb; }
.pill.fail { background:var(--fail-bg); color:var(--fail); border-color:#ffcecb; }
.pill.warn { background:var(--warn-bg); color:var(--warn); border-color:#eed888; }
nav.toc { margin:8px 0 0; font-size:13.5px; }
nav.toc a { margin-right:14px; }
table { border-collapse:collapse; width:100%; margin:6px 0 4px; font-size:14px; }
table.claims { table-layout:fixed; }
th { text-align:left; font-weight:600; color:var(--muted); font-size:12px; text-transform:uppercase;
  letter-spacing:.04em; padding:6px 8px; border-bottom:2px solid var(--line); }
td { padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; overflow-wrap:anywhere; }
tr.fail td { background:#fff8f7; }
code.nw { white-space:nowrap; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
th.num { text-align:right; }
td.m { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.ok { color:var(--pass); } .bad { color:var(--fail); } .muted { color:var(--muted); } .warn { color:var(--warn); }
.res { display:inline-block; min-width:52px; text-align:center; border-radius:6px; padding:1px 8px;
  font-weight:700; font-size:12px; letter-spacing:.03em; }
.res.PASS { background:var(--pass-bg); color:var(--pass); }
.res.FAIL { background:var(--fail-bg); color:var(--fail); }
.res.XFAIL { background:var(--warn-bg); color:var(--warn); }
.res.ERROR { background:var(--fail-bg); color:var(--fail); }
.badge { display:inline-block; margin-left:6px; padding:0 6px; border-radius:4px; font-size:11px; font-weight:600;
  background:var(--warn-bg); color:var(--warn); border:1px solid #eed888; white-space:nowrap; }
.badge.bad { background:var(--fail-bg); color:var(--fail); border-color:#ffcecb; }
.note { color:var(--muted); font-size:12.5px; margin-top:2px; }
.ctl { font-size:12.5px; line-height:1.45; margin:0 0 2px; padding-left:6px; border-left:3px solid var(--line); }
.ctl.ok { border-color:#4ac26b; color:var(--ink); } .ctl.bad { border-color:var(--fail); background:var(--fail-bg); }
.ctl.warn { border-color:#d4a72c; background:var(--warn-bg); }
.ctl.muted { color:var(--muted); }
.ctl .k { font-weight:600; }
.chip { display:inline-block; margin:1px 4px 2px 0; padding:0 7px; border-radius:5px; font-size:12.5px;
  border:1px solid var(--line); }
.chip.ok { background:var(--pass-bg); border-color:#aceebb; }
.chip.bad { background:var(--fail-bg); border-color:#ffcecb; }
.chip.warn { background:var(--warn-bg); border-color:#eed888; }
.test { margin:0 0 10px; }
.figs { display:flex; flex-direction:column; gap:14px; margin:12px 0 8px; }
figure.fig { margin:0; border:1px solid var(--line); border-radius:8px; padding:10px; background:#fff; }
figure.fig a.zoom { display:block; cursor:zoom-in; }
figure.fig img { display:block; max-width:100%; height:auto; margin:0 auto; }
figure.fig a.close { display:none; }
figure.fig:target { position:fixed; inset:0; z-index:10; margin:0; border:0; border-radius:0; padding:28px 20px 12px;
  background:rgba(24,26,30,.94); display:flex; flex-direction:column; align-items:center; justify-content:center; }
figure.fig:target a.zoom { cursor:default; }
figure.fig:target img { width:auto !important; max-width:96vw; max-height:86vh; background:#fff; border-radius:4px; }
figure.fig:target figcaption { color:#e6e6e6; }
figure.fig:target figcaption b { color:#fff; }
figure.fig:target a.close { display:block; position:absolute; top:8px; right:20px; color:#fff; font-size:15px; }
figcaption { font-size:13.5px; color:var(--muted); margin-top:6px; }
figcaption b { color:var(--ink); font-weight:600; }
.tag { display:inline-block; padding:0 6px; border-radius:4px; background:#ddf4ff; color:#0550ae; font-size:12px; }
.scroll { overflow-x:auto; }
a.anchor { margin-left:6px; color:var(--line); font-weight:400; font-size:.85em; visibility:hidden; }
h2:hover a.anchor, h3:hover a.anchor, summary:hover a.anchor { visibility:visible; }
details.test { border:1px solid var(--line); border-radius:6px; margin:4px 0; padding:0 10px; }
details.test > summary { color:var(--ink); margin:6px 0; }
details.test.bad { border-color:#ffcecb; }
details.test .res { min-width:0; padding:0 5px; font-size:10.5px; margin-left:2px; }
.tname { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; font-weight:600; }
.tdoc { margin:-2px 0 4px; }
.pmbox { overflow:auto; max-height:34em; border:1px solid var(--line); border-radius:6px; margin:6px 0 10px; }
table.pm { width:auto; margin:0; border-collapse:separate; border-spacing:0; }
table.pm td.cell { width:22px; min-width:22px; text-align:center; padding:2px 0; font-size:12px; cursor:default; }
table.pm th.spec { position:sticky; top:0; z-index:2; background:#fff; vertical-align:bottom; padding:4px 1px;
  width:22px; min-width:22px; }
table.pm th.spec span { writing-mode:vertical-rl; transform:rotate(180deg); white-space:nowrap; font-size:11.5px;
  font-weight:500; max-height:15em; overflow:hidden; text-overflow:ellipsis; display:inline-block; }
table.pm th.spec.mutation { background:#f6f8fa; }
table.pm th.claim { position:sticky; left:0; z-index:1; background:#fff; text-align:left; white-space:nowrap;
  font-weight:400; padding:2px 8px; border-right:1px solid var(--line); max-width:26em; overflow:hidden;
  text-overflow:ellipsis; }
table.pm thead th.claim { top:0; z-index:3; vertical-align:bottom; }
table.pm td, table.pm th { font-size:12.5px; }
table.pm th { text-transform:none; letter-spacing:0; color:var(--ink); }
table.pm td.cell.ok { background:var(--pass-bg); }
table.pm td.cell.bad { background:var(--fail-bg); color:var(--fail); }
table.pm td.cell.known { background:var(--warn-bg); color:var(--warn); }
table.pm td.cell.muted { color:var(--muted); background:var(--bg); }
.box { border:1px solid var(--line); border-radius:8px; padding:12px 16px; background:var(--bg); margin:10px 0; }
.box.bad { background:var(--fail-bg); border-color:#ffcecb; }
details summary { cursor:pointer; color:var(--accent); margin:8px 0; }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:2px 16px; font-size:13.5px; margin:6px 0; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(360px,1fr)); gap:14px; margin:10px 0 8px; }
.grid figure { margin:0; border:1px solid var(--line); border-radius:8px; padding:8px; }
"""


def _e(x: Any) -> str:
    # html.escape leaves bidi overrides (U+202E) and control characters: shown as escapes (report.text)
    return html.escape(visible(x, None, keep_lines=True))


def render_html(report: Run | dict, run_dir: Path | str) -> str:
    report = as_run(report)
    run_dir = Path(run_dir)
    counter = iter(range(1, 1 << 30))
    parts = [_header(report), _rollup(report), _problems(report)]
    if report.compare:
        parts.append(_compare(report.compare))
    parts.append(_robustness(report))  # before any figure: it is what a seeds run is for
    for module in modules_in_order(report):
        parts.append(_module(report, module, run_dir, counter))
    parts += [_ground_truth(report), _models(report), _tests(report), _footer(report)]
    title = f"circuits · {report.run_id}"
    body = "\n".join(p for p in parts if p)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def _ground_truth(report: Run) -> str:
    """Claims about Tracr-compiled models (mechanism known): right and wrong verdicts per claim type."""
    from circuits.report.views import ground_truth_matrix

    gt = ground_truth_matrix(report)
    if gt is None:
        return ""
    out = ['<section id="ground-truth">' +
           _heading("h2", "ground-truth-verdicts", "Ground truth: verdicts on compiled models") +
           '<p class="sub">Claims about Tracr-compiled models, stated TRUE as compiled and FALSE in several ways: '
           'a right verdict is a TRUE claim passing or a FALSE claim failing.</p>'
           '<table><thead><tr><th>claim type</th><th>TRUE, passed</th><th>TRUE, failed</th><th>FALSE, passed</th>'
           '<th>FALSE, failed</th><th>verdicts right</th></tr></thead><tbody>']
    for kind, r in [*gt["types"].items(), ("all", gt["total"])]:
        right, n = r["true_pass"] + r["false_fail"], sum(r.values())
        out.append(f'<tr><td>{_e(kind)}</td><td>{r["true_pass"]}</td><td>{r["true_fail"]}</td>'
                   f'<td>{r["false_pass"]}</td><td>{r["false_fail"]}</td><td>{right} / {n}</td></tr>')
    out.append("</tbody></table>")
    if gt["wrong"]:
        out.append(f'<p>Wrong verdicts: {_e("; ".join(gt["wrong"]))}</p>')
    return "".join(out) + "</section>"


# --- top of the page ---------------------------------------------------------------------------------------


def _header(report: Run) -> str:
    s = report.summary
    pills = []
    for i in outcome_items(report):  # one pill per outcome kind, never folded into another
        cls = ("fail" if i.n else "pass") if i.problem else ("warn" if i.key == "known" else "pass")
        known = f' <span title="documented in the module\'s KNOWN_FAILURES">(+{i.known} known)</span>' \
            if i.known else ""
        pills.append(f'<span class="pill {cls}">{i.n} {_e(i.label)}{known}</span>')
    if s.generic_only:
        pills.append(f'<span class="pill warn">{s.generic_only} with generic controls only</span>')
    if s.no_controls:
        pills.append(f'<span class="pill warn">{s.no_controls} without controls</span>')
    t = s.tests
    tb = t.get("failed", 0) + t.get("error", 0)
    pills.append(f'<span class="pill {"fail" if tb else ""}">{sum(t.values())} tests'
                 f'{f", {tb} failed/errored" if tb else ""}</span>')
    if report.interrupted:
        pills.append('<span class="pill warn">interrupted: partial results</span>')
    m = report.machine
    created = str(report.created or "").replace("T", " ")
    commit = commit_text(report, " · dirty")
    sub = (f'{_e(created)} · {report.duration_s or 0:.1f} s · commit <code>{_e(commit)}</code>'
           f' · {_e(m.device)} · python {_e(m.python)} · torch {_e(m.torch)}')
    opts = report.options
    extra = []
    if opts.seeds:
        extra.append(f"seeds {', '.join(map(str, opts.seeds))}")
    if opts.retrain:
        extra.append("retrained")
    if extra:
        sub += " · " + _e(" · ".join(extra))
    toc = [("#rollup", "systems")]
    if _problem_items(report):
        toc.append(("#problems", "problems"))
    if report.compare:
        toc.append(("#compare", "comparison"))
    if robustness(report):
        toc.append(("#robustness", "robustness across seeds"))
    if report.models:
        toc.append(("#models", "models"))
    toc += [("#tests", "tests"), ("#run", "run")]
    nav = "".join(f'<a href="{h}">{_e(t)}</a>' for h, t in toc)
    one = one_line_summary(report, with_path=False)
    return (f'<header><h1>circuits run <span class="mono" style="font-size:22px">{_e(report.run_id)}</span>'
            f'</h1><div class="sub">{sub}</div><div class="pills">{"".join(pills)}</div>'
            f'<div class="oneline">{_e(one)}</div><nav class="toc">{nav}</nav></header>')


def _rollup(report: Run) -> str:
    rows = module_rollup(report)
    if not rows:
        return ""
    out = ['<section id="rollup">' + _heading("h2", "systems", "Systems") + '<table><thead><tr>'
           '<th style="width:40%">system (hypotheses module)</th>'
           '<th class="num">claims</th><th class="num">held</th><th class="num">known failures</th>'
           '<th class="num">failed</th><th class="num">errors</th><th class="num" title="control / mutation cells '
           'where the claim failed as required, of all (+ misses the module\'s KNOWN_FAILURES documents)">controls '
           'failed as required</th><th class="num">generic controls only</th><th class="num">no controls</th>'
           '<th class="num">figures</th><th class="num">time</th></tr></thead><tbody>']
    for r in rows:
        doc = r.doc if len(r.doc) <= 160 else r.doc[:159] + "…"
        failed = r.failed + r.errors
        # known misses are coloured as known (warn), never as a problem
        ctl_cls = "bad" if r.controls_held else ("warn" if r.controls_known else
                                                     "ok" if r.controls_total else "muted")
        known = f' <span class="warn">(+{r.controls_known} known)</span>' if r.controls_known else ""
        out.append(
            f'<tr class="{"fail" if failed else ""}"><td><a href="#{r.anchor}">'
            f'<code class="nw">{_e(r.module)}</code></a>'
            f'<div class="note">{_e(doc)}</div></td><td class="num">{r.claims}</td>'
            f'<td class="num ok">{r.held}</td><td class="num warn">{r.known or ""}</td>'
            f'<td class="num {"bad" if r.failed else "muted"}">{r.failed}</td>'
            f'<td class="num {"bad" if r.errors else "muted"}">{r.errors}</td>'
            f'<td class="num {ctl_cls}">{r.controls_failed}/{r.controls_total}{known}</td>'
            f'<td class="num {"warn" if r.generic_only else "muted"}">{r.generic_only}</td>'
            f'<td class="num {"warn" if r.no_controls else "muted"}">{r.no_controls}</td>'
            f'<td class="num">{r.figures}</td><td class="num">{r.duration:.1f} s</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _problem_items(report: Run) -> list[str]:
    return [f"<li><b>{_e(p.kind)}</b> <code>{_e(p.nodeid)}</code>: {_e(p.message)}</li>"
            for p in problem_lines(report)]


def _problems(report: Run) -> str:
    items = _problem_items(report)
    known = [f"<li><code>{_e(r.nodeid)}</code>: {_e(r.message)} <i>Known: {_e(r.known)}</i></li>"
             for r in known_control_runs(report)]
    out = ""
    if items:
        out += f'<div class="box bad" id="problems"><b>Problems</b><ul style="margin:6px 0 0">{"".join(items)}</ul></div>'
    for g in not_run_groups(report):
        ids = "".join(f"<li><code>{_e(n)}</code></li>" for n in g.nodeids)
        out += (f'<details class="box not-run"><summary>Not run: {g.n} {_e(g.reason)} (run with '
                f'<code>{_e(g.option)}</code>)</summary><ul>{ids}</ul></details>')
    if known:
        out += (f'<details class="box" id="known-controls"><summary><b>Claims known to hold under a control</b> '
                f'({len(known)}: the modules\' KNOWN_FAILURES, with reasons)</summary>'
                f'<ul style="margin:6px 0 0">{"".join(known)}</ul></details>')
    return out


def _result(status: str) -> str:
    label = {"XFAIL": "KNOWN FAILURE"}.get(status, status)
    return f'<span class="res {_e(status)}">{_e(label)}</span>'


def _compare(cmp_: Comparison) -> str:
    n = cmp_.counts
    who = cmp_.against.run_id or cmp_.against.path
    not_run = f' · {n.not_run} not run in this run' if n.not_run else ""
    out = [f'<section id="compare">' + _heading("h2", "compared", f"Compared with <code>{_e(who)}</code>"),
           f'<p class="sub">{n.matched} claims matched · <b class="{"bad" if n.to_fail else ""}">'
           f'{n.to_fail} now failing</b> · <b class="ok">{n.to_pass} now passing</b> · '
           f'{n.moved} moved · {len(cmp_.added)} new · {len(cmp_.removed)} gone{_e(not_run)}'
           f'<br>{_e(NOISE_FLOOR_TEXT)}</p>']
    rows = compare_display_rows(cmp_, limit=15)
    if rows:
        out.append("<table><thead><tr><th>test</th><th>claim</th><th>before</th><th>after</th>"
                   "<th class='num'>margin moved</th></tr></thead><tbody>")
        for r in rows:
            flip = r.before != r.after
            b = f'{_result("PASS" if r.before else "FAIL")} <span class="m">{_e(r.value_before)}</span>'
            af = f'{_result("PASS" if r.after else "FAIL")} <span class="m">{_e(r.value_after)}</span>'
            d = r.delta
            dcls = "" if not isinstance(d, (int, float)) else ("ok" if d >= 0 else "bad")
            out.append(f'<tr class="{"fail" if flip and not r.after else ""}"><td class="sub">{_e(where(r))}</td>'
                       f'<td><code>{_e(r.name)}</code>{" <b>⇄ flipped</b>" if flip else ""}</td>'
                       f'<td>{b}</td><td>{af}</td><td class="num {dcls}">{_e(fmt_margin(d))}</td></tr>')
        out.append("</tbody></table>")
    else:
        out.append('<p class="sub">No claim flipped and no margin moved beyond the noise floor.</p>')
    out.append("</section>")
    return "\n".join(out)


def _robustness(report: Run) -> str:
    rows = robustness(report)
    if not rows:
        return ""
    out = ['<section id="robustness">' + _heading("h2", "robustness-across-seeds", "Robustness across seeds") +
           '<p class="sub">Each claim on every seed: value, margin and binding; the pass rate with its Wilson 95% '
           'interval; ⇄ marks a seed whose verdict differs from the reference model\'s.</p>'
           '<table><thead><tr><th style="width:22%">test · claim</th><th style="width:16%">reference</th>'
           '<th>seeds</th><th style="width:17%">passed</th></tr></thead><tbody>']
    for r in rows:
        ref = r.reference
        if ref is None:
            ref_html = '<span class="muted">—</span>'
        else:
            ref_html = (f'{_result(ref.status or ("PASS" if ref.passed else "FAIL"))} '
                        f'<span class="m">{_e(ref.value_text)}</span> '
                        f'<span class="note">({_e(ref.source)})</span>')
        chips = []
        for s in r.seeds:
            if s.passed:
                cls, verdict = "ok", "pass"
            elif s.status == "XFAIL":
                cls, verdict = "warn", "expected"
            elif not s.reached:
                cls, verdict = "bad", "not reached"
            else:
                cls, verdict = "bad", "fail"
            binding = f' · {_e(s.binding)}' if s.binding else ""
            flip = ' <b title="differs from the reference">⇄</b>' if s.flip else ""
            chips.append(f'<span class="chip {cls}">seed {_e(s.seed)}: {verdict} <span class="m">'
                         f'{_e(s.value_text)}</span> ({_e(fmt_margin(s.margin))}){binding}{flip}</span>')
        cls = "warn" if r.expected_failure else ("ok" if r.rate == 1 else "bad")
        out.append(f'<tr><td><span class="sub">{_e(r.test)}</span><br><code>{_e(r.name)}</code></td>'
                   f'<td>{ref_html}</td><td>{"".join(chips)}</td><td class="{cls}">{_e(rate_text(r))}</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


# --- a module: tests, claims, figures, power matrix ---------------------------------------------------------


def _module(report: Run, module: str, run_dir: Path, counter) -> str:
    """A module: its hypothesis, its power matrix (one row per claim), then each test in a ``<details>``
    that is open only where something is wrong (a failed claim, an error, a claim that held on a control
    or mutation no KNOWN_FAILURES documents): the page a reader opens shows the problems, the rest a click away."""
    mid = anchor(module)
    out = [f'<section id="{mid}">{_heading("h2", mid, f"<code>{_e(module)}</code>")}']
    info = report.modules.get(module)
    doc = (info.doc if info else "").strip()
    if doc:
        out.append(f'<p class="lead">{_e(doc)}</p>')
    out.append(_power_matrix(report, module))
    out.append(_specificity(report, module))
    groups = test_groups(report, module)
    bad = [g for g in groups if _group_has_problem(g)]
    if groups:
        out.append(_heading("h3", f"{mid}--tests", f'Tests <span class="sub">— {len(groups)}, '
                                                     f'{len(bad)} with a problem (open)</span>'))
    for g in groups:
        tdoc = f' <span class="sub">— {_e(g.doc)}</span>' if g.doc else ""
        n_claims, n_figs = len(g.claims), len(g.figures)
        counts = f'<span class="sub"> · {n_claims} claim{"s" * (n_claims != 1)}' + \
            (f', {n_figs} figure{"s" * (n_figs != 1)}' if n_figs else "") + "</span>"
        verdicts = "".join(_result(c.status) for c in g.claims[:12])
        is_bad = g in bad
        out.append(f'<details class="test{" bad" if is_bad else ""}" id="{g.anchor}"{" open" if is_bad else ""}>'
                   f'<summary><span class="tname">{_e(g.group.split("::", 1)[-1])}</span> {verdicts}{counts}'
                   f'<a class="anchor" href="#{g.anchor}" title="link to this test">#</a></summary>'
                   f'<div class="tdoc">{tdoc}</div>')
        if g.claims:
            out.append(_claims_table(g.claims))
        main = [tf for tf in g.figures if not tf[0].control]
        ctl = [tf for tf in g.figures if tf[0].control]
        if main:
            out.append(_figures(main, run_dir, counter, g.anchor))
        if ctl:
            out.append(f'<details><summary>figures on controls ({len(ctl)})</summary>'
                       f'{_figures(ctl, run_dir, counter, g.anchor)}</details>')
        out.append("</details>")
    out.append("</section>")
    return "\n".join(out)


def _group_has_problem(g: TestGroup) -> bool:
    """A failed or errored claim, a control / mutation cell that held (undocumented) or errored."""
    for c in g.claims:
        if c.status in ("FAIL", "ERROR") or c.test_outcome in ("error", "not finished", "interrupted"):
            return True
        if any(x.outcome in ("error", "missing") or (x.outcome == "held" and not x.known)
               for x in c.controls):
            return True
    return False


def _heading(tag: str, hid: str, inner: str) -> str:
    """A heading with an id and a visible anchor link (every heading can be linked to)."""
    return f'<{tag} id="{_e(hid)}">{inner}<a class="anchor" href="#{_e(hid)}" title="link to this heading">#</a></{tag}>'


def _claims_table(claims: list[ClaimResult]) -> str:
    out = ['<table class="claims"><colgroup><col style="width:23%"><col style="width:13%"><col style="width:5%">'
           '<col style="width:10%"><col style="width:8%"><col style="width:10%"><col></colgroup>'
           "<thead><tr><th>claim</th><th>measured</th><th>op</th><th>threshold</th><th class='num'>margin</th>"
           "<th>result</th><th>controls: value (needs, margin)</th></tr></thead><tbody>"]
    for c in claims:
        op, thr = op_text(c)
        sub = " · ".join(_e(x) for x in (c.note, c.detail, c.problem) if x)
        sub = f'<div class="note">{sub}</div>' if sub else ""
        case = case_label(c.group or "")
        seed = f' <span class="tag">[{_e(case)}]</span>' if case else ""
        seed += f' <span class="tag">seed {_e(c.seed)}</span>' if c.seed is not None else ""
        badge = ('<span class="badge" title="every control of this claim is generic (untrained / shuffled labels):'
                 ' none targets the part it names">generic controls only</span>' if c.generic_only else
                 f'<span class="badge" title="{_e(c.about_none)}">about no part</span>' if c.about_none else "")
        m = c.margin
        mcell = (f'<td class="num {"ok" if m >= 0 else "bad"}">{_e(fmt_margin(m))}</td>'
                 if isinstance(m, (int, float)) else '<td class="num muted">—</td>')
        out.append(f'<tr class="{"fail" if c.status in ("FAIL", "ERROR") else ""}" title="{_e(c.message)}">'
                   f'<td><code>{_e(c.name)}</code>{seed}{badge}{_test_flag(c)}{sub}</td>'
                   f'<td class="m">{_e(measured_text(c))}</td><td class="m">{_e(op)}</td><td class="m">{_e(thr)}</td>'
                   f'{mcell}<td>{_result(c.status)}</td><td>{_controls(c)}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def _test_flag(c: ClaimResult) -> str:
    out = c.test_outcome
    if out in ("failed", "error", "not finished", "interrupted") and c.passed:
        return (f'<span class="badge bad" title="the test itself {_e(out)} after recording this claim">'
                f'test {_e(out)}</span>')
    return ""


def _controls(c: ClaimResult) -> str:
    lines = []
    for x in c.controls:
        if x.kind == RunKind.ALTERNATIVE:
            continue  # the module's specificity table shows them
        kind = "mutation " if x.kind == RunKind.MUTATION else ""
        if x.outcome in ("failed", "held"):
            cls = "ok" if x.outcome == "failed" else "warn" if x.known else "bad"
            verdict = ("fails ✓" if x.outcome == "failed" else
                       "HOLDS (known miss)" if x.known else
                       "HOLDS ✗ no power" if kind else "HOLDS ✗ no teeth")
            need = ("" if x.op == "holds" else
                    f'<span class="muted">(needs {_e(x.requirement)}, margin {_e(fmt_margin(x.margin))})'
                    "</span>")
            lines.append(f'<div class="ctl {cls}" title="{_e(x.message)}"><span class="k">{kind}'
                         f'{_e(x.control)}</span> {verdict}: <span class="m">{_e(x.value_text)}</span> '
                         f'{need}</div>')
        else:
            word = "skipped" if x.outcome == "skipped" else "error"
            lines.append(f'<div class="ctl {"muted" if word == "skipped" else "bad"}" title="{_e(x.message)}">'
                         f'<span class="k">{kind}{_e(x.control)}</span> {word}</div>')
    return "".join(lines) or '<span class="muted">—</span>'


def _png_size(png: bytes) -> tuple[int, int] | None:
    if png[:8] != b"\x89PNG\r\n\x1a\n" or len(png) < 24:
        return None
    return struct.unpack(">II", png[16:24])


def _figures(items: list[tuple[dict, dict]], run_dir: Path, counter, back: str) -> str:
    cells = []
    for t, f in items:
        fid = f"fig-{next(counter)}"
        png = _read(run_dir, f.path)
        variant = " · ".join(x for x in (case_label(t.group or ""),
                                         f"control {t.control}" if t.control else "",
                                         f"seed {t.seed}" if t.seed is not None else "") if x)
        cap = f'<b>{_e(f.name)}</b>' + (f' <span class="tag">{_e(variant)}</span>' if variant else "")
        cap += f" — {_e(f.caption)}" if f.caption else ""
        if not png:
            cells.append(f'<figure class="fig"><div class="muted">(figure file missing)</div>'
                         f'<figcaption>{cap}</figcaption></figure>')
            continue
        size = _png_size(png)
        style = ""
        if size:
            # legible without zooming: the column's width; small figures at 1.6x rather than blown up
            shown = COLUMN_PX if size[0] >= COLUMN_PX / SMALL_FIGURE_SCALE else size[0] * SMALL_FIGURE_SCALE
            style = f' style="width:{min(100.0, 100.0 * shown / COLUMN_PX):.1f}%"'
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        img = (f'<img alt="{_e(f.name)}"{dims}{style} '
               f'src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        cells.append(f'<figure class="fig" id="{fid}"><a class="zoom" href="#{fid}" title="click to enlarge">{img}</a>'
                     f'<a class="close" href="#{back}">close ✕</a><figcaption>{cap}</figcaption></figure>')
    return f'<div class="figs">{"".join(cells)}</div>'


def _read(run_dir: Path, rel: str | None) -> bytes | None:
    if not rel:
        return None
    try:
        return (run_dir / rel).read_bytes()
    except OSError:
        return None


PM_SYMBOL = {"ok": "✓", "bad": "✗", "known": "k", "muted": "–", "na": ""}


def _power_matrix(report: Run, module: str) -> str:
    """One row per claim, one narrow column per control / mutation (its name written upwards), a
    symbol per cell with the value, requirement and margin in its tooltip; the header row and the
    claim column stay in view while the box scrolls."""
    pm = power_matrix(report, module)
    if not pm or not pm.rows:
        return ""
    kinds = [k for _, k in pm.columns]
    n_ctl, n_mut = kinds.count("control"), kinds.count("mutation")
    head = "".join(f'<th class="spec {k}" title="{_e(k)} {_e(spec)}"><span>{_e(spec_name(spec))}'
                   "</span></th>" for spec, k in pm.columns)
    hid = f"{anchor(module)}--power"
    legend = ('each claim (row) on each control / mutation (column): <b class="ok">✓</b> failed as required · '
              '<b class="bad">✗</b> held: no teeth (control) / no power (mutation) · <b class="warn">k</b> held, '
              'a known miss (KNOWN_FAILURES) · <b class="bad">!</b> error · – skipped; hover a cell for its value, '
              'requirement and margin')
    out = [_heading("h3", hid, f'Power matrix <span class="sub">— {len(pm.rows)} claims × {n_ctl} controls, '
                               f'{n_mut} mutations</span>'),
           f'<p class="note">{legend}</p><div class="pmbox"><table class="pm"><thead>'
           f'<tr><th class="claim">claim <span class="sub">(test)</span></th>{head}</tr></thead><tbody>']
    for row in pm.rows:
        c = row.claim
        cells = []
        for spec, kind in pm.columns:
            x = row.cells.get(spec)
            cls, verdict = cell_verdict(x)
            if x is None:
                cells.append('<td class="cell"></td>')
                continue
            symbol = "!" if verdict == "error" else PM_SYMBOL.get(cls, "?")
            tip = f'{c.name} on {kind} {spec_name(spec)}: {verdict}'
            if x.value_text:
                tip += f' — {x.value_text}'
                if x.requirement:
                    tip += f' (needs {x.requirement}, margin {fmt_margin(x.margin)})'
            elif x.message:
                tip += f" — {x.message}"
            cells.append(f'<td class="cell {cls}" title="{_e(tip)}">{symbol}</td>')
        seed = f" (seed {c.seed})" if c.seed is not None else ""
        test = (c.group or "").split("::", 1)[-1]
        badge = '<span class="badge">generic only</span>' if c.generic_only else ""
        out.append(f'<tr><th class="claim" title="{_e(test + seed)}: {_e(c.message)}">'
                   f'<a href="#{anchor(test_function(c.group or ""))}"><code>{_e(c.name)}</code></a>'
                   f'{badge} <span class="sub">{_e(_short(test, 40))}{_e(seed)}</span></th>{"".join(cells)}</tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _specificity(report: Run, module: str) -> str:
    rows = specificity(report, module)
    if not rows:
        return ""
    out = ['<h3>Specificity <span class="sub">— each claim pointed at every alternative of the part it names '
           '(another head for a role or index): k of n alternatives also hold</span></h3>'
           '<div class="scroll"><table class="pm"><thead><tr><th>test · claim</th><th>alternatives</th>'
           '<th>verdict</th></tr></thead><tbody>']
    for r in rows:
        c = r.claim
        cls = "ok" if not r.held else "muted" if r.known else "bad"
        verdict = "specific" if not r.held else f"unspecific (known: {r.known})" if r.known else "unspecific"
        out.append(f'<tr><td><span class="sub">{_e((c.group or "").split("::", 1)[-1])}</span><br>'
                   f'<code>{_e(c.name)}</code></td><td>{_e(specificity_text(r))}</td>'
                   f'<td class="cell {cls}">{_e(verdict)}</td></tr>')
    out.append("</tbody></table></div>")
    return "\n".join(out)


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


# --- the rest ----------------------------------------------------------------------------------------------


def _metrics_cell(m: ModelInfo) -> str:
    """Held-out accuracy with its interval first (when the model has a test set), then the rest."""
    h = held_out(m.metrics, m.n_test)
    rest = metrics_text({k: v for k, v in (m.metrics or {}).items() if not (h and k == "test_acc")})
    return "; ".join(t for t in (held_out_text(h), rest) if t)


def _models(report: Run) -> str:
    models = report.models
    if not models:
        return ""
    from circuits.report.figures import training_curves_svg

    out = ['<section id="models">' + _heading("h2", "models-list", "Models") +
           f'<details><summary>{len(models)} models (held-out accuracy, source, training time)</summary>'
           '<table><thead><tr><th>model</th><th>seed</th><th>source</th>'
           "<th>key</th><th>final metrics (held-out first)</th><th class='num'>time</th></tr></thead><tbody>"]
    curves = []
    for m in models:
        key = (m.content_hash or m.key or "")[:12]
        wt = m.wall_time
        out.append(f'<tr><td><code>{_e(m.name)}</code></td><td>{_e(m.seed)}</td>'
                   f'<td>{_e(m.source)}</td><td class="m">{_e(key)}</td>'
                   f'<td class="sub">{_e(_metrics_cell(m))}</td>'
                   f'<td class="num">{f"{wt:.1f} s" if isinstance(wt, (int, float)) else "—"}</td></tr>')
        try:
            svg = training_curves_svg(m.to_json())
        except Exception:  # a malformed history must not cost the report
            svg = None
        if svg:
            curves.append(f'<figure>{svg}<figcaption><b>{_e(m.name)}</b> training curve '
                          f'({_e(m.source)})</figcaption></figure>')
    out.append("</tbody></table></details>")
    if curves:
        out.append(f'<details><summary>training curves ({len(curves)})</summary><div class="grid">{"".join(curves)}'
                   "</div></details>")
    out.append("</section>")
    return "\n".join(out)


def _tests(report: Run) -> str:
    tests = report.tests
    if not tests:
        return ""
    cls = {"passed": "ok", "failed": "bad", "error": "bad", "xpassed": "bad", "not finished": "bad",
           "interrupted": "bad"}
    out = ['<section id="tests">' + _heading("h2", "tests-list", "Tests") + f'<details><summary>{len(tests)} tests, '
           f"{sum(t.duration or 0 for t in tests):.1f} s in total</summary>"
           "<table><thead><tr><th>test</th><th>outcome</th><th class='num'>duration</th><th>message</th>"
           "</tr></thead><tbody>"]
    for t in sorted(tests, key=lambda t: t.nodeid):
        out.append(f'<tr><td class="m">{_e(t.nodeid)}</td><td class="{cls.get(t.outcome, "muted")}">'
                   f'{_e(t.outcome)}</td><td class="num">{(t.duration or 0):.2f} s</td>'
                   f'<td class="sub">{_e(t.message or t.xfail_reason or "")}</td></tr>')
    out.append("</tbody></table></details></section>")
    return "\n".join(out)


def _footer(report: Run) -> str:
    m = report.machine
    g = report.git
    cmd = " ".join(report.command.args or [])
    kv = [("run", report.run_id), ("summary", headline(report)), ("commit", g.commit or "no git"),
          ("branch", g.branch), ("command", f"pytest {cmd}"), ("platform", m.platform),
          ("cpus", f'{m.cpus_usable} usable of {m.cpu_count}'),
          ("versions", versions_text(report)), ("exit status", report.exitstatus)]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in kv if v is not None)
    return f'<section id="run">{_heading("h2", "run-details", "Run")}<dl class="kv">{rows}</dl></section>'
