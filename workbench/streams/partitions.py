"""Partitions: how the log spreads over a Redis Cluster's slots, keeping each escrow in one.

A Redis Cluster serves each key from the node that owns the key's *slot*
(CRC16 of the key, or of the part between the first ``{`` and ``}``, the hash
tag, modulo 16384). A script, a MULTI or an XREADGROUP may only touch keys of
one slot. So the log is cut into ``P`` partitions, and every key of a
partition carries the partition's hash tag: ``wb:{<tag>}:escrow``,
``wb:{<tag>}:payment``, ... all in one slot.

**Order.** An escrow's events must reach a handler in sequence order, across
aggregate types. :meth:`Partitioning.of` sends every event of an escrow to one
partition (a stable hash of the escrow id), whatever its aggregate type, so a
consumer of that partition reads the escrow's whole history from streams of one
slot, as a single-server consumer does today.

**Spread.** Bare tags ``{0}``, ``{1}``, ... land on arbitrary slots: on a
3-master cluster some masters get far more partitions than others.
:func:`even_tags` picks, for partition ``p``, the first tag ``p<p>-<n>`` whose
slot falls in the ``p``-th of ``P`` equal slot ranges; a cluster that splits
the slot space evenly among its masters (as ``redis-cli --cluster create`` and
:mod:`workbench.ops.redis_cluster` do) then holds ``P / masters`` partitions on
each, give or take one.

Pure: no Redis here; the slot function is redis-py's.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

#: How many partitions a log has unless configured: enough to spread over a few
#: masters and to be read by a few consumers per group.
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024


def slot_of(tag: str) -> int:
    """The cluster slot of every key carrying ``{tag}``."""
    return key_slot(f"{{{tag}}}".encode())


def even_tags(count: int) -> tuple[str, ...]:
    """One hash tag per partition, the ``p``-th in the ``p``-th of ``count`` equal slot ranges."""
    if not 1 <= count <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be between 1 and {MAX_PARTITIONS}, not {count}")
    return tuple(
        _first_tag(
            p,
            p * REDIS_CLUSTER_HASH_SLOTS // count,
            (p + 1) * REDIS_CLUSTER_HASH_SLOTS // count,
        )
        for p in range(count)
    )


#: How many candidate tags are tried per partition: a range holds at least 16 of the
#: 16384 slots, so about 1024 tries are expected and this many never run out.
_TAG_TRIES = 100_000


def _first_tag(partition: int, low: int, high: int) -> str:
    """The first tag ``p<partition>-<n>`` (smallest ``n``) whose slot is in ``[low, high)``."""
    for n in range(_TAG_TRIES):
        tag = f"p{partition}-{n}"
        if low <= slot_of(tag) < high:
            return tag
    raise ValueError(f"no tag of partition {partition} in slots [{low}, {high})")


@dataclass(frozen=True)
class Partitioning:
    """``count`` partitions and their hash tags; which partition an escrow lives in."""

    count: int = DEFAULT_PARTITIONS
    tags: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", even_tags(self.count))

    def of(self, escrow_id: str) -> int:
        """The partition of every event of ``escrow_id``: stable across processes and
        restarts (CRC32 of the id, not Python's salted ``hash``)."""
        return zlib.crc32(escrow_id.encode()) % self.count

    def tag_of(self, escrow_id: str) -> str:
        return self.tags[self.of(escrow_id)]


def partitioning(count: int) -> Partitioning | None:
    """``count`` partitions, or ``None`` for 0: the unpartitioned log (today's key names)."""
    return Partitioning(count) if count else None
