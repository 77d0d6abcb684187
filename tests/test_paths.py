"""circuits.paths: shipped files found from the package; project folders from the user's rootdir,
overridden by ini options and then environment variables, never the package folder."""

from __future__ import annotations

from pathlib import Path

from circuits import paths


class Config:
    def __init__(self, rootpath, ini=None):
        self.rootpath, self._ini = Path(rootpath), ini or {}

    def getini(self, name):
        if name not in self._ini:
            raise ValueError(name)
        return self._ini[name]


def test_shipped_files_are_found_from_the_package():
    assert (paths.reference_dir() / "brackets.safetensors").is_file()
    assert (paths.arena_dir() / "checksums.json").is_file()
    assert paths.reference_dir().parent == paths.arena_dir().parents[1] == paths.fixtures_dir()


def test_project_folders_resolve_against_the_rootdir(tmp_path, monkeypatch):
    monkeypatch.delenv("CIRCUITS_CACHE", raising=False)
    monkeypatch.delenv("CIRCUITS_REPORTS", raising=False)
    cfg = Config(tmp_path)
    assert paths.project_root(cfg) == tmp_path
    assert paths.project_root(str(tmp_path)) == tmp_path
    assert paths.reports_dir(tmp_path, cfg) == tmp_path / "reports"
    assert paths.cache_dir(tmp_path) == tmp_path / ".circuits-cache"
    ini = Config(tmp_path, {"circuits_report_dir": "out/runs", "circuits_cache_dir": "models"})
    assert paths.reports_dir(tmp_path, ini) == tmp_path / "out" / "runs"
    assert paths.cache_dir(tmp_path, ini) == tmp_path / "models"
    monkeypatch.setenv("CIRCUITS_CACHE", str(tmp_path / "env-cache"))
    monkeypatch.setenv("CIRCUITS_REPORTS", str(tmp_path / "env-reports"))
    assert paths.cache_dir(tmp_path, ini) == tmp_path / "env-cache"
    assert paths.reports_dir(tmp_path, ini) == tmp_path / "env-reports"


def test_cwd_is_the_default_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert paths.project_root() == tmp_path
