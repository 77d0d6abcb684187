"""Run reports: records -> report.json, report.md (CI summary), report.html (one page), terminal summary.

One module per job, imports pointing down (no module here imports this package back)::

    machine   machine, versions, git commit (the one place that asks)      leaf
    collect   RunCollector: pytest's test reports -> the run dict          <- claims
    compare   two runs: flips, moves above a noise floor, subsets          leaf
    views     what the outputs show, as data (roll-up, power matrix, robustness)  <- collect, machine
    markdown / html / terminal   format the views                          <- views, compare
    json_io   write / load / resolve report.json, promote a baseline       <- markdown, html

``python -m circuits report`` shows a run and ``--promote-baseline`` copies one to
``<report-dir>/baseline/``. This package knows nothing about pytest beyond duck-typed test reports.
"""

from .collect import GENERIC_CONTROLS, SCHEMA, RunCollector, pass_rates, rederive
from .compare import ABS_TOL, REL_TOL, compare_display_rows, compare_reports
from .html import render_html
from .json_io import (ReportError, ReportNotFoundError, load_report, resolve_report, set_baseline, write_json_atomic,
                      write_run, write_text_atomic)
from .machine import git_info, machine_info, now_iso
from .markdown import md_escape, render_markdown
from .terminal import terminal_lines
from .views import (claim_rows, fmt_margin, headline, module_rollup, one_line_summary, ordered_metrics, power_matrix,
                    problem_tests, robustness, where, wilson_interval)

__all__ = [
    "SCHEMA", "GENERIC_CONTROLS", "ABS_TOL", "REL_TOL", "ReportError", "ReportNotFoundError", "RunCollector",
    "pass_rates", "rederive", "compare_reports", "compare_display_rows", "render_html", "render_markdown", "md_escape",
    "terminal_lines", "write_run", "write_json_atomic", "write_text_atomic", "load_report", "resolve_report",
    "set_baseline", "machine_info", "git_info", "now_iso", "claim_rows", "fmt_margin", "headline", "module_rollup",
    "one_line_summary", "ordered_metrics", "power_matrix", "problem_tests", "robustness", "where", "wilson_interval",
]
