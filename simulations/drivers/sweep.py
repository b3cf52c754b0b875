"""Sweeps: one scenario over a grid of parameter values and seeds, on Dask distributed.

Each point of the grid times each seed is one task: a
:func:`simulations.drivers.virtual.simulate` with its own private redis-server
(started and stopped inside the task), so runs share no state and a task can
run on any worker of any machine. The tasks go to a Dask scheduler: by default
a local cluster of one single-threaded worker process per CPU (``workers``),
worker *i* and its servers pinned to CPU *i* (mod the CPUs allowed), since a
simulator and its Redis take turns (see :mod:`workbench.ops.affinity`); or
the scheduler at ``scheduler`` (``tcp://host:8786``), whose workers should run
``dask worker --nthreads 1`` with this project installed. A task whose worker
dies is retried elsewhere (``retries``). The result is one table, a row per
run: the parameters, the seed, the checker's verdict and the main figures.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
from distributed import Client, LocalCluster, as_completed

from simulations.scenario import ScenarioError, load
from workbench.ops import affinity

_worker_cpu: int | None = None  # set in each local worker process by _pin_to
#: How often a run is retried when its worker dies under it.
RETRIES = 2
#: How long to try to reach a ``--scheduler`` before saying it cannot be reached.
SCHEDULER_TIMEOUT_S = 10


def parse_grid(items: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``["market.arrival_rate=1,2", ...]`` -> {"market.arrival_rate": ["1", "2"]}."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or "." not in key or not values:
            raise ScenarioError(f"--grid takes section.key=v1,v2,..., not {item!r}")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def _pin_to(cpu: int | None) -> None:
    """Run on a local worker: its runs (and their redis-servers) use ``cpu``."""
    global _worker_cpu
    _worker_cpu = cpu


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None, cpus: list[int]) -> Iterator[Client]:
    """A client of ``scheduler``, or of a local cluster with one pinned worker per CPU."""
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ScenarioError(f"cannot reach the Dask scheduler {scheduler}: {exc}") from None
        with client:
            yield client
        return
    n = workers or len(cpus)
    with (
        LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.wait_for_workers(n)
        for i, address in enumerate(sorted(client.scheduler_info()["workers"])):
            cpu = cpus[i % len(cpus)] if len(cpus) > 1 else None
            client.run(_pin_to, cpu, workers=[address])
        yield client


def _one(scenario: str, overrides: list[str], seed: int, out: str | None) -> dict[str, Any]:
    from simulations.analysis.checker import check
    from simulations.analysis.timings import summarise
    from simulations.drivers.virtual import simulate

    loaded = load(scenario, overrides)
    tables = simulate(loaded, seed, out=out, cpu=_worker_cpu)
    report = check(tables)
    handling = summarise(tables)["handling"]
    groups = report.groups
    return {
        "seed": seed,
        "events": len(tables.published),
        "faults": len(tables.faults),
        "ok": report.ok,
        "lost": int(groups["lost"].sum()),
        "duplicated": int(groups["duplicated"].sum()),
        "unseen": int(groups["unseen"].sum()),
        "client_lost": int(report.clients["lost"].sum()) if not report.clients.empty else 0,
        "handling_p99_s": float(handling["p99"].max()) if not handling.empty else None,
        "wall_seconds": tables.manifest.get("wall_seconds"),
        "cpu": tables.manifest.get("cpu"),
    }


def sweep(
    scenario: str,
    grid: dict[str, list[str]],
    seeds: int,
    *,
    out: Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    base_overrides: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Run every grid point with seeds 1..``seeds``; one row per run."""
    grid_points = points(grid) or [{}]
    for point in grid_points:  # fail fast on a bad key or value, before any run
        load(scenario, [*base_overrides, *(f"{k}={v}" for k, v in point.items())])
    jobs = [(point, seed) for point in grid_points for seed in range(1, seeds + 1)]
    rows: list[dict[str, Any]] = []
    with _client(scheduler, workers, sorted(affinity.allowed_cpus())) as client:
        futures = {}
        for i, (point, seed) in enumerate(jobs):
            overrides = [*base_overrides, *(f"{k}={v}" for k, v in point.items())]
            run_dir = str(out / f"run-{i:03d}") if out else None
            future = client.submit(
                _one, scenario, overrides, seed, run_dir, pure=False, retries=RETRIES
            )
            futures[future] = point
        for done, future in enumerate(as_completed(futures), 1):
            rows.append({**futures[future], **future.result()})
            if progress:
                progress(done, len(jobs))
    table = pd.DataFrame(rows)
    keys = [*grid, "seed"] if grid else ["seed"]
    table = table.sort_values(keys).reset_index(drop=True)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        table.to_parquet(out / "results.parquet", index=False)
    return table
