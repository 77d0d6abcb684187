"""Run reports: records -> report.json, report.md (CI summary), report.html (one page), terminal summary.

One module per job, imports pointing down (no module here imports this package back)::

    machine   machine, versions, git commit (the one place that asks)      <- records
    collect   RunCollector: pytest's test reports -> the run (a Run record) <- records
    compare   two runs: flips, moves above a noise floor, subsets          <- records
    views     what the outputs show, as data (roll-up, power matrix, robustness)  <- collect, machine
    markdown / html / terminal   format the views                          <- views, compare
    json_io   write / load / resolve report.json, promote a baseline       <- markdown, html

``python -m circuits report`` shows a run and ``--promote-baseline`` copies one to
``<report-dir>/baseline/``. This package knows nothing about pytest beyond duck-typed test reports, and
reads and writes the run's records (:mod:`circuits.records`) only: a report.json dict given to any
output is read into a :class:`~circuits.records.Run` first.
"""

import importlib

# Loaded on first use (PEP 562): the pytest plugin imports `circuits.report.collect` at start-up in
# every project that installs the wheel, and the outputs below pull in numpy (~0.35 s); a project that
# never uses circuits must not pay for them.
_WHERE = {
    "collect": ("GENERIC_CONTROLS", "SCHEMA", "RunCollector", "pass_rates", "rederive"),
    "compare": ("ABS_TOL", "REL_TOL", "compare_display_rows", "compare_reports"),
    "html": ("render_html",),
    "json_io": ("ReportError", "ReportNotFoundError", "load_report", "resolve_report", "set_baseline",
                "write_json_atomic", "write_run", "write_text_atomic"),
    "machine": ("git_info", "machine_info", "now_iso"),
    "markdown": ("md_escape", "render_markdown"),
    "terminal": ("terminal_lines",),
    "views": ("claim_rows", "fmt_margin", "headline", "module_rollup", "one_line_summary", "ordered_metrics",
              "power_matrix", "problem_tests", "robustness", "where", "wilson_interval"),
}
_MODULE_OF = {name: mod for mod, names in _WHERE.items() for name in names}


def __getattr__(name: str):
    if name in _MODULE_OF:  # (not cached here: sys.modules is the one cache, as pytester's restores expect)
        return getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    if name in _WHERE:  # a submodule as an attribute (`report.views`)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF) | set(_WHERE))


__all__ = [
    "SCHEMA", "GENERIC_CONTROLS", "ABS_TOL", "REL_TOL", "ReportError", "ReportNotFoundError", "RunCollector",
    "pass_rates", "rederive", "compare_reports", "compare_display_rows", "render_html", "render_markdown", "md_escape",
    "terminal_lines", "write_run", "write_json_atomic", "write_text_atomic", "load_report", "resolve_report",
    "set_baseline", "machine_info", "git_info", "now_iso", "claim_rows", "fmt_margin", "headline", "module_rollup",
    "one_line_summary", "ordered_metrics", "power_matrix", "problem_tests", "robustness", "where", "wilson_interval",
]
