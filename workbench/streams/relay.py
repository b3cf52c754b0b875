"""The outbox relay: publishes committed outbox rows to the streams, in order,
and puts back what Redis loses.

Rows are read in ``seq`` order, XADDed in one round trip, then marked
published together with the stream id each got (``outbox.stream_id``). A
crash between the XADD and the mark publishes those rows again on restart:
at-least-once, and consumers dedupe by event id. While Redis is down the rows
wait in the outbox and the relay backs off; nothing is lost.

**Repair.** The outbox, not Redis, is the source of truth. Redis can lose
writes it acknowledged: with ``appendfsync everysec`` a kill -9 while a
background fsync is running loses up to ~2 s of them, and what survives is a
prefix of the history (streams, consumer groups and the fan-out's dedupe
markers regress together); a FLUSHALL or a deleted stream loses more. The
relay remembers, per aggregate stream, the last id it published. Each batch
goes out as one Lua script that first compares every stream's
``last-generated-id`` with that (a missing stream counts as ``0-0``) and
writes nothing if one is behind; the same check runs every ``verify_every_s``
while the outbox is idle. A stream found behind has lost the published rows
after its ``last-generated-id``: the relay XADDs them again *with their
original ids*, in id order, before anything new. Ids are compared, not
``seq``s: on PostgreSQL commands on different escrows commit in any order, so a
row with a smaller ``seq`` can become visible, and be published, after one with
a larger (an escrow's own rows stay in ``seq`` order: its commands lock its
row). Because the check and the new XADDs are one atomic script, no new entry
can land on a regressed stream first (after which the lost ids could no longer
go back in order).
Consumer groups then re-read what they lost (:mod:`workbench.streams.consumer`), the
inboxes make the redelivery harmless, and the fan-out re-appends what user
streams lost (:mod:`workbench.delivery.userstreams`). Rows older than the retention
window are not put back (retention would trim them again).

**Durable publishing.** With ``wait_fsync`` (servers with ``WAITAOF``:
Redis >= 7.2, Valkey) the script is followed, on the same connection, by
``WAITAOF 1 0 <timeout>``; rows are marked published only once the server
confirms its AOF holds them on disk. A timeout marks nothing and the batch is
retried (republished: at-least-once). Single server only: on Redis Cluster a
batch spans several masters, and one connection's WAITAOF vouches for one of
them, so the relay refuses the mode there (:class:`DurabilityUnavailable`).

**Partitions** (``names`` with a :class:`~workbench.streams.partitions.Partitioning`
of ``P``). Each outbox row carries its escrow's partition (``outbox.partition``,
written by :class:`~workbench.service.EscrowService`, which must be given the
same partitioning), and goes to that partition's stream of its aggregate type
(``wb:{<tag>}:escrow`` ...). Partitioned relays share the store through
leases (:mod:`workbench.streams.leases`, role ``relay``): each computes the
same round-robin assignment of the ``P`` partitions over the relays beating in
``<prefix>:heartbeats:relay`` (live: beaten within ``lease_s``), holds its
share through the lease keys ``wb:{<tag>}:lease:relay`` (renewed every
``lease_s / 4``, expiring ``lease_s`` after on the relay's clock), gives back
what is no longer its share after the batch in hand, and reads and publishes
only the partitions it holds. A batch is the oldest ``batch_size`` unpublished
rows of those partitions; each partition's rows go out as one script on that
partition's keys (one cluster slot), every partition's script in one pipeline
(redis-py's ``ClusterPipeline`` sends each to its slot's master), and the
expected ids, the repair, the idle check and the trimming are per partition
stream. The script first checks that the partition's lease is still this
relay's (*fencing*): a relay that paused past its lease while another took the
partition writes nothing, drops the partition and leaves its rows to the new
holder, which starts from the partition's oldest unpublished row. So an
escrow's rows are published by one relay at a time, in ``seq`` order, across
relays and handovers; only a relay that dies (or loses its lease) between its
XADD and its mark leaves rows that the next holder publishes again, after
them: at-least-once, as with one relay.

Rows written before ``outbox.partition`` existed (NULL) are given their
escrow's partition (decoded from the event) by a partitioned relay before it
reads a batch, if unpublished; published ones stay NULL: they went to the
unpartitioned streams, whose history is not a partition's. An unpartitioned
relay ignores the column: one partition, today's keys, no leases. Run one
unpartitioned relay per store: two would each keep per-escrow order but could
interleave their batches, and each would take the other's entries for its own.

While running it beats, like the workers: ``<prefix>:heartbeats:relay`` holds
``<member> -> time`` (``relay-<pid>`` unless named) at least every
``heartbeat_every_s``, and each beat sets ``<prefix>:relay:last_publish`` to the
time of the last batch, so ``/healthz`` tells a stalled relay from an idle one.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster
from sqlalchemy import BigInteger, and_, bindparam, cast, func, literal, or_, select, update

from workbench.domain import events as ev
from workbench.domain.clock import Clock, SystemClock, now_ms
from workbench.domain.events import AGGREGATE_TYPES
from workbench.domain.streamid import ZERO, StreamId, next_id, parse
from workbench.ops.shutdown import StopRequest
from workbench.store import Prepared, Store, mark_published, outbox
from workbench.streams.connection import (
    REDIS_DOWN,
    execute,
    outage_backoff,
    queue_script,
    refused,
    server_version,
    transient,
)
from workbench.streams.groups import claim_partition_count
from workbench.streams.keys import StreamNames
from workbench.streams.leases import Leases, assign, live_members
from workbench.streams.replies import text
from workbench.streams.retention import trim

log = logging.getLogger(__name__)


#: WAITAOF's timeout (ms) in the durable mode: an everysec fsync is due within ~1 s.
DEFAULT_FSYNC_TIMEOUT_MS = 2000
#: How long a partitioned relay's lease lasts unless renewed (its clock's seconds).
DEFAULT_LEASE_S = 5.0

_UNPUBLISHED_COLUMNS = (
    outbox.c.seq,
    outbox.c.event_id,
    outbox.c.stream,
    outbox.c.type,
    outbox.c.data,
)
_NO_PARTITION = Prepared(
    select(outbox.c.seq, outbox.c.data)
    .where(outbox.c.published_at.is_(None), outbox.c.partition.is_(None))
    .order_by(outbox.c.seq)
    .limit(1000)
)
_SET_PARTITION = Prepared(
    update(outbox).where(outbox.c.seq == bindparam("seq")).values(partition=bindparam("p"))
)

# One partition's checked XADDs. KEYS: the partition's aggregate streams, then,
# if ARGV[1] (a lease member) is not '', the partition's relay lease. ARGV[2..]:
# per stream, the id its last-generated-id must have reached (what the relay
# published last; 0-0: no check). Then per row: key index, entry id ('*':
# Redis' clock), event_id, type, data.
# Returns {2} if the lease is not ARGV[1]'s (fencing: nothing written), else
# {0, key index, its last-generated-id, ...} for the streams found behind,
# having written nothing, else {1, id...} after XADDing every row.
_CHECKED_XADD_LUA = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local n = #KEYS
if ARGV[1] ~= '' then
  local v = redis.call('GET', KEYS[n])
  if not v or string.sub(v, 1, string.len(ARGV[1]) + 1) ~= ARGV[1] .. ' ' then
    return {2}
  end
  n = n - 1
end
local behind = {0}
for i = 1, n do
  if ARGV[i + 1] ~= '0-0' then
    local last = '0-0'
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local info = redis.call('XINFO', 'STREAM', KEYS[i])
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then last = info[j + 1] break end
      end
    end
    local hm, hs = parse(last)
    local wm, ws = parse(ARGV[i + 1])
    if hm < wm or (hm == wm and hs < ws) then
      behind[#behind + 1] = i
      behind[#behind + 1] = last
    end
  end
end
if #behind > 1 then return behind end
local ids = {1}
for k = n + 2, #ARGV, 5 do
  ids[#ids + 1] = redis.call('XADD', KEYS[tonumber(ARGV[k])], ARGV[k + 1],
    'event_id', ARGV[k + 2], 'type', ARGV[k + 3], 'data', ARGV[k + 4])
end
return ids
"""
_PUBLISHED, _BEHIND, _NOT_MINE = 1, 0, 2


class DurabilityUnavailable(RuntimeError):
    """The durable mode was asked for, but the server cannot confirm an fsync."""


class PartitionCountChanged(RuntimeError):
    """Unpublished outbox rows name a partition the log does not have: the partition
    count was lowered while rows waited. No relay would ever publish them."""


class NotFsynced(redis.TimeoutError):
    """WAITAOF timed out: the batch is in Redis but not known to be on disk."""


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    redis_errors: int = 0
    trimmed: int = 0
    repairs: int = 0  # losses found (a check that found streams behind)
    repaired: int = 0  # rows put back with their original ids
    unrepairable: int = 0  # lost rows the outbox could not give back (see _lost_rows)
    repair_seconds: float = 0.0  # the last repair, detection to last XADD
    fsync_timeouts: int = 0
    leases_lost: int = 0  # partitions found taken by another relay at publish time


@dataclass(frozen=True)
class Loss:
    """An aggregate stream whose last-generated-id is behind what was published."""

    aggregate: str
    found: StreamId
    expected: StreamId
    partition: int = 0


class _LeaseLost(Exception):
    """A partition's lease was found another relay's: drop the partition."""


class OutboxRelay:
    """Publish the outbox in order; with ``repair``, check and restore Redis first.

    ``repair=False`` is the relay without loss detection (unpartitioned: one XADD
    pipeline per batch), kept to measure what the check costs. ``wait_fsync`` is
    the durable mode (needs ``WAITAOF`` and ``appendonly yes``; single server).
    With partitioned ``names``, ``member`` names this relay among the relays
    sharing the store (default ``relay-<pid>``; tests run two in one process) and
    ``lease_s`` is how long its leases last unless renewed.
    """

    def __init__(
        self,
        store: Store,
        client: redis.Redis,
        *,
        names: StreamNames | None = None,
        batch_size: int = 500,
        clock: Clock | None = None,
        retention_s: float = 24 * 3600,
        trim_every: int = 200,
        heartbeat_every_s: float = 1.0,
        repair: bool = True,
        verify_every_s: float = 0.25,
        wait_fsync: bool = False,
        fsync_timeout_ms: int = DEFAULT_FSYNC_TIMEOUT_MS,
        ids_on_clock: bool = False,
        member: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        if fsync_timeout_ms < 1:
            raise ValueError("fsync_timeout_ms must be at least 1 (WAITAOF 0 would wait forever)")
        if names is not None and names.partitioned and not 0 < heartbeat_every_s < lease_s:
            raise ValueError(
                f"lease_s ({lease_s}) must be longer than heartbeat_every_s "
                f"({heartbeat_every_s}): a relay that beats is live for lease_s"
            )
        self.store = store
        self.client = client
        self.names = names or StreamNames()
        self.batch_size = batch_size
        self.clock = clock or SystemClock()
        self.retention_s = retention_s
        self.trim_every = trim_every
        self.stats = RelayStats()
        self.repair = repair
        self.verify_every_s = verify_every_s
        self.wait_fsync = wait_fsync
        self.fsync_timeout_ms = fsync_timeout_ms
        # Simulations: entry ids from ``clock`` (see workbench.domain.streamid.next_id), not Redis'.
        self.ids_on_clock = ids_on_clock
        self.losses: list[Loss] = []  # every loss found, oldest first
        self._unpublished: dict[int, Prepared] = {}  # by how many partitions are held
        self._index = {a: i for i, a in enumerate(AGGREGATE_TYPES)}
        # Per partition, per aggregate stream: the last id published (loaded from the
        # outbox when first needed, dropped when the partition's lease changes hands).
        self._expected: dict[int, list[StreamId]] = {}
        self._keys: dict[int, list[str]] = {}  # a partition's script keys
        self._sha = ""
        self._durability_checked = False
        self._partition_count_checked = False
        self._partition_count_claimed = False
        self._next_verify = 0.0
        self._stop = StopRequest()
        self.heartbeat_every_s = heartbeat_every_s
        self.name = member or f"relay-{os.getpid()}"
        self._next_heartbeat = 0.0
        self._last_publish_at: float | None = None  # reported with the heartbeat
        self.lease_s = lease_s
        self._leases: Leases | None = None
        if self.names.partitioned:
            lease_keys = [self.names.lease("relay", p) for p in self.names.partitions]
            self._leases = Leases(client, lease_keys, self.name, lease_s)
        self._next_sync = 0.0

    def heartbeat(self, force: bool = False) -> None:
        """Beat (at most every ``heartbeat_every_s``); raises if Redis is down."""
        now = self.clock.now()
        if force or now >= self._next_heartbeat:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.names.heartbeats("relay"), self.name, repr(now))
            if self._last_publish_at is not None:  # so /healthz tells stalled from idle
                pipe.set(self.names.last_publish(), repr(self._last_publish_at))
            execute(self.client, pipe)
            self._next_heartbeat = now + self.heartbeat_every_s

    def backlog(self) -> int:
        """Outbox rows not yet published (of every partition)."""
        with self.store.read() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                ).scalar_one()
            )

    # -- partitions and leases --------------------------------------------------------

    @property
    def held(self) -> frozenset[int]:
        """The partitions this relay publishes: ``{0}`` unpartitioned, else those
        whose lease it held at the last :meth:`sync_leases` and has not lost since."""
        return self._leases.held if self._leases is not None else frozenset({0})

    def sync_leases(self, force: bool = False) -> frozenset[int]:
        """Move towards this relay's share of the partitions; return those it holds.

        Unpartitioned: ``{0}``, no Redis. Otherwise at most every ``lease_s / 4``
        (or when ``force``): read which relays beat, take or renew the leases of
        this relay's share (:func:`~workbench.streams.leases.assign`), and give
        back held partitions outside it (between batches nothing of theirs is in
        hand). A partition taken (or lost) forgets what this relay expected of
        its streams: another relay published there meanwhile, so it is reloaded
        from the outbox.
        """
        if self._leases is None:
            return self.held
        now = self.clock.now()
        if not force and now < self._next_sync:
            return self._leases.held
        beats = self.client.hgetall(self.names.heartbeats("relay"))
        members = live_members(
            {text(k): float(text(v)) for k, v in beats.items()},
            me=self.name,
            now=now,
            dead_after_s=self.lease_s,
        )
        share = frozenset(assign(members, len(self.names.partitions))[self.name])
        before = self._leases.held
        self._leases.sync(share, now)
        self._leases.give(self._leases.held - share)
        for p in before ^ self._leases.held:
            self._expected.pop(p, None)
        self._next_sync = now + self.lease_s / 4
        return self._leases.held

    def _lost_lease(self, partition: int) -> None:
        """The publish script found ``partition``'s lease another relay's: stop
        publishing it; its rows stay unpublished for the holder."""
        assert self._leases is not None
        self.stats.leases_lost += 1
        self._leases.held = self._leases.held - {partition}
        self._expected.pop(partition, None)
        log.warning("relay %s: partition %d is another relay's now", self.name, partition)

    def _script_keys(self, partition: int) -> list[str]:
        """The partition's aggregate streams, then its relay lease (partitioned)."""
        keys = self._keys.get(partition)
        if keys is None:
            keys = [self.names.stream(a, partition) for a in AGGREGATE_TYPES]
            if self._leases is not None:
                keys.append(self.names.lease("relay", partition))
            self._keys[partition] = keys
        return keys

    # -- reading the outbox -----------------------------------------------------------

    def _unpublished_rows(self, held: frozenset[int]) -> list[Any]:
        """The oldest ``batch_size`` unpublished rows of the held partitions."""
        chosen = sorted(held) if self._leases is not None else []
        with self.store.begin() as conn:  # SQLite: the thread's held connection, no checkout
            if self._leases is not None:
                self._fill_partitions(conn)
            params = {f"p{i}": p for i, p in enumerate(chosen)}
            return self._query(len(chosen)).execute(conn, params).fetchall()  # type: ignore[no-any-return]

    def _query(self, partitions: int) -> Prepared:
        """The batch's read, prepared once per number of partitions held (0:
        unpartitioned, every unpublished row)."""
        query = self._unpublished.get(partitions)
        if query is None:
            where = [outbox.c.published_at.is_(None)]
            columns = list(_UNPUBLISHED_COLUMNS)
            if partitions:
                where.append(
                    outbox.c.partition.in_([bindparam(f"p{i}") for i in range(partitions)])
                )
                columns.append(outbox.c.partition)
            query = self._unpublished[partitions] = Prepared(
                select(*columns).where(*where).order_by(outbox.c.seq).limit(self.batch_size)
            )
        return query

    def _check_partition_count(self, conn: Any) -> None:
        """Raise :class:`PartitionCountChanged` if an unpublished row's partition is
        beyond this log's (checked once, at the first batch)."""
        count = len(self.names.partitions)
        highest = conn.execute(
            select(func.max(outbox.c.partition)).where(outbox.c.published_at.is_(None))
        ).scalar()
        if highest is not None and highest >= count:
            raise PartitionCountChanged(
                f"the outbox holds unpublished rows of partition {highest}, but the log has "
                f"{count} partitions: the count changed while rows waited. Run with the "
                f"old count until the outbox is published and every group has caught up, "
                f"then change it"
            )
        self._partition_count_checked = True

    def _fill_partitions(self, conn: Any) -> None:
        """Unpublished rows written before ``outbox.partition`` existed get their
        escrow's partition, read from the event, before any batch is chosen."""
        if not self._partition_count_checked:
            self._check_partition_count(conn)
        while rows := _NO_PARTITION.execute(conn).fetchall():
            _SET_PARTITION.executemany(
                conn,
                [
                    {"seq": seq, "p": self.names.partition_of(ev.decode(bytes(data)).aggregate_id)}
                    for seq, data in rows
                ],
            )

    def _by_partition(self, rows: list[Any]) -> dict[int, list[Any]]:
        """Rows grouped by partition, each group in ``seq`` order."""
        if self._leases is None:
            return {0: rows}
        groups: dict[int, list[Any]] = {}
        for row in rows:
            groups.setdefault(row[5], []).append(row)
        return groups

    # -- publishing -------------------------------------------------------------------

    def publish_batch(self) -> int:
        """Publish up to ``batch_size`` rows; return how many. Raises if Redis is down.

        With ``repair``, a loss found first is repaired first; an idle outbox is
        checked every ``verify_every_s``. Partitioned: only the held partitions'
        rows, one script per partition in one pipeline; a partition whose lease
        turns out lost is dropped and its rows are left to its holder.
        """
        if not self._partition_count_claimed:
            claim_partition_count(self.client, self.names)  # PartitionCountMismatch
            self._partition_count_claimed = True
        held = self.sync_leases()
        if not held:
            return 0
        rows = self._unpublished_rows(held)
        if not rows:
            if self.repair and self.clock.now() >= self._next_verify:
                self.verify()
            return 0
        if self.wait_fsync and not self._durability_checked:
            self.check_durability()
        groups = self._by_partition(rows)
        error: Exception | None = None
        if self._leases is None and not self.repair:
            published = {0: self._publish_plain(rows)}
        else:
            published, error = self._publish_checked(groups)
        if published:
            self._last_publish_at = self.clock.now()
            self._published(self.stats.batches + 1)
            self._mark(groups, published)
        if error is not None:  # after marking what did go out (a cluster node failed)
            raise error
        if published:
            self.stats.batches += 1
            if self.stats.batches % self.trim_every == 0:
                self.trim()
        return sum(len(groups[p]) for p in published)

    def _published(self, batch_no: int) -> None:
        """Called between a batch's XADDs and its mark in SQL: a seam where the lab's
        fault injection (:mod:`simulations.faults`) kills the relay."""

    def _mark(self, groups: dict[int, list[Any]], published: dict[int, list[str]]) -> None:
        """Mark the published rows with their ids; expect those ids of their streams."""
        marks = [
            (row[0], sid)
            for p, ids in published.items()
            for row, sid in zip(groups[p], ids, strict=True)
        ]
        with self.store.begin() as conn:
            mark_published(conn, self.clock.now(), marks)
        for p, ids in published.items():
            expected = self._expected.get(p)
            if expected is not None:
                # Only each stream's last id counts: walk back until every stream is seen.
                seen: set[int] = set()
                for row, sid in zip(reversed(groups[p]), reversed(ids), strict=True):
                    i = self._index[row[2]]
                    if i not in seen:
                        seen.add(i)
                        expected[i] = parse(sid)
                        if len(seen) == len(expected):
                            break
        self.stats.published += len(marks)

    def _entry_ids(self, rows: list[Any], partition: int = 0) -> list[str]:
        """Each row's entry id: ``*`` (Redis' clock), or, with ``ids_on_clock``, the
        next id after its stream's last on the relay's clock (simulation time)."""
        if not self.ids_on_clock:
            return ["*"] * len(rows)
        last = list(self._expected_ids(partition))
        now = now_ms(self.clock)
        ids = []
        for row in rows:
            i = self._index[row[2]]
            last[i] = next_id(last[i], now)
            ids.append(str(last[i]))
        return ids

    def _publish_plain(self, rows: list[Any]) -> list[str]:
        pipe = self.client.pipeline(transaction=False)
        stream = self.names.stream
        for (_, event_id, aggregate, type_, data), id_ in zip(
            rows, self._entry_ids(rows), strict=True
        ):
            fields = {"event_id": event_id, "type": type_, "data": data}
            pipe.xadd(stream(aggregate), fields, id=id_)  # type: ignore[arg-type]
        return [text(i) for i in self._send(pipe)]

    def _publish_checked(
        self, groups: dict[int, list[Any]]
    ) -> tuple[dict[int, list[str]], Exception | None]:
        """XADD each partition's rows through the checking script, repairing first
        where needed; return the ids per published partition, and the first error
        a partition's script met (the others still went out)."""
        pending = {p: self._rows_argv(p, rows) for p, rows in groups.items()}
        published: dict[int, list[str]] = {}
        error: Exception | None = None
        while pending:
            retry = {}
            for p, reply in self._scripts(pending).items():
                if isinstance(reply, Exception):
                    error = error or reply
                elif int(reply[0]) == _PUBLISHED:
                    published[p] = [text(i) for i in reply[1:]]
                elif int(reply[0]) == _NOT_MINE:
                    self._lost_lease(p)
                elif self._repaired(self._losses(reply, p)):
                    retry[p] = pending[p]  # then try again: it must pass now
            pending = retry
        return published, error

    def _rows_argv(self, partition: int, rows: list[Any]) -> list[Any]:
        argv: list[Any] = []
        index = self._index
        for row, id_ in zip(rows, self._entry_ids(rows, partition), strict=True):
            _, event_id, aggregate, type_, data = row[:5]
            argv += (index[aggregate] + 1, id_, event_id, type_, data)
        return argv

    def verify(self) -> list[Loss]:
        """Check every held partition's streams against what was published; repair
        what Redis lost."""
        self._next_verify = self.clock.now() + self.verify_every_s
        held = self.sync_leases()
        if not held:
            return []
        losses: list[Loss] = []
        error: Exception | None = None
        for p, reply in self._scripts({p: [] for p in sorted(held)}).items():
            if isinstance(reply, Exception):
                error = error or reply
            elif int(reply[0]) == _NOT_MINE:
                self._lost_lease(p)
            elif int(reply[0]) == _BEHIND:
                found = self._losses(reply, p)
                losses += found
                self._repaired(found)
        if error is not None:
            raise error
        return losses

    def _scripts(
        self, calls: dict[int, list[Any]], *, check: bool = True, fsync: bool = True
    ) -> dict[int, Any]:
        """Run the checked-XADD script once per partition (``argv``: its rows), all
        in one pipeline; return each partition's reply, or the error it raised.

        ``check=False`` skips the streams' check (the repair's own XADDs); the
        lease check runs always. On a cluster the pipeline sends each script to
        its partition's slot (EVALSHA is routed by its keys).
        """
        if not self._sha:
            self._sha = self.client.script_load(_CHECKED_XADD_LUA)
        member = self.name if self._leases is not None else ""
        replies: dict[int, Any] = {}
        pending = calls
        for _attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            for p, argv in pending.items():
                keys = self._script_keys(p)
                expected = self._expected_args(p) if check else ["0-0"] * len(AGGREGATE_TYPES)
                queue_script(pipe, self.client, self._sha, keys, member, *expected, *argv)
            sent = self._send(pipe, fsync=fsync, raise_on_error=False)
            replies.update(zip(pending, sent, strict=True))
            pending = {
                p: calls[p]
                for p in pending
                if isinstance(replies[p], redis.exceptions.NoScriptError)
            }
            if not pending:
                break
            # A restarted Redis (or a new master) forgot the script; those wrote nothing.
            self._sha = self.client.script_load(_CHECKED_XADD_LUA)
        return replies

    def _expected_args(self, partition: int) -> list[str]:
        if not self.repair:  # no check (partitioned relays still fence)
            return ["0-0"] * len(AGGREGATE_TYPES)
        return [str(e) for e in self._expected_ids(partition)]

    def _send(
        self, pipe: redis.client.Pipeline, *, fsync: bool = True, raise_on_error: bool = True
    ) -> list[Any]:
        """Run the pipeline and return its replies; in the durable mode follow it
        with WAITAOF, in the same pipeline, so on the same connection."""
        if not (self.wait_fsync and fsync):
            return execute(self.client, pipe, raise_on_error=raise_on_error)
        pipe.execute_command("WAITAOF", 1, 0, self.fsync_timeout_ms)
        *replies, waited = execute(self.client, pipe, raise_on_error=raise_on_error)
        if isinstance(waited, Exception):
            raise waited
        if int(waited[0]) < 1:
            self.stats.fsync_timeouts += 1
            raise NotFsynced(
                f"WAITAOF: the AOF was not fsynced within {self.fsync_timeout_ms} ms; "
                "the batch stays unpublished and goes out again"
            )
        return replies

    def check_durability(self) -> None:
        """Raise :class:`DurabilityUnavailable` unless the server can confirm fsyncs."""
        if isinstance(self.client, RedisCluster):
            raise DurabilityUnavailable(
                "the durable mode (WAITAOF) is single-server only: on Redis Cluster a batch "
                "goes to several masters and one connection's WAITAOF vouches for one of them"
            )
        version = server_version(self.client)
        if version < (7, 2):
            raise DurabilityUnavailable(
                f"the durable mode needs WAITAOF (Redis >= 7.2 or Valkey); this server "
                f"reports {'.'.join(map(str, version))} (try WORKBENCH_REDIS_SERVER=valkey)"
            )
        if int(self.client.info("persistence").get("aof_enabled", 0)) != 1:
            raise DurabilityUnavailable(
                "the durable mode needs the AOF on (appendonly yes): WAITAOF confirms its fsync"
            )
        self._durability_checked = True

    # -- repair -----------------------------------------------------------------------

    def _expected_ids(self, partition: int = 0) -> list[StreamId]:
        expected = self._expected.get(partition)
        if expected is None:
            self._load_expected()
            expected = self._expected[partition]
        return expected

    def _load_expected(self) -> None:
        """What each partition's streams must hold at least, for every partition not
        known yet: the stream id of the last published row per (partition, aggregate
        type), in one pass over the outbox (a query per stream would scan it per stream)."""
        partitioned = self._leases is not None
        part = outbox.c.partition if partitioned else literal(0)
        ms, seq = _id_parts(self.store.dialect)
        # The largest id per stream, not the id of the largest seq (see the module
        # docstring: on PostgreSQL they differ when commits overtake each other):
        # each stream's largest ms, then the largest seq within it (two passes, no sort).
        groups = [outbox.c.stream, *([outbox.c.partition] if partitioned else [])]
        newest_ms = (
            select(outbox.c.stream, part.label("partition"), func.max(ms).label("ms"))
            .where(outbox.c.stream_id.is_not(None))
            .group_by(*groups)
            .subquery()
        )
        same = [outbox.c.stream == newest_ms.c.stream, ms == newest_ms.c.ms]
        if partitioned:
            same.append(outbox.c.partition == newest_ms.c.partition)
        query = (
            select(newest_ms.c.stream, newest_ms.c.partition, newest_ms.c.ms, func.max(seq))
            .join(newest_ms, and_(*same))
            .where(outbox.c.stream_id.is_not(None))
            .group_by(newest_ms.c.stream, newest_ms.c.partition, newest_ms.c.ms)
        )
        with self.store.read() as conn:
            found = {(a, p): StreamId(int(m), int(q)) for a, p, m, q in conn.execute(query)}
        for p in self.names.partitions:
            if p not in self._expected:
                self._expected[p] = [found.get((a, p), ZERO) for a in AGGREGATE_TYPES]

    def _published_where(self, aggregate: str, partition: int) -> Any:
        """The WHERE of a partition stream's published rows (partitioned: rows that
        carry the partition; unpartitioned: every row of the aggregate type)."""
        where = [outbox.c.stream == aggregate, outbox.c.stream_id.is_not(None)]
        if self._leases is not None:
            where.append(outbox.c.partition == partition)
        return where

    def _losses(self, reply: list[Any], partition: int = 0) -> list[Loss]:
        expected = self._expected_ids(partition)
        out = []
        for i in range(1, len(reply), 2):
            k = int(reply[i]) - 1
            out.append(Loss(AGGREGATE_TYPES[k], parse(text(reply[i + 1])), expected[k], partition))
        return out

    def _repaired(self, losses: list[Loss]) -> bool:
        """Repair ``losses`` (one partition's); False if its lease was lost meanwhile."""
        try:
            self._repair(losses)
        except _LeaseLost:
            self._lost_lease(losses[0].partition)
            return False
        return True

    def _repair(self, losses: list[Loss]) -> None:
        """Put the published rows each stream (of one partition) lost back, with
        their original ids, in an order they could have been published in
        (:func:`_in_publish_order`); then expect of each stream what it now holds.
        Raises :class:`_LeaseLost` if the partition's lease is found another
        relay's (partitioned: the put-back XADDs are fenced too)."""
        started = time.perf_counter()
        partition = losses[0].partition
        self.stats.repairs += 1
        self.losses += losses
        lost: list[Any] = []
        for loss in losses:
            lost += self._lost_rows(loss)
        lost = _in_publish_order(lost)
        for start in range(0, len(lost), self.batch_size):
            argv: list[Any] = []
            for row in lost[start : start + self.batch_size]:
                _, event_id, aggregate, type_, data, sid, _ = row
                argv += (self._index[aggregate] + 1, sid, event_id, type_, data)
            [reply] = self._scripts({partition: argv}, check=False, fsync=False).values()
            if isinstance(reply, Exception):
                raise reply
            if int(reply[0]) == _NOT_MINE:
                raise _LeaseLost(partition)
        expected = self._expected_ids(partition)
        for loss in losses:
            put_back = [parse(row[5]) for row in lost if row[2] == loss.aggregate]
            expected[self._index[loss.aggregate]] = max([loss.found, *put_back])
        self.stats.repaired += len(lost)
        self.stats.repair_seconds = time.perf_counter() - started
        log.warning(
            "relay: Redis lost acknowledged entries (%s); put %d rows back in %.3f s",
            ", ".join(
                f"{self.names.stream(x.aggregate, x.partition)} at {x.found}, "
                f"published up to {x.expected}"
                for x in losses
            ),
            len(lost),
            self.stats.repair_seconds,
        )

    def _lost_rows(self, loss: Loss) -> list[Any]:
        """Published rows of the stream whose id is after ``loss.found``.

        Chosen by id (compared in SQL), not by ``seq``: ids need not grow with
        ``seq`` (see the module docstring). Rows older than the retention window
        are left out (retention would trim them again), as are rows published
        before the outbox recorded ids (after the last row Redis still has, by
        ``seq``); both are counted.
        """
        if self.ids_on_clock:  # retention is in stream-id time: the clock ids come from
            now = now_ms(self.clock)
        else:
            seconds, micros = self.client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
        floor = StreamId(now - int(self.retention_s * 1000), 0)
        where = [outbox.c.stream == loss.aggregate, outbox.c.published_at.is_not(None)]
        if self._leases is not None:
            where.append(outbox.c.partition == loss.partition)
        ms, seq = _id_parts(self.store.dialect)
        after = or_(ms > loss.found.ms, and_(ms == loss.found.ms, seq > loss.found.seq))
        query = select(
            outbox.c.seq,
            outbox.c.event_id,
            outbox.c.stream,
            outbox.c.type,
            outbox.c.data,
            outbox.c.stream_id,
        ).where(*where, outbox.c.stream_id.is_not(None), after)
        rows = []
        with self.store.read() as conn:
            for row in conn.execute(query):
                if parse(row.stream_id) < floor:
                    self.stats.unrepairable += 1
                    continue
                rows.append((*row, ev.decode(bytes(row.data)).escrow_id))
            self.stats.unrepairable += self._unrecorded_since(conn, loss, where)
        return rows

    def _unrecorded_since(self, conn: Any, loss: Loss, where: list[Any]) -> int:
        """Published rows without a recorded id (published before the outbox kept
        ids) after the rows Redis still has, by ``seq`` (all of them when the
        stream lost everything)."""
        found_seq = 0
        if loss.found != ZERO:
            ms, seq = _id_parts(self.store.dialect)
            kept = or_(ms < loss.found.ms, and_(ms == loss.found.ms, seq <= loss.found.seq))
            at = conn.execute(
                select(func.max(outbox.c.seq)).where(*where, outbox.c.stream_id.is_not(None), kept)
            ).scalar()
            found_seq = at or 0
        return int(
            conn.execute(
                select(func.count()).where(
                    *where, outbox.c.stream_id.is_(None), outbox.c.seq > found_seq
                )
            ).scalar()
        )

    # -- the loop ---------------------------------------------------------------------

    def drain(self) -> int:
        """Publish until the outbox (partitioned: of the held partitions) is empty;
        return how many rows went out.

        A batch that comes back short of ``batch_size`` held every row there
        was, so no empty read follows it.
        """
        total = 0
        while True:
            count = self.publish_batch()
            total += count
            if count < self.batch_size:
                return total

    def trim(self) -> int:
        """Trim the held partitions' streams to the retention window (behind every group)."""
        trimmed = 0
        for stream in self.names.streams(partitions=tuple(sorted(self.held))):
            result = trim(
                self.client,
                stream,
                retention_s=self.retention_s,
                now_ms=now_ms(self.clock) if self.ids_on_clock else None,
            )
            if result.held_by_groups:
                log.info("retention of %s held back by an unacked group", result.stream)
            trimmed += result.trimmed
        self.stats.trimmed += trimmed
        return trimmed

    def stop(self) -> None:
        self._stop.set()

    def run(self, idle_wait: float = 0.05) -> None:
        """Publish until :meth:`stop`; back off with jitter while Redis is down.

        On the way out it gives its leases back (partitioned), so the other relays
        take its partitions at their next sync instead of after ``lease_s``.
        """
        backoff = outage_backoff()
        failures = 0
        while not self._stop.is_set():
            try:
                self.heartbeat()
                published = self.publish_batch()
                failures = 0
            except Exception as exc:
                if not transient(exc):
                    raise
                failures += 1
                self.stats.redis_errors += isinstance(exc, REDIS_DOWN) or refused(exc)
                log.warning("relay: %s; retrying", exc)
                self._stop.wait(backoff.compute(failures))
                continue
            if not published:
                self._stop.wait(idle_wait)
        try:  # a clean exit is not a death
            self.client.hdel(self.names.heartbeats("relay"), self.name)
            if self._leases is not None:
                self._leases.give_all()
        except Exception as exc:
            if not transient(exc):
                raise
            # Redis down or refusing: the beat goes stale, the leases expire on their own.
            log.warning("relay: could not leave cleanly: %s", exc)


def _id_parts(dialect: str) -> tuple[Any, Any]:
    """``outbox.stream_id`` (``<ms>-<seq>`` text) as two integer SQL expressions,
    so that ids compare and sort as ids (as text, ``9-0`` would sort after ``10-0``)."""
    sid = outbox.c.stream_id
    if dialect == "postgresql":
        return (
            cast(func.split_part(sid, "-", 1), BigInteger),
            cast(func.split_part(sid, "-", 2), BigInteger),
        )
    dash = func.instr(sid, "-")
    return (
        cast(func.substr(sid, 1, dash - 1), BigInteger),
        cast(func.substr(sid, dash + 1), BigInteger),
    )


def _in_publish_order(rows: list[Any]) -> list[Any]:
    """Lost rows ``(seq, event_id, stream, type, data, stream_id, escrow_id)`` in an
    order the relay could have published them in: each stream's by id (as XADD
    needs) and each escrow's by ``seq`` (as its commands committed), the smallest
    ``seq`` first among the rows both allow. Put back in that order, a repair done
    in several scripts shows readers, between two scripts, what they could have
    seen the first time. (No clock: ``published_at`` is whichever relay's.)"""
    by_stream: dict[str, list[Any]] = {}
    by_escrow: dict[str, list[Any]] = {}
    for row in sorted(rows, key=lambda row: row[0]):
        by_escrow.setdefault(row[6], []).append(row)
    for row in sorted(rows, key=lambda row: parse(row[5])):
        by_stream.setdefault(row[2], []).append(row)
    streams = {name: deque(queue) for name, queue in by_stream.items()}
    escrows = {escrow: deque(queue) for escrow, queue in by_escrow.items()}
    ordered: list[Any] = []
    while len(ordered) < len(rows):
        heads = [queue[0] for queue in streams.values() if queue]
        ready = [row for row in heads if escrows[row[6]][0] is row]
        # The original publish order satisfies both orders, so one is always ready;
        # were none (rows not from one history), the smallest seq goes, by id in its stream.
        row = min(ready or heads, key=lambda row: row[0])
        streams[row[2]].popleft()
        escrows[row[6]].remove(row)
        ordered.append(row)
    return ordered
