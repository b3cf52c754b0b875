"""Sweeps: a grid of values times seeds, in parallel processes, one table out."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from simulations.drivers.sweep import parse_grid, points, typed_grid
from simulations.scenario import ScenarioError
from tests.support import ROOT
from workbench.ops import affinity


def test_grid_parsing_and_points() -> None:
    grid = parse_grid(["market.arrival_rate=1,2", "phones.count=5"])
    assert grid == {"market.arrival_rate": ["1", "2"], "phones.count": ["5"]}
    assert points(grid) == [
        {"market.arrival_rate": "1", "phones.count": "5"},
        {"market.arrival_rate": "2", "phones.count": "5"},
    ]
    for bad in ["arrival_rate=1", "market.arrival_rate", "market.arrival_rate="]:
        with pytest.raises(ScenarioError):
            parse_grid([bad])
    # A key twice would silently drop its first values.
    with pytest.raises(ScenarioError, match="market.arrival_rate is given twice"):
        parse_grid(["market.arrival_rate=1", "phones.count=5", "market.arrival_rate=2"])
    # Commas inside a list or a quoted string do not split values: profiles can be swept.
    flat, busy = "[" + ",".join(["1"] * 24) + "]", "[" + ", ".join(["2"] * 24) + "]"
    grid = parse_grid([f"market.profile={flat},{busy}", 'consumers.only="ledger,push",fanout'])
    assert grid == {"market.profile": [flat, busy], "consumers.only": ['"ledger,push"', "fanout"]}
    typed = typed_grid("baseline", grid)
    assert typed["market.profile"] == [(1.0,) * 24, (2.0,) * 24]
    assert typed["consumers.only"] == ["ledger,push", "fanout"]


def test_sweep_command_runs_the_grid_in_parallel(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "workbench", "sweep", "baseline",
        "--grid", "market.arrival_rate=0.5,1.5", "--seeds", "1",
        "--set", "run.duration_s=40", "--set", "run.drain_s=30", "--set", "phones.count=5",
        "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(
        [*command, "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["market.arrival_rate"]) == [0.5, 1.5]
    assert table["ok"].all()
    assert table.events.iloc[1] > table.events.iloc[0]  # more arrivals, more events
    assert (out / "market.arrival_rate=0.5" / "seed-1" / "manifest.json").exists()
    summary = pd.read_parquet(out / "summary.parquet")
    assert list(summary["market.arrival_rate"]) == [0.5, 1.5] and list(summary["n"]) == [1, 1]
    # The summary is what is printed: a row per measure, a column per grid point.
    assert "market.arrival_rate=1.5" in result.stdout and "lost " in result.stdout
    assert "2 runs (0 already made" in result.stderr
    cpus = affinity.allowed_cpus()
    if len(cpus) > 1:  # each worker took a CPU of its own, and kept it for its runs
        assert set(table["cpu"]) <= cpus

    # Again: both runs are made, so no scheduler is needed; --force needs one.
    offline = [*command, "--scheduler", "tcp://127.0.0.1:1"]
    again = subprocess.run(offline, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "2 runs (2 already made" in again.stderr and "market.arrival_rate=1.5" in again.stdout
    forced = subprocess.run(
        [*offline, "--force"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert forced.returncode == 2 and "cannot reach the Dask scheduler" in forced.stderr


def test_sweep_rejects_an_unknown_key_before_running(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "sweep", "baseline", "--grid", "market.nope=1,2",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown key market.nope" in result.stderr


def test_a_sweep_on_a_dask_scheduler_survives_a_worker_killed_mid_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Runs go to an external scheduler; SIGKILL a worker while it simulates, and the
    run is retried on another worker: every row comes back, every run checks out."""
    import os
    import signal
    import threading

    from distributed import Client, LocalCluster

    from simulations.drivers.sweep import sweep
    from workbench.ops.waiting import wait_until

    out = tmp_path / "sweep"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):  # fmt: skip
        client.wait_for_workers(2)
        pids = client.run(os.getpid)  # worker address -> pid
        result: dict[str, object] = {}

        def run() -> None:
            result["table"] = sweep(
                "baseline", {"market.arrival_rate": [0.5, 1.0, 1.5]}, 1, out=out,
                scheduler=cluster.scheduler_address,
                base_overrides=("run.duration_s=60", "run.drain_s=30", "phones.count=5"),
            ).runs  # fmt: skip

        thread = threading.Thread(target=run)
        thread.start()

        def busy_worker() -> str | None:
            """A worker inside a run: it holds a task and a run directory exists."""
            busy = [w for w, keys in client.processing().items() if keys and w in pids]
            return busy[0] if busy and any(out.glob("*/seed-*")) else None

        wait_until(busy_worker, timeout=120, what="a worker to be inside a run")
        victim = busy_worker()
        assert victim is not None
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        assert not thread.is_alive()
    table = result["table"]
    assert isinstance(table, pd.DataFrame)
    assert list(table["market.arrival_rate"]) == [0.5, 1.0, 1.5]
    assert table["ok"].all() and not table["cached"].any()


def test_an_unreachable_scheduler_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "sweep", "baseline", "--seeds", "1",
         "--scheduler", "tcp://127.0.0.1:1", "--out", str(tmp_path / "s")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "cannot reach the Dask scheduler tcp://127.0.0.1:1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


def test_a_sweep_gives_the_table_of_the_same_runs_made_one_by_one_here(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Where a run happens (a Dask worker process, or this process) changes nothing
    but the wall time and the CPU: rows and the runs' tables are bit-identical."""
    from simulations.drivers import cache
    from simulations.drivers.sweep import _one, sweep
    from simulations.scenario import load

    base = ("run.duration_s=30", "run.drain_s=30", "phones.count=4")
    rates = [0.5, 1.5]
    result = sweep("baseline", {"market.arrival_rate": rates}, 1, out=tmp_path / "sweep",
                   workers=2, base_overrides=base)  # fmt: skip
    rows = []
    for rate in rates:
        loaded = load("baseline", [*base, f"market.arrival_rate={rate}"])
        row = _one(loaded, 1, str(tmp_path / f"here-{rate}"))
        assert cache.hit(tmp_path / f"here-{rate}", cache.key_of(loaded, 1))
        rows.append({"market.arrival_rate": rate, **row})
    where = ["wall_seconds", "cpu"]
    swept = result.runs.drop(columns=[*where, "cached", "run"])
    here = pd.DataFrame(rows).drop(columns=where).astype(swept.dtypes.to_dict())
    pd.testing.assert_frame_equal(swept, here)
    assert result.runs["events"].min() > 0
    for rate in rates:
        swept_files = sorted((tmp_path / "sweep" / f"market.arrival_rate={rate:g}" / "seed-1")
                             .glob("*.parquet"))  # fmt: skip
        direct = sorted((tmp_path / f"here-{rate}").glob("*.parquet"))
        assert [p.name for p in swept_files] == [p.name for p in direct] != []
        for a, b in zip(swept_files, direct, strict=True):
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), obj=a.name)
