"""The outbox relay and stream retention, against a real redis-server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
import redis
from sqlalchemy import func, select

from tests.support import ROOT, make_service, run_lifecycles
from workbench.domain.events import from_fields, to_fields
from workbench.handlers import GROUPS, make_handler
from workbench.handlers.ledger import check_ledger
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.store import inbox, outbox
from workbench.streams.connection import connect
from workbench.streams.consumer import ConsumerWorker
from workbench.streams.groups import ensure_groups
from workbench.streams.keys import StreamNames
from workbench.streams.relay import OutboxRelay, _in_publish_order
from workbench.streams.retention import trim

NAMES = StreamNames()


def _stream_events(client: redis.Redis, aggregate: str) -> list[str]:
    return [from_fields(f).event_id for _, f in client.xrange(NAMES.stream(aggregate))]


def test_relay_publishes_each_stream_in_outbox_order(r, store, clock) -> None:
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 15)
    relay = OutboxRelay(store, r, batch_size=7)
    assert relay.backlog() > 0
    published = relay.drain()
    assert relay.backlog() == 0
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.stream, outbox.c.event_id).order_by(outbox.c.seq))
        by_stream: dict[str, list[str]] = {}
        for stream, event_id in rows:
            by_stream.setdefault(stream, []).append(event_id)
    assert published == sum(len(v) for v in by_stream.values())
    for aggregate, expected in by_stream.items():
        assert _stream_events(r, aggregate) == expected


def test_per_escrow_sequence_is_gapless_across_streams(r, store, clock) -> None:
    service, gateway = make_service(store, clock, failure_rate=0.3)
    run_lifecycles(service, gateway, clock, 10)
    OutboxRelay(store, r).drain()
    sequences: dict[str, list[int]] = {}
    for aggregate in ("escrow", "payment", "payout", "dispute"):
        for _, fields in r.xrange(NAMES.stream(aggregate)):
            event = from_fields(fields)
            sequences.setdefault(event.escrow_id, []).append(event.sequence)
    assert len(sequences) == 10  # every escrow published, so the loop below checks them all
    for escrow_id, seqs in sequences.items():
        assert sorted(seqs) == list(range(1, len(seqs) + 1)), escrow_id
        assert len(seqs) >= 3, escrow_id  # created, requested, and what followed


def test_relay_sigkilled_after_xadd_republishes_but_effects_happen_once(
    r, redis_url, store, clock
) -> None:
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 12)
    env = dict(os.environ, REDIS_URL=redis_url, DATABASE_URL=store.url)
    crashed = subprocess.run(
        [sys.executable, "-m", "workbench", "sim-relay", "--crash-at", "after-xadd"],
        env=env,
        cwd=ROOT,
        timeout=60,
        capture_output=True,
    )
    assert crashed.returncode == -signal.SIGKILL
    first_round = sum(len(_stream_events(r, a)) for a in ("escrow", "payment"))
    assert first_round > 0
    relay = OutboxRelay(store, r)
    assert relay.backlog() > 0  # the crashed batch was never marked
    relay.drain()
    all_ids = _stream_events(r, "escrow") + _stream_events(r, "payment")
    assert len(all_ids) > len(set(all_ids)), "the crashed batch was published twice"
    for group in GROUPS:
        ConsumerWorker(r, make_handler(group, store, clock), consumer="c", clock=clock).drain()
    with store.engine.connect() as conn:
        handled = dict(
            conn.execute(
                select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name)
            ).all()
        )
        distinct = conn.execute(
            select(func.count(func.distinct(outbox.c.event_id))).where(
                outbox.c.stream.in_(("escrow", "payment"))
            )
        ).scalar_one()
    assert handled["ledger"] == distinct
    assert check_ledger(store).ok


def test_commands_keep_working_while_redis_is_down(store, clock, tmp_path) -> None:
    with RedisServer(tmp_path / "redis", appendonly=True) as server:
        client = connect(server.url, retry=None)
        service, gateway = make_service(store, clock)
        server.stop()
        run_lifecycles(service, gateway, clock, 5)  # no Redis involved in commands
        relay = OutboxRelay(store, client)
        backlog = relay.backlog()
        assert backlog > 0
        try:
            relay.publish_batch()
            raise AssertionError("publishing without Redis should fail")
        except redis.ConnectionError:
            pass
        assert relay.backlog() == backlog  # nothing marked, nothing lost
        server.start()
        wait_until(lambda: _ping(client), timeout=30, what="Redis to answer")
        assert relay.drain() == backlog
        assert relay.backlog() == 0


def _ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def test_trim_never_removes_entries_a_group_has_not_acked(r) -> None:
    stream = NAMES.stream("escrow")
    ensure_groups(r, [stream], "fast")
    ensure_groups(r, [stream], "slow")
    from tests.streams.test_consumer import _event

    pipe = r.pipeline(transaction=False)
    for n in range(1, 2001):
        pipe.xadd(stream, to_fields(_event("esc-1", n)))
    ids = [i.decode() for i in pipe.execute()]
    # "fast" handles everything; "slow" has read 1500 and acked only the first 1000.
    for _, entries in r.xreadgroup("fast", "f", {stream: ">"}, count=5000):
        r.xack(stream, "fast", *[e for e, _ in entries])
    for _, entries in r.xreadgroup("slow", "s", {stream: ">"}, count=1500):
        r.xack(stream, "slow", *[e for e, _ in entries][:1000])

    result = trim(r, stream, retention_s=0)
    assert result.held_by_groups
    assert result.min_id == ids[1000]
    remaining = [i.decode() for i, _ in r.xrange(stream)]
    assert ids[1000] in remaining and remaining[-1] == ids[-1]
    assert result.trimmed > 0  # whole nodes before the first unacked entry went
    assert len(remaining) >= 1000
    # After "slow" catches up, a trim can go all the way to the retention window.
    pending = [row["message_id"] for row in r.xpending_range(stream, "slow", "-", "+", 10_000)]
    r.xack(stream, "slow", *pending)
    for _, entries in r.xreadgroup("slow", "s", {stream: ">"}, count=5000):
        r.xack(stream, "slow", *[e for e, _ in entries])
    assert not trim(r, stream, retention_s=0).held_by_groups


def test_trim_keeps_the_retention_window(r) -> None:
    stream = NAMES.stream("escrow")
    ensure_groups(r, [stream], "g")
    from tests.streams.test_consumer import _event

    for n in range(1, 300):
        r.xadd(stream, to_fields(_event("esc-1", n)))
    for _, entries in r.xreadgroup("g", "c", {stream: ">"}, count=5000):
        r.xack(stream, "g", *[e for e, _ in entries])
    result = trim(r, stream, retention_s=3600)
    assert result.trimmed == 0 and not result.held_by_groups
    assert r.xlen(stream) == 299


def test_lost_rows_go_back_each_stream_by_id_and_each_escrow_by_seq() -> None:
    def row(seq: int, event: str, stream: str, sid: str, escrow: str) -> tuple[Any, ...]:
        return (seq, event, stream, "t", b"", sid, escrow)

    # A's first row committed late (PostgreSQL): published after B's, under a larger id.
    overtaken = [
        row(1, "a1", "escrow", "30-0", "A"),
        row(2, "b1", "escrow", "10-0", "B"),
        row(3, "b2", "payment", "11-0", "B"),
        row(4, "a2", "payment", "31-0", "A"),
    ]
    assert [r[1] for r in _in_publish_order(overtaken)] == ["b1", "a1", "b2", "a2"]
    # One escrow's rows in two streams within one millisecond: ids of different streams
    # do not compare (by id alone e2's 20-1 would go before e1's 20-5).
    same_ms = [row(1, "e1", "escrow", "20-5", "E"), row(2, "e2", "payment", "20-1", "E")]
    assert [r[1] for r in _in_publish_order(same_ms)] == ["e1", "e2"]
    # The smallest seq at a stream's head waits for its escrow's earlier row.
    waits = [
        row(1, "x1", "payment", "20-1", "X"),
        row(2, "x2", "escrow", "20-0", "X"),
        row(3, "z1", "payment", "20-0", "Z"),  # Z committed before X (PostgreSQL)
    ]
    assert [r[1] for r in _in_publish_order(waits)] == ["z1", "x1", "x2"]


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_the_relay_loop_waits_out_a_redis_refusing_writes(store, clock, tmp_path, binary) -> None:
    """Out of memory (maxmemory, noeviction) every publish script is refused (OOM;
    Redis 6.2 reports it as the error of the script's ``redis.call``): the loop
    logs it and tries again after its pause, as for an outage, instead of dying
    with the error (a supervisor would restart it into the same refusal); once
    memory is raised, the backlog goes out. The heartbeat is not due meanwhile,
    so each pass reaches the script."""
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        client = connect(server.url)
        service, gateway = make_service(store, clock)
        relay = OutboxRelay(store, client, heartbeat_every_s=3600)
        loop = threading.Thread(target=relay.run, daemon=True)
        loop.start()
        try:
            wait_until(
                lambda: client.exists(NAMES.heartbeats("relay")),
                timeout=30,
                what="a first beat",
            )
            client.config_set("maxmemory", 1)
            run_lifecycles(service, gateway, clock, 3)
            wait_until(lambda: relay.stats.redis_errors >= 2, timeout=30, what="refused twice")
            assert loop.is_alive(), "the relay died of a refusal"
            assert relay.backlog() > 0
            client.config_set("maxmemory", 0)
            wait_until(lambda: relay.backlog() == 0, timeout=30, what="the backlog to go out")
        finally:
            relay.stop()
            loop.join(10)
        assert not loop.is_alive()
        assert sum(client.xlen(s) for s in NAMES.streams()) == relay.stats.published > 0
        client.close()
