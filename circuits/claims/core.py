"""Claims: record a measured value against a requirement, then pass or fail.

:class:`Claims` is what the ``claim`` fixture returns. Every method builds a :class:`ClaimRecord`
and hands it to a sink (the plugin puts it on the test item, so it reaches the report even if the
test crashes later) *before* deciding whether to raise. Failure messages say what was measured,
what was required, and by how much it missed::

    L2H0.open_prop_r = 0.62, claim needs >= 0.90 (short by 0.28)

Values may be python numbers, numpy scalars, 0-d / 1-element torch tensors, or an
:class:`~circuits.claims.stats.Estimate` (a point estimate with a bootstrap interval, e.g. from
``claim.sample(...)`` or ``stats.spearman_ci``); a claim on an Estimate passes on the interval's
relevant bound (lower bound for ``at_least``, upper for ``at_most``, the whole interval for
``close_to`` / ``between``). NaN, inf and empty samples are failures; values of the wrong kind
(strings, None, arrays) raise :class:`ClaimValueError`.

Two kinds of "no number": a ``problem`` (a NaN / inf / empty value, an Estimate with ``problem``:
nothing usable was measured, so a control run recording one is an error) and an Estimate that is
``undefined`` on what was measured (``Estimate.undefined``: e.g. a loss recovered whose loss gap is
0, see :func:`circuits.analysis.measures.loss_recovered_ci`). The latter fails the claim as measured:
value "undefined", no ``problem``, the reason and the measured values in the message and in
``extra["undefined"]``.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from circuits.errors import CircuitsError
from circuits.records import ClaimRecord, Interval, jsonable, requirement_parts
from circuits.claims.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, Estimate, bootstrap_ci

__all__ = [
    "ClaimRecord",
    "Claims",
    "ClaimError",
    "ClaimFailure",
    "ClaimValueError",
    "ClaimDefinitionError",
    "DuplicateClaimError",
    "format_numbers",
]

OPS = ("at_least", "at_most", "close_to", "between", "holds")


class ClaimError(CircuitsError):
    """Base class for claims used wrongly (as opposed to claims that fail)."""


def _shown(message: str) -> str:
    """A failure message as pytest prints it: a claim name's escapes and bidi overrides made visible
    (`report.text.visible`; the record keeps the full text for report.json)."""
    from circuits.report.text import NAME_LIMIT, visible  # the leaf module; report's package is loaded by now

    return visible(message, 4 * NAME_LIMIT)


class ClaimFailure(AssertionError):
    """A claim that was measured and did not hold (the only failure a known failure may expect:
    any other exception inside a refuted claim is a crash, reported as an error)."""


class ClaimValueError(ClaimError, TypeError):
    """A claim was given a value of the wrong kind (a string, None, a multi-element array...)."""


class ClaimDefinitionError(ClaimError, ValueError):
    """A claim's requirement is malformed (a NaN threshold, lo > hi, no tolerance...)."""


class DuplicateClaimError(ClaimError, ValueError):
    """The same claim name was used twice in one test."""


# --- number formatting ---------------------------------------------------------------------------------


def _decimals(x: float, sig: int) -> int:
    """Decimals needed to show ``x`` rounded to ``sig`` significant digits, without trailing zeros."""
    if x == 0 or not math.isfinite(x):
        return 0
    text = f"{float(f'{x:.{sig}g}'):.12f}".rstrip("0")
    return len(text.split(".")[1]) if "." in text else 0


def format_numbers(measured: list[float], required: list[float], gaps: list[float] = ()) -> list[str]:
    """Format numbers of one message with a shared number of decimals.

    Measured values get 3 significant digits, requirements (typed by a person) as many as they have;
    decimals grow until the measured value and the requirement differ visibly and every non-zero gap
    shows as non-zero. Very large / small magnitudes use ``%.3g``. Returns strings in the order
    measured + required + gaps.
    """
    allv = [*measured, *required, *gaps]
    finite = [abs(v) for v in allv if v is not None and math.isfinite(v) and v != 0]
    if finite and (max(finite) >= 1e6 or max(finite) < 1e-3):
        return [_fmt_g(v) for v in allv]
    d = max([_decimals(v, 3) for v in measured] + [_decimals(v, 6) for v in required] + [0])
    d = min(d, 6)

    def clash(d: int) -> bool:
        for m in measured:
            for r in required:
                if _ok(m) and _ok(r) and m != r and f"{m:.{d}f}" == f"{r:.{d}f}":
                    return True
        return any(_ok(g) and g != 0 and float(f"{abs(g):.{d}f}") == 0 for g in gaps)

    while d < 10 and clash(d):
        d += 1
    return [f"{v:.{d}f}" if _ok(v) else _fmt_g(v) for v in allv]


def _ok(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _fmt_g(v: float | None) -> str:
    if v is None:
        return "None"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.3g}"


def fmt(v: float | None) -> str:
    """One number on its own (3 significant digits, or as typed)."""
    return format_numbers([v], [])[0] if _ok(v) else _fmt_g(v)


# --- the record ---------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Plain JSON types only (:func:`circuits.records.jsonable`; kept under this name for old imports)."""
    return jsonable(x)


# --- value coercion -----------------------------------------------------------------------------------


@dataclass
class _Value:
    point: float | None
    ci: Estimate | None = None
    problem: str | None = None  # a failure (NaN, inf, empty sample)
    wrong_kind: str | None = None  # a usage error (string, None, array)
    undefined: str | None = None  # a measured failure: the statistic is undefined on this sample (why)
    shown: str = ""  # how to show the value when it has a problem ("nan", "inf", "empty")


def _kind(value: Any) -> str:
    t = type(value)
    mod = t.__module__
    return t.__name__ if mod in ("builtins", None) else f"{mod.split('.')[0]}.{t.__name__}"


def coerce_value(value: Any) -> _Value:
    """Turn a measured value into a float (plus its interval), or say what is wrong with it."""
    if isinstance(value, Estimate):
        if value.undefined and not value.problem:
            return _Value(None, value, undefined=value.undefined, shown="undefined")
        if value.problem:
            return _Value(value.point if _ok(value.point) else None, value, problem=value.problem,
                          shown=_fmt_g(value.point) if value.n else "n/a")
        for what, v in (("point estimate", value.point), ("CI lower bound", value.lo), ("CI upper bound", value.hi)):
            if not _ok(v):
                return _Value(None, value, problem=f"{what} is {_fmt_g(v)}", shown=_fmt_g(value.point))
        return _Value(float(value.point), value)
    if isinstance(value, (bool, np.bool_)):
        return _Value(None, wrong_kind="a bool (use claim.holds for true/false claims)")
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        if value.numel() == 0:
            return _Value(None, problem="empty tensor", shown="n/a")
        if value.numel() > 1:
            return _Value(None, wrong_kind=f"a tensor of shape {tuple(value.shape)} (need one number)")
        if value.dtype == torch.bool or value.is_complex():
            return _Value(None, wrong_kind=f"a {value.dtype} tensor (need a real number)")
        value = value.detach().cpu().reshape(()).item()
    elif isinstance(value, np.ndarray):
        if value.size == 0:
            return _Value(None, problem="empty array", shown="n/a")
        if value.size > 1:
            return _Value(None, wrong_kind=f"an array of shape {value.shape} (need one number; "
                          "for a sample use claim.sample(...))")
        if value.dtype.kind not in "iuf":
            return _Value(None, wrong_kind=f"an array of dtype {value.dtype} (need a real number)")
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)):
        return _Value(None, wrong_kind="a bool (use claim.holds for true/false claims)")
    if not isinstance(value, numbers.Real):
        hint = " (for a sample use claim.sample(...))" if isinstance(value, (list, tuple)) else ""
        return _Value(None, wrong_kind=f"{'None' if value is None else 'a ' + _kind(value)}{hint}")
    v = float(value)
    if math.isnan(v):
        return _Value(None, problem="value is NaN", shown="nan")
    if math.isinf(v):
        return _Value(None, problem=f"value is {_fmt_g(v)}", shown=_fmt_g(v))
    return _Value(v)


def _number(x: Any, what: str) -> float:
    """A requirement number (threshold, tolerance): must be a finite real."""
    v = coerce_value(x)
    if v.wrong_kind or v.problem or v.ci is not None:
        why = v.wrong_kind or v.shown or "an Estimate"
        raise ClaimDefinitionError(f"{what} must be a finite number, got {why}")
    return v.point


# --- the fixture object -------------------------------------------------------------------------------


class Claims:
    """Records claims of one test. Returned by the ``claim`` fixture.

    ``sink(record)`` receives each record as soon as it is made. With ``raise_on_failure=False``
    (control runs) failing claims do not raise; the plugin decides the outcome after the test.
    Usage errors (wrong value kind, duplicate name, malformed requirement) always raise.
    """

    def __init__(
        self,
        sink: Callable[[ClaimRecord], None] | None = None,
        *,
        raise_on_failure: bool = True,
        control: str | None = None,
        seed: int | None = None,
        draws_seed: int = DEFAULT_SEED,
    ) -> None:
        self._sink = sink
        self.draws_seed = draws_seed  # the default seed of this test's bootstrap draws (--circuits-draws-seed)
        self.raise_on_failure = raise_on_failure
        self.control = control
        self.seed = seed
        self.records: list[ClaimRecord] = []

    # -- sample statistics --
    def sample(
        self,
        data: Any,
        statistic: Callable = np.mean,
        *,
        paired: bool = False,
        level: float = 0.95,
        method: str = "BCa",
        n_resamples: int = DEFAULT_RESAMPLES,
        seed: int | None = None,
        name: str | None = None,
    ) -> Estimate:
        """``statistic`` over a sample with a bootstrap CI; pass the result to any claim method.

        ``data`` is one sample, or a tuple of samples (``paired=True`` for row-aligned samples such
        as ``(x, y)`` with ``statistic=stats.spearman``). See :func:`circuits.claims.stats.bootstrap_ci`.
        The resampling seed defaults to the test's draws seed (``--circuits-draws-seed``); ``name``
        names the statistic in the record (default: its ``__name__``).
        """
        return bootstrap_ci(data, statistic, paired=paired, level=level, method=method,
                            n_resamples=n_resamples, seed=self.draws_seed if seed is None else seed, name=name)

    # -- claims --
    def at_least(self, name: str, value: Any, threshold: Any, *, units: str | None = None,
                 note: str | None = None) -> ClaimRecord:
        """``value >= threshold`` (on the CI lower bound if ``value`` has an interval)."""
        __tracebackhide__ = True
        t = _number(threshold, f"claim {name!r}: threshold")
        return self._decide(name, "at_least", value, units, note, threshold=t)

    def at_most(self, name: str, value: Any, threshold: Any, *, units: str | None = None,
                note: str | None = None) -> ClaimRecord:
        """``value <= threshold`` (on the CI upper bound if ``value`` has an interval)."""
        __tracebackhide__ = True
        t = _number(threshold, f"claim {name!r}: threshold")
        return self._decide(name, "at_most", value, units, note, threshold=t)

    def close_to(self, name: str, value: Any, target: Any, *, atol: Any = None, rtol: Any = None,
                 units: str | None = None, note: str | None = None) -> ClaimRecord:
        """``|value - target| <= atol + rtol * |target|`` (the whole CI must be inside, if any)."""
        __tracebackhide__ = True
        tgt = _number(target, f"claim {name!r}: target")
        if atol is None and rtol is None:
            raise ClaimDefinitionError(f"claim {name!r}: close_to needs a tolerance, atol= and/or rtol=")
        a = _number(0.0 if atol is None else atol, f"claim {name!r}: atol")
        r = _number(0.0 if rtol is None else rtol, f"claim {name!r}: rtol")
        if a < 0 or r < 0:
            raise ClaimDefinitionError(f"claim {name!r}: tolerances must be >= 0, got atol={a}, rtol={r}")
        return self._decide(name, "close_to", value, units, note, threshold=tgt, tolerance=a + r * abs(tgt))

    def between(self, name: str, value: Any, lo: Any, hi: Any, *, units: str | None = None,
                note: str | None = None) -> ClaimRecord:
        """``lo <= value <= hi`` (the whole CI must be inside, if any)."""
        __tracebackhide__ = True
        lo_, hi_ = _number(lo, f"claim {name!r}: lo"), _number(hi, f"claim {name!r}: hi")
        if lo_ > hi_:
            raise ClaimDefinitionError(f"claim {name!r}: between needs lo <= hi, got lo={lo_}, hi={hi_}")
        return self._decide(name, "between", value, units, note, lo=lo_, hi=hi_)

    def holds(self, name: str, condition: Any, *, detail: str | None = None, units: str | None = None,
              note: str | None = None) -> ClaimRecord:
        """A true/false fact. ``condition`` must be a bool (python, numpy, or a 1-element bool tensor)."""
        __tracebackhide__ = True
        self._check_name(name)
        ok, wrong = _as_bool(condition)
        rec = ClaimRecord(name=name, op="holds", value=None if ok is None else float(ok), passed=bool(ok),
                          message="", requirement="holds", op_symbol="holds", units=units, note=note, detail=detail,
                          control=self.control, seed=self.seed, value_text=str(ok))
        if wrong:
            rec.passed, rec.problem, rec.value_text = False, f"wrong kind: {wrong}", "?"
            rec.message = f"claim {name!r}: holds needs a bool, got {wrong}"
        else:
            rec.message = f"{name} holds" if ok else f"{name} does not hold"
            if detail:
                rec.message += f": {detail}"
        return self._emit(rec, wrong_kind=wrong is not None)

    # -- internals --
    def _check_name(self, name: Any) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ClaimDefinitionError(f"a claim name must be a non-empty string, got {name!r}")
        if any(r.name == name for r in self.records):
            raise DuplicateClaimError(
                f"claim name {name!r} is used twice in this test; give each claim its own name")

    def _decide(self, name: str, op: str, value: Any, units: str | None, note: str | None,
                **req: float) -> ClaimRecord:
        __tracebackhide__ = True
        self._check_name(name)
        v = coerce_value(value)
        rec = ClaimRecord(name=name, op=op, value=v.point, passed=False, message="", requirement="",
                          units=units, note=note, control=self.control, seed=self.seed, **req)
        rec.requirement = _requirement(rec, units)
        if v.ci is not None:
            rec.ci = Interval.from_json(v.ci.to_dict())
        if v.wrong_kind:
            rec.problem, rec.value_text = f"wrong kind: {v.wrong_kind}", "?"
            rec.message = (f"claim {name!r}: value is {v.wrong_kind}; a claim needs a real number "
                           "(python/numpy scalar, 0-d or 1-element tensor) or an Estimate")
            return self._emit(rec, wrong_kind=True)
        if v.undefined:
            rec.value_text = v.shown
            rec.extra["undefined"] = v.undefined
            rec.message = (f"{name} is undefined ({v.undefined}), claim needs {rec.requirement}: an undefined "
                           f"value meets no requirement")
            return self._emit(rec)
        if v.problem:
            rec.problem = v.problem
            rec.value_text = v.shown or "nan"
            rec.message = f"{name} = {rec.value_text}, claim needs {rec.requirement} ({v.problem}, so the claim cannot pass)"
            return self._emit(rec)
        _evaluate(rec, v.point, v.ci)
        return self._emit(rec)

    def _emit(self, rec: ClaimRecord, wrong_kind: bool = False) -> ClaimRecord:
        __tracebackhide__ = True
        self.records.append(rec)
        if self._sink is not None:
            self._sink(rec)
        if wrong_kind:
            raise ClaimValueError(_shown(rec.message))
        if not rec.passed and self.raise_on_failure:
            raise ClaimFailure(_shown(rec.message))
        return rec

    @property
    def failed(self) -> list[ClaimRecord]:
        return [r for r in self.records if not r.passed]

    @property
    def passed(self) -> list[ClaimRecord]:
        return [r for r in self.records if r.passed]


def _as_bool(x: Any) -> tuple[bool | None, str | None]:
    if isinstance(x, (bool, np.bool_)):
        return bool(x), None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        if x.numel() == 1 and x.dtype == torch.bool:
            return bool(x.item()), None
        return None, f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        if x.size == 1 and x.dtype == np.bool_:
            return bool(x.reshape(())), None
        return None, f"an array of dtype {x.dtype} and shape {x.shape}"
    return None, "None" if x is None else f"a {_kind(x)} ({x!r:.40})"


_REQ_FIELDS = {"at_least": ("threshold_text",), "at_most": ("threshold_text",),
               "close_to": ("threshold_text", "tolerance_text"), "between": ("lo_text", "hi_text")}


def _set_requirement(rec: ClaimRecord, numbers: list[str], units: str | None) -> str:
    """Fill the record's requirement columns (op_symbol, threshold_text: carried apart so that a report
    never splits the text) from the formatted requirement numbers; returns the text shown."""
    rec.op_symbol, rec.threshold_text = requirement_parts(rec.op, units=units,
                                                          **dict(zip(_REQ_FIELDS.get(rec.op, ()), numbers)))
    if rec.op_symbol == "holds":
        return "holds"
    return rec.threshold_text if rec.op == "close_to" else f"{rec.op_symbol} {rec.threshold_text}"


def _requirement(rec: ClaimRecord, units: str | None = None) -> str:
    """The requirement text of a claim whose value could not be measured (no value to align with)."""
    if rec.op in ("at_least", "at_most"):
        nums = [fmt(rec.threshold)]
    elif rec.op == "close_to":
        nums = format_numbers([], [rec.threshold, rec.tolerance])
    elif rec.op == "between":
        nums = format_numbers([], [rec.lo, rec.hi])
    else:
        nums = []
    return _set_requirement(rec, nums, units)


def _evaluate(rec: ClaimRecord, point: float, ci: Estimate | None) -> None:
    """Fill passed / margin / bound / message of a numeric claim with a usable value."""
    lo, hi = (ci.lo, ci.hi) if ci is not None else (point, point)
    u = f" {rec.units}" if rec.units else ""
    op = rec.op
    if op == "at_least":
        bound, margin = lo, lo - rec.threshold
    elif op == "at_most":
        bound, margin = hi, rec.threshold - hi
    elif op == "close_to":
        far = lo if abs(lo - rec.threshold) >= abs(hi - rec.threshold) else hi
        bound, margin = far, rec.tolerance - abs(far - rec.threshold)
    else:  # between
        m_lo, m_hi = lo - rec.lo, rec.hi - hi
        bound, margin = (lo, m_lo) if m_lo <= m_hi else (hi, m_hi)
    rec.bound, rec.margin, rec.passed = bound, margin, margin >= 0
    gap = abs(margin)

    # the numbers of the message, formatted with shared decimals
    req_nums = {"at_least": [rec.threshold], "at_most": [rec.threshold], "close_to": [rec.threshold, rec.tolerance],
                "between": [rec.lo, rec.hi]}[op]
    meas = [point] + ([lo, hi] if ci is not None else [])
    gaps = [gap] + ([abs(far - rec.threshold)] if op == "close_to" else [])
    s = format_numbers(meas, req_nums, gaps)
    p_s = s[0]
    req_s = s[len(meas): len(meas) + len(req_nums)]
    gap_s = s[len(meas) + len(req_nums):]
    rec.value_text = p_s
    need = rec.requirement = _set_requirement(rec, req_s, rec.units)
    shown = f"{p_s}{u}"
    if ci is not None:
        shown += f" [{ci.level:.0%} CI {s[1]}, {s[2]}]"
    if op == "at_least":
        where = " at the CI lower bound" if ci is not None else ""
        verdict = f"passes by {gap_s[0]}" if rec.passed else f"short by {gap_s[0]}"
    elif op == "at_most":
        where = " at the CI upper bound" if ci is not None else ""
        verdict = f"passes by {gap_s[0]}" if rec.passed else f"over by {gap_s[0]}"
    elif op == "close_to":
        where = " for the whole CI" if ci is not None else ""
        off = f"off by {gap_s[1]}" + (" at the CI's far end" if ci is not None else "")
        verdict = f"{off}, within tolerance by {gap_s[0]}" if rec.passed else f"{off}, {gap_s[0]} beyond tolerance"
    else:
        where = " for the whole CI" if ci is not None else ""
        side = "below the low end" if bound < rec.lo else "above the high end"
        verdict = f"inside by {gap_s[0]}" if rec.passed else f"{side} by {gap_s[0]}"
    rec.message = f"{rec.name} = {shown}, claim needs {need}{where} ({verdict})"
