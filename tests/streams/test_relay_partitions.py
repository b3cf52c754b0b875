"""The outbox relay on a partitioned log: partition streams, leases shared by
relays, fencing, repair per partition; on one redis-server and on a real cluster."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import redis
from sqlalchemy import select, update

from tests.support import make_service, run_lifecycles
from workbench.domain.clock import ManualClock, now_ms
from workbench.domain.events import AGGREGATE_TYPES, from_fields
from workbench.domain.streamid import ZERO, parse
from workbench.ops.redis_cluster import LocalCluster
from workbench.store import Store, outbox
from workbench.streams.keys import StreamNames
from workbench.streams.partitions import Partitioning
from workbench.streams.relay import (
    DurabilityUnavailable,
    Loss,
    OutboxRelay,
    PartitionCountChanged,
)

_PREFIXES = itertools.count(1)
LEASE_S = 5.0


@pytest.fixture
def names() -> StreamNames:
    return StreamNames(f"rp{next(_PREFIXES)}", Partitioning(4))


def _outbox(store: Store) -> list[tuple[int, str, str, int, str | None, float | None]]:
    """Every outbox row: seq, event id, aggregate, partition, stream id, published_at."""
    columns = (
        outbox.c.seq,
        outbox.c.event_id,
        outbox.c.stream,
        outbox.c.partition,
        outbox.c.stream_id,
        outbox.c.published_at,
    )
    with store.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(select(*columns).order_by(outbox.c.seq))]


def _entries(client: redis.Redis, stream: str) -> list[tuple[str, str]]:
    """A stream's (entry id, event id) pairs, in stream order."""
    return [(i.decode(), from_fields(f).event_id) for i, f in client.xrange(stream)]


def _every_entry(client: redis.Redis, names: StreamNames) -> dict[str, list[tuple[str, str]]]:
    return {s: _entries(client, s) for s in names.streams()}


def assert_published_in_place(client: redis.Redis, store: Store, names: StreamNames) -> None:
    """Every row published once, in its escrow's partition stream of its aggregate
    type, each stream in ``seq`` order, under the id the outbox recorded."""
    rows = _outbox(store)
    assert rows and all(published is not None for *_, published in rows)
    expected: dict[str, list[tuple[str, str]]] = {s: [] for s in names.streams()}
    for _, event_id, aggregate, partition, stream_id, _ in rows:
        expected[names.stream(aggregate, partition)].append((stream_id, event_id))
    assert _every_entry(client, names) == expected
    for stream in expected:
        for _, fields in client.xrange(stream):
            event = from_fields(fields)
            assert stream == names.stream(event.aggregate_type, names.partition_of(event.escrow_id))


def _relay(store: Store, client: redis.Redis, names: StreamNames, clock: ManualClock,
           member: str = "relay-a", **kwargs: object) -> OutboxRelay:  # fmt: skip
    return OutboxRelay(
        store, client, names=names, clock=clock, member=member, lease_s=LEASE_S, **kwargs
    )  # type: ignore[arg-type]


# -- one relay, P partitions on one redis-server --------------------------------------


def test_every_row_lands_in_its_escrows_partition_stream_in_seq_order(
    r, store, clock, names
) -> None:
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 16)
    relay = _relay(store, r, names, clock, batch_size=7)
    assert relay.drain() == len(_outbox(store))
    assert relay.held == frozenset(names.partitions)  # alone: every partition
    assert relay.backlog() == 0
    assert_published_in_place(r, store, names)
    assert len({p for _, _, _, p, _, _ in _outbox(store)}) == 4  # every partition has rows
    assert not r.exists(*StreamNames(names.prefix).streams())  # nothing in unpartitioned keys
    for p in names.partitions:
        assert r.get(names.lease("relay", p)) == f"relay-a {clock.now() + LEASE_S!r}".encode()


def test_rows_written_before_the_partition_column_go_to_their_escrows_partition(
    r, store, clock, names
) -> None:
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 8)
    with store.begin() as conn:  # as written by a service before outbox.partition existed
        conn.execute(update(outbox).values(partition=None))
    _relay(store, r, names, clock).drain()
    assert_published_in_place(r, store, names)
    assert {p for _, _, _, p, _, _ in _outbox(store)} == set(names.partitions)


def test_rows_of_a_partition_the_log_no_longer_has_stop_the_relay_with_the_reason(
    r, store, clock, names
) -> None:
    service, gateway = make_service(store, clock, partitioning=Partitioning(8))
    run_lifecycles(service, gateway, clock, 8)
    highest = max(p for _, _, _, p, _, _ in _outbox(store))
    assert highest >= 4  # written with 8 partitions; the relay has 4
    with pytest.raises(PartitionCountChanged, match=f"partition {highest}, but the log has 4"):
        _relay(store, r, names, clock).drain()
    assert all(published is None for *_, published in _outbox(store))
    assert not r.exists(*names.streams())


def test_entry_ids_on_the_relays_clock_per_partition_stream(r, store, clock, names) -> None:
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 8)
    _relay(store, r, names, clock, ids_on_clock=True).drain()
    assert_published_in_place(r, store, names)
    for entries in _every_entry(r, names).values():
        ids = [parse(i) for i, _ in entries]
        assert all(i.ms == now_ms(clock) for i in ids)
        assert [i.seq for i in ids] == list(range(len(ids)))


def test_a_deleted_partition_stream_gets_back_only_its_own_rows(r, store, clock, names) -> None:
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 16)
    relay = _relay(store, r, names, clock, verify_every_s=0.0)
    relay.drain()
    before = _every_entry(r, names)
    lost = names.stream("escrow", 2)
    assert before[lost] and sum(1 for entries in before.values() if entries) > 4
    r.delete(lost)
    assert relay.publish_batch() == 0  # idle: the check runs and repairs
    assert _every_entry(r, names) == before
    assert relay.stats.repaired == len(before[lost])  # nothing from other streams
    assert relay.losses == [Loss("escrow", ZERO, parse(before[lost][-1][0]), 2)]
    run_lifecycles(service, gateway, clock, 4, prefix="b")  # then new rows, after them
    relay.drain()
    assert_published_in_place(r, store, names)


# -- two relays sharing the partitions -----------------------------------------------


@pytest.fixture
def pair(r, store, names) -> Iterator[tuple[OutboxRelay, OutboxRelay, ManualClock, ManualClock]]:
    """Relays ``a`` and ``b`` on one store, each on its own clock (both at the same
    time; the service's is a third), both beating and holding their share: a the
    even partitions, b the odd."""
    clock_a, clock_b = ManualClock(), ManualClock()
    a = _relay(store, r, names, clock_a, "relay-a", batch_size=5)
    b = _relay(store, r, names, clock_b, "relay-b", batch_size=5)
    a.heartbeat(force=True)
    b.heartbeat(force=True)
    assert a.sync_leases() == {0, 2}
    assert b.sync_leases() == {1, 3}
    yield a, b, clock_a, clock_b


def _rows_of(store: Store, partitions: set[int]) -> int:
    return sum(1 for row in _outbox(store) if row[3] in partitions)


def test_two_relays_share_the_partitions_and_publish_everything_once(
    r, store, clock, names, pair
) -> None:
    a, b, _, _ = pair
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 20)
    while a.publish_batch() + b.publish_batch():  # interleaved batches
        pass
    assert a.backlog() == 0
    assert_published_in_place(r, store, names)  # exactly once, in order
    assert a.stats.published == _rows_of(store, {0, 2}) > 0
    assert b.stats.published == _rows_of(store, {1, 3}) > 0


def test_a_relay_that_stops_beating_has_its_partitions_taken_over(
    r, store, clock, names, pair
) -> None:
    a, b, _, clock_b = pair
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 12, prefix="x")
    a.drain()
    b.drain()
    run_lifecycles(service, gateway, clock, 12, prefix="y")  # a's share waits for a
    b.drain()
    assert b.backlog() == _rows_of(store, {0, 2}) - a.stats.published > 0
    clock_b.advance(LEASE_S / 2)
    b.heartbeat(force=True)
    assert b.sync_leases() == {1, 3}  # a is still live and its leases current
    clock_b.advance(LEASE_S / 2 + 0.1)  # a has not beaten (nor renewed) for lease_s
    b.heartbeat(force=True)
    assert b.sync_leases() == {0, 1, 2, 3}
    b.drain()
    assert b.backlog() == 0
    assert_published_in_place(r, store, names)  # a's partitions continued in seq order


def test_a_relay_whose_lease_was_taken_writes_nothing(r, store, clock, names, pair) -> None:
    a, b, _, clock_b = pair
    service, gateway = make_service(store, clock, partitioning=names.partitioning)
    run_lifecycles(service, gateway, clock, 12)
    b.drain()  # only b's partitions: a's rows wait
    backlog = b.backlog()
    assert backlog == _rows_of(store, {0, 2}) > 0
    # a is paused (its clock stands still: it believes its leases current); b moves
    # past lease_s and takes a's partitions.
    clock_b.advance(LEASE_S + 0.1)
    b.heartbeat(force=True)
    assert b.sync_leases() == {0, 1, 2, 3}
    before = _every_entry(r, names)
    assert a.held == {0, 2}
    assert a.publish_batch() == 0  # a wakes up and publishes its batch: fenced off
    assert _every_entry(r, names) == before  # no stream grew
    assert a.backlog() == backlog  # and none of its rows was marked
    assert a.held == frozenset() and a.stats.leases_lost == 2
    b.drain()
    assert b.backlog() == 0
    assert_published_in_place(r, store, names)


def test_a_new_relay_gets_its_share_given_back_by_the_one_that_held_everything(
    r, store, names
) -> None:
    clock = ManualClock()
    a = _relay(store, r, names, clock, "relay-a")
    a.heartbeat(force=True)
    assert a.sync_leases() == {0, 1, 2, 3}
    b = _relay(store, r, names, clock, "relay-b")
    b.heartbeat(force=True)
    assert b.sync_leases() == frozenset()  # a's leases are current
    assert a.sync_leases() == {0, 1, 2, 3}  # not due: a keeps them until its next sync
    clock.advance(LEASE_S / 4)
    assert a.sync_leases() == {0, 2}  # a sees b and gives b's share back at once
    assert r.get(names.lease("relay", 1)) is None
    assert b.sync_leases(force=True) == {1, 3}


def test_a_stopped_relay_gives_its_leases_back(r, store, names) -> None:
    relay = _relay(store, r, names, ManualClock())
    relay.heartbeat(force=True)
    relay.sync_leases()
    assert r.exists(*(names.lease("relay", p) for p in names.partitions)) == 4
    assert r.hexists(names.heartbeats("relay"), "relay-a")
    relay.stop()
    relay.run()
    assert r.exists(*(names.lease("relay", p) for p in names.partitions)) == 0
    assert not r.hexists(names.heartbeats("relay"), "relay-a")


# -- on a real Redis Cluster ----------------------------------------------------------


def test_on_a_cluster_a_batch_spans_partitions_and_repair_works(
    redis_cluster: LocalCluster, cluster_prefix: str, store, clock
) -> None:
    names = StreamNames(cluster_prefix, Partitioning(6))
    client = redis_cluster.client()
    try:
        service, gateway = make_service(store, clock, partitioning=names.partitioning)
        run_lifecycles(service, gateway, clock, 18)
        relay = _relay(store, client, names, clock, batch_size=40, verify_every_s=0.0)
        first = _outbox(store)[:40]
        assert len({p for _, _, _, p, _, _ in first}) > 3  # one batch, several slots
        assert relay.publish_batch() == 40  # no CROSSSLOT: one script per partition
        relay.drain()
        assert relay.backlog() == 0
        assert_published_in_place(client, store, names)
        before = _every_entry(client, names)
        client.delete(names.stream("payment", 4))
        client.delete(names.stream("escrow", 1))
        assert relay.publish_batch() == 0  # idle: the check of every partition repairs
        assert _every_entry(client, names) == before
        assert {(loss.aggregate, loss.partition) for loss in relay.losses} == {
            ("payment", 4),
            ("escrow", 1),
        }
        run_lifecycles(service, gateway, clock, 6, prefix="b")
        relay.drain()
        assert_published_in_place(client, store, names)
        # Retention runs per partition stream, each on its node (the window keeps all).
        kept = _every_entry(client, names)
        assert relay.trim() == 0 and _every_entry(client, names) == kept
        durable = _relay(store, client, names, clock, wait_fsync=True)
        with pytest.raises(DurabilityUnavailable, match="single-server"):
            durable.check_durability()
    finally:
        client.close()


def test_unpartitioned_relays_use_no_leases(r, store, clock) -> None:
    names = StreamNames(f"rp{next(_PREFIXES)}")
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 3)
    relay = OutboxRelay(store, r, names=names, clock=clock)
    relay.drain()
    assert relay.held == {0}
    assert r.keys(f"{names.prefix}:*lease*") == []
    assert all(aggregate in AGGREGATE_TYPES for _, _, aggregate, *_ in _outbox(store))


def test_processes_started_with_another_partition_count_are_refused(r, store, clock) -> None:
    from workbench.streams.consumer import ConsumerWorker
    from workbench.streams.groups import PartitionCountMismatch
    from workbench.streams.keys import names_for

    four, eight, none = names_for("count", 4), names_for("count", 8), names_for("count", 0)
    _relay(store, r, four, clock).drain()  # the first one records 4
    assert r.get(four.partition_count()) == b"4"
    with pytest.raises(PartitionCountMismatch, match="has 4 partitions .* started with 8"):
        _relay(store, r, eight, clock, member="relay-b").publish_batch()

    class _Nothing:
        group, aggregate_types = "ledger", ("escrow",)

        def handle(self, events: list) -> None:  # type: ignore[type-arg]
            raise AssertionError("never reached")

    with pytest.raises(PartitionCountMismatch, match="started with 0"):
        ConsumerWorker(r, _Nothing(), consumer="w", names=none, clock=clock).setup()
    ConsumerWorker(r, _Nothing(), consumer="w", names=four, clock=clock).setup()  # agrees
