"""One run, as analysts and notebooks use it: every table, the verdict, the metrics.

``load_run(path)`` is the single entry point the notebooks share::

    run = simulations.load_run("data/runs/baseline-1")
    run.published, run.deliveries, ...   # every table of simulations.analysis.tables, as DataFrames
    run.ok, run.report.groups            # the checker's verdict (simulations.analysis.checker)
    run.metrics["handling"]              # latency quantiles etc. (simulations.analysis.timings)

``run_scenario(name, seed, overrides)`` simulates a run into a directory and
loads it; a directory that already holds the same run (same parameters, seed
and code) is loaded without simulating (``force=True`` simulates anyway).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from simulations.analysis.checker import CheckReport, check
from simulations.analysis.tables import RunTables
from simulations.analysis.timings import summarise
from workbench.paths import runs_dir

log = logging.getLogger(__name__)


@dataclass
class Run(RunTables):
    """A run's tables (see :mod:`simulations.analysis.tables`) plus what is derived from them.

    ``report`` and ``metrics`` are computed on first use, from the same tables.
    """

    path: Path = field(default_factory=Path)

    @cached_property
    def report(self) -> CheckReport:
        return check(self)

    @property
    def ok(self) -> bool:
        return self.report.ok

    @cached_property
    def metrics(self) -> dict[str, pd.DataFrame]:
        return summarise(self)

    def summary(self) -> dict[str, Any]:
        """A one-line overview: scenario, seed, mode, sizes, verdict."""
        m = self.manifest
        return {
            "scenario": m.get("scenario"), "seed": m.get("seed"),
            "mode": m.get("mode", "virtual"), "events": len(self.published),
            "commands": len(self.commands), "faults": len(self.faults),
            "deliveries": len(self.deliveries), "ok": self.ok,
            "wall_seconds": m.get("wall_seconds"),
        }  # fmt: skip


def run_scenario(
    scenario: str,
    seed: int = 1,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    out: str | Path | None = None,
    redis_url: str | None = None,
    force: bool = False,
) -> Run:
    """Simulate ``scenario`` (a name or .toml path) with ``overrides`` (``--set``
    syntax) in virtual time, write it to ``out`` (default
    ``workbench.paths.runs_dir() / "<scenario>-<seed>"``) and return it loaded.

    The notebooks' way in: one call per run, the same tables as ``workbench
    simulate`` writes. If ``out`` already holds this run (same scenario,
    parameters, seed and code: :mod:`simulations.drivers.cache`), it is loaded,
    not simulated again; ``force`` simulates it anyway.
    """
    from simulations.drivers import cache
    from simulations.drivers.virtual import simulate_to
    from simulations.scenario import load

    loaded = load(scenario, list(overrides))
    directory = Path(out) if out is not None else runs_dir() / f"{loaded.name}-{seed}"
    # A server not ours cannot be killed: its runs have no Redis faults, so they are
    # not the runs of a private server with the same parameters.
    mode = "virtual" if redis_url is None else "virtual, external redis"
    key = cache.key_of(loaded, seed, mode)
    if not force and cache.hit(directory, key):
        log.debug("%s: seed %d already in %s, not simulated again", loaded.name, seed, directory)
        return load_run(directory)
    cache.forget(directory)
    simulate_to(loaded, seed, directory, redis_url=redis_url)
    cache.remember(directory, key, scenario=loaded.name, seed=seed, mode=mode,
                   code=cache.code_version())  # fmt: skip
    return load_run(directory)


def load_run(path: str | Path) -> Run:
    """Every table of the run directory ``path``, with the verdict and metrics.

    Raises ``FileNotFoundError`` (saying what is missing) for a directory that is
    not a finished run.
    """
    tables = RunTables.load(path)
    run = Run(path=Path(path))
    for name in ["manifest", *RunTables.table_names()]:
        setattr(run, name, getattr(tables, name))
    return run
