"""Compare two runs: claims that flipped, margins that moved beyond a noise floor, what is new or gone.

A margin "moved" only when ``|Δ| > ABS_TOL`` and ``|Δ| > REL_TOL * scale`` (scale: the larger of the
two measured values, or of the two margins when there is no value): recomputing the same claim on the
same weights differs in the last float bits (a margin moving by 6e-10 is not news). When the current
run is a subset of the previous one (``pytest hypotheses/test_x.py --circuits-compare baseline``), claims of
tests that did not run are counted as "not run in this run", never as gone.
"""

from __future__ import annotations

from typing import Any

from circuits.records import (ClaimBrief, ClaimResult, CompareCounts, CompareRow, Comparison, NoiseFloor, Run, RunRef,
                       as_run)

__all__ = ["ABS_TOL", "REL_TOL", "NOISE_FLOOR_TEXT", "compare_reports", "compare_display_rows", "moved_beyond_noise"]

ABS_TOL = 1e-6
REL_TOL = 1e-4
NOISE_FLOOR_TEXT = f"a margin counts as moved when |Δ| > {ABS_TOL:g} and > {REL_TOL:g} × |value|"


def _ckey(c: ClaimResult) -> tuple:
    return (c.group or c.nodeid, c.control, c.seed, c.name)


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


def _ran(report: Run, had_tests: bool) -> set[tuple]:
    """(group, control, seed) of every test that ran (reached a verdict) in ``report``."""
    if not had_tests:  # a hand-made or old report: what recorded claims is what ran
        return {_ckey(c)[:3] for c in report.claims}
    return {(t.group or t.nodeid, t.control, t.seed) for t in report.tests
            if t.outcome not in (None, "skipped", "not finished")}


def compare_reports(current: Any, previous: Any) -> Comparison:
    """Claims that flipped pass<->fail, how far each margin moved, claims added / removed / not run
    (``current`` / ``previous``: :class:`~circuits.records.Run` or report.json dicts)."""
    had_tests = not isinstance(current, dict) or "tests" in current
    current, previous = as_run(current), as_run(previous)
    cur = {_ckey(c): c for c in current.claims}
    prev = {_ckey(c): c for c in previous.claims}
    moved: list[CompareRow] = []
    for k in cur.keys() & prev.keys():
        a, b = prev[k], cur[k]
        delta = (b.margin - a.margin) if _num(a.margin) and _num(b.margin) else None
        moved.append(CompareRow(group=k[0], control=k[1], seed=k[2], name=k[3], module=b.module,
                                before=bool(a.passed), after=bool(b.passed), value_before=a.value_text,
                                value_after=b.value_text, margin_before=a.margin, margin_after=b.margin, delta=delta,
                                moved=moved_beyond_noise(delta, (a.value, b.value), (a.margin, b.margin))))
    moved.sort(key=lambda r: -abs(r.delta) if r.delta is not None else 0.0)
    flipped = sorted((r for r in moved if r.flipped), key=lambda r: (r.after, r.group, r.name))
    brief = lambda c: ClaimBrief(group=c.group, control=c.control, seed=c.seed, name=c.name,  # noqa: E731
                                 passed=bool(c.passed), value_text=c.value_text)
    ran = _ran(current, had_tests)
    missing = sorted(prev.keys() - cur.keys(), key=str)
    removed = [k for k in missing if k[:3] in ran]  # the test ran, but no longer records this claim
    not_run = [k for k in missing if k[:3] not in ran]
    reference = None
    if any(c.seed is not None and not c.control for c in cur.values()):
        # a seeds run against a reference run: the reference value of each claim, for the robustness view
        reference = [ClaimBrief(group=c.group, control=c.control, seed=c.seed, name=c.name, passed=bool(c.passed),
                                value_text=c.value_text, margin=c.margin, status=c.status)
                     for k, c in prev.items() if k[1] is None and k[2] is None]
    return Comparison(
        against=RunRef(run_id=previous.run_id, path=previous.path, created=previous.created, git=previous.git),
        noise_floor=NoiseFloor(abs=ABS_TOL, rel=REL_TOL, text=NOISE_FLOOR_TEXT),
        flipped=flipped, moved=moved,
        added=[brief(cur[k]) for k in sorted(cur.keys() - prev.keys(), key=str)],
        removed=[brief(prev[k]) for k in removed],
        counts=CompareCounts(matched=len(moved), flipped=len(flipped), to_fail=sum(not r.after for r in flipped),
                             to_pass=sum(r.after for r in flipped), moved=sum(r.moved and not r.flipped for r in moved),
                             not_run=len(not_run)),
        reference=reference)


def compare_display_rows(cmp_: Any, limit: int = 10) -> list[CompareRow]:
    """What to show of a comparison: every flip, then the main-run claims whose margin moved most."""
    cmp_ = Comparison.from_json(cmp_)
    moved = [r for r in cmp_.moved if not r.flipped and not r.control and r.moved
             and isinstance(r.delta, (int, float)) and abs(r.delta) > ABS_TOL]
    return cmp_.flipped + moved[:limit]
