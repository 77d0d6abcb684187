"""What the README quotes is what the code prints: the one-line summary is taken from a run of a small
project with one test of each outcome kind, not typed."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

KINDS_CONFTEST = '''
import pytest
import torch
from circuits.model.transformer import HookedTransformer, TransformerConfig

CFG = TransformerConfig(n_layers=1, d_model=8, n_ctx=4, n_heads=2, d_mlp=8, d_vocab=4, d_vocab_out=2,
                        readout="first", seed=0)


@pytest.fixture(scope="session")
def base():  # "trained": its embedding differs from a fresh initialisation's
    model = HookedTransformer(CFG).eval()
    with torch.no_grad():
        model.embed.W_E.mul_(3.0)
    return model


@pytest.fixture
def model(base, control):
    return control.apply_model(base)


@pytest.fixture
def broken():
    raise OSError("the data file is missing")
'''

KINDS_TESTS = '''
import pytest

KNOWN_FAILURES = {"test_refuted": "the hypothesis says >= 0.9",
                  "test_blunt control=untrained": "an embedding norm survives re-initialisation"}


def norm(model):
    return float(model.embed.W_E.detach().norm())


@pytest.mark.controls("untrained")
def test_held(model, base, claim):             # held; fails on the untrained model as required
    claim.close_to("W_E_norm", norm(model), norm(base), rtol=1e-6)


def test_refuted(claim):                       # a known failure (and without controls)
    claim.at_least("acc", 0.5, 0.9)


def test_failed(claim):                        # a failed claim (and without controls)
    claim.at_least("acc", 0.5, 0.9)


@pytest.mark.controls("untrained")
def test_toothless(model, claim):              # held, and still holds on its control: no teeth
    claim.at_least("norm", norm(model), 0.0)


@pytest.mark.controls("untrained")
def test_blunt(model, claim):                  # the same, documented in KNOWN_FAILURES: known
    claim.at_least("norm", norm(model), 0.0)


@pytest.mark.about("model")
def test_powerless(model, claim):              # held, and still holds on its mutation: no power
    claim.at_least("norm", norm(model), 0.0)


def test_fixture_error(broken, claim):         # an error, never a failed claim
    claim.holds("never", True)
'''


def readme_summary_line() -> str:
    m = re.search(r"^`(circuits: [^`]*)`\.?$", README.read_text(), re.M)
    assert m, "the README quotes no summary line"
    return m.group(1)


def test_readme_summary_line_is_what_a_run_prints(pytester):
    pytester.makeconftest(KINDS_CONFTEST)
    pytester.makepyfile(test_kinds=KINDS_TESTS)
    result = pytester.runpytest("--circuits-run-id", "kinds")
    result.assert_outcomes(passed=5, failed=3, xfailed=2, errors=1)
    printed = [ln for ln in result.stdout.lines if ln.startswith("circuits: ")]
    assert len(printed) == 1, result.stdout.str()
    html = str(pytester.path / "reports" / "kinds" / "report.html")
    assert printed[0].replace(html, "reports/<run>/report.html") == readme_summary_line()
    out = result.stdout.str()
    # each error one line, by kind, with no traceback of the plugin
    assert "FIXTURE ERROR test_kinds.py::test_fixture_error: OSError: the data file is missing" in out


def _layout_section() -> str:
    text = README.read_text()
    return text[text.index("## What is here"):text.index("## Running claims")]


def test_readme_layout_table_names_every_module_and_only_real_paths():
    """The "What is here" table is the architecture a newcomer reads: every module of the package is
    named in it (as ``circuits/x.py``, ``pkg/x.py`` or, in a package's own row, ``x``), and every path it
    names exists. Systems' internals (``circuits/tasks/<system>/``) are the system's business."""
    section = _layout_section()
    package = README.parent / "circuits"
    missing = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package)
        if rel.name in ("__init__.py", "__main__.py") or rel.parts[0] == "_fixtures":
            continue
        if rel.parts[0] == "tasks" and len(rel.parts) > 2:  # a system package's own modules
            rel = Path(*rel.parts[:2])
        full, short = f"circuits/{rel.as_posix()}", rel.as_posix()
        names = [full, short, f"`{rel.with_suffix('').as_posix().split('/')[-1]}`", f"`{rel.name}`",
                 f"{rel.with_suffix('').parts[-1]}/"]
        if not any(n in section for n in names):
            missing.append(full)
    assert not missing, f"modules the README's layout table does not name: {missing}"
    named = set(re.findall(r"`(circuits/[\w/]+\.py)`", section))
    absent = sorted(p for p in named if not (README.parent / p).is_file())
    assert not absent, f"the README's layout table names files that do not exist: {absent}"
