"""report.html: one self-contained page (inline CSS, PNGs as base64 data URIs, no external resources)."""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path
from typing import Any

from .report import (claim_rows, compare_display_rows, fmt_margin, headline, measured_text, op_text, problem_tests,
                     test_label, where)

__all__ = ["render_html"]

CSS = """
:root { --ink:#1f2328; --muted:#656d76; --line:#d8dee4; --bg:#f6f8fa; --pass:#1a7f37; --pass-bg:#dafbe1;
  --fail:#cf222e; --fail-bg:#ffebe9; --warn:#9a6700; --warn-bg:#fff8c5; --accent:#0969da; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
  color:var(--ink); background:#fff; }
main { max-width:1240px; margin:0 auto; padding:28px 32px 60px; }
h1 { font-size:26px; margin:0 0 4px; font-weight:650; letter-spacing:-.01em; }
h2 code { font-size:17px; }
.tag { display:inline-block; padding:0 6px; border-radius:4px; background:#ddf4ff; color:#0550ae; font-size:12px; }
.tfail { display:inline-block; margin-left:4px; padding:0 5px; border-radius:4px; background:var(--fail-bg);
  color:var(--fail); font-size:11px; font-weight:600; }
h2 { font-size:19px; margin:40px 0 6px; padding-bottom:6px; border-bottom:1px solid var(--line); font-weight:620; }
h3 { font-size:15px; margin:22px 0 8px; font-weight:600; }
code, .mono { font-family: ui-monospace,SFMono-Regular,"SF Mono",Menlo,Consolas,monospace; font-size:13px; }
.sub { color:var(--muted); font-size:13.5px; }
.lead { color:#3d444d; margin:4px 0 14px; max-width:900px; font-style:italic; }
.pills { display:flex; flex-wrap:wrap; gap:8px; margin:16px 0 6px; }
.pill { border-radius:999px; padding:3px 12px; font-size:13.5px; font-weight:600; background:var(--bg);
  border:1px solid var(--line); }
.pill.pass { background:var(--pass-bg); color:var(--pass); border-color:#aceebb; }
.pill.fail { background:var(--fail-bg); color:var(--fail); border-color:#ffcecb; }
.pill.warn { background:var(--warn-bg); color:var(--warn); border-color:#eed888; }
table { border-collapse:collapse; width:100%; margin:8px 0 4px; font-size:14px; }
th { text-align:left; font-weight:600; color:var(--muted); font-size:12px; text-transform:uppercase;
  letter-spacing:.04em; padding:6px 10px; border-bottom:2px solid var(--line); white-space:nowrap; }
td { padding:7px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
tr.fail td { background:#fff8f7; }
td.nw { white-space:nowrap; }
td.tn { min-width:230px; max-width:300px; overflow-wrap:anywhere; }
td code { word-break:break-word; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.m { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; white-space:nowrap; }
.ok { color:var(--pass); } .bad { color:var(--fail); } .muted { color:var(--muted); }
.res { display:inline-block; min-width:52px; text-align:center; border-radius:6px; padding:1px 8px;
  font-weight:700; font-size:12px; letter-spacing:.03em; }
.res.PASS { background:var(--pass-bg); color:var(--pass); }
.res.FAIL { background:var(--fail-bg); color:var(--fail); }
.res.XFAIL { background:var(--warn-bg); color:var(--warn); }
.note { color:var(--muted); font-size:12.5px; margin-top:2px; }
.chip { display:inline-block; margin:1px 4px 1px 0; padding:0 7px; border-radius:5px; font-size:12px;
  border:1px solid var(--line); white-space:nowrap; }
.chip.ok { background:var(--pass-bg); border-color:#aceebb; }
.chip.bad { background:var(--fail-bg); border-color:#ffcecb; }
.grid { display:grid; grid-template-columns:repeat(auto-fill,minmax(340px,1fr)); gap:16px; margin:10px 0 8px; }
figure { margin:0; border:1px solid var(--line); border-radius:8px; padding:10px; background:#fff; }
figure img { width:100%; height:auto; display:block; }
figcaption { font-size:13px; color:var(--muted); margin-top:6px; }
figcaption b { color:var(--ink); font-weight:600; }
.box { border:1px solid var(--line); border-radius:8px; padding:12px 16px; background:var(--bg); margin:10px 0; }
.box.bad { background:var(--fail-bg); border-color:#ffcecb; }
details summary { cursor:pointer; color:var(--accent); margin:8px 0; }
dl.kv { display:grid; grid-template-columns:max-content 1fr; gap:2px 16px; font-size:13.5px; margin:6px 0; }
dl.kv dt { color:var(--muted); } dl.kv dd { margin:0; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x if x is not None else ""))


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render_html(report: dict, run_dir: Path | str) -> str:
    run_dir = Path(run_dir)
    parts = [_header(report)]
    if report.get("compare"):
        parts.append(_compare(report["compare"]))
    parts.append(_problems(report))
    figs = defaultdict(list)
    for f in report.get("figures", []):
        figs[f.get("nodeid")].append(f)
    tests = {t["nodeid"]: t for t in report.get("tests", [])}
    shown_fig_tests: set[str] = set()
    rows_by_module = claim_rows(report)
    modules = list(rows_by_module) + [m for m in _fig_modules(report, tests) if m not in rows_by_module]
    for module in modules:
        parts.append(_module(report, module, rows_by_module.get(module, []), figs, tests, run_dir, shown_fig_tests))
    parts.append(_pass_rates(report))
    parts.append(_models(report))
    parts.append(_tests(report))
    parts.append(_footer(report))
    title = f"circuits · {report.get('run_id')}"
    body = "\n".join(p for p in parts if p)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head>\n<body><main>\n{body}\n</main></body></html>\n")


def _fig_modules(report: dict, tests: dict) -> list[str]:
    out = []
    for f in report.get("figures", []):
        m = tests.get(f.get("nodeid"), {}).get("module") or f.get("nodeid", "").split("::")[0]
        if m not in out:
            out.append(m)
    return out


def _header(report: dict) -> str:
    s = report.get("summary", {})
    g = report.get("git") or {}
    commit = (g.get("commit") or "no git")[:10] + (" · dirty" if g.get("dirty") else "")
    pills = []
    n, p = s.get("claims", 0), s.get("passed", 0)
    pills.append(f'<span class="pill {"pass" if s.get("failed", 0) == 0 else "fail"}">{p}/{n} claims passed</span>')
    if s.get("failed"):
        pills.append(f'<span class="pill fail">{s["failed"]} failed</span>')
    if s.get("xfailed"):
        pills.append(f'<span class="pill warn">{s["xfailed"]} refuted (xfail)</span>')
    if s.get("control_runs"):
        bad = s["control_runs"] - s.get("controls_ok", 0)
        pills.append(f'<span class="pill {"fail" if bad else "pass"}">controls {s.get("controls_ok", 0)}/'
                     f'{s["control_runs"]} ok</span>')
    t = s.get("tests", {})
    tb = t.get("failed", 0) + t.get("error", 0)
    pills.append(f'<span class="pill {"fail" if tb else ""}">{sum(t.values())} tests'
                 f'{f", {tb} failed/errored" if tb else ""}</span>')
    if report.get("interrupted"):
        pills.append('<span class="pill warn">interrupted: partial results</span>')
    m = report.get("machine", {})
    created = str(report.get("created") or "").replace("T", " ")
    sub = (f'{_e(created)} · {report.get("duration_s", 0):.1f} s · commit <code>{_e(commit)}</code> · '
           f'{_e(m.get("device"))} · python {_e(m.get("python"))} · torch {_e(m.get("torch"))}')
    opts = report.get("options") or {}
    extra = []
    if opts.get("seeds"):
        extra.append(f"seeds {', '.join(map(str, opts['seeds']))}")
    if opts.get("retrain"):
        extra.append("retrained")
    if extra:
        sub += " · " + _e(" · ".join(extra))
    return (f'<header><h1>circuits run <span class="mono" style="font-size:22px">{_e(report.get("run_id"))}</span>'
            f'</h1><div class="sub">{sub}</div><div class="pills">{"".join(pills)}</div></header>')


def _result(status: str) -> str:
    return f'<span class="res {status}">{status}</span>'


def _controls(c: dict) -> str:
    chips = []
    for x in c.get("controls", []):
        if x["outcome"] == "failed":
            cls, label = "ok", f'{_e(x["control"])}: fails ✓ <span class="muted">{_e(x.get("value_text"))}</span>'
        elif x["outcome"] == "held":
            cls, label = "bad", f'{_e(x["control"])}: also holds ✗ ({_e(x.get("value_text"))})'
        elif x["outcome"] == "skipped":
            cls, label = "muted", f'{_e(x["control"])}: skipped'
        else:
            cls, label = "bad", f'{_e(x["control"])}: error'
        chips.append(f'<span class="chip {cls}" title="{_e(x.get("message"))}">{label}</span>')
    return "".join(chips) or '<span class="muted">—</span>'


def _test_flag(c: dict) -> str:
    out = c.get("test_outcome")
    if out in ("failed", "error", "not finished", "interrupted") and c.get("passed"):
        return f'<span class="tfail" title="the test itself {_e(out)} after recording this claim">test {_e(out)}</span>'
    return ""


def _margin(c: dict) -> str:
    m = c.get("margin")
    if not isinstance(m, (int, float)):
        return '<td class="num muted">—</td>'
    return f'<td class="num {"ok" if m >= 0 else "bad"}">{_e(fmt_margin(m))}</td>'


def _module(report: dict, module: str, rows: list[dict], figs: dict, tests: dict, run_dir: Path,
            shown: set[str]) -> str:
    out = [f"<section><h2><code>{_e(module)}</code></h2>"]
    doc = (report.get("modules", {}).get(module, {}).get("doc") or "").strip()
    if doc:
        out.append(f'<p class="lead">{_e(doc)}</p>')
    if rows:
        out.append("<table><thead><tr><th>test</th><th>claim</th><th>measured</th><th>op</th><th>threshold</th>"
                   "<th style='text-align:right'>margin</th><th>result</th><th>controls</th></tr></thead><tbody>")
        for c in rows:
            op, thr = op_text(c)
            sub = " · ".join(_e(x) for x in (c.get("note"), c.get("detail"), c.get("problem")) if x)
            sub = f'<div class="note">{sub}</div>' if sub else ""
            out.append(
                f'<tr class="{"fail" if c["status"] == "FAIL" else ""}" title="{_e(c.get("message"))}">'
                f'<td class="sub tn">{_e(test_label(c))}{_test_flag(c)}</td>'
                f'<td><code>{_e(c["name"])}</code>{sub}</td>'
                f'<td class="m">{_e(measured_text(c))}</td><td class="m">{_e(op)}</td><td class="m">{_e(thr)}</td>'
                f'{_margin(c)}<td>{_result(c["status"])}</td><td>{_controls(c)}</td></tr>')
        out.append("</tbody></table>")
    # figures, grouped by test (main run, controls and seeds side by side)
    by_group: dict[str, list[tuple[dict, dict]]] = defaultdict(list)
    for nodeid, fs in figs.items():
        t = tests.get(nodeid, {})
        if (t.get("module") or nodeid.split("::")[0]) != module or nodeid in shown:
            continue
        shown.add(nodeid)
        for f in fs:
            by_group[t.get("group") or nodeid].append((t, f))
    for group, items in by_group.items():
        doc = next((t.get("doc") for t, _ in items if t.get("doc")), "")
        doc = f' <span class="sub">— {_e(doc)}</span>' if doc else ""
        out.append(f'<h3>{_e(group.split("::", 1)[-1])}{doc}</h3>')
        order = lambda tf: (tf[0].get("seed") if isinstance(tf[0].get("seed"), int) else -1,  # noqa: E731
                            tf[0].get("control") or "")
        main = sorted((tf for tf in items if not tf[0].get("control")), key=order)
        ctl = sorted((tf for tf in items if tf[0].get("control")), key=order)
        if main:
            out.append(_figure_grid(main, run_dir))
        if ctl:
            out.append(f'<details><summary>figures on controls ({len(ctl)})</summary>{_figure_grid(ctl, run_dir)}'
                       "</details>")
    out.append("</section>")
    return "\n".join(out)


def _figure_grid(items: list[tuple[dict, dict]], run_dir: Path) -> str:
    cells = []
    for t, f in items:
        png = _read(run_dir, f.get("path"))
        img = _img(png, f["name"]) if png else '<div class="muted">(figure file missing)</div>'
        variant = " · ".join(x for x in (f"control {t['control']}" if t.get("control") else "",
                                         f"seed {t['seed']}" if t.get("seed") is not None else "") if x)
        cap = f'<b>{_e(f["name"])}</b>' + (f' <span class="tag">{_e(variant)}</span>' if variant else "")
        cap += f" — {_e(f.get('caption'))}" if f.get("caption") else ""
        cells.append(f"<figure>{img}<figcaption>{cap}</figcaption></figure>")
    return f'<div class="grid">{"".join(cells)}</div>'


def _read(run_dir: Path, rel: str | None) -> bytes | None:
    if not rel:
        return None
    try:
        return (run_dir / rel).read_bytes()
    except OSError:
        return None


def _problems(report: dict) -> str:
    items = [f"<li>collection error in <code>{_e(e['nodeid'])}</code>: {_e(e.get('message'))}</li>"
             for e in report.get("collection_errors", [])]
    for r in report.get("control_runs", []):
        if r.get("outcome") != "ok":
            items.append(f"<li><code>{_e(r['nodeid'])}</code>: {_e(r.get('message'))}</li>")
    for t in problem_tests(report):
        items.append(f"<li><code>{_e(t['nodeid'])}</code> <b>{_e(t['outcome'])}</b>: {_e(t.get('message'))}</li>")
    if not items:
        return ""
    return f'<div class="box bad"><b>Problems</b><ul style="margin:6px 0 0">{"".join(items)}</ul></div>'


def _compare(cmp_: dict) -> str:
    a = cmp_["against"]
    n = cmp_["counts"]
    who = a.get("run_id") or a.get("path")
    out = [f"<section><h2>Compared with <code>{_e(who)}</code></h2>",
           f'<p class="sub">{n["matched"]} claims matched · <b class="{"bad" if n["to_fail"] else ""}">'
           f'{n["to_fail"]} now failing</b> · <b class="ok">{n["to_pass"]} now passing</b> · '
           f'{len(cmp_["added"])} new · {len(cmp_["removed"])} gone</p>']
    rows = compare_display_rows(cmp_, limit=15)
    if rows:
        out.append("<table><thead><tr><th>test</th><th>claim</th><th>before</th><th>after</th>"
                   "<th style='text-align:right'>margin moved</th></tr></thead><tbody>")
        for r in rows:
            flip = r["before"] != r["after"]
            cls = "fail" if flip and not r["after"] else ""
            b = f'{_result("PASS" if r["before"] else "FAIL")} <span class="m">{_e(r["value_before"])}</span>'
            af = f'{_result("PASS" if r["after"] else "FAIL")} <span class="m">{_e(r["value_after"])}</span>'
            d = r.get("delta")
            dcls = "" if not isinstance(d, (int, float)) else ("ok" if d >= 0 else "bad")
            out.append(f'<tr class="{cls}"><td class="sub nw">{_e(where(r))}</td>'
                       f'<td><code>{_e(r["name"])}</code>{" <b>⇄ flipped</b>" if flip else ""}</td>'
                       f'<td>{b}</td><td>{af}</td><td class="num {dcls}">{_e(fmt_margin(d))}</td></tr>')
        out.append("</tbody></table>")
    else:
        out.append('<p class="sub">No claim flipped and no margin moved.</p>')
    out.append("</section>")
    return "\n".join(out)


def _pass_rates(report: dict) -> str:
    rates = [r for r in report.get("pass_rates", []) if r["n"] > 1]
    if not rates:
        return ""
    out = ["<section><h2>Pass rate across seeds</h2><table><thead><tr><th>test</th><th>claim</th>"
           "<th>seeds</th><th style='text-align:right'>rate</th></tr></thead><tbody>"]
    for r in rates:
        seeds = "".join(f'<span class="chip {"ok" if ok else "bad"}" title="{_seed_title(ok)}">seed {_e(s)}'
                        f'{"" if ok is not None else " (not reached)"}</span>' for s, ok in r["seeds"].items())
        out.append(f'<tr><td class="sub">{_e(r["group"].split("::", 1)[-1])}</td><td><code>{_e(r["name"])}</code></td>'
                   f'<td>{seeds}</td><td class="num {"ok" if r["rate"] == 1 else "bad"}">{r["passed"]}/{r["n"]} '
                   f'({r["rate"]:.0%})</td></tr>')
    out.append("</tbody></table></section>")
    return "\n".join(out)


def _seed_title(ok: bool | None) -> str:
    return "passed" if ok else ("failed" if ok is False else "the test failed before reaching this claim")


def _models(report: dict) -> str:
    models = report.get("models", [])
    if not models:
        return ""
    from .figures import training_curves_svg

    out = ["<section><h2>Models</h2><table><thead><tr><th>model</th><th>seed</th><th>source</th><th>key</th>"
           "<th>final metrics</th><th style='text-align:right'>time</th></tr></thead><tbody>"]
    curves = []
    for m in models:
        metrics = {k: v for k, v in (m.get("metrics") or {}).items() if k != "history" and not isinstance(v, (dict, list))}
        mtext = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in list(metrics.items())[:6])
        key = (m.get("content_hash") or m.get("key") or "")[:12]
        wt = m.get("wall_time")
        out.append(f'<tr><td><code>{_e(m.get("name"))}</code></td><td>{_e(m.get("seed"))}</td>'
                   f'<td>{_e(m.get("source"))}</td><td class="m">{_e(key)}</td><td class="sub">{_e(mtext)}</td>'
                   f'<td class="num">{f"{wt:.1f} s" if isinstance(wt, (int, float)) else "—"}</td></tr>')
        try:
            svg = training_curves_svg(m)
        except Exception:  # a malformed history must not cost the report
            svg = None
        if svg:
            curves.append(f'<figure>{svg}'
                          f'<figcaption><b>{_e(m.get("name"))}</b> training curve ({_e(m.get("source"))})'
                          f'</figcaption></figure>')
    out.append("</tbody></table>")
    if curves:
        out.append(f'<h3>Training curves</h3><div class="grid">{"".join(curves)}</div>')
    out.append("</section>")
    return "\n".join(out)


def _tests(report: dict) -> str:
    tests = report.get("tests", [])
    if not tests:
        return ""
    cls = {"passed": "ok", "failed": "bad", "error": "bad", "xpassed": "bad", "not finished": "bad", "interrupted": "bad"}
    out = [f"<section><h2>Tests</h2><details><summary>{len(tests)} tests, "
           f"{sum(t.get('duration') or 0 for t in tests):.1f} s in total</summary>"
           "<table><thead><tr><th>test</th><th>outcome</th><th style='text-align:right'>duration</th><th>message</th>"
           "</tr></thead><tbody>"]
    for t in sorted(tests, key=lambda t: t["nodeid"]):
        out.append(f'<tr><td class="m">{_e(t["nodeid"])}</td><td class="{cls.get(t["outcome"], "muted")}">'
                   f'{_e(t["outcome"])}</td><td class="num">{(t.get("duration") or 0):.2f} s</td>'
                   f'<td class="sub">{_e(t.get("message") or t.get("xfail_reason") or "")}</td></tr>')
    out.append("</tbody></table></details></section>")
    return "\n".join(out)


def _footer(report: dict) -> str:
    m = report.get("machine", {})
    g = report.get("git") or {}
    cmd = " ".join((report.get("command") or {}).get("args") or [])
    kv = [("run", report.get("run_id")), ("summary", headline(report)), ("commit", g.get("commit") or "no git"),
          ("branch", g.get("branch")), ("command", f"pytest {cmd}"), ("platform", m.get("platform")),
          ("cpus", f'{m.get("cpus_usable")} usable of {m.get("cpu_count")}'),
          ("versions", f'python {m.get("python")}, torch {m.get("torch")}, numpy {m.get("numpy")}, '
                       f'pytest {m.get("pytest")}, circuits {m.get("circuits")}'),
          ("exit status", report.get("exitstatus"))]
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in kv if v is not None)
    return f'<section><h2>Run</h2><dl class="kv">{rows}</dl></section>'
