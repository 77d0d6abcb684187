"""The package as a user gets it: the wheel, installed into a fresh venv, used from another project.

Builds the wheel from a copy of the sources, installs it with torch 2.13.0 (the CPU build; pip takes
it from the machine's wheel folder where there is one) into a fresh venv (no system site-packages),
then, in a temporary project with its own `hypotheses/`, runs claims on the shipped ARENA reference
and on a shipped zoo reference (`brackets_model`), runs another project's own suite beside a claim
(its conftest defines `--device`, `--seeds` and fixtures with common names: the plugin's options are all
`--circuits-*` and its own fixtures reach theirs by private names), and checks that `pytest --co` in an
unrelated folder does not import torch. Slow (a few minutes: a venv and its dependencies); CI runs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("circuits", "fixtures/models", "fixtures/reference", "pyproject.toml", "setup.py", "README.md")

PROJECT_TEST = '''
"""Hypothesis: the package's shipped bracket models classify the published strings."""
import pytest
from circuits.analysis import measures as A
from circuits.tasks.brackets.reference import arena_data, arena_model


def accuracy(model, data):
    pred = A.predict(model, data.toks, lengths=data.lengths + 2).argmax(-1)
    return float((pred == data.isbal.long()).float().mean())


@pytest.mark.controls("untrained")
def test_arena_reference(control, claim):
    claim.at_least("arena_acc_first_1000", accuracy(control.apply_model(arena_model()), arena_data(1000)), 0.999)


@pytest.mark.controls("untrained")
def test_brackets_reference(brackets_model, claim):
    claim.at_least("brackets_acc_first_1000", accuracy(brackets_model, arena_data(1000)), 0.99)
'''


def run(cmd, cwd, env, timeout=900):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(venv: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTEST_ADDOPTS", "CIRCUITS_CACHE", "CIRCUITS_REPORTS")
           and not k.startswith("PYTEST_XDIST")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, env, site-packages) with torch 2.13.0 and the freshly built wheel."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    for part in SOURCES:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        else:
            (src / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / part, src / part)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py, env = venv / "bin" / "python", clean_env(venv)
    torch_install = run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], tmp, env)
    if torch_install.returncode:
        pytest.skip("cannot install torch==2.13.0 into a fresh venv (no package index and no wheel on disk?): "
                    + torch_install.stderr.strip().splitlines()[-1][:300])
    built = run([str(py), "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(tmp / "dist")], tmp, env)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp / "dist").glob("pytest_circuits-*.whl"))
    inst = run([str(py), "-m", "pip", "install", "-q", str(wheel)], tmp, env)
    if inst.returncode and re.search(r"No matching distribution|Could not find a version|connection", inst.stderr, re.I):
        pytest.skip("the wheel's dependencies cannot be installed here (no package index?): "
                    + inst.stderr.strip().splitlines()[-1][:300])
    assert inst.returncode == 0, inst.stderr[-3000:]
    site = run([str(py), "-c", "import circuits, pathlib; print(pathlib.Path(circuits.__file__).parent)"], tmp, env)
    assert site.returncode == 0, site.stderr[-2000:]
    return py, env, Path(site.stdout.strip()), tmp


def test_wheel_ships_the_reference_models_as_package_data(installed):
    py, env, package, _ = installed
    assert "site-packages" in str(package), package
    shipped = package / "_fixtures"
    assert (shipped / "models" / "brackets.safetensors").is_file()
    assert (shipped / "reference" / "arena-brackets" / "checksums.json").is_file()
    probe = run([str(py), "-c", "from circuits import paths; print(paths.reference_dir()); print(paths.arena_dir())"],
                package.parent, env)
    assert probe.stdout.split() == [str(shipped / "models"), str(shipped / "reference" / "arena-brackets")]


def test_claims_run_in_a_temporary_project(installed):
    py, env, package, tmp = installed
    project = tmp / "project"
    (project / "hypotheses").mkdir(parents=True)
    (project / "hypotheses" / "test_x.py").write_text(textwrap.dedent(PROJECT_TEST))
    wired = run([str(py), "-c", "from circuits import zoo, paths; print(zoo.REFERENCE_DIR == paths.reference_dir())"],
                project, env)
    result = run([str(py), "-m", "pytest", "hypotheses", "-q", "-p", "no:cacheprovider", "-rA"], project, env)
    out = result.stdout + result.stderr
    assert "test_arena_reference PASSED" in out or re.search(r"test_arena_reference\b.*PASS", out), out[-4000:]
    assert wired.stdout.strip() == "True", wired.stdout + wired.stderr
    assert result.returncode == 0, out[-4000:]
    # the run wrote into the user's project, never beside the installed package
    assert (project / "reports").is_dir()
    assert not (package.parent / "reports").exists() and not (package.parent / ".circuits-cache").exists()


def test_plugin_does_not_import_torch_in_an_unrelated_project(installed):
    py, env, _, tmp = installed
    other = tmp / "unrelated"
    other.mkdir()
    (other / "test_plain.py").write_text("def test_plain():\n    assert True\n")
    result = run([str(py), "-X", "importtime", "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"], other, env)
    assert result.returncode == 0, result.stderr[-3000:]
    plugins = run([str(py), "-c", "import importlib.metadata as m; print([e.value for e in m.entry_points(group='pytest11')])"],
                  other, env).stdout
    assert "circuits.plugin.pytest_plugin" in plugins  # the plugin is installed and auto-loaded: its import is what's measured
    imported = [line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" not in imported, "loading the circuits plugin imported torch in a project that does not use it"
    # nothing heavy at all: the plugin's start-up is its own few small modules (issue 32: numpy through
    # circuits.report cost ~0.35 s of every pytest start in projects that never use it)
    heavy = {"numpy", "torch", "scipy", "matplotlib", "sklearn", "safetensors", "filelock"} & set(imported)
    assert not heavy, f"loading the circuits plugin imported {sorted(heavy)}"
    ours = sorted(m for m in imported if m == "circuits" or m.startswith("circuits."))
    # (circuits.records: the run's record types, no numpy; circuits.plugin.hookspecs: the plugin's declared
    # hooks; circuits.devices: the one device check, a regex; circuits.plugin: the package, a docstring)
    assert set(ours) <= {"circuits", "circuits.errors", "circuits.plugin", "circuits.plugin.session", "circuits.paths",
                         "circuits.plugin.pytest_plugin", "circuits.records", "circuits.plugin.hookspecs", "circuits.devices",
                         "circuits.report", "circuits.report.collect", "circuits.report.machine"}, ours


# Another project's conftest, as people write them: options and fixtures with the words a claims
# plugin might also want. None may clash with the installed plugin, and its claims must still work.
OTHER_CONFTEST = '''
import pytest


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu")
    parser.addoption("--seeds", default="0")
    parser.addoption("--compare", default=None)
    parser.addoption("--report-dir", default=None)


@pytest.fixture
def device(request):
    return request.config.getoption("--device")


@pytest.fixture
def control():
    return "their control"


@pytest.fixture
def draws():
    return [1, 2, 3]


@pytest.fixture
def figures():
    return "their figures"


@pytest.fixture
def model():
    return "their model"
'''

OTHER_TESTS_CONFTEST = '''
import pytest


@pytest.fixture
def claim():
    return "their claim"
'''

OTHER_TEST = '''
def test_their_options(request, device):
    assert device == "banana"
    assert request.config.getoption("--seeds") == "7"
    assert request.config.getoption("--report-dir") == "elsewhere"


def test_their_fixtures(claim, control, draws, figures, model):
    assert (claim, control, draws, figures, model) == ("their claim", "their control", [1, 2, 3],
                                                        "their figures", "their model")
'''

CLAIM_BESIDE_THEIRS = '''
"""Hypothesis: the shipped bracket model classifies the published strings (beside another suite)."""
import pytest
from circuits.analysis import measures as A
from circuits.tasks.brackets.reference import arena_data


@pytest.mark.controls("untrained")
def test_brackets_reference(brackets_model, claim):  # the conftest's `control` / `draws` do not reach it
    data = arena_data(500)
    pred = A.predict(brackets_model, data.toks, lengths=data.lengths + 2).argmax(-1)
    claim.at_least("brackets_acc_first_500", float((pred == data.isbal.long()).float().mean()), 0.99)
'''


def test_plugin_beside_a_project_that_defines_device_and_seeds(installed):
    """The wheel in a project whose conftest defines --device, --seeds, --compare, --report-dir and
    fixtures named control / draws / figures / model / claim: its own tests and a claim both run."""
    py, env, _, tmp = installed
    project = tmp / "theirs"
    (project / "tests").mkdir(parents=True)
    (project / "hypotheses").mkdir()
    (project / "conftest.py").write_text(textwrap.dedent(OTHER_CONFTEST))
    (project / "tests" / "conftest.py").write_text(textwrap.dedent(OTHER_TESTS_CONFTEST))
    (project / "tests" / "test_theirs.py").write_text(textwrap.dedent(OTHER_TEST))
    (project / "hypotheses" / "test_claim.py").write_text(textwrap.dedent(CLAIM_BESIDE_THEIRS))
    result = run([str(py), "-m", "pytest", "tests", "hypotheses", "-rA", "--device", "banana", "--seeds", "7",
                  "--report-dir", "elsewhere", "--circuits-device", "cpu", "--circuits-run-id", "beside"],
                 project, env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for test in ("test_their_options", "test_their_fixtures", "test_brackets_reference[main]",
                 "test_brackets_reference[control=untrained]"):
        assert re.search(rf"PASSED \S*{re.escape(test)}", out), (test, out[-4000:])
    report = json.loads((project / "reports" / "beside" / "report.json").read_text())
    main = [c for c in report["claims"] if not c.get("control")]
    assert [(c["name"], c["passed"]) for c in main] == [("brackets_acc_first_500", True)], main
    assert [r["outcome"] for r in report["control_runs"]] == ["ok"], report["control_runs"]


# --- every README example, pasted into an empty project with only the wheel ----------------------------

MAKE_TL_CHECKPOINT = """
import json, torch
from circuits.model.convert import to_transformer_lens
from circuits.tasks.brackets.reference import arena_model
cfg, sd = to_transformer_lens(arena_model())  # the ARENA checkpoint is a TransformerLens checkpoint
torch.save(sd, "my_model.pt")
open("tl_cfg.json", "w").write(json.dumps(cfg))
"""


def readme_claim_examples() -> list[dict[str, str]]:
    """The README's Python examples that are claims, as files: {relative path: text}. A block that
    names its files in ``# hypotheses/...py`` comment lines is split there."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    out = []
    for i, block in enumerate(b for b in blocks if "def test_" in b):
        parts = re.split(r"^# (hypotheses/\S+\.py)\n", block, flags=re.M)
        if len(parts) == 1:
            out.append({f"hypotheses/test_readme_{i}.py": block})
        else:
            out.append(dict(zip(parts[1::2], parts[2::2])))
    return out


def test_every_readme_claim_example_runs_in_an_empty_project(installed):
    py, env, _, tmp = installed
    examples = readme_claim_examples()
    assert len(examples) >= 3, examples
    project = tmp / "empty"
    (project / "hypotheses").mkdir(parents=True)
    made = run([str(py), "-c", MAKE_TL_CHECKPOINT], project, env)
    assert made.returncode == 0, made.stderr[-3000:]
    tests = []
    for files in examples:
        for rel, text in files.items():
            if rel.endswith("conftest.py"):  # what the README leaves to the user: the checkpoint's config
                text = "import json\nTL_CFG = json.loads(open('tl_cfg.json').read())\n" + text
            (project / rel).write_text(text)
            known = set(re.findall(r'^KNOWN_FAILURES = \{"(test_\w+)"', text, re.M))  # an example that says it fails
            tests += [(rel, name, name in known) for name in re.findall(r"^def (test_\w+)", text, re.M)]
    result = run([str(py), "-m", "pytest", "hypotheses", "-rA", "--circuits-run-id", "readme"], project, env)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-5000:]
    for rel, name, known in tests:  # a known failure must fail (strict): XFAIL, never PASSED
        assert re.search(rf"{'XFAIL' if known else 'PASSED'} {re.escape(rel)}::{name}\b", out), (rel, name, out[-3000:])
    assert "fixture '" not in out  # every fixture the examples use ships with the plugin
