"""Compare two runs: claims that flipped, margins that moved beyond a noise floor, what is new or gone.

A margin "moved" only when ``|Δ| > ABS_TOL`` and ``|Δ| > REL_TOL * scale`` (scale: the larger of the
two measured values, or of the two margins when there is no value): recomputing the same claim on the
same weights differs in the last float bits (a margin moving by 6e-10 is not news). When the current
run is a subset of the previous one (``pytest hypotheses/test_x.py --circuits-compare baseline``), claims of
tests that did not run are counted as "not run in this run", never as gone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ABS_TOL", "REL_TOL", "NOISE_FLOOR_TEXT", "compare_reports", "compare_display_rows", "moved_beyond_noise"]

ABS_TOL = 1e-6
REL_TOL = 1e-4
NOISE_FLOOR_TEXT = f"a margin counts as moved when |Δ| > {ABS_TOL:g} and > {REL_TOL:g} × |value|"


def _ckey(c: dict) -> tuple:
    return (c.get("group") or c.get("nodeid"), c.get("control"), c.get("seed"), c.get("name"))


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def moved_beyond_noise(delta: Any, values: tuple = (), margins: tuple = ()) -> bool:
    """Whether a margin change is above the noise floor (see the module docstring)."""
    if not _num(delta):
        return False
    scale = max((abs(v) for v in values if _num(v)), default=None)
    if scale is None:
        scale = max((abs(m) for m in margins if _num(m)), default=0.0)
    return abs(delta) > ABS_TOL and abs(delta) > REL_TOL * scale


def _ran(report: dict) -> set[tuple]:
    """(group, control, seed) of every test that ran (reached a verdict) in ``report``."""
    tests = report.get("tests")
    if tests is None:  # a hand-made or old report: what recorded claims is what ran
        return {_ckey(c)[:3] for c in report.get("claims", [])}
    return {(t.get("group") or t.get("nodeid"), t.get("control"), t.get("seed")) for t in tests
            if t.get("outcome") not in (None, "skipped", "not finished")}


def compare_reports(current: dict, previous: dict) -> dict:
    """Claims that flipped pass<->fail, how far each margin moved, claims added / removed / not run."""
    cur = {_ckey(c): c for c in current.get("claims", [])}
    prev = {_ckey(c): c for c in previous.get("claims", [])}
    moved, flipped = [], []
    for k in cur.keys() & prev.keys():
        a, b = prev[k], cur[k]
        ma, mb = a.get("margin"), b.get("margin")
        delta = (mb - ma) if _num(ma) and _num(mb) else None
        row = {"group": k[0], "control": k[1], "seed": k[2], "name": k[3], "module": b.get("module"),
               "before": bool(a.get("passed")), "after": bool(b.get("passed")),
               "value_before": a.get("value_text"), "value_after": b.get("value_text"),
               "margin_before": ma, "margin_after": mb, "delta": delta,
               "moved": moved_beyond_noise(delta, (a.get("value"), b.get("value")), (ma, mb))}
        moved.append(row)
        if row["before"] != row["after"]:
            flipped.append(row)
    moved.sort(key=lambda r: -abs(r["delta"]) if r["delta"] is not None else 0.0)
    flipped.sort(key=lambda r: (r["after"], r["group"], r["name"]))
    brief = lambda c: {"group": c.get("group"), "control": c.get("control"), "seed": c.get("seed"),  # noqa: E731
                       "name": c.get("name"), "passed": bool(c.get("passed")), "value_text": c.get("value_text")}
    ran = _ran(current)
    missing = sorted(prev.keys() - cur.keys(), key=str)
    removed = [k for k in missing if k[:3] in ran]  # the test ran, but no longer records this claim
    not_run = [k for k in missing if k[:3] not in ran]
    out = {
        "against": {"run_id": previous.get("run_id"), "path": previous.get("_path"),
                    "created": previous.get("created"), "git": previous.get("git")},
        "noise_floor": {"abs": ABS_TOL, "rel": REL_TOL, "text": NOISE_FLOOR_TEXT},
        "flipped": flipped,
        "moved": moved,
        "added": [brief(cur[k]) for k in sorted(cur.keys() - prev.keys(), key=str)],
        "removed": [brief(prev[k]) for k in removed],
        "counts": {"matched": len(moved), "flipped": len(flipped),
                   "to_fail": sum(not r["after"] for r in flipped), "to_pass": sum(r["after"] for r in flipped),
                   "moved": sum(r["moved"] and r["before"] == r["after"] for r in moved),
                   "not_run": len(not_run)},
    }
    if any(c.get("seed") is not None and not c.get("control") for c in cur.values()):
        # a seeds run against a reference run: the reference value of each claim, for the robustness view
        out["reference"] = [{**brief(c), "margin": c.get("margin"), "status": c.get("status")}
                            for k, c in prev.items() if k[1] is None and k[2] is None]
    return out


def compare_display_rows(cmp_: dict, limit: int = 10) -> list[dict]:
    """What to show of a comparison: every flip, then the main-run claims whose margin moved most."""
    moved = [r for r in cmp_["moved"] if r["before"] == r["after"] and not r.get("control")
             and r.get("moved", True) and isinstance(r.get("delta"), (int, float)) and abs(r["delta"]) > ABS_TOL]
    return cmp_["flipped"] + moved[:limit]
