"""The load generator for ``workbench serve``: phones on SSE, escrow lifecycles over HTTP.

What one :func:`run_step` guarantees, given a running ``serve`` (relay,
workers, fan-out, ``--mpesa sim``) and :class:`Phones` connected for every
user:

* **Open-loop arrivals.** Lifecycle ``i`` of a step starts at ``t0 + i / rate``
  (evenly spaced, whatever happened to the ones before): a slow server does
  not slow the arrivals, it makes the work pile up, as real phones would. When
  this process itself falls behind its schedule (it shares the cores with the
  server), the lateness is recorded and the step does not count as kept up.
* **A lifecycle is the phones' own.** The buyer creates and funds; the
  simulated M-Pesa calls back over HTTP; the buyer's phone sees
  ``escrow.funded`` on its SSE stream (on ``payment.failed`` it funds again,
  up to :data:`MAX_FUNDS` times); the seller ships, the buyer confirms, and
  the lifecycle ends when both phones have received ``payout.sent``. Every
  command is timed from request to response (its latency, per command kind).
* **Every phone got its events.** After a step, each phone's received SSE ids
  must equal its user stream in Redis (``XRANGE``), in order, nothing missing
  or doubled; a phone whose stream ended counts as failing.
* **Group lag in seconds.** While a step runs, :func:`sample_lag` reads
  :func:`workbench.ops.inspection.inspect` every :data:`LAG_EVERY_S`: per
  consumer group, the largest of its lag (age of the oldest entry not yet
  delivered to it) and its oldest pending entry's age; and the relay's, the
  age of the oldest unpublished outbox row (``/healthz``).
* **Delivery latency.** For every event a phone receives: its receipt time
  minus the envelope's ``occurred_at`` (the command's commit time, the same
  host clock), i.e. command committed -> outbox -> relay -> fan-out -> SSE.

Decisions are pure (:func:`quantiles_ms`, :func:`step_verdict`); the
I/O around them is thin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis

from bench.sse import SseConnection, close_all, collector_frozen, ramp
from workbench.http.auth import issue_token
from workbench.ops.inspection import inspect
from workbench.streams.keys import StreamNames, UserStreamNames

MAX_FUNDS = 5  # fund attempts per lifecycle (the simulated M-Pesa fails 10% of payments)
LAG_EVERY_S = 0.5
LAST_EVENT = "payout.sent"  # a released escrow's last event, sent to both phones
TOKEN_TTL_S = 24 * 3600.0


class LifecycleFailed(Exception):
    """A command was refused (``reason`` e.g. ``create 500``), or payment kept failing."""

    def __init__(self, reason: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.status = reason, status


# -- pure decisions ---------------------------------------------------------------------


def quantiles_ms(seconds: Iterable[float]) -> dict[str, float | None]:
    """p50, p99 and max in milliseconds (``None`` with no values)."""
    values = sorted(seconds)
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 2)

    return {"count": len(values), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": at(1.0)}


@dataclass(frozen=True)
class Bounds:
    """What "keeping up" means: the thresholds a step is judged against."""

    lag_s: float  # every group's lag and oldest pending age stay at or below this
    p99_ms: float  # p99 of all command latencies
    late_s: float  # the generator's own lateness: above it, the step says nothing


@dataclass
class StepResult:
    """One step at one offered rate: what was offered, done, seen and measured."""

    rate: float
    window_s: float
    started: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    commands: int = 0
    refunds: int = 0  # fund attempts after a payment.failed
    retries: int = 0  # fund answered 409 payment_in_progress / 503: sent again
    max_late_s: float = 0.0  # how far behind its schedule the generator started one
    command_latency: dict[str, Any] = field(default_factory=dict)
    latency_by_command: dict[str, Any] = field(default_factory=dict)
    lifecycle_seconds: dict[str, Any] = field(default_factory=dict)
    delivery_latency: dict[str, Any] = field(default_factory=dict)
    group_lag_s: dict[str, float] = field(default_factory=dict)  # worst seen per group
    phones: int = 0
    phones_exact: int = 0
    phones_closed: int = 0
    wall_s: float = 0.0  # first arrival to the last lifecycle's end
    cpu_cores: dict[str, float] = field(default_factory=dict)  # CPU s per window s, by process
    settle_s: float | None = None  # after the step, until groups and phones caught up
    keeps_up: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_verdict(step: StepResult, bounds: Bounds) -> list[str]:
    """Why ``step`` did not keep up (empty: it did)."""
    reasons = []
    if step.completed < step.started or step.failed:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(step.failed.items()))
        reasons.append(f"{step.completed} of {step.started} lifecycles completed ({failed})")
    worst = max(step.group_lag_s.values(), default=0.0)
    if worst > bounds.lag_s:
        group = max(step.group_lag_s, key=step.group_lag_s.__getitem__)
        reasons.append(f"group {group} fell {worst:.2f} s behind (bound {bounds.lag_s:g} s)")
    p99 = step.command_latency.get("p99_ms")
    if p99 is None or p99 > bounds.p99_ms:
        reasons.append(f"command latency p99 {p99} ms (bound {bounds.p99_ms:g} ms)")
    if step.phones_exact < step.phones:
        reasons.append(f"{step.phones - step.phones_exact} of {step.phones} phones not exact")
    if step.max_late_s > bounds.late_s:
        reasons.append(
            f"the load generator started a lifecycle {step.max_late_s:.2f} s late "
            f"(bound {bounds.late_s:g} s): it could not offer the rate"
        )
    return reasons


# -- phones -----------------------------------------------------------------------------


class Phones:
    """One SSE connection per user, held for the whole run; what each one received."""

    def __init__(self, host: str, port: int, users: list[str], secret: str) -> None:
        self.users = users
        self.tokens = {u: issue_token(u, secret, ttl_s=TOKEN_TTL_S) for u in users}
        self.conns = {
            u: SseConnection(host, port, u, self.tokens[u], on_event=self._on_event) for u in users
        }
        self.ids: dict[str, list[bytes]] = defaultdict(list)  # SSE ids per user, in order
        self.seen: dict[tuple[str, str], list[str]] = defaultdict(list)  # (user, escrow) -> types
        self.signals: dict[tuple[str, str], asyncio.Event] = defaultdict(asyncio.Event)
        self.delivery_s: list[float] = []  # receipt - occurred_at, for the current step

    def _on_event(self, conn: SseConnection, sse_id: bytes | None, data: bytes, now: int) -> None:
        envelope = json.loads(data)
        key = (conn.user, envelope["aggregate_id"])
        self.ids[conn.user].append(sse_id or b"")
        self.seen[key].append(envelope["type"])
        self.delivery_s.append(now / 1e9 - float(envelope["occurred_at"]))
        self.signals[key].set()

    async def connect(self, timeout: float) -> dict[str, int]:
        """Open every phone's stream (from now) and read until ``ready``; failures by reason."""
        return await ramp(list(self.conns.values()), concurrency=50, timeout=timeout)

    async def wait_for(
        self, user: str, escrow: str, wanted: set[str], start: int
    ) -> tuple[str, int]:
        """The first of ``wanted`` among the events ``user`` got for ``escrow`` from index
        ``start`` on, and the index after it."""
        key = (user, escrow)
        while True:
            seen = self.seen[key]
            for i in range(start, len(seen)):
                if seen[i] in wanted:
                    return seen[i], i + 1
            start = len(seen)
            self.signals[key].clear()
            await self.signals[key].wait()

    def check(self, client: redis.Redis, names: UserStreamNames) -> tuple[int, int]:
        """(phones whose received ids equal their user stream, phones whose stream ended)."""
        exact = closed = 0
        for user, conn in self.conns.items():
            stream = [entry_id for entry_id, _ in client.xrange(names.stream(user))]
            exact += int(stream == self.ids[user] and conn.ended is None)
            closed += int(conn.ended is not None or not conn.ready)
        return exact, closed

    def received_all(self, client: redis.Redis, names: UserStreamNames) -> bool:
        """Every phone has at least as many events as its user stream holds."""
        return all(client.xlen(names.stream(u)) <= len(self.ids[u]) for u in self.users)

    async def close(self) -> None:
        await close_all(list(self.conns.values()))


# -- lifecycles ---------------------------------------------------------------------------


@dataclass
class Driver:
    """Drives lifecycles for one step and counts what happened."""

    http: httpx.AsyncClient
    phones: Phones
    deadline: float  # time.perf_counter() by which every lifecycle of the step must end
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lifecycle_s: list[float] = field(default_factory=list)
    failed: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    completed: int = 0
    commands: int = 0
    refunds: int = 0
    retries: int = 0

    async def command(self, kind: str, user: str, path: str, body: dict[str, Any]) -> Any:
        headers = {"Authorization": f"Bearer {self.phones.tokens[user]}"}
        started = time.perf_counter()
        response = await self.http.post(path, json=body, headers=headers)
        self.latencies[kind].append(time.perf_counter() - started)
        self.commands += 1
        if response.status_code >= 400:
            status = response.status_code
            raise LifecycleFailed(f"{kind} {status}", response.text[:200], status)
        return response.json()

    async def fund(self, escrow: str, buyer: str) -> None:
        """Fund; a push in flight (409) or a gateway hiccup (503) is sent again."""
        for _ in range(MAX_FUNDS):
            try:
                await self.command("fund", buyer, f"/escrows/{escrow}/fund", {})
                return
            except LifecycleFailed as exc:
                if exc.status not in (409, 503):
                    raise
                self.retries += 1
                await asyncio.sleep(0.2)  # a backoff, not a wait for a condition
        raise LifecycleFailed(f"fund refused {MAX_FUNDS} times")

    async def lifecycle(self, index: int, buyer: str, seller: str) -> None:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, self.deadline - started)):
                await self._lifecycle(index, buyer, seller)
        except TimeoutError:
            self.failed["timed out"] += 1
        except LifecycleFailed as exc:
            self.failed[exc.reason] += 1
        except httpx.HTTPError as exc:
            self.failed[type(exc).__name__] += 1
        else:
            self.completed += 1
            self.lifecycle_s.append(time.perf_counter() - started)

    async def _lifecycle(self, index: int, buyer: str, seller: str) -> None:
        body = {"buyer_id": buyer, "seller_id": seller, "amount": 500 + index % 50 * 100}
        created = await self.command("create", buyer, "/escrows", body)
        escrow = created["escrow"]["id"]
        position = 0
        for attempt in range(MAX_FUNDS):
            self.refunds += attempt > 0
            await self.fund(escrow, buyer)
            outcome, position = await self.phones.wait_for(
                buyer, escrow, {"escrow.funded", "payment.failed"}, position
            )
            if outcome == "escrow.funded":
                break
        else:
            raise LifecycleFailed(f"payment failed {MAX_FUNDS} times")
        await self.command("ship", seller, f"/escrows/{escrow}/ship", {"tracking": f"T{index}"})
        await self.command("confirm", buyer, f"/escrows/{escrow}/confirm", {})
        for user in (buyer, seller):
            await self.phones.wait_for(user, escrow, {LAST_EVENT}, 0)


def pair(index: int, users: list[str]) -> tuple[str, str]:
    """Lifecycle ``index``'s buyer and seller: two different users, every user in turn."""
    n = len(users)
    offset = 1 + (index // n) % (n - 1)  # 1 .. n-1: never the buyer, pairs vary by lap
    return users[index % n], users[(index + offset) % n]


# -- a step ---------------------------------------------------------------------------------


async def sample_lag(
    client: redis.Redis, names: StreamNames, http: httpx.AsyncClient, worst: dict[str, float]
) -> None:
    """Until cancelled: the worst lag / oldest pending age per group, in seconds, and the
    relay's (``relay``: the oldest unpublished outbox row's age, from ``/healthz``)."""
    while True:
        snapshot = await asyncio.to_thread(inspect, client, names)
        for row in snapshot.groups:
            behind = max(row["lag_s"] or 0.0, row["oldest_pending_age_s"] or 0.0)
            worst[row["group"]] = max(worst.get(row["group"], 0.0), round(behind, 3))
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            outbox = (await http.get("/healthz")).json()["outbox"]
            age = outbox.get("oldest_unpublished_age_s") or 0.0
            worst["relay"] = max(worst.get("relay", 0.0), round(float(age), 3))
        await asyncio.sleep(LAG_EVERY_S)


async def _arrivals(driver: Driver, rate: float, count: int, users: list[str], first: int) -> float:
    """Start ``count`` lifecycles at ``rate``, open loop; return the worst lateness (s)."""
    tasks, late = [], 0.0
    t0 = time.perf_counter()
    for i in range(count):
        due = t0 + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        late = max(late, -delay)
        buyer, seller = pair(first + i, users)
        tasks.append(asyncio.create_task(driver.lifecycle(first + i, buyer, seller)))
    await asyncio.gather(*tasks)
    return late


async def run_step(
    driver: Driver,
    client: redis.Redis,
    names: StreamNames,
    rate: float,
    window_s: float,
    drain_s: float,
    first: int,
) -> StepResult:
    """Offer ``rate`` lifecycles/s for ``window_s``; wait for them to end, at most
    ``drain_s`` after the window (later ones count as timed out)."""
    count = max(1, round(rate * window_s))
    driver.deadline = time.perf_counter() + window_s + drain_s
    worst: dict[str, float] = {}
    driver.phones.delivery_s.clear()
    sampler = asyncio.create_task(sample_lag(client, names, driver.http, worst))
    started = time.perf_counter()
    try:
        # The instrument's full collections would stall every phone and request
        # in flight: what it holds is frozen out of them for the step.
        with collector_frozen():
            late = await _arrivals(driver, rate, count, driver.phones.users, first)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    every = [s for values in driver.latencies.values() for s in values]
    return StepResult(
        rate=rate,
        window_s=window_s,
        started=count,
        completed=driver.completed,
        failed=dict(driver.failed),
        commands=driver.commands,
        refunds=driver.refunds,
        retries=driver.retries,
        max_late_s=round(late, 3),
        command_latency=quantiles_ms(every),
        latency_by_command={k: quantiles_ms(v) for k, v in sorted(driver.latencies.items())},
        lifecycle_seconds={
            "median": round(statistics.median(driver.lifecycle_s), 3)
            if driver.lifecycle_s
            else None,
            "max": round(max(driver.lifecycle_s), 3) if driver.lifecycle_s else None,
        },
        delivery_latency=quantiles_ms(driver.phones.delivery_s),
        group_lag_s=worst,
        wall_s=round(time.perf_counter() - started, 3),
    )
