"""The pytest plugin of `circuits` (registered through the ``pytest11`` entry point).

Fixtures: ``claim`` (a :class:`~circuits.claims.core.Claims`), ``control`` (a
:class:`~circuits.claims.controls.Control`), ``figures`` (a :class:`~circuits.report.figures.Figures`), ``draws``
(a :class:`~circuits.claims.draws.Draws`: the test's random draws, changed by ``--circuits-draws-seed``), ``zoo_seed``
(session; the seed under ``--circuits-seeds``, else None), ``circuits_options`` (session; the parsed
:class:`~circuits.plugin.session.RunOptions`), ``head_roles`` (role name -> (layer, head); empty unless a
conftest or module overrides it), ``zoo_models`` and one ``<name>_model`` per zoo entry.

Markers: ``@pytest.mark.controls("untrained", ...)`` (hand-written negative controls) and
``@pytest.mark.about("head:count_head", ...)`` (what the test's claims are about; the plugin derives
targeted mutations from it, see :mod:`circuits.claims.mutations`). Known failures: a module-level
``KNOWN_FAILURES = {"test_name": "reason"}`` table (see :func:`_apply_known_failures`), or the
declared hook ``pytest_circuits_known_failures`` (:mod:`circuits.plugin.hookspecs`) in a conftest.

Loading this module is cheap: it imports pytest and :mod:`circuits.plugin.session` only. Torch, the zoo and
the report load when a circuits fixture, marker or option is used. State lives on one
:class:`CircuitsPlugin` (a :class:`~circuits.plugin.session.CircuitsSession`) registered as
``"circuits-plugin"``; records travel on ``item.user_properties`` so that they reach the process that
writes the report, also under pytest-xdist, where only the controller writes.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import pytest

from circuits.errors import CircuitsError
from circuits.records import (ALTERNATIVE_PREFIX, GENERIC_CONTROLS, MAIN, MUTATION_PREFIX, PROP_CLAIM, PROP_CONTROL,
                      PROP_FIGURE, PROP_MODEL, PROP_TEST,
                      FigureRecord, RunKind, TestMeta, control_id, run_kind, spec_name)
from circuits.plugin.session import (CONTROL_PARAM, PLUGIN_NAME, CircuitsSession, RunOptions, control_run_record, draws_seed_for,
                      get_plugin, group_of, item_seed, item_spec, judge_control, note_model, strip_params)

__all__ = ["CircuitsPlugin", "RunOptions", "get_plugin", "note_model", "parse_seeds", "strip_params", "PLUGIN_NAME"]

CLAIMS_KEY = pytest.StashKey[Any]()
CONTROL_KEY = pytest.StashKey[Any]()
CIRCUITS_FIXTURES = ("claim", CONTROL_PARAM, "control", "figures", "zoo_seed", "draws")
# a test module uses circuits if it mentions the package, or takes a `<something>_model` argument
_USES_CIRCUITS = re.compile(rb"circuits|def test\w*\s*\([^)]*\w_model\b")


def parse_seeds(spec: str) -> tuple[int, ...]:
    """``--circuits-seeds`` syntax (kept here for old imports; the parser is :func:`circuits.zoo.seeds.parse_seeds`)."""
    from circuits.plugin.session import parse_seeds_option

    return parse_seeds_option(spec)


# --- declared hooks (circuits.plugin.hookspecs) and their default implementations -----------------------------


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from circuits.plugin import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_circuits_known_failures(module: Any) -> dict | None:
    """The convention: a module's own ``KNOWN_FAILURES`` table."""
    return getattr(module, "KNOWN_FAILURES", None)


@pytest.hookimpl(trylast=True)
def pytest_circuits_sweep_plan(options: Any, module: Any, items: list) -> list | None:
    """The convention: a module's own ``circuits_sweep_plan(options, items)``."""
    from circuits.plugin.zoo_fixtures import module_sweep_plan

    return module_sweep_plan(options, module, items)


# --- options ----------------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    # Every option is --circuits-*, as pytest-benchmark's are --benchmark-*: the plugin auto-loads in any
    # project that installs the wheel, whose own conftest may well define --device or --seeds.
    g = parser.getgroup("circuits", "circuits: mechanistic-interpretability claims")
    g.addoption("--circuits-seeds", metavar="SPEC", default=None,
                help="run claims on models trained with these seeds: 0-4, 1,3 or 2 (default: the reference)")
    g.addoption("--circuits-retrain", action="store_true", default=False,
                help="train models from scratch, ignoring reference checkpoints and the model store")
    g.addoption("--circuits-device", metavar="DEVICE", default="cpu",
                help="torch device: cpu (default), cuda, cuda:N")
    g.addoption("--circuits-compare", metavar="RUN_ID_OR_PATH", default=None,
                help="compare claims with an earlier run (run id, path, 'latest' or 'baseline')")
    g.addoption("--circuits-report-dir", metavar="DIR", default=None,
                help="where runs are written (default: <rootdir>/reports)")
    g.addoption("--circuits-run-id", metavar="ID", default=None,
                help="name of this run's directory (default: timestamp + random)")
    g.addoption("--circuits-no-report", action="store_true", default=False, help="write no report files")
    g.addoption("--circuits-full-sweep", action="store_true", default=False,
                help="run the full_sweep grids (deselected otherwise)")
    g.addoption("--circuits-ensemble", metavar="K", type=int, default=None,
                help="train the models --circuits-seeds needs with the stacked trainer, K seeds per stack "
                     "(0 = automatic); also $CIRCUITS_TRAIN_BACKEND=ensemble. Loads then use its store keys")
    g.addoption("--circuits-variant", metavar="NAME@RECIPE", action="append", default=None,
                help="serve the <NAME>_model fixture with a recipe variant (repeatable), e.g. brackets@arena_like")
    g.addoption("--circuits-draws-seed", metavar="N", default=None,
                help="re-draw every random choice claims make (resampling, bootstrap, fresh data); default 0")
    parser.addini("circuits_report_dir", "where runs are written, relative to the rootdir (default: reports)")
    parser.addini("circuits_cache_dir", "the model store, relative to the rootdir (default: .circuits-cache; "
                  "the CIRCUITS_CACHE environment variable wins)")


_MARKERS = (
    ("controls", "controls(*specs): negative controls on which every claim of the test must fail"),
    ("about", "about(*targets, alternatives='model'|'layer'|False): what the test's claims are about ('head:L2H0', "
              "'ov:count_head', 'qk:L0H0', 'mlp:L2', 'attn:L0', 'path:L2H0', 'positions[:a-b]', 'read_in', "
              "'feature:NAME', 'model'); each target's mutations must make them fail, and so must pointing a head, "
              "an MLP (control.mlp) or a feature (control.feature) at each alternative (False: a claim about the "
              "model's behaviour, its parts its power only); "
              "about(none='why') for claims about no part of a model (nothing derived; the report shows why)"),
    ("full_sweep", "full_sweep: the paper's full grid; run with --circuits-full-sweep"),
)


def pytest_configure(config: pytest.Config) -> None:
    declared = {line.split(":")[0].split("(")[0].strip() for line in config.getini("markers")}
    for name, text in _MARKERS:
        if name not in declared:  # a project that installs the plugin need not declare them
            config.addinivalue_line("markers", text)
    if config.getoption("circuits_ensemble", None) is not None:  # zoo_fixtures only when asked: start-up stays light
        from circuits.plugin.zoo_fixtures import apply_ensemble_option

        apply_ensemble_option(config)
    options = RunOptions.from_config(config)
    previous = None
    if options.compare_path is not None:
        from circuits import report as _report

        try:
            previous = _report.load_report(options.compare_path, options.report_dir)
        except _report.ReportError as exc:
            raise pytest.UsageError(f"--circuits-compare: {exc}") from None
    config.pluginmanager.register(CircuitsPlugin(config, options, previous), PLUGIN_NAME)


# --- the plugin object --------------------------------------------------------------------------------


class CircuitsPlugin(CircuitsSession):
    """The session object (:class:`~circuits.plugin.session.CircuitsSession`) plus pytest's hooks."""

    # -- xdist: hand the controller's run id / dir to the workers --
    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["circuits_run_id"] = self.options.run_id
        node.workerinput["circuits_run_dir"] = str(self.options.run_dir)

    # -- zoo fixtures, registered when first needed --
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.options.asked_for_models:
            self.ensure_zoo_fixtures()

    def pytest_collectstart(self, collector: pytest.Collector) -> None:
        if not isinstance(collector, pytest.Module):
            return
        if self.zoo_fixture_names:
            self.ensure_zoo_fixtures()  # entries a conftest registered since
            return
        try:
            text = collector.path.read_bytes()
        except OSError:
            return
        if _USES_CIRCUITS.search(text):
            self.ensure_zoo_fixtures()

    def ensure_zoo_fixtures(self) -> None:
        """Register a ``<name>_model`` fixture for every zoo entry not yet served."""
        from circuits.zoo import registry as zoo
        from circuits.plugin.zoo_fixtures import fixture_module

        new = [n for n in zoo.names() if n not in self.zoo_fixture_names]
        if not new:
            return
        self.zoo_fixture_names.update(new)
        self.config.pluginmanager.register(fixture_module(new), f"circuits-zoo-{len(self.zoo_fixture_names)}")

    # -- collection --
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        controls = [s for m in metafunc.definition.iter_markers("controls") for s in m.args]
        abouts = list(metafunc.definition.iter_markers("about"))
        targets = [t for m in abouts for t in m.args]
        if abouts:  # about(none="why") or targets, never an empty about(): one line at collection
            from circuits.claims.controls import ControlError
            from circuits.claims.mutations import about_none

            try:
                about_none(abouts)
            except ControlError as exc:
                raise ControlCollectError(f"{metafunc.definition.nodeid}: {exc}") from None
        if controls or targets:
            try:
                specs = _run_specs(controls, targets, metafunc)
            except Exception as exc:  # a ControlError: one line at collection, not a traceback
                from circuits.claims.controls import ControlError

                if not isinstance(exc, ControlError):
                    raise
                raise ControlCollectError(f"{metafunc.definition.nodeid}: {exc}") from None
            metafunc.parametrize(CONTROL_PARAM, [MAIN, *specs], indirect=True,
                                 ids=[control_id(s) for s in (MAIN, *specs)])
        if self.options.seeds and "zoo_seed" in metafunc.fixturenames:
            metafunc.parametrize("zoo_seed", list(self.options.seeds), indirect=True,
                                 ids=[f"seed={s}" for s in self.options.seeds], scope="session")

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        self.collector.set_order(ids)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        kept, not_run = [], []
        for item in items:
            why = self._not_run(item)
            if why is None:
                kept.append(item)
            else:
                not_run.append(item)
                self.not_run.append({"nodeid": item.nodeid, **why})
        if not_run:  # deselected, not skipped: a first run shows what it ran; the report lists the rest
            config.hook.pytest_deselected(items=not_run)
            items[:] = kept
            if self.is_worker and hasattr(config, "workeroutput"):
                config.workeroutput["circuits_not_run"] = self.not_run
        self.collector.set_order([i.nodeid for i in items])
        for item in items:
            names = getattr(item, "fixturenames", ())
            if not any(f in names for f in CIRCUITS_FIXTURES):
                continue  # another project's test (or a plain one): its markers and tables are not ours
            spec = item_spec(item)
            if spec != MAIN:
                # a refuted hypothesis is an expected failure on its main run only: its controls must
                # still fail the claim, and are judged as for any claim
                item.own_markers[:] = [m for m in item.own_markers if m.name != "xfail"]
            # --circuits-seeds and --circuits-full-sweep score models trained here, where a known failure
            # may well pass
            _apply_known_failures(item, spec, reference=item_seed(item) is None and not self.options.full_sweep)
            item.user_properties.append((PROP_TEST, _test_meta(item).to_json()))

    def _not_run(self, item: pytest.Item) -> dict | None:
        """Why a collected test is left out of this run ({"reason", "option"}: the option that runs it),
        or None. Full-sweep grids run only with --circuits-full-sweep; the control and mutation runs of a
        known failure on the reference models test a claim that does not hold, so they run only where it
        may (--circuits-seeds, --circuits-full-sweep)."""
        if item.get_closest_marker("full_sweep") is not None and not self.options.full_sweep:
            return {"reason": "full-sweep grid tests", "option": "--circuits-full-sweep"}
        names = getattr(item, "fixturenames", ())
        if not any(f in names for f in CIRCUITS_FIXTURES):
            return None
        spec = item_spec(item)
        reference = item_seed(item) is None and not self.options.full_sweep
        if spec != MAIN and reference and _known_failure(item) is not None \
                and _known_failure(item, control_id(spec)) is None:
            return {"reason": "control / mutation runs of known failures (their claims do not hold on the "
                              "reference models)", "option": "--circuits-seeds"}
        return None

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: what a worker deselected (every worker collects the same, so the first one's list)."""
        listed = getattr(node, "workeroutput", {}).get("circuits_not_run")
        if listed and not self.not_run:
            self.not_run.extend(listed)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        """``--circuits-seeds`` / ``--circuits-full-sweep``: the models the collected tests need
        (zoo_fixtures.sweep_plan),
        trained up front by the sweep runner (in parallel); under xdist one worker does it while the
        others' fixtures wait on the store's lock."""
        from circuits.plugin.session import check_variants_known

        try:  # entries a conftest registers are known now
            check_variants_known(self.options.variants, collected=True)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        worker = getattr(session.config, "workerinput", {}).get("workerid")
        wanted = self.options.seeds or self.options.full_sweep
        if wanted and worker in (None, "gw0") and not session.config.option.collectonly:
            from circuits.plugin.zoo_fixtures import pretrain

            pretrain(session.config, self.options, session.items)

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

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: Any) -> Iterator[Any]:
        rep = yield
        excinfo = getattr(call, "excinfo", None)
        if rep.failed and excinfo is not None and excinfo.errisinstance((ControlRunError, CircuitsError)):
            # one line naming the problem (our errors are written to be read alone), never the plugin's
            # or the library's traceback
            where = "" if rep.when == "call" else f" (in {rep.when})"
            name = "error" if isinstance(excinfo.value, ControlRunError) else type(excinfo.value).__name__
            at = _user_frame(excinfo, item.config.rootpath)
            rep.longrepr = f"{item.nodeid}{where}: {name}: {excinfo.value}" + (f" (at {at})" if at else "")
        if rep.when == "call" and rep.skipped and getattr(rep, "wasxfail", None) is not None:
            # a known failure: its reason carries what was measured now, not a hand-copied number
            claims = item.stash.get(CLAIMS_KEY, None)
            ctl = item.stash.get(CONTROL_KEY, None)
            on_main = ctl is None or ctl.is_main  # a control run's known failure is a claim that held
            shown = [r.message for r in claims.records if r.passed != on_main] if claims is not None else []
            if shown:
                rep.wasxfail = f"{rep.wasxfail} | measured now: {'; '.join(shown)}"
        return rep

    def _flush_models(self, item: pytest.Item) -> None:
        while self.pending_models:
            item.user_properties.append((PROP_MODEL, self.pending_models.pop(0)))

    def _judge_control(self, item: pytest.Item, ctl: Any) -> None:
        claims = item.stash.get(CLAIMS_KEY, None)
        records = claims.records if claims is not None else []
        outcome, msg = judge_control(records, ctl)
        # the module's KNOWN_FAILURES reason for this run, if any: reports list it apart, not as a problem
        known = (_known_failure(item, control_id(ctl.spec)) or _known_unspecific(item, ctl.spec)
                 if outcome in ("no_teeth", "no_power", "unspecific") else None)
        item.user_properties.append((PROP_CONTROL, control_run_record(records, ctl, outcome, msg, known).to_json()))
        if outcome == "error":  # not pytest.fail: a known-failure xfail (raises=fail.Exception) must not absorb it
            raise ControlRunError(msg)
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
            self.collector.add_properties("<session>", [(PROP_MODEL, m) for m in self.pending_models])
        if self.collector.empty or self.config.getoption("collectonly", False):
            return
        from circuits import report as _report

        try:
            self.report = self.build_report(int(exitstatus))
            if self.reporting:
                self.paths = _report.write_run(self.report, self.options.run_dir)
        except Exception as exc:  # never lose the test outcome because the report failed
            self.write_error = f"{type(exc).__name__}: {exc}"
            if self.report is not None and self.reporting:
                try:
                    _report.write_json_atomic(self.options.run_dir / "report.json", self.report)
                except Exception as exc2:
                    self.write_error += f"; report.json not written either ({type(exc2).__name__}: {exc2})"

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if self.is_worker or (self.report is None and self.write_error is None):
            return
        from circuits import report as _report

        tr = terminalreporter
        if self.report is not None and config.get_verbosity() > -2:
            tr.write_sep("=", "circuits claims")
            for text, markup in _report.terminal_lines(self.report):
                tr.write_line(text, **markup)
        if self.write_error:
            tr.write_line(f"circuits: could not write the report: {self.write_error}", red=True)


def _user_frame(excinfo: Any, root: Any) -> str | None:
    """``path:line`` of the innermost frame outside this package, pytest and pluggy: where the user's
    code called the library (None for errors the plugin raised itself)."""
    import os
    from pathlib import Path

    pkg = str(Path(__file__).resolve().parent.parent)
    for entry in reversed(excinfo.traceback):
        path = str(entry.path)
        if path.startswith(pkg) or os.sep + "_pytest" + os.sep in path or os.sep + "pluggy" + os.sep in path:
            continue
        try:
            path = os.path.relpath(path, root)
        except ValueError:
            pass
        return f"{path}:{entry.lineno + 1}"
    return None


class ControlRunError(Exception):
    """A control or mutation run that measured nothing (never applied, no claims recorded): an error of
    the test, never a known failure."""


class ControlCollectError(pytest.Collector.CollectError):
    """A bad ``@pytest.mark.controls`` / ``about`` (unknown control, no claim fixture...), reported at
    collection as one line."""


def _run_specs(controls: list, targets: list, metafunc: pytest.Metafunc) -> list[str]:
    """The control runs of a test: its hand-written controls, then the mutations its ``about``
    targets call for (a mutation already listed as a control runs once, as the mutation)."""
    from circuits.claims import mutations
    from circuits.claims.controls import ControlError, parse_spec

    if "claim" not in metafunc.fixturenames:
        raise ControlError("@pytest.mark.controls / about need the test to use the claim fixture")
    for s in controls:
        if s == MAIN:
            raise ControlError(f"{MAIN!r} is the main run, not a control")
        parse_spec(s)  # unknown names fail here, at collection, listing the known ones
    if len(set(controls)) != len(controls):
        raise ControlError(f"a control is listed twice in {controls}")
    derived = mutations.derive_mutations(targets)
    for s in derived:
        parse_spec(s)
    # specificity: the claim pointed at each alternative of the part it names (model shape permitting)
    scopes = {m.kwargs["alternatives"] for m in metafunc.definition.iter_markers("about") if "alternatives" in m.kwargs}
    if len(scopes) > 1:
        raise ControlError(f"@pytest.mark.about markers disagree on alternatives=: {sorted(scopes)}")
    alternatives = mutations.derive_alternatives(targets, mutations.model_shape(metafunc.fixturenames),
                                                 scopes.pop() if scopes else "model")
    return ([c for c in controls if c not in derived] + [MUTATION_PREFIX + m for m in derived]
            + [ALTERNATIVE_PREFIX + a for a in alternatives])


# --- known failures -----------------------------------------------------------------------------------


def _known_failure(item: pytest.Item, run: str | None = None) -> str | None:
    """The reason a module's ``KNOWN_FAILURES`` table gives for this test, if any.

    Keys name a test as ``"test_x"``, ``"TestClass::test_x"`` or with its own parameters
    ``"test_x[H06]"`` (the plugin's control / seed ids never count). A key with a suffix
    ``" control=SPEC"`` (or ``" mutation=SPEC"``) names one control run instead: a claim that holds
    but has no teeth on that control (``run`` is that suffix's id). A key that names no test of its
    module is a collection error, so the table cannot go stale silently. The table is what the
    ``pytest_circuits_known_failures`` hook gives (by default the module's ``KNOWN_FAILURES``)."""
    table = _known_failures_table(item)
    if not table:
        return None
    test = group_of(item).split("::", 1)[-1]
    fn = getattr(item, "originalname", item.name)
    cls = getattr(getattr(item, "cls", None), "__name__", None)
    params = test[test.index("["):] if "[" in test else ""
    keys = [test, fn + params, fn] + ([f"{cls}::{fn}{params}", f"{cls}::{fn}"] if cls else [])
    for key in keys:
        key = f"{key} {run}" if run else key
        if key in table:
            return table[key]
    return None


def _known_unspecific(item: pytest.Item, spec: str) -> str | None:
    """A ``"test_x unspecific"`` key covers every alternative run of the test: its claim is known not
    to tell the named part from (some of) its alternatives; the reason states the measured ones."""
    if run_kind(spec) is not RunKind.ALTERNATIVE:
        return None
    return _known_failure(item, "unspecific")


_TABLES_KEY = pytest.StashKey[dict]()


def _known_failures_table(item: pytest.Item) -> dict:
    """The merged known-failures table of the item's module (every implementation of the hook, checked
    once per module and session)."""
    module = getattr(item, "module", None)
    if module is None:
        return {}
    config = item.config
    tables = config.stash.setdefault(_TABLES_KEY, {})
    if id(module) not in tables:
        hook = getattr(config.hook, "pytest_circuits_known_failures", None)
        given = hook(module=module, config=config) if hook is not None else [getattr(module, "KNOWN_FAILURES", None)]
        merged: dict = {}
        for table in given:
            if not table:
                continue
            _check_table(module, table)
            for key, reason in table.items():
                if merged.get(key, reason) != reason:
                    raise pytest.UsageError(f"{module.__name__}: known failure {key!r} is given two reasons: "
                                            f"{merged[key]!r} and {reason!r}")
                merged[key] = reason
        tables[id(module)] = merged
    return tables[id(module)]


def _check_table(module: Any, table: Any) -> None:
    if not isinstance(table, dict) or not all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                              for k, v in table.items()):
        raise pytest.UsageError(f"{module.__name__}.KNOWN_FAILURES must map test names to non-empty reasons")
    for key in table:
        head = key.split(" ", 1)[0].split("[", 1)[0]
        obj: Any = module
        for part in head.split("::"):
            obj = getattr(obj, part, None)
        if obj is None:
            raise pytest.UsageError(f"{module.__name__}.KNOWN_FAILURES names {key!r}, which is no test of the "
                                    "module (a stale entry?)")


def _apply_known_failures(item: pytest.Item, spec: str, reference: bool) -> None:
    """A known failure is an expected failure of its main run, expecting only a failed claim (a
    crash is an error, never an XFAIL), strict on the reference models (it must keep failing) and
    lenient under --circuits-seeds and --circuits-full-sweep (a retrained model may well pass: the report
    shows it as a flip). Its control and mutation runs on the reference are deselected at collection
    (listed in the report as not run): they test a claim that does not hold."""
    from circuits.claims.core import ClaimFailure

    if spec != MAIN:
        run_reason = _known_failure(item, control_id(spec)) or _known_unspecific(item, spec)
        if run_reason is not None:  # a claim that holds, known to have no teeth on this control
            # (a test-wide "unspecific" key covers alternatives that hold and ones that fail: not strict)
            per_run = _known_failure(item, control_id(spec)) is not None
            item.add_marker(pytest.mark.xfail(strict=reference and per_run, raises=pytest.fail.Exception,
                                              reason=f"known failure of this control run: {run_reason}"))
            return
    reason = _known_failure(item)
    if reason is None:
        # a bare xfail marker on a claim test also only expects a failed claim
        for i, m in enumerate(item.own_markers):
            if m.name == "xfail" and "raises" not in m.kwargs and "claim" in getattr(item, "fixturenames", ()):
                item.own_markers[i] = pytest.mark.xfail(*m.args, **{**m.kwargs, "raises": ClaimFailure}).mark
        return
    if spec == MAIN:
        item.add_marker(pytest.mark.xfail(strict=reference, raises=ClaimFailure, reason=f"known failure: {reason}"))
    # (its control and mutation runs on the reference are deselected at collection: CircuitsPlugin._not_run)


# --- fixtures ----------------------------------------------------------------------------------------


def _test_meta(item: pytest.Item) -> TestMeta:
    spec = item_spec(item)
    mod = getattr(item, "module", None)
    fn = getattr(item, "function", None)
    controls = [s for m in item.iter_markers("controls") for s in m.args]
    targets = [t for m in item.iter_markers("about") for t in m.args]
    none = next((m.kwargs["none"] for m in item.iter_markers("about") if m.kwargs.get("none")), None)
    return TestMeta(
        module=item.nodeid.split("::")[0],
        group=group_of(item),
        test=item.nodeid.split("::", 1)[-1],
        control=None if spec == MAIN else spec,
        control_kind=None if spec == MAIN else str(run_kind(spec)),
        seed=item_seed(item),
        module_doc=_first_paragraph(getattr(mod, "__doc__", None), 1000),
        doc=_first_paragraph(getattr(fn, "__doc__", None), 300),
        about=targets,
        controls_declared=controls,
        # no mutation and nothing but controls that fail for any broken model: teeth, not power
        generic_only=bool(not targets and controls and set(controls) <= GENERIC_CONTROLS),
        # flagged apart: nothing checks this claim's teeth, and the test does not say why (about(none=...))
        no_controls=not targets and not controls and not none,
        about_none=none,  # why the claims are about no part of a model (no mutation derived)
        known_failure=_known_failure(item),
    )


def _first_paragraph(doc: str | None, limit: int) -> str:
    if not doc:
        return ""
    para = doc.strip().split("\n\n")[0]
    return " ".join(para.split())[:limit]


@pytest.fixture
def circuits_control(request: pytest.FixtureRequest, circuits_draws):
    """The negative control or mutation of this run: a null control (identity) on the main run (the
    fixture the plugin's own fixtures use; ``control`` is its public name). A control's randomness
    (a shuffle, a permutation, a fresh initialisation) is the test's ``control`` draw stream, so
    ``--circuits-draws-seed`` re-draws it with the test's other draws."""
    from circuits.claims.controls import main_control, make_control

    spec = getattr(request, "param", MAIN)
    if spec == MAIN:
        ctl = main_control()
    else:
        ctl = make_control(spec_name(spec),
                           seed=circuits_draws.child("control").int(2**31),
                           roles=lambda: request.getfixturevalue("head_roles"))
        ctl.spec = spec
    request.node.stash[CONTROL_KEY] = ctl
    return ctl


@pytest.fixture
def control(circuits_control):
    """The negative control or mutation of this run: a null control (identity) on the main run."""
    return circuits_control


@pytest.fixture
def draws(circuits_draws):
    """This test's random draws (:class:`circuits.claims.draws.Draws`), changed by ``--circuits-draws-seed``; the
    same for a test's main run and its control runs."""
    return circuits_draws


@pytest.fixture
def circuits_draws(request: pytest.FixtureRequest):
    """This test's random draws (:class:`circuits.claims.draws.Draws`), changed by ``--circuits-draws-seed``; the
    same for a test's main run and its control runs."""
    from circuits.claims.draws import Draws

    return Draws(draws_seed_for(get_plugin(request.config).options.draws_seed, group_of(request.node)))


@pytest.fixture
def claim(request: pytest.FixtureRequest, circuits_control, circuits_draws):
    """Record-then-assert claims: ``claim.at_least(name, value, threshold)`` etc."""
    control, draws = circuits_control, circuits_draws
    from circuits.claims.core import Claims

    item = request.node

    def sink(rec) -> None:
        item.user_properties.append((PROP_CLAIM, rec.to_json()))

    claims = Claims(sink, raise_on_failure=control.is_main, control=None if control.is_main else control.spec,
                    seed=item_seed(item), draws_seed=draws.child("bootstrap").int(2**32))
    item.stash[CLAIMS_KEY] = claims
    return claims


@pytest.fixture
def figures(request: pytest.FixtureRequest, circuits_control):
    """``figures.add(name, fig, caption=...)``: render a matplotlib Figure into the report (main runs
    with a report only: a negative control's figures, and figures under --circuits-no-report, are not
    drawn)."""
    control = circuits_control
    from circuits.report.figures import Figures, slug, write_png

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
        item.user_properties.append((PROP_FIGURE, FigureRecord(name=name, caption=caption, path=rel, bytes=len(png),
                                                               error=error, group=group_of(item)).to_json()))

    return Figures(sink, render=plugin.reporting and control.is_main)


@pytest.fixture(scope="session")
def zoo_seed(request: pytest.FixtureRequest) -> int | None:
    """The training seed under ``--circuits-seeds`` (one per parametrised run), else None (the reference)."""
    return getattr(request, "param", None)


@pytest.fixture(scope="session")
def circuits_options(request: pytest.FixtureRequest) -> RunOptions:
    """This run's parsed options (seeds, retrain, device, full_sweep, draws_seed, run dir...)."""
    return get_plugin(request.config).options


@pytest.fixture(scope="session")
def head_roles() -> dict:
    """Role name -> (layer, head) for controls and mutations named by role (``zero_ablate:count_head``).
    Empty here: a module or conftest that binds roles overrides this fixture."""
    return {}


@pytest.fixture(scope="session")
def zoo_models(request: pytest.FixtureRequest):
    """The session's zoo loader (:class:`circuits.plugin.zoo_fixtures.ZooSession`)."""
    from circuits.plugin.zoo_fixtures import ZooSession

    return ZooSession(request.config, get_plugin(request.config).options)


# --- data and reference models the README's examples use (shipped with the package) ------------------


@pytest.fixture(scope="session")
def arena_model(circuits_options):
    """The published ARENA bracket classifier (shipped with the package, checksum-verified), in our
    model on the run's device."""
    from circuits.tasks.brackets import reference

    return reference.arena_model(device=circuits_options.device)


@pytest.fixture(scope="session")
def bracket_data():
    """The first 5,000 published bracket strings (the seed's evaluation set, shipped with the package)."""
    from circuits.tasks.brackets import reference

    return reference.arena_data(reference.N_EVAL)

