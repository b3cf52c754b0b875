"""Consumer groups on the aggregate streams: created before anything is trimmed, and their ages.

A group must exist before entries it should see are trimmed, so every loop
calls :func:`ensure_groups` at setup, on every stream it may ever read: on a
partitioned log (:mod:`workbench.streams.partitions`) that is each aggregate
stream of *every* partition (``names.streams(types)``), not only those the
consumer holds now, since a partition can change hands at any time.
:func:`group_ages` says how far behind a group is in seconds of the stream-id
clock: the age of its oldest pending entry and of the first entry it has not
been delivered (``lag_s``), read from entry ids, so a simulation's ages are on
simulation time. :func:`dead_letter_count` sums a group's dead letters over
every partition.
"""

from __future__ import annotations

from typing import Any

import redis

from workbench.domain.streamid import parse
from workbench.streams.keys import StreamNames
from workbench.streams.replies import text


class PartitionCountMismatch(RuntimeError):
    """This process was started with another partition count than the log has."""


def claim_partition_count(client: redis.Redis, names: StreamNames) -> None:
    """Record the log's partition count the first time; refuse another one after.

    Processes of one deployment that disagree on the count would split an escrow
    over two partitions, or have two relays each holding "its" partition 3 under a
    different key. The first process stores its count (``<prefix>:partitions``,
    ``0`` unpartitioned); any process started with another one gets
    :class:`PartitionCountMismatch`, whose message says how to change the count.
    """
    key = names.partition_count()
    count = str(len(names.partitions)) if names.partitioned else "0"
    client.set(key, count, nx=True)
    found = text(client.get(key))
    if found != count:
        raise PartitionCountMismatch(
            f"the log under prefix {names.prefix!r} has {found} partitions (0: unpartitioned) "
            f"but this process was started with {count}: every process of a deployment "
            f"needs the same --partitions (WORKBENCH_PARTITIONS). To change it, stop "
            f"everything, let the outbox publish and every group catch up, delete {key}"
        )


def ensure_groups(client: redis.Redis, streams: list[str], group: str) -> None:
    """Create ``group`` on each stream (from the start, creating the stream).

    One pipeline (of one-key commands, so a cluster client splits it by node):
    a partitioned log has a stream per aggregate type and partition."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xgroup_create(stream, group, id="0", mkstream=True)
    for reply in pipe.execute(raise_on_error=False) if streams else []:
        if isinstance(reply, redis.ResponseError) and "BUSYGROUP" not in str(reply):
            raise reply


def dead_letter_count(client: redis.Redis, names: StreamNames, group: str) -> int:
    """How many entries ``group`` dead-lettered, over every partition's dead letters."""
    keys = names.dead_letters(group)
    if len(keys) == 1:
        return int(client.xlen(keys[0]))
    pipe = client.pipeline(transaction=False)  # one-key commands: fine on a cluster
    for key in keys:
        pipe.xlen(key)
    return sum(int(n) for n in pipe.execute())


def group_ages(
    client: redis.Redis, stream: str, groups: list[dict[Any, Any]], now: int
) -> dict[str, tuple[float | None, float]]:
    """Per group of ``stream`` (its ``XINFO GROUPS`` rows): the age in seconds at
    ``now`` (ms) of its oldest pending entry (None: nothing pending) and its lag in
    seconds (the age of the oldest entry not yet delivered to it; 0: none)."""
    pipe = client.pipeline(transaction=False)
    for g in groups:
        pipe.xpending_range(stream, text(g["name"]), "-", "+", 1)
        pipe.xrange(stream, f"({text(g['last-delivered-id'])}", "+", count=1)
    replies = pipe.execute() if groups else []
    ages: dict[str, tuple[float | None, float]] = {}
    for i, g in enumerate(groups):
        oldest, undelivered = replies[2 * i], replies[2 * i + 1]
        pending_age = _age_s(oldest[0]["message_id"], now) if oldest else None
        lag_s = _age_s(undelivered[0][0], now) if undelivered else 0.0
        ages[text(g["name"])] = (pending_age, lag_s)
    return ages


def _age_s(entry_id: Any, now: int) -> float:
    return max(0.0, (now - parse(text(entry_id)).ms) / 1000)
