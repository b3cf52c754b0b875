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
original ids*, in ``seq`` order, before anything new. Because the check and
the new XADDs are one atomic script, no new entry can land on a regressed
stream first (after which the lost ids could no longer go back in order).
Consumer groups then re-read what they lost (:mod:`workbench.streams.consumer`), the
inboxes make the redelivery harmless, and the fan-out re-appends what user
streams lost (:mod:`workbench.delivery.userstreams`). Rows older than the retention
window are not put back (retention would trim them again).

**Durable publishing.** With ``wait_fsync`` (servers with ``WAITAOF``:
Redis >= 7.2, Valkey) the script is followed, on the same connection, by
``WAITAOF 1 0 <timeout>``; rows are marked published only once the server
confirms its AOF holds them on disk. A timeout marks nothing and the batch is
retried (republished: at-least-once).

Run one relay per store: two relays would each keep per-escrow order but
could interleave their batches, and each would take the other's entries for
its own.

While running it beats, like the workers: ``<prefix>:heartbeats:relay`` holds
``relay-<pid> -> time`` at least every ``heartbeat_every_s``, and each beat
sets ``<prefix>:relay:last_publish`` to the time of the last batch, so
``/healthz`` tells a stalled relay from an idle one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import bindparam, func, select, update

from workbench.domain.clock import Clock, SystemClock, now_ms
from workbench.domain.events import AGGREGATE_TYPES
from workbench.domain.streamid import ZERO, StreamId, next_id, parse
from workbench.ops.shutdown import StopRequest
from workbench.store import Prepared, Store, outbox
from workbench.streams.connection import REDIS_DOWN, TRANSIENT, outage_backoff, server_version
from workbench.streams.keys import StreamNames
from workbench.streams.replies import text
from workbench.streams.retention import trim

log = logging.getLogger(__name__)


#: WAITAOF's timeout (ms) in the durable mode: an everysec fsync is due within ~1 s.
DEFAULT_FSYNC_TIMEOUT_MS = 2000

_MARK_PUBLISHED = Prepared(
    update(outbox)
    .where(outbox.c.seq == bindparam("seq"))
    .values(published_at=bindparam("at"), stream_id=bindparam("sid"))
)

# KEYS: every aggregate stream. ARGV[1..#KEYS]: the id each stream's
# last-generated-id must have reached (what the relay published last; 0-0:
# nothing). Then per row: key index, entry id ('*': Redis' clock), event_id, type, data.
# Returns {1, id...} after XADDing every row, or {0, key index, its
# last-generated-id, ...} for the streams found behind, having written nothing.
_CHECKED_XADD_LUA = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local n = #KEYS
local behind = {0}
for i = 1, n do
  if ARGV[i] ~= '0-0' then
    local last = '0-0'
    if redis.call('EXISTS', KEYS[i]) == 1 then
      local info = redis.call('XINFO', 'STREAM', KEYS[i])
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then last = info[j + 1] break end
      end
    end
    local hm, hs = parse(last)
    local wm, ws = parse(ARGV[i])
    if hm < wm or (hm == wm and hs < ws) then
      behind[#behind + 1] = i
      behind[#behind + 1] = last
    end
  end
end
if #behind > 1 then return behind end
local ids = {1}
for k = n + 1, #ARGV, 5 do
  ids[#ids + 1] = redis.call('XADD', KEYS[tonumber(ARGV[k])], ARGV[k + 1],
    'event_id', ARGV[k + 2], 'type', ARGV[k + 3], 'data', ARGV[k + 4])
end
return ids
"""


class DurabilityUnavailable(RuntimeError):
    """The durable mode was asked for, but the server cannot confirm an fsync."""


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


@dataclass(frozen=True)
class Loss:
    """An aggregate stream whose last-generated-id is behind what was published."""

    aggregate: str
    found: StreamId
    expected: StreamId


class OutboxRelay:
    """Publish the outbox in order; with ``repair``, check and restore Redis first.

    ``repair=False`` is the relay without loss detection (one XADD pipeline per
    batch), kept to measure what the check costs. ``wait_fsync`` is the durable
    mode (needs ``WAITAOF`` and ``appendonly yes``).
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
    ) -> None:
        if fsync_timeout_ms < 1:
            raise ValueError("fsync_timeout_ms must be at least 1 (WAITAOF 0 would wait forever)")
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
        self._unpublished = Prepared(
            select(outbox.c.seq, outbox.c.event_id, outbox.c.stream, outbox.c.type, outbox.c.data)
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.seq)
            .limit(batch_size)
        )
        self._keys = [self.names.stream(a) for a in AGGREGATE_TYPES]
        self._index = {a: i for i, a in enumerate(AGGREGATE_TYPES)}
        self._expected: list[StreamId] | None = None  # loaded from the outbox on first use
        self._sha = ""
        self._durability_checked = False
        self._next_verify = 0.0
        self._stop = StopRequest()
        self.heartbeat_every_s = heartbeat_every_s
        self.name = f"relay-{os.getpid()}"
        self._next_heartbeat = 0.0
        self._last_publish_at: float | None = None  # reported with the heartbeat

    def heartbeat(self, force: bool = False) -> None:
        """Beat (at most every ``heartbeat_every_s``); raises if Redis is down."""
        now = self.clock.now()
        if force or now >= self._next_heartbeat:
            pipe = self.client.pipeline(transaction=False)
            pipe.hset(self.names.heartbeats("relay"), self.name, repr(now))
            if self._last_publish_at is not None:  # so /healthz tells stalled from idle
                pipe.set(self.names.last_publish(), repr(self._last_publish_at))
            pipe.execute()
            self._next_heartbeat = now + self.heartbeat_every_s

    def backlog(self) -> int:
        """Outbox rows not yet published."""
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                ).scalar_one()
            )

    # -- publishing -------------------------------------------------------------------

    def publish_batch(self) -> int:
        """Publish up to ``batch_size`` rows; return how many. Raises if Redis is down.

        With ``repair``, a loss found first is repaired first; an idle outbox is
        checked every ``verify_every_s``.
        """
        with self.store.begin() as conn:  # SQLite: the thread's held connection, no checkout
            rows = self._unpublished.execute(conn).fetchall()
        if not rows:
            if self.repair and self.clock.now() >= self._next_verify:
                self.verify()
            return 0
        if self.wait_fsync and not self._durability_checked:
            self.check_durability()
        ids = self._publish_checked(rows) if self.repair else self._publish_plain(rows)
        self._last_publish_at = self.clock.now()
        self._published(self.stats.batches + 1)
        now = self.clock.now()
        with self.store.begin() as conn:
            _MARK_PUBLISHED.executemany(
                conn,
                [
                    {"seq": row[0], "at": now, "sid": sid}
                    for row, sid in zip(rows, ids, strict=True)
                ],
            )
        if self._expected is not None:
            for row, sid in zip(rows, ids, strict=True):
                self._expected[self._index[row[2]]] = parse(sid)
        self.stats.published += len(rows)
        self.stats.batches += 1
        if self.stats.batches % self.trim_every == 0:
            self.trim()
        return len(rows)

    def _published(self, batch_no: int) -> None:
        """Called between a batch's XADDs and its mark in SQL: a seam where the lab's
        fault injection (:mod:`simulations.faults`) kills the relay."""

    def _entry_ids(self, rows: list[Any]) -> list[str]:
        """Each row's entry id: ``*`` (Redis' clock), or, with ``ids_on_clock``, the
        next id after its stream's last on the relay's clock (simulation time)."""
        if not self.ids_on_clock:
            return ["*"] * len(rows)
        last = list(self._expected_ids())
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

    def _publish_checked(self, rows: list[Any]) -> list[str]:
        """XADD ``rows`` through the checking script, repairing first if needed."""
        argv: list[Any] = []
        index = self._index
        for (_, event_id, aggregate, type_, data), id_ in zip(
            rows, self._entry_ids(rows), strict=True
        ):
            argv += (index[aggregate] + 1, id_, event_id, type_, data)
        while True:
            reply = self._script(argv)
            if reply[0] == 1:
                return [text(i) for i in reply[1:]]
            self._repair(self._losses(reply))  # then try again: it must pass now

    def verify(self) -> list[Loss]:
        """Check every stream against what was published; repair what Redis lost."""
        self._next_verify = self.clock.now() + self.verify_every_s
        reply = self._script([])
        if reply[0] == 1:
            return []
        losses = self._losses(reply)
        self._repair(losses)
        return losses

    def _script(self, argv: list[Any]) -> list[Any]:
        expected = [str(e) for e in self._expected_ids()]
        if not self._sha:
            self._sha = self.client.script_load(_CHECKED_XADD_LUA)
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(self._sha, len(self._keys), *self._keys, *expected, *argv)
            try:
                [reply] = self._send(pipe)
                return reply  # type: ignore[no-any-return]
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                # A restarted Redis forgot the script; nothing was written.
                self._sha = self.client.script_load(_CHECKED_XADD_LUA)
        raise AssertionError("unreachable")

    def _send(self, pipe: redis.client.Pipeline) -> list[Any]:
        """Run the pipeline and return its replies; in the durable mode follow it
        with WAITAOF, in the same pipeline, so on the same connection."""
        if not self.wait_fsync:
            return pipe.execute()  # type: ignore[no-any-return]
        pipe.execute_command("WAITAOF", 1, 0, self.fsync_timeout_ms)
        *replies, (local, _replicas) = pipe.execute()
        if int(local) < 1:
            self.stats.fsync_timeouts += 1
            raise NotFsynced(
                f"WAITAOF: the AOF was not fsynced within {self.fsync_timeout_ms} ms; "
                "the batch stays unpublished and goes out again"
            )
        return replies

    def check_durability(self) -> None:
        """Raise :class:`DurabilityUnavailable` unless the server can confirm fsyncs."""
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

    def _expected_ids(self) -> list[StreamId]:
        if self._expected is None:
            self._expected = [self._last_published(a) for a in AGGREGATE_TYPES]
        return self._expected

    def _last_published(self, aggregate: str) -> StreamId:
        with self.store.engine.connect() as conn:
            sid = conn.execute(
                select(outbox.c.stream_id)
                .where(outbox.c.stream == aggregate, outbox.c.stream_id.is_not(None))
                .order_by(outbox.c.seq.desc())
                .limit(1)
            ).scalar()
        return parse(sid) if sid else ZERO

    def _losses(self, reply: list[Any]) -> list[Loss]:
        expected = self._expected_ids()
        out = []
        for i in range(1, len(reply), 2):
            k = int(reply[i]) - 1
            out.append(Loss(AGGREGATE_TYPES[k], parse(reply[i + 1]), expected[k]))
        return out

    def _repair(self, losses: list[Loss]) -> None:
        """Put the published rows each stream lost back, with their original ids, in
        ``seq`` order; then expect of each stream what it now holds."""
        started = time.perf_counter()
        self.stats.repairs += 1
        self.losses += losses
        lost: list[Any] = []
        for loss in losses:
            lost += self._lost_rows(loss)
        lost.sort(key=lambda row: row[0])
        stream = self.names.stream
        for start in range(0, len(lost), self.batch_size):
            pipe = self.client.pipeline(transaction=False)
            for _, event_id, aggregate, type_, data, sid in lost[start : start + self.batch_size]:
                pipe.xadd(
                    stream(aggregate), {"event_id": event_id, "type": type_, "data": data}, id=sid
                )
            pipe.execute()
        expected = self._expected_ids()
        for loss in losses:
            put_back = [parse(row[5]) for row in lost if row[2] == loss.aggregate]
            expected[self._index[loss.aggregate]] = max([loss.found, *put_back])
        self.stats.repaired += len(lost)
        self.stats.repair_seconds = time.perf_counter() - started
        log.warning(
            "relay: Redis lost acknowledged entries (%s); put %d rows back in %.3f s",
            ", ".join(f"{x.aggregate} at {x.found}, published up to {x.expected}" for x in losses),
            len(lost),
            self.stats.repair_seconds,
        )

    def _lost_rows(self, loss: Loss) -> list[Any]:
        """Published rows of the stream after ``loss.found``, oldest first.

        Rows are published in ``seq`` order, so their ids grow with ``seq``: read
        backwards until the first one Redis still has. Rows older than the
        retention window are left out (retention would trim them again), as are
        rows published before the outbox recorded ids; both are counted.
        """
        if self.ids_on_clock:  # retention is in stream-id time: the clock ids come from
            now = now_ms(self.clock)
        else:
            seconds, micros = self.client.time()
            now = int(seconds) * 1000 + int(micros) // 1000
        floor = StreamId(now - int(self.retention_s * 1000), 0)
        query = (
            select(
                outbox.c.seq,
                outbox.c.event_id,
                outbox.c.stream,
                outbox.c.type,
                outbox.c.data,
                outbox.c.stream_id,
            )
            .where(outbox.c.stream == loss.aggregate, outbox.c.published_at.is_not(None))
            .order_by(outbox.c.seq.desc())
        )
        rows = []
        with self.store.engine.connect() as conn:
            for row in conn.execute(query):
                if row.stream_id is None:
                    self.stats.unrepairable += 1
                    continue
                sid = parse(row.stream_id)
                if sid <= loss.found:
                    break
                if sid < floor:
                    self.stats.unrepairable += 1
                    continue
                rows.append(tuple(row))
        rows.reverse()
        return rows

    # -- the loop ---------------------------------------------------------------------

    def drain(self) -> int:
        """Publish until the outbox is empty; return how many rows went out.

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
        trimmed = 0
        for aggregate in AGGREGATE_TYPES:
            result = trim(
                self.client,
                self.names.stream(aggregate),
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
        """Publish until :meth:`stop`; back off with jitter while Redis is down."""
        backoff = outage_backoff()
        failures = 0
        while not self._stop.is_set():
            try:
                self.heartbeat()
                published = self.publish_batch()
                failures = 0
            except TRANSIENT as exc:
                failures += 1
                self.stats.redis_errors += isinstance(exc, REDIS_DOWN)
                log.warning("relay: %s; retrying", exc)
                self._stop.wait(backoff.compute(failures))
                continue
            if not published:
                self._stop.wait(idle_wait)
        with contextlib.suppress(*REDIS_DOWN):  # a clean exit is not a death
            self.client.hdel(self.names.heartbeats("relay"), self.name)
