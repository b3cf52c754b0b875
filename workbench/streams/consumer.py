"""The consumer-group runtime: at-least-once delivery to idempotent handlers.

A :class:`ConsumerWorker` reads a batch with XREADGROUP from every aggregate
stream its handler wants, decodes it, hands the events to the handler in one
call, and XACKs only after the handler returned (its effect is durable by
then: SQL handlers commit the effect and the inbox row together). Then:

* **Own pending first.** On start, and after any failure, the worker re-reads
  its own pending entries and handles them together with the new ones (``>``)
  read right after, in order (:func:`ready_to_handle`). A re-read is a new
  delivery only when it is another attempt at the entries: on start (the
  process before may have died of them), for a retry after handler failures
  and after a claim it reads from id ``0``, which Redis counts. After an
  outage, a Redis restart or a reconnect it reads them as they are, in one
  script per stream (XPENDING, XCLAIM ``JUSTID`` to itself to reset their idle
  time, XRANGE), so outages do not use up an entry's ``max_deliveries``.
* **Dead consumers.** Each worker writes a heartbeat (its clock's time) to a
  hash. A consumer whose heartbeat is older than ``dead_after_s`` is dead: its
  pending entries are XCLAIMed by a live one. As a backstop, entries idle in
  Redis longer than ``claim_idle_ms`` are XAUTOCLAIMed whoever owns them; a
  low value would steal from slow but live consumers, so it is long.
* **Poison.** A failing entry stays pending and is retried after
  ``retry_backoff_s``. When it has been delivered ``max_deliveries`` times it
  goes to the group's dead-letter stream with the reason, and is acked on the
  source in the same MULTI, so the group keeps moving.
* **Poison that kills.** An entry can kill its consumer instead of failing (a
  crash in a C extension, memory exhausted): no handler error is ever seen, and
  every restart would die on it again. So what a consumer re-reads after a
  possible death (its process is new, or it claimed a dead one's entries) is
  *suspect*, and each suspect is handled alone and acked at once. Before, one
  script (:data:`_BEGIN_ALONE_LUA`) marks it in the group's crash hash
  (``StreamNames.crashes``) with this worker's token: a mark left by another
  token is a consumer that began to handle the entry alone and never finished,
  a death, and is counted; its own mark (a retry after an outage, a command
  sent again) counts nothing, so the count needs no taking back. A handler that
  returns, raising or not, deletes the mark before the ack (a death after it is
  not the entry's doing); a stop leaves it neutral. The
  entry found with ``max_crashes`` deaths goes to the dead letters unhandled
  (:func:`~workbench.streams.decisions.killed_its_consumers`). Its batch-mates
  were handled alone and acked before it, so the deaths are not theirs. A
  handling that outlasts ``dead_after_s`` looks the same to the consumer that
  claims it: an entry that stalls every consumer that takes it is dead-lettered
  as well. Only entries met after a death pay for this (two round trips more
  each).
* **Redis lost data.** A redis-server restarted from an AOF that lacks its
  last writes (see :mod:`workbench.streams.relay`) has regressed group state: entries
  acked before the loss may be pending again, under this consumer. The
  worker re-reads its own pending before handling anything new when a read
  was served over a new connection (redis-py's retry can hide a reconnect)
  and, as a backstop, when its recovery pass sees a new server ``run_id``;
  ``>`` re-delivers what the group's regressed position no longer covers, and
  the relay's repair puts lost entries back under their original ids. A group
  that is gone (FLUSHALL, a deleted stream) answers NOGROUP: the worker
  recreates it from ``0`` and re-reads every retained entry. The handlers'
  inboxes make all of this redelivery harmless.
* **Deleted while pending** (trimmed, XDEL): Redis 7 reports such ids from
  XAUTOCLAIM and drops them; Redis 6.2 returns nil entries and keeps them
  pending. Both end acked and counted in ``stats.deleted``.

**Partitions.** With ``StreamNames(prefix, Partitioning(P))`` the group's
consumers share the ``P`` partitions (:mod:`workbench.streams.leases`): with
each heartbeat (and at setup) a worker reads the group's heartbeats, computes
its target partitions from the live members (:func:`~workbench.streams.leases.assign`)
and moves towards them through lease keys that expire ``dead_after_s`` after
their last renewal, on the worker's clock. It reads only the partitions it
holds, so one escrow is read by one consumer at a time, and:

* a partition that is no longer its target is **given back** at the next
  heartbeat. Every batch is handled and acked within the poll that read it,
  so by then all it read from the partition is handled and acked, except
  entries held back for order and failed entries waiting for a retry: those
  stay pending under its name, and
* a worker that **takes** a partition first XCLAIMs every other consumer's
  pending entries in its streams (a previous holder that gave it back, or
  died) and handles them together with, and in escrow order before, its first
  new entries of it: per-escrow order holds across the handover.

Within a batch the hold-back for order applies per partition
(:func:`~workbench.streams.decisions.ready_by_partition`); a dead letter goes
to its partition's dead-letter stream, in one script with the XACK (one slot).
On a single redis-server one XREADGROUP covers every held stream. On a Redis
Cluster (``redis.cluster.RedisCluster``) a command may touch one slot only, so
the worker reads each held partition in one pipeline of non-blocking
XREADGROUPs and, when all came back empty, blocks on one partition in rotation
for at most ``partition_block_ms``: an entry of another partition waits at most
that long (plus a round trip) before it is read. Unpartitioned, there are no
leases and the keys and reads are those of a single partition.

A worker that stops beating for ``dead_after_s`` (a handler call that long, a
paused process) loses its leases as it would be declared dead without
partitions: its partitions' next holders claim its pending entries and the
inboxes absorb the double handling.

The decisions (what to handle now, whom to claim from, what to dead-letter) are
pure functions in :mod:`workbench.streams.decisions`; the class is the thin
Redis loop around them, and ``poll()`` is one step of it, so a simulation can
drive it at virtual instants.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
from redis.cluster import RedisCluster

from workbench.domain import events as ev
from workbench.domain.clock import Clock, SystemClock, now_ms
from workbench.domain.events import Event
from workbench.ops.shutdown import StopRequest
from workbench.streams.append import XADD_AT_LUA
from workbench.streams.connection import (
    REDIS_DOWN,
    SOCKET_TIMEOUT_S,
    execute,
    on_slot_of,
    outage_backoff,
    packed,
    refused,
    transient,
)
from workbench.streams.decisions import (
    Delivery,
    blocking_partition,
    dead_consumers,
    field_pairs,
    group_gone,
    killed_its_consumers,
    newly_taken,
    ready_by_partition,
    reconnected,
    should_dead_letter,
    to_give_back,
)
from workbench.streams.groups import claim_partition_count, ensure_groups
from workbench.streams.keys import StreamNames
from workbench.streams.leases import Leases, assign, live_members
from workbench.streams.replies import text

log = logging.getLogger(__name__)
#: KEYS: the dead-letter stream, the source stream (one slot); ARGV: now_ms ('' for
#: Redis' clock), group, entry id, then the dead letter's fields. Appends the dead
#: letter and acks its source atomically.
_DEAD_LETTER_LUA = XADD_AT_LUA + (
    "redis.call('XADD', KEYS[1], next_id(KEYS[1], ARGV[1]), unpack(ARGV, 4))\n"
    "return redis.call('XACK', KEYS[2], ARGV[2], ARGV[3])"
)


#: KEYS: a group's crash hash; ARGV: the entry's field, this worker's token, the
#: hash's time to live (s). Returns the deaths on record: the count held, plus one
#: when its mark is another worker's (it began to handle the entry alone and never
#: finished), not when it is ours (a retry; a command sent twice) or neutral ("-",
#: left by a stop); then marks the entry with the deaths and our token.
_BEGIN_ALONE_LUA = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local deaths = 0
if held then
  local at = string.find(held, ':', 1, true)
  local token = string.sub(held, at + 1)
  deaths = tonumber(string.sub(held, 1, at - 1))
  if token ~= ARGV[2] and token ~= '-' then deaths = deaths + 1 end
end
redis.call('HSET', KEYS[1], ARGV[1], deaths .. ':' .. ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return deaths
"""

#: How long a group's crash hash outlives its last use: marks left behind (a
#: process killed between an entry's ack and the mark's removal) go with it.
_CRASHES_TTL_S = 7 * 24 * 3600


#: KEYS: a stream; ARGV: group, consumer, start ('-' or an exclusive '(id'), count.
#: A page of the consumer's own pending entries as they are: [id, times delivered,
#: fields or false (deleted while pending)], each XCLAIMed to the same consumer with
#: JUSTID on the way (its idle time reset, as a delivery resets it, but not counted).
#: One script: between the XPENDING and the XCLAIM nobody can claim an entry, which
#: an XCLAIM with min-idle 0 would otherwise take back from whoever just did.
_OWN_PENDING_LUA = """
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], '+', ARGV[4], ARGV[2])
local page = {}
for i, row in ipairs(rows) do
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, row[1], 'JUSTID')
  local found = redis.call('XRANGE', KEYS[1], row[1], row[1])
  page[i] = {row[1], row[4], found[1] and found[1][2] or false}
end
return page
"""


def _send_and_read(conn: Any, args: list[Any]) -> Any:
    """One command on ``conn``, its reply as parsed by redis-py's parser only (an
    error reply raises; a failed read has already disconnected ``conn``)."""
    conn.send_packed_command(packed(conn, [args]))
    return conn.read_response()


def _send_and_read_after(conn: Any, first: list[Any], args: list[Any]) -> Any:
    """``first`` then ``args`` in one write on ``conn`` (one round trip); the reply
    to ``args``. Both replies are read before an error reply to ``first`` is raised,
    so the connection is left with nothing unread."""
    conn.send_packed_command(packed(conn, [first, args]))
    error: redis.ResponseError | None = None
    try:
        conn.read_response()
    except redis.ResponseError as exc:
        error = exc
    reply = conn.read_response()
    if error is not None:
        raise error
    return reply


class Handler(Protocol):
    """What a consumer group does with events. No Redis in here.

    ``handle`` must be idempotent per event id and must make its effect
    durable before returning: the runtime acks as soon as it returns.
    """

    group: str
    aggregate_types: tuple[str, ...]

    def handle(self, events: list[Event]) -> None: ...


@dataclass(frozen=True)
class ConsumerSettings:
    batch_size: int = 500
    block_ms: int = 1000
    max_deliveries: int = 5
    # Deaths of its consumer while it was handled alone before an entry is dead-lettered
    # (two such entries in a row cost 1 + 2 * 2 deaths: under serve's --restart-limit).
    max_crashes: int = 2
    retry_backoff_s: float = 1.0
    heartbeat_every_s: float = 1.0
    dead_after_s: float = 10.0
    recover_every_s: float = 2.0
    claim_idle_ms: int = 60_000
    claim_guard_ms: int = 0
    # Simulations: dead letters get ids on the worker's clock, and the idle backstop
    # judges an entry by its id's age on that clock (Redis' idle time is wall time).
    ids_on_clock: bool = False
    # A partitioned log on a Redis Cluster: the longest a read blocks on one partition
    # while the others' new entries wait (see the module docstring).
    partition_block_ms: int = 100

    def __post_init__(self) -> None:
        if self.block_ms >= SOCKET_TIMEOUT_S * 1000:
            raise ValueError(
                f"block_ms={self.block_ms} must stay below the socket timeout "
                f"({SOCKET_TIMEOUT_S * 1000:.0f} ms) or reads time out"
            )
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        if self.max_crashes < 1:
            raise ValueError("max_crashes must be at least 1")
        if self.partition_block_ms < 1:
            raise ValueError("partition_block_ms must be at least 1")


@dataclass
class ConsumerStats:
    read: int = 0
    handled: int = 0
    acked: int = 0
    failed: int = 0
    dead_lettered: int = 0
    claimed: int = 0
    deleted: int = 0
    isolated: int = 0  # handler calls with a suspect alone (see "Poison that kills")
    batches: int = 0
    redis_errors: int = 0
    partitions_taken: int = 0
    partitions_given: int = 0
    delivery_counts: dict[int, int] = field(default_factory=dict)


class ConsumerWorker:
    """One consumer of one group; ``run()`` in a process, ``poll()`` from tests or SimPy."""

    def __init__(
        self,
        client: redis.Redis,
        handler: Handler,
        *,
        consumer: str | None = None,
        names: StreamNames | None = None,
        settings: ConsumerSettings | None = None,
        clock: Clock | None = None,
        observer: Callable[[list[Delivery], float], None] | None = None,
    ) -> None:
        self.client = client
        self.handler = handler
        self.group = handler.group
        self.consumer = consumer or f"{handler.group}-{os.getpid()}"
        self.names = names or StreamNames()
        self.settings = settings or ConsumerSettings()
        self.clock = clock or SystemClock()
        #: Every stream of the handler's aggregate types, in every partition (the
        #: group is created on all of them); ``reading`` says which are read now.
        self.streams = self.names.streams(handler.aggregate_types)
        self._partition_of = {
            stream: p for p in self.names.partitions for stream in self._streams_of((p,))
        }
        self._cluster = isinstance(client, RedisCluster)
        self._leases: Leases | None = None
        if self.names.partitioned:
            keys = [self.names.lease(self.group, p) for p in self.names.partitions]
            self._leases = Leases(client, keys, self.consumer, self.settings.dead_after_s)
        self.reading: tuple[int, ...] = () if self._leases else (0,)
        self._read_streams = self._streams_of(self.reading)
        # Partitions held whose takeover (claiming what others left pending) has not
        # yet succeeded: not read until it has, or new entries would pass older ones.
        self._taking: set[int] = set()
        self._turn = 0  # which partition a cluster read blocks on next
        self._dead_letter_script = client.register_script(_DEAD_LETTER_LUA)
        self._own_pending_script = client.register_script(_OWN_PENDING_LUA)
        self._begin_alone_script = client.register_script(_BEGIN_ALONE_LUA)
        #: Marks what this worker handles alone (see "Poison that kills"): new per
        #: worker, random (a restarted process may get the same pid).
        self.token = secrets.token_hex(8)
        self.stats = ConsumerStats()
        self.observer = observer  # told of each batch before the handler runs
        self._stop = StopRequest()
        self._reread_own_at: float | None = None  # None: no own pending to revisit
        self._redeliver = False  # that re-read is another attempt: let Redis count it
        self._suspect_reread = False  # and its entries may have killed a consumer
        # (stream, entry id) of re-read entries a consumer may have died handling, until
        # handled alone: see "Poison that kills".
        self._suspects: set[tuple[str, str]] = set()
        self._held: list[Delivery] = []  # read, pending, not yet safe to handle in order
        self._next_heartbeat = 0.0
        # A heartbeat due (its clock reading) that rides ahead of the poll's next
        # command in the same write: unpartitioned, on one redis-server only.
        self._beat: float | None = None
        self._next_recovery = 0.0
        self._run_id: str | None = None  # of the server at the last recovery pass
        # The connection of the last new-entry read, and the count of connects seen then
        # (see ``_read_raw``): a read on another one, or after a reconnect, may be
        # served by a restarted Redis.
        self._read_conn: Any = None
        self._hooked_conn: Any = None  # the last connection _connected was registered on
        self._connects = 0
        self._connects_seen = 0
        self._reconnected = False
        self._ready = False

    # -- setup ---------------------------------------------------------------------

    def setup(self) -> None:
        claim_partition_count(self.client, self.names)
        ensure_groups(self.client, self.streams, self.group)
        self._heartbeat(force=True)  # and, partitioned, take the first partitions
        self._reread_own_at = self.clock.now()  # own pending before new entries
        self._redeliver = self._suspect_reread = True  # the process before may have died of them
        self._ready = True

    def _streams_of(self, partitions: tuple[int, ...]) -> list[str]:
        return self.names.streams(self.handler.aggregate_types, partitions)

    # -- one step --------------------------------------------------------------------

    def poll(self, block_ms: int | None = None) -> int:
        """Do one step: heartbeat (partitioned: and rebalance), recover, own pending,
        new entries (and those held back before, see :func:`ready_to_handle`).
        Return entries read.

        If Redis (or the store) fails mid-step, the error propagates and whatever
        was read but not acked is re-read, as this consumer's pending, at the next
        step: every caller (``run``, a simulation's loop) gets the same recovery.
        """
        try:
            return self._poll(block_ms)
        except Exception as exc:
            if transient(exc):
                self._reread_own_at = self.clock.now()
            raise

    def _poll(self, block_ms: int | None) -> int:
        if not self._ready:
            self.setup()
        now = self.clock.now()
        self._heartbeat()
        read = 0
        if now >= self._next_recovery:
            self._next_recovery = now + self.settings.recover_every_s
            read += self._recover()
        if self._reread_own_at is not None and now >= self._reread_own_at:
            read += self._reread_own_pending()
        held = self._held
        block = 0 if held or block_ms is None else block_ms  # held entries are due now
        deliveries, truncated = self._read_new(block)
        if self._reconnected:
            # The read went over a new connection (redis-py retried it quietly):
            # Redis may have restarted with older group state, so re-read what is
            # pending for us (these entries included) and merge it with the next read.
            self._reread_own_pending()
            return read + len(deliveries)
        ready, self._held = ready_by_partition(held + deliveries, truncated, self._partition_of)
        if ready:
            self._process(ready)
        return read + len(deliveries)

    def drain(self, max_polls: int = 10_000) -> int:
        """Poll without blocking until a poll reads nothing; return entries read.

        Failed entries waiting for their retry backoff are not waited for: the
        caller moves the clock on and drains again.
        """
        total = 0
        for _ in range(max_polls):
            count = self.poll(block_ms=0)
            total += count
            if not count and not self._held:
                break
        return total

    # -- run forever ---------------------------------------------------------------

    def stop(self) -> None:
        """Finish the current batch, ack it, and return from :meth:`run`."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        self._stop.on_signals(signal.SIGTERM, signal.SIGINT)

    def run(self) -> None:
        """Poll until :meth:`stop`; then give back the partitions held (partitioned)."""
        backoff = outage_backoff()
        failures = 0
        while not self._stop.is_set():
            try:
                self.poll(block_ms=self.settings.block_ms)
                failures = 0
                if not self.reading:  # no partition of ours (yet): nothing to block on
                    self._stop.wait(self.settings.heartbeat_every_s)
            except Exception as exc:
                if isinstance(exc, redis.ResponseError) and group_gone(exc):
                    # Redis came back without our groups (no persistence, a FLUSHALL, a
                    # deleted stream): recreate them from 0 and re-read what is there.
                    log.warning("%s: %s; recreating the group", self.consumer, exc)
                    self._ready = False
                    continue
                if not transient(exc):
                    raise
                failures += 1
                self.stats.redis_errors += isinstance(exc, REDIS_DOWN) or refused(exc)
                log.warning("%s: %s; retrying", self.consumer, exc)
                self._stop.wait(backoff.compute(failures))
        if self._leases is not None:
            try:
                self._give_back(self._leases.held)
            except Exception as exc:
                if not transient(exc):
                    raise
                # Redis down or refusing: they expire on their own.
                log.warning("%s: could not give back partitions: %s", self.consumer, exc)

    # -- reading -------------------------------------------------------------------

    def _read_new(self, block_ms: int) -> tuple[list[Delivery], set[str]]:
        """New entries, and the streams whose read came back full (more may follow)."""
        blocked = self._read_streams  # the streams of the read that may have blocked
        if self._cluster and block_ms and len(self.reading) > 1:
            # One slot per command: every held partition without blocking, then, if
            # that found nothing, a short block on one of them in rotation.
            deliveries = self._read(">", 0)
            if deliveries:
                block_ms = 0
            else:
                partition = blocking_partition(self.reading, self._turn)
                self._turn += 1
                blocked = self._streams_of((partition,))
                block_ms = min(block_ms, self.settings.partition_block_ms)
                deliveries = self._read(dict.fromkeys(blocked, ">"), block_ms)
        else:
            deliveries = self._read(">", block_ms, check_connection=True)
        if len(self._read_streams) == 1:
            return deliveries, set()  # one stream is in order
        truncated = self._full_streams(deliveries)
        if block_ms and deliveries and len(blocked) > 1:
            # Redis < 7.2 serves a blocked multi-stream read with the entries of the
            # one stream that woke it. The relay's publish is atomic (one script), so
            # the other streams may already hold earlier events of the same batch:
            # read them too before handling anything.
            more = self._read(dict.fromkeys(blocked, ">"), 0)
            truncated |= self._full_streams(more)
            deliveries += more
        return deliveries, truncated

    def _full_streams(self, deliveries: list[Delivery]) -> set[str]:
        """Streams whose read came back full (more entries may follow)."""
        if len(deliveries) < self.settings.batch_size:
            return set()  # no stream can be full
        per_stream = Counter(d.stream for d in deliveries)
        return {s for s, n in per_stream.items() if n >= self.settings.batch_size}

    def _read(
        self, start: str | dict[str, str], block_ms: int, *, check_connection: bool = False
    ) -> list[Delivery]:
        """XREADGROUP of the held streams (or of ``start``'s); with ``check_connection``,
        also note (in ``_reconnected``) whether the connection that served it is
        another than, or was reconnected since, the last check's (not on a cluster:
        one connection per node)."""
        ids = start if isinstance(start, dict) else dict.fromkeys(self._read_streams, start)
        if not ids:
            return []  # no partition held
        if self._cluster:
            return self._deliveries(self._read_per_partition(ids, block_ms))
        return self._deliveries(self._read_raw(ids, block_ms, check_connection))

    def _read_raw(self, ids: dict[str, str], block_ms: int, check_connection: bool) -> Any:
        """XREADGROUP sent and read on a connection of the client's, the reply left
        as Redis sent it (redis-py would turn every entry into a dict: the loop needs
        only the id and the ``data`` field). Retried as redis-py retries a command
        (reconnect, send again); a reconnect is counted by :meth:`_connected`, so
        noticing it costs no round trip."""
        client = self.client
        args = self._xreadgroup(ids, block_ms)
        conn = client.connection
        lock = client.single_connection_lock if conn is not None else None
        if conn is None:
            conn = client.connection_pool.get_connection()
        else:
            lock.acquire()  # type: ignore[union-attr]
        try:
            if conn is not self._hooked_conn:  # redis-py's own check scans a list
                conn.register_connect_callback(self._connected)  # once per connection
                self._hooked_conn = conn
            beat = self._beat
            if beat is None:
                reply = conn.retry.call_with_retry(
                    lambda: _send_and_read(conn, args), lambda _error: conn.disconnect()
                )
            else:  # the poll's heartbeat goes first, in the same write
                hset = ["HSET", self.names.heartbeats(self.group), self.consumer, repr(beat)]
                reply = conn.retry.call_with_retry(
                    lambda: _send_and_read_after(conn, hset, args),
                    lambda _error: conn.disconnect(),
                )
                self._beat_sent(beat)
            if check_connection:
                self._reconnected = reconnected(
                    self._read_conn, self._connects_seen, conn, self._connects
                )
                self._read_conn, self._connects_seen = conn, self._connects
            return reply
        finally:
            if lock is None:
                client.connection_pool.release(conn)
            else:
                lock.release()

    def _connected(self, connection: Any) -> None:
        """redis-py's connect callback: a connection the worker reads on (re)connected."""
        self._connects += 1

    def _deliveries(self, reply: Any) -> list[Delivery]:
        """A read's entries: from a raw reply (``{stream: [[id, [name, value, ...]]]}``,
        or a list of ``[stream, entries]`` in RESP2) or a parsed one (fields as dicts)."""
        if not reply:
            return []
        deliveries: list[Delivery] = []
        for stream, entries in reply.items() if isinstance(reply, dict) else reply:
            name = text(stream)
            deliveries += [
                Delivery(name, entry_id.decode(), fields) for entry_id, fields in entries
            ]
        self.stats.read += len(deliveries)
        return deliveries

    def _read_per_partition(self, ids: dict[str, str], block_ms: int) -> list[Any]:
        """A cluster's XREADGROUP: one per partition (one slot each), in one pipeline
        unless a single partition is read, which alone may block."""
        by_partition: dict[int, dict[str, str]] = {}
        for stream, start in ids.items():
            by_partition.setdefault(self._partition_of[stream], {})[stream] = start
        if len(by_partition) == 1:
            [single] = by_partition.values()
            args = self._xreadgroup(single, block_ms)
            slot = on_slot_of(self.client, next(iter(single)))
            return list(self.client.execute_command(*args, **slot) or [])
        pipe = self.client.pipeline(transaction=False)
        for part in by_partition.values():
            args = self._xreadgroup(part, 0)
            pipe.execute_command(*args, **on_slot_of(self.client, next(iter(part))))
        return [stream for reply in pipe.execute() for stream in reply or []]

    def _xreadgroup(self, ids: dict[str, str], block_ms: int) -> list[Any]:
        """XREADGROUP's arguments for one partition's streams (sent to its slot's
        node: redis-py would ask the server where a read with ``STREAMS`` goes)."""
        block = ["BLOCK", block_ms] if block_ms else []
        return ["XREADGROUP", "GROUP", self.group, self.consumer,
                "COUNT", self.settings.batch_size, *block,
                "STREAMS", *ids, *ids.values()]  # fmt: skip

    def _reread_own_pending(self) -> int:
        """Re-read this consumer's pending entries, page by page, into ``_held``;
        return how many.

        They are not handled here: the poll merges them with a read of new
        entries and hands both to :func:`ready_to_handle`. Pending entries can sit
        beyond entries of another stream not delivered yet (a read cut short by
        ``batch_size`` held them back, then the worker or Redis restarted), and
        only the new read shows which of them are safe to handle now.

        When it is another attempt at them (``_redeliver``: a retry after handler
        failures is due, this process is new, or entries were just claimed), Redis
        counts it towards ``max_deliveries``; otherwise they are read as they are
        (:meth:`_pending_as_they_are`).
        """
        self._reread_own_at = None
        self._reconnected = False
        # The old _held is pending too: this covers it.
        redeliver = self._redeliver
        self._held = self._pending_redelivered() if redeliver else self._pending_as_they_are()
        pending = {(d.stream, d.entry_id) for d in self._held}
        # All of them, if a consumer may have died of them; of the suspects before,
        # those still pending here (the rest were acked, claimed or given back).
        self._suspects = pending if self._suspect_reread else self._suspects & pending
        # Only once done: a failed re-read is retried as it was.
        self._redeliver = self._suspect_reread = False
        return len(self._held)

    def _pending_redelivered(self) -> list[Delivery]:
        """Own pending entries delivered again (XREADGROUP from ``0``: counted)."""
        cursor = dict.fromkeys(self._read_streams, "0")
        pending: list[Delivery] = []
        while True:
            deliveries = self._read(cursor, 0)
            if deliveries:
                for d in deliveries:
                    cursor[d.stream] = d.entry_id
                self._fill_delivery_counts(deliveries)
                pending += deliveries
            if len(deliveries) < self.settings.batch_size:
                return pending

    def _pending_as_they_are(self) -> list[Delivery]:
        """Own pending entries with their delivery counts, not delivered again: a
        page of each stream at a time, read and XCLAIMed to ourselves (their idle
        time reset, so the idle backstop leaves them to us, without counting) in
        one script (:data:`_OWN_PENDING_LUA`); fields None: deleted while pending."""
        page = self.settings.batch_size
        pending: list[Delivery] = []
        for stream in self._read_streams:
            start = "-"
            while True:
                rows = self._own_pending_script(
                    keys=[stream], args=[self.group, self.consumer, start, page]
                )
                pending += [Delivery(stream, text(i), f or None, int(n)) for i, n, f in rows]
                if len(rows) < page:
                    break
                start = "(" + text(rows[-1][0])
        self.stats.read += len(pending)
        return pending

    def _fill_delivery_counts(self, deliveries: list[Delivery]) -> None:
        by_stream: dict[str, list[Delivery]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d)
        for stream, items in by_stream.items():
            rows = self.client.xpending_range(
                stream,
                self.group,
                items[0].entry_id,
                items[-1].entry_id,
                len(items) + 100,
                consumername=self.consumer,
            )
            counts = {text(r["message_id"]): int(r["times_delivered"]) for r in rows}
            for d in items:
                d.delivery_count = counts.get(d.entry_id, d.delivery_count)

    # -- recovery ------------------------------------------------------------------

    def _recover(self) -> int:
        """Claim entries from dead consumers (heartbeats) and long-idle ones (backstop),
        in the held partitions' streams."""
        streams = self._read_streams
        pipe = self.client.pipeline(transaction=False)  # one round trip, not 1 + streams
        beat = self._beat
        if beat is not None:  # the poll's heartbeat, before the heartbeats are read
            pipe.hset(self.names.heartbeats(self.group), self.consumer, repr(beat))
        pipe.hgetall(self.names.heartbeats(self.group))
        for stream in streams:
            pipe.xpending(stream, self.group)
        if not self._cluster:  # a cluster has a run_id per node, and fails over instead
            pipe.info("server")
        found = execute(self.client, pipe)
        if beat is not None:
            self._beat_sent(beat)
            found = found[1:]
        raw, *summaries = found
        if not self._cluster:
            self._check_run_id(summaries.pop())
        heartbeats = {text(k): float(v) for k, v in raw.items()}
        claimed_any = 0
        for stream, summary in zip(streams, summaries, strict=True):
            if not summary["pending"]:
                continue
            pending = {text(c["name"]): int(c["pending"]) for c in summary["consumers"]}
            for dead in dead_consumers(
                pending,
                heartbeats,
                me=self.consumer,
                now=self.clock.now(),
                dead_after_s=self.settings.dead_after_s,
            ):
                claimed_any += self._claim_from(stream, dead)
            claimed_any += self._autoclaim(stream)
        if claimed_any:
            # Another delivery of what was claimed (an XCLAIM JUSTID does not count it),
            # which may have killed the consumer it was claimed from.
            self._redeliver = self._suspect_reread = True
            self._reread_own_pending()  # handled with the poll's read of new entries
        return claimed_any

    def _check_run_id(self, server: dict[str, Any]) -> None:
        run_id = str(server.get("run_id", ""))
        if self._run_id is not None and run_id != self._run_id:
            # A restarted server: its group state may have regressed (lost acks).
            log.warning("%s: Redis restarted (new run_id); re-reading own pending", self.consumer)
            self._reread_own_at = self.clock.now()
        self._run_id = run_id

    def _claim_from(self, stream: str, dead: str) -> int:
        claimed = 0
        while True:
            rows = self.client.xpending_range(
                stream, self.group, "-", "+", self.settings.batch_size, consumername=dead
            )
            if not rows:
                break
            ids = [text(r["message_id"]) for r in rows]
            got = self.client.xclaim(
                stream, self.group, self.consumer, self.settings.claim_guard_ms, ids, justid=True
            )
            # Redis 7 drops entries deleted while pending from the PEL and the reply;
            # 6.2 claims them and the own-pending pass sees them without fields.
            missing = set(ids) - {text(i) for i in got}
            for entry_id in missing:
                if not self.client.xrange(stream, entry_id, entry_id):
                    self.stats.deleted += 1
            claimed += len(ids) - len(missing)
            if len(rows) < self.settings.batch_size:
                break
        if claimed:
            log.info(
                "%s claimed %d entries of dead consumer %s on %s",
                self.consumer,
                claimed,
                dead,
                stream,
            )
        self.stats.claimed += claimed
        remaining = self.client.xpending_range(stream, self.group, "-", "+", 1, consumername=dead)
        if not remaining:
            self.client.xgroup_delconsumer(stream, self.group, dead)
        return claimed

    def _autoclaim(self, stream: str) -> int:
        if self.settings.ids_on_clock:
            return self._claim_by_age(stream)
        reply = self.client.xautoclaim(
            stream,
            self.group,
            self.consumer,
            self.settings.claim_idle_ms,
            "0-0",
            count=self.settings.batch_size,
            justid=False,
        )
        entries = reply[1] if len(reply) > 1 else []
        deleted_ids = [text(i) for i in reply[2]] if len(reply) > 2 else []
        if deleted_ids:
            # Redis 7 already dropped them from the PEL; just count them.
            self.stats.deleted += len(deleted_ids)
            log.warning(
                "%s: %d pending entries of %s were deleted before handling",
                self.group,
                len(deleted_ids),
                stream,
            )
        # Redis 6.2 returns (nil, nil) for deleted entries and keeps them pending
        # under our name: the own-pending pass sees them with no fields and acks.
        self.stats.claimed += len(entries)
        return len(entries)

    def _claim_by_age(self, stream: str) -> int:
        """The idle backstop on the worker's clock (simulations): claim pending entries
        whose id is older than ``claim_idle_ms``. An entry's age since publish is at
        least its idle time since delivery, so this claims no later than XAUTOCLAIM
        would on that clock; Redis' own idle times are wall time and would make a
        simulation depend on how fast the machine runs it."""
        cutoff = now_ms(self.clock) - self.settings.claim_idle_ms
        if cutoff <= 0:
            return 0
        rows = self.client.xpending_range(
            stream, self.group, "-", f"{cutoff}-{2**64 - 1}", self.settings.batch_size
        )
        ids = [row["message_id"] for row in rows if text(row["consumer"]) != self.consumer]
        if not ids:
            return 0
        self.client.xclaim(stream, self.group, self.consumer, 0, ids, justid=True)
        self.stats.claimed += len(ids)
        return len(ids)

    # -- handling ------------------------------------------------------------------

    def _process(self, deliveries: list[Delivery]) -> None:
        self.stats.batches += 1
        to_ack: list[Delivery] = []
        good: list[Delivery] = []
        failed: list[Delivery] = []
        counts = self.stats.delivery_counts
        decode, data_of = ev.decode, ev.entry_data
        for d in deliveries:
            counts[d.delivery_count] = counts.get(d.delivery_count, 0) + 1
            if not d.fields:
                self.stats.deleted += 1
                to_ack.append(d)
                continue
            data = data_of(d.fields)
            try:
                if data is None:
                    raise ev.EventDecodeError("entry has no 'data' field")
                d.event = decode(data)
                good.append(d)
            except ev.EventDecodeError as exc:
                d.error = exc.reason
                failed.append(d)
        # Reads come grouped by stream and an escrow spans streams; one stream's
        # entries are already in each escrow's order.
        if len(good) > 1 and len({d.stream for d in good}) > 1:
            events = [d.event for d in good if d.event is not None]  # all: decoded above
            good = [good[i] for i in ev.escrow_order(events)]
        if self._suspects and (to_ack or failed):  # acked as deleted, or never decoded:
            self._suspects.difference_update((d.stream, d.entry_id) for d in to_ack + failed)
        if good and self._suspects:
            to_ack.extend(self._handle_suspects_alone(good, failed))
        elif good:
            to_ack.extend(self._handle_in_order(good, failed))
        self._ack_handled(to_ack)
        for d in failed:
            self.stats.failed += 1
            reason = d.error or "handler failed"
            if should_dead_letter(d, self.settings.max_deliveries):
                self._dead_letter(d, reason)
        if any(not should_dead_letter(d, self.settings.max_deliveries) for d in failed):
            retry_at = self.clock.now() + self.settings.retry_backoff_s
            self._redeliver = True  # another attempt: counted
            if self._reread_own_at is None or retry_at < self._reread_own_at:
                self._reread_own_at = retry_at

    def _handle_suspects_alone(
        self, good: list[Delivery], failed: list[Delivery]
    ) -> list[Delivery]:
        """Handle the batch in its order, each suspect alone (counted in the crash
        hash first, acked at once after) and the runs between them together; return
        the handled non-suspects, for the batch's ack."""
        done: list[Delivery] = []
        run: list[Delivery] = []
        for d in good:
            key = (d.stream, d.entry_id)
            if key not in self._suspects:
                run.append(d)
                continue
            if run:
                done += self._handle_in_order(run, failed)
                run = []
            self._handle_alone(d, key, failed)
        if run:
            done += self._handle_in_order(run, failed)
        return done

    def _handle_alone(self, d: Delivery, key: tuple[str, str], failed: list[Delivery]) -> None:
        crashes = self.names.crashes(self.group, self._partition_of[d.stream])
        field = f"{d.stream} {d.entry_id}"
        deaths = int(
            self._begin_alone_script(keys=[crashes], args=[field, self.token, _CRASHES_TTL_S])
        )
        handled: list[Delivery] = []
        try:
            if killed_its_consumers(deaths, self.settings.max_crashes):
                self._dead_letter(d, f"its consumer died handling it {deaths} times")
            else:
                self.stats.isolated += 1
                handled = self._handle_in_order([d], failed)
        except BaseException as exc:
            if _stopped(exc):  # not a death: whoever handles it next counts nothing
                with contextlib.suppress(Exception):
                    self.client.hset(crashes, field, f"{deaths}:-")
            raise  # an outage: our mark stays, and our retry counts nothing either
        # The handler returned (a failure stays pending for its retry, counted as
        # usual): the entry killed nobody this time, whatever happens before the ack.
        self.client.hdel(crashes, field)
        self._suspects.discard(key)
        self._ack_handled(handled)

    def _handle_in_order(self, good: list[Delivery], failed: list[Delivery]) -> list[Delivery]:
        """Handle the decoded entries, already in escrow order; return those handled.
        (A seam for fault injection: :mod:`simulations.faults` splits it to crash mid-batch.)"""
        return self._handle(good, failed)

    def _ack_handled(self, deliveries: list[Delivery]) -> None:
        """Ack what the handler made durable (a seam: the lab crashes right before it)."""
        self._ack(deliveries)

    def _handle(self, batch: list[Delivery], failed: list[Delivery]) -> list[Delivery]:
        """Run the handler on the batch; on error, one by one to isolate the poison."""
        if self.observer is not None:
            self.observer(batch, self.clock.now())
        try:
            self.handler.handle([d.event for d in batch if d.event is not None])
            self.stats.handled += len(batch)
            return batch
        except Exception as exc:
            if transient(exc) or _cut_short(exc):
                raise  # not the entries' fault: leave them pending, back off
            if len(batch) == 1:
                batch[0].error = f"{type(exc).__name__}: {exc}"
                failed.append(batch[0])
                log.warning(
                    "%s: %s failed on %s: %s", self.group, self.consumer, batch[0].entry_id, exc
                )
                return []
        done: list[Delivery] = []
        for d in batch:
            done.extend(self._handle([d], failed))
        return done

    def _ack(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        by_stream: dict[str, list[str]] = {}
        for d in deliveries:
            by_stream.setdefault(d.stream, []).append(d.entry_id)
        conn = None if self._cluster else self.client.connection
        if len(by_stream) == 1 and conn is not None:  # one connection: sent as the reads are
            [(stream, ids)] = by_stream.items()
            args = ["XACK", stream, self.group, *ids]
            with self.client.single_connection_lock:
                conn.retry.call_with_retry(
                    lambda: _send_and_read(conn, args), lambda _error: conn.disconnect()
                )
        elif len(by_stream) == 1:  # the usual batch: no pipeline to build
            [(stream, ids)] = by_stream.items()
            self.client.xack(stream, self.group, *ids)
        else:
            pipe = self.client.pipeline(transaction=False)
            for stream, ids in by_stream.items():
                pipe.xack(stream, self.group, *ids)
            execute(self.client, pipe)
        self.stats.acked += len(deliveries)

    def _dead_letter(self, d: Delivery, reason: str) -> None:
        fields: dict[str, str | bytes] = {
            "source_stream": d.stream,
            "source_id": d.entry_id,
            "group": self.group,
            "consumer": self.consumer,
            "reason": reason,
            "deliveries": str(d.delivery_count),
            "dead_lettered_at": repr(self.clock.now()),
        }
        for key, value in field_pairs(d.fields):
            fields[f"entry.{text(key)}"] = value
        # One script (one slot: the dead letters of the entry's partition), atomic as
        # a MULTI; a cluster client's pipelines cannot carry the EVAL a MULTI would.
        dead_letters = self.names.dead_letter(self.group, self._partition_of[d.stream])
        now = now_ms(self.clock) if self.settings.ids_on_clock else ""
        flat = [part for item in fields.items() for part in item]
        self._dead_letter_script(
            keys=[dead_letters, d.stream], args=[now, self.group, d.entry_id, *flat]
        )
        self.stats.dead_lettered += 1
        log.error(
            "%s: dead-lettered %s %s after %d deliveries: %s",
            self.group,
            d.stream,
            d.entry_id,
            d.delivery_count,
            reason,
        )

    def _heartbeat(self, force: bool = False) -> None:
        """Write this consumer's heartbeat when one is due. Unpartitioned on one
        redis-server, the poll always sends a command next (its recovery pass or its
        read), so the HSET waits for it and goes in the same write: the same order
        on the server, one round trip fewer. It counts as written (the next one is
        due ``heartbeat_every_s`` later) only once that write is answered: a poll
        that fails first writes a fresh one at the next poll, as before."""
        now = self.clock.now()
        if force or now >= self._next_heartbeat:
            if not force and self._leases is None and not self._cluster:
                self._beat = now
                return
            self.client.hset(self.names.heartbeats(self.group), self.consumer, repr(now))
            self._beat_sent(now)
            if self._leases is not None:
                self._rebalance(now)

    def _beat_sent(self, at: float) -> None:
        self._beat = None
        self._next_heartbeat = at + self.settings.heartbeat_every_s

    # -- partitions ------------------------------------------------------------------

    def _rebalance(self, now: float) -> None:
        """Move towards this consumer's target partitions among the live members:
        give back those no longer ours, take (and renew) the targets, claim the
        pending entries of those just taken."""
        assert self._leases is not None
        raw = self.client.hgetall(self.names.heartbeats(self.group))
        members = live_members(
            {text(k): float(v) for k, v in raw.items()},
            me=self.consumer,
            now=now,
            dead_after_s=self.settings.dead_after_s,
        )
        targets = assign(members, len(self.names.partitions))[self.consumer]
        self._give_back(to_give_back(self._leases.held, targets))
        before = self._leases.held
        held = self._leases.sync(targets, now)
        # A lease lost to another member (ours expired: this process was paused) is
        # simply no longer read; what we still had pending there is claimed by the
        # new holder when it took it, or by the idle backstop.
        self._taking = (self._taking | set(newly_taken(before, held))) & held
        self._set_reading(held - self._taking)
        if self._taking:
            self._claim_left_behind(tuple(sorted(self._taking)))  # may fail: retried
            self._taking = set()
            self._set_reading(held)
            # Another delivery of what was claimed (JUSTID), maybe from a dead consumer.
            self._redeliver = self._suspect_reread = True
            self._reread_own_pending()  # merged with this poll's read of new entries

    def _set_reading(self, partitions: frozenset[int]) -> None:
        self.reading = tuple(sorted(partitions))
        self._read_streams = self._streams_of(self.reading)
        # Entries held back for order in a partition no longer read stay pending under
        # our name: its next holder claims them first, then reads on in order.
        self._held = [d for d in self._held if self._partition_of[d.stream] in partitions]

    def _give_back(self, partitions: frozenset[int]) -> None:
        """Give back ``partitions``. Every batch is handled and acked in the poll that
        read it, so what is left of theirs is pending for the next holder to claim."""
        if not partitions or self._leases is None:
            return
        self._set_reading(self._leases.held - partitions)
        self._leases.give(partitions)
        self.stats.partitions_given += len(partitions)
        log.info("%s gave back partitions %s", self.consumer, sorted(partitions))

    def _claim_left_behind(self, partitions: tuple[int, ...]) -> None:
        """Claim the pending entries of every other consumer in the streams of newly
        taken ``partitions`` (a previous holder that gave them back or died); the
        caller then re-reads our own pending, so they are handled before, and with,
        the first new entries read from them."""
        streams = self._streams_of(partitions)
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.xpending(stream, self.group)
        for stream, summary in zip(streams, execute(self.client, pipe), strict=True):
            if not summary["pending"]:
                continue
            for c in summary["consumers"]:
                name = text(c["name"])
                if name != self.consumer and int(c["pending"]):
                    self._claim_from(stream, name)
        self.stats.partitions_taken += len(partitions)
        log.info("%s took partitions %s", self.consumer, list(partitions))

    def leave(self) -> None:
        """Give back the partitions held (partitioned) and remove this consumer's
        heartbeat (a clean exit is not a death)."""
        self._beat = None  # a heartbeat not sent yet must not follow the exit
        try:
            if self._leases is not None:
                self._give_back(self._leases.held)
            self.client.hdel(self.names.heartbeats(self.group), self.consumer)
        except Exception as exc:
            if not transient(exc):
                raise
            # Redis down or refusing: the beat goes stale, the leases expire on their own.
            log.warning("%s: could not leave cleanly: %s", self.consumer, exc)


def _stopped(exc: BaseException) -> bool:
    """Is ``exc`` a stop (a BaseException that is no Exception), or an error put in
    a stop's place (:func:`_cut_short`)? A simulation's crash is neither."""
    return not isinstance(exc, Exception) or _cut_short(exc)


def _cut_short(exc: BaseException) -> bool:
    """Was ``exc`` raised while a stop (a BaseException that is no Exception: a
    KeyboardInterrupt, a simulation's Interrupted) unwound the handler? Code that is
    not safe against one can put an error of its own in its place (SQLAlchemy's
    commit, cut short, fails its own assertion): not the entries' fault either."""
    seen: BaseException | None = exc.__context__
    for _ in range(100):  # a chain is short; no cycle can keep this going
        if seen is None:
            return False
        if not isinstance(seen, Exception):
            return True
        seen = seen.__context__
    return False


__all__ = [
    "ConsumerSettings",
    "ConsumerStats",
    "ConsumerWorker",
    "Handler",
]
