"""What the three outputs show, as data: per-module roll-up, claims grouped by test, each control's
value, the power matrix, the per-claim robustness view across seeds, the model metrics in reading
order, the one-line summary. Markdown, HTML and terminal only format these, so they cannot disagree.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

from circuits.claims.core import format_numbers
from circuits.report.collect import GENERIC_CONTROLS, OUTCOME_KINDS, control_kind, outcome_counts, problem_tests, run_errors
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


CONTROL_MARKS = {"failed": "✓", "held": "✗ held", "missing": "! error", "error": "! error", "skipped": "– skipped"}


def control_text(x: dict) -> str:
    """One control of a claim: ``untrained ✓ 2716 (needs >= 5000, margin −2284)``."""
    known = x["outcome"] == "held" and x.get("known")
    mark = "✗ held (known)" if known else CONTROL_MARKS.get(x["outcome"], x["outcome"])
    text = f"{x['control']} {mark}"
    if x.get("value_text"):
        text += f" {x['value_text']}"
        if x.get("requirement") and x.get("op") != "holds":
            text += f" (needs {x['requirement']}, margin {fmt_margin(x.get('margin'))})"
    return text


def binding_text(c: dict) -> str:
    """A claim's binding (which component a role resolved to), where the claim records one."""
    b = c.get("binding")
    for holder in ("extra", "details"):
        if b is None and isinstance(c.get(holder), dict):
            b = c[holder].get("binding")
    if not b:
        return ""
    if isinstance(b, dict):
        return ", ".join(f"{k}={v}" for k, v in b.items())
    return str(b)


# --- grouping ----------------------------------------------------------------------------------------------


def claim_rows(report: dict) -> dict[str, list[dict]]:
    """Main-run claims grouped by module, in report order."""
    mods: dict[str, list[dict]] = defaultdict(list)
    for c in report.get("claims", []):
        if not c.get("control"):
            mods[c.get("module") or "?"].append(c)
    return dict(mods)


def where(r: dict) -> str:
    """``test_acc[x] (seed 1) on control untrained``: a claim's place, for messages and tables."""
    text = (r.get("group") or r.get("nodeid") or "").split("::", 1)[-1]
    if r.get("seed") is not None:
        text += f" (seed {r['seed']})"
    if r.get("control"):
        text += f" on control {r['control']}"
    return text


def test_label(c: dict) -> str:
    """The test part of a nodeid (after the module path), with the seed if any."""
    return where({**c, "control": None})


def anchor(text: str) -> str:
    """An HTML id for a module or test."""
    return "m-" + re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")


def modules_in_order(report: dict) -> list[str]:
    """Modules with claims first (report order), then modules that only drew figures."""
    mods = list(claim_rows(report))
    tests = {t["nodeid"]: t for t in report.get("tests", [])}
    for f in report.get("figures", []):
        m = tests.get(f.get("nodeid"), {}).get("module") or (f.get("nodeid") or "").split("::")[0]
        if m not in mods:
            mods.append(m)
    return mods


def test_function(group: str) -> str:
    """``m.py::test_sweep[3]`` -> ``m.py::test_sweep``: parametrized cases share one heading."""
    return group.split("[", 1)[0] if group.endswith("]") else group


def case_label(group: str) -> str:
    """The parametrization of a test group (``3`` for ``test_sweep[3]``), or ""."""
    return group[group.index("[") + 1:-1] if group.endswith("]") and "[" in group else ""


def test_groups(report: dict, module: str) -> list[dict]:
    """The module's test functions in order (parametrized cases together), each with its main-run
    claims and the figures its cases drew (main runs first, controls last)."""
    tests = {t["nodeid"]: t for t in report.get("tests", [])}
    groups: dict[str, dict] = {}

    def group(key: str, t: dict) -> dict:
        fn = test_function(key)
        if fn not in groups:
            groups[fn] = {"group": fn, "doc": "", "claims": [], "figures": [], "anchor": anchor(fn)}
        if t.get("doc") and not groups[fn]["doc"]:
            groups[fn]["doc"] = t["doc"]
        return groups[fn]

    for c in claim_rows(report).get(module, []):
        group(c.get("group") or c["nodeid"], tests.get(c["nodeid"], {}))["claims"].append(c)
    for f in report.get("figures", []):
        t = tests.get(f.get("nodeid"), {})
        if (t.get("module") or (f.get("nodeid") or "").split("::")[0]) != module:
            continue
        group(t.get("group") or f.get("nodeid"), t)["figures"].append((t, f))
    order = lambda tf: (tf[0].get("control") is not None,  # noqa: E731
                        tf[0].get("seed") if isinstance(tf[0].get("seed"), int) else -1, tf[0].get("control") or "")
    for g in groups.values():
        g["figures"].sort(key=order)
    return list(groups.values())


def unexpected_control_runs(report: dict) -> list[dict]:
    """Control / mutation runs whose claims held (no teeth, no power) or that errored, other than those
    the module's KNOWN_FAILURES documents."""
    return [r for r in report.get("control_runs", []) if r.get("outcome") != "ok" and not r.get("known")]


def problem_lines(report: dict) -> list[dict]:
    """Everything a reader must look at, one line each: {"kind" (a label), "nodeid", "message"}:
    errors by kind (collection, fixture, never-applied control, NaN/inf value, crash), failed claims,
    then control / mutation runs whose claims held (no teeth / no power) that no KNOWN_FAILURES documents."""
    out = [{"kind": e["label"], "nodeid": e["nodeid"], "message": e.get("message")} for e in run_errors(report)]
    for c in report.get("claims", []):
        if not c.get("control") and c.get("status") == "FAIL":
            out.append({"kind": "failed claim", "nodeid": c.get("nodeid"), "message": c.get("message")})
    for r in unexpected_control_runs(report):
        if r.get("outcome") != "error":
            out.append({"kind": r.get("outcome", "").replace("_", " "), "nodeid": r.get("nodeid"),
                        "message": r.get("message")})
    return out


def not_run_groups(report: dict) -> list[dict]:
    """Tests deselected at collection, by why: {"reason", "option" (what runs them), "n", "nodeids"}."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for r in report.get("not_run") or []:
        groups[(r.get("reason") or "", r.get("option") or "")].append(r.get("nodeid") or "")
    return [{"reason": reason, "option": option, "n": len(ids), "nodeids": ids}
            for (reason, option), ids in groups.items()]


def not_run_text(report: dict) -> str:
    """``not run: 35 full-sweep grid tests (run with --circuits-full-sweep), ...`` or ""."""
    groups = not_run_groups(report)
    if not groups:
        return ""
    return "not run: " + ", ".join(f"{g['n']} {g['reason']} (run with {g['option']})" for g in groups)


def known_control_runs(report: dict) -> list[dict]:
    """Control / mutation runs whose claims held, as the module's KNOWN_FAILURES says (with its reason)."""
    return [r for r in report.get("control_runs", []) if r.get("outcome") != "ok" and r.get("known")]


# --- summaries ---------------------------------------------------------------------------------------------


def summary_counts(report: dict) -> dict[str, int]:
    """The one-line summary's numbers: one per OUTCOME_KINDS key, ``known_<key>`` for control runs the
    modules' KNOWN_FAILURES document, and the flags ``generic_only`` / ``no_controls``."""
    s = report.get("summary", {})
    counts, known = outcome_counts(report)
    out = dict(counts)
    out.update({f"known_{k}": v for k, v in known.items()})
    out.update(generic_only=s.get("generic_only", 0), no_controls=s.get("no_controls", 0),
               claims=s.get("claims", 0), tests=sum(s.get("tests", {}).values()))
    return out


def outcome_items(report: dict) -> list[dict]:
    """The summary's counts in OUTCOME_KINDS order: {"key", "label", "n", "known", "problem", "text"}."""
    n = summary_counts(report)
    items = []
    for key, label, problem in OUTCOME_KINDS:
        known = n.get(f"known_{key}", 0)
        text = f"{n.get(key, 0)} {label}" + (f" (+{known} known)" if known else "")
        items.append({"key": key, "label": label, "n": n.get(key, 0), "known": known, "problem": problem,
                      "text": text})
    return items


def has_problems(report: dict) -> bool:
    """Whether any outcome counted as a problem is non-zero (the summary is red then)."""
    return any(i["problem"] and i["n"] for i in outcome_items(report))


def one_line_summary(report: dict) -> str:
    """``circuits: 143 claims held, 26 known failures, 0 failed claims, 0 no-teeth (+7 known), 0 no-power,
    0 errors — report: PATH``: every OUTCOME_KINDS count, never folded into another."""
    n = summary_counts(report)
    text = "circuits: " + ", ".join(i["text"] for i in outcome_items(report))
    if n["generic_only"]:
        text += f", {n['generic_only']} with generic controls only"
    if n["no_controls"]:
        text += f", {n['no_controls']} without controls"
    if report.get("interrupted"):
        text += " (interrupted: partial)"
    if report.get("_html_path"):
        text += f" — report: {report['_html_path']}"
    return text


def headline(report: dict) -> str:
    s = report.get("summary", {})
    parts = [f"{s.get('passed', 0)}/{s.get('claims', 0)} claims passed"]
    if s.get("failed"):
        parts.append(f"{s['failed']} failed")
    if s.get("xfailed"):
        parts.append(f"{s['xfailed']} known failures")
    if s.get("control_runs"):
        parts.append(f"controls {s.get('controls_ok', 0)}/{s['control_runs']} ok")
        if s.get("controls_no_teeth"):
            parts.append(f"{s['controls_no_teeth']} without teeth")
        if s.get("controls_no_power"):
            parts.append(f"{s['controls_no_power']} without power")
        if s.get("controls_unspecific"):
            parts.append(f"{s['controls_unspecific']} unspecific")
        if s.get("controls_known"):
            parts.append(f"{s['controls_known']} known to pass (documented)")
    if s.get("generic_only"):
        parts.append(f"{s['generic_only']} with generic controls only")
    t = s.get("tests", {})
    bad = t.get("failed", 0) + t.get("error", 0)
    parts.append(f"{sum(t.values())} tests" + (f" ({bad} failed/errored)" if bad else ""))
    return ", ".join(parts)


def module_rollup(report: dict) -> list[dict]:
    """One row per hypotheses module (system): claim counts, control cells, figures, time."""
    rows = []
    by_mod = claim_rows(report)
    tests = report.get("tests", [])
    errors = run_errors(report)
    for module in modules_in_order(report):
        cs = by_mod.get(module, [])
        cells = [x for c in cs for x in c.get("controls", [])]
        mod_tests = [t for t in tests if t.get("module") == module]
        mod_ids = {t["nodeid"] for t in mod_tests}
        doc = (report.get("modules", {}).get(module, {}).get("doc") or "").strip()
        rows.append({
            "module": module, "anchor": anchor(module), "doc": doc.split("\n\n")[0].replace("\n", " "),
            "claims": len(cs), "held": sum(c["status"] == "PASS" for c in cs),
            "known": sum(c["status"] == "XFAIL" for c in cs), "failed": sum(c["status"] == "FAIL" for c in cs),
            "errors": sum(e["nodeid"] in mod_ids or (e["nodeid"] or "").split("::")[0] == module for e in errors),
            "controls_failed": sum(x["outcome"] == "failed" for x in cells),
            # a documented known miss is counted (and coloured) as known, not as a problem
            "controls_held": sum(x["outcome"] == "held" and not x.get("known") for x in cells),
            "controls_known": sum(x["outcome"] == "held" and bool(x.get("known")) for x in cells),
            "controls_total": sum(x["outcome"] in ("failed", "held", "missing", "error") for x in cells),
            "generic_only": sum(bool(c.get("generic_only")) for c in cs),
            "no_controls": sum(bool(c.get("no_controls")) for c in cs),
            "figures": sum(1 for f in report.get("figures", [])
                           if (f.get("nodeid") or "").split("::")[0] == module),
            "duration": sum(t.get("duration") or 0.0 for t in mod_tests),
        })
    return rows


# --- power matrix ------------------------------------------------------------------------------------------


def power_matrix(report: dict, module: str) -> dict | None:
    """Claims x every control / mutation spec that ran in ``module``.

    ``columns``: [(spec, kind)] with kind "control" or "mutation" (controls first); ``rows``: one per
    main-run claim that has any control, with ``cells`` {spec: the claim's control entry}. A cell failed
    as required is the claim's power; one that held is "no teeth" (a control) or "no power" (a mutation).
    """
    runs = {r["nodeid"]: r for r in report.get("control_runs", [])}
    specs: dict[str, str] = {}
    for t in report.get("tests", []):
        if t.get("module") == module and t.get("control"):
            specs.setdefault(t["control"], control_kind(t["control"], runs.get(t["nodeid"])))
    specs = {k: v for k, v in specs.items() if v != "alternative"}  # those have their own view: specificity()
    if not specs:
        return None
    columns = sorted(specs.items(), key=lambda kv: (kv[1] == "mutation", kv[0] not in GENERIC_CONTROLS, kv[0]))
    rows = []
    for c in claim_rows(report).get(module, []):
        cells = {x["control"]: x for x in c.get("controls", []) if x.get("kind") != "alternative"}
        if cells:
            rows.append({"claim": c, "cells": cells})
    return {"columns": columns, "rows": rows}


def cell_verdict(x: dict | None) -> tuple[str, str]:
    """(css class, short verdict) of one power-matrix cell."""
    if x is None:
        return "na", ""
    if x["outcome"] == "failed":
        return "ok", "fails ✓"
    if x["outcome"] == "held":
        if x.get("known"):  # documented in the module's KNOWN_FAILURES: known, not a new problem
            return "known", "known"
        return "bad", {"mutation": "no power", "alternative": "unspecific"}.get(x.get("kind"), "no teeth")
    if x["outcome"] == "skipped":
        return "muted", "skipped"
    return "bad", "error"


# --- specificity ---------------------------------------------------------------------------------------------


def specificity(report: dict, module: str | None = None) -> list[dict]:
    """Per main-run claim with specificity variants (the claim pointed at each alternative of the part
    it names): ``n`` alternatives that ran, ``held`` those on which the claim also holds (each with its
    value), ``best`` the alternative whose margin came closest to (or past) the requirement, and
    ``known`` (the module's KNOWN_FAILURES reason) where the claim is known to be unspecific."""
    runs = {r["nodeid"]: r for r in report.get("control_runs", [])}
    rows = []
    for mod, cs in claim_rows(report).items():
        if module is not None and mod != module:
            continue
        for c in cs:
            alts = [x for x in c.get("controls", []) if x.get("kind") == "alternative"
                    and x["outcome"] in ("held", "failed")]
            if not alts:
                continue
            held = [x for x in alts if x["outcome"] == "held"]
            scored = [x for x in alts if isinstance(x.get("margin"), (int, float))]
            best = max(scored, key=lambda x: x["margin"]) if scored else None
            known = next((runs.get(x["nodeid"], {}).get("known") for x in held
                          if runs.get(x["nodeid"], {}).get("known")), None)
            rows.append({"claim": c, "module": mod, "n": len(alts), "held": held, "best": best, "known": known})
    return rows


def specificity_text(row: dict) -> str:
    """``"0 of 5 alternatives also hold (best: rebind:count_head,L2H1 0.0065, margin -0.01)"``."""
    def name(x: dict) -> str:
        return x["control"].removeprefix("alt:")

    held = ", ".join(f"{name(x)} {x.get('value_text')}" for x in row["held"])
    text = f"{len(row['held'])} of {row['n']} alternatives also hold"
    if held:
        text += f": {held}"
    elif row["best"] is not None:
        b = row["best"]
        text += f" (closest: {name(b)} {b.get('value_text')}, margin {fmt_margin(b.get('margin'))})"
    if row["held"] and row.get("known"):
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


def held_out(metrics: dict | None, n_test: int | None) -> dict | None:
    """A model's held-out test accuracy with its Wilson 95% interval over the test set's size
    (issue 17: a 10k set cannot certify 99.9%, a 100k one can to about +-0.02%); None without both."""
    acc = (metrics or {}).get("test_acc")
    if not isinstance(acc, (int, float)) or not n_test:
        return None
    lo, hi = wilson_interval(int(round(acc * n_test)), int(n_test))
    return {"test_acc": float(acc), "n_test": int(n_test), "lo": lo, "hi": hi}


def held_out_text(h: dict | None) -> str:
    """``test_acc 99.965% [99.951%, 99.975%] on 100,000 fresh`` (empty without a test set)."""
    if not h:
        return ""
    return f"test_acc {h['test_acc']:.3%} [{h['lo']:.3%}, {h['hi']:.3%}] (Wilson 95%, {h['n_test']:,} held out)"


def robustness(report: dict) -> list[dict]:
    """Per claim across seeds: the reference, each seed (value, margin, binding, flip), the pass rate
    with a Wilson 95% interval. Empty unless some main-run claim carries a seed."""
    main = [c for c in report.get("claims", []) if not c.get("control")]
    if not any(c.get("seed") is not None for c in main):
        return []
    refs = {(r.get("group"), r.get("name")): {**r, "source": "compare"}
            for r in (report.get("compare") or {}).get("reference", [])}
    who = ((report.get("compare") or {}).get("against") or {}).get("run_id")
    for c in main:  # a reference run inside this report wins over the compared one
        if c.get("seed") is None:
            refs[(c["group"], c["name"])] = {**c, "source": "this run"}
    rates = {(r["group"], r["name"]): r for r in report.get("pass_rates", [])}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in main:
        if c.get("seed") is not None:
            groups[(c["group"], c["name"])].append(c)
    rows = []
    for (group, name), cs in groups.items():
        ref = refs.get((group, name))
        seeds = []
        for c in sorted(cs, key=lambda c: (str(type(c["seed"])), c["seed"])):
            flip = ref is not None and bool(ref.get("passed")) != bool(c.get("passed"))
            seeds.append({"seed": c["seed"], "reached": True, "passed": bool(c.get("passed")), "status": c["status"],
                          "value_text": measured_text(c), "margin": c.get("margin"), "binding": binding_text(c),
                          "flip": flip})
        rate = rates.get((group, name))
        for s, ok in (rate or {}).get("seeds", {}).items():
            if ok is None:  # the test ran on this seed but stopped before the claim
                seeds.append({"seed": s, "reached": False, "passed": False, "status": "NOT REACHED",
                              "value_text": "—", "margin": None, "binding": "", "flip": False})
        n, k = len(seeds), sum(s["passed"] for s in seeds)
        lo, hi = wilson_interval(k, n)
        rows.append({"group": group, "module": cs[0].get("module"), "name": name, "test": group.split("::", 1)[-1],
                     "reference": None if ref is None else {
                         "value_text": ref.get("value_text"), "passed": bool(ref.get("passed")),
                         "margin": ref.get("margin"), "status": ref.get("status"),
                         "source": ref["source"] if ref["source"] == "this run" else f"{who or 'compared run'}"},
                     "seeds": seeds, "n": n, "passed": k, "rate": k / n if n else 0.0, "lo": lo, "hi": hi,
                     "expected_failure": any(c["status"] == "XFAIL" for c in cs),
                     "flips": sum(s["flip"] for s in seeds)})
    return rows


def rate_text(r: dict) -> str:
    """``2/3 (67%) Wilson 95% [21%, 94%]``; a known failure says so."""
    text = f"{r['passed']}/{r['n']} ({r['rate']:.0%}) Wilson 95% [{r['lo']:.0%}, {r['hi']:.0%}]"
    if r.get("expected_failure"):
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


def ground_truth_matrix(report: dict) -> dict | None:
    """The confusion matrix of claims about models whose mechanism is known (Tracr-compiled: claim
    names "TRUE <type>: ..." / "FALSE <type> (<how>): ... is refuted", hypotheses/test_ground_truth.py),
    per claim type: {"types": {type: {"true_pass", "true_fail", "false_pass", "false_fail"}},
    "total": the same summed, "wrong": [names of wrong verdicts]}. A FALSE claim's record holds when
    the false claim failed, so its verdict "pass" is that record failing. None when no such claims ran."""
    types: dict[str, dict[str, int]] = {}
    wrong: list[str] = []
    for c in report.get("claims", []):
        m = GROUND_TRUTH_CLAIM.match(c.get("name") or "")
        if c.get("control") or not m:
            continue
        truth, kind = m.group(1).lower(), m.group(2)
        claim_passed = bool(c.get("passed")) if truth == "true" else not c.get("passed")
        cell = f"{truth}_{'pass' if claim_passed else 'fail'}"
        row = types.setdefault(kind, {"true_pass": 0, "true_fail": 0, "false_pass": 0, "false_fail": 0})
        row[cell] += 1
        if cell in ("true_fail", "false_pass"):
            wrong.append(c["name"])
    if not types:
        return None
    total = {k: sum(r[k] for r in types.values()) for k in ("true_pass", "true_fail", "false_pass", "false_fail")}
    return {"types": dict(sorted(types.items())), "total": total, "wrong": wrong}


def ground_truth_table(report: dict) -> list[str]:
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
