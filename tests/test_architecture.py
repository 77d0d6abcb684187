"""The layout rules of the library: imports point down (no cycles among circuits/ modules, counting
imports inside functions too), and the pytest plugin loads without torch."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "circuits"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the circuits modules it imports (anywhere in its body; a package's own
    submodules importing the package's __init__ are not counted)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                targets = [src] + [f"{src}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rsplit(".", 1)[0] if "." in t else ""
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_library():
    graph = import_graph()
    assert "circuits.plugin.pytest_plugin" in graph and graph["circuits.plugin.pytest_plugin"], "the import graph is empty?"
    assert cycles(graph) == [], "import cycles (each list imports itself round): " + repr(cycles(graph))


def test_the_plugin_loads_without_torch():
    code = ("import sys, circuits.plugin.pytest_plugin, circuits.plugin.session; "
            "print('torch' in sys.modules, 'circuits.zoo.registry' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], out


def test_the_readme_claim_example_is_the_committed_file():
    """README's "Adding a claim" example is true as pasted: it is hypotheses/test_example.py, which
    the main job runs (with its mutations)."""
    readme = (ROOT.parent / "README.md").read_text()
    section = readme.split("### Adding a claim", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert block == (ROOT.parent / "hypotheses" / "test_example.py").read_text()


def test_packages_that_grew_from_modules_forward_their_old_names():
    """``from circuits import zoo; zoo.load`` and ``from circuits.model.transformer import HookedTransformer`` (the
    user API before the layered tree) reach the core modules' objects; unknown names are an
    AttributeError naming the package."""
    import importlib

    import pytest

    for package, core, name in [("circuits.model.transformer", "circuits.model.transformer", "HookedTransformer"),
                                ("circuits.analysis.measures", "circuits.analysis.measures", "run_in_batches"),
                                ("circuits.claims.core", "circuits.claims.core", "ClaimFailure"),
                                ("circuits.zoo.registry", "circuits.zoo.registry", "load"),
                                ("circuits.tasks.brackets.data", "circuits.tasks.brackets.data", "BracketData"),
                                ("circuits.tasks.tracr.compiled", "circuits.tasks.tracr.compiled", "PROGRAMS")]:
        assert getattr(importlib.import_module(package), name) is getattr(importlib.import_module(core), name)
        with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
            getattr(importlib.import_module(package), "no_such_name")


_ABOUT_CENSUS = """
import json, os, pytest

@pytest.hookimpl(tryfirst=True)  # before the plugin deselects (full-sweep grids, known failures' controls)
def pytest_collection_modifyitems(items):
    rows = [[item.nodeid, [list(m.args) for m in item.iter_markers("about")],
             [m.kwargs.get("none") for m in item.iter_markers("about")]] for item in items]
    with open(os.environ["ABOUT_CENSUS_OUT"], "w") as f:
        json.dump(rows, f)
"""


def test_every_hypothesis_test_says_what_it_is_about(tmp_path):
    """Every test collected from hypotheses/ has an ``about`` marker (issue 29): parts, whose derived
    mutations must then be collected for it, or ``none="why"``, which the report shows."""
    (tmp_path / "about_census.py").write_text(_ABOUT_CENSUS)
    out = tmp_path / "census.json"
    env = {**os.environ, "ABOUT_CENSUS_OUT": str(out),
           "PYTHONPATH": os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)}
    run = subprocess.run([sys.executable, "-m", "pytest", "hypotheses", "--collect-only", "-q", "-p", "about_census",
                          "-p", "no:randomly", "-p", "no:cacheprovider", "--circuits-no-report"],
                         cwd=ROOT.parent, env=env, capture_output=True, text=True)
    assert run.returncode == 0 and out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) > 100, f"collected only {len(rows)} tests from hypotheses/"
    group = lambda nodeid: nodeid.split("[", 1)[0]  # noqa: E731
    missing = sorted({group(n) for n, targets, nones in rows if not targets})
    assert not missing, "tests in hypotheses/ without @pytest.mark.about(...): " + ", ".join(missing)
    with_parts = {group(n) for n, targets, _ in rows if any(targets)}
    mutated = {group(n) for n, _, _ in rows if "mutation=" in n}
    assert with_parts <= mutated, "about(parts) but no derived mutation collected: " + ", ".join(
        sorted(with_parts - mutated))
