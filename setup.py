"""Build hook only (the project is configured in pyproject.toml): the wheel carries the repository's
top-level `fixtures/models` and `fixtures/reference` as package data at `circuits/_fixtures/`, where
`circuits.paths.fixtures_dir()` finds them through importlib.resources.

Why a hook: the files stay where the repository keeps them (`fixtures/`, next to the tests that
use them and the CLI that rewrites them), and setuptools' declarative package data cannot reach a
folder outside the package. Editable installs skip the copy: they read `fixtures/` in place.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("models", "reference")  # fixtures/<these> go into the wheel; other fixtures stay test-only


class build_py_with_fixtures(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        source = Path(__file__).resolve().parent / "fixtures"
        target = Path(self.build_lib) / "circuits" / "_fixtures"
        for part in SHIPPED:
            if (source / part).is_dir():
                shutil.copytree(source / part, target / part, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns(".*", "*.tmp", "*.lock"))


setup(cmdclass={"build_py": build_py_with_fixtures})
