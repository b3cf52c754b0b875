"""``bench/simulate.py --quick`` runs to the end. A smoke test: no timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import report, stats
from tests.support import ROOT
from workbench.ops import affinity


def test_simulation_bench_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out, record_path = tmp_path / "bench.json", tmp_path / "record.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "simulate.py"), "--quick", "--json", str(out),
         "--record", str(record_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "runtime events per wall second" in result.stdout
    summary = json.loads(out.read_text())
    # The model alone made the same commands as the model driving the runtime.
    assert summary["model_only"]["commands"] == summary["speed"]["events"]["commands"]
    assert summary["speed"]["total_events"] > 0 and summary["runtime_share"] > 0
    # The load sweep ran the rate both ways, under the same load.
    [row] = summary["by_rate"]
    assert row["rate"] == 5 and row["woken"]["escrows"] == row["batched"]["escrows"] > 0
    assert row["woken"]["events"]["commands"] == row["batched"]["events"]["commands"]
    assert "speed by arrival rate" in result.stdout
    # The floor: a recorded run of the speed run's scenario (the same events: the run is
    # deterministic), its traffic replayed once per round; the unit costs beside it.
    floor = summary["floor"]
    assert floor["counts"]["round_trips"] > 0 and floor["counts"]["sql_commits"] > 0
    assert floor["events"] == summary["speed"]["total_events"]
    # The speed run timed over the span the floor replays: reading the tables back and
    # the bench's own samples measured apart, not in it.
    speed_run = summary["speed"]
    assert speed_run["span"] == "run" and speed_run["collect_s"] > 0 and speed_run["samples_s"] > 0
    assert speed_run["wall_s"] < speed_run["loop_wall_s"] + speed_run["collect_s"]
    assert len(floor["replay_s"]) == 1 and floor["replay_s"][0] > 0
    assert floor["redis_raw_us"] > 0 and floor["sqlite_txn_us"] > 0
    assert "replayed by plain code" in result.stdout
    assert "bound from the unit costs alone" in result.stdout
    # Where the time goes: each round's CPU seconds over the timed span, the speed run's
    # and its floor's, the simulator's process and redis-server's (both did some work).
    cpu = summary["cpu"]
    assert cpu["events"] == floor["events"] and len(cpu["speed"]) == len(cpu["floor"]) == 1
    for side in (cpu["speed"][0], cpu["floor"][0]):
        assert side["sim_cpu_s"] > 0 and side["redis_cpu_s"] > 0 and side["wall_s"] > 0
    assert cpu["speed"][0]["wall_s"] == pytest.approx(speed_run["wall_s"], abs=1e-4)
    assert cpu["floor"][0]["wall_s"] == pytest.approx(floor["replay_s"][0], abs=1e-4)
    assert "where the time goes, simulator process" in result.stdout
    # The batched run's own floor, recorded and replayed the same way.
    assert floor["batched"]["events"] == row["batched"]["total_events"]
    assert len(floor["batched"]["replay_s"]) == 1 and floor["batched"]["replay_s"][0] > 0
    assert "floor of the batched run at 5 escrows/s" in result.stdout
    # Placement: the speed run pinned (where more than one CPU is allowed), and the
    # same run left to the OS beside it, with the same work done.
    if len(affinity.allowed_cpus()) > 1:
        placement = summary["placement"]
        assert summary["speed"]["cpu"] == placement["cpu"] in affinity.allowed_cpus()
        assert placement["one_cpu"] > 0 and placement["os_placed"] > 0
        assert "CPU placement" in result.stdout
        assert floor["os_placed"]["redis_single_us"] > 0  # the unit costs both ways
    # The record: the speed run as a round, a verdict only where its interval allows one
    # (one run: no spread known, so none), and the headline figures for the README.
    record = json.loads(record_path.read_text())
    assert record["bench"] == "simulate" and record["figures"]["summary"] == summary
    [rnd] = record["rounds"]
    assert rnd["speed"]["items"] == summary["speed"]["total_events"]
    speed = record["rates"]["speed"]
    # Issue 4's 20,000/s for this run was withdrawn for its ratio to the floor.
    assert speed["target"] is None and speed["verdict"] is None and "verdict" not in summary
    assert record["environment"]["redis_server"] == summary["speed"]["redis_version"]
    assert any("runtime share" in row[0] for row in record["figures"]["headline"])
    assert any(row[0].startswith("where the time goes") for row in record["figures"]["headline"])
    # Both targets of issue #16, each with its interval and a verdict that interval gives:
    # the speed over the floor (a ratio, the floor timed in the round) and the batched run
    # at the target rate (5 escrows/s in a quick run, the sweep's batched run there too).
    vs_floor, batched = record["ratios"]["speed_vs_floor"], record["rates"]["batched_at_5"]
    assert vs_floor["target"] == 0.5 and batched["target"] == 20_000
    assert stats.consistent(vs_floor) and stats.consistent(batched)
    assert rnd["batched_at_5"]["items"] == row["batched"]["total_events"]
    floor_rate = rnd["floor"]["items"] / rnd["floor"]["seconds"]
    speed_rate = rnd["speed"]["items"] / rnd["speed"]["seconds"]
    assert vs_floor["per_round"] == [pytest.approx(speed_rate / floor_rate)]
    assert rnd["floor"]["seconds"] == pytest.approx(floor["replay_s"][0], abs=1e-4)
    assert summary["targets"]["speed_vs_floor"]["verdict"] == vs_floor["verdict"]
    assert "target: speed / floor" in result.stdout
    floor = record["rates"]["floor"]  # the floor itself: no target, listed among the floors
    assert floor["target"] is None and floor["what"].startswith("floor")
    assert floor["per_round"] == [pytest.approx(floor_rate)]
    # The README's renderers take the record with its new fields: its own block, and the
    # block gathering every target and floor across records.
    rendered = report.render(record)
    assert "speed_vs_floor" in rendered and "batched_at_5" in rendered
    gathered = report.render_targets({"simulate": record})
    assert "`speed_vs_floor`" in gathered and "`batched_at_5`" in gathered
    assert "`floor`" in gathered.split("Floors:")[1]
    assert "`floor_batched_at_5`" in gathered.split("Floors:")[1]
    batched_floor = record["rates"]["floor_batched_at_5"]
    [reach] = [row[1] for row in record["figures"]["headline"]
               if row[0] == "batched_at_5's target against its floor"]  # fmt: skip
    assert (
        reach.startswith("20,000 events/s needed")
        and f"{batched_floor['interval'][1]:,.0f}" in reach
    )
    assert batched_floor["target"] is None and batched_floor["per_round"] == [
        pytest.approx(
            row["batched"]["total_events"] / summary["floor"]["batched"]["replay_s"][0], rel=1e-3
        )
    ]


def test_simulation_bench_rejects_bad_rates() -> None:
    for flag, value, says in (("--rates", "1,x", "numbers separated by commas"),
                              ("--rates", "0", "must be positive"),
                              ("--cpu", "4096", "allowed:")):  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "simulate.py"), flag, value],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and says in result.stderr, result.stderr


def test_the_batched_target_is_out_of_reach_only_when_its_floor_is_wholly_below_it() -> None:
    from bench.simulate import _reach

    assert _reach((10_000.0, 19_999.0)).endswith("(out of reach on this machine)")
    assert _reach((20_000.0, 30_000.0)).endswith("(within reach)")
    assert _reach((15_000.0, 25_000.0)).endswith("(the floor's interval straddles it)")


def test_the_cpu_split_names_the_simulator_s_cpu_beyond_its_floor_s() -> None:
    """Medians of the rounds per runtime event; the gap is the simulator's CPU over the
    floor's, as a share of the speed run's wall time."""
    from bench.simulate import _cpu_line, cpu_split

    runs = [{"wall_s": 2.0, "sim_cpu_s": 1.6, "redis_cpu_s": 0.3},
            {"wall_s": 3.0, "sim_cpu_s": 2.0, "redis_cpu_s": 0.5},
            {"wall_s": 2.5, "sim_cpu_s": 1.8, "redis_cpu_s": 0.4}]  # fmt: skip
    replays = [{"seconds": 1.0, "sim_cpu_s": 0.6, "redis_cpu_s": 0.3},
               {"seconds": 1.2, "sim_cpu_s": 0.8, "redis_cpu_s": 0.2},
               {"seconds": 1.1, "sim_cpu_s": 0.7, "redis_cpu_s": 0.25}]  # fmt: skip
    split = cpu_split(runs, replays, 10_000)
    assert split is not None and split["events"] == 10_000
    assert [r["wall_s"] for r in split["floor"]] == [1.0, 1.2, 1.1]
    line = _cpu_line(split)
    # medians: simulator 1.8 s / 0.7 s, redis 0.4 / 0.25, wall 2.5 s over 10,000 events
    assert line.startswith("simulator process 180 / 70 µs, redis-server 40 / 25 µs")
    assert "floor's, 110 µs per event, is 44% of the speed run's wall time (250 µs" in line
    # A run from a tree that did not measure it: no split, rather than a wrong one.
    assert cpu_split([{**runs[0], "sim_cpu_s": None}], replays[:1], 10) is None
