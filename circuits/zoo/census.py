"""A census of claims across training recipes and seeds (issue 17): which claims survive retraining.

`run_census(name, recipes, seeds, module)`:

1. trains what the model store lacks, recipe by recipe, through the sweep runner (`circuits.zoo.sweep`;
   a second census finds everything stored and trains nothing);
2. runs the hypothesis module once per recipe in a pytest subprocess,
   ``pytest MODULE [--circuits-variant NAME@RECIPE] --circuits-seeds S -k SELECT``, streaming its output to the screen
   (the "default" recipe is the entry itself, without ``--circuits-variant``);
3. optionally runs it once more without ``--circuits-seeds``: the rows of the fixed subjects (our reference
   checkpoint, a published checkpoint...), one row per test class that ran there;
4. reads each run's report.json and writes a table recipe x claim -> seeds passing, with each
   model's held-out test accuracy and its Wilson 95% interval, as ``census.json``, ``census.md`` and
   ``census.png`` under ``<out>/<name>/`` (the pytest runs' own reports go to ``<out>/<name>/runs/``).

Claims are matched across rows by (test function, claim name), the test's class left out, so a claim
written once for several subjects (the ARENA checkpoint and our models) is one column. In a recipe
run only claims carrying a seed count (claims on a fixed subject belong to the reference run). A
seed whose test ran but never reached a claim counts as not passed (the report's pass-rate rule).

The runs keep only the claims' main runs (``main_only``), without their controls and mutations
(whose ids carry ``control=`` / ``mutation=``; deselected by this module's pytest hook, loaded into
each run with ``-p circuits.zoo.census``: ``-k`` cannot do it, as it also matches marker names such as
``controls``); those check that a claim can fail, which the module's ordinary runs already establish,
and they cost several times the claims themselves.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from circuits.atomic import write_bytes_atomic
from circuits.errors import CircuitsError, InputError
from circuits.paths import CACHE_ENV
from circuits.report.machine import commit_text
from circuits.records import (MAIN, CensusCell, CensusRow, ClaimResult, Record, Run, SeedAccuracy, SeedVerdict, as_run,
                      jsonable)

__all__ = ["DEFAULT_RECIPE", "CensusError", "Census", "run_census", "zoo_name", "build_table", "write_outputs"]

DEFAULT_RECIPE = "default"  # the zoo entry's own recipe (no variant)
MAIN_ONLY_ENV = "CIRCUITS_CENSUS_MAIN_ONLY"


class CensusError(CircuitsError):
    """A census step that cannot go on: a training failed, a pytest run wrote no report."""


def zoo_name(name: str, recipe: str) -> str:
    from circuits.zoo.registry import VARIANT_SEP

    return name if recipe == DEFAULT_RECIPE else f"{name}{VARIANT_SEP}{recipe}"


@dataclass
class Census:
    name: str
    module: str
    seeds: list
    recipes: list
    rows: list = field(default_factory=list)  # [CensusRow]
    columns: list = field(default_factory=list)  # claim columns, in first-seen order
    timings: dict = field(default_factory=dict)
    runs: dict = field(default_factory=dict)  # row label -> report.json path
    commits: dict = field(default_factory=dict)  # row label -> the commit its claims ran at (commit_text)
    recipe_seeds: dict = field(default_factory=dict)  # recipe -> the seeds its row covers
    acc_target: Optional[float] = None
    backend: str = "single"  # the trainer the models came from (circuits.zoo.ensemble.backend)

    def to_dict(self) -> dict:
        return {"name": self.name, "module": self.module, "seeds": self.seeds, "recipes": self.recipes,
                "backend": self.backend,
                "acc_target": self.acc_target, "columns": self.columns,
                "rows": [row.to_json() for row in census_rows(self)],
                "timings": self.timings, "runs": self.runs, "commits": self.commits,
                "recipe_seeds": self.recipe_seeds}


# --------------------------------------------------------------------------------------------- steps


def _check(name: str, recipes: Sequence[str], seeds: Sequence[int], module: str) -> None:
    from circuits.zoo import registry as zoo

    if not recipes:
        raise InputError("census: name at least one recipe (e.g. --recipes default,label_only)")
    if not seeds:
        raise InputError("census: name at least one seed (e.g. --seeds 0-4)")
    for recipe in recipes:
        zoo.get_entry(zoo_name(name, recipe))  # an unknown recipe fails here, before any training
    if not Path(module).is_file():
        raise InputError(f"census: hypothesis module {module!r} is not a file")


def train_missing(name: str, recipes: Sequence[str], seeds: Sequence[int], *, root, workers: int = 1,
                  stream=None, ensemble: Optional[int] = None) -> dict:
    """Every (recipe, seed) the store at `root` lacks, trained through the sweep runner; the default
    recipe's reference seeds are served by their committed checkpoints and never trained here.
    Returns recipe -> seconds."""
    from circuits.zoo import registry as zoo
    from circuits.zoo.sweep import run_sweep

    seconds = {}
    for recipe in recipes:
        zname = zoo_name(name, recipe)
        entry = zoo.get_entry(zname)
        todo = [s for s in seeds if s not in entry.ref_seeds()]
        t0 = time.perf_counter()
        if todo:
            result = run_sweep(zname, todo, root=root, workers=workers, stream=stream, ensemble=ensemble)
            if not result.ok:
                raise CensusError(f"census: training {zname} failed for seeds {sorted(result.failed)}: "
                                  + "; ".join(f"{s}: {m}" for s, m in sorted(result.failed.items())))
        seconds[recipe] = round(time.perf_counter() - t0, 2)
    return seconds


def stored_seeds(name: str, recipe: str, seeds: Sequence[int], root) -> list:
    """The seeds of `recipe` a census can run without training: committed references and stored models."""
    from circuits.zoo import registry as zoo
    from circuits.zoo.store import ModelStore

    zname = zoo_name(name, recipe)
    return [s for s in seeds if zoo.find_card(zname, s, store=ModelStore(root)) is not None]


def pytest_collection_modifyitems(config, items) -> None:
    """In a census run (``-p circuits.zoo.census`` with $CIRCUITS_CENSUS_MAIN_ONLY=1): main runs only."""
    if os.environ.get(MAIN_ONLY_ENV) != "1":
        return
    from circuits.plugin.session import item_spec  # the run's spec, as the plugin parametrised it: no test-id parsing

    keep = [it for it in items if item_spec(it) == MAIN]
    dropped = [it for it in items if item_spec(it) != MAIN]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


INPUTS_FILE = "census-inputs.json"


def _digest_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(set(paths)):
        h.update(str(path).encode() + b"\0")
        h.update(Path(path).read_bytes() if Path(path).is_file() else b"<missing>")
    return h.hexdigest()


def run_inputs(module: str, args: Sequence[str], models: Sequence[dict], main_only: bool) -> dict:
    """Everything a census row's claims depend on: the hypothesis module and the conftests beside and
    above it, every source file of the circuits package, the pytest arguments, and the content hash of
    each model the run reads. A stored run whose inputs are equal is reused instead of rerun (the
    claims are deterministic given these: draws are seeded), so a second census takes seconds."""
    module_path = Path(module).resolve()
    conftests = [d / "conftest.py" for d in [module_path.parent, *module_path.parent.parents][:3]]
    package = Path(__file__).resolve().parent.parent
    return {"module": _digest_files([module_path, *[c for c in conftests if c.is_file()]]),
            "package": _digest_files(package.rglob("*.py")), "args": list(args), "main_only": main_only,
            "models": list(models)}


def _model_hashes(zname: str, seeds: Sequence[int], root) -> list:
    """(name, seed, content hash) of each model a row reads: its committed reference or stored card."""
    from circuits.zoo import registry as zoo
    from circuits.zoo.store import ModelStore

    out = []
    for seed in seeds:
        card = zoo.find_card(zname, seed, store=ModelStore(root))
        out.append({"name": zname, "seed": seed, "content_hash": None if card is None else card.get("content_hash")})
    return out


def stored_run(run_dir: Path, inputs: dict) -> Optional[Path]:
    """The report of an earlier run of this row with the same inputs, else None."""
    report, saved = run_dir / "report.json", run_dir / INPUTS_FILE
    try:
        same = json.loads(saved.read_text()) == json.loads(json.dumps(inputs))
    except (OSError, ValueError):
        return None
    return report if same and report.is_file() else None


def _repo_relative(path: Path) -> str:
    """`path` relative to the current directory (the repository when run there), else as given."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def run_pytest(module: str, args: Sequence[str], run_id: str, report_dir: Path, *, root, stream=None,
               label: str = "", main_only: bool = True, inputs: Optional[dict] = None,
               rerun: bool = False, threads: Optional[int] = None) -> Path:
    """One pytest subprocess on `module`, its output streamed line by line (prefixed with `label`);
    returns its report.json. The store at `root` is passed on as $CIRCUITS_CACHE. With `inputs`
    (run_inputs), an earlier run of this row with the same inputs is reused unless `rerun`."""
    stream = stream or sys.stderr
    run_dir = Path(report_dir) / run_id
    if inputs is not None and not rerun:
        found = stored_run(run_dir, inputs)
        if found is not None:
            stream.write(f"[census {label}] reused {found}: module, package, arguments and models unchanged\n")
            return found
    if run_dir.exists():  # our own earlier census run of this row: replaced, not mixed in
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "pytest", module, *args, "--circuits-run-id", run_id,
           "--circuits-report-dir", str(report_dir),
           "-q", "-p", "no:randomly", "-p", "no:cacheprovider", "-p", "circuits.zoo.census"]
    env = {**os.environ, CACHE_ENV: str(root), MAIN_ONLY_ENV: "1" if main_only else "0"}
    if threads is not None:  # rows run side by side: their torch threads share the cores
        env["CIRCUITS_THREADS"] = str(threads)
    stream.write(f"[census {label}] {' '.join(cmd[1:])}\n")
    stream.flush()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        stream.write(f"[census {label}] {line}")
        stream.flush()
    rc = proc.wait()
    report = run_dir / "report.json"
    if not report.is_file():  # pytest exits 1 when claims fail: that is data; no report is not
        raise CensusError(f"census: `pytest {module}` for {label} exited {rc} without writing {report}")
    if inputs is not None and rc in (0, 1):  # an interrupted or crashed run is never reused
        write_bytes_atomic(run_dir / INPUTS_FILE, (json.dumps(inputs, indent=1) + "\n").encode())
    return report


# --------------------------------------------------------------------------------------------- table


def _load_run(path: Path) -> Run:
    """A row's report.json, read through the run's records (any schema)."""
    try:
        return Run.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise CensusError(f"census: cannot read {path}: {exc}") from None


def census_rows(census: "Census") -> list[CensusRow]:
    """The census's rows as records (rows may be given as their JSON, as census.json holds them)."""
    return [CensusRow.from_json(r) for r in census.rows]


def _column(claim: ClaimResult) -> str:
    test = (claim.group or claim.nodeid).split("::")[-1]
    return f"{test}: {claim.name}"


def _subject(claim: ClaimResult) -> str:
    parts = (claim.group or claim.nodeid).split("::")
    return parts[1] if len(parts) >= 3 else "module"


def _ran_seeds(report: Run) -> dict:
    """group -> seeds whose main run ran (not skipped)."""
    ran = defaultdict(set)
    for t in report.tests:
        if not t.control and t.outcome not in ("skipped", None):
            ran[t.group or t.nodeid].add(t.seed)
    return ran


def cells(report: Run | dict, seeded: bool) -> dict:
    """subject -> column -> {seed: SeedVerdict}: the main-run claims of one report, those with a seed
    (seeded) or those without. A seed on which the test ran but never reached the claim has
    ``passed`` None."""
    report = as_run(report)
    out: dict = defaultdict(lambda: defaultdict(dict))
    ran = _ran_seeds(report)
    groups: dict = defaultdict(set)
    for c in report.claims:
        if c.control or (c.seed is not None) != seeded:
            continue
        out[_subject(c)][_column(c)][str(c.seed)] = SeedVerdict(passed=bool(c.passed), value=c.value, status=c.status)
        groups[(_subject(c), _column(c))].add(c.group)
    for (subject, column), gs in groups.items():
        for g in gs:
            for seed in ran.get(g, ()):
                if (seed is not None) == seeded:
                    out[subject][column].setdefault(str(seed), SeedVerdict(status="not reached"))
    return out


def _summarise(by_seed: dict) -> CensusCell:
    k = sum(v.passed is True for v in by_seed.values())
    return CensusCell(passed=k, n=len(by_seed), seeds=dict(sorted(by_seed.items())))


def accuracy(name: str, recipe: str, seeds: Sequence[int], root) -> dict:
    """str(seed) -> SeedAccuracy: each model's card test accuracy (the final held-out set, scored once
    after training) with its Wilson 95% interval; None where the card has none."""
    from circuits.zoo import registry as zoo
    from circuits.report.views import held_out
    from circuits.zoo.store import ModelStore

    zname = zoo_name(name, recipe)
    entry = zoo.get_entry(zname)
    n_test = int(getattr(entry.recipe, "n_test", 0) or 0)
    out = {}
    for seed in seeds:
        card = zoo.find_card(zname, seed, store=ModelStore(root))
        h = None if card is None else held_out(card.get("metrics"), n_test)
        out[str(seed)] = None if h is None else SeedAccuracy(test_acc=h.test_acc, n_test=h.n_test, lo=h.lo, hi=h.hi,
                                                             steps=card.get("steps"), wall_time=card.get("wall_time"))
    return out


def build_table(census: Census, recipe_reports: dict, reference_report: Optional[Run | dict], root) -> Census:
    """Fill census.rows/columns from the reports (recipe -> its run's report; the plain run's report)."""
    columns: list = []

    def add(row_claims):
        for col in row_claims:
            if col not in columns:
                columns.append(col)

    rows = []
    if reference_report is not None:
        for subject, claims in sorted(cells(reference_report, seeded=False).items()):
            row = CensusRow(label=f"reference: {subject}", kind="reference", seeds=[None],
                            claims={col: _summarise(v) for col, v in claims.items()})
            add(row.claims)
            rows.append(row)
    for recipe, report in recipe_reports.items():
        merged: dict = defaultdict(dict)
        for subject, claims in cells(report, seeded=True).items():
            for col, by_seed in claims.items():
                merged[col].update(by_seed)
        row_seeds = list(census.recipe_seeds.get(recipe, census.seeds))
        row = CensusRow(label=recipe, kind="recipe", seeds=row_seeds,
                        claims={col: _summarise(v) for col, v in merged.items()},
                        accuracy=accuracy(census.name, recipe, row_seeds, root))
        add(row.claims)
        rows.append(row)
    census.rows, census.columns = rows, columns
    return census


# --------------------------------------------------------------------------------------------- outputs


def _fmt_cell(cell: Optional[CensusCell]) -> str:
    if cell is None:
        return "–"
    if cell.n == 1 and "None" in cell.seeds:
        return "pass" if cell.passed else "FAIL"
    return f"{cell.passed}/{cell.n}"


def accuracy_lines(census: Census) -> list[str]:
    lines = []
    target = census.acc_target
    for row in census_rows(census):
        if row.kind != "recipe":
            continue
        shown = []
        hits = 0
        for seed, a in row.accuracy.items():
            if a is None:
                shown.append(f"s{seed}: –")
                continue
            hits += target is not None and a.test_acc >= target
            shown.append(f"s{seed}: {a.test_acc:.3%} [{a.lo:.3%}, {a.hi:.3%}]")
        tail = f" | {hits}/{len(row.accuracy)}" if target is not None else ""
        lines.append(f"| {row.label} | " + "; ".join(shown) + tail + " |")
    return lines


@dataclass(frozen=True)
class Survival(Record):
    """A recipe row's claim: seeds passing k of n, the rate and its Wilson 95% interval, the reference
    rows' verdicts on it, and flags where a reference verdict differs from most seeds."""

    recipe: str = ""
    claim: str = ""
    passed: int = 0
    n: int = 0
    rate: float = 0.0
    lo: float = 0.0
    hi: float = 1.0
    reference: dict = field(default_factory=dict)  # reference row label -> passed
    flags: list = field(default_factory=list)


def survival(census: Census) -> list[Survival]:
    """Per recipe row and claim: seeds passing k of n, the rate, its Wilson 95% interval, the
    reference rows' verdicts on the same claim, and a flag where a reference verdict differs from
    what most seeds of the recipe did (a claim the reference passes that most retrained seeds fail,
    or the other way round: what holds on one checkpoint is then not what retraining gives)."""
    from circuits.report.views import wilson_interval

    rows = census_rows(census)
    refs = [r for r in rows if r.kind == "reference"]
    out = []
    for row in rows:
        if row.kind != "recipe":
            continue
        for col in census.columns:
            cell = row.claims.get(col)
            if not cell or not cell.n:
                continue
            k, n = cell.passed, cell.n
            lo, hi = wilson_interval(k, n)
            most = k * 2 > n  # most seeds pass (a tie is not "most")
            verdicts, flags = {}, []
            for ref in refs:
                rc = ref.claims.get(col)
                if not rc or not rc.n:
                    continue
                passed = rc.passed == rc.n
                verdicts[ref.label] = passed
                if passed != most and not (k * 2 == n):
                    flags.append(f"{ref.label} {'passes' if passed else 'fails'}, "
                                 f"{'most seeds fail' if passed else 'most seeds pass'} ({k}/{n})")
            out.append(Survival(recipe=row.label, claim=col, passed=k, n=n, rate=k / n, lo=lo, hi=hi,
                                reference=verdicts, flags=flags))
    return out


def survival_markdown(census: Census) -> str:
    """The per-claim survival table (one line per recipe x claim) with intervals and flags."""
    idx = {col: i + 1 for i, col in enumerate(census.columns)}
    lines = ["| recipe | claim | seeds passing | rate | Wilson 95% | reference | flag |", "|---|---|---|---|---|---|---|"]
    for r in survival(census):
        ref = ", ".join(f"{label.replace('reference: ', '')} {'pass' if v else 'FAIL'}"
                        for label, v in r.reference.items()) or "–"
        flag = "**differs**: " + "; ".join(r.flags) if r.flags else ""
        lines.append(f"| {r.recipe} | C{idx[r.claim]} {r.claim} | {r.passed}/{r.n} | {r.rate:.0%} | "
                     f"[{r.lo:.0%}, {r.hi:.0%}] | {ref} | {flag} |")
    return "\n".join(lines) + "\n"


def html(census: Census) -> str:
    """One self-contained page: the survival table (rates with Wilson intervals drawn as bars, flagged
    rows marked) and the held-out accuracy per seed."""
    import html as _h

    rows = []
    for r in survival(census):
        bar = (f'<div style="position:relative;width:160px;height:12px;background:#eee">'
               f'<div style="position:absolute;left:{r.lo * 160:.0f}px;width:{max(1.0, (r.hi - r.lo) * 160):.0f}px;'
               f'height:12px;background:#9cf"></div><div style="position:absolute;left:{r.rate * 160 - 1:.0f}px;'
               f'width:2px;height:12px;background:#036"></div></div>')
        ref = ", ".join(f"{_h.escape(k.replace('reference: ', ''))} {'pass' if v else 'FAIL'}" for k, v in r.reference.items())
        style = ' style="background:#fde"' if r.flags else ""
        rows.append(f"<tr{style}><td>{_h.escape(r.recipe)}</td><td>{_h.escape(r.claim)}</td>"
                    f"<td>{r.passed}/{r.n}</td><td>{r.rate:.0%}</td><td>[{r.lo:.0%}, {r.hi:.0%}]</td>"
                    f"<td>{bar}</td><td>{ref or '–'}</td><td>{_h.escape('; '.join(r.flags))}</td></tr>")
    acc = []
    for row in census_rows(census):
        if row.kind != "recipe":
            continue
        vals = [a.test_acc for a in row.accuracy.values() if a]
        if vals:
            acc.append(f"<tr><td>{_h.escape(row.label)}</td><td>{len(vals)}</td><td>{min(vals):.3%}</td>"
                       f"<td>{sorted(vals)[len(vals) // 2]:.3%}</td><td>{max(vals):.3%}</td></tr>")
    return ("<!doctype html><meta charset='utf-8'><title>census " + _h.escape(census.name) + "</title>"
            "<style>body{font:13px sans-serif}td,th{padding:2px 6px;border-bottom:1px solid #ddd}</style>"
            f"<h1>Census: {_h.escape(census.name)}</h1><p>{_h.escape(census.module)}; recipes "
            f"{_h.escape(', '.join(census.recipes))}; seeds {len(census.seeds)}; trainer {_h.escape(census.backend)}. "
            "Rate = seeds on which the claim passed / seeds on which its test ran; the bar is the Wilson 95% "
            "interval; rows in red: a reference checkpoint's verdict differs from most seeds.</p>"
            "<table><tr><th>recipe</th><th>claim</th><th>passing</th><th>rate</th><th>Wilson 95%</th><th></th>"
            "<th>reference</th><th>flag</th></tr>" + "".join(rows) + "</table>"
            "<h2>Held-out test accuracy</h2><table><tr><th>recipe</th><th>models</th><th>min</th><th>median</th>"
            "<th>max</th></tr>" + "".join(acc) + "</table>\n")


def markdown(census: Census) -> str:
    out = [f"# Census: {census.name} ({census.module})", "",
           f"Recipes {', '.join(census.recipes)}; seeds {census.seeds}. Cells: seeds on which the claim "
           "passed / seeds on which its test ran (reference rows: the committed checkpoints, one model each).", ""]
    idx = {col: i + 1 for i, col in enumerate(census.columns)}
    out.append("| row | " + " | ".join(f"C{idx[c]}" for c in census.columns) + " |")
    out.append("|---|" + "---|" * len(census.columns))
    for row in census_rows(census):
        out.append(f"| {row.label} | " + " | ".join(_fmt_cell(row.claims.get(c)) for c in census.columns) + " |")
    from circuits.report.markdown import md_escape
    from circuits.report.text import NAME_LIMIT

    out += ["", "Claims:", ""] + [f"- C{idx[c]}: {md_escape(c, NAME_LIMIT)}" for c in census.columns]  # names from tests
    out += ["", "Per-claim survival (rate with its Wilson 95% interval; flag: a reference checkpoint's verdict "
            "differs from most seeds):", "", survival_markdown(census).rstrip("\n")]
    target = census.acc_target
    out += ["", "Held-out test accuracy per seed (each model's final test set, scored once after training) with "
            "its Wilson 95% interval" + (f"; last column: seeds at or above {target:.1%}" if target is not None else ""),
            "", "| recipe | test_acc per seed" + (" | seeds >= target" if target is not None else "") + " |",
            "|---|---|" + ("---|" if target is not None else "")]
    out += accuracy_lines(census)
    if census.commits:
        out += ["", "Claims ran at: " + ", ".join(f"{k} {v}" for k, v in census.commits.items())]
    if census.timings:
        out += ["", "Timings (s): " + ", ".join(f"{k} {v}" for k, v in census.timings.items())]
    return "\n".join(out) + "\n"


def figure(census: Census, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, cols = census_rows(census), census.columns
    grid = np.full((len(rows), len(cols)), np.nan)
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            cell = row.claims.get(col)
            if cell and cell.n:
                grid[i, j] = cell.passed / cell.n
    fig, ax = plt.subplots(figsize=(max(5.0, 2.5 + 0.55 * len(cols)), 1.2 + 0.45 * max(len(rows), 1)))
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax.text(j, i, _fmt_cell(row.claims.get(col)), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), [f"C{j + 1}" for j in range(len(cols))], fontsize=7)
    ax.set_yticks(range(len(rows)), [r.label for r in rows], fontsize=7)
    ax.set_title(f"census {census.name}: seeds passing per claim (claims C1..: census.md)", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_outputs(census: Census, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "census.json", "md": out_dir / "census.md", "png": out_dir / "census.png",
             "html": out_dir / "census.html"}
    data = jsonable({**census.to_dict(), "survival": survival(census)})
    write_bytes_atomic(paths["json"], (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode())
    write_bytes_atomic(paths["md"], markdown(census).encode())
    write_bytes_atomic(paths["html"], html(census).encode())
    figure(census, paths["png"])
    return paths


# --------------------------------------------------------------------------------------------- driver


def _cores() -> int:
    from circuits.zoo.sweep import default_workers

    return default_workers()


def run_census(name: str, recipes: Sequence[str], seeds: Sequence[int], module: Optional[str] = None, *,
               out: Path = Path("reports/census"), root=None, workers: int = 1, select: Optional[str] = None, main_only: bool = True,
               recipe_select: Optional[str] = None, reference: bool = True, acc_target: Optional[float] = None,
               train: bool = True, rerun: bool = False, jobs: int = 1, stream=None,
               ensemble: Optional[int] = None) -> tuple[Census, dict]:
    """The whole census; returns it and the written paths. `recipe_select` (default: `select`) is the
    ``-k`` of the recipe runs, e.g. to leave out a fixed subject's claims there; main_only=False keeps
    the claims' controls and mutations. train=False trains
    nothing: each recipe's row covers the seeds already stored (or committed), which it lists.

    ensemble: the models come from the stacked trainer (circuits.zoo.ensemble; K seeds per stack, 0 =
    automatic): trained by it, found under its store keys, and read by the pytest runs under
    $CIRCUITS_TRAIN_BACKEND=ensemble. None: as $CIRCUITS_TRAIN_BACKEND says (default: single)."""
    if ensemble is not None:
        from circuits.zoo.ensemble import BACKEND_ENV

        old_env = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = "ensemble"
        try:
            return _run_census(name, recipes, seeds, module, out=out, root=root, workers=workers, select=select,
                               main_only=main_only, recipe_select=recipe_select, reference=reference,
                               acc_target=acc_target, train=train, rerun=rerun, jobs=jobs, stream=stream,
                               ensemble=ensemble)
        finally:
            if old_env is None:
                os.environ.pop(BACKEND_ENV, None)
            else:
                os.environ[BACKEND_ENV] = old_env
    return _run_census(name, recipes, seeds, module, out=out, root=root, workers=workers, select=select,
                       main_only=main_only, recipe_select=recipe_select, reference=reference, acc_target=acc_target,
                       train=train, rerun=rerun, jobs=jobs, stream=stream, ensemble=None)


def _run_census(name, recipes, seeds, module, *, out, root, workers, select, main_only, recipe_select, reference,
                acc_target, train, rerun, jobs, stream, ensemble) -> tuple[Census, dict]:
    from circuits.zoo.sweep import check_run_settings

    stream = stream or sys.stderr
    module = module or f"hypotheses/test_{name}.py"
    seeds = sorted(set(seeds))
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InputError(f"census: --jobs must be a positive integer, got {jobs!r}")
    _check(name, recipes, seeds, module)
    _, folder, _ = check_run_settings("cpu", None)
    root = Path(root) if root is not None else folder
    out_dir = Path(out) / name
    runs_dir = (out_dir / "runs").resolve()
    census = Census(name=name, module=module, seeds=seeds, recipes=list(recipes), acc_target=acc_target)
    from circuits.zoo.ensemble import backend as train_backend

    census.backend = train_backend()
    t_all = time.perf_counter()
    if train:
        train_s = train_missing(name, recipes, seeds, root=root, workers=workers, stream=stream, ensemble=ensemble)
        census.timings["train"] = round(sum(train_s.values()), 2)
    reports, census.recipe_seeds = {}, {}
    rows = []  # (label, run id, args, model hashes)
    for recipe in recipes:
        have = seeds if train else stored_seeds(name, recipe, seeds, root)
        census.recipe_seeds[recipe] = have
        if not have:
            stream.write(f"[census {recipe}] no stored model among seeds {seeds}: row left out\n")
            continue
        args = ["--circuits-seeds", ",".join(str(s) for s in have)]
        if recipe_select or select:
            args += ["-k", recipe_select or select]
        if recipe != DEFAULT_RECIPE:
            args = ["--circuits-variant", zoo_name(name, recipe)] + args
        rows.append((recipe, f"census-{recipe}", args, _model_hashes(zoo_name(name, recipe), have, root)))
    if reference:
        from circuits.zoo import registry as zoo

        rows.append(("reference", "census-reference", ["-k", select] if select else [],
                     _model_hashes(name, zoo.get_entry(name).ref_seeds(), root)))
    threads = max(1, _cores() // jobs) if jobs > 1 else None

    def run_row(row):
        label, run_id, args, models = row
        t0 = time.perf_counter()
        path = run_pytest(module, args, run_id, runs_dir, root=root, stream=stream, label=label,
                          main_only=main_only, inputs=run_inputs(module, args, models, main_only),
                          rerun=rerun, threads=threads)
        return label, path, round(time.perf_counter() - t0, 2)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:  # each row is its own pytest process
        done = list(pool.map(run_row, rows))
    ref_report = None
    for label, path, seconds in done:
        census.timings[f"claims {label}"] = seconds
        census.runs[label] = _repo_relative(path)  # committed output: no machine's absolute paths
        run = _load_run(path)
        census.commits[label] = commit_text(run)  # a reused stored run keeps the commit it ran at
        if label == "reference":
            ref_report = run
        else:
            reports[label] = run
    build_table(census, reports, ref_report, root)
    census.timings["total"] = round(time.perf_counter() - t_all, 2)
    paths = write_outputs(census, out_dir)
    stream.write(markdown(census))
    stream.write(f"census written: {', '.join(str(p) for p in paths.values())}\n")
    return census, paths

