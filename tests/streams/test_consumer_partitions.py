"""Consumer groups on a partitioned log: workers share the partitions through leases,
hand them over in order when members join or die, and run on a real Redis Cluster.

Entries are appended straight into partition streams (as the relay does: every
event of an escrow in the escrow's partition, whatever its aggregate type). The
handler records, in one log shared by the group's workers, which worker handled
which event: an inbox keyed by event id would dedupe redeliveries, so the tests
check that every event was handled, that only a dead worker's pending entries
were handled twice, and that each escrow's events were first handled in
sequence order.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest
import redis

from tests.streams.test_connection import _getkeys_calls
from workbench.domain.clock import ManualClock
from workbench.domain.events import AGGREGATE_TYPES, Event, from_fields, to_fields
from workbench.ops.inspection import inspect
from workbench.ops.redis_cluster import LocalCluster
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
from workbench.streams.keys import StreamNames
from workbench.streams.leases import assign
from workbench.streams.partitions import Partitioning

TYPES = ("escrow", "payment")
SETTINGS = ConsumerSettings(
    batch_size=5,
    heartbeat_every_s=1.0,
    dead_after_s=5.0,
    recover_every_s=1.0,
    retry_backoff_s=100.0,  # a failed entry is not retried while the test runs
)


class _Killed(BaseException):
    """The worker's process dies here (not an Exception: the worker cannot catch it)."""


@dataclass
class _Log:
    """What the group's handlers did, in order: ``(consumer, event)`` per handling."""

    calls: list[tuple[str, Event]] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(event.event_id for _, event in self.calls)

    def first_sequences(self) -> dict[str, list[int]]:
        """Per escrow, its events' sequences in the order they were first handled."""
        seen: set[str] = set()
        order: dict[str, list[int]] = {}
        for _, event in self.calls:
            if event.event_id not in seen:
                seen.add(event.event_id)
                order.setdefault(event.aggregate_id, []).append(event.sequence)
        return order

    def by(self, consumer: str) -> list[Event]:
        return [event for name, event in self.calls if name == consumer]


class _Handler:
    """Records into a shared log; can die after ``budget`` more events, and refuses
    the events in ``refuse`` (a whole batch fails, as a rolled-back transaction)."""

    group = "ledger"
    aggregate_types = TYPES

    def __init__(self, log: _Log, name: str) -> None:
        self.log = log
        self.name = name
        self.budget: int | None = None
        self.refuse: set[str] = set()

    def handle(self, events: list[Event]) -> None:
        if any(e.event_id in self.refuse for e in events):
            raise RuntimeError("refused")
        for event in events:
            if self.budget is not None:
                if self.budget == 0:
                    raise _Killed
                self.budget -= 1
            self.log.calls.append((self.name, event))


def _event(escrow_id: str, sequence: int) -> Event:
    """Odd sequences in the escrow stream, even ones in the payment stream: an escrow's
    history spans both streams of its partition."""
    payment = sequence % 2 == 0
    return Event(
        event_id=f"evt-{escrow_id}-{sequence}",
        type="payment.received" if payment else "escrow.shipped",
        aggregate_type="payment" if payment else "escrow",
        aggregate_id=escrow_id,
        sequence=sequence,
        user_ids=("b", "s"),
        occurred_at=1.0,
        correlation_id="c",
    )


def _publish(
    client: redis.Redis, names: StreamNames, escrows: list[str], sequences: Iterable[int]
) -> set[str]:
    """Append each escrow's events round by round, interleaved; return their ids."""
    ids = set()
    for sequence in sequences:
        for escrow in escrows:
            event = _event(escrow, sequence)
            stream = names.stream(event.aggregate_type, names.partition_of(escrow))
            client.xadd(stream, to_fields(event))
            ids.add(event.event_id)
    return ids


def _worker(
    client: redis.Redis,
    names: StreamNames,
    log: _Log,
    name: str,
    clock: ManualClock,
    settings: ConsumerSettings = SETTINGS,
) -> ConsumerWorker:
    handler = _Handler(log, name)
    return ConsumerWorker(
        client, handler, consumer=name, names=names, settings=settings, clock=clock
    )


def _settle(workers: list[ConsumerWorker], clock: ManualClock, partitions: int) -> None:
    """Beat and drain until every worker reads exactly its target partitions."""
    expected = assign([w.consumer for w in workers], partitions)
    for _ in range(10):
        clock.advance(SETTINGS.heartbeat_every_s)
        for w in workers:
            w.drain()
        if all(w.reading == expected[w.consumer] for w in workers):
            return
    raise AssertionError(f"not settled: { {w.consumer: w.reading for w in workers} } != {expected}")


def _pending_events(
    client: redis.Redis, names: StreamNames, group: str, consumer: str | None = None
) -> dict[str, str]:
    """Event id -> entry id of what ``group`` (or ``consumer``) has pending, anywhere."""
    pending = {}
    for stream in names.streams(TYPES):
        rows = client.xpending_range(stream, group, "-", "+", 10_000, consumername=consumer)
        for row in rows:
            entry_id = row["message_id"].decode()
            [(_, fields)] = client.xrange(stream, entry_id, entry_id)
            pending[from_fields(fields).event_id] = entry_id
    return pending


def _escrows(names: StreamNames, count: int) -> list[str]:
    escrows = [f"esc-{i}" for i in range(count)]
    assert {names.partition_of(e) for e in escrows} == set(names.partitions)
    return escrows


def _assert_in_order(log: _Log, sequences: Iterable[int]) -> None:
    expected = list(sequences)
    firsts = log.first_sequences()
    assert firsts, "nothing handled"
    assert all(order == expected for order in firsts.values()), firsts


# -- one redis-server, P = 8 ------------------------------------------------------------


def test_two_workers_split_the_partitions_and_a_survivor_takes_over_a_dead_ones(
    r: redis.Redis,
) -> None:
    names = StreamNames("pt", Partitioning(8))
    clock, log = ManualClock(), _Log()
    a = _worker(r, names, log, "w-a", clock)
    b = _worker(r, names, log, "w-b", clock)
    a.setup()  # alone: takes all 8
    b.setup()
    assert (a.reading, b.reading) == (tuple(range(8)), ())
    _settle([a, b], clock, 8)
    assert (a.reading, b.reading) == ((0, 2, 4, 6), (1, 3, 5, 7))

    escrows = _escrows(names, 40)
    first = _publish(r, names, escrows, range(1, 6))
    a.drain()
    b.drain()
    assert log.counts() == Counter(dict.fromkeys(first, 1))
    for name, held in (("w-a", a.reading), ("w-b", b.reading)):
        assert {names.partition_of(e.aggregate_id) for e in log.by(name)} == set(held)
    _assert_in_order(log, range(1, 6))

    # w-a dies seven events into its next batch: handled in part, acked not at all.
    second = _publish(r, names, escrows, range(6, 11))
    a.handler.budget = 7  # type: ignore[attr-defined]
    try:
        a.drain()
        raise AssertionError("w-a should have died")
    except _Killed:
        pass
    stranded = _pending_events(r, names, "ledger", "w-a")
    assert len(stranded) > 7
    b.drain()  # its own partitions; w-a's still look alive and leased
    assert b.reading == (1, 3, 5, 7)
    for _ in range(8):  # past dead_after_s on the one clock: w-a's beat and leases lapse
        clock.advance(1.0)
        b.drain()
    assert b.reading == tuple(range(8))
    assert b.stats.claimed == len(stranded)
    # Claimed, they were delivered again: counted towards max_deliveries.
    assert b.stats.delivery_counts.get(2) == len(stranded)
    # And suspects (w-a may have died of them): each handled alone, counted in its
    # partition's crash hash while it was, and nothing left there.
    assert b.stats.isolated == len(stranded)
    assert not any(r.exists(names.crashes("ledger", p)) for p in range(8))

    counts = log.counts()
    assert set(counts) == first | second  # nothing lost
    twice = {event_id for event_id, n in counts.items() if n > 1}
    assert twice and twice <= set(stranded)  # only w-a's pending is handled again
    assert max(counts.values()) == 2
    _assert_in_order(log, range(1, 11))
    assert _pending_events(r, names, "ledger") == {}


def test_a_joining_worker_gets_partitions_given_back_with_their_pending_entries(
    r: redis.Redis,
) -> None:
    names = StreamNames("pt", Partitioning(8))
    clock, log = ManualClock(), _Log()
    a = _worker(r, names, log, "w-a", clock)
    b = _worker(r, names, log, "w-b", clock)
    a.setup()
    b.setup()
    _settle([a, b], clock, 8)
    escrows = _escrows(names, 40)
    # The last published event of an escrow in partition 2 (w-a's, and the newcomer's
    # target) fails at w-a: it stays pending under w-a, a live consumer.
    moved = next(e for e in escrows if names.partition_of(e) == 2)
    refused = _event(moved, 3).event_id
    a.handler.refuse = {refused}  # type: ignore[attr-defined]
    first = _publish(r, names, escrows, range(1, 4))
    a.drain()
    b.drain()
    assert list(_pending_events(r, names, "ledger", "w-a")) == [refused]

    given = (a.stats.partitions_given, b.stats.partitions_given)
    taken = (a.stats.partitions_taken, b.stats.partitions_taken)
    c = _worker(r, names, log, "w-c", clock)
    c.setup()
    assert c.reading == ()  # every partition is still held
    _settle([a, b, c], clock, 8)
    assert (a.reading, b.reading, c.reading) == ((0, 3, 6), (1, 4, 7), (2, 5))
    # w-a gave back 2 and 4 and took 3 (given back by w-b), w-b gave 3 and 5 and took 4.
    assert (a.stats.partitions_given, b.stats.partitions_given) == (given[0] + 2, given[1] + 2)
    assert (a.stats.partitions_taken, b.stats.partitions_taken) == (taken[0] + 1, taken[1] + 1)
    assert c.stats.partitions_taken == 2
    # The newcomer claimed the entry w-a left pending in partition 2 and handled it.
    assert c.stats.claimed == 1
    assert [e.event_id for e in log.by("w-c")] == [refused]

    mark = len(log.calls)
    second = _publish(r, names, escrows, range(4, 7))
    for w in (a, b, c):
        w.drain()
    assert log.counts() == Counter(dict.fromkeys(first | second, 1))
    reading = {w.consumer: w.reading for w in (a, b, c)}
    assert all(names.partition_of(e.aggregate_id) in reading[n] for n, e in log.calls[mark:])
    assert log.first_sequences()[moved] == [1, 2, 3, 4, 5, 6]
    _assert_in_order(log, range(1, 7))
    assert _pending_events(r, names, "ledger") == {}

    a.leave()  # a clean exit gives its partitions back at once
    assert all(r.get(names.lease("ledger", p)) is None for p in (0, 3, 6))
    assert r.hget(names.heartbeats("ledger"), "w-a") is None


# -- a real Redis Cluster, P = 16 ------------------------------------------------------


def test_on_a_cluster_a_worker_reads_every_partition_and_dead_letters_into_its_own(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    from workbench.http.metrics import _stream_metrics

    names = StreamNames(cluster_prefix, Partitioning(16))
    client = redis_cluster.client()
    clock, log = ManualClock(), _Log()
    settings = ConsumerSettings(batch_size=5, max_deliveries=1, partition_block_ms=100)
    worker = _worker(client, names, log, "w-1", clock, settings)
    worker.setup()
    assert worker.reading == tuple(range(16))

    escrows = _escrows(names, 60)
    published = _publish(client, names, escrows, range(1, 5))
    poison_partition = names.partition_of("esc-poison")
    poison_stream = names.stream("escrow", poison_partition)
    poison_id = client.xadd(poison_stream, {"event_id": "x", "data": b"{oops"}).decode()
    getkeys = _getkeys_calls(redis_cluster)
    worker.drain()  # a CROSSSLOT anywhere would raise here
    assert _getkeys_calls(redis_cluster) == getkeys  # reads routed by us, not asked per read

    assert log.counts() == Counter(dict.fromkeys(published, 1))
    _assert_in_order(log, range(1, 5))
    assert _pending_events(client, names, "ledger") == {}
    [(_, letter)] = client.xrange(names.dead_letter("ledger", poison_partition))
    assert letter[b"source_stream"].decode() == poison_stream
    assert letter[b"source_id"].decode() == poison_id
    others = [k for p, k in enumerate(names.dead_letters("ledger")) if p != poison_partition]
    assert sum(client.xlen(k) for k in others) == 0

    snapshot = inspect(client, names, dead_letter_groups=("ledger",), clock=clock)
    assert [row["source_id"] for row in snapshot.dead_letters] == [poison_id]
    assert {row["dead_letters"] for row in snapshot.groups} == {1}
    assert len(snapshot.streams) == len(AGGREGATE_TYPES) * 16  # each aggregate and partition
    metrics = {m.name: m for m in _stream_metrics(client, names, clock)}
    dead = {s.labels["group"]: s.value for s in metrics["workbench_dead_letters"].samples}
    assert dead["ledger"] == 1

    # Nothing new: the read blocks on one partition for partition_block_ms, not block_ms.
    started = time.monotonic()
    assert worker.poll(block_ms=4000) == 0
    assert time.monotonic() - started < 2.0
    late = _event(escrows[0], 5)
    client.xadd(names.stream("escrow", names.partition_of(escrows[0])), to_fields(late))
    assert worker.poll(block_ms=4000) == 1
    assert log.calls[-1][1].event_id == late.event_id

    worker.leave()
    assert all(client.get(names.lease("ledger", p)) is None for p in names.partitions)
    client.close()


def test_a_partition_is_not_read_until_its_takeover_has_claimed_what_was_left(r) -> None:
    """A live member ("a-ghost") left an escrow's first event pending in a partition
    that is now "b"'s. b's first claim of it fails (Redis went away mid-takeover):
    b must not read that partition's newer entries meanwhile, or the escrow's second
    event would be handled before its first, and the first never, as the lease was
    already b's when it retried. The takeover is retried; then both are handled, in
    order."""
    names = StreamNames("takeover", Partitioning(4))
    clock, log = ManualClock(1000.0), _Log()
    r.hset(names.heartbeats("ledger"), "a-ghost", repr(clock.now()))  # alive, holds nothing
    share = assign(["a-ghost", "b"], 4)["b"]
    escrow = next(e for e in (f"esc-{n}" for n in range(100)) if names.partition_of(e) in share)
    worker = _worker(r, names, log, "b", clock)
    worker.setup()  # the group exists; b has taken its share (nothing pending yet)
    worker.leave()
    r.hset(names.heartbeats("ledger"), "a-ghost", repr(clock.now()))
    _publish(r, names, [escrow], [1])
    stream = names.stream("escrow", names.partition_of(escrow))
    assert r.xreadgroup("ledger", "a-ghost", {stream: ">"})  # its first event, pending there
    _publish(r, names, [escrow], [2])

    worker = _worker(r, names, log, "b", clock)
    real_claim, failures = worker._claim_from, []

    def claim_once_failing(stream_key: str, dead: str) -> int:
        if not failures:
            failures.append(stream_key)
            raise redis.ConnectionError("Redis went away mid-takeover")
        return real_claim(stream_key, dead)

    worker._claim_from = claim_once_failing  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        worker.poll(block_ms=0)
    assert failures
    assert names.partition_of(escrow) not in worker.reading  # not read meanwhile
    worker.drain()  # the takeover is retried first (a failed start sets up again)
    assert [e.sequence for _, e in log.calls] == [1, 2]
    assert names.partition_of(escrow) in worker.reading
