"""The run's state: parsed options and the session object the pytest plugin keeps (as
pytest-benchmark keeps its session in a module of its own).

:class:`RunOptions` is parsed once from the command line; :class:`CircuitsSession` holds what a run
collects (records, models, the report once written) and judges control / mutation runs. The pytest
hooks and fixtures that drive it live in :mod:`circuits.plugin.pytest_plugin`; this module imports nothing
heavy (no torch, no numpy) so that loading the plugin in an unrelated project costs nothing.

One source of truth for the seed: ``RunOptions.seeds`` is the run's list, and a test's own seed is
the ``zoo_seed`` parameter of its callspec, read by :func:`item_seed` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from circuits.devices import check_device
from circuits.errors import CircuitsError
from circuits.records import (ALTERNATIVE_PREFIX, GENERIC_CONTROLS, MAIN, MUTATION_PREFIX, PROP_MODEL, Command, ControlRun,
                      ControlValue, ModelInfo, Run, RunKind, RunSettings, control_id, jsonable, run_kind, spec_name)

__all__ = ["CircuitsSession", "RunOptions", "get_plugin", "note_model", "item_seed", "strip_params",
           "draws_seed_for", "PLUGIN_NAME", "GENERIC_CONTROLS", "MUTATION_PREFIX", "ALTERNATIVE_PREFIX"]

PLUGIN_NAME = "circuits-plugin"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# (GENERIC_CONTROLS, MUTATION_PREFIX, ALTERNATIVE_PREFIX, MAIN, control_id, run_kind: circuits.records)
# the parameter a test's control / mutation runs are parametrised on: a fixture name of our own, so a
# project whose conftest defines `control` or `draws` (common words) keeps its fixtures and ours work
CONTROL_PARAM = "circuits_control"
_MAX_HISTORY = 1000


@dataclass(frozen=True)
class RunOptions:
    """The parsed ``circuits`` options of this run (also available on workers)."""

    seeds: tuple[int, ...] | None  # None: the reference checkpoint / default seed
    retrain: bool
    device: str
    compare: str | None  # as given on the command line
    compare_path: Path | None  # the report.json it names (controller only)
    report_dir: Path
    run_id: str
    run_dir: Path
    no_report: bool
    full_sweep: bool
    draws_seed: int = 0  # changes every random draw a claim makes (resampling, bootstrap, fresh data)
    rootdir: Path = Path(".")
    variants: tuple[tuple[str, str], ...] = ()  # (entry, "entry@recipe"): the recipe its fixture serves

    def model_name(self, name: str) -> str:
        """The zoo name a ``<name>_model`` fixture serves: ``name@recipe`` under ``--circuits-variant``."""
        return dict(self.variants).get(name, name)

    def shared_draws(self, label: str) -> Any:
        """A :class:`~circuits.draws.Draws` stream shared by several tests (a module- or
        session-scoped fixture's: a binding, a data set the tests of a module share), named by
        ``label`` and re-drawn by ``--circuits-draws-seed`` like every test's own ``draws``."""
        from circuits.claims.draws import Draws

        return Draws(draws_seed_for(self.draws_seed, label))

    @property
    def asked_for_models(self) -> bool:
        """Whether an option only the zoo can serve was given (then the zoo loads eagerly)."""
        return bool(self.seeds or self.retrain or self.full_sweep or self.device != "cpu" or self.variants)

    @classmethod
    def from_config(cls, config: pytest.Config) -> "RunOptions":
        """Parse and validate; raises ``pytest.UsageError`` with a clear message on bad values."""
        opt = config.getoption
        winput = getattr(config, "workerinput", None)
        try:
            seeds = parse_seeds_option(opt("circuits_seeds")) if opt("circuits_seeds") is not None else None
            device = check_device(opt("circuits_device"), option="--circuits-device")
            draws_seed = _parse_draws_seed(opt("circuits_draws_seed"))
            variants = _parse_variants(opt("circuits_variant") or [])
            check_variants_known(variants)
            threads_from_env()
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        from circuits.paths import reports_dir

        given_dir = opt("circuits_report_dir")
        base = Path(config.invocation_params.dir)
        report_dir = (base / given_dir) if given_dir else reports_dir(config.rootpath, config)
        if not opt("circuits_no_report"):
            try:
                check_report_dir(report_dir, "--circuits-report-dir" if given_dir else "the report folder")
            except ValueError as exc:
                raise pytest.UsageError(str(exc)) from None
        if winput and "circuits_run_id" in winput:  # an xdist worker: the controller chose these
            run_id, run_dir = winput["circuits_run_id"], Path(winput["circuits_run_dir"])
        else:
            run_id = opt("circuits_run_id") or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
            if not _RUN_ID_RE.match(run_id) or run_id in ("latest", "baseline"):
                raise pytest.UsageError(f"--circuits-run-id {run_id!r}: use letters, digits, '.', '_' and '-' "
                                        "(not 'latest' or 'baseline')")
            run_dir = report_dir.resolve() / run_id
        compare_path = None
        if opt("circuits_compare") is not None and not winput:
            from circuits import report as _report

            try:
                compare_path = _report.resolve_report(opt("circuits_compare"), report_dir)
            except _report.ReportNotFoundError as exc:
                raise pytest.UsageError(f"--circuits-compare: {exc}") from None
        return cls(seeds=seeds, retrain=bool(opt("circuits_retrain")), device=device,
                   compare=opt("circuits_compare"), compare_path=compare_path, report_dir=report_dir.resolve(),
                   run_id=run_id, run_dir=run_dir, no_report=bool(opt("circuits_no_report")),
                   full_sweep=bool(opt("circuits_full_sweep")), draws_seed=draws_seed,
                   rootdir=Path(config.rootpath), variants=variants)


def parse_seeds_option(spec: str) -> tuple[int, ...]:
    """:func:`circuits.zoo.seeds.parse_seeds`, its errors naming the ``--circuits-seeds`` option."""
    from circuits.zoo.seeds import parse_seeds

    try:
        return parse_seeds(spec)
    except ValueError as exc:
        text = str(exc)
        raise ValueError(f"--circuits-{text}" if text.startswith("seeds") else f"--circuits-seeds: {text}") from None


def _parse_variants(values: list[str]) -> tuple[tuple[str, str], ...]:
    """``--circuits-variant brackets@arena_like`` (repeatable): each names an entry and one of its recipes."""
    out: dict[str, str] = {}
    for v in values:
        base, sep, recipe = str(v).partition("@")
        if not sep or not base or not recipe:
            raise ValueError(f"--circuits-variant {v!r}: expected NAME@RECIPE, e.g. brackets@arena_like")
        if base in out:
            raise ValueError(f"--circuits-variant: {base!r} is given two recipes ({out[base]} and {v})")
        out[base] = str(v)
    return tuple(out.items())


def check_variants_known(variants: tuple[tuple[str, str], ...], *, collected: bool = False) -> None:
    """Every ``--circuits-variant NAME@RECIPE`` names a zoo entry and one of its recipes (ValueError, one line,
    at start-up: not a traceback in every fixture that serves it). Imports the zoo only when given.
    Before collection (``collected=False``) an entry the zoo does not know yet is let through: a
    conftest may register it; after collection every name must resolve."""
    if not variants:
        return
    from circuits.zoo import registry as zoo

    for base, spec in variants:
        if not collected and base not in zoo.names():
            continue
        try:
            zoo.get_entry(spec)
        except (KeyError, ValueError) as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(f"--circuits-variant {spec!r}: {text}") from None


THREADS_ENV = "CIRCUITS_THREADS"
MAX_THREADS = 4096  # far above any machine's cores; torch.set_num_threads overflows on huge values


def threads_from_env() -> int | None:
    """``$CIRCUITS_THREADS`` as an int in 1..MAX_THREADS, None when unset or empty; ValueError (one
    line) otherwise, so a bad value stops the run at start-up (exit 4), not every test."""
    import os

    env = os.environ.get(THREADS_ENV, "").strip()
    if not env:
        return None
    if not env.isascii() or not env.isdigit() or not 1 <= int(env) <= MAX_THREADS:
        raise ValueError(f"${THREADS_ENV}={env[:40]!r}: expected a whole number of torch threads in 1..{MAX_THREADS} "
                         f"(unset it for the default)")
    return int(env)


def check_report_dir(path: Path, what: str = "--circuits-report-dir") -> Path:
    """``path`` if a run's report can be written under it (:func:`circuits.paths.check_output_dir`):
    ValueError naming the path otherwise, checked before any test runs, so a run never ends with
    "could not write the report"."""
    from circuits.paths import check_output_dir

    return check_output_dir(path, what, "point it at a folder for the run reports, or pass --circuits-no-report")


def _parse_draws_seed(value: Any) -> int:
    if value is None:
        return 0
    text = str(value).strip()
    if not text.isdigit() or int(text) >= 2**63:
        raise ValueError(f"--circuits-draws-seed {value!r}: expected an integer in [0, 2**63)")
    return int(text)


def draws_seed_for(draws_seed: int, group: str) -> int:
    """The seed of one test's random draws: a hash of the run's ``--circuits-draws-seed`` and the test's id
    without its control/seed parameters, so a test's main run and its control runs draw alike."""
    digest = hashlib.sha256(f"{draws_seed}\x00{group}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def get_plugin(config: pytest.Config) -> "CircuitsSession":
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        raise CircuitsError("the circuits pytest plugin is not active (was it disabled with -p no:circuits?)")
    return plugin


def item_seed(node: Any) -> int | None:
    """The zoo seed of a test (its ``zoo_seed`` parameter under ``--circuits-seeds``), else None: the one
    place a test's seed is read from."""
    seed = getattr(getattr(node, "callspec", None), "params", {}).get("zoo_seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def strip_params(nodeid: str, tokens: list[str]) -> str:
    """Remove the given parameter ids from a nodeid's ``[...]`` part (the seed / control ids)."""
    if not tokens or not nodeid.endswith("]") or "[" not in nodeid:
        return nodeid
    head, _, inner = nodeid[:-1].partition("[")
    for tok in tokens:
        if inner == tok:
            inner = ""
        elif inner.endswith("-" + tok):
            inner = inner[: -len(tok) - 1]
        elif inner.startswith(tok + "-"):
            inner = inner[len(tok) + 1:]
        elif ("-" + tok + "-") in inner:
            inner = inner.replace("-" + tok + "-", "-", 1)
    return f"{head}[{inner}]" if inner else head


def param_tokens(item: Any) -> list[str]:
    """The ids this plugin added to a test's name (control / mutation, seed)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    tokens = []
    if CONTROL_PARAM in params:
        tokens.append(control_id(params[CONTROL_PARAM]))
    if "zoo_seed" in params:
        tokens.append(f"seed={params['zoo_seed']}")
    return tokens


def item_spec(item: Any) -> str:
    """The control spec a collected test runs (``MAIN`` for its main run): the structured field that
    its id's ``[control=...]`` part is built from, for readers that must not parse the id."""
    return getattr(getattr(item, "callspec", None), "params", {}).get(CONTROL_PARAM, MAIN)


def group_of(item: Any) -> str:
    """A test's id without the plugin's parameters: its main run and controls share it."""
    return strip_params(item.nodeid, param_tokens(item))


class CircuitsSession:
    """Holds a run's state: options, the records seen so far, and the report once written."""

    def __init__(self, config: pytest.Config, options: RunOptions, previous: Run | None = None) -> None:
        # the collector and the clock only: the outputs (numpy) load when a report is built
        from circuits.report.collect import RunCollector
        from circuits.report.machine import now_iso

        self.config = config
        self.options = options
        self.previous = previous
        self.is_worker = hasattr(config, "workerinput")
        self.collector = RunCollector()
        self.started = time.time()
        self.created = now_iso()
        self.current_item: pytest.Item | None = None
        self.pending_models: list[dict] = []
        self.report: Run | None = None
        self.paths: dict[str, Path] | None = None
        self.write_error: str | None = None
        self.zoo_fixture_names: set[str] = set()
        self.not_run: list[dict] = []  # deselected at collection: {"nodeid", "reason", "option"}

    # convenient read-only views of the options
    seeds = property(lambda self: self.options.seeds)
    retrain = property(lambda self: self.options.retrain)
    device = property(lambda self: self.options.device)
    full_sweep = property(lambda self: self.options.full_sweep)
    run_id = property(lambda self: self.options.run_id)
    run_dir = property(lambda self: self.options.run_dir)
    report_dir = property(lambda self: self.options.report_dir)

    @property
    def reporting(self) -> bool:
        return not self.options.no_report

    def build_report(self, exitstatus: int) -> "Run":
        from circuits import report as _report
        o = self.options
        finished = time.time()
        report = self.collector.build_run(
            not_run=list(self.not_run),
            run_id=o.run_id,
            created=self.created,
            duration_s=round(finished - self.started, 3),
            exitstatus=exitstatus,
            interrupted=exitstatus == int(pytest.ExitCode.INTERRUPTED),
            machine=_report.machine_info(o.device),
            git=_report.git_info(self.config.rootpath),
            command=Command(args=list(self.config.invocation_params.args), cwd=str(self.config.invocation_params.dir)),
            options=RunSettings(seeds=list(o.seeds) if o.seeds else None, retrain=o.retrain, device=o.device,
                                compare=o.compare, full_sweep=o.full_sweep, report_dir=str(o.report_dir),
                                draws_seed=o.draws_seed, variants=dict(o.variants)),
        )
        if self.previous is not None:
            report.compare = _report.compare_reports(report, self.previous)
        return report


def judge_control(records: list, ctl: Any) -> tuple[str, str]:
    """Outcome and message of a control or mutation run from the claims it recorded.

    A control (hand-written) whose claims still hold shows the claim has "no teeth"; a mutation
    (derived from what the claim is about) whose claims still hold shows it has "no power": the part
    it names was broken and the claim did not notice. An alternative (the claim pointed at another
    part of its kind) whose claims hold shows it is "unspecific": the named part is not
    distinguishable from that alternative."""
    what = run_kind(ctl.spec)
    mutation = what is RunKind.MUTATION
    name = f"{what} {spec_name(ctl.spec)!r}"
    if not ctl.applied:
        how = {"other_mlp": "control.mlp(layer)", "independent_feature": "control.feature(name, values)"}.get(
            spec_name(ctl.spec).split(":", 1)[0], f"control.apply_{ctl.kind}(...)")
        return "error", (f"{name} was never applied: the test never called {how} for the part it is about, "
                         f"so this run measured the unmodified {ctl.kind}")
    if not records:
        return "error", f"{name}: the {what} run recorded no claims, so it shows nothing"
    unmeasured = [] if _undefined_by_ablation(records, ctl) else [r for r in records if getattr(r, "problem", None)]
    if unmeasured:  # a NaN / inf / empty value fails every claim: that is no evidence the claim has teeth
        return "error", "; ".join(f"{name}: claim {r.name!r} measured {r.value_text or 'nothing'} ({r.problem}), "
                                  f"so the {what} run shows nothing" for r in unmeasured)
    held = [r for r in records if r.passed]
    if held and what is RunKind.ALTERNATIVE:  # the claim pointed at another part holds too: not specific to its part
        return "unspecific", "; ".join(
            f"unspecific: claim {r.name!r} = {r.value_text} also holds on {name} (needs {r.requirement})" for r in held)
    if held:
        label = "no power" if mutation else "no teeth"
        return ("no_power" if mutation else "no_teeth"), "; ".join(
            f"{label}: claim {r.name!r} = {r.value_text} also holds on {name} (needs {r.requirement})" for r in held)
    return "ok", f"{what} OK: " + "; ".join(
        f"claim {r.name!r} failed on {name} as required ({r.value_text}, needs {r.requirement})" for r in records)


def control_error_kind(records: list, ctl: Any) -> str | None:
    """Which error :func:`judge_control` found (a ``circuits.report.collect.ERROR_KINDS`` key), or None."""
    if not ctl.applied:
        return "never_applied"
    if not records:
        return "no_claims"
    if any(getattr(r, "problem", None) for r in records) and not _undefined_by_ablation(records, ctl):
        return "nonfinite"
    return None


ABLATION_MUTATIONS = ("zero_ablate", "mean_ablate")  # zero_ablate:X, mean_ablate_mlp:L2, ...


def _undefined_by_ablation(records: list, ctl: Any) -> bool:
    """A derived ablation of the named part makes that part's output constant, so a statistic of it
    (a correlation, a standardised difference, a loss ratio 0/0) is undefined: NaN there says the
    part carries nothing, which is the failure the mutation asks for. Only for these mutations, and
    only when no claim of the run held; a NaN on a main run, a hand-written control or any other
    mutation stays an error (nothing was measured)."""
    if run_kind(ctl.spec) is not RunKind.MUTATION:
        return False
    kind = spec_name(ctl.spec).split(":", 1)[0]
    return kind.startswith(ABLATION_MUTATIONS) and not any(r.passed for r in records)


def note_model(request: pytest.FixtureRequest, info: dict) -> None:
    """Tell the report about a model a fixture provides.

    ``info``: name, seed, key, content_hash, source ("reference" | "cache" | "trained" | anything
    that says where it came from, e.g. "user"), metrics (a dict; ``metrics["history"]`` a list of
    ``{"step", "loss", "acc", ...}`` for training curves), wall_time (seconds), provenance (free
    text: where the weights come from). Callable from fixtures of any scope.
    """
    if not isinstance(info, dict):
        raise TypeError(f"note_model needs a dict, got {type(info).__name__}")
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise ValueError("note_model: info needs a 'name'")
    model = ModelInfo.from_json(jsonable(info))
    hist = model.metrics.get("history") if isinstance(model.metrics, dict) else None
    if isinstance(hist, list) and len(hist) > _MAX_HISTORY:  # keep curves, not every step
        step = -(-len(hist) // _MAX_HISTORY)
        model = dataclasses.replace(model, metrics={**model.metrics, "history": hist[::step] + (
            [hist[-1]] if (len(hist) - 1) % step else [])})
    plugin = get_plugin(request.config)
    node = request.node
    item = node if isinstance(node, pytest.Item) else plugin.current_item
    if item is not None:
        item.user_properties.append((PROP_MODEL, model.to_json()))
    else:
        plugin.pending_models.append(model.to_json())


def control_run_record(records: list, ctl: Any, outcome: str, message: str, known: str | None) -> ControlRun:
    """The record of a judged control / mutation / alternative run (what the report reads)."""
    kind = run_kind(ctl.spec)
    return ControlRun(
        control=ctl.spec, kind=str(kind) if kind is not RunKind.CONTROL else ctl.kind, outcome=outcome,
        message=message, error_kind=control_error_kind(records, ctl) if outcome == "error" else None, known=known,
        held=[r.name for r in records if r.passed], failed=[r.name for r in records if not r.passed],
        values={r.name: ControlValue(value=r.value, value_text=r.value_text, requirement=r.requirement,
                                     margin=r.margin, passed=r.passed) for r in records},
        spec_name=spec_name(ctl.spec))
