"""The run's records, one schema: what the plugin writes, the report package and census read.

A leaf (imports nothing from circuits but :mod:`circuits.errors`, and no numpy): the pytest plugin
loads it at start-up. Every record goes to JSON through ``to_json()`` and comes back through
``from_json()``; the constants below (the main run's spec, the prefixes of derived runs, the generic
controls, the outcome kinds) are defined here once and imported everywhere else.

Records travel between processes (pytest-xdist workers -> controller) on ``item.user_properties``
as ``(PROP_*, record.to_json())`` pairs, because only plain JSON crosses that boundary; the collector
turns them back into records with ``from_json``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from circuits.errors import CircuitsError

__all__ = [
    "SCHEMA", "Record", "MAIN", "MUTATION_PREFIX", "ALTERNATIVE_PREFIX", "GENERIC_CONTROLS", "RunKind",
    "OUTCOME_KINDS", "ERROR_KINDS", "PROP_TEST", "PROP_CLAIM", "PROP_CONTROL", "PROP_MODEL", "PROP_FIGURE",
    "PROPS", "RecordError", "run_kind", "control_id", "spec_name", "is_generic", "jsonable",
    "requirement_parts", "Interval", "ClaimRecord", "TestMeta", "ControlValue", "ControlRun", "ModelInfo", "FigureRecord",
    "SeedVerdict", "CensusCell", "SeedAccuracy", "CensusRow", "TestResult", "ControlCell", "ClaimResult",
    "MachineInfo", "GitInfo", "RunSettings", "Command", "RunRef", "CompareCounts", "NoiseFloor", "CompareRow", "ClaimBrief",
    "Comparison", "ErrorLine", "PassRate", "NotRun", "CollectionError", "ModuleInfo", "Summary", "Run",
    "as_run",
]

# report.json's schema: 2 adds the claim's structured requirement (op_symbol, threshold_text) and the
# control run's ``spec_name``; a schema-1 report is upgraded when read (:func:`upgrade_report`).
SCHEMA = 2

MAIN = "main"  # the main run's control spec (a test's unmodified run)
MUTATION_PREFIX = "mutate:"  # a mutation derived from an `about` target: "mutate:zero_ablate:L1H0"
ALTERNATIVE_PREFIX = "alt:"  # a specificity variant: the claim pointed at another part of the named kind
# controls that break the whole model or the data, whatever the claim is about: they show a claim is
# not trivially true, never that it is about the part it names (issue 15)
GENERIC_CONTROLS = frozenset({"untrained", "shuffle_labels"})


class RunKind(str, enum.Enum):
    """What a non-main run of a test is: a hand-written control, a derived mutation, an alternative."""

    CONTROL = "control"
    MUTATION = "mutation"
    ALTERNATIVE = "alternative"

    def __str__(self) -> str:  # "mutation", in messages and f-strings alike
        return self.value

    __format__ = lambda self, spec: format(self.value, spec)  # noqa: E731

    @property
    def param(self) -> str:
        """The name of the run in a test id: ``[control=untrained]``, ``[mutation=...]``."""
        return self.value


def run_kind(spec: str) -> RunKind:
    """The kind of a control run's spec (``mutate:...`` a mutation, ``alt:...`` an alternative)."""
    if spec.startswith(MUTATION_PREFIX):
        return RunKind.MUTATION
    if spec.startswith(ALTERNATIVE_PREFIX):
        return RunKind.ALTERNATIVE
    return RunKind.CONTROL


def spec_name(spec: str) -> str:
    """A control run's spec without its kind's prefix: what it does (``zero_ablate:L1H0``)."""
    return spec.removeprefix(MUTATION_PREFIX).removeprefix(ALTERNATIVE_PREFIX)


def control_id(spec: str) -> str:
    """The parameter id of a run in its test's id: ``main``, ``control=X``, ``mutation=X``, ``alternative=X``."""
    return MAIN if spec == MAIN else f"{run_kind(spec).param}={spec_name(spec)}"


def is_generic(spec: str | None) -> bool:
    """Whether a control spec is a generic control (breaks the whole model or data)."""
    return (spec or "").split(":", 1)[0] in GENERIC_CONTROLS


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

# the user_properties keys records travel under
PROP_TEST, PROP_CLAIM, PROP_CONTROL = "circuits_test", "circuits_claim", "circuits_control"
PROP_MODEL, PROP_FIGURE = "circuits_model", "circuits_figure"
PROPS = (PROP_TEST, PROP_CLAIM, PROP_CONTROL, PROP_MODEL, PROP_FIGURE)


class RecordError(CircuitsError, ValueError):
    """A record that does not have its schema's shape (a hand-edited or foreign report)."""


def jsonable(x: Any) -> Any:
    """Plain JSON types only: non-finite floats become None, numpy scalars python ones (duck-typed:
    this module never imports numpy), records their ``to_json()``."""
    if isinstance(x, _Record):
        return x.to_json()
    if isinstance(x, enum.Enum):
        return jsonable(x.value)
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, bool) or type(x).__name__ == "bool_":
        return bool(x)
    if isinstance(x, numbers.Integral):
        return int(x)
    if isinstance(x, numbers.Real):
        return float(x) if math.isfinite(x) else None
    if x is None or isinstance(x, str):
        return x
    return str(x)


R = TypeVar("R", bound="_Record")


class _Record:
    """``to_json`` / ``from_json`` for a dataclass record: unknown keys are kept in ``extra`` where the
    record has one (a newer writer's fields survive a round trip), dropped otherwise. ``_NESTED`` names
    the fields holding records (a list of them, or a dict of them by key).

    ``record["field"]`` and ``record.get("field")`` read a field as the JSON dict did: for code outside
    the package written against report.json's dicts (a project's own scripts); the package itself
    reads attributes."""

    _EXTRA: ClassVar[bool] = False
    _NESTED: ClassVar[dict] = {}
    _JSON_NAMES: ClassVar[dict] = {}  # field -> its key in JSON, where they differ
    _NESTED_MAPS: ClassVar[frozenset] = frozenset()  # _NESTED fields that map keys to records

    def to_json(self) -> dict:
        out = {self._JSON_NAMES.get(f.name, f.name): jsonable(getattr(self, f.name))
               for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        if self._EXTRA:
            out.update(out.pop("extra") or {})
        return out

    def __getitem__(self, key: str) -> Any:
        if key in self._field_names():
            return getattr(self, key)
        if self._EXTRA and key in self.extra:  # type: ignore[attr-defined]
            return self.extra[key]  # type: ignore[attr-defined]
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: str) -> bool:
        try:
            self[key]
        except KeyError:
            return False
        return True

    @classmethod
    def _field_names(cls) -> frozenset:
        names = cls.__dict__.get("_names")  # per class (a subclass has its own): reports hold thousands
        if names is None:
            names = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            setattr(cls, "_names", names)
        return names

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        if isinstance(data, cls):
            return data
        if not isinstance(data, dict):
            raise RecordError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        names = cls._field_names()
        renamed = {v: k for k, v in cls._JSON_NAMES.items()}
        data = {renamed.get(k, k): v for k, v in data.items()}
        known = {k: v for k, v in data.items() if k in names and not (cls._EXTRA and k == "extra")}
        if cls._EXTRA:
            known["extra"] = {k: v for k, v in data.items() if k not in names}
        for name, rec in cls._NESTED.items():
            value = known.get(name)
            if isinstance(value, list):
                known[name] = [rec.from_json(v) for v in value]
            elif isinstance(value, dict) and name in cls._NESTED_MAPS:
                known[name] = {k: None if v is None else rec.from_json(v) for k, v in value.items()}
            elif isinstance(value, dict):
                known[name] = rec.from_json(value)
        try:
            return cls(**cls._upgrade(known))
        except TypeError as exc:  # a required field missing
            raise RecordError(f"a {cls.__name__} record {sorted(data)[:8]}: {exc}") from None

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        return fields


Record = _Record  # the base of every record (views define theirs on it)


def requirement_parts(op: str, threshold_text: str = "", tolerance_text: str = "", lo_text: str = "",
                      hi_text: str = "", units: str | None = None) -> tuple[str, str]:
    """(operator symbol, threshold text) of a claim: (">=", "0.9"), ("≈", "1.0 ± 0.1"), ("in", "[0.2, 0.8]"),
    ("holds", ""); the numbers come formatted by the caller (:mod:`circuits.claims.core`)."""
    u = f" {units}" if units else ""
    if op == "at_least":
        return ">=", f"{threshold_text}{u}"
    if op == "at_most":
        return "<=", f"{threshold_text}{u}"
    if op == "close_to":
        return "≈", f"{threshold_text} ± {tolerance_text}{u}"
    if op == "between":
        return "in", f"[{lo_text}, {hi_text}]{u}"
    return "holds", ""


@dataclass(frozen=True)
class Interval(_Record):
    """A claim's confidence interval (:meth:`circuits.claims.stats.Estimate.to_dict`): bounds, level, method."""

    _EXTRA: ClassVar[bool] = True

    lo: float | None = None
    hi: float | None = None
    level: float | None = None
    method: str | None = None
    n: int | None = None
    statistic: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class ClaimRecord(_Record):
    """Everything the report needs about one claim. ``margin`` > 0 means passed by that much.

    ``requirement`` is the text shown ("needs >= 0.9"); ``op_symbol`` / ``threshold_text`` are its two
    columns, carried apart so that no reader re-parses the text."""

    name: str = ""
    op: str = "holds"  # "at_least", "at_most", "close_to", "between", "holds"
    value: float | None = None  # the measured point estimate (None if not a finite number)
    passed: bool = False
    message: str = ""
    requirement: str = ""  # ">= 0.9", "1.0 ± 0.1", "in [0.2, 0.8]", "holds"
    threshold: float | None = None  # at_least / at_most: the threshold; close_to: the target
    tolerance: float | None = None  # close_to: atol + rtol * |target|
    lo: float | None = None  # between: the interval
    hi: float | None = None
    margin: float | None = None  # signed; on the CI's relevant bound when there is a CI
    bound: float | None = None  # the number the decision was made on (a CI bound, or the value)
    ci: Interval | None = None  # the interval the decision was made on, if any
    problem: str | None = None  # "value is NaN", "empty sample", "wrong kind: str", ...
    units: str | None = None
    note: str | None = None
    detail: str | None = None
    control: str | None = None  # None on a main run, else the control spec
    seed: Any = None
    value_text: str = ""  # the value as shown (keeps "nan" / "inf" that JSON cannot hold)
    extra: dict = field(default_factory=dict)
    op_symbol: str = ""  # ">=", "<=", "≈", "in", "holds"
    threshold_text: str = ""  # "0.9", "1.0 ± 0.1", "[0.2, 0.8]", ""

    _NESTED: ClassVar[dict] = {"ci": Interval}

    def to_dict(self) -> dict[str, Any]:  # (the name claims' callers know)
        return self.to_json()

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        if not fields.get("op_symbol"):  # a schema-1 record: its columns from the text it showed
            fields["op_symbol"], fields["threshold_text"] = _legacy_columns(fields.get("op") or "holds",
                                                                             fields.get("requirement"))
        return fields


def _legacy_columns(op: str, requirement: str | None) -> tuple[str, str]:
    """(op_symbol, threshold_text) of a schema-1 claim, which carried only the requirement text: the
    one place that text is split, for reports written before schema 2."""
    req = requirement or ""
    if op == "holds":
        return "holds", ""
    if op == "close_to":
        return "≈", req
    if op == "between":
        return "in", req[3:] if req.startswith("in ") else req
    sym, _, rest = req.partition(" ")
    return sym, rest


@dataclass(frozen=True)
class TestMeta(_Record):
    """What the plugin knows about a collected test before it runs (``circuits_test``)."""

    __test__: ClassVar[bool] = False  # (not a pytest test class)

    module: str = ""
    group: str = ""  # the test id without the plugin's control / seed parameters
    test: str = ""
    control: str | None = None  # the run's spec; None on the main run
    control_kind: str | None = None  # a RunKind value; None on the main run
    seed: int | None = None
    module_doc: str = ""
    doc: str = ""
    about: list = field(default_factory=list)
    controls_declared: list = field(default_factory=list)
    # the plugin's verdicts (None: not judged, e.g. a report built from records without them)
    generic_only: bool | None = None  # no mutation and only generic controls: teeth, not power
    no_controls: bool | None = None  # no control and no `about`: nothing checks the claim's teeth
    about_none: str | None = None  # about(none="why"): the claims are about no part of a model
    known_failure: str | None = None
    circuits: bool = True


@dataclass(frozen=True)
class ControlValue(_Record):
    """One claim as measured on a control run."""

    value: float | None = None
    value_text: str | None = None
    requirement: str | None = None
    margin: float | None = None
    passed: bool = False


@dataclass(frozen=True)
class ControlRun(_Record):
    """How a control / mutation / alternative run was judged (``circuits_control``)."""

    control: str = ""  # the spec: "untrained", "mutate:zero_ablate:L1H0", "alt:L0H1"
    kind: str = "control"  # a RunKind value, or for a hand-written control the part it acts on ("model", "data")
    outcome: str | None = None  # "ok", "no_teeth", "no_power", "unspecific", "error"
    message: str = ""
    error_kind: str | None = None  # an ERROR_KINDS key when outcome is "error"
    known: str | None = None  # the module's KNOWN_FAILURES reason for this run, if any
    held: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # claim name -> ControlValue
    nodeid: str | None = None  # set by the collector
    spec_name: str = ""  # the spec without its kind's prefix

    _NESTED: ClassVar[dict] = {"values": ControlValue}
    _NESTED_MAPS: ClassVar[frozenset] = frozenset({"values"})

    @property
    def run_kind(self) -> RunKind:
        return run_kind(self.control)

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        fields.setdefault("spec_name", spec_name(str(fields.get("control", ""))))
        return fields


@dataclass(frozen=True)
class ModelInfo(_Record):
    """A model a fixture served (:func:`circuits.plugin.session.note_model`); any further keys in ``extra``."""

    _EXTRA: ClassVar[bool] = True

    name: str = ""
    seed: Any = None
    key: str | None = None
    content_hash: str | None = None
    source: str | None = None  # "reference", "cache", "trained", "user", ...
    metrics: dict = field(default_factory=dict)
    wall_time: float | None = None
    provenance: str | None = None
    n_test: int | None = None  # the held-out test set's size (for the accuracy's interval)
    extra: dict = field(default_factory=dict)

    @property
    def identity(self) -> str:
        """One model served twice (two fixtures, two workers) is one entry of the report."""
        return "|".join(str(v) for v in (self.name, self.seed, self.key, self.content_hash, self.source))

    def to_json(self) -> dict:
        out = super().to_json()
        for k in ("metrics", "wall_time", "provenance", "key", "content_hash", "source", "n_test"):
            if out.get(k) in (None, {}) and k not in self.extra:
                out.pop(k)  # as given: a model noted without metrics has none in its record
        return out


@dataclass(frozen=True)
class FigureRecord(_Record):
    """A figure a test drew (``circuits_figure``): its PNG's path under the run folder."""

    name: str = ""
    caption: str = ""
    path: str | None = None
    bytes: int = 0
    error: str | None = None
    group: str | None = None
    nodeid: str | None = None


@dataclass(frozen=True)
class SeedVerdict(_Record):
    """A census claim on one seed: passed (None: its test ran but never reached the claim)."""

    passed: bool | None = None
    value: float | None = None
    status: str | None = None


@dataclass(frozen=True)
class CensusCell(_Record):
    """A census claim on a row: ``passed`` seeds of ``n``, each seed's verdict."""

    passed: int = 0
    n: int = 0
    seeds: dict = field(default_factory=dict)  # str(seed) -> SeedVerdict

    _NESTED: ClassVar[dict] = {"seeds": SeedVerdict}
    _NESTED_MAPS: ClassVar[frozenset] = frozenset({"seeds"})


@dataclass(frozen=True)
class SeedAccuracy(_Record):
    """A census model's held-out accuracy with its Wilson 95% interval, its training steps and time."""

    test_acc: float = 0.0
    n_test: int = 0
    lo: float = 0.0
    hi: float = 1.0
    steps: Any = None
    wall_time: float | None = None


@dataclass
class CensusRow(_Record):
    """One row of a census table: a recipe (its seeds) or a fixed reference subject; claim column ->
    :class:`CensusCell`; ``accuracy`` str(seed) -> :class:`SeedAccuracy` (None: no card)."""

    label: str = ""
    kind: str = "recipe"  # "recipe" | "reference"
    seeds: list = field(default_factory=list)
    claims: dict = field(default_factory=dict)
    accuracy: dict = field(default_factory=dict)

    _NESTED: ClassVar[dict] = {"claims": CensusCell, "accuracy": SeedAccuracy}
    _NESTED_MAPS: ClassVar[frozenset] = frozenset({"claims", "accuracy"})

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        return fields


# --- the run (report.json) ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TestResult(TestMeta):
    """A test of the run: its meta (:class:`TestMeta`) and how it ended."""

    nodeid: str = ""
    outcome: str | None = None  # "passed", "failed", "error", "skipped", "xfailed", "xpassed", "not finished"...
    duration: float = 0.0
    phases: dict = field(default_factory=dict)  # "setup" / "call" / "teardown" -> {"outcome", "duration"}
    message: str | None = None
    xfail_reason: str | None = None
    circuits: bool = False  # whether the plugin's meta reached this test (a circuits test)


@dataclass
class ControlCell(_Record):
    """How one main-run claim fared on one control / mutation / alternative run of its test."""

    control: str = ""
    kind: str = "control"  # a RunKind value
    nodeid: str = ""
    known: bool = False  # the run's KNOWN_FAILURES documents it
    outcome: str = "missing"  # "failed" (as required), "held", "error", "skipped", "missing"
    value: float | None = None
    value_text: str | None = None
    requirement: str | None = None
    op: str | None = None
    op_symbol: str = ""
    threshold_text: str = ""
    margin: float | None = None
    message: str | None = None
    test_outcome: str | None = None

    @property
    def spec_name(self) -> str:
        return spec_name(self.control)

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        if not fields.get("op_symbol") and fields.get("requirement"):
            fields["op_symbol"], fields["threshold_text"] = _legacy_columns(fields.get("op") or "",
                                                                             fields.get("requirement"))
        return fields


@dataclass
class ClaimResult(ClaimRecord):
    """A claim as the report holds it: the record, where it was measured, and (main runs) its controls."""

    nodeid: str = ""
    module: str = ""
    group: str = ""
    test: str = ""
    test_outcome: str | None = None
    status: str = ""  # PASS / FAIL / XFAIL / ERROR (main runs); HELD / OK (on a control)
    controls: list = field(default_factory=list)  # [ControlCell] (main runs)
    generic_only: bool = False
    no_controls: bool = False
    about_none: str | None = None  # (main runs) why the claims are about no part of a model
    control_outcome: str | None = None  # (claims measured on a control) the run's outcome
    control_kind: str | None = None
    control_known: bool = False

    _NESTED: ClassVar[dict] = {**ClaimRecord._NESTED, "controls": ControlCell}


@dataclass(frozen=True)
class ErrorLine(_Record):
    """One error of the run: ``kind`` an ERROR_KINDS key, ``label`` its words."""

    nodeid: str | None = None
    kind: str = ""
    label: str = ""
    message: str | None = None


@dataclass(frozen=True)
class PassRate(_Record):
    """A main-run claim across seeds: ``seeds`` seed -> passed (None: ran but never reached the claim)."""

    group: str = ""
    module: str | None = None
    name: str = ""
    n: int = 0
    passed: int = 0
    rate: float = 0.0
    seeds: dict = field(default_factory=dict)
    expected_failure: bool = False


@dataclass(frozen=True)
class NotRun(_Record):
    """A test deselected at collection: why, and the option that runs it."""

    nodeid: str = ""
    reason: str = ""
    option: str = ""


@dataclass(frozen=True)
class CollectionError(_Record):
    nodeid: str = ""
    message: str = ""


@dataclass(frozen=True)
class ModuleInfo(_Record):
    doc: str = ""
    tests: int = 0


@dataclass(frozen=True)
class Summary(_Record):
    """The run's counts (``outcomes``: by OUTCOME_KINDS key; ``tests``: by test outcome)."""

    claims: int = 0
    passed: int = 0
    failed: int = 0
    xfailed: int = 0
    control_runs: int = 0
    controls_ok: int = 0
    controls_no_teeth: int = 0
    controls_no_power: int = 0
    controls_unspecific: int = 0
    controls_known: int = 0
    generic_only: int = 0
    no_controls: int = 0
    controls_error: int = 0
    outcomes: dict = field(default_factory=dict)
    outcomes_known: dict = field(default_factory=dict)
    errors: int = 0
    tests: dict = field(default_factory=dict)
    models: int = 0
    figures: int = 0


@dataclass(frozen=True)
class MachineInfo(_Record):
    """Where a run ran (:func:`circuits.report.machine.machine_info`)."""

    _EXTRA: ClassVar[bool] = True

    platform: str | None = None
    machine: str | None = None
    python: str | None = None
    torch: str | None = None
    numpy: str | None = None
    pytest: str | None = None
    circuits: str | None = None
    cpu_count: int | None = None
    cpus_usable: int | None = None
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class GitInfo(_Record):
    """The commit a run ran at (all None without git or a repository)."""

    commit: str | None = None
    dirty: bool | None = None
    branch: str | None = None


@dataclass(frozen=True)
class RunSettings(_Record):
    """The options a run was started with (what report.json records of ``RunOptions``)."""

    _EXTRA: ClassVar[bool] = True

    seeds: list | None = None
    retrain: bool = False
    device: str = "cpu"
    compare: str | None = None
    full_sweep: bool = False
    report_dir: str | None = None
    draws_seed: int = 0
    variants: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Command(_Record):
    """How pytest was invoked: its arguments and folder."""

    args: list = field(default_factory=list)
    cwd: str | None = None


@dataclass(frozen=True)
class RunRef(_Record):
    """The earlier run a comparison is against."""

    run_id: str | None = None
    path: str | None = None
    created: str | None = None
    git: GitInfo | None = None

    _NESTED: ClassVar[dict] = {"git": GitInfo}


@dataclass(frozen=True)
class CompareCounts(_Record):
    matched: int = 0
    flipped: int = 0
    to_fail: int = 0
    to_pass: int = 0
    moved: int = 0  # margins moved beyond the noise floor without a flip
    not_run: int = 0  # claims of the earlier run whose tests did not run in this one


@dataclass(frozen=True)
class NoiseFloor(_Record):
    abs: float = 0.0
    rel: float = 0.0
    text: str = ""


@dataclass(frozen=True)
class CompareRow(_Record):
    """A claim found in both compared runs: before / after, and how far its margin moved."""

    group: str | None = None
    control: str | None = None
    seed: Any = None
    name: str = ""
    module: str | None = None
    before: bool = False
    after: bool = False
    value_before: str | None = None
    value_after: str | None = None
    margin_before: float | None = None
    margin_after: float | None = None
    delta: float | None = None
    moved: bool = True  # beyond the noise floor (circuits.report.compare)

    @property
    def flipped(self) -> bool:
        return self.before != self.after


@dataclass(frozen=True)
class ClaimBrief(_Record):
    """A claim in one of two compared runs only (added, removed), or the reference value of a claim."""

    group: str | None = None
    control: str | None = None
    seed: Any = None
    name: str = ""
    passed: bool = False
    value_text: str | None = None
    margin: float | None = None
    status: str | None = None


@dataclass(frozen=True)
class Comparison(_Record):
    """Two runs compared (report.json's ``compare``): ``counts`` matched / flipped / to_fail / to_pass /
    moved / not_run; ``reference`` the reference run's claims (a seeds run against a reference)."""

    against: RunRef = field(default_factory=RunRef)
    noise_floor: NoiseFloor = field(default_factory=NoiseFloor)
    flipped: list = field(default_factory=list)
    moved: list = field(default_factory=list)
    added: list = field(default_factory=list)
    removed: list = field(default_factory=list)
    counts: CompareCounts = field(default_factory=CompareCounts)
    reference: list | None = None

    _NESTED: ClassVar[dict] = {"flipped": CompareRow, "moved": CompareRow, "added": ClaimBrief,
                               "removed": ClaimBrief, "reference": ClaimBrief, "against": RunRef,
                               "noise_floor": NoiseFloor, "counts": CompareCounts}

    def to_json(self) -> dict:
        out = super().to_json()
        if out.get("reference") is None:
            out.pop("reference")
        return out


@dataclass
class Run(_Record):
    """A run's report (report.json): its records and what is derived from them. ``path`` (where it
    was read from) and ``html_path`` (the page written) live in memory only."""

    _EXTRA: ClassVar[bool] = True
    _NESTED: ClassVar[dict] = {"not_run": NotRun, "tests": TestResult, "claims": ClaimResult,
                               "control_runs": ControlRun, "models": ModelInfo, "figures": FigureRecord,
                               "collection_errors": CollectionError, "modules": ModuleInfo,
                               "pass_rates": PassRate, "errors": ErrorLine, "summary": Summary,
                               "compare": Comparison, "machine": MachineInfo, "git": GitInfo,
                               "command": Command, "options": RunSettings}
    _NESTED_MAPS: ClassVar[frozenset] = frozenset({"modules"})
    _JSON_NAMES: ClassVar[dict] = {"path": "_path", "html_path": "_html_path"}

    schema: int = SCHEMA
    run_id: str | None = None
    created: str | None = None
    duration_s: float | None = None
    exitstatus: int | None = None
    interrupted: bool = False
    machine: MachineInfo = field(default_factory=MachineInfo)
    git: GitInfo = field(default_factory=GitInfo)
    command: Command = field(default_factory=Command)
    options: RunSettings = field(default_factory=RunSettings)
    not_run: list = field(default_factory=list)
    tests: list = field(default_factory=list)
    claims: list = field(default_factory=list)
    control_runs: list = field(default_factory=list)
    models: list = field(default_factory=list)
    figures: list = field(default_factory=list)
    collection_errors: list = field(default_factory=list)
    modules: dict = field(default_factory=dict)
    pass_rates: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    summary: Summary = field(default_factory=Summary)
    compare: Comparison | None = None
    baseline_of: str | None = None
    schema_read: int | None = None  # the schema of the file this was read from, when older
    path: str | None = None
    html_path: str | None = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = super().to_json()
        out.pop("_path", None), out.pop("_html_path", None)  # in memory only
        for k in ("schema_read", "baseline_of", "compare"):
            if out.get(k) is None:
                out.pop(k, None)
        return out

    @classmethod
    def _upgrade(cls, fields: dict) -> dict:
        schema = fields.get("schema")
        if isinstance(schema, int) and schema < SCHEMA:
            fields["schema_read"] = schema
        fields["schema"] = SCHEMA
        for k, default in (("machine", MachineInfo), ("git", GitInfo), ("summary", Summary), ("command", Command),
                           ("options", RunSettings)):
            if fields.get(k) is None:
                fields[k] = default()
        return fields


def as_run(report: Any) -> Run:
    """A :class:`Run` from a loaded report.json dict (any schema) or a Run (returned as it is)."""
    return report if isinstance(report, Run) else Run.from_json(report)


