"""The data directory: WORKBENCH_DATA, else the project root's data/, from any directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import ROOT
from workbench import paths


def test_data_dir_is_the_project_roots_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert paths.project_root() == ROOT
    assert paths.data_dir() == ROOT / "data"
    assert paths.runs_dir() == ROOT / "data" / "runs"
    assert paths.sweeps_dir() == ROOT / "data" / "sweeps"


def test_workbench_data_moves_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "elsewhere"))
    assert paths.data_dir() == tmp_path / "elsewhere"
    assert paths.runs_dir() == tmp_path / "elsewhere" / "runs"


def test_serve_and_store_default_under_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workbench.ops.serve import ServeOptions
    from workbench.store import database_url

    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # not where the data goes
    assert ServeOptions().data_dir == tmp_path / "serve"
    assert database_url() == f"sqlite:///{tmp_path / 'workbench.db'}"
