"""Where the project keeps its data: one directory, found the same from anywhere.

Runs, sweeps, the demo's output, trained models and ``serve``'s files live under
one data directory. It is ``WORKBENCH_DATA`` when that is set, else ``data/`` at
the project's root (the directory holding ``pyproject.toml`` above this
package, as an editable install or a checkout has it), else ``data/`` in the
working directory (an installed wheel has no project root). A notebook run from
``notebooks/`` and a command run from the repository root therefore write to
the same place, never to ``../data`` outside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The variable that moves the data directory.
DATA_ENV = "WORKBENCH_DATA"


def project_root() -> Path | None:
    """The checkout this package runs from (it has ``pyproject.toml``), or None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def data_dir() -> Path:
    """The data directory: ``$WORKBENCH_DATA``, else ``<project root>/data``, else ``./data``."""
    if configured := os.environ.get(DATA_ENV):
        return Path(configured).expanduser()
    root = project_root()
    return (root if root is not None else Path.cwd()) / "data"


def runs_dir() -> Path:
    """Where a simulation's run directories go by default."""
    return data_dir() / "runs"


def sweeps_dir() -> Path:
    """Where a sweep's directories go by default."""
    return data_dir() / "sweeps"


__all__ = ["DATA_ENV", "data_dir", "project_root", "runs_dir", "sweeps_dir"]
