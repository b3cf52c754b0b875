"""Notebook 03's harness: three delivery designs under one load and fault schedule.

One comparison (all three designs, real redis-server, fixed seed) is shared by
the module; each test reads its table. Runs pace themselves by the schedule;
nothing else here sleeps.
"""

from __future__ import annotations

import asyncio
import time

import pandas as pd
import pytest

from simulations.designs import (
    DesignResult,
    Schedule,
    StreamsOnly,
    StreamsPlusLocalPubSub,
    claims,
    compare,
    connection_scaling,
    connection_slopes,
    run_design,
)
from simulations.designs.claims import CLAIMS
from simulations.designs.two_layer import sse_frames
from workbench.delivery.entries import UserEntry
from workbench.delivery.sessions import page_chunk
from workbench.domain.streamid import StreamId
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until

PUBSUB, STREAMS, TWO_LAYER = "pubsub_only", "streams_only", "streams_plus_local_pubsub"
LOGGED = (STREAMS, TWO_LAYER)

SCHEDULE = Schedule(
    seed=3,
    n_clients=20,
    rate=50.0,
    duration_s=4.0,
    downtime_start_s=1.5,
    downtime_s=1.0,
    n_disconnects=3,
    disconnect_s=0.8,
)

CLAIM_NAMES = [
    "Persistence across consumer downtime",
    "At-least-once through a crash, with idempotent handlers",
    "Reconnection replay for SSE clients",
    "Operability: depth and pending visible",
    "The extra hop costs under a millisecond",
    "Where plain fan-out wins: lower latency",
    "Where plain fan-out wins: less Redis work",
    "Where plain fan-out wins: fewer moving parts",
    "Streams for the last hop cost a connection per phone; local Pub/Sub keeps it O(1) per process",
]
# Verdicts that follow from the designs' structure, not from timing on this machine.
STRUCTURAL = [name for name in CLAIM_NAMES if "latency" not in name and "extra hop" not in name]


@pytest.fixture(scope="module")
def results(redis_server: RedisServer) -> pd.DataFrame:
    if not redis_server.running:  # a previous test killed it
        redis_server.restart()
    return compare(SCHEDULE, redis_server.url)


# -- the schedule -------------------------------------------------------------------


def test_a_schedule_is_fixed_by_its_seed() -> None:
    a, b = Schedule(seed=1), Schedule(seed=1)
    assert a.events == b.events and a.disconnects == b.disconnects
    assert Schedule(seed=2).events != a.events
    # Load and faults come from separate streams: other faults, same events.
    assert Schedule(seed=1, n_disconnects=2, disconnect_s=0.5).events == a.events


def test_a_schedule_is_consistent() -> None:
    s = Schedule(seed=4)
    times = [e.at_s for e in s.events]
    assert times == sorted(times) and times[0] >= 0 and times[-1] < s.duration_s
    assert abs(len(s.events) - s.rate * s.duration_s) < 4 * (s.rate * s.duration_s) ** 0.5
    assert all(len(set(e.users)) == s.users_per_event for e in s.events)
    assert len({d.user for d in s.disconnects}) == s.n_disconnects
    assert all(d.window.start_s >= 0.5 and d.window.end_s <= s.duration_s for d in s.disconnects)
    assert sum(map(len, s.expected().values())) == len(s.events) * s.users_per_event


@pytest.mark.parametrize(
    "bad",
    [
        {"downtime_start_s": 5.0, "downtime_s": 2.0},
        {"users_per_event": 21},
        {"disconnect_s": 5.5},
        {"crash_point": "mid-batch"},
    ],
)
def test_a_schedule_rejects_what_does_not_fit(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Schedule(**bad)  # type: ignore[arg-type]


def test_replay_pages_are_read_back_as_sent() -> None:
    entries = [
        UserEntry(StreamId(5, i), StreamId(5, i - 1) if i else StreamId(0, 0), f"e{i}", "t", "{}")
        for i in range(3)
    ]
    assert sse_frames(page_chunk(entries)) == [(f"5-{i}", "t", "{}") for i in range(3)]


# -- the comparison -----------------------------------------------------------------


def test_pubsub_only_loses_across_the_downtime_and_the_disconnects(results: pd.DataFrame) -> None:
    row = results.loc[PUBSUB]
    assert row["lost"] > 0
    assert row["lost_in_downtime"] > 0
    assert row["lost_in_disconnect"] > 0
    assert row["published_unheard"] > 0  # the producer's only hint
    assert row["replayed"] == 0
    assert not row["backlog_visible"]
    assert row["duplicated"] == 0 and row["out_of_order"] == 0


@pytest.mark.parametrize("design", LOGGED)
def test_log_designs_deliver_everything_once_and_in_order(
    results: pd.DataFrame, design: str
) -> None:
    row = results.loc[design]
    assert row["drained"]
    assert row["lost"] == 0
    assert row["delivered"] == row["expected"]
    assert row["duplicated"] == 0
    assert row["out_of_order"] == 0
    assert row["unexpected"] == 0 and row["resets"] == 0
    assert row["replayed"] > 0  # reconnects resumed from Last-Event-ID
    assert row["redelivered"] >= 1  # the crashed batch came back ...
    assert row["duplicates_suppressed"] >= 1  # ... and was not fanned out twice
    assert row["backlog_visible"] and row["peak_backlog_in_downtime"] > 0
    assert row["user_stream_entries"] == row["expected"]


def test_same_load_for_every_design(results: pd.DataFrame) -> None:
    assert results["events_produced"].nunique() == 1
    assert (results["expected"] == len(SCHEDULE.events) * SCHEDULE.users_per_event).all()
    assert (results["downtime_s"] >= SCHEDULE.downtime_s).all()


def test_streams_only_holds_a_connection_per_client_two_layer_does_not(
    results: pd.DataFrame,
) -> None:
    assert results.loc[STREAMS, "client_connections_peak"] == SCHEDULE.n_clients
    two = results.loc[TWO_LAYER]
    assert 1 <= two["client_connections_peak"] <= two["client_connection_bound"]
    assert two["client_connection_bound"] < SCHEDULE.n_clients
    assert two["redis_connections_peak"] < results.loc[STREAMS, "redis_connections_peak"]


def test_two_layer_connections_do_not_grow_with_clients(redis_server: RedisServer) -> None:
    if not redis_server.running:
        redis_server.restart()
    calm = {"duration_s": 1.0, "rate": 40.0, "downtime_s": 0.0, "n_disconnects": 0}
    offset = 1_000_000.0  # a clock of our own: every timestamp must come from it

    def clock() -> float:
        return time.time() + offset

    async def from_a_running_loop() -> DesignResult:  # as in Jupyter
        return run_design(
            StreamsPlusLocalPubSub(), Schedule(n_clients=10, **calm), redis_server.url, clock=clock
        )

    small = asyncio.run(from_a_running_loop())
    large = run_design(StreamsPlusLocalPubSub(), Schedule(n_clients=60, **calm), redis_server.url)
    streams = run_design(StreamsOnly(), Schedule(n_clients=60, **calm), redis_server.url)
    for result in (small, large):
        assert result.metrics["lost"] == 0
        assert result.metrics["client_connections_peak"] <= 5  # 1 live + a pool of 4
    assert streams.metrics["client_connections_peak"] == 60
    receipts = [r for rs in small.receipts.values() for r in rs]
    assert receipts and all(r.occurred_at > offset and r.received_at > offset for r in receipts)

    client = redis_server.client()
    try:
        assert not client.keys("dz*")  # every run deletes its keys

        def none_left() -> bool:  # and closes its connections (named <prefix>:<role>)
            return not [c for c in client.client_list() if str(c["name"]).startswith("dz")]

        wait_until(none_left, timeout=30, what="the runs' connections to close")
    finally:
        client.close()


def test_connections_per_added_phone_one_for_streams_only_none_for_two_layer(
    redis_server: RedisServer,
) -> None:
    if not redis_server.running:
        redis_server.restart()
    scaling = connection_scaling(
        [4, 12], [1, 2], redis_server.url,
        designs=lambda: [StreamsOnly(), StreamsPlusLocalPubSub(pool_size=2)],
        rate=20.0, duration_s=0.5,
    )  # fmt: skip
    assert len(scaling) == 2 * 2 * 2 and (scaling["lost"] == 0).all()
    two = scaling[scaling.design == TWO_LAYER]
    assert (two["client_connections"] <= 3).all()  # 1 live + a pool of 2
    assert (two["client_connection_bound"] == 3).all()
    slopes = connection_slopes(scaling).set_index(["design", "seed"])["slope"]
    assert slopes.loc[STREAMS].tolist() == [1.0, 1.0]  # 4 phones: 4; 12 phones: 12
    assert slopes.loc[TWO_LAYER].abs().max() <= 2 / 8  # at most the pool's 2 over 8 phones


def test_a_slope_needs_two_phone_counts_and_a_sweep_needs_runs() -> None:
    one_count = pd.DataFrame(
        {"design": [STREAMS], "seed": [1], "phones": [4], "client_connections": [4]}
    )
    with pytest.raises(ValueError, match="two phone counts"):
        connection_slopes(one_count)
    with pytest.raises(ValueError, match="at least one phone count"):
        connection_scaling([], [1], "redis://127.0.0.1:1/0")


# -- the claims ---------------------------------------------------------------------


def test_claims_has_a_row_per_claim_with_numbers_and_a_verdict(results: pd.DataFrame) -> None:
    table = claims(results)
    assert list(table.index) == CLAIM_NAMES and len(CLAIMS) == len(CLAIM_NAMES)
    assert set(table["verdict"]) <= {"holds", "does not hold"}
    for name in STRUCTURAL:
        assert table.loc[name, "verdict"] == "holds", table.loc[name, "evidence"]
    for name, row in table.iterrows():
        assert any(ch.isdigit() for ch in row["evidence"]), name
        assert all(row[d] for d in (PUBSUB, STREAMS, TWO_LAYER))


def test_verdicts_are_computed_from_the_numbers(results: pd.DataFrame) -> None:
    leaky = results.copy()
    leaky.loc[STREAMS, ["lost", "lost_in_downtime"]] = 3
    assert claims(leaky).loc[CLAIM_NAMES[0], "verdict"] == "does not hold"

    lucky = results.copy()  # Pub/Sub-only losing nothing offline proves nothing
    lucky.loc[PUBSUB, "lost_in_disconnect"] = 0
    assert claims(lucky).loc[CLAIM_NAMES[2], "verdict"] == "does not hold"

    crowded = results.copy()
    crowded.loc[TWO_LAYER, "client_connections_peak"] = SCHEDULE.n_clients
    assert claims(crowded).loc[CLAIM_NAMES[-1], "verdict"] == "does not hold"


def test_claims_need_all_three_designs(results: pd.DataFrame) -> None:
    with pytest.raises(KeyError, match="pubsub_only"):
        claims(results.drop(PUBSUB))
