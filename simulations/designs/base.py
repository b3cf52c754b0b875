"""What every design shares: the run's context, a phone's inbox, the Design shape.

A design is a plain class with a producer side (:meth:`Design.publish`), a
fan-out step that can crash and come back (:meth:`Design.worker_down`,
:meth:`Design.worker_up`), phones (:meth:`Design.client`) and a backlog probe
(:meth:`Design.probe`). The harness (:mod:`simulations.designs.harness`) drives
all of them with the same :class:`~simulations.designs.schedule.Schedule`.

Every Redis connection a design opens is named ``<run prefix>:<role>``
(``CLIENT SETNAME``), so the harness can count connections by role with
``CLIENT LIST``: ``client`` (one per phone), ``live`` and ``pool`` (shared by
all phones of a server process), ``producer``, ``worker``, ``bridge``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import redis
import redis.asyncio as aioredis

from simulations.designs.schedule import PlannedEvent, Schedule, Window
from workbench.domain import events as ev

# Roles whose connections exist to serve phones (the ones that may grow with them).
CLIENT_ROLES = ("client", "live", "pool")


@dataclass(frozen=True)
class RunContext:
    """One run: the Redis URL, a key prefix of its own, the clock, the schedule."""

    url: str
    prefix: str
    schedule: Schedule
    clock: Callable[[], float] = time.time

    def name(self, role: str) -> str:
        """The client name of a connection with ``role``."""
        return f"{self.prefix}:{role}"

    def url_for(self, role: str) -> str:
        """The URL with ``client_name`` set, for code that only takes a URL."""
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}client_name={quote(self.name(role))}"

    def connect(self, role: str, **options: object) -> aioredis.Redis:
        """An async client whose connections are named for ``role``."""
        return aioredis.Redis.from_url(self.url, client_name=self.name(role), **options)  # type: ignore[arg-type]


def make_event(planned: PlannedEvent, occurred_at: float) -> ev.Event:
    """The domain event for ``planned``: a real envelope, ``payload.n`` = its index."""
    return ev.Event(
        event_id=f"evt-{planned.index:07d}",
        type="escrow.funded",
        aggregate_type="escrow",
        aggregate_id=f"esc-{planned.index:07d}",
        sequence=2,
        user_ids=planned.users,
        occurred_at=occurred_at,
        correlation_id=f"run-{planned.index}",
        payload={"n": planned.index},
    )


@dataclass(frozen=True, slots=True)
class Receipt:
    """One event as one phone got it. Times come from the run's clock."""

    index: int
    occurred_at: float
    received_at: float
    replayed: bool  # delivered by the replay that follows a reconnect


@dataclass
class Inbox:
    """Everything one phone received, in arrival order, and where it would resume.

    ``last_id`` is what an EventSource would send as Last-Event-ID (the id of
    the last message that had one); designs without ids leave it ``None``.
    """

    user: str
    clock: Callable[[], float]
    on_receipt: Callable[[], None] = lambda: None
    receipts: list[Receipt] = field(default_factory=list)
    last_id: str | None = None
    connects: int = 0
    resets: int = 0
    offline: list[Window] = field(default_factory=list)

    def take(
        self, data: bytes | str, *, entry_id: str | None = None, replayed: bool = False
    ) -> None:
        """Record an envelope received now (and its stream id, if it has one)."""
        event = ev.decode(data)
        self.receipts.append(
            Receipt(int(event.payload["n"]), event.occurred_at, self.clock(), replayed)
        )
        if entry_id is not None:
            self.last_id = entry_id
        self.on_receipt()


class Client:
    """One phone of one design. ``connect`` returns once the phone is connected
    and receiving (subscribed, or replayed and live); ``disconnect`` drops it."""

    def __init__(self, ctx: RunContext, inbox: Inbox) -> None:
        self.ctx = ctx
        self.inbox = inbox

    async def connect(self) -> None:
        raise NotImplementedError

    async def disconnect(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Probe:
    """What an operator can read from Redis about the fan-out step's backlog.

    ``backlog``: events produced but not yet handled (group ``lag`` + pending);
    ``pending``: read by the consumer but not acknowledged. ``None``: the design
    keeps nothing an operator could ask about.
    """

    backlog: int | None
    pending: int | None


class Design:
    """Base of the three designs; one run at a time per instance.

    ``start`` is called with the run's context before any phone connects and
    must return once the fan-out step is ready; ``stop`` after the run.
    """

    name = ""

    def __init__(self) -> None:
        self.ctx: RunContext | None = None

    async def start(self, ctx: RunContext) -> None:
        self.ctx = ctx

    async def publish(self, event: ev.Event) -> None:
        """Produce one event (the producer's only job)."""
        raise NotImplementedError

    def client(self, inbox: Inbox) -> Client:
        raise NotImplementedError

    async def worker_down(self) -> None:
        """Crash the fan-out step at its next event (see the schedule's crash_point)."""
        raise NotImplementedError

    async def worker_up(self) -> None:
        """Bring the fan-out step back, as a restarted process under the same name."""
        raise NotImplementedError

    async def probe(self, admin: aioredis.Redis) -> Probe:
        """The backlog as Redis shows it, or ``Probe(None, None)``."""
        return Probe(None, None)

    async def depth(self, admin: aioredis.Redis) -> int | None:
        """Entries kept for the phones (XLEN of their streams), or ``None``."""
        return None

    def extra(self) -> dict[str, float]:
        """Design-specific counters for the results row."""
        return {}

    async def stop(self) -> None:
        raise NotImplementedError


async def close_quietly(*closers: Callable[[], object]) -> None:
    """Await each closer, ignoring errors: the connection may be broken already."""
    for closer in closers:
        with contextlib.suppress(Exception):
            result = closer()
            if hasattr(result, "__await__"):
                await result  # type: ignore[misc]


async def stop_task(task: asyncio.Task[Any] | None, *, attempts: int = 100) -> None:
    """Cancel ``task`` and wait until it has ended, cancelling again if needed.

    Once is not always enough: on Python 3.11 redis-py's async client sends
    each command through ``asyncio.wait_for`` (when a socket timeout is set),
    and 3.11's ``wait_for`` returns normally if the cancellation lands just as
    the send completes (CPython gh-86296, fixed in 3.12). The cancellation is
    then lost and a read loop carries on for ever. So: cancel, wait a little,
    repeat. A task that ended with a Redis error ends quietly (the connection
    is going away anyway); any other error is raised.
    """
    if task is None:
        return
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.done():
        raise RuntimeError(f"{task!r} did not stop after {attempts} cancellations")
    if not task.cancelled():
        error = task.exception()
        if error is not None and not isinstance(error, redis.RedisError | OSError):
            raise error
