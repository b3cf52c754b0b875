"""What a committed notebook keeps: its sources and outputs, not when or how it last ran.

``make notebooks`` re-executes each notebook in place, and the executor stamps
every cell with timestamps (``metadata.execution``); papermill adds its own
(``metadata.papermill``, per cell and per notebook), JupyterLab extensions
others. Committed, they turn every re-run into a diff of every cell. This
module defines the metadata a committed notebook may carry and strips the rest:

* notebook metadata: only :data:`NOTEBOOK_KEYS` (kernel, language, title);
* cell metadata: only :data:`CELL_KEYS` (``tags``: papermill's ``parameters``).

Outputs and execution counts stay: the outputs are the notebook's record, and a
full re-run numbers its cells the same way every time.

    python -m simulations.notebooks notebooks/*.ipynb     # strip in place
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

NOTEBOOK_KEYS = ("kernelspec", "language_info", "title")
CELL_KEYS = ("tags",)


def volatile_metadata(notebook: nbformat.NotebookNode) -> list[str]:
    """What ``notebook`` carries beyond the allowed metadata, one line each
    (``notebook: papermill``, ``cell 3: execution``); empty when clean."""
    found = [f"notebook: {key}" for key in notebook.metadata if key not in NOTEBOOK_KEYS]
    for index, cell in enumerate(notebook.cells):
        found += [f"cell {index}: {key}" for key in cell.metadata if key not in CELL_KEYS]
    return found


def strip_volatile(notebook: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """``notebook`` with only the allowed metadata (changed in place, and returned)."""
    for key in [k for k in notebook.metadata if k not in NOTEBOOK_KEYS]:
        del notebook.metadata[key]
    for cell in notebook.cells:
        for key in [k for k in cell.metadata if k not in CELL_KEYS]:
            del cell.metadata[key]
    return notebook


def strip_files(paths: Sequence[str | Path]) -> list[Path]:
    """Strip each notebook file in place; return those that changed."""
    changed = []
    for path in map(Path, paths):
        notebook = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if volatile_metadata(notebook):
            nbformat.write(strip_volatile(notebook), path)
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m simulations.notebooks FILE...``: strip in place, say what changed."""
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python -m simulations.notebooks NOTEBOOK.ipynb ...", file=sys.stderr)
        return 2
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    for path in strip_files(paths):
        print(f"stripped volatile metadata from {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "CELL_KEYS",
    "NOTEBOOK_KEYS",
    "main",
    "strip_files",
    "strip_volatile",
    "volatile_metadata",
]
