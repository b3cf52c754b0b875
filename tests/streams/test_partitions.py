"""Partitions of the log over a Redis Cluster's slots (pure: no Redis)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from tests.support import ROOT
from workbench.ops.redis_cluster import slot_ranges
from workbench.streams.partitions import (
    MAX_PARTITIONS,
    Partitioning,
    _first_tag,
    even_tags,
    slot_of,
)


def _per_master(tags: tuple[str, ...], masters: int) -> list[int]:
    ranges = slot_ranges(masters)
    owner = Counter(
        next(m for m, (first, last) in enumerate(ranges) if first <= slot_of(t) <= last)
        for t in tags
    )
    return [owner[m] for m in range(masters)]


@pytest.mark.parametrize("count", [1, 3, 16, 64, 128])
def test_each_tag_lands_in_its_own_equal_share_of_the_slots(count: int) -> None:
    tags = even_tags(count)
    assert len(set(tags)) == count
    for p, tag in enumerate(tags):
        low, high = (
            p * REDIS_CLUSTER_HASH_SLOTS // count,
            (p + 1) * REDIS_CLUSTER_HASH_SLOTS // count,
        )
        assert low <= slot_of(tag) < high, (p, tag)


@pytest.mark.parametrize(("count", "masters"), [(16, 3), (64, 3), (128, 3), (16, 4), (64, 5)])
def test_partitions_spread_over_masters_within_one(count: int, masters: int) -> None:
    spread = _per_master(even_tags(count), masters)
    assert sum(spread) == count and max(spread) - min(spread) <= 1, spread


def test_bare_numeric_tags_would_not_spread() -> None:
    """Why the tags are searched for: ``{0}``..``{15}`` crowd some masters."""
    bare = tuple(str(p) for p in range(16))
    spread = _per_master(bare, 3)
    assert max(spread) - min(spread) > 1, spread


def test_every_event_of_an_escrow_goes_to_one_partition_and_ids_spread() -> None:
    parts = Partitioning(16)
    ids = [f"esc-{n:06d}" for n in range(16_000)]
    counts = Counter(parts.of(i) for i in ids)
    assert set(counts) == set(range(16))
    assert all(700 <= c <= 1300 for c in counts.values()), counts
    assert parts.tag_of("esc-000042") == parts.tags[parts.of("esc-000042")]


def test_the_partition_of_an_escrow_is_the_same_in_every_process() -> None:
    """Python's str hash is salted per process; the partition must not be."""
    code = (
        "from workbench.streams.partitions import Partitioning; "
        "print([Partitioning(64).of(f'esc-{n}') for n in range(50)])"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        ).stdout  # fmt: skip
        for seed in ("1", "2")
    }
    assert len(outputs) == 1
    assert outputs.pop().strip() == str([Partitioning(64).of(f"esc-{n}") for n in range(50)])


@pytest.mark.parametrize("count", [0, -1, MAX_PARTITIONS + 1])
def test_a_partition_count_out_of_range_is_refused(count: int) -> None:
    with pytest.raises(ValueError, match="partitions must be between 1 and"):
        Partitioning(count)


@pytest.mark.parametrize("masters", [1, 3, 7])
def test_slot_ranges_cover_every_slot_once(masters: int) -> None:
    ranges = slot_ranges(masters)
    covered = [s for first, last in ranges for s in range(first, last + 1)]
    assert covered == list(range(REDIS_CLUSTER_HASH_SLOTS))
    sizes = [last - first + 1 for first, last in ranges]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one master"):
        slot_ranges(0)


# 12 and 35: counts whose range bounds are fractions where a tag sits right on one.
@pytest.mark.parametrize("count", [3, 12, 16, 35])
def test_each_tag_is_the_first_candidate_in_its_range(count: int) -> None:
    """Tags are found, not chosen: ``p<p>-<n>`` with the smallest ``n`` in range, so
    every process derives the same tags."""
    for p, tag in enumerate(even_tags(count)):
        prefix, n = tag.rsplit("-", 1)
        assert prefix == f"p{p}"
        low, high = p * 16384 // count, (p + 1) * 16384 // count
        assert low <= slot_of(tag) < high
        assert not any(low <= slot_of(f"p{p}-{k}") < high for k in range(int(n)))


def test_a_range_includes_its_low_slot() -> None:
    slot = slot_of("p0-0")
    assert _first_tag(0, slot, slot + 1) == "p0-0"


def test_the_largest_partition_count_has_tags_and_an_empty_range_none() -> None:
    assert len(set(even_tags(MAX_PARTITIONS))) == MAX_PARTITIONS
    with pytest.raises(ValueError, match=r"no tag of partition 3 in slots \[5, 5\)"):
        _first_tag(3, 5, 5)
