"""report.json on disk: write a run (JSON first, then the Markdown and HTML made from it), find and
load a run by id / path / "latest" / "baseline", and promote a run to the committed baseline.

Layout of a run (``<report-dir>/<run-id>/``): ``report.json``, ``report.md``, ``report.html`` and
``figures/``; ``<report-dir>/latest`` links to the newest run (``latest.txt`` holds its id);
``<report-dir>/baseline/`` is the committed baseline (``python -m circuits report --promote-baseline [RUN]``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from circuits.atomic import write_bytes_atomic
from circuits.errors import CircuitsError
from circuits.records import RecordError, Run, as_run, jsonable
from circuits.report.html import render_html
from circuits.report.markdown import render_markdown

__all__ = ["ReportError", "ReportNotFoundError", "write_json_atomic", "write_text_atomic", "write_run",
           "resolve_report", "load_report", "set_baseline"]


class ReportError(CircuitsError, ValueError):
    """A report that cannot be read or written as asked."""


class ReportNotFoundError(ReportError, FileNotFoundError):
    """A run id or path that names no report.json; the message lists what was tried."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write strict JSON (no NaN) via a temp file + os.replace, so readers never see half a file."""
    data = json.dumps(jsonable(obj), indent=1, allow_nan=False, ensure_ascii=False) + "\n"
    write_bytes_atomic(Path(path), data.encode("utf-8"))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(Path(path), text.encode("utf-8"))


def point_latest(report_dir: Path, run_id: str) -> None:
    """``<report-dir>/latest`` -> the newest run: a relative symlink where the platform allows one (so
    ``reports/latest/report.html`` opens), else a text file holding the run id; ``latest.txt`` holds
    the id on every platform. Both are replaced atomically."""
    report_dir = Path(report_dir)
    write_text_atomic(report_dir / "latest.txt", run_id + "\n")
    link = report_dir / "latest"
    tmp = report_dir / f".latest.{os.getpid()}.tmp"
    try:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(run_id, tmp, target_is_directory=True)
        os.replace(tmp, link)  # (a symlink replaces the old text file or link in one step)
    except OSError:  # no symlinks here (e.g. Windows without the privilege): the text file, as before
        try:
            tmp.unlink()
        except OSError:
            pass
        if link.is_symlink():
            link.unlink()
        write_text_atomic(link, run_id + "\n")


def write_run(report: Run | dict, run_dir: Path, *, update_latest: bool = True) -> dict[str, Path]:
    """Write report.json first (the part that must survive), then report.md and report.html."""
    report = as_run(report)
    run_dir = Path(run_dir)
    paths = {"json": run_dir / "report.json", "md": run_dir / "report.md", "html": run_dir / "report.html"}
    write_json_atomic(paths["json"], report)
    if update_latest:
        point_latest(run_dir.parent, run_dir.name)
    write_text_atomic(paths["md"], render_markdown(report))
    write_text_atomic(paths["html"], render_html(report, run_dir))
    # kept in memory only (not in report.json): the terminal's one-line summary names the page
    report.html_path = str(paths["html"])
    return paths


def resolve_report(ref: str | os.PathLike, report_dir: Path | str) -> Path:
    """The report.json named by ``ref``: a path (file or run dir), a run id, "latest" or "baseline"."""
    report_dir = Path(report_dir)
    ref_s = str(ref)
    tried: list[Path] = []
    p = Path(ref_s).expanduser()
    candidates = [p, p / "report.json"]
    if ref_s == "latest":
        for pointer in ("latest", "latest.txt"):  # a symlink is found below as a run dir; a text file names one
            f = report_dir / pointer
            if f.is_file() and not f.is_symlink():
                candidates.append(report_dir / f.read_text().strip() / "report.json")
    candidates.append(report_dir / ref_s / "report.json")
    for c in candidates:
        tried.append(c)
        if c.is_file():
            return c
    runs = sorted((d.name for d in report_dir.iterdir() if (d / "report.json").is_file()), reverse=True) \
        if report_dir.is_dir() else []
    avail = ", ".join(runs[:8]) + (" ..." if len(runs) > 8 else "") if runs else "none"
    raise ReportNotFoundError(
        f"no report for {ref_s!r}: tried {', '.join(str(t) for t in dict.fromkeys(tried))}; "
        f"runs in {report_dir}: {avail}")


def load_report(ref: str | os.PathLike, report_dir: Path | str = "reports") -> Run:
    """The run a report.json holds (any schema: an older one is read into the current records)."""
    path = resolve_report(ref, report_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read report {path}: {exc}") from None
    check_report_shape(data, path)
    try:
        run = Run.from_json(data)
    except RecordError as exc:
        raise ReportError(f"{path} is not a circuits report: {exc}") from None
    run.path = run.path or str(path)
    return run


def check_report_shape(data: Any, path: Path | str) -> None:
    """ReportError (one line) unless ``data`` has the shape comparing runs reads: an object whose
    'claims' (and 'tests', when present) are lists of objects. A hand-edited or foreign report is
    refused when it is loaded, not after the run it is compared with."""
    if not isinstance(data, dict) or "claims" not in data:
        raise ReportError(f"{path} is not a circuits report (no 'claims')")
    for field in ("claims", "tests"):
        if field not in data:
            continue
        rows = data[field]
        if not isinstance(rows, list):
            raise ReportError(f"{path} is not a circuits report: its {field!r} is a JSON {type(rows).__name__}, "
                              "not a list")
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise ReportError(f"{path} is not a circuits report: {field}[{bad}] is a JSON "
                              f"{type(rows[bad]).__name__}, not an object")


def set_baseline(run_dir: Path | str, report_dir: Path | str | None = None) -> Path:
    """Copy a run's report.json (and report.md) to ``<report-dir>/baseline/``; returns the JSON path."""
    run_dir = Path(run_dir)
    src = run_dir / "report.json" if run_dir.is_dir() else run_dir
    if not src.is_file():
        raise ReportNotFoundError(f"no report.json at {src}")
    report_dir = Path(report_dir) if report_dir is not None else src.parent.parent
    dest = report_dir / "baseline"
    try:
        run = Run.from_json(json.loads(src.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read report {src}: {exc}") from None
    run.baseline_of = run.run_id
    write_json_atomic(dest / "report.json", run)
    if (src.parent / "report.md").is_file():
        shutil.copyfile(src.parent / "report.md", dest / "report.md")
    return dest / "report.json"
