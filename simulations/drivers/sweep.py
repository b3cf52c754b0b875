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
dies is retried elsewhere (``retries``).

What a sweep guarantees:

* Grid values are read as ``--set`` reads them (TOML) and checked against the
  scenario before any run starts; each grid column has its field's type
  (float, int, bool, str), so the tables sort and plot by value. A ``--grid``
  splits its values at commas outside brackets and quotes (a list is one value)
  and names a key once; a seed listed twice is one run.
* Each run has a directory named by its values, the same for the same values
  in any order: ``<out>/consumers.mtbf_s=30,market.arrival_rate=2/seed-1``
  (:func:`run_folder`).
* A run whose directory already holds it (:mod:`simulations.drivers.cache`:
  same scenario, parameters, seed and code) is not simulated again, unless
  ``force``; its row comes from its key file.
* The result (:class:`SweepResult`) is one row per run (``runs``: the grid
  values, seed, verdict, :data:`~simulations.analysis.measures.MEASURES`) and one
  row per grid point (``summary``: ``n``, ``ok_runs`` and each measure's mean
  with its 95% Student-t interval over the seeds), written as
  ``results.parquet`` and ``summary.parquet`` in ``out``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd
from distributed import Client, LocalCluster, as_completed

from simulations.analysis.intervals import Interval, mean_ci, summarise_over
from simulations.analysis.measures import MEASURES
from simulations.drivers import cache
from simulations.scenario import SECTIONS, Scenario, ScenarioError, load, parse_value
from workbench import paths
from workbench.ops import affinity

_worker_cpu: int | None = None  # set in each local worker process by _pin_to
#: How often a run is retried when its worker dies under it.
RETRIES = 2
#: How long to try to reach a ``--scheduler`` before saying it cannot be reached.
SCHEDULER_TIMEOUT_S = 10
#: The longest run folder name; longer ones are cut and end in a hash of the whole.
MAX_FOLDER_NAME = 160
#: The mode of a sweep's runs (virtual time), part of their cache key.
MODE = "virtual"

Grid = dict[str, list[Any]]
Point = dict[str, Any]
Progress = Callable[[int, int], None]


# -- the grid ----------------------------------------------------------------------


def parse_grid(items: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """``["market.arrival_rate=1,2", ...]`` -> {"market.arrival_rate": ["1", "2"]}.

    Values are split at the commas outside brackets and quotes, so a list is one
    value (``market.profile=[1,...],[2,...]``: two profiles); a key given twice is
    a :class:`ScenarioError` (its values would silently replace the first's)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or "." not in key or not values:
            raise ScenarioError(f"--grid takes section.key=v1,v2,..., not {item!r}")
        if key in grid:
            raise ScenarioError(
                f"--grid {key} is given twice; list all its values once: {key}=v1,v2,..."
            )
        grid[key] = [v.strip() for v in _split_values(values) if v.strip()]
    return grid


def _split_values(text: str) -> list[str]:
    """``text`` split at its top-level commas (not those inside ``[...]`` or quotes)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def points(grid: dict[str, list[Any]]) -> list[Point]:
    """Every combination of the grid's values, the first key varying slowest."""
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*grid.values())]


def typed_grid(scenario: str, grid: dict[str, Any], base: Sequence[str] = ()) -> Grid:
    """``grid`` with each value as the scenario holds it (``"30"`` and ``30`` -> ``30.0``
    for a float field), duplicates dropped; a :class:`ScenarioError` names a bad key or value."""
    load(scenario, list(base))  # the fixed overrides first: their errors are --set's
    typed: Grid = {}
    for key, values in grid.items():
        values = _as_list(values)
        if not values:
            raise ScenarioError(f"--grid {key} has no values")
        typed[key] = []
        for value in values:
            try:
                loaded = load(scenario, [*base, override(key, value)])
            except ScenarioError as exc:  # the grid's value is what is wrong
                raise ScenarioError(str(exc).replace("--set", "--grid", 1)) from None
            held = _value_of(loaded, key)
            if held not in typed[key]:
                typed[key].append(held)
    return typed


def _as_list(values: Any) -> list[Any]:
    """One value (``{"consumers.restart": "replacement"}``) or any iterable of them."""
    return [values] if isinstance(values, str) or not isinstance(values, Iterable) else list(values)


def override(key: str, value: Any) -> str:
    """``section.key=value`` in ``--set`` syntax; a string is read as ``--set`` reads it."""
    value = value.item() if hasattr(value, "item") else value  # numpy scalars
    if isinstance(value, str):
        value = parse_value(value)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | list | tuple):
        text = json.dumps(list(value) if isinstance(value, tuple) else value)
    else:
        text = repr(value)
    return f"{key}={text}"


def _value_of(loaded: Scenario, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(loaded, section), name)  # a profile stays a tuple: hashable


def column_dtype(key: str) -> str:
    """The pandas dtype of grid column ``key``: its scenario field's type."""
    section, _, name = key.partition(".")
    default = {f.name: f.default for f in fields(SECTIONS[section])}[name]
    kinds = {bool: "bool", int: "int64", float: "float64", str: "string"}
    return kinds.get(type(default), "object")


def run_folder(point: Point, seed: int) -> Path:
    """The run's directory under the sweep's: ``k1=v1,k2=v2/seed-N``, keys in name
    order, values made safe for any filesystem (:func:`urllib.parse.quote`), so
    distinct points never share a folder; a long name is cut and ends in its hash."""
    if not point:
        return Path(f"seed-{seed}")
    name = ",".join(f"{key}={_folder_value(point[key])}" for key in sorted(point))
    if len(name) > MAX_FOLDER_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:12]
        name = f"{name[: MAX_FOLDER_NAME - 13]}~{digest}"
    return Path(name) / f"seed-{seed}"


def _folder_value(value: Any) -> str:
    return quote(_text(value), safe="._-+")


def _text(value: Any) -> str:
    """A grid value as its shortest faithful text: 30.0 -> 30, True -> true."""
    value = value.item() if hasattr(value, "item") else value  # numpy scalars
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, str):
        text = value
    elif isinstance(value, list | tuple):
        text = json.dumps(list(value), separators=(",", ":"))
    else:
        text = repr(value)
    return text


# -- the result --------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    """What a sweep found: ``runs``, one row per run (the grid's columns, typed,
    ``seed``, ``ok``, the measures, ``wall_seconds``, ``cpu``, ``cached``, ``run``:
    its directory under ``directory``), and ``summary``, one row per grid point
    (``n``, ``ok_runs``, and ``<measure>_mean``, ``_low``, ``_high``)."""

    scenario: str
    grid: Grid
    runs: pd.DataFrame
    summary: pd.DataFrame
    directory: Path

    @property
    def measures(self) -> list[str]:
        return list(MEASURES)

    @property
    def ok(self) -> bool:
        """Every run passed the checker."""
        return bool(self.runs["ok"].all())

    def interval(self, measure: str, level: float = 0.95, **point: Any) -> Interval:
        """``measure``'s mean over the seeds of one grid point, with its interval.

        ``point`` names a value for every grid key, by its full name or, when that
        is unambiguous, by its name within the section: ``interval("lost", mtbf_s=30)``.
        """
        if measure not in MEASURES:
            raise ValueError(f"no measure {measure!r}; measures: {', '.join(MEASURES)}")
        rows = self.runs
        for key, value in _resolve(self.grid, point).items():
            if value not in self.grid[key]:
                raise ValueError(f"{key}={value!r} is not in the grid; values: {self.grid[key]}")
            rows = rows[rows[key] == value]
        return mean_ci(rows[measure], level)

    def table(self) -> pd.DataFrame:
        """The summary for people: a row per measure (after ``n`` and ``ok_runs``), a
        column per grid point, cells ``mean [low, high]``; measures no run had are left out."""
        keys = list(self.grid)
        columns = {}
        for _, row in self.summary.iterrows():
            label = ", ".join(f"{k}={_text(row[k])}" for k in keys) or "all runs"
            cells = {"n": str(int(row["n"])), "ok_runs": str(int(row["ok_runs"]))}
            for m in MEASURES:
                if self.summary[f"{m}_mean"].notna().any():
                    cells[m] = _cell(row[f"{m}_mean"], row[f"{m}_low"], row[f"{m}_high"])
            columns[label] = cells
        return pd.DataFrame(columns).rename_axis("measure").reset_index()


def _resolve(grid: Grid, point: dict[str, Any]) -> Point:
    """``point``'s names as grid keys (full, or unambiguous short names); all keys given."""
    resolved: Point = {}
    for name, value in point.items():
        matches = [k for k in grid if k == name or k.partition(".")[2] == name]
        if len(matches) != 1:
            raise ValueError(f"{name!r} names {'no' if not matches else 'more than one'} "
                             f"grid key; grid keys: {', '.join(grid)}")  # fmt: skip
        resolved[matches[0]] = value
    if missing := [k for k in grid if k not in resolved]:
        raise ValueError(f"name a value for {', '.join(missing)}")
    return resolved


def _cell(mean: float, low: float, high: float) -> str:
    if math.isnan(mean):
        return ""
    if not (math.isfinite(low) and math.isfinite(high)):  # one seed: no interval to claim
        return f"{mean:.4g} (no interval)"
    return f"{mean:.4g} [{low:.4g}, {high:.4g}]"


def summarise(runs: pd.DataFrame, keys: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """One row per grid point of ``runs``: ``n``, ``ok_runs`` and every measure's interval."""
    summary = summarise_over(runs, keys, list(MEASURES), level)
    # Grouped as summarise_over groups (missing values are a point), so rows line up.
    grouped = runs.groupby(list(keys), sort=True, dropna=False) if keys else None
    ok_runs = grouped["ok"].sum() if grouped is not None else runs["ok"].sum()
    summary.insert(len(keys) + 1, "ok_runs",
                   list(ok_runs) if keys else [int(ok_runs)])  # fmt: skip
    return summary


# -- running -----------------------------------------------------------------------


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


def _one(scenario: Scenario, seed: int, directory: str) -> dict[str, Any]:
    """One run (on a worker): simulated into ``directory``, measured, and remembered
    once finished under the key of the code that ran it, the worker's (a
    ``--scheduler``'s workers may run other code than the sweep's process: then
    the sweep's next look finds no run of its own code there). Returns its row
    (without the grid's columns)."""
    from simulations.analysis.measures import run_measures
    from simulations.drivers.virtual import simulate

    key = cache.key_of(scenario, seed, MODE)
    cache.forget(directory)
    tables = simulate(scenario, seed, out=directory, cpu=_worker_cpu)
    row = {"seed": seed, **run_measures(tables),
           "wall_seconds": tables.manifest.get("wall_seconds"),
           "cpu": tables.manifest.get("cpu")}  # fmt: skip
    cache.remember(directory, key, row, scenario=scenario.name, seed=seed, mode=MODE,
                   code=cache.code_version())  # fmt: skip
    return row


def _cached_row(directory: Path, seed: int) -> dict[str, Any]:
    """The row of a cached run: stored with its key, or measured again from its tables."""
    stored = cache.read(directory) or {}
    if "row" in stored:
        return stored["row"]
    from simulations.analysis.measures import run_measures
    from simulations.analysis.tables import RunTables

    tables = RunTables.load(directory)
    return {"seed": seed, **run_measures(tables),
            "wall_seconds": tables.manifest.get("wall_seconds"),
            "cpu": tables.manifest.get("cpu")}  # fmt: skip


@dataclass(frozen=True)
class _Job:
    point: Point
    seed: int
    scenario: Scenario
    folder: Path
    key: str


def _jobs(scenario: str, grid: Grid, seeds: Sequence[int], base: Sequence[str], out: Path
          ) -> list[_Job]:  # fmt: skip
    """Every (point, seed), its loaded scenario (checked now: before any run), folder and key."""
    jobs = []
    for point in points(grid) or [{}]:
        loaded = load(scenario, [*base, *(override(k, v) for k, v in point.items())])
        for seed in seeds:
            jobs.append(_Job(point, seed, loaded, out / run_folder(point, seed),
                             cache.key_of(loaded, seed, MODE)))  # fmt: skip
    return jobs


def _simulate(jobs: list[_Job], scheduler: str | None, workers: int | None,
              progress: Progress | None) -> dict[int, dict[str, Any]]:  # fmt: skip
    """Run ``jobs`` on Dask; their rows by ``id(job)``."""
    rows: dict[int, dict[str, Any]] = {}
    if not jobs:
        return rows
    if progress:
        progress(0, len(jobs))
    with _client(scheduler, workers, sorted(affinity.allowed_cpus())) as client:
        futures = {
            client.submit(_one, job.scenario, job.seed, str(job.folder),
                          pure=False, retries=RETRIES): job
            for job in jobs
        }  # fmt: skip
        for done, future in enumerate(as_completed(futures), 1):
            rows[id(futures[future])] = future.result()
            if progress:
                progress(done, len(jobs))
    return rows


def sweep(
    scenario: str,
    grid: dict[str, Any] | None = None,
    seeds: int | Sequence[int] = 3,
    *,
    out: str | Path | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    progress: Progress | None = None,
    base_overrides: Sequence[str] = (),
    force: bool = False,
) -> SweepResult:
    """Run ``scenario`` at every point of ``grid`` (``{"consumers.mtbf_s": [30, 120]}``;
    values as Python values or ``--set`` text) with seeds 1..``seeds`` (or the seeds
    listed), each with ``base_overrides`` (``--set`` syntax).

    Runs already in ``out`` (default ``workbench.paths.sweeps_dir() / <scenario>``)
    are reused unless ``force``; the others go to Dask. ``progress(done, total)``
    counts the runs simulated. Writes ``results.parquet`` and ``summary.parquet``.
    """
    typed = typed_grid(scenario, grid or {}, base_overrides)
    seed_list = list(range(1, seeds + 1)) if isinstance(seeds, int) else list(seeds)
    seed_list = list(dict.fromkeys(seed_list))  # a seed twice: two runs in one folder at once
    if not seed_list:
        raise ScenarioError(f"seeds must be at least 1 (or a list of seeds), not {seeds!r}")
    name = load(scenario, list(base_overrides)).name
    directory = Path(out) if out is not None else paths.sweeps_dir() / name
    jobs = _jobs(scenario, typed, seed_list, base_overrides, directory)
    to_run = [job for job in jobs if force or not cache.hit(job.folder, job.key)]
    fresh = _simulate(to_run, scheduler, workers, progress)
    rows = []
    for job in jobs:
        row = fresh[id(job)] if id(job) in fresh else _cached_row(job.folder, job.seed)
        rows.append({**job.point, **row, "cached": id(job) not in fresh,
                     "run": job.folder.relative_to(directory).as_posix()})  # fmt: skip
    runs = _typed(pd.DataFrame(rows), list(typed))
    runs = runs.sort_values([*typed, "seed"]).reset_index(drop=True)
    summary = summarise(runs, list(typed))
    directory.mkdir(parents=True, exist_ok=True)
    runs.to_parquet(directory / "results.parquet", index=False)
    summary.to_parquet(directory / "summary.parquet", index=False)
    return SweepResult(name, typed, runs, summary, directory)


def _typed(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The grid's columns as their fields' types; measures as numbers (None: NaN)."""
    types: dict[str, str] = {key: column_dtype(key) for key in keys}
    types |= {m: "float64" for m in MEASURES if runs[m].isna().any()}
    return runs.astype(types)


__all__ = [
    "SweepResult", "column_dtype", "override", "parse_grid", "points", "run_folder", "summarise",
    "sweep", "typed_grid",
]  # fmt: skip
