"""The pytest plugin of `circuits` (registered through the ``pytest11`` entry point).

Fixtures: ``claim`` (a :class:`~circuits.claims.Claims`), ``control`` (a
:class:`~circuits.controls.Control`), ``figures`` (a :class:`~circuits.figures.Figures`),
``zoo_seed`` (session; the seed under ``--seeds``, else None) and ``circuits_options`` (session;
the parsed :class:`RunOptions`). Marker: ``@pytest.mark.controls("untrained", "zero_ablate:L2H0")``.
Function: :func:`note_model` for zoo fixtures.

All state lives on one :class:`CircuitsPlugin` registered as ``"circuits-plugin"`` in
``pytest_configure``. Records travel on ``item.user_properties`` so that they reach the process
that writes the report, also under pytest-xdist, where only the controller writes.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from . import report as _report
from .claims import Claims, ClaimRecord, _jsonable
from .controls import MAIN, Control, ControlError, main_control, make_control, parse_spec
from .errors import CircuitsError
from .figures import Figures, slug, write_png

__all__ = ["CircuitsPlugin", "RunOptions", "get_plugin", "note_model", "parse_seeds", "PLUGIN_NAME"]

PLUGIN_NAME = "circuits-plugin"
CLAIMS_KEY = pytest.StashKey[Claims]()
CONTROL_KEY = pytest.StashKey[Control]()
CIRCUITS_FIXTURES = ("claim", "control", "figures", "zoo_seed")
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_SEEDS_USAGE = "use e.g. --seeds 0-4, --seeds 1,3 or --seeds 2 (integers >= 0)"


# --- options ----------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("circuits", "circuits: mechanistic-interpretability claims")
    g.addoption("--seeds", metavar="SPEC", default=None,
                help="run claims on models trained with these seeds: 0-4, 1,3 or 2 (default: the reference)")
    g.addoption("--retrain", action="store_true", default=False,
                help="train models from scratch, ignoring reference checkpoints and the model store")
    g.addoption("--device", metavar="DEVICE", default="cpu", help="torch device: cpu (default), cuda, cuda:N")
    g.addoption("--compare", metavar="RUN_ID_OR_PATH", default=None,
                help="compare claims with an earlier run (run id, path, 'latest' or 'baseline')")
    g.addoption("--report-dir", metavar="DIR", default=None, help="where runs are written (default: <rootdir>/reports)")
    g.addoption("--run-id", metavar="ID", default=None, help="name of this run's directory (default: timestamp + random)")
    g.addoption("--no-report", action="store_true", default=False, help="write no report files")
    g.addoption("--full-sweep", action="store_true", default=False, help="run the full_sweep grids")


def parse_seeds(spec: str) -> tuple[int, ...]:
    """``"0-4"`` -> (0, 1, 2, 3, 4); ``"1,3"`` -> (1, 3); ``"2"`` -> (2,). Raises ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--seeds needs a value; {_SEEDS_USAGE}")
    seeds: list[int] = []
    for tok in spec.split(","):
        tok = tok.strip()
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", tok)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"--seeds {spec!r}: range end {b} is before its start {a}; {_SEEDS_USAGE}")
            seeds.extend(range(a, b + 1))
        elif re.fullmatch(r"\d+", tok):
            seeds.append(int(tok))
        else:
            raise ValueError(f"--seeds {spec!r}: {tok!r} is not a seed or a range of seeds; {_SEEDS_USAGE}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"--seeds {spec!r}: seed {dup[0]} is given twice; {_SEEDS_USAGE}")
    return tuple(seeds)


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    if re.fullmatch(r"cuda(:\d+)?", device or ""):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise ValueError(f"--device {device!r}: expected cpu, cuda or cuda:N")


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

    @classmethod
    def from_config(cls, config: pytest.Config) -> "RunOptions":
        """Parse and validate; raises ``pytest.UsageError`` with a clear message on bad values."""
        opt = config.getoption
        winput = getattr(config, "workerinput", None)
        try:
            seeds = parse_seeds(opt("seeds")) if opt("seeds") is not None else None
            device = _check_device(opt("device"))
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        given_dir = opt("report_dir")
        base = Path(config.invocation_params.dir)
        report_dir = (base / given_dir) if given_dir else Path(config.rootpath) / "reports"
        if winput and "circuits_run_id" in winput:  # an xdist worker: the controller chose these
            run_id, run_dir = winput["circuits_run_id"], Path(winput["circuits_run_dir"])
        else:
            run_id = opt("run_id") or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
            if not _RUN_ID_RE.match(run_id) or run_id in ("latest", "baseline"):
                raise pytest.UsageError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' "
                                        "(not 'latest' or 'baseline')")
            run_dir = report_dir.resolve() / run_id
        compare_path = None
        if opt("compare") is not None and not winput:
            try:
                compare_path = _report.resolve_report(opt("compare"), report_dir)
            except _report.ReportNotFoundError as exc:
                raise pytest.UsageError(f"--compare: {exc}") from None
        return cls(seeds=seeds, retrain=bool(opt("retrain")), device=device, compare=opt("compare"),
                   compare_path=compare_path, report_dir=report_dir.resolve(), run_id=run_id, run_dir=run_dir,
                   no_report=bool(opt("no_report")), full_sweep=bool(opt("full_sweep")))


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, text in (("controls", "controls(*specs): negative controls on which every claim of the test must fail"),
                       ("full_sweep", "full_sweep: the paper's full grid; run with --full-sweep")):
        if name not in declared:  # another repository that installs the plugin may not declare them
            config.addinivalue_line("markers", text)
    options = RunOptions.from_config(config)
    previous = None
    if options.compare_path is not None:
        try:
            previous = _report.load_report(options.compare_path, options.report_dir)
        except _report.ReportError as exc:
            raise pytest.UsageError(f"--compare: {exc}") from None
    config.pluginmanager.register(CircuitsPlugin(config, options, previous), PLUGIN_NAME)


def get_plugin(config: pytest.Config) -> "CircuitsPlugin":
    plugin = config.pluginmanager.get_plugin(PLUGIN_NAME)
    if plugin is None:
        raise CircuitsError("the circuits pytest plugin is not active (was it disabled with -p no:circuits?)")
    return plugin


# --- the plugin object --------------------------------------------------------------------------------


class CircuitsPlugin:
    """Holds a run's state: options, the records seen so far, and the report once written."""

    def __init__(self, config: pytest.Config, options: RunOptions, previous: dict | None = None) -> None:
        self.config = config
        self.options = options
        self.previous = previous
        self.is_worker = hasattr(config, "workerinput")
        self.collector = _report.RunCollector()
        self.started = time.time()
        self.created = _report.now_iso()
        self.current_item: pytest.Item | None = None
        self.pending_models: list[dict] = []
        self.report: dict | None = None
        self.paths: dict[str, Path] | None = None
        self.write_error: str | None = None

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

    # -- xdist: hand the controller's run id / dir to the workers --
    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["circuits_run_id"] = self.options.run_id
        node.workerinput["circuits_run_dir"] = str(self.options.run_dir)

    # -- collection --
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        specs = [s for m in metafunc.definition.iter_markers("controls") for s in m.args]
        if specs:
            try:
                _check_control_specs(specs, metafunc)
            except ControlError as exc:  # shown as a one-line collection error, not a traceback
                raise ControlCollectError(f"{metafunc.definition.nodeid}: {exc}") from None
            metafunc.parametrize("control", [MAIN, *specs], indirect=True,
                                 ids=["main", *(f"control={s}" for s in specs)])
        if self.options.seeds and "zoo_seed" in metafunc.fixturenames:
            metafunc.parametrize("zoo_seed", list(self.options.seeds), indirect=True,
                                 ids=[f"seed={s}" for s in self.options.seeds], scope="session")

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.collector.set_order(ids)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.collector.set_order([i.nodeid for i in items])
        for item in items:
            if getattr(getattr(item, "callspec", None), "params", {}).get("control", MAIN) != MAIN:
                # a refuted hypothesis is an expected failure on its main run only: its controls must
                # still fail the claim, and are judged as for any claim
                item.own_markers[:] = [m for m in item.own_markers if m.name != "xfail"]
            names = getattr(item, "fixturenames", ())
            if any(f in names for f in CIRCUITS_FIXTURES):
                item.user_properties.append(("circuits_test", _test_meta(item)))

    # -- running --
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: Any) -> Iterator[None]:
        self.current_item = item
        try:
            return (yield)
        except KeyboardInterrupt:  # no report comes for this test: keep what it recorded
            if not self.is_worker:
                self.collector.add_interrupted(item.nodeid, item.user_properties)
            raise
        finally:
            self.current_item = None

    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        self._flush_models(item)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Iterator[None]:
        self._flush_models(item)
        result = yield  # a test that raised stays failed as it is
        ctl = item.stash.get(CONTROL_KEY, None)
        if ctl is not None and not ctl.is_main:
            self._judge_control(item, ctl)
        return result

    def _flush_models(self, item: pytest.Item) -> None:
        while self.pending_models:
            item.user_properties.append(("circuits_model", self.pending_models.pop(0)))

    def _judge_control(self, item: pytest.Item, ctl: Control) -> None:
        claims = item.stash.get(CLAIMS_KEY, None)
        records = claims.records if claims is not None else []
        name = f"control {ctl.spec!r}"
        if not ctl.applied:
            outcome = "error"
            msg = (f"{name} was never applied: no fixture called control.apply_{ctl.kind}(...), "
                   f"so this run measured the unmodified {ctl.kind}")
        elif not records:
            outcome, msg = "error", f"{name}: the control run recorded no claims, so it shows nothing"
        else:
            held = [r for r in records if r.passed]
            if held:
                outcome = "no_teeth"
                msg = "; ".join(f"no teeth: claim {r.name!r} = {r.value_text} also holds on {name} "
                                f"(needs {r.requirement})" for r in held)
            else:
                outcome = "ok"
                msg = "control OK: " + "; ".join(
                    f"claim {r.name!r} failed on {name} as required ({r.value_text}, needs {r.requirement})"
                    for r in records)
        item.user_properties.append(("circuits_control", {
            "control": ctl.spec, "kind": ctl.kind, "outcome": outcome, "message": msg,
            "held": [r.name for r in records if r.passed], "failed": [r.name for r in records if not r.passed],
        }))
        if outcome != "ok":
            pytest.fail(msg, pytrace=False)

    # -- reporting (controller / single process only) --
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if not self.is_worker:
            self.collector.add_test_report(report)

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if not self.is_worker:
            self.collector.add_collect_report(report)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.is_worker:
            return
        if self.pending_models:
            self.collector.add_properties("<session>", [("circuits_model", m) for m in self.pending_models])
        if self.collector.empty or self.config.getoption("collectonly", False):
            return
        try:
            self.report = self._build(int(exitstatus))
            if self.reporting:
                self.paths = _report.write_run(self.report, self.options.run_dir)
        except Exception as exc:  # never lose the test outcome because the report failed
            self.write_error = f"{type(exc).__name__}: {exc}"
            if self.report is not None and self.reporting:
                try:
                    _report.write_json_atomic(self.options.run_dir / "report.json", self.report)
                except Exception as exc2:
                    self.write_error += f"; report.json not written either ({type(exc2).__name__}: {exc2})"

    def _build(self, exitstatus: int) -> dict:
        o = self.options
        finished = time.time()
        report = self.collector.build(
            run_id=o.run_id,
            created=self.created,
            duration_s=round(finished - self.started, 3),
            exitstatus=exitstatus,
            interrupted=exitstatus == int(pytest.ExitCode.INTERRUPTED),
            machine=_report.machine_info(o.device),
            git=_report.git_info(self.config.rootpath),
            command={"args": list(self.config.invocation_params.args), "cwd": str(self.config.invocation_params.dir)},
            options={"seeds": list(o.seeds) if o.seeds else None, "retrain": o.retrain, "device": o.device,
                     "compare": o.compare, "full_sweep": o.full_sweep, "report_dir": str(o.report_dir)},
        )
        if self.previous is not None:
            report["compare"] = _jsonable(_report.compare_reports(report, self.previous))
        return report

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.is_worker or (self.report is None and self.write_error is None):
            return
        tr = terminalreporter
        if self.report is not None and config.get_verbosity() > -2:
            tr.write_sep("=", "circuits claims")
            for text, markup in _report.terminal_lines(self.report):
                tr.write_line(text, **markup)
        if self.write_error:
            tr.write_line(f"circuits: could not write the report: {self.write_error}", red=True)
        elif self.paths:
            tr.write_line(f"circuits report: {self.paths['html']}  (json, md alongside)")


class ControlCollectError(ControlError, pytest.Collector.CollectError):
    """A bad ``@pytest.mark.controls`` (unknown control, no claim fixture...), reported at collection."""


def _check_control_specs(specs: list, metafunc: pytest.Metafunc) -> None:
    if "claim" not in metafunc.fixturenames:
        raise ControlError("@pytest.mark.controls needs the test to use the claim fixture")
    for s in specs:
        if s == MAIN:
            raise ControlError(f"{MAIN!r} is the main run, not a control")
        parse_spec(s)  # unknown names fail here, at collection, listing the known ones
    if len(set(specs)) != len(specs):
        raise ControlError(f"a control is listed twice in {specs}")


# --- fixtures ----------------------------------------------------------------------------------------


def _test_meta(item: pytest.Item) -> dict:
    params = getattr(getattr(item, "callspec", None), "params", {})
    spec = params.get("control", MAIN)
    seed = params.get("zoo_seed")
    tokens = []
    if "control" in params:
        tokens.append("main" if spec == MAIN else f"control={spec}")
    if "zoo_seed" in params:
        tokens.append(f"seed={seed}")
    mod = getattr(item, "module", None)
    fn = getattr(item, "function", None)
    return {
        "module": item.nodeid.split("::")[0],
        "group": strip_params(item.nodeid, tokens),
        "test": item.nodeid.split("::", 1)[-1],
        "control": None if spec == MAIN else spec,
        "seed": seed if isinstance(seed, int) else None,
        "module_doc": _first_paragraph(getattr(mod, "__doc__", None), 1000),
        "doc": _first_paragraph(getattr(fn, "__doc__", None), 300),
        "circuits": True,
    }


def _first_paragraph(doc: str | None, limit: int) -> str:
    if not doc:
        return ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())[:limit]


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


def _item_seed(item: pytest.Item) -> int | None:
    seed = getattr(getattr(item, "callspec", None), "params", {}).get("zoo_seed")
    return seed if isinstance(seed, int) else None


@pytest.fixture
def control(request: pytest.FixtureRequest) -> Control:
    """The negative control of this run: a null control (identity) on the main run."""
    spec = getattr(request, "param", MAIN)
    if spec == MAIN:
        ctl = main_control()
    else:
        seed = _item_seed(request.node)
        ctl = make_control(spec, seed=seed if seed is not None else 0,
                           roles=lambda: request.getfixturevalue("head_roles"))
    request.node.stash[CONTROL_KEY] = ctl
    return ctl


@pytest.fixture
def claim(request: pytest.FixtureRequest, control: Control) -> Claims:
    """Record-then-assert claims: ``claim.at_least(name, value, threshold)`` etc."""
    item = request.node

    def sink(rec: ClaimRecord) -> None:
        item.user_properties.append(("circuits_claim", rec.to_dict()))

    claims = Claims(sink, raise_on_failure=control.is_main, control=None if control.is_main else control.spec,
                    seed=_item_seed(item))
    item.stash[CLAIMS_KEY] = claims
    return claims


@pytest.fixture
def figures(request: pytest.FixtureRequest, control: Control) -> Figures:
    """``figures.add(name, fig, caption=...)``: render a matplotlib Figure into the report (main runs
    with a report only: a negative control's figures, and figures under --no-report, are not drawn)."""
    plugin = get_plugin(request.config)
    item = request.node

    def sink(name: str, png: bytes, caption: str) -> None:
        rel, error = None, None
        if plugin.reporting:
            rel = f"figures/{slug(item.nodeid)}--{slug(name, 40)}.png"
            try:
                write_png(plugin.options.run_dir / rel, png)
            except OSError as exc:  # a full or read-only disk costs the figure, not the test
                rel, error = None, f"could not write the PNG: {exc}"
        item.user_properties.append(("circuits_figure", {"name": name, "caption": caption, "path": rel,
                                                         "bytes": len(png), "error": error}))

    return Figures(sink, render=plugin.reporting and control.is_main)


@pytest.fixture(scope="session")
def zoo_seed(request: pytest.FixtureRequest) -> int | None:
    """The training seed under ``--seeds`` (one per parametrised run), else None (the reference)."""
    return getattr(request, "param", None)


@pytest.fixture(scope="session")
def circuits_options(request: pytest.FixtureRequest) -> RunOptions:
    """This run's parsed options (seeds, retrain, device, full_sweep, run dir...)."""
    return get_plugin(request.config).options


# --- for zoo fixtures --------------------------------------------------------------------------------

_MAX_HISTORY = 1000


def note_model(request: pytest.FixtureRequest, info: dict) -> None:
    """Tell the report about a model a fixture provides.

    ``info``: name, seed, key, content_hash, source ("reference" | "cache" | "trained"), metrics
    (a dict; ``metrics["history"]`` a list of ``{"step", "loss", "acc", ...}`` for training curves),
    wall_time (seconds). Callable from fixtures of any scope.
    """
    if not isinstance(info, dict):
        raise TypeError(f"note_model needs a dict, got {type(info).__name__}")
    if not isinstance(info.get("name"), str) or not info["name"]:
        raise ValueError("note_model: info needs a 'name'")
    entry = dict(info)
    metrics = dict(entry.get("metrics") or {})
    hist = metrics.get("history")
    if isinstance(hist, list) and len(hist) > _MAX_HISTORY:  # keep curves, not every step
        step = -(-len(hist) // _MAX_HISTORY)
        metrics["history"] = hist[::step] + ([hist[-1]] if (len(hist) - 1) % step else [])
    if metrics:
        entry["metrics"] = metrics
    entry = _jsonable(entry)
    plugin = get_plugin(request.config)
    node = request.node
    item = node if isinstance(node, pytest.Item) else plugin.current_item
    if item is not None:
        item.user_properties.append(("circuits_model", entry))
    else:
        plugin.pending_models.append(entry)

# zoo fixtures (`<name>_model`, `zoo_models`) live in their own module; importing them here makes
# pytest collect them as part of this plugin.
from .zoo_fixtures import *  # noqa: E402,F401,F403
