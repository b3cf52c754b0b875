"""The consumer's pure decisions, at their boundaries. ``ready_to_handle`` (what of a
read may be handled now; ``ready_by_partition`` within each partition of a
partitioned log), the partitions to give back, just taken and blocked on,
``dead_consumers`` (whose pending entries to claim), ``group_gone`` (which errors
mean the group must be recreated), ``should_dead_letter``, ``killed_its_consumers``
and the settings' validation decide without Redis, so they are checked here
directly; the Redis loop around them is tested against a real Redis in
test_consumer.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis import ResponseError

from workbench.streams.connection import SOCKET_TIMEOUT_S
from workbench.streams.consumer import ConsumerSettings
from workbench.streams.decisions import (
    Delivery,
    blocking_partition,
    dead_consumers,
    field_pairs,
    group_gone,
    killed_its_consumers,
    newly_taken,
    ready_by_partition,
    ready_to_handle,
    reconnected,
    should_dead_letter,
    to_give_back,
)


def _delivery(stream: str, entry_id: str) -> Delivery:
    return Delivery(stream, entry_id, {b"data": b"x"})


def test_an_entry_is_dead_lettered_on_its_last_allowed_delivery_not_before() -> None:
    def delivered(times: int) -> Delivery:
        return Delivery("wb:escrow", "1-0", {b"data": b"{}"}, delivery_count=times)

    assert not should_dead_letter(delivered(4), max_deliveries=5)
    assert should_dead_letter(delivered(5), max_deliveries=5)
    assert should_dead_letter(delivered(6), max_deliveries=5)


def test_an_entry_is_dead_lettered_unhandled_once_it_killed_its_consumer_max_crashes_times() -> (
    None
):
    assert not killed_its_consumers(0, max_crashes=1)
    assert killed_its_consumers(1, max_crashes=1)
    assert not killed_its_consumers(2, max_crashes=3)
    assert killed_its_consumers(3, max_crashes=3)
    assert killed_its_consumers(4, max_crashes=3)


def test_a_consumer_is_dead_only_once_its_heartbeat_is_older_than_the_limit() -> None:
    pending = {"c1": 1}
    at_limit = dead_consumers(pending, {"c1": 90.0}, me="me", now=100.0, dead_after_s=10.0)
    past_limit = dead_consumers(pending, {"c1": 89.5}, me="me", now=100.0, dead_after_s=10.0)
    assert (at_limit, past_limit) == ([], ["c1"])


def test_only_a_missing_group_or_a_deleted_stream_means_the_group_is_gone() -> None:
    # The errors Redis gives: a read on a group it no longer has, and a blocked read
    # woken because its stream was deleted (the consumer recreates the group).
    assert group_gone(ResponseError("NOGROUP No such key 'wb:escrow' or consumer group 'ledger'"))
    assert group_gone(ResponseError("UNBLOCKED the stream key no longer exists"))
    # Any other error, and an unblock for another reason, is not ours to repair.
    assert not group_gone(ResponseError("UNBLOCKED client unblocked via CLIENT UNBLOCK"))
    assert not group_gone(ResponseError("ERR the key no longer exists"))
    assert not group_gone(ResponseError("WRONGTYPE Operation against a key"))


def test_block_ms_just_below_the_socket_timeout_is_accepted_and_at_it_refused() -> None:
    limit_ms = int(SOCKET_TIMEOUT_S * 1000)
    assert ConsumerSettings(block_ms=limit_ms - 1).block_ms == limit_ms - 1
    with pytest.raises(ValueError, match=rf"block_ms={limit_ms} .*\({limit_ms} ms\)"):
        ConsumerSettings(block_ms=limit_ms)


def test_a_single_delivery_is_allowed_and_none_is_refused() -> None:
    assert ConsumerSettings(max_deliveries=1).max_deliveries == 1
    with pytest.raises(ValueError, match="^max_deliveries must be at least 1$"):
        ConsumerSettings(max_deliveries=0)
    assert ConsumerSettings(max_crashes=1).max_crashes == 1
    with pytest.raises(ValueError, match="^max_crashes must be at least 1$"):
        ConsumerSettings(max_crashes=0)


def test_entries_at_millisecond_zero_wait_for_a_full_stream_stopping_there() -> None:
    # Explicit ids from a simulation clock can start at 0 ms: a full stream that
    # stops at 0 ms may have more 0 ms entries unread, so nothing else is certain.
    a = _delivery("wb:escrow", "0-1")
    p = _delivery("wb:payment", "0-2")
    assert ready_to_handle([a, p], {"wb:escrow"}) == ([], [a, p])


def test_a_full_stream_absent_from_the_read_holds_everything_back() -> None:
    # Its unread entries may come before anything in hand: nothing is certain.
    p1, p2 = _delivery("wb:payment", "3-0"), _delivery("wb:payment", "7-0")
    assert ready_to_handle([p1, p2], {"wb:escrow", "wb:dispute"}) == ([], [p1, p2])
    p0 = _delivery("wb:payment", "0-5")
    assert ready_to_handle([p0], {"wb:escrow"}) == ([], [p0])


_reads = st.lists(
    st.tuples(
        st.sampled_from(["wb:escrow", "wb:payment", "wb:payout"]),
        st.integers(0, 30),
        st.integers(0, 3),
    ),
    max_size=12,
    unique_by=lambda t: (t[0], t[1], t[2]),
)


def _in_stream_order(deliveries: list[Delivery]) -> list[Delivery]:
    """``deliveries`` with each stream's entries put in id order in the slots its
    entries hold (streams keep their interleaving): what reads give the worker."""
    key = lambda d: tuple(map(int, d.entry_id.split("-")))  # noqa: E731
    by_stream: dict[str, list[Delivery]] = {}
    for d in sorted(deliveries, key=key):
        by_stream.setdefault(d.stream, []).append(d)
    return [by_stream[d.stream].pop(0) for d in deliveries]


def _reference(deliveries: list[Delivery], truncated: set[str]) -> tuple[set, set]:
    """The hold-back rule, entry by entry (as the docstring states it)."""
    ms = lambda d: int(d.entry_id.split("-")[0])  # noqa: E731
    ends = {}
    for d in deliveries:
        if d.stream in truncated:
            ends[d.stream] = max(ends.get(d.stream, 0), ms(d))
    cutoff = min(ends.values(), default=0)
    later = [d for d in deliveries if ms(d) >= cutoff]
    if not truncated or (len(truncated) == 1 and all(d.stream in truncated for d in later)):
        return {id(d) for d in deliveries}, set()
    return {id(d) for d in deliveries if ms(d) < cutoff}, {id(d) for d in later}


@given(_reads, st.sets(st.sampled_from(["wb:escrow", "wb:payment", "wb:payout"])), st.randoms())
def test_what_is_held_back_does_not_depend_on_the_order_of_the_read(
    read: list[tuple[str, int, int]], truncated: set[str], rnd
) -> None:  # type: ignore[no-untyped-def]
    deliveries = _in_stream_order([_delivery(stream, f"{ms}-{seq}") for stream, ms, seq in read])
    now, later = ready_to_handle(deliveries, truncated)
    assert ({id(d) for d in now}, {id(d) for d in later}) == _reference(deliveries, truncated)
    shuffled = list(deliveries)
    rnd.shuffle(shuffled)
    now2, later2 = ready_to_handle(_in_stream_order(shuffled), truncated)
    key = lambda d: (d.stream, d.entry_id)  # noqa: E731
    assert sorted(map(key, now)) == sorted(map(key, now2))
    assert sorted(map(key, later)) == sorted(map(key, later2))
    # Nothing is lost or doubled, and what is handled now precedes what waits.
    assert sorted(map(key, now + later)) == sorted(map(key, deliveries))
    ms = lambda d: int(d.entry_id.split("-")[0])  # noqa: E731
    if later and now:
        assert max(map(ms, now)) < min(map(ms, later))


def test_a_full_read_of_one_partition_holds_nothing_back_in_another() -> None:
    partition_of = {"wb:{a}:escrow": 0, "wb:{a}:payment": 0, "wb:{b}:escrow": 1}
    a1, a2 = _delivery("wb:{a}:escrow", "5-0"), _delivery("wb:{a}:escrow", "9-0")
    ap = _delivery("wb:{a}:payment", "9-1")
    b1 = _delivery("wb:{b}:escrow", "9-2")  # same ms, another partition (another escrow)
    # Partition 0's escrow stream came back full at 9 ms: its own 9 ms entries wait.
    now, later = ready_by_partition([a1, a2, ap, b1], {"wb:{a}:escrow"}, partition_of)
    assert (now, later) == ([a1, b1], [a2, ap])
    # The single-partition decision would have held b1 back too.
    assert b1 in ready_to_handle([a1, a2, ap, b1], {"wb:{a}:escrow"})[1]
    # Nothing full: everything now, in the order read.
    assert ready_by_partition([b1, a1], set(), partition_of) == ([b1, a1], [])
    # A full partition 1 holds back what of it may follow its unread entries.
    b0 = _delivery("wb:{b}:escrow", "3-0")
    a3 = _delivery("wb:{a}:payment", "3-5")
    full_b = {"wb:{b}:escrow", "wb:{a}:payment"}
    assert ready_by_partition([b0, b1, a1, a3], full_b, partition_of) == ([b0, b1], [a1, a3])


def test_partitions_given_back_are_those_held_and_no_longer_targets() -> None:
    assert to_give_back({0, 2, 4, 6}, (0, 3, 6)) == {2, 4}
    assert to_give_back(frozenset(), (1, 2)) == frozenset()
    assert to_give_back({1, 2}, (1, 2)) == frozenset()


def test_partitions_newly_taken_are_held_now_and_not_before_in_order() -> None:
    assert newly_taken({0, 6}, {0, 3, 6, 1}) == (1, 3)
    assert newly_taken({0, 1}, {0}) == ()


def test_a_cluster_read_blocks_on_each_held_partition_in_turn() -> None:
    turns = [blocking_partition((2, 5, 7), turn) for turn in range(5)]
    assert turns == [2, 5, 7, 2, 5]
    with pytest.raises(ValueError, match="^no partition to block on$"):
        blocking_partition((), 0)


def test_a_partition_read_blocks_for_at_least_a_millisecond() -> None:
    assert ConsumerSettings(partition_block_ms=1).partition_block_ms == 1
    with pytest.raises(ValueError, match="^partition_block_ms must be at least 1$"):
        ConsumerSettings(partition_block_ms=0)


def test_a_read_on_another_connection_or_after_a_reconnect_counts_as_reconnected() -> None:
    first, other = object(), object()
    # The first check has nothing to compare with (the worker re-reads at setup).
    assert not reconnected(None, 0, first, 1)
    # The same connection, no connect since: not reconnected.
    assert not reconnected(first, 3, first, 3)
    # The same connection object, connected again since (redis-py retried the read).
    assert reconnected(first, 3, first, 4)
    # Another connection, even without a connect counted (a pool handing out another).
    assert reconnected(first, 3, other, 3)


def test_an_entrys_fields_come_as_pairs_from_a_flat_list_or_a_mapping() -> None:
    assert field_pairs([b"event_id", b"e1", b"data", b"{}"]) == [
        (b"event_id", b"e1"),
        (b"data", b"{}"),
    ]
    assert field_pairs({b"data": b"{}"}) == [(b"data", b"{}")]
    assert field_pairs(None) == [] and field_pairs([]) == []
    # A name without its value is not an entry Redis would send: refused, not paired.
    with pytest.raises(ValueError):
        field_pairs([b"event_id", b"e1", b"data"])


def test_one_partition_decides_as_the_unpartitioned_hold_back() -> None:
    partition_of = {"wb:escrow": 0, "wb:payment": 0}
    e1, e2 = _delivery("wb:escrow", "5-0"), _delivery("wb:escrow", "9-0")
    p1 = _delivery("wb:payment", "9-1")
    full = {"wb:escrow"}
    assert ready_by_partition([e1, e2, p1], full, partition_of) == ([e1], [e2, p1])
    assert ready_by_partition([e1, e2, p1], full, partition_of) == ready_to_handle(
        [e1, e2, p1], full
    )
