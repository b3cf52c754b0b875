"""The consumer-group runtime against a real redis-server and real worker processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
import redis
import sqlalchemy.exc
from sqlalchemy import func, select

from simulations.faults import CRASH_POINTS, CrashingWorker
from tests.support import ROOT, make_service, run_lifecycles, spawn_worker
from workbench.domain.clock import ManualClock
from workbench.domain.events import Event, to_fields
from workbench.handlers import GROUPS, make_handler
from workbench.handlers.fanout import FanoutHandler
from workbench.handlers.ledger import check_ledger
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.store import Store, inbox, outbox
from workbench.streams.connection import refused
from workbench.streams.consumer import _BEGIN_ALONE_LUA, ConsumerSettings, ConsumerWorker
from workbench.streams.decisions import Delivery, dead_consumers, ready_to_handle
from workbench.streams.groups import ensure_groups
from workbench.streams.keys import StreamNames
from workbench.streams.relay import OutboxRelay

NAMES = StreamNames()


def _inbox_count(store: Store, group: str) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(inbox).where(inbox.c.group_name == group)
            ).scalar_one()
        )


def _expected(store: Store, aggregate_types: tuple[str, ...]) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count(func.distinct(outbox.c.event_id))).where(
                    outbox.c.stream.in_(aggregate_types)
                )
            ).scalar_one()
        )


def _pending(client: redis.Redis, group: str, aggregate_types: tuple[str, ...]) -> int:
    return sum(int(client.xpending(s, group)["pending"]) for s in NAMES.streams(aggregate_types))


def _pending_of(client: redis.Redis, group: str, consumer: str) -> list[str]:
    ids = []
    for stream in NAMES.streams():
        try:
            rows = client.xpending_range(stream, group, "-", "+", 10_000, consumername=consumer)
        except redis.ResponseError:
            continue
        ids += [row["message_id"].decode() for row in rows]
    return ids


# -- pure decisions ----------------------------------------------------------------


def test_dead_consumers_uses_heartbeats_not_idle_time() -> None:
    pending = {"alive": 3, "stale": 2, "never": 1, "me": 4, "idle-empty": 0}
    heartbeats = {"alive": 100.0, "stale": 80.0, "me": 50.0, "idle-empty": 0.0}
    assert dead_consumers(pending, heartbeats, me="me", now=105.0, dead_after_s=10) == [
        "never",
        "stale",
    ]


def test_block_must_stay_below_socket_timeout() -> None:
    with pytest.raises(ValueError, match="socket timeout"):
        ConsumerSettings(block_ms=5000)


# -- in-process ----------------------------------------------------------------------


def test_every_group_handles_every_event_once(r, store, clock) -> None:
    service, gateway = make_service(store, clock, duplicate_rate=0.3, failure_rate=0.2)
    run_lifecycles(service, gateway, clock, 30)
    relay = OutboxRelay(store, r)
    relay.drain()
    workers = [
        ConsumerWorker(r, make_handler(g, store, clock), consumer=f"{g}-1", clock=clock)
        for g in GROUPS
    ]
    for w in workers:
        w.drain()
        assert _inbox_count(store, w.group) == _expected(store, w.handler.aggregate_types)
        assert _pending(r, w.group, w.handler.aggregate_types) == 0
    assert check_ledger(store).ok


class _Picky:
    """A handler that always fails on one escrow and records the rest."""

    group = "picky"
    aggregate_types = ("escrow",)

    def __init__(self) -> None:
        self.seen: list[str] = []

    def handle(self, events: list[Event]) -> None:
        for event in events:
            if event.escrow_id == "esc-bad":
                raise RuntimeError("cannot handle esc-bad")
        self.seen.extend(e.event_id for e in events)


def _event(escrow_id: str, n: int) -> Event:
    return Event(
        event_id=f"evt-{escrow_id}-{n}",
        type="escrow.shipped",
        aggregate_type="escrow",
        aggregate_id=escrow_id,
        sequence=n,
        user_ids=("b", "s"),
        occurred_at=1.0,
        correlation_id="c",
    )


class _Recording:
    """Records every event it is given, in order, from every stream."""

    group = "recording"
    aggregate_types = ("escrow", "payment")

    def __init__(self) -> None:
        self.seen: list[str] = []

    def handle(self, events: list[Event]) -> None:
        self.seen.extend(e.event_id for e in events)


def test_a_batch_reaches_the_handler_in_each_escrows_sequence_order(r) -> None:
    # The relay publishes payment.received (sequence 2, payment stream) before
    # escrow.funded (3, escrow stream); one read returns them grouped by stream,
    # escrow first. The handler (the fan-out: phones see this order) gets 2 then 3.
    handler = _Recording()
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock())
    worker.setup()
    paid = Event(
        event_id="evt-paid", type="payment.received", aggregate_type="payment",
        aggregate_id="esc-1", sequence=2, user_ids=("b", "s"), occurred_at=1.0,
        correlation_id="c",
    )  # fmt: skip
    r.xadd(NAMES.stream("payment"), to_fields(paid))
    r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", 3)))
    r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-2", 1)))
    worker.poll()
    assert handler.seen == ["evt-paid", "evt-esc-2-1", "evt-esc-1-3"]


class _Outage(_Recording):
    """Fails its first call as if Redis went away mid-handling (a transient error)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def handle(self, events: list[Event]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise redis.ConnectionError("Redis went away mid-handling")
        super().handle(events)


def test_entries_read_before_an_outage_are_handled_at_the_next_poll(r) -> None:
    """Whoever drives the worker (``run`` or a simulation's loop) gets the same
    recovery: what was read but not acked is re-read as pending at the next step,
    not left to the dead-consumer claim or the idle backstop."""
    handler = _Outage()
    worker = ConsumerWorker(r, handler, consumer="out-1", clock=ManualClock())
    worker.setup()
    for n in (1, 2):
        r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-9", n)))
    with pytest.raises(redis.ConnectionError):
        worker.poll()
    assert len(_pending_of(r, "recording", "out-1")) == 2
    worker.poll()
    assert handler.seen == ["evt-esc-9-1", "evt-esc-9-2"]
    assert _pending_of(r, "recording", "out-1") == []


def test_poison_entries_go_to_dead_letters_after_max_deliveries(r) -> None:
    clock = ManualClock()
    handler = _Picky()
    settings = ConsumerSettings(max_deliveries=3, retry_backoff_s=1.0)
    worker = ConsumerWorker(r, handler, consumer="p1", clock=clock, settings=settings)
    worker.setup()
    stream = NAMES.stream("escrow")
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    garbage_id = r.xadd(stream, {"event_id": "x", "type": "escrow.created", "data": b"{oops"})
    bad_id = r.xadd(stream, to_fields(_event("esc-bad", 1)))
    r.xadd(stream, to_fields(_event("esc-2", 1)))

    def dead_letters() -> list[dict[bytes, bytes]]:
        return [fields for _, fields in r.xrange(NAMES.dead_letter("picky"))]

    for _ in range(10):
        worker.poll()
        if len(dead_letters()) == 2:
            break
        clock.advance(1.1)
    letters = {f[b"source_id"]: f for f in dead_letters()}
    assert set(letters) == {garbage_id, bad_id}
    assert b"malformed event" in letters[garbage_id][b"reason"]
    assert letters[bad_id][b"reason"] == b"RuntimeError: cannot handle esc-bad"
    assert all(f[b"deliveries"] == b"3" for f in letters.values())
    assert letters[garbage_id][b"entry.data"] == b"{oops"  # the entry itself is kept
    # The group kept moving: good entries handled once, nothing left pending.
    assert handler.seen == ["evt-esc-1-1", "evt-esc-2-1"]
    assert r.xpending(stream, "picky")["pending"] == 0
    # New entries still flow after the poison.
    r.xadd(stream, to_fields(_event("esc-3", 1)))
    worker.poll()
    assert handler.seen[-1] == "evt-esc-3-1"


class _PickyBehindAnOutage(_Picky):
    """Its database is down for its first ``outages`` calls (a transient error: not
    the entries' fault), then it fails on esc-bad for good; counts those failures
    (the worker's calls with esc-bad alone: one per delivery, after a failed batch)."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages, self.failures = outages, 0

    def handle(self, events: list[Event]) -> None:
        if self.outages:
            self.outages -= 1
            raise sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database down"))
        try:
            super().handle(events)
        except RuntimeError:
            self.failures += len(events) == 1
            raise


def _pending_row(r: redis.Redis, stream: str, group: str, entry_id: bytes) -> dict[str, Any]:
    """The group's pending-entries row of ``entry_id`` (owner, idle time, count)."""
    [row] = r.xpending_range(stream, group, entry_id, entry_id, 1)
    return row  # type: ignore[no-any-return]


class _CutShort(_Picky):
    """A stop (KeyboardInterrupt) lands inside its commit, whose own cleanup then
    fails an assertion: an AssertionError in the stop's place, the stop its context."""

    def handle(self, events: list[Event]) -> None:
        active = True
        try:
            raise KeyboardInterrupt
        finally:
            assert not active


def test_an_error_in_place_of_a_stop_is_not_the_entries_failure(r) -> None:
    """It leaves the poll, as the stop would have; the entries stay pending, with no
    failure counted and no dead letter (it was: a swallowed Ctrl-C in a simulation
    counted as a handler failure and the run went on)."""
    settings = ConsumerSettings(max_deliveries=1)
    worker = ConsumerWorker(r, _CutShort(), consumer="p1", clock=ManualClock(), settings=settings)
    worker.setup()
    stream = NAMES.stream("escrow")
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    with pytest.raises(AssertionError) as info:
        worker.poll()
    assert isinstance(info.value.__context__, KeyboardInterrupt)
    assert worker.stats.failed == 0 and r.xlen(NAMES.dead_letter("picky")) == 0
    assert r.xpending(stream, "picky")["pending"] == 1


def test_outages_do_not_use_up_an_entrys_deliveries(r) -> None:
    """Each outage re-reads the worker's pending entries; that is not another
    attempt at them, so it is not counted (it was: after max_deliveries outages
    the first real failure dead-lettered the entry without a retry). Retries
    after real failures are counted: the poison still goes after max_deliveries."""
    clock = ManualClock()
    handler = _PickyBehindAnOutage(outages=5)
    settings = ConsumerSettings(max_deliveries=3, retry_backoff_s=1.0)
    worker = ConsumerWorker(r, handler, consumer="p1", clock=clock, settings=settings)
    worker.setup()
    stream = NAMES.stream("escrow")
    bad_id = r.xadd(stream, to_fields(_event("esc-bad", 1)))
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    for _ in range(5):
        with pytest.raises(sqlalchemy.exc.OperationalError):
            worker.poll()
        clock.advance(1.1)
    assert _pending_row(r, stream, "picky", bad_id)["times_delivered"] == 1
    dead = NAMES.dead_letter("picky")
    polls = 0
    while not r.xlen(dead):
        assert polls < 10, "never dead-lettered"
        worker.poll()
        clock.advance(1.1)
        polls += 1
    [(_, letter)] = r.xrange(dead)
    assert letter[b"source_id"] == bad_id and letter[b"deliveries"] == b"3"
    assert handler.failures == 3  # every allowed delivery tried, none used up by outages
    assert handler.seen == ["evt-esc-1-1"]


def test_an_outages_reread_keeps_the_entries_from_the_idle_backstop(r) -> None:
    """Read as they are, the re-read entries' idle time is still reset (as a delivery
    resets it), so another worker's idle backstop does not take them from under
    this one; their delivery count stays."""
    clock = ManualClock()
    worker = ConsumerWorker(
        r, _PickyBehindAnOutage(outages=2), consumer="p1", clock=clock,
        settings=ConsumerSettings(claim_idle_ms=60_000),
    )  # fmt: skip
    worker.setup()
    stream = NAMES.stream("escrow")
    entry_id = r.xadd(stream, to_fields(_event("esc-1", 1)))
    with pytest.raises(sqlalchemy.exc.OperationalError):
        worker.poll()  # read, then the outage
    r.xclaim(stream, "picky", "p1", 0, [entry_id], idle=600_000, justid=True)  # long idle
    with pytest.raises(sqlalchemy.exc.OperationalError):
        worker.poll()  # re-read as it is, then the outage again
    row = _pending_row(r, stream, "picky", entry_id)
    assert row["time_since_delivered"] < 60_000 and row["times_delivered"] == 1


def test_a_new_process_counts_its_predecessors_pending_as_delivered_again(r) -> None:
    """A worker that replaces a crashed one (same consumer name) re-reads what that
    one had pending as another delivery: the entry may be what killed it, and its
    count decides, at its next failure, whether its max_deliveries are used up."""
    stream = NAMES.stream("escrow")
    ensure_groups(r, [stream], "recording")
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    r.xreadgroup("recording", "rec-1", {stream: ">"})  # read; then the process died
    worker = ConsumerWorker(r, _Recording(), consumer="rec-1", clock=ManualClock())
    worker.setup()
    worker.poll()
    assert worker.stats.delivery_counts == {2: 1}


def test_entries_claimed_from_a_dead_consumer_count_as_delivered_again(r) -> None:
    """The claim (XCLAIM JUSTID) does not count; the re-read after it does, also when
    its first try fails and it is done again."""
    stream = NAMES.stream("escrow")
    clock = ManualClock()
    worker = ConsumerWorker(r, _Recording(), consumer="rec-2", clock=clock)
    worker.setup()
    worker.poll()  # its start's own-pending pass: nothing
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    r.xreadgroup("recording", "rec-1", {stream: ">"})  # read by rec-1, which then died
    read, failed = worker._read, []

    def reset_once(start: Any, block_ms: int, **kw: Any) -> Any:
        if not failed and isinstance(start, dict) and set(start.values()) == {"0"}:
            failed.append(start)
            raise redis.ConnectionError("Connection reset by peer")
        return read(start, block_ms, **kw)

    worker._read = reset_once  # type: ignore[method-assign]
    clock.advance(worker.settings.dead_after_s + worker.settings.recover_every_s)
    with pytest.raises(redis.ConnectionError):
        worker.poll()  # claimed, then the counted re-read fails
    worker.poll()
    assert failed and worker.stats.claimed == 1
    assert worker.stats.delivery_counts == {2: 1}


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_a_fanout_refused_for_lack_of_memory_is_retried_not_dead_lettered(
    tmp_path, binary: str
) -> None:
    """Out of memory, every run of the fan-out script is refused (OOM): that is
    Redis' state, not the events' fault. The poll raises it as an outage, the
    entries stay pending and come back after the pause, however many times; no
    dead letter (which would leave a silent gap in the users' streams). Once
    memory is raised they are fanned out, each once. (Redis 6.2 reports the
    refusal as the error of the script's ``redis.call``.)"""
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        client = server.client()
        clock = ManualClock()  # not advanced: the first poll's heartbeat is the only one
        settings = ConsumerSettings(max_deliveries=2, retry_backoff_s=0.0)
        fanout = FanoutHandler(client)
        worker = ConsumerWorker(client, fanout, consumer="f1", clock=clock, settings=settings)
        assert worker.poll() == 0
        for i in range(3):
            client.xadd(NAMES.stream("escrow"), to_fields(_event(f"esc-{i}", 1)))
        client.config_set("maxmemory", 1)
        for _ in range(settings.max_deliveries + 2):
            with pytest.raises(redis.ResponseError) as refusal:
                worker.poll()
            assert refused(refusal.value), refusal.value  # raised as Redis' state
        client.config_set("maxmemory", 0)
        assert worker.poll() == 3
        assert worker.stats.dead_lettered == 0
        assert client.xlen(NAMES.dead_letter("fanout")) == 0
        assert fanout.appended == 6  # three events, each to its buyer's and seller's stream
        assert client.xpending(NAMES.stream("escrow"), "fanout")["pending"] == 0
        client.close()


def test_the_worker_loop_waits_out_a_redis_refusing_writes(tmp_path) -> None:
    """Out of memory its heartbeat (HSET) is refused: the loop logs it and polls
    again after its pause instead of dying with the error; once memory is
    raised, it handles what arrived meanwhile."""
    with RedisServer(tmp_path / "redis") as server:
        client = server.client()
        handler = _Picky()
        settings = ConsumerSettings(block_ms=50, heartbeat_every_s=0.0)
        worker = ConsumerWorker(client, handler, consumer="p1", settings=settings)
        worker.setup()
        client.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", 1)))
        client.config_set("maxmemory", 1)
        loop = threading.Thread(target=worker.run, daemon=True)
        loop.start()
        try:
            wait_until(lambda: worker.stats.redis_errors >= 2, timeout=30, what="refused twice")
            assert loop.is_alive(), "the worker died of a refusal"
            client.config_set("maxmemory", 0)
            wait_until(lambda: handler.seen == ["evt-esc-1-1"], timeout=30, what="the entry")
        finally:
            worker.stop()
            loop.join(10)
        assert not loop.is_alive()
        client.close()


def test_unknown_event_type_is_dead_lettered_with_its_reason(r) -> None:
    clock = ManualClock()
    handler = _Picky()
    worker = ConsumerWorker(
        r,
        handler,
        consumer="p1",
        clock=clock,
        settings=ConsumerSettings(max_deliveries=1),
    )
    worker.setup()
    bogus = to_fields(_event("esc-9", 1))
    bogus["data"] = bogus["data"].replace(b"escrow.shipped", b"escrow.teleported")
    r.xadd(NAMES.stream("escrow"), bogus)
    worker.poll()
    ((_, fields),) = r.xrange(NAMES.dead_letter("picky"))
    assert fields[b"reason"] == b"unknown event type 'escrow.teleported'"


def _read_as_ghost(client: redis.Redis, group: str, count: int) -> list[str]:
    """Read entries as a consumer that then 'dies' (never acks, never heartbeats)."""
    reply = client.xreadgroup(group, "ghost", {NAMES.stream("escrow"): ">"}, count=count)
    return [entry_id.decode() for _, entries in reply for entry_id, _ in entries]


def test_entries_of_a_dead_consumer_are_claimed_by_heartbeat(r) -> None:
    clock = ManualClock()
    handler = _Picky()
    settings = ConsumerSettings(dead_after_s=5.0, recover_every_s=0.0)
    worker = ConsumerWorker(r, handler, consumer="live", clock=clock, settings=settings)
    worker.setup()
    for n in range(1, 6):
        r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", n)))
    taken = _read_as_ghost(r, "picky", 3)
    # The ghost still heartbeats: its entries are not stolen.
    r.hset(NAMES.heartbeats("picky"), "ghost", repr(clock.now()))
    worker.poll()
    assert len(handler.seen) == 2
    assert len(_pending_of(r, "picky", "ghost")) == 3
    # Its heartbeat goes stale: the live consumer claims and handles the rest.
    clock.advance(6.0)
    worker.poll()
    assert sorted(handler.seen) == sorted(f"evt-esc-1-{n}" for n in range(1, 6))
    assert _pending_of(r, "picky", "ghost") == []
    assert worker.stats.claimed == len(taken)
    consumers = {c["name"] for c in r.xinfo_consumers(NAMES.stream("escrow"), "picky")}
    assert b"ghost" not in consumers  # an emptied dead consumer is removed


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_entries_deleted_while_pending_are_acked_and_counted(tmp_path, binary) -> None:
    with RedisServer(tmp_path / binary, binary=binary) as server:
        client = server.client()
        clock = ManualClock()
        handler = _Picky()
        worker = ConsumerWorker(
            client,
            handler,
            consumer="live",
            clock=clock,
            settings=ConsumerSettings(dead_after_s=1.0, recover_every_s=0.0),
        )
        worker.setup()
        for n in range(1, 4):
            client.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", n)))
        taken = _read_as_ghost(client, "picky", 3)
        client.xdel(NAMES.stream("escrow"), taken[1])
        clock.advance(2.0)
        worker.poll()
        worker.poll()
        assert sorted(handler.seen) == ["evt-esc-1-1", "evt-esc-1-3"]
        assert worker.stats.deleted == 1
        assert client.xpending(NAMES.stream("escrow"), "picky")["pending"] == 0


# -- real processes, SIGKILL ----------------------------------------------------------


@pytest.mark.parametrize("recovery", ["restart", "claim"])
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_worker_sigkilled_mid_batch_loses_nothing_and_posts_once(
    r, redis_url, store, clock, tmp_path, point, recovery
) -> None:
    service, gateway = make_service(store, clock, duplicate_rate=0.3, failure_rate=0.1)
    run_lifecycles(service, gateway, clock, 40)
    OutboxRelay(store, r).drain()
    ledger_types = ("escrow", "payment")
    expected = _expected(store, ledger_types)

    crashed = spawn_worker(
        "ledger",
        "ledger-a",
        redis_url,
        store.url,
        "--batch-size",
        "20",
        "--crash-at",
        point,
        # The first batch: a backlog published within a few milliseconds may be held
        # back into one batch (entries of one millisecond across full streams).
        "--crash-batch",
        "1",
        log=tmp_path / "a.log",
    )
    wait_until(lambda: crashed.poll() is not None, timeout=60, what="the worker to crash")
    assert crashed.returncode == -signal.SIGKILL
    stranded = _pending_of(r, "ledger", "ledger-a")
    assert stranded, "the crash left entries pending"
    handled_before = _inbox_count(store, "ledger")
    if point == "after-effect":
        # The effect of the stranded batch is durable already: redelivery must not repeat
        # it. (Entries held back unhandled are stranded too, so no count equality.)
        assert handled_before > 0

    name = "ledger-a" if recovery == "restart" else "ledger-b"
    survivor = spawn_worker(
        "ledger",
        name,
        redis_url,
        store.url,
        "--batch-size",
        "20",
        "--dead-after",
        "0.5",
        log=tmp_path / "b.log",
    )
    try:
        wait_until(
            lambda: (
                _inbox_count(store, "ledger") == expected
                and _pending(r, "ledger", ledger_types) == 0
            ),
            timeout=60,
            what="the survivor to handle every entry",
        )
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(15) == 0
    check = check_ledger(store)
    assert check.ok, check
    assert check.posted_events == check.expected_events > 0


#: A consumer process whose handler kills it (SIGKILL, as a crash in a C extension
#: would) whenever a batch holds the poison: argv REDIS_URL POISON_EVENT_ID RECORD
#: CONSUMER.
#: It records what it handled (one line per event, synced before it returns) and
#: exits 0 once a poll reads nothing and nothing is pending.
_KILLED_BY_POISON = """
import os, signal, sys
from workbench.domain.clock import ManualClock
from workbench.streams.connection import connect
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker

url, poison, record, consumer = sys.argv[1:]

class Handler:
    group, aggregate_types = "recording", ("escrow",)

    def handle(self, events):
        if any(e.event_id == poison for e in events):
            os.kill(os.getpid(), signal.SIGKILL)
        with open(record, "a") as f:
            f.write("".join(e.event_id + "\\n" for e in events))
            f.flush()
            os.fsync(f.fileno())

client = connect(url)
if consumer == "rec-1":  # restarted under its name: re-reads its own pending
    worker = ConsumerWorker(client, Handler(), consumer=consumer, clock=ManualClock())
else:  # a new consumer: claims the dead ones' entries once their heartbeats are old,
    # after its start (its re-read of its own pending) is over
    settings = ConsumerSettings(dead_after_s=2.0, recover_every_s=0.05)
    worker = ConsumerWorker(client, Handler(), consumer=consumer, settings=settings)
while worker.poll(block_ms=0) or client.xpending("wb:escrow", "recording")["pending"]:
    pass
"""


@pytest.mark.parametrize("recovery", ["restart", "claim"])
def test_a_poison_that_kills_its_consumer_is_dead_lettered_and_the_rest_handled(
    r, redis_url, tmp_path, recovery
) -> None:
    """Restarted after each death (as serve's supervisor does) or replaced by a new
    consumer that claims the dead one's entries, the consumer handles what it
    re-reads or claimed alone, each acked at once; the entry it died on
    ``max_crashes`` times alone goes to the dead letters unhandled, the rest once."""
    stream = NAMES.stream("escrow")
    ensure_groups(r, [stream], "recording")
    events = [_event(f"esc-{i % 3}", i) for i in range(1, 10)]
    for e in events:
        r.xadd(stream, to_fields(e))
    poison = events[4]
    record = tmp_path / "handled"
    record.touch()
    max_crashes = ConsumerSettings().max_crashes
    argv = [sys.executable, "-c", _KILLED_BY_POISON, redis_url, poison.event_id, str(record)]
    codes: list[int] = []
    while not codes or codes[-1] != 0:
        assert len(codes) <= max_crashes + 2, f"still dying after {codes}"
        consumer = "rec-1" if recovery == "restart" else f"rec-{len(codes) + 1}"
        codes.append(subprocess.run([*argv, consumer], cwd=ROOT, timeout=60).returncode)
    # One death in the first batch, then one per time the poison was handled alone.
    assert codes == [-signal.SIGKILL] * (1 + max_crashes) + [0]
    [(_, letter)] = r.xrange(NAMES.dead_letter("recording"))
    assert letter[b"entry.event_id"] == poison.event_id.encode()
    assert letter[b"reason"] == f"its consumer died handling it {max_crashes} times".encode()
    handled = record.read_text().split()
    assert sorted(handled) == sorted(e.event_id for e in events if e is not poison)
    assert r.xpending(stream, "recording")["pending"] == 0
    assert not r.exists(NAMES.crashes("recording"))  # no count is left behind


class _BehindAnOutage(_Recording):
    """Its database is down for its first ``outages`` calls, then it records."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages = outages

    def handle(self, events: list[Event]) -> None:
        if self.outages:
            self.outages -= 1
            raise sqlalchemy.exc.OperationalError("INSERT ...", {}, Exception("database down"))
        super().handle(events)


def _died_holding(r: redis.Redis, consumer: str, *events: Event) -> str:
    """``events`` read by ``consumer``, which then died: pending under its name."""
    stream = NAMES.stream("escrow")
    ensure_groups(r, [stream], "recording")
    for e in events:
        r.xadd(stream, to_fields(e))
    r.xreadgroup("recording", consumer, {stream: ">"})
    return stream


def test_an_outage_while_a_suspect_is_handled_is_not_a_death(r) -> None:
    """A suspect (re-read after a death) whose handling meets an outage, poll after
    poll, more times than ``max_crashes``: the process lived, so nothing counts."""
    _died_holding(r, "rec-1", _event("esc-1", 1))
    settings = ConsumerSettings()
    handler = _BehindAnOutage(outages=settings.max_crashes + 2)
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock(), settings=settings)
    for _ in range(settings.max_crashes + 2):
        with pytest.raises(sqlalchemy.exc.OperationalError):
            worker.poll()
    worker.poll()
    assert handler.seen == ["evt-esc-1-1"]
    # Handled alone every time (the poll with the outage included), never dead-lettered.
    assert worker.stats.isolated == settings.max_crashes + 3
    assert worker.stats.dead_lettered == 0
    assert not r.exists(NAMES.crashes("recording"))


def test_a_suspect_no_longer_pending_here_is_forgotten(r) -> None:
    """A suspect another consumer took (claimed, or its partition given back) is
    dropped at the next re-read of own pending: the set holds only what is pending
    here, so a long-lived worker's does not grow."""
    stream = _died_holding(r, "rec-1", _event("esc-1", 1))
    handler = _BehindAnOutage(outages=1)
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock())
    with pytest.raises(sqlalchemy.exc.OperationalError):
        worker.poll()  # the suspect stays one: not handled
    assert worker._suspects
    [(entry_id, _)] = r.xrange(stream)
    r.xclaim(stream, "recording", "rec-2", 0, [entry_id])
    worker.poll()
    assert handler.seen == [] and not worker._suspects


def test_a_mark_counts_another_workers_unfinished_handling_only(r) -> None:
    """The mark before a suspect is handled alone: another token's mark is a death;
    our own (a retry after an outage, or the same command sent twice by redis-py's
    retry after a timeout) and a stop's neutral one count nothing."""
    begin = r.register_script(_BEGIN_ALONE_LUA)
    key, field = NAMES.crashes("recording"), "wb:escrow 1-0"

    def mark(token: str) -> int:
        return int(begin(keys=[key], args=[field, token, 60]))

    assert [mark("a"), mark("a"), mark("b"), mark("b"), mark("c")] == [0, 0, 1, 1, 2]
    r.hset(key, field, "2:-")  # c was stopped
    assert [mark("d"), mark("e")] == [2, 3]
    assert 0 < r.ttl(key) <= 60


def test_a_stop_while_a_suspect_is_handled_is_not_a_death(r) -> None:
    _died_holding(r, "rec-1", _event("esc-1", 1))

    class _Stopped(_Recording):
        def handle(self, events: list[Event]) -> None:
            raise KeyboardInterrupt

    worker = ConsumerWorker(r, _Stopped(), consumer="rec-1", clock=ManualClock())
    with pytest.raises(KeyboardInterrupt):
        worker.poll()
    assert list(r.hgetall(NAMES.crashes("recording")).values()) == [b"0:-"]


def test_a_suspect_precedes_its_escrows_new_entries(r) -> None:
    """Handled alone, a suspect still comes before what follows it in its escrow."""
    stream = _died_holding(r, "rec-1", _event("esc-1", 1))
    r.xadd(stream, to_fields(_event("esc-1", 2)))
    handler = _Recording()
    ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock()).poll()
    assert handler.seen == ["evt-esc-1-1", "evt-esc-1-2"]


class _Died(Exception):
    """A simulated death, as a SimPy run's crash hook raises it."""


def test_a_death_after_the_handler_returned_is_not_the_entrys(r) -> None:
    """The lab's crash points all fall outside the handler (after the read, between
    halves of a batch, before the ack). One before a suspect's ack finds its mark
    gone already: the handler had returned, so the entry killed nobody. Handled
    again alone (the inbox absorbs that), nothing is left; entries not re-read
    after a death are handled in one batch, as before."""
    stream = _died_holding(r, "rec-1", _event("esc-1", 1), _event("esc-2", 1))

    def die_after_effect(point: str, _batch: int) -> None:
        if point == "after-effect":
            raise _Died(point)

    dying = CrashingWorker(r, _Recording(), consumer="rec-1", clock=ManualClock(),
                           crash_hook=die_after_effect)  # fmt: skip
    with pytest.raises(_Died):
        dying.poll()
    assert dying.stats.isolated == 1 and not r.exists(NAMES.crashes("recording"))
    handler = _Recording()
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock())
    worker.poll()
    assert handler.seen == ["evt-esc-1-1", "evt-esc-2-1"] and worker.stats.isolated == 2
    assert not r.exists(NAMES.crashes("recording"))
    r.xadd(stream, to_fields(_event("esc-3", 1)))
    r.xadd(stream, to_fields(_event("esc-4", 1)))
    batches: list[int] = []
    worker.observer = lambda batch, _now: batches.append(len(batch))
    worker.poll()
    assert batches == [2] and worker.stats.isolated == 2


def test_sigterm_finishes_the_batch_acks_and_exits(r, redis_url, store, clock, tmp_path) -> None:
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 20)
    OutboxRelay(store, r).drain()
    worker = spawn_worker("notifications", "n-1", redis_url, store.url, log=tmp_path / "n.log")
    types = ("escrow", "payment", "dispute")
    wait_until(
        lambda: _inbox_count(store, "notifications") == _expected(store, types),
        timeout=60,
        what="notifications to catch up",
    )
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert _pending(r, "notifications", types) == 0
    assert r.hget(NAMES.heartbeats("notifications"), "n-1") is None  # a clean exit


def test_a_worker_process_waits_out_a_refusing_redis_and_a_demotion(store, clock, tmp_path) -> None:
    """``workbench worker`` started while Redis is out of memory waits instead of
    exiting with the error (it exited 1: under ``serve``, a crash loop); demoted
    (REPLICAOF), Redis cuts the blocked read short (UNBLOCKED) and refuses writes
    (READONLY): the worker waits that out too. A master again, it handles what
    the relay publishes and SIGTERM still ends it with 0 and a clean leave."""
    service, gateway = make_service(store, clock)
    with RedisServer(tmp_path / "redis") as server:
        client = server.client()
        client.config_set("maxmemory", 1)
        log = tmp_path / "worker.log"
        worker = spawn_worker("notifications", "n-1", server.url, store.url, log=log)
        try:
            wait_until(lambda: b"refuses writes" in log.read_bytes(), timeout=30, what="a wait")
            client.config_set("maxmemory", 0)
            beats = NAMES.heartbeats("notifications")
            wait_until(lambda: client.hexists(beats, "n-1"), timeout=30, what="a heartbeat")
            client.replicaof("127.0.0.1", server.port + 1)  # a master that is not there
            wait_until(
                lambda: b"read only replica" in log.read_bytes(), timeout=30, what="READONLY"
            )
            assert worker.poll() is None, log.read_text()
            client.replicaof("NO", "ONE")
            run_lifecycles(service, gateway, clock, 3)
            OutboxRelay(store, client).drain()
            types = ("escrow", "payment", "dispute")
            wait_until(
                lambda: _inbox_count(store, "notifications") == _expected(store, types) > 0,
                timeout=60,
                what="notifications to catch up",
            )
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0, log.read_text()
        finally:
            worker.kill()
            worker.wait(15)
        assert client.hget(beats, "n-1") is None  # a clean exit
        client.close()


def test_a_worker_process_told_to_wait_for_redis_waits_until_it_is_up(
    store, clock, tmp_path
) -> None:
    """With ``--wait-for-redis`` (serve passes it), ``workbench worker`` started while
    Redis is down waits for it instead of exiting 2 (under serve, a worker restarted
    during a Redis restart used up its restarts that way); once Redis answers it sets
    up its group and handles what the relay publishes."""
    service, gateway = make_service(store, clock)
    server = RedisServer(tmp_path / "redis")  # its port chosen, nothing listening yet
    log = tmp_path / "worker.log"
    worker = spawn_worker(
        "notifications", "n-1", server.url, store.url, "--wait-for-redis", log=log
    )
    try:
        wait_until(lambda: b"cannot reach Redis yet" in log.read_bytes(), timeout=30,
                   what="the worker to say it waits")  # fmt: skip
        assert worker.poll() is None, log.read_text()
        with server:
            client = server.client()
            beats = NAMES.heartbeats("notifications")
            wait_until(lambda: client.hexists(beats, "n-1"), timeout=30, what="a heartbeat")
            run_lifecycles(service, gateway, clock, 3)
            OutboxRelay(store, client).drain()
            wait_until(
                lambda: _inbox_count(store, "notifications") == _expected(store, ("escrow",
                        "payment", "dispute")) > 0,
                timeout=60, what="notifications to catch up",
            )  # fmt: skip
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(15) == 0, log.read_text()
            assert client.hget(beats, "n-1") is None  # a clean exit
            client.close()
    finally:
        worker.kill()
        worker.wait(15)


class _StopsWhileHandling(_Recording):
    """Asks its worker to stop while it handles a batch (a SIGTERM then)."""

    worker: ConsumerWorker

    def handle(self, events: list[Event]) -> None:
        super().handle(events)
        self.worker.stop()


def test_run_acks_the_batch_it_was_stopped_in_before_returning(r) -> None:
    # stop() while a batch is handled: run() returns after that batch is acked
    # (the SIGTERM path), without another read.
    handler = _StopsWhileHandling()
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock())
    handler.worker = worker
    r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", 1)))
    r.xadd(NAMES.stream("payment"), to_fields(_event("esc-2", 1)))
    worker.run()
    assert sorted(handler.seen) == ["evt-esc-1-1", "evt-esc-2-1"]
    assert _pending(r, "recording", ("escrow", "payment")) == 0
    assert worker.stats.acked == 2


def test_groups_are_created_from_the_start_of_the_stream(r) -> None:
    stream = NAMES.stream("escrow")
    r.xadd(stream, to_fields(_event("esc-1", 1)))
    ensure_groups(r, [stream], "late-group")
    ensure_groups(r, [stream], "late-group")  # idempotent
    reply = r.xreadgroup("late-group", "c", {stream: ">"})
    assert len(reply[0][1]) == 1


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_a_crash_point_armed_by_signal_kills_there_and_the_handling_log_tells(
    r, redis_url, store, clock, tmp_path, point
) -> None:
    from simulations.analysis.handling import read_handling_logs
    from simulations.faults import crash_signal

    worker = spawn_worker(
        "ledger", "ledger-a", redis_url, store.url, "--batch-size", "20", "--crash-on-signal",
        "--record", str(tmp_path / "a.handled"), log=tmp_path / "a.log",
    )  # fmt: skip
    # Armed only once its handlers are installed, i.e. once it is consuming.
    wait_until(
        lambda: r.hget(NAMES.heartbeats("ledger"), "ledger-a"), timeout=60, what="a heartbeat"
    )
    worker.send_signal(crash_signal(point))
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 40)
    OutboxRelay(store, r).drain()
    wait_until(lambda: worker.poll() is not None, timeout=60, what="the armed crash")
    assert worker.returncode == -signal.SIGKILL
    assert f"SIGKILL at {point}" in (tmp_path / "a.log").read_text()
    stranded = _pending_of(r, "ledger", "ledger-a")
    assert stranded
    before = read_handling_logs([tmp_path / "a.handled"])
    if point == "after-read":  # killed before the handler saw the batch
        assert before == {}
    else:
        assert before and all(calls == 1 for calls, *_ in before.values())

    survivor = spawn_worker(
        "ledger", "ledger-b", redis_url, store.url, "--dead-after", "0.5",
        "--record", str(tmp_path / "b.handled"), log=tmp_path / "b.log",
    )  # fmt: skip
    types = ("escrow", "payment")
    try:
        wait_until(
            lambda: (
                _pending(r, "ledger", types) == 0
                and _inbox_count(store, "ledger") == _expected(store, types)
            ),
            timeout=60,
            what="the survivor to take over",
        )
    finally:
        survivor.send_signal(signal.SIGTERM)
        assert survivor.wait(15) == 0
    handled = read_handling_logs([tmp_path / "a.handled", tmp_path / "b.handled"])
    assert len(handled) == _expected(store, types)
    if point != "after-read":  # after-read: the handler never saw the stranded batch
        assert max(count for _, count, *_ in handled.values()) >= 2


def test_a_full_read_holds_back_what_may_follow_unread_entries(r) -> None:
    # Explicit ids stand in for the relay's (ms grows in publish order across
    # streams). Published: B1 (payment, 5 ms), A2 (payment, 7 ms), A3 (escrow, 8 ms).
    # Reads of one entry per stream return A3 with B1 first: A3 must wait for A2.
    handler = _Recording()
    settings = ConsumerSettings(batch_size=1)
    worker = ConsumerWorker(r, handler, consumer="rec-1", clock=ManualClock(), settings=settings)
    worker.setup()

    def event(escrow: str, sequence: int, type_: str) -> Event:
        return Event(
            event_id=f"{escrow}{sequence}", type=type_, aggregate_type=type_.split(".")[0],
            aggregate_id=escrow, sequence=sequence, user_ids=("u",), occurred_at=1.0,
            correlation_id="c",
        )  # fmt: skip

    r.xadd(NAMES.stream("payment"), to_fields(event("B", 1, "payment.requested")), id="5-0")
    r.xadd(NAMES.stream("payment"), to_fields(event("A", 2, "payment.received")), id="7-0")
    r.xadd(NAMES.stream("escrow"), to_fields(event("A", 3, "escrow.funded")), id="8-0")
    assert worker.drain() == 3
    assert handler.seen == ["B1", "A2", "A3"]
    assert _pending(r, "recording", ("escrow", "payment")) == 0


def _delivery(stream: str, entry_id: str) -> Delivery:
    return Delivery(stream, entry_id, {b"data": b"x"})


def test_ready_to_handle_holds_what_an_unread_entry_may_precede() -> None:
    a1, a2 = _delivery("wb:escrow", "5-0"), _delivery("wb:escrow", "9-0")
    p1, p2 = _delivery("wb:payment", "3-0"), _delivery("wb:payment", "6-0")
    # Nothing full: everything now.
    assert ready_to_handle([a1, p1], set()) == ([a1, p1], [])
    # Only escrow full, and all from 5 ms on is its own: its unread entries come
    # after them, and after the payment entries (earlier ms): everything now.
    assert ready_to_handle([a1, a2, p1], {"wb:escrow"}) == ([a1, a2, p1], [])
    # Escrow full at 9 ms, a payment entry from 9 ms on: an unread escrow entry
    # (>= 9 ms) may precede it; hold from 9 ms on.
    p3 = _delivery("wb:payment", "9-1")
    assert ready_to_handle([a1, a2, p1, p3], {"wb:escrow"}) == ([a1, p1], [a2, p3])
    # Both full: hold from the earlier of their last milliseconds (6).
    assert ready_to_handle([a1, a2, p1, p2], {"wb:escrow", "wb:payment"}) == (
        [a1, p1],
        [a2, p2],
    )


def test_a_due_heartbeat_rides_with_the_polls_next_command(r, monkeypatch) -> None:
    """The heartbeat is written ahead of the read (or of the recovery pass) in the same
    write: one round trip for an idle poll, and the heartbeat is there all the same."""
    clock = ManualClock(start=0.0)
    settings = ConsumerSettings(heartbeat_every_s=1.0, recover_every_s=10.0)
    worker = ConsumerWorker(r, _Picky(), consumer="c1", clock=clock, settings=settings)
    worker.poll()  # setup and the first recovery pass
    sends = []
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        sends.append(1)
        return send(self, *args, **kwargs)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    beats = NAMES.heartbeats("picky")
    for at in (2.0, 5.0):  # heartbeat due, recovery not: with the read
        clock.set(at)
        sends.clear()
        assert worker.poll() == 0
        assert len(sends) == 1
        assert float(r.hget(beats, "c1")) == at
    clock.set(12.0)  # both due: with the recovery pass, then the read
    sends.clear()
    worker.poll()
    assert len(sends) == 2 and float(r.hget(beats, "c1")) == 12.0
    clock.set(12.5)  # not due: the read alone, the heartbeat left as it was
    sends.clear()
    worker.poll()
    assert len(sends) == 1 and float(r.hget(beats, "c1")) == 12.0
    # Entries read with the heartbeat are handled as ever.
    r.xadd(NAMES.stream("escrow"), to_fields(_event("esc-1", 1)))
    clock.set(14.0)
    assert worker.poll() == 1 and float(r.hget(beats, "c1")) == 14.0
    assert _pending(r, "picky", ("escrow",)) == 0
