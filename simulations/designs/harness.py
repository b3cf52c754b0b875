"""Drive one design through a schedule against a real Redis, and measure it.

A run, in order:

1. A fresh key prefix; an admin connection (the harness's own, named
   ``<prefix>:sampler``); the baseline ``connected_clients``.
2. The design starts its fan-out step; every phone connects and is ready.
3. ``INFO all`` (commands, CPU, per-command counts), then production starts
   at ``t0``: the producer publishes each planned event at its time, while the
   fault task crashes and restarts the fan-out step and takes phones offline
   and back, all as the schedule says. A sampler reads ``INFO clients``,
   ``CLIENT LIST`` and the design's backlog probe every ``sample_every_s``.
4. **Drain**: wait until the design reports no backlog and no phone has
   received anything for ``settle_s`` (or ``drain_timeout_s`` passed).
5. ``INFO all`` again; then stream depths and key counts; then everything is
   stopped and the prefix's keys deleted.

The measurements are defined in :mod:`simulations.designs.scoring`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pandas as pd
import redis.asyncio as aioredis

from simulations.designs.base import (
    Client,
    Design,
    Inbox,
    Probe,
    RunContext,
    make_event,
    stop_task,
)
from simulations.designs.schedule import Schedule, Window
from simulations.designs.scoring import DesignResult, Sample, score

T = TypeVar("T")


class _Sampler:
    """Reads connections and backlog every ``every_s`` on the admin connection."""

    def __init__(
        self, admin: aioredis.Redis, design: Design, prefix: str, every_s: float, t0: float
    ) -> None:
        self.admin, self.design, self.prefix = admin, design, prefix
        self.every_s, self.t0 = every_s, t0
        self.samples: list[Sample] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            info = await self.admin.info("clients")
            roles: dict[str, int] = {}
            for client in await self.admin.client_list():
                name = str(client.get("name", ""))
                if name.startswith(f"{self.prefix}:"):
                    role = name.split(":", 1)[1]
                    roles[role] = roles.get(role, 0) + 1
            probe = await self.design.probe(self.admin)
            self.samples.append(
                Sample(
                    loop.time() - self.t0,
                    int(info["connected_clients"]),
                    roles,
                    probe.backlog,
                    probe.pending,
                )
            )
            await asyncio.sleep(self.every_s)


async def _counters(admin: aioredis.Redis) -> dict[str, float]:
    info = await admin.info("all")
    out = {
        "total": float(info["total_commands_processed"]),
        "cpu": float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
    }
    for key, value in info.items():
        if key.startswith("cmdstat_"):
            out[key.removeprefix("cmdstat_")] = float(value["calls"])
    return out


async def run_design_async(
    design: Design,
    schedule: Schedule,
    redis_url: str,
    *,
    clock: Callable[[], float] = time.time,
    sample_every_s: float = 0.05,
) -> DesignResult:
    """:func:`run_design` for callers already inside an event loop."""
    loop = asyncio.get_running_loop()
    ctx = RunContext(redis_url, f"dz{secrets.token_hex(4)}", schedule, clock)
    admin = ctx.connect("sampler", single_connection_client=True)
    activity = [loop.time()]
    inboxes = {
        u: Inbox(u, clock, on_receipt=lambda: activity.__setitem__(0, loop.time()))
        for u in schedule.users
    }
    clients: dict[str, Client] = {}
    produced_at: list[float] = [math.nan] * len(schedule.events)
    downtime: list[Window] = []
    started = False
    sampler_task: asyncio.Task[None] | None = None
    try:
        baseline = int((await admin.info("clients"))["connected_clients"])
        await design.start(ctx)
        started = True
        sampler = _Sampler(admin, design, ctx.prefix, sample_every_s, t0=loop.time())
        sampler_task = asyncio.create_task(sampler.run())
        clients = {u: design.client(inboxes[u]) for u in schedule.users}
        await asyncio.gather(*(c.connect() for c in clients.values()))

        before = await _counters(admin)
        t0 = sampler.t0 = loop.time()
        work = [
            asyncio.create_task(_produce(design, schedule, t0, clock, produced_at)),
            asyncio.create_task(_faults(design, schedule, clients, inboxes, t0, downtime)),
        ]
        try:
            await asyncio.gather(*work)
        finally:  # if one failed, the other must not go on behind our back
            for task in work:
                if not task.done():
                    await stop_task(task)
        activity[0] = max(activity[0], loop.time())
        drained = await _drain(design, admin, schedule, activity)
        window_s = loop.time() - t0
        await stop_task(sampler_task)
        after = await _counters(admin)
        depth = await design.depth(admin)
        keys = [k async for k in admin.scan_iter(match=f"{ctx.prefix}:*", count=1000)]
    finally:
        await stop_task(sampler_task)
        await asyncio.gather(*(c.disconnect() for c in clients.values()), return_exceptions=True)
        if started:
            await design.stop()
        await _delete_prefix(admin, ctx.prefix)
        await admin.aclose()

    return score(
        design,
        schedule,
        inboxes,
        produced_at,
        downtime[0] if downtime else None,
        sampler.samples,
        baseline=baseline,
        before=before,
        after=after,
        window_s=window_s,
        depth=depth,
        redis_keys=len(keys),
        drained=drained,
    )


async def _produce(
    design: Design,
    schedule: Schedule,
    t0: float,
    clock: Callable[[], float],
    produced_at: list[float],
) -> None:
    """Publish each planned event at its time (the schedule's own pacing)."""
    loop = asyncio.get_running_loop()
    for planned in schedule.events:
        delay = t0 + planned.at_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        produced_at[planned.index] = loop.time() - t0
        await design.publish(make_event(planned, clock()))


async def _faults(
    design: Design,
    schedule: Schedule,
    clients: dict[str, Client],
    inboxes: dict[str, Inbox],
    t0: float,
    downtime: list[Window],
) -> None:
    """Crash and restart the fan-out step; take phones offline and back; record when."""
    loop = asyncio.get_running_loop()

    async def until(t_s: float) -> float:
        delay = t0 + t_s - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        return loop.time() - t0

    async def fan_out_down() -> None:
        start = await until(schedule.downtime.start_s)
        await design.worker_down()
        # At least the planned length from when it really went down (a late wake-up
        # for the start would otherwise shorten it).
        await until(max(schedule.downtime.end_s, start + schedule.downtime_s))
        await design.worker_up()
        downtime.append(Window(start, loop.time() - t0))

    async def offline(user: str, planned: Window) -> None:
        start = await until(planned.start_s)
        await clients[user].disconnect()
        await until(planned.end_s)
        await clients[user].connect()
        inboxes[user].offline.append(Window(start, loop.time() - t0))

    tasks = [offline(d.user, d.window) for d in schedule.disconnects]
    if schedule.downtime_s > 0:
        tasks.append(fan_out_down())
    await asyncio.gather(*tasks)


async def _drain(
    design: Design, admin: aioredis.Redis, schedule: Schedule, activity: list[float]
) -> bool:
    """Wait for no backlog and ``settle_s`` without a receipt; False on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + schedule.drain_timeout_s
    while loop.time() < deadline:
        if loop.time() - activity[0] >= schedule.settle_s:
            probe: Probe = await design.probe(admin)
            if not probe.backlog:
                return True
        await asyncio.sleep(0.02)
    return False


async def _delete_prefix(admin: aioredis.Redis, prefix: str) -> None:
    with contextlib.suppress(Exception):  # best effort: a private prefix either way
        keys = [k async for k in admin.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await admin.unlink(*keys[i : i + 500])


def _run_sync(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion, also from inside a running loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def run_design(
    design: Design,
    schedule: Schedule,
    redis_url: str,
    *,
    clock: Callable[[], float] = time.time,
    sample_every_s: float = 0.05,
) -> DesignResult:
    """Drive ``design`` through ``schedule`` against the Redis at ``redis_url``."""
    return _run_sync(
        lambda: run_design_async(
            design, schedule, redis_url, clock=clock, sample_every_s=sample_every_s
        )
    )


def default_designs() -> list[Design]:
    """The three designs of notebook 03, in the table's order."""
    from simulations.designs.pubsub_only import PubSubOnly
    from simulations.designs.streams_only import StreamsOnly
    from simulations.designs.two_layer import StreamsPlusLocalPubSub

    return [PubSubOnly(), StreamsOnly(), StreamsPlusLocalPubSub()]


def run_all(
    schedule: Schedule,
    redis_url: str,
    designs: Sequence[Design] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> list[DesignResult]:
    """Run each design (default: all three) in turn on the same schedule."""
    return [run_design(d, schedule, redis_url, clock=clock) for d in designs or default_designs()]


def results_frame(results: Sequence[DesignResult]) -> pd.DataFrame:
    """One row per design, indexed by design name."""
    return pd.DataFrame([r.row() for r in results]).set_index("design")


def compare(
    schedule: Schedule,
    redis_url: str,
    designs: Sequence[Design] | None = None,
    *,
    clock: Callable[[], float] = time.time,
) -> pd.DataFrame:
    """:func:`run_all`, as the results table."""
    return results_frame(run_all(schedule, redis_url, designs, clock=clock))
