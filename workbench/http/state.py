"""The per-process state behind the routes: :class:`App`, reached through ``wb(request)``.

One :class:`App` per API process, built in the app's lifespan and closed
with it: the store and the :class:`~workbench.service.EscrowService` over it,
the M-Pesa gateway (simulated, Daraja, or one that refuses), the Redis
clients, one :class:`~workbench.delivery.live.LiveReader` feeding one
:class:`~workbench.delivery.hub.Hub`, and the session counters. Routes never
hold state of their own; they read this through the ``State`` dependency
(:mod:`workbench.http.dependencies`), so every route of a process sees the
same hub and the same service.

Two background loops run for the app's lifetime: the simulated gateway's
callback deliveries (:meth:`App.run_callbacks`, ``sim`` only; the callbacks
due at once are posted concurrently) and the payment verification pass
(:meth:`App.run_verification`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool

from workbench.delivery.hub import Hub
from workbench.delivery.live import LiveReader
from workbench.delivery.sessions import SessionStats
from workbench.delivery.userstreams import UserStreamReader
from workbench.domain.clock import Clock, SystemClock
from workbench.domain.ids import IdFactory
from workbench.http.settings import Settings
from workbench.http.sse import heartbeat_shares
from workbench.payments.daraja import DarajaClient
from workbench.payments.mpesa import (
    Delivery,
    GatewayUnavailable,
    QueryResult,
    SimulatedGateway,
    token_of,
)
from workbench.service import EscrowService
from workbench.store import Store, outbox
from workbench.streams.connection import async_client, close_async_client, connect
from workbench.streams.keys import UserStreamNames, names_for

log = logging.getLogger(__name__)


#: Simulated callbacks in flight at once per API process (each holds a threadpool
#: thread while its handler waits for the simulated STK Push Query).
CALLBACKS_IN_FLIGHT = 16


async def deliver_all(
    deliveries: list[Delivery],
    post: Callable[[Delivery], Awaitable[None]],
    limit: int = CALLBACKS_IN_FLIGHT,
) -> None:
    """Post every delivery, up to ``limit`` at once; return when all are done."""
    gate = asyncio.Semaphore(limit)

    async def one(delivery: Delivery) -> None:
        async with gate:
            await post(delivery)

    await asyncio.gather(*(one(d) for d in deliveries))


class UnconfiguredGateway:
    """``external`` without ``WORKBENCH_DARAJA_URL``: every push and query is refused."""

    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        raise GatewayUnavailable("no M-Pesa gateway configured (set WORKBENCH_DARAJA_URL)")

    def query(self, checkout_request_id: str) -> QueryResult:
        raise GatewayUnavailable("no M-Pesa gateway configured (set WORKBENCH_DARAJA_URL)")


class _LockedGateway:
    """The simulated gateway shared by request threads and the callback task.

    A query waits its simulated network delay outside the lock, so a slow
    answer does not hold up pushes.
    """

    def __init__(self, gateway: SimulatedGateway) -> None:
        self.gateway = gateway
        self.lock = threading.Lock()
        self.rng = random.Random()

    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        with self.lock:
            return self.gateway.stk_push(
                escrow_id, amount, phone, reference=reference, callback_url=callback_url
            )

    def query(self, checkout_request_id: str) -> QueryResult:
        b = self.gateway.behaviour
        if b.query_delay_max > 0:
            time.sleep(self.rng.uniform(b.query_delay_min, b.query_delay_max))
        with self.lock:
            return self.gateway.query(checkout_request_id)

    def due(self) -> list[Delivery]:
        with self.lock:
            return self.gateway.due_deliveries()


class App:
    """The process-wide state behind the routes."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.names = names_for(settings.prefix, settings.partitions)
        self.user_names = UserStreamNames.of(self.names)
        self.store = Store(settings.database_url)
        self.store.create_schema()
        ids = IdFactory()
        self.sim: _LockedGateway | None = None
        gateway: Any
        self.daraja: DarajaClient | None = None
        if settings.mpesa == "sim":
            self.sim = _LockedGateway(SimulatedGateway(self.clock, settings.gateway))
            gateway = self.sim
        elif settings.daraja is not None:
            self.daraja = gateway = DarajaClient(settings.daraja)
        else:
            log.warning("WORKBENCH_MPESA=external without WORKBENCH_DARAJA_URL: funding is refused")
            gateway = UnconfiguredGateway()
        self.service = EscrowService(
            self.store,
            clock=self.clock,
            ids=ids,
            gateway=gateway,
            create_limit=settings.create_limit,
            payments=settings.payments(),
            partitioning=self.names.partitioning,
        )
        self.hub = Hub(
            max_queue=settings.max_queue, heartbeat_shares=heartbeat_shares(settings.ping_s)
        )
        self.stats = SessionStats()
        self.redis = connect(settings.redis_url)  # sync: metrics
        self.aredis = async_client(settings.redis_url, max_connections=settings.redis_pool)
        self.reader = UserStreamReader(self.aredis, self.user_names)
        self.live = LiveReader(settings.redis_url, self.hub, self.user_names)
        self.callbacks_posted = 0

    async def run_callbacks(self) -> None:
        """The simulated M-Pesa: post due callbacks to their CallBackURL (or in-process).

        The callbacks due at one poll are posted concurrently (:func:`deliver_all`),
        as a real gateway posts each independently: the handler asks the gateway's
        STK Push Query (0.05-0.3 s of simulated delay) before answering, so posting
        them one by one would cap payments at a few per second per API process.
        """
        assert self.sim is not None
        async with contextlib.AsyncExitStack() as clients:
            # A client of one connection per callback in flight, taken in turn:
            # httpcore checks every connection of its pool (a poll of its socket)
            # for each request it places, so one pool of 16 cost more than the posts.
            idle: asyncio.Queue[httpx.AsyncClient] = asyncio.Queue()
            one = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            for _ in range(CALLBACKS_IN_FLIGHT):
                client = httpx.AsyncClient(timeout=10, limits=one)
                idle.put_nowait(await clients.enter_async_context(client))

            async def post(delivery: Delivery) -> None:
                try:
                    if self.settings.callback_url:
                        http = await idle.get()
                        try:
                            await http.post(delivery.url, json=delivery.body)
                        finally:
                            idle.put_nowait(http)
                    else:
                        await run_in_threadpool(
                            self.service.handle_callback, token_of(delivery.url), delivery.body
                        )
                    self.callbacks_posted += 1
                except Exception as exc:  # noqa: BLE001 - a gateway just logs and moves on
                    log.warning("simulated callback failed: %s", exc)

            while True:
                await deliver_all(self.sim.due(), post)
                await asyncio.sleep(0.1)

    def service_outbox_backlog(self) -> tuple[int, float | None]:
        """(outbox rows not yet published, created_at of the oldest of them)."""
        with self.store.read() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(outbox.c.created_at)).where(
                    outbox.c.published_at.is_(None)
                )
            ).one()
        return int(count), None if oldest is None else float(oldest)

    async def run_verification(self) -> None:
        """The reconciliation pass, every ``verify_every_s``: owed pushes, due queries."""
        while True:
            await asyncio.sleep(self.settings.verify_every_s)
            try:
                await run_in_threadpool(self.service.verify_payments)
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.warning("payment verification pass failed: %s", exc)

    async def close(self) -> None:
        self.hub.close_all("server shutting down")
        await close_async_client(self.aredis)
        self.redis.close()
        if self.daraja is not None:
            self.daraja.close()
        self.store.close()
