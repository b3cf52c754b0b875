"""Latencies and backlogs from run tables."""

from __future__ import annotations

import pandas as pd
import pytest

from simulations.analysis.tables import RunTables
from simulations.analysis.timings import (
    backlog,
    client_latency,
    handling_latency,
    reconnect_replays,
    replays,
    summarise,
)


def _run() -> RunTables:
    run = RunTables()
    run.published = pd.DataFrame(
        {"event_id": ["e1", "e2", "e3"], "type": ["escrow.created"] * 3, "stream": ["escrow"] * 3,
         "escrow_id": ["x"] * 3, "sequence": [1, 2, 3], "users": ["a,b"] * 3, "amount": [0] * 3,
         "t_committed": [0.0, 1.0, 2.0], "t_published": [0.1, 1.1, 2.1]}
    )  # fmt: skip
    run.handled = pd.DataFrame(
        {"group": ["ledger"] * 3 + ["push"] * 3, "event_id": ["e1", "e2", "e3"] * 2,
         "handler_calls": [1, 1, 0, 1, 2, 1], "max_delivery_count": [1, 1, 0, 1, 2, 1],
         "t_first": [0.5, 1.5, None, 0.2, 1.2, 2.2], "t_last": [0.5, 1.5, None, 0.2, 3.0, 2.2],
         "effects": [1, 1, 0, 1, 1, 1], "expected_effects": [1, 1, 1, 1, 1, 1]}
    )  # fmt: skip
    run.deliveries = pd.DataFrame(
        {"phone": ["a"] * 4, "connection": [1, 1, 2, 2],
         "source": ["replay", "live", "snapshot", "replay"],
         "entry_id": ["1-0", "2-0", "2-0", "3-0"], "event_id": ["e1", "e2", "", "e3"],
         "t": [0.5, 1.5, 5.0, 5.0]}
    )  # fmt: skip
    run.samples = pd.DataFrame(
        {"t": [0.0, 0.0, 5.0, 5.0], "group": ["ledger", "push"] * 2, "pending": [3, 1, 0, 0],
         "oldest_pending_age_s": [0.0] * 4, "lag": [2, 0, 0, 0], "lag_s": [0.0] * 4}
    )  # fmt: skip
    return run


def test_handling_latency_is_commit_to_first_handled() -> None:
    latency = handling_latency(_run())
    ledger = latency[latency.group == "ledger"].set_index("event_id").latency_s
    assert ledger.to_dict() == pytest.approx({"e1": 0.5, "e2": 0.5})  # e3 never handled
    push = latency[latency.group == "push"].set_index("event_id").latency_s
    assert push["e2"] == pytest.approx(0.2)  # first handling counts, not the redelivery


def test_client_latency_skips_snapshot_markers() -> None:
    latency = client_latency(_run())
    assert list(latency.source) == ["replay", "live", "replay"]
    assert list(latency.latency_s) == pytest.approx([0.5, 0.5, 3.0])


def test_replay_sizes_per_connection() -> None:
    sizes = replays(_run())
    assert sizes.set_index("connection").replayed.to_dict() == {1: 1, 2: 1}


def test_backlog_over_time() -> None:
    table = backlog(_run())
    assert table.loc[0.0, "ledger"] == 3 and table.loc[5.0, "push"] == 0
    assert backlog(_run(), "lag").loc[0.0, "ledger"] == 2


def test_summary_quantiles() -> None:
    summary = summarise(_run())
    handling = summary["handling"].set_index("group")
    assert handling.loc["ledger", "count"] == 2
    assert handling.loc["ledger", "p50"] == pytest.approx(0.5)
    assert set(summary["clients"].source) == {"replay", "live"}
    assert summary["replay_sizes"]["max"].iloc[0] == 1


def test_empty_run() -> None:
    summary = summarise(RunTables())
    assert all(frame.empty for frame in summary.values())
    assert backlog(RunTables()).empty


def test_recovery_time_runs_from_crash_to_the_first_empty_sample_after_restart() -> None:
    from simulations.analysis.timings import recovery_times

    run = RunTables()
    run.faults = pd.DataFrame(
        {"t_start": [10.0, 50.0], "t_end": [12.0, 51.0], "kind": ["consumer_crash"] * 2,
         "target": ["ledger-1", "push-3"], "detail": ["after-read", "mid-batch"]}
    )  # fmt: skip
    run.samples = pd.DataFrame(
        {"t": [9.0, 11.0, 13.0, 15.0, 49.0, 52.0], "group": ["ledger"] * 4 + ["push"] * 2,
         "pending": [0, 4, 2, 0, 0, 3], "oldest_pending_age_s": [0.0] * 6, "lag": [0] * 6,
         "lag_s": [0.0] * 6}
    )  # fmt: skip
    times = recovery_times(run).set_index("target")
    assert times.loc["ledger-1", "group"] == "ledger"
    assert times.loc["ledger-1", "recovery_s"] == pytest.approx(5.0)  # empty again at t=15
    assert pd.isna(times.loc["push-3", "recovery_s"])  # never empty again: not recovered


def test_littles_law_compares_redis_samples_with_the_event_log() -> None:
    from simulations.analysis.timings import littles_law

    run = RunTables()
    # Two events, each in the system for 2 s, over a 10 s window: λ = 0.2/s, W = 2 s.
    run.published = pd.DataFrame(
        {"event_id": ["e1", "e2"], "type": ["escrow.created"] * 2, "stream": ["escrow"] * 2,
         "escrow_id": ["x"] * 2, "sequence": [1, 2], "users": ["a"] * 2, "amount": [0] * 2,
         "t_committed": [1.0, 5.0], "t_published": [1.0, 5.0]}
    )  # fmt: skip
    run.handled = pd.DataFrame(
        {"group": ["ledger"] * 2, "event_id": ["e1", "e2"], "handler_calls": [1, 1],
         "max_delivery_count": [1, 1], "t_first": [3.0, 7.0], "t_last": [3.0, 7.0],
         "effects": [1, 1], "expected_effects": [1, 1]}
    )  # fmt: skip
    # Sampled every second: one entry in the system during [1, 3) and [5, 7).
    t = [float(i) for i in range(11)]
    level = [1 if 1 <= x < 3 or 5 <= x < 7 else 0 for x in t]
    run.samples = pd.DataFrame(
        {"t": t, "group": ["ledger"] * 11, "pending": level,
         "oldest_pending_age_s": [0.0] * 11, "lag": [0] * 11, "lag_s": [0.0] * 11}
    )  # fmt: skip
    law = littles_law(run, "ledger")
    assert law["lambda"] == pytest.approx(0.2) and law["W"] == pytest.approx(2.0)
    assert law["L"] == pytest.approx(0.4) and law["ratio"] == pytest.approx(1.0)


def test_reconnect_replays_leave_out_each_phones_first_connection() -> None:
    run = _run()
    run.deliveries = pd.concat([run.deliveries, pd.DataFrame(
        {"phone": ["b", "b"], "connection": [4, 5], "source": ["replay", "replay"],
         "entry_id": ["1-0", "2-0"], "event_id": ["e1", "e2"], "t": [0.5, 6.0]}
    )], ignore_index=True)  # fmt: skip
    sizes = reconnect_replays(run)
    assert sorted(zip(sizes.phone, sizes.connection, sizes.replayed, strict=True)) == [
        ("a", 2, 1),
        ("b", 5, 1),
    ]


def test_latencies_are_rounded_to_the_microsecond_without_negative_zero() -> None:
    run = _run()
    run.deliveries = run.deliveries.assign(t=[1e-10 - 1e-9, 1.0 + 3e-7, 5.0, 5.0])
    latency = client_latency(run)
    assert list(latency.latency_s) == [0.0, 0.0, 3.0]
    assert str(latency.latency_s.iloc[0]) == "0.0"  # not "-0.0"
