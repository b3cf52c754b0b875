"""Fan-out into per-user streams: atomic dedupe, the prev chain, crash safety."""

from __future__ import annotations

import signal
import time

import pytest

from tests.support import make_service, run_lifecycles, spawn_worker
from workbench.delivery.userstreams import (
    NotReplicated,
    UserStreams,
    entry_from_fields,
    live_message,
)
from workbench.domain import events as ev
from workbench.domain.streamid import ZERO, parse
from workbench.handlers.fanout import FanoutHandler
from workbench.ops.waiting import wait_until
from workbench.streams.connection import REDIS_DOWN
from workbench.streams.consumer import ConsumerWorker
from workbench.streams.keys import UserStreamNames
from workbench.streams.relay import OutboxRelay

NAMES = UserStreamNames()


def _event(n: int, users: tuple[str, ...] = ("alice", "bob")) -> ev.Event:
    return ev.Event(
        event_id=f"evt_{n}",
        type="escrow.created",
        aggregate_type="escrow",
        aggregate_id=f"esc_{n}",
        sequence=1,
        user_ids=users,
        occurred_at=1.0,
        correlation_id="c",
        payload={"amount": n},
    )


def _entries(r, user: str) -> list[tuple[str, dict[bytes, bytes]]]:  # type: ignore[no-untyped-def]
    return [(i.decode(), f) for i, f in r.xrange(NAMES.stream(user))]


def _assert_chain(entries) -> None:  # type: ignore[no-untyped-def]
    prev = "0-0"
    for entry_id, fields in entries:
        assert fields[b"prev"].decode() == prev
        prev = entry_id


def test_append_writes_each_user_once_with_a_prev_chain(r) -> None:
    streams = UserStreams(r)
    events = [_event(i) for i in range(5)]
    assert streams.append([(e, ev.encode(e)) for e in events]) == [2] * 5
    for user in ("alice", "bob"):
        entries = _entries(r, user)
        assert [f[b"event_id"].decode() for _, f in entries] == [e.event_id for e in events]
        _assert_chain(entries)
        assert ev.decode(entries[0][1][b"data"]) == events[0]


def test_append_entries_returns_each_entry_as_readers_and_live_messages_have_it(r) -> None:
    """What a phone gets live in a virtual run is what XRANGE and the live channel carry."""
    streams = UserStreams(r)
    live = r.pubsub(ignore_subscribe_messages=True)
    live.subscribe(NAMES.live_channel())
    events = [_event(1), _event(2, ("bob",)), _event(1)]  # the repeat appends nothing
    appended = streams.append_entries([(e, ev.encode(e)) for e in events])
    users = [[user for user, _ in entries] for entries in appended]
    assert users == [["alice", "bob"], ["bob"], []]
    made = [entry for entries in appended for entry in entries]
    for user in ("alice", "bob"):
        stored = [entry_from_fields(i, f) for i, f in r.xrange(NAMES.stream(user))]
        assert [entry for u, entry in made if u == user] == stored
    published: list[tuple[str, object]] = []
    deadline = time.monotonic() + 10
    while len(published) < 3 and time.monotonic() < deadline:
        # (None also for the subscription's confirmation, which is ignored)
        if (message := live.get_message(timeout=1.0)) is not None:
            published.append(live_message(message["data"]))
    assert published == made
    live.close()


def test_a_repeated_event_appends_nothing(r) -> None:
    streams = UserStreams(r)
    e = _event(1)
    assert streams.append([(e, ev.encode(e)), (e, ev.encode(e))]) == [2, 0]
    assert streams.append([(e, ev.encode(e))]) == [0]
    assert r.xlen(NAMES.stream("alice")) == 1


def test_a_user_named_twice_gets_one_entry(r) -> None:
    e = _event(1, users=("alice", "alice"))
    assert UserStreams(r).append([(e, ev.encode(e))]) == [1]


def test_each_entry_is_announced_on_the_live_channel(r) -> None:
    pubsub = r.pubsub()
    pubsub.subscribe(NAMES.live_channel())
    wait_until(lambda: pubsub.get_message(timeout=0.1), what="the subscribe confirmation")
    e = _event(7)
    UserStreams(r).append([(e, ev.encode(e))])
    got = []
    wait_until(
        lambda: (m := pubsub.get_message(timeout=0.1)) and got.append(m) or len(got) == 2,
        what="two live messages",
    )
    decoded = [live_message(m["data"]) for m in got]
    assert [user for user, _ in decoded] == ["alice", "bob"]
    for user, entry in decoded:
        assert entry.id == parse(_entries(r, user)[0][0])
        assert entry.prev == ZERO
        assert entry.event_id == "evt_7"
        assert ev.decode(entry.data) == e


def test_retention_trims_old_entries(r) -> None:
    streams = UserStreams(r, maxlen=10)
    events = [_event(i) for i in range(500)]
    streams.append([(e, ev.encode(e)) for e in events])
    length = r.xlen(NAMES.stream("alice"))
    assert 10 <= length < 500  # approximate: whole nodes only


def test_fanout_handler_through_the_consumer_runtime(r, store, clock) -> None:
    service, gateway = make_service(store, clock, failure_rate=0, duplicate_rate=0.5)
    run_lifecycles(service, gateway, clock, 10)
    OutboxRelay(store, r).drain()
    OutboxRelay(store, r).drain()
    handler = FanoutHandler(r)
    worker = ConsumerWorker(r, handler, consumer="fanout-1")
    worker.drain()
    total = sum(r.xlen(s) for s in worker.streams)
    users = {k.decode().split(":", 2)[2] for k in r.scan_iter(match="wb:user:*")}
    per_user = sum(r.xlen(NAMES.stream(u)) for u in users)
    assert worker.stats.failed == 0
    assert handler.appended == per_user
    # Every event concerns buyer and seller; admin appears in resolutions.
    assert per_user >= 2 * total
    for user in users:
        ids = [f[b"event_id"] for _, f in _entries(r, user)]
        assert len(ids) == len(set(ids))
        _assert_chain(_entries(r, user))


@pytest.mark.parametrize("point", ["after-read", "mid-batch", "after-effect"])
def test_fanout_worker_sigkilled_mid_batch_creates_no_duplicates(
    r, redis_url, store, clock, tmp_path, point
) -> None:
    service, gateway = make_service(store, clock, failure_rate=0.1, duplicate_rate=0.2)
    run_lifecycles(service, gateway, clock, 30)
    OutboxRelay(store, r).drain()
    published = [
        ev.from_fields(f)
        for stream in ("wb:escrow", "wb:payment", "wb:payout", "wb:dispute")
        for _, f in r.xrange(stream)
    ]
    # Each user's truth: the events that concern them, each escrow's in sequence order.
    owed: dict[str, list[tuple[str, int, str]]] = {}
    for event in published:
        for user in dict.fromkeys(event.user_ids):
            owed.setdefault(user, []).append((event.escrow_id, event.sequence, event.event_id))
    crashed = spawn_worker(
        "fanout", "fanout-a", redis_url, store.url,
        "--batch-size", "20", "--crash-at", point, "--crash-batch", "1",
        log=tmp_path / "a.log",
    )  # fmt: skip
    wait_until(lambda: crashed.poll() is not None, timeout=60, what="the fan-out worker to crash")
    assert crashed.returncode == -signal.SIGKILL
    survivor = spawn_worker(
        "fanout", "fanout-b", redis_url, store.url,
        "--batch-size", "20", "--dead-after", "0.5", log=tmp_path / "b.log",
    )  # fmt: skip
    try:
        wait_until(
            lambda: all(
                g["pending"] == 0 and g.get("lag") == 0
                for s in ("wb:escrow", "wb:payment", "wb:payout", "wb:dispute")
                for g in r.xinfo_groups(s)
            ),
            timeout=60,
            what="the survivor to drain every stream",
        )
    finally:
        survivor.terminate()
        survivor.wait(10)
    users = {k.decode().split(":", 2)[2] for k in r.scan_iter(match="wb:user:*")}
    assert users == set(owed) and len(users) >= 10
    for user, truth in owed.items():  # per user: an event missing from one party fails
        entries = _entries(r, user)
        ids = [f[b"event_id"].decode() for _, f in entries]
        assert len(ids) == len(set(ids)), f"duplicates in the stream of {user}"
        assert sorted(ids) == sorted(event_id for *_, event_id in truth), user
        _assert_chain(entries)
    # Order is not asserted: entries claimed from the killed worker are appended after
    # what the survivor handled meanwhile (crash recovery may reorder; README, Order).


def test_append_survives_redis_forgetting_the_script(r) -> None:
    streams = UserStreams(r)
    r.script_flush()  # as after a restart
    e = _event(1)
    assert streams.append([(e, ev.encode(e))]) == [2]
    r.script_flush()
    assert streams.append([(e, ev.encode(e))]) == [0]


def test_history_by_age_trims_old_entries_and_keeps_the_chain(r) -> None:
    streams = UserStreams(r)
    old = [_event(i, ("carol",)) for i in range(300)]
    streams.append([(e, ev.encode(e)) for e in old])
    last_old = _entries(r, "carol")[-1][0]
    last_ms = int(last_old.split("-")[0])

    def redis_ms() -> int:
        seconds, micros = r.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # Wait (on Redis' own clock) until the old entries are 200 ms old.
    wait_until(lambda: redis_ms() > last_ms + 200, timeout=10, what="Redis time to move on")
    aged = UserStreams(r, max_age_s=0.1)
    new = _event(1000, ("carol",))
    assert aged.append([(new, ev.encode(new))]) == [1]
    entries = _entries(r, "carol")
    # The old history is gone; the new entry stays and still names the last old
    # one as prev.
    assert len(entries) == 1
    assert entries[-1][1][b"event_id"] == b"evt_1000"
    assert entries[-1][1][b"prev"].decode() == last_old
    with pytest.raises(ValueError, match="must not be negative"):
        UserStreams(r, max_age_s=-1)


def test_a_batch_its_replicas_did_not_confirm_raises_with_what_it_appended(r) -> None:
    """The test server has no replica: WAIT 1 times out, so the batch is refused as
    not replicated (a Redis outage to the consumer: not acked, redelivered). What
    it appended is on the exception; the redelivery finds the markers."""
    events = [_event(i) for i in range(3)]
    batch = [(e, ev.encode(e)) for e in events]
    waiting = UserStreams(r, wait_replicas=1, wait_timeout_ms=20)
    with pytest.raises(NotReplicated) as refused:
        waiting.append_entries(batch)
    assert isinstance(refused.value, REDIS_DOWN)
    assert [len(entries) for entries in refused.value.appended] == [2, 2, 2]
    assert refused.value.nodes == ["redis"]
    assert UserStreams(r).append(batch) == [0, 0, 0]  # redelivered: nothing twice
    assert len(_entries(r, "alice")) == 3
    assert UserStreams(r, wait_replicas=0).append([]) == []
    with pytest.raises(ValueError, match="wait_replicas"):
        UserStreams(r, wait_replicas=-1)
