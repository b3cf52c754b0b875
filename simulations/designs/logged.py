"""The log side shared by designs 2 and 3: aggregate stream, real fan-out worker.

* The **producer** XADDs each event to the aggregate stream
  (``<prefix>:escrow``) with the project's entry fields
  (:func:`workbench.domain.events.to_fields`).
* The **fan-out step** is the project's own: :class:`~workbench.handlers.fanout.FanoutHandler`
  run by :class:`~workbench.streams.consumer.ConsumerWorker` (consumer group
  ``fanout``, XREADGROUP, XACK after the handler returned), in a thread, as
  ``workbench worker fanout`` runs it in a process. Its handler appends each
  event to the stream of every user it concerns with one Lua script that
  dedupes by event id and also PUBLISHes on the live channel.
* A **crash** is an exception raised from the worker's crash hook at the
  schedule's crash point of the next batch once armed: the batch stays
  pending in the group, the worker's connection is closed, nothing is acked.
  The restart is a new connection, handler and worker under the same
  consumer name, which re-reads its own pending entries first (delivery
  count 2) and, after ``after-effect``, finds them already fanned out.

Designs 2 and 3 differ only in how phones read their user streams.
"""

from __future__ import annotations

import asyncio
import threading

import redis
import redis.asyncio as aioredis

from simulations.designs.base import Design, Probe, RunContext, close_quietly
from simulations.faults import CrashingWorker
from workbench.domain import events as ev
from workbench.handlers.fanout import FanoutHandler
from workbench.streams.connection import connect
from workbench.streams.consumer import ConsumerSettings, ConsumerStats, ConsumerWorker
from workbench.streams.keys import StreamNames, UserStreamNames

GROUP = FanoutHandler.group


class _Crash(Exception):
    """Raised from the crash hook: the worker thread dies where it stands."""


class FanoutWorkerThread:
    """The real fan-out consumer in a thread, with a crash switch."""

    def __init__(self, ctx: RunContext, settings: ConsumerSettings) -> None:
        self.ctx = ctx
        self.names = StreamNames(ctx.prefix)
        self.settings = settings
        self.lives: list[tuple[ConsumerStats, FanoutHandler]] = []
        self._armed = threading.Event()
        self._thread: threading.Thread | None = None
        self._worker: ConsumerWorker | None = None

    def start(self) -> None:
        """Start a life: new connection, handler and worker (same consumer name)."""
        self._armed.clear()
        client = connect(self.ctx.url, client_name=self.ctx.name("worker"))
        handler = FanoutHandler(client, self.names)
        worker = CrashingWorker(
            client,
            handler,
            consumer=f"{GROUP}-0",
            names=self.names,
            settings=self.settings,
            crash_hook=self._hook,
        )
        worker.setup()  # the group exists before the first XADD
        self.lives.append((worker.stats, handler))
        self._worker = worker
        self._thread = threading.Thread(target=self._run, args=(worker,), daemon=True)
        self._thread.start()

    def _hook(self, point: str, batch_no: int) -> None:
        if point == self.ctx.schedule.crash_point and self._armed.is_set():
            raise _Crash(point)

    def _run(self, worker: ConsumerWorker) -> None:
        try:
            worker.run()
        except _Crash:
            pass  # what it read stays pending under its name
        finally:
            worker.client.close()

    def arm(self) -> None:
        self._armed.set()

    def stop(self) -> None:
        """Stop this life (after its current batch, if it has not crashed)."""
        if self._worker is not None:
            self._worker.stop()
        if self._thread is not None:
            self._thread.join()
        self._worker = self._thread = None

    def redelivered(self) -> int:
        """Entries handed to the worker more than once (after a crash)."""
        return sum(n for stats, _ in self.lives for k, n in stats.delivery_counts.items() if k > 1)

    def duplicates_suppressed(self) -> int:
        """Events the fan-out script found already fanned out (its dedupe marker)."""
        return sum(handler.duplicates for _, handler in self.lives)


class LoggedDesign(Design):
    """Producer XADD + the real fan-out worker; subclasses supply the phones."""

    def __init__(self, *, worker_block_ms: int = 250) -> None:
        super().__init__()
        # ConsumerSettings' default block is 1000 ms; only an idle worker blocks,
        # and a shorter block makes a clean stop quicker.
        self.settings = ConsumerSettings(block_ms=worker_block_ms)

    async def start(self, ctx: RunContext) -> None:
        await super().start(ctx)
        self.names = StreamNames(ctx.prefix)
        self.user_names = UserStreamNames.of(self.names)
        self.stream = self.names.stream("escrow")
        self._producer = ctx.connect("producer")
        await self._producer.ping()
        self.worker = FanoutWorkerThread(ctx, self.settings)
        await asyncio.to_thread(self.worker.start)

    async def publish(self, event: ev.Event) -> None:
        await self._producer.xadd(self.stream, ev.to_fields(event))  # type: ignore[arg-type]

    async def worker_down(self) -> None:
        self.worker.arm()

    async def worker_up(self) -> None:
        await asyncio.to_thread(self.worker.stop)
        await asyncio.to_thread(self.worker.start)

    async def probe(self, admin: aioredis.Redis) -> Probe:
        """``XINFO GROUPS``: the group's lag (Redis >= 7) and pending count."""
        try:
            groups = await admin.xinfo_groups(self.stream)
        except redis.ResponseError:  # no such key: nothing produced yet
            return Probe(0, 0)
        for group in groups:
            if group["name"] in (GROUP, GROUP.encode()):
                pending = int(group["pending"])
                lag = group.get("lag")
                if lag is None:  # Redis 6.2, or 7 after deletions: count what follows
                    after = f"({group['last-delivered-id'].decode()}"
                    lag = len(await admin.xrange(self.stream, after, "+"))
                return Probe(int(lag) + pending, pending)
        return Probe(0, 0)

    async def depth(self, admin: aioredis.Redis) -> int | None:
        pipe = admin.pipeline(transaction=False)
        for user in self.ctx.schedule.users if self.ctx else ():
            pipe.xlen(self.user_names.stream(user))
        return int(sum(await pipe.execute()))

    def extra(self) -> dict[str, float]:
        return {
            "redelivered": float(self.worker.redelivered()),
            "duplicates_suppressed": float(self.worker.duplicates_suppressed()),
        }

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop)
        await close_quietly(self._producer.aclose)
