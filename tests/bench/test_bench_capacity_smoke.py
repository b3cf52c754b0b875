"""``bench/capacity.py --quick`` runs end to end on SQLite. A smoke test: no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import stats
from bench.capacity import Config, ceilings, next_rate, sustainable
from bench.loadgen import Bounds, StepResult, pair, quantiles_ms, step_verdict
from tests.support import ROOT

BOUNDS = Bounds(lag_s=2.0, p99_ms=500.0, late_s=1.0)


def test_capacity_bench_quick_run(tmp_path) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "TEST_DATABASE_URL")
    }
    out, record_path = tmp_path / "out.json", tmp_path / "record.json"
    argv = [sys.executable, str(ROOT / "bench" / "capacity.py"), "--quick"]
    result = subprocess.run(
        [*argv, "--json", str(out), "--record", str(record_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads(record_path.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record
    assert json.loads(out.read_text()) == record
    assert record["bench"] == "capacity" and record["parameters"]["quick"] is True
    assert record["parameters"]["store"].startswith("SQLite")
    assert set(record["ratios"]) == {"http_vs_direct"}
    assert set(record["rates"]) == {"http", "direct"}
    assert stats.consistent(record["ratios"]["http_vs_direct"])
    assert record["ratios"]["http_vs_direct"]["target"] == 0.5
    assert [set(r) for r in record["rounds"]] == [{"http", "direct"}]
    assert record["rounds"][0]["direct"]["items"] > 0
    steps = [s for search in record["figures"]["steps"] for s in search]
    assert steps, "no step ran"
    for step in steps:
        assert set(step) >= {
            "rate", "started", "completed", "command_latency", "latency_by_command",
            "delivery_latency", "group_lag_s", "phones", "phones_exact", "keeps_up", "reasons",
        }  # fmt: skip
        assert set(step["command_latency"]) >= {"p50_ms", "p99_ms", "max_ms"}
        # Every phone received exactly its user stream, every group was watched.
        assert step["phones"] == 10 and step["phones_exact"] == step["phones"]
        assert {"fanout", "ledger", "notifications"} <= set(step["group_lag_s"])
        assert step["delivery_latency"]["count"] > 0
        assert step["keeps_up"] == (not step["reasons"])
        assert step["settle_s"] is not None  # groups drained, phones caught up after the step
    assert record["figures"]["headline"]


# -- the pure decisions -----------------------------------------------------------------------


def _config(**changes: float) -> Config:
    base = dict(
        database_url=None, users=10, api_workers=1, start_rate=4.0, factor=2.0, max_steps=5,
        refine=2, window_s=3.0, drain_s=10.0, bounds=BOUNDS, rounds=1, min_seconds=0.1,
        target=0.5, quick=True,
    )  # fmt: skip
    return Config(**{**base, **changes})


def test_the_search_steps_up_then_bisects() -> None:
    config = _config()
    assert next_rate([], config, 4.0) == 4.0
    assert next_rate([(4.0, True)], config, 4.0) == 8.0
    assert next_rate([(4.0, True), (8.0, False)], config, 4.0) == 6.0
    tried = [(4.0, True), (8.0, False), (6.0, True)]
    assert next_rate(tried, config, 4.0) == 7.0
    assert next_rate([*tried, (7.0, False)], config, 4.0) is None  # two bisections done
    assert sustainable([*tried, (7.0, False)]) == 6.0


def test_the_search_steps_down_when_nothing_keeps_up() -> None:
    config = _config(max_steps=2)
    assert next_rate([(4.0, False)], config, 4.0) == 2.0
    assert next_rate([(4.0, False), (2.0, False)], config, 4.0) is None
    assert sustainable([(4.0, False), (2.0, False)]) == 0.0


def test_the_search_stops_after_max_steps_up() -> None:
    config = _config(max_steps=2)
    assert next_rate([(4.0, True), (8.0, True)], config, 4.0) is None


def _step(**changes: object) -> StepResult:
    step = StepResult(rate=4.0, window_s=3.0, started=12, completed=12, phones=10, phones_exact=10)
    step.command_latency = {"p50_ms": 3.0, "p99_ms": 9.0, "max_ms": 9.0}
    step.group_lag_s = {"fanout": 0.1, "ledger": 0.0}
    for key, value in changes.items():
        setattr(step, key, value)
    return step


def test_a_step_keeps_up_only_within_every_bound() -> None:
    assert step_verdict(_step(), BOUNDS) == []
    [lag] = step_verdict(_step(group_lag_s={"fanout": 2.5}), BOUNDS)
    assert "fanout" in lag and "2.50 s" in lag
    [done] = step_verdict(_step(completed=11, failed={"timed out": 1}), BOUNDS)
    assert "11 of 12" in done and "timed out" in done
    [p99] = step_verdict(_step(command_latency={"p99_ms": 501.0}), BOUNDS)
    assert "p99 501.0 ms" in p99
    [phones] = step_verdict(_step(phones_exact=9), BOUNDS)
    assert "1 of 10 phones" in phones
    [late] = step_verdict(_step(max_late_s=1.5), BOUNDS)
    assert "load generator" in late


def test_ceilings_are_the_cores_over_the_cpu_a_lifecycle_costs() -> None:
    # 20 lifecycles/s keeping 0.5 + 0.3 + 0.2 cores busy: 50 ms of CPU per lifecycle,
    # 10 of them the load generator's.
    step = StepResult(rate=20.0, window_s=10.0,
                      cpu_cores={"api-0": 0.5, "relay": 0.3, "load generator": 0.2})  # fmt: skip
    assert ceilings(step, cpus=2) == {
        "total_ms": 50.0,
        "client_ms": 10.0,
        "machine": 40.0,
        "client": 200.0,
    }


def test_quantiles_and_pairs() -> None:
    assert quantiles_ms([])["p99_ms"] is None
    q = quantiles_ms([i / 1000 for i in range(1, 101)])
    assert (q["count"], q["p50_ms"], q["p99_ms"], q["max_ms"]) == (100, 51.0, 100.0, 100.0)
    users = [f"u{i}" for i in range(3)]
    pairs = [pair(i, users) for i in range(12)]
    assert all(buyer != seller for buyer, seller in pairs)
    assert {b for b, _ in pairs} == set(users) and len(set(pairs)) == 6


def test_bad_options_exit_2() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "capacity.py"), "--factor", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--factor must be above 1, not 1.0" in result.stderr, result.stderr


@pytest.mark.parametrize("option", ["--users=1", "--window=0", "--rounds=0"])
def test_each_bad_option_is_named(option: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "capacity.py"), option],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert option.split("=")[0] in result.stderr
