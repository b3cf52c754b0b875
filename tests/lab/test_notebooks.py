"""Committed notebooks carry no record of when or how they last ran.

``make notebooks`` strips it (:mod:`simulations.notebooks`); these tests hold
every committed notebook to that, and the stripper to keeping what matters.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from simulations.notebooks import strip_files, strip_volatile, volatile_metadata
from tests.support import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = {"name": "python3", "display_name": "Python 3"}


def test_there_are_notebooks_to_check() -> None:
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_committed_notebook_has_no_volatile_metadata(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    assert volatile_metadata(notebook) == [], (
        f"{path.name}: run `.venv/bin/python -m simulations.notebooks {path}` (make notebooks does)"
    )


def _ran() -> nbformat.NotebookNode:
    """A notebook as nbconvert and papermill leave it."""
    cell = new_code_cell(
        "print(1)",
        execution_count=1,
        metadata={
            "tags": ["parameters"],
            "execution": {"iopub.execute_input": "2026-11-30T08:41:08.140324Z"},
            "papermill": {"duration": 0.1, "start_time": "2026-11-30T08:41:08"},
        },
        outputs=[new_output("stream", name="stdout", text="1\n")],
    )
    return new_notebook(
        cells=[cell],
        metadata={"kernelspec": KERNEL, "title": "t", "papermill": {"duration": 3}},
    )


def test_stripping_keeps_sources_outputs_counts_and_tags() -> None:
    notebook = _ran()
    assert volatile_metadata(notebook) == [
        "notebook: papermill", "cell 0: execution", "cell 0: papermill"
    ]  # fmt: skip
    clean = strip_volatile(notebook)
    assert volatile_metadata(clean) == []
    cell = clean.cells[0]
    assert cell.metadata == {"tags": ["parameters"]}
    assert cell.source == "print(1)" and cell.execution_count == 1
    assert cell.outputs[0].text == "1\n"
    assert clean.metadata == {"kernelspec": KERNEL, "title": "t"}


def test_the_command_strips_files_in_place_and_says_which(tmp_path: Path) -> None:
    dirty, clean = tmp_path / "dirty.ipynb", tmp_path / "clean.ipynb"
    nbformat.write(_ran(), dirty)
    nbformat.write(strip_volatile(_ran()), clean)
    assert strip_files([dirty, clean]) == [dirty]
    assert volatile_metadata(nbformat.read(dirty, as_version=4)) == []
    nbformat.write(_ran(), dirty)
    done = subprocess.run(
        [sys.executable, "-m", "simulations.notebooks", str(dirty), str(clean)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == f"stripped volatile metadata from {dirty}\n"
    missing = subprocess.run(
        [sys.executable, "-m", "simulations.notebooks", str(tmp_path / "nope.ipynb")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert missing.returncode == 2 and "no such notebook" in missing.stderr
