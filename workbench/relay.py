"""The outbox relay: publishes committed outbox rows to the streams, in order.

Rows are read in ``seq`` order, XADDed in one pipeline, then marked published.
A crash between the XADD and the mark publishes those rows again on restart:
at-least-once, and consumers dedupe by event id. While Redis is down the rows
wait in the outbox and the relay backs off; nothing is lost.

Run one relay per store: two relays would each keep per-escrow order but
could interleave their batches.

While running it beats, like the workers: ``<prefix>:heartbeats:relay`` holds
``relay-<pid> -> time`` at least every ``heartbeat_every_s``, and each batch
also sets ``<prefix>:relay:last_publish`` (in the same pipeline as its XADDs),
so ``/healthz`` tells a stalled relay from an idle one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import redis
import sqlalchemy.exc
from redis.backoff import ExponentialWithJitterBackoff
from sqlalchemy import bindparam, func, select, update

from workbench.clock import Clock, SystemClock
from workbench.events import AGGREGATE_TYPES
from workbench.log import StreamNames, trim
from workbench.shutdown import StopRequest
from workbench.store import Prepared, Store, outbox

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
TRANSIENT = (*REDIS_DOWN, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)


_MARK_PUBLISHED = Prepared(
    update(outbox).where(outbox.c.seq == bindparam("seq")).values(published_at=bindparam("at"))
)


@dataclass
class RelayStats:
    published: int = 0
    batches: int = 0
    redis_errors: int = 0
    trimmed: int = 0


class OutboxRelay:
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
        crash_hook: Callable[[str, int], None] | None = None,
        heartbeat_every_s: float = 1.0,
    ) -> None:
        self.store = store
        self.client = client
        self.names = names or StreamNames()
        self.batch_size = batch_size
        self.clock = clock or SystemClock()
        self.retention_s = retention_s
        self.trim_every = trim_every
        self.stats = RelayStats()
        self.crash_hook = crash_hook
        self._unpublished = Prepared(
            select(outbox.c.seq, outbox.c.event_id, outbox.c.stream, outbox.c.type, outbox.c.data)
            .where(outbox.c.published_at.is_(None))
            .order_by(outbox.c.seq)
            .limit(batch_size)
        )
        self._stop = StopRequest()
        self.heartbeat_every_s = heartbeat_every_s
        self.name = f"relay-{os.getpid()}"
        self._next_heartbeat = 0.0

    def heartbeat(self, force: bool = False) -> None:
        """Beat (at most every ``heartbeat_every_s``); raises if Redis is down."""
        now = self.clock.now()
        if force or now >= self._next_heartbeat:
            self.client.hset(self.names.heartbeats("relay"), self.name, repr(now))
            self._next_heartbeat = now + self.heartbeat_every_s

    def backlog(self) -> int:
        """Outbox rows not yet published."""
        with self.store.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
                ).scalar_one()
            )

    def publish_batch(self) -> int:
        """Publish up to ``batch_size`` rows; return how many. Raises if Redis is down."""
        with self.store.begin() as conn:  # SQLite: the thread's held connection, no checkout
            rows = self._unpublished.execute(conn).fetchall()
        if not rows:
            return 0
        pipe = self.client.pipeline(transaction=False)
        stream = self.names.stream
        for _, event_id, aggregate, type_, data in rows:
            pipe.xadd(stream(aggregate), {"event_id": event_id, "type": type_, "data": data})
        pipe.set(self.names.last_publish(), repr(self.clock.now()))
        pipe.execute()
        if self.crash_hook is not None:
            self.crash_hook("after-xadd", self.stats.batches + 1)
        now = self.clock.now()
        with self.store.begin() as conn:
            _MARK_PUBLISHED.executemany(conn, [{"seq": row[0], "at": now} for row in rows])
        self.stats.published += len(rows)
        self.stats.batches += 1
        if self.stats.batches % self.trim_every == 0:
            self.trim()
        return len(rows)

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
            result = trim(self.client, self.names.stream(aggregate), retention_s=self.retention_s)
            if result.held_by_groups:
                log.info("retention of %s held back by an unacked group", result.stream)
            trimmed += result.trimmed
        self.stats.trimmed += trimmed
        return trimmed

    def stop(self) -> None:
        self._stop.set()

    def run(self, idle_wait: float = 0.05) -> None:
        """Publish until :meth:`stop`; back off with jitter while Redis is down."""
        backoff = ExponentialWithJitterBackoff(cap=2.0, base=0.05)
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
