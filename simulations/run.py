"""One simulation run: build the world, run it in virtual time, write the tables.

Phases: *load* (``run.duration_s``: arrivals, faults), then *drain*
(``run.drain_s``: no new escrows, faults healed, every consumer alive) so the
checker can tell lost from unseen. Everything random comes from one
``numpy.random.SeedSequence(seed)``, spawned per model, so a run is a function
of (scenario, seed): the same tables every time, apart from wall-clock columns
and Redis entry ids (Redis assigns those from its own clock).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
import simpy
from sqlalchemy import select

from simulations.clock import SimClock
from simulations.gateway import MpesaGateway
from simulations.market import Market
from simulations.phones import Phone, ServerFaults, ServerPool
from simulations.runtime import Runtime, backlog
from simulations.scenario import Scenario
from workbench import events as ev
from workbench.escrow import DomainError, Timeouts
from workbench.handlers import HANDLERS, aggregate_types_of, make_handler
from workbench.ids import IdFactory
from workbench.log import StreamNames, connect
from workbench.mpesa import CallbackError, parse_callback
from workbench.redis_server import RedisServer, attach_or_start
from workbench.runs import RunTables
from workbench.service import EscrowService
from workbench.store import (
    Store,
    dispute_timeline,
    escrows,
    ledger_entries,
    notifications,
    outbox,
)
from workbench.userstreams import UserStreamNames

Progress = Callable[[float, float], None]


class RedisFaults:
    """kill -9 the redis-server every ``restart_every_s`` and restart it from its AOF."""

    def __init__(
        self,
        env: simpy.Environment,
        server: RedisServer | None,
        params: dict[str, Any],
        faults: list[dict[str, Any]],
        until: float,
    ) -> None:
        self.env, self.server, self.p, self.faults, self.until = env, server, params, faults, until

    def run(self) -> Any:
        every = self.p["restart_every_s"]
        if every <= 0 or self.server is None:
            return
        while True:
            yield self.env.timeout(every)
            if self.env.now >= self.until:
                return
            fault = {"t_start": self.env.now, "t_end": None, "kind": "redis_kill",
                     "target": "redis-server", "detail": "SIGKILL, restart from AOF"}  # fmt: skip
            self.faults.append(fault)
            self.server.kill()
            yield self.env.timeout(self.p["down_for_s"])
            self.server.restart()
            fault["t_end"] = self.env.now


def simulate(
    scenario: Scenario,
    seed: int,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
    prefix: str = "sim",
) -> RunTables:
    """Run ``scenario`` with ``seed``; return its tables (see :mod:`workbench.runs`)."""
    started = time.monotonic()
    params = scenario.params
    run_p = params["run"]
    load_s, drain_s = run_p["duration_s"], run_p["drain_s"]
    work = Path(tempfile.mkdtemp(prefix="workbench-sim-"))
    with attach_or_start(redis_url, work / "redis", appendonly=True, appendfsync="everysec") as (
        url,
        server,
    ):
        client = connect(url)
        names = StreamNames(prefix)
        _clear(client, prefix)
        store = Store(f"sqlite:///{work / 'store.db'}")
        store.reset()
        env = simpy.Environment()
        clock = SimClock(env, run_p["epoch"])
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
        commands: list[dict[str, Any]] = []
        faults: list[dict[str, Any]] = []
        deliveries: list[dict[str, Any]] = []
        samples: list[dict[str, Any]] = []

        def record(
            command: str, escrow_id: str | None, actor: str, ok: bool, error: str | None
        ) -> None:
            commands.append({"t": env.now, "command": command, "escrow_id": escrow_id,
                             "actor": actor, "ok": ok, "error": error})  # fmt: skip

        m = params["market"]
        service = EscrowService(
            store,
            clock=clock,
            ids=IdFactory(seed),
            timeouts=Timeouts(
                payment=m["payment_timeout_s"],
                shipping=m["shipping_timeout_s"],
                confirmation=m["confirmation_timeout_s"],
            ),
        )

        def callback(body: dict[str, Any]) -> None:
            checkout = body["Body"]["stkCallback"]["CheckoutRequestID"]
            try:
                result = service.record_payment_result(parse_callback(body))
            except (DomainError, CallbackError) as exc:
                record("callback", None, "mpesa", False, f"{checkout}: {exc}")
                return
            record("callback", None, "mpesa", True, "duplicate" if result.replayed else None)

        service.gateway = MpesaGateway(env, rngs[0], params["mpesa"], callback)
        runtime = Runtime(env, clock, service, store, client, names, params, faults)
        inner_record = record

        def record(
            command: str, escrow_id: str | None, actor: str, ok: bool, error: str | None
        ) -> None:  # noqa: E501, F811
            inner_record(command, escrow_id, actor, ok, error)
            if ok:
                runtime.nudge()  # the outbox has rows: wake the relay (its BLOCK)

        market = Market(env, rngs[1], m, service, record, until=load_s)
        env.process(market.run())
        env.process(runtime.relay_loop())
        env.process(runtime.timer_loop())
        env.process(runtime.sampler(run_p["sample_every_s"], samples))
        for i, group in enumerate(runtime.groups):
            env.process(
                runtime.consumer_loop(group, np.random.default_rng(rngs[4].integers(2**63) + i))
            )
            env.process(
                runtime.crash_loop(group, np.random.default_rng(rngs[2].integers(2**63) + i))
            )
        env.process(RedisFaults(env, server, params["redis"], faults, load_s).run())
        user_names = UserStreamNames(prefix)
        phones = [
            Phone(env, np.random.default_rng(rngs[3].integers(2**63)), params["phones"],
                  market.buyers[i % len(market.buyers)], client, user_names, deliveries)
            for i in range(min(params["phones"]["count"], len(market.buyers)))
        ]  # fmt: skip
        pool = ServerPool(params["servers"]["count"])
        for phone in phones:
            phone.pool = pool
            pool.phones.append(phone)
            env.process(phone.run())
        server_faults = ServerFaults(env, rngs[5], params["servers"], pool, faults, load_s)
        for server in range(params["servers"]["count"]):
            env.process(server_faults.run(server))

        total = load_s + drain_s
        step = max(total / 200, 1.0)
        t = 0.0
        while t < total:
            t = min(total, t + step)
            if t >= load_s and not runtime.healed:
                if env.now < load_s:
                    env.run(until=load_s)
                runtime.heal()
            if t > env.now:
                env.run(until=t)
            if progress:
                progress(t, total)
        runtime.finish()
        for phone in phones:
            phone.stop = True
            phone.final_drain()

        tables = collect(
            store, client, names, user_names, runtime.groups,
            {g: slot.log for g, slot in runtime.slots.items()}, clock.epoch, market,
            commands, faults, deliveries, samples, phones,
        )  # fmt: skip
        tables.manifest = _manifest(scenario, seed, started, load_s, drain_s, url, server)
        client.close()
        store.close()
    return tables


def _clear(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


def collect(
    store: Store,
    client: redis.Redis,
    names: StreamNames,
    user_names: UserStreamNames,
    groups: tuple[str, ...],
    logs: dict[str, dict[str, list[Any]]],
    epoch: float,
    market: Market,
    commands: list[dict[str, Any]],
    faults: list[dict[str, Any]],
    deliveries: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    phones: list[Phone],
) -> RunTables:
    """The run's tables from what the store and Redis hold at the end, plus what the
    models recorded on the way (``logs``: handler calls per group and event)."""
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox).order_by(outbox.c.seq)).all()
        escrow_rows = conn.execute(
            select(escrows).order_by(escrows.c.created_at, escrows.c.id)
        ).all()
        ledger_rows = conn.execute(
            select(ledger_entries.c.event_id, ledger_entries.c.escrow_id,
                   ledger_entries.c.account, ledger_entries.c.amount)
            .order_by(ledger_entries.c.id)
        ).all()  # fmt: skip
        effect_rows = {
            "ledger": conn.execute(select(ledger_entries.c.event_id)).scalars().all(),
            "notifications": conn.execute(
                select(notifications.c.event_id).where(notifications.c.channel == "sms")
            )
            .scalars()
            .all(),
            "push": conn.execute(
                select(notifications.c.event_id).where(notifications.c.channel == "push")
            )
            .scalars()
            .all(),
            "disputes": conn.execute(select(dispute_timeline.c.event_id)).scalars().all(),
        }
    events = [ev.decode(r.data) for r in rows]
    published = pd.DataFrame(
        {
            "event_id": [e.event_id for e in events],
            "type": [e.type for e in events],
            "stream": [e.aggregate_type for e in events],
            "escrow_id": [e.escrow_id for e in events],
            "sequence": [e.sequence for e in events],
            "users": [",".join(e.user_ids) for e in events],
            "amount": [int(e.payload.get("amount") or 0) for e in events],
            "t_committed": [r.created_at - epoch for r in rows],
            "t_published": [
                (r.published_at - epoch) if r.published_at is not None else None for r in rows
            ],
        }
    )
    # Effects found at the end, per group and event, against what the handler makes.
    user_rows = []
    for key in client.scan_iter(match=f"{user_names.prefix}:user:*", count=1000):
        user = key.decode().split(":", 2)[2]
        for entry_id, fields in client.xrange(key):
            user_rows.append((user, entry_id.decode(), fields[b"event_id"].decode()))
    user_rows.sort(key=lambda r: (r[0], tuple(map(int, r[1].split("-")))))
    effect_rows["fanout"] = [r[2] for r in user_rows]
    handlers = {g: make_handler(g, store) for g in HANDLERS}
    handled_rows = []
    for group in groups:
        log = logs[group]
        counts = pd.Series(effect_rows[group], dtype=object).value_counts().to_dict()
        types = aggregate_types_of(group)
        for e in events:
            if e.aggregate_type not in types:
                continue
            calls, max_dc, t_first, t_last = log.get(e.event_id, [0, 0, None, None])
            expected = len(set(e.user_ids)) if group == "fanout" else len(handlers[group].rows(e))
            handled_rows.append(
                {"group": group, "event_id": e.event_id, "handler_calls": calls,
                 "max_delivery_count": max_dc,
                 "t_first": None if t_first is None else t_first - epoch,
                 "t_last": None if t_last is None else t_last - epoch,
                 "effects": int(counts.get(e.event_id, 0)), "expected_effects": expected}
            )  # fmt: skip
    final = []
    for group in groups:
        pending, _, lag = backlog(client, names, group)
        final.append({"group": group, "pending": pending, "lag": lag})
    classes = market.escrows
    return RunTables(
        commands=_frame("commands", commands),
        published=published,
        handled=_frame("handled", handled_rows),
        final=pd.DataFrame(final),
        user_streams=pd.DataFrame(user_rows, columns=["user", "entry_id", "event_id"]),
        deliveries=_frame("deliveries", deliveries),
        phones=pd.DataFrame(
            {"phone": [p.user for p in phones], "start_after": ["0-0"] * len(phones)}
        ),
        samples=_frame("samples", samples),
        faults=_frame("faults", faults),
        escrows=pd.DataFrame(
            {
                "id": [r.id for r in escrow_rows],
                "buyer_id": [r.buyer_id for r in escrow_rows],
                "seller_id": [r.seller_id for r in escrow_rows],
                "amount": [int(r.amount) for r in escrow_rows],
                "state": [r.state for r in escrow_rows],
                "seller_class": [classes.get(r.id, ("?", "?"))[0] for r in escrow_rows],
                "buyer_class": [classes.get(r.id, ("?", "?"))[1] for r in escrow_rows],
            }
        ),
        ledger=pd.DataFrame(
            [tuple(r) for r in ledger_rows], columns=["event_id", "escrow_id", "account", "amount"]
        ),
    )


def _frame(table: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    from workbench.runs import COLUMNS

    return pd.DataFrame(rows, columns=COLUMNS[table])


def _manifest(
    scenario: Scenario,
    seed: int,
    started: float,
    load_s: float,
    drain_s: float,
    url: str,
    server: RedisServer | None,
) -> dict[str, Any]:
    versions = {}
    for package in ("escrow-workbench", "simpy", "redis", "sqlalchemy", "pandas", "numpy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).parent, timeout=5,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        sha = None
    return {
        "scenario": scenario.name,
        "seed": seed,
        "params": scenario.params,
        "virtual_seconds": load_s + drain_s,
        "wall_seconds": round(time.monotonic() - started, 3),
        "redis": "external" if server is None else f"private redis-server {url}",
        "versions": versions,
        "git_sha": sha,
    }
