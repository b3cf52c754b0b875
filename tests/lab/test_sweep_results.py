"""A sweep's result: typed grid columns, run folders named by their values, intervals
per grid point, and runs already made taken from the cache instead of Dask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

import simulations
from simulations.analysis.intervals import mean_ci
from simulations.analysis.measures import MEASURES
from simulations.drivers import cache
from simulations.drivers.sweep import (
    SweepResult,
    column_dtype,
    override,
    run_folder,
    summarise,
    typed_grid,
)  # fmt: skip
from simulations.scenario import ScenarioError, load

TINY = ("run.duration_s=20", "run.drain_s=20", "market.arrival_rate=0.5", "phones.count=4")
UNREACHABLE = "tcp://127.0.0.1:1"


def test_grid_values_are_read_as_set_reads_them_and_take_their_fields_types() -> None:
    grid = typed_grid(
        "baseline",
        {"consumers.mtbf_s": ["120", 30, "30.0"], "consumers.batch_size": ["10"],
         "consumers.wake_on_publish": ["false"], "consumers.restart": "replacement"},
    )  # fmt: skip
    assert grid == {
        "consumers.mtbf_s": [120.0, 30.0],  # 30 and "30.0" are one value
        "consumers.batch_size": [10],
        "consumers.wake_on_publish": [False],
        "consumers.restart": ["replacement"],
    }
    assert [column_dtype(k) for k in grid] == ["float64", "int64", "bool", "string"]
    assert override("consumers.restart", "replacement") == 'consumers.restart="replacement"'
    with pytest.raises(ScenarioError, match="consumers.batch_size must be a whole number"):
        typed_grid("baseline", {"consumers.batch_size": ["1.5"]})
    with pytest.raises(ScenarioError, match="consumers.restart must be one of"):
        typed_grid("baseline", {"consumers.restart": ["sometimes"]})
    # An error names where the bad value was given: the grid, or a fixed --set.
    with pytest.raises(ScenarioError, match=r"^--grid: market.arrival_rate must be a number"):
        typed_grid("baseline", {"market.arrival_rate": ["x"]}, ["phones.count=4"])
    with pytest.raises(ScenarioError, match=r"^--set: phones.count must be a whole number"):
        typed_grid("baseline", {"market.arrival_rate": ["1"]}, ["phones.count=4.5"])


def test_run_folders_are_named_by_their_values_safely_and_deterministically() -> None:
    point = {"market.arrival_rate": 2.0, "consumers.mtbf_s": 30.0}
    assert run_folder(point, 1) == Path("consumers.mtbf_s=30,market.arrival_rate=2/seed-1")
    assert run_folder(dict(reversed(point.items())), 1) == run_folder(point, 1)
    assert run_folder({"market.arrival_rate": 0.25}, 3) == Path("market.arrival_rate=0.25/seed-3")
    assert run_folder({}, 2) == Path("seed-2")
    unsafe = run_folder({"consumers.only": "a/b c,d"}, 1)
    assert unsafe == Path("consumers.only=a%2Fb%20c%2Cd/seed-1")
    assert run_folder({"consumers.only": "a_b c,d"}, 1) != unsafe
    long_a = run_folder({"consumers.only": "x" * 300 + "a"}, 1)
    long_b = run_folder({"consumers.only": "x" * 300 + "b"}, 1)
    assert long_a != long_b and len(long_a.parts[0]) <= 160


def _result(values: dict[float, list[float]]) -> SweepResult:
    """A result of ``lost`` values per mtbf_s, other measures 0, without running."""
    rows = [
        {"consumers.mtbf_s": mtbf, "seed": seed, "ok": True, **dict.fromkeys(MEASURES, 0.0),
         "lost": lost}
        for mtbf, losts in values.items() for seed, lost in enumerate(losts, 1)
    ]  # fmt: skip
    runs = pd.DataFrame(rows)
    grid = {"consumers.mtbf_s": list(values)}
    return SweepResult("baseline", grid, runs, summarise(runs, list(grid)), Path("."))


def test_intervals_by_grid_point_and_their_table() -> None:
    result = _result({30.0: [1.0, 3.0, 2.0], 120.0: [0.0, 0.0, 1.0]})
    interval = result.interval("lost", mtbf_s=30)
    assert interval == mean_ci([1.0, 3.0, 2.0])
    assert result.interval("lost", **{"consumers.mtbf_s": 120.0}).mean == pytest.approx(1 / 3)
    row = result.summary.set_index("consumers.mtbf_s").loc[30.0]
    assert (row["n"], row["lost_mean"], row["lost_low"]) == (3, 2.0, interval.low)
    table = result.table().set_index("measure")
    assert table.loc["lost", "consumers.mtbf_s=30"] == (
        f"2 [{interval.low:.4g}, {interval.high:.4g}]"
    )
    for bad, message in [({"mtbf_s": 60}, "not in the grid"), ({}, "name a value for"),
                         ({"nope": 1}, "names no grid key")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            result.interval("lost", **bad)
    with pytest.raises(ValueError, match="no measure 'lots'"):
        result.interval("lots", mtbf_s=30)
    # One seed has no interval: the table says so, as the report page does.
    one_seed = _result({30.0: [2.0]}).table().set_index("measure")
    assert one_seed.loc["lost", "consumers.mtbf_s=30"] == "2 (no interval)"


def test_a_missing_grid_value_is_a_point_of_its_own_in_the_summary() -> None:
    runs = _result({30.0: [1.0, 3.0], math.nan: [0.0]}).runs
    summary = summarise(runs, ["consumers.mtbf_s"])
    assert list(summary["n"]) == [2, 1] and list(summary["ok_runs"]) == [2, 1]
    assert list(summary["lost_mean"]) == [2.0, 0.0]


def test_a_sweep_types_summarises_and_reuses_its_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    grid = {"consumers.mtbf_s": ["120", "30"]}  # as text: 120 sorts before 30
    first = simulations.sweep("baseline", grid, seeds=2, out=out, workers=2,
                              base_overrides=TINY)  # fmt: skip
    runs = first.runs
    assert list(runs["consumers.mtbf_s"]) == [30.0, 30.0, 120.0, 120.0]  # by value
    assert runs["consumers.mtbf_s"].dtype == "float64" and runs["seed"].dtype == "int64"
    assert runs["ok"].all() and not runs["cached"].any() and first.ok
    assert list(runs["run"]) == [
        "consumers.mtbf_s=30/seed-1", "consumers.mtbf_s=30/seed-2",
        "consumers.mtbf_s=120/seed-1", "consumers.mtbf_s=120/seed-2",
    ]  # fmt: skip
    manifests = [out / run / "manifest.json" for run in runs["run"]]
    assert all(m.is_file() for m in manifests)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), runs)

    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary["consumers.mtbf_s"]) == [30.0, 120.0] and list(summary["n"]) == [2, 2]
    for measure in ("events", "lost", "handling_p99_s", "lag_max_s"):
        for _, row in summary.iterrows():
            low, mean, high = row[f"{measure}_low"], row[f"{measure}_mean"], row[f"{measure}_high"]
            assert low <= mean <= high, measure
            point = runs[runs["consumers.mtbf_s"] == row["consumers.mtbf_s"]]
            assert mean == pytest.approx(point[measure].mean())
    crashed = summary.set_index("consumers.mtbf_s").loc[30.0]
    assert crashed["faults_mean"] > 0 and not math.isnan(crashed["recovery_max_s_mean"])
    assert first.interval("events", mtbf_s=120).n == 2

    # Again: every run is in the cache, so nothing goes to Dask (the scheduler is
    # unreachable) and no run directory is rewritten.
    stamps = [m.stat().st_mtime_ns for m in manifests]
    again = simulations.sweep("baseline", grid, seeds=2, out=out, scheduler=UNREACHABLE,
                              base_overrides=TINY)  # fmt: skip
    assert again.runs["cached"].all()
    assert [m.stat().st_mtime_ns for m in manifests] == stamps
    columns = [c for c in runs.columns if c != "cached"]
    pd.testing.assert_frame_equal(again.runs[columns], runs[columns])
    pd.testing.assert_frame_equal(again.summary, first.summary)
    # A key file without the row (run_scenario writes none): measured from the tables.
    key_file = out / runs["run"][0] / cache.KEY_FILE
    stored = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({"key": stored["key"], "manifest": stored["manifest"]}))
    remeasured = simulations.sweep("baseline", grid, seeds=2, out=out, scheduler=UNREACHABLE,
                                   base_overrides=TINY)  # fmt: skip
    pd.testing.assert_frame_equal(remeasured.runs, again.runs)

    # A third seed is a miss: it needs the scheduler.
    with pytest.raises(ScenarioError, match="cannot reach the Dask scheduler"):
        simulations.sweep("baseline", grid, seeds=3, out=out, scheduler=UNREACHABLE,
                          base_overrides=TINY)  # fmt: skip

    # force: simulated again, though the cache has it.
    forced = simulations.sweep("baseline", {"consumers.mtbf_s": [30]}, seeds=[1], out=out,
                               workers=1, base_overrides=TINY, force=True)  # fmt: skip
    assert not forced.runs["cached"].any()
    assert manifests[0].stat().st_mtime_ns != stamps[0]
    assert [m.stat().st_mtime_ns for m in manifests[1:]] == stamps[1:]


def test_a_code_change_makes_every_run_a_miss(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    simulations.sweep("baseline", {}, seeds=1, out=out, workers=1, base_overrides=TINY)
    assert simulations.sweep("baseline", {}, seeds=1, out=out, scheduler=UNREACHABLE,
                             base_overrides=TINY).runs["cached"].all()  # fmt: skip
    # A seed listed twice is one run (two would write one folder at once).
    twice = simulations.sweep("baseline", {}, seeds=[1, 1], out=out, scheduler=UNREACHABLE,
                              base_overrides=TINY)  # fmt: skip
    assert list(twice.runs["seed"]) == [1] and list(twice.summary["n"]) == [1]
    monkeypatch.setattr(cache, "code_version", lambda: "edited-code")
    with pytest.raises(ScenarioError, match="cannot reach the Dask scheduler"):
        simulations.sweep("baseline", {}, seeds=1, out=out, scheduler=UNREACHABLE,
                          base_overrides=TINY)  # fmt: skip


def test_a_run_is_remembered_under_the_code_that_made_it(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A --scheduler's worker may run other code than the sweep's process: its run is
    not remembered as this code's, so the next sweep here does not take it for one."""
    from simulations.drivers.sweep import _one

    loaded = load("baseline", TINY)
    ours = cache.key_of(loaded, 1, "virtual")
    monkeypatch.setattr(cache, "code_version", lambda: "a-workers-other-code")
    _one(loaded, 1, str(tmp_path))
    monkeypatch.undo()
    assert cache.read(tmp_path)["code"] == "a-workers-other-code"  # type: ignore[index]
    assert not cache.hit(tmp_path, ours)
