"""Partition leases: the pure assignment, and lease keys on a real Redis."""

from __future__ import annotations

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from workbench.streams.keys import StreamNames
from workbench.streams.leases import Leases, assign, lease_value, live_members
from workbench.streams.partitions import Partitioning

NAMES = StreamNames("lease-test", Partitioning(8))


@given(
    st.sets(st.text("abcdefgh-0123", min_size=1, max_size=6), min_size=1, max_size=9),
    st.integers(1, 40),
)
def test_every_partition_has_one_member_and_shares_differ_by_at_most_one(
    members: set[str], count: int
) -> None:
    dealt = assign(members, count)
    assert set(dealt) == members
    owned = sorted(p for ps in dealt.values() for p in ps)
    assert owned == list(range(count))
    sizes = [len(ps) for ps in dealt.values()]
    assert max(sizes) - min(sizes) <= 1


def test_the_assignment_does_not_depend_on_the_order_members_are_seen() -> None:
    assert assign(["b", "a", "c"], 7) == assign(["c", "b", "a", "a"], 7)
    assert assign(["a", "b"], 4) == {"a": (0, 2), "b": (1, 3)}
    assert assign([], 4) == {}


def test_live_members_are_those_beating_within_the_window_and_me() -> None:
    beats = {"old": 10.0, "edge": 15.0, "fresh": 19.0}
    assert live_members(beats, me="me", now=20.0, dead_after_s=5.0) == ["edge", "fresh", "me"]
    assert live_members({}, me="me", now=0.0, dead_after_s=5.0) == ["me"]


def _leases(r: redis.Redis, member: str, ttl_s: float = 10.0) -> Leases:
    keys = [NAMES.lease("g", p) for p in NAMES.partitions]
    return Leases(r, keys, member, ttl_s)


def test_a_held_lease_is_not_taken_until_it_expires(r: redis.Redis) -> None:
    r.delete(*(NAMES.lease("g", p) for p in NAMES.partitions))
    a, b = _leases(r, "a"), _leases(r, "b")
    assert a.sync([0, 1, 2], now=100.0) == {0, 1, 2}
    assert b.sync([1, 2, 3], now=105.0) == {3}
    assert r.get(NAMES.lease("g", 1)) == lease_value("a", 110.0).encode()
    assert a.sync([0, 1, 2], now=109.0) == {0, 1, 2}  # renewed to 119
    assert b.sync([1, 2, 3], now=115.0) == {3}
    assert b.sync([1, 2, 3], now=119.5) == {1, 2, 3}  # a stopped renewing: expired
    assert a.sync([0, 1, 2], now=120.0) == {0}


def test_given_back_leases_are_taken_at_once_and_only_ones_own_are_deleted(
    r: redis.Redis,
) -> None:
    r.delete(*(NAMES.lease("g", p) for p in NAMES.partitions))
    a, b = _leases(r, "a"), _leases(r, "b")
    a.sync([4, 5], now=0.0)
    assert a.sync([4], now=1.0) == {4, 5}  # kept until given back
    a.give([5])
    assert a.held == {4}
    assert r.get(NAMES.lease("g", 4)) == lease_value("a", 11.0).encode()  # 4 kept
    assert b.sync([5], now=1.0) == {5}
    a.held = frozenset({4, 5})  # a stale view: giving back 5 must not free b's lease
    a.give([5])
    assert r.get(NAMES.lease("g", 5)) == lease_value("b", 11.0).encode()
    a.give_all()
    assert r.get(NAMES.lease("g", 4)) is None


def test_a_member_name_with_a_space_is_refused(r: redis.Redis) -> None:
    with pytest.raises(ValueError, match="^a lease member's name has no spaces: 'a b'$"):
        _leases(r, "a b")
