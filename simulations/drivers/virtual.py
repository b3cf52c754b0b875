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
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import redis
import simpy
from sqlalchemy import Connection, select

from simulations.analysis.handling import HandlingIndex
from simulations.analysis.tables import RunTables, RunWriter
from simulations.drivers.loops import Runtime, backlog
from simulations.models.clock import SimClock
from simulations.models.gateway import MpesaGateway
from simulations.models.market import Market
from simulations.models.phones import Phone, ServerFaults, ServerPool
from simulations.models.supervision import SupervisedRestarts
from simulations.scenario import Scenario
from workbench.delivery.entries import UserEntry
from workbench.domain import events as ev
from workbench.domain.escrow import Timeouts
from workbench.domain.ids import IdFactory
from workbench.handlers import HANDLERS, aggregate_types_of, make_handler
from workbench.ops import affinity
from workbench.ops.redis_server import RedisServer, paired
from workbench.payments.mpesa import token_of
from workbench.service import EscrowService, PaymentSettings
from workbench.store import (
    Store,
    analytics_facts,
    dispute_timeline,
    escrows,
    ledger_entries,
    notifications,
    outbox,
    risk_scores,
)
from workbench.streams.connection import connect
from workbench.streams.keys import StreamNames, UserStreamNames

Progress = Callable[[float, float], None]


class RedisFaults:
    """kill -9 the redis-server every ``restart_every_s``; serve's supervisor restarts it
    from its AOF after its backoff (``restarts``).

    The server runs with the scenario's ``appendfsync`` (``everysec``, what ``serve``
    ships, by default), so a kill can lose writes Redis acknowledged; the relay's
    repair puts lost stream entries back from the outbox (:mod:`workbench.streams.relay`).
    """

    def __init__(
        self,
        env: simpy.Environment,
        server: RedisServer | None,
        params: dict[str, Any],
        faults: list[dict[str, Any]],
        until: float,
        restarts: SupervisedRestarts,
        on_restart: Callable[[], int] | None = None,
    ) -> None:
        self.env, self.server, self.p, self.faults, self.until = env, server, params, faults, until
        self.restarts, self.on_restart = restarts, on_restart

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
            if lose := self.p["lose_last_writes"]:
                # What a kill during an everysec fsync does, every time: the last
                # acknowledged writes are gone (a prefix of the history survives).
                fault["detail"] += f"; lost the last {self.server.lose_last_writes(lose)} writes"
            down_for = self.restarts.down_for("redis-server", self.env.now)
            if down_for is None:
                fault["detail"] += f"; {self.restarts.given_up['redis-server']}"
                return
            yield self.env.timeout(down_for)
            self.server.restart()
            self.restarts.started("redis-server", self.env.now)
            if self.on_restart is not None and (lost := self.on_restart()):
                fault["detail"] += f"; {lost} user-stream entries lost"
            fault["t_end"] = self.env.now


def simulate(
    scenario: Scenario,
    seed: int,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
    prefix: str = "sim",
    out: str | Path | None = None,
    cpu: affinity.Choice = "auto",
) -> RunTables:
    """Run ``scenario`` with ``seed``; return its tables (see :mod:`simulations.analysis.tables`).

    The tables are written to ``out`` (a temporary directory if None) as the run
    goes, then loaded; :func:`simulate_to` writes without loading them.
    """
    if out is not None:
        simulate_to(
            scenario, seed, out, redis_url=redis_url, progress=progress, prefix=prefix, cpu=cpu
        )
        return RunTables.load(out)
    with tempfile.TemporaryDirectory(prefix="workbench-run-") as tmp:
        simulate_to(
            scenario, seed, tmp, redis_url=redis_url, progress=progress, prefix=prefix, cpu=cpu
        )
        return RunTables.load(tmp)


def simulate_to(
    scenario: Scenario,
    seed: int,
    out: str | Path,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
    prefix: str = "sim",
    cpu: affinity.Choice = "auto",
) -> dict[str, Any]:
    """Run ``scenario`` with ``seed``, writing its tables to ``out``; return the manifest.

    Rows go to disk as they are made (:class:`~simulations.analysis.tables.RunWriter`) and the
    end-of-run tables are built in chunks, so memory does not grow with run length.
    ``cpu``: the one CPU for this thread and the private redis-server, which
    talk in strict turns (:mod:`workbench.ops.affinity`); ``"auto"`` takes the CPU
    the scheduler has this process on, and only when the server is ours; None
    leaves both to the OS. Virtual time makes the tables the same either way.
    """
    started = time.monotonic()
    params = scenario.params
    run_p = params["run"]
    load_s, drain_s = run_p["duration_s"], run_p["drain_s"]
    on = affinity.resolve(None if redis_url and cpu == "auto" else cpu)
    writer = RunWriter(out)
    with (
        tempfile.TemporaryDirectory(prefix="workbench-sim-") as tmp,
        paired(
            redis_url,
            Path(tmp) / "redis",
            on,
            appendonly=True,
            appendfsync=params["redis"]["appendfsync"],
        ) as (url, server),  # fmt: skip
    ):
        work = Path(tmp)
        # One thread drives every part: one connection, no pool to check out from
        # (a third of redis-py's cost per call).
        client = connect(url, single_connection_client=True)
        names = StreamNames(prefix)
        _clear(client, prefix)
        store = Store(f"sqlite:///{work / 'store.db'}")
        store.reset()
        env = simpy.Environment()
        clock = SimClock(env, run_p["epoch"])
        rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
        commands, samples = writer["commands"], writer["samples"]
        faults: list[dict[str, Any]] = []  # small, and a fault's end is filled in later
        runtime: Runtime | None = None

        def record(
            command: str, escrow_id: str | None, actor: str, ok: bool, error: str | None
        ) -> None:
            commands.append({"t": env.now, "command": command, "escrow_id": escrow_id,
                             "actor": actor, "ok": ok, "error": error})  # fmt: skip
            if ok and runtime is not None:
                runtime.nudge()  # the outbox has rows: wake the relay (its BLOCK)

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
            payments=PaymentSettings(
                callback_base_url="sim://mpesa/callback",
                verify_after_s=params["mpesa"]["verify_after_s"],
                retry_s=params["mpesa"]["verify_retry_s"],
            ),
        )

        def callback(url: str, body: dict[str, Any]) -> None:
            # The claim is confirmed by a query that takes virtual time to answer.
            env.process(handle_callback(url, body))

        def handle_callback(url: str, body: dict[str, Any]) -> Any:
            yield env.timeout(gateway.query_latency())
            outcome = service.handle_callback(token_of(url), body)
            if outcome.status >= 400:
                record("callback", None, "mpesa", False, f"{outcome.outcome}: {outcome.detail}")
            else:
                record("callback", None, "mpesa", True,
                       None if outcome.outcome == "applied" else outcome.outcome)  # fmt: skip

        gateway = MpesaGateway(env, rngs[0], params["mpesa"], callback, query_rng=rngs[6])
        service.gateway = gateway
        handling_dir = work / "handled"
        handling_dir.mkdir()
        runtime = Runtime(env, clock, service, store, client, names, params, faults, handling_dir)
        market = Market(env, rngs[1], m, service, record, until=load_s)
        env.process(market.run())
        env.process(runtime.relay_loop())
        env.process(runtime.timer_loop())
        env.process(runtime.sampler(run_p["sample_every_s"], samples))  # type: ignore[arg-type]
        for i, group in enumerate(runtime.groups):
            env.process(
                runtime.consumer_loop(group, np.random.default_rng(rngs[4].integers(2**63) + i))
            )
            env.process(
                runtime.crash_loop(group, np.random.default_rng(rngs[2].integers(2**63) + i))
            )
        env.process(
            RedisFaults(
                env,
                server,
                params["redis"],
                faults,
                load_s,
                runtime.restarts,
                on_restart=runtime.redis_restarted,
            ).run()  # fmt: skip
        )
        user_names = UserStreamNames(prefix)
        phones = [
            Phone(env, np.random.default_rng(rngs[3].integers(2**63)), params["phones"],
                  market.buyers[i % len(market.buyers)], client, user_names,
                  writer["deliveries"])  # type: ignore[arg-type]
            for i in range(min(params["phones"]["count"], len(market.buyers)))
        ]  # fmt: skip
        by_user = {phone.user: phone for phone in phones}

        def fanned_out(live: dict[str, list[UserEntry]]) -> None:
            for user, entries in live.items():
                if (phone := by_user.get(user)) is not None:
                    phone.notify(entries)

        runtime.on_fanout = fanned_out
        runtime.on_user_entry = writer["user_streams"].append
        runtime.on_lost_entry = writer["lost_entries"].append
        pool = ServerPool(params["servers"]["count"])
        for phone in phones:
            phone.pool = pool
            pool.phones.append(phone)
            env.process(phone.run())
        server_faults = ServerFaults(
            env, rngs[5], params["servers"], pool, faults, load_s, runtime.restarts
        )
        for server_no in range(params["servers"]["count"]):
            env.process(server_faults.run(server_no))

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
        runtime.close()

        writer["faults"].extend(faults)
        collect(
            writer, store, client, names, user_names, runtime.groups, handling_dir,
            clock.epoch, market, phones,
        )  # fmt: skip
        manifest = _manifest(scenario, seed, started, load_s, drain_s, url, server)
        manifest["cpu"] = on
        stats = runtime.relay.stats  # what the repair put back after Redis lost writes
        manifest["relay"] = {
            "published": stats.published,
            "repairs": stats.repairs,
            "repaired": stats.repaired,
            "unrepairable": stats.unrepairable,
        }
        manifest["supervisor_gave_up"] = dict(runtime.restarts.given_up)
        client.close()
        store.close()
    writer.close(manifest)
    return manifest


def _clear(client: redis.Redis, prefix: str) -> None:
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


CHUNK = 5000  # events per step of the end-of-run collection


def collect(
    writer: RunWriter,
    store: Store,
    client: redis.Redis,
    names: StreamNames,
    user_names: UserStreamNames,
    groups: tuple[str, ...],
    handling_dir: Path,
    epoch: float,
    market: Market,
    phones: list[Phone],
) -> None:
    """Write the end-of-run tables: what the store and Redis hold at the end, joined
    with the consumers' handling logs (``handling_dir/<group>-<n>.log``).

    If the fan-out recorded its entries as it made them (virtual time: the
    ``user_streams`` table is written already, and ``effects-fanout-*.log`` has
    each event's entry count), those are the truth, so history trimmed since
    still counts; otherwise the user streams are read from Redis as they are now.
    The outbox, escrows and ledger are read in chunks of :data:`CHUNK` rows and
    per-event lookups go through an on-disk index, so a long run does not need
    its whole history in memory at once.
    """
    effect_logs = sorted(handling_dir.glob("effects-fanout-*.log"))
    fanout_effects: Counter[str] | None = None
    if not effect_logs:
        user_rows = []
        for key in client.scan_iter(match=f"{user_names.prefix}:user:*", count=1000):
            user = key.decode().split(":", 2)[2]
            for entry_id, fields in client.xrange(key):
                user_rows.append((user, entry_id.decode(), fields[b"event_id"].decode()))
        user_rows.sort(key=lambda r: (r[0], tuple(map(int, r[1].split("-")))))
        writer["user_streams"].write_frame(
            pd.DataFrame(user_rows, columns=["user", "entry_id", "event_id"])
        )
        fanout_effects = Counter(r[2] for r in user_rows)
        del user_rows
    handlers = {g: make_handler(g, store) for g in HANDLERS}
    types = {g: aggregate_types_of(g) for g in groups}
    index = HandlingIndex(
        handling_dir / "index.db",
        {**{g: sorted(handling_dir.glob(f"{g}-*.log")) for g in groups},
         "effects:fanout": effect_logs},
    )  # fmt: skip
    with store.engine.connect() as conn:
        result = conn.execution_options(yield_per=CHUNK).execute(
            select(outbox).order_by(outbox.c.seq)
        )
        for rows in result.partitions():
            events = [ev.decode(r.data) for r in rows]
            writer["published"].write_frame(_published(events, rows, epoch))
            effects = _effects(conn, [e.event_id for e in events])  # one connection: SQLite
            effects["fanout"] = (
                fanout_effects
                if fanout_effects is not None
                else Counter(index.totals("effects:fanout", [e.event_id for e in events]))
            )
            for group in groups:
                mine = [e for e in events if e.aggregate_type in types[group]]
                calls = index.lookup(group, [e.event_id for e in mine])
                writer["handled"].extend(
                    _handled_row(group, e, calls, effects[group], handlers, epoch) for e in mine
                )
    index.close()
    final = []
    for group in groups:
        pending, _, lag, _ = backlog(client, names, group)
        final.append({"group": group, "pending": pending, "lag": lag})
    writer["final"].extend(final)
    writer["phones"].extend({"phone": p.user, "start_after": "0-0"} for p in phones)
    classes = market.escrows
    with store.engine.connect() as conn:
        result = conn.execution_options(yield_per=CHUNK).execute(
            select(escrows).order_by(escrows.c.created_at, escrows.c.id)
        )
        for rows in result.partitions():
            writer["escrows"].extend(
                {"id": r.id, "buyer_id": r.buyer_id, "seller_id": r.seller_id,
                 "amount": int(r.amount), "state": r.state,
                 "seller_class": classes.get(r.id, ("?", "?"))[0],
                 "buyer_class": classes.get(r.id, ("?", "?"))[1]}
                for r in rows
            )  # fmt: skip
        result = conn.execution_options(yield_per=CHUNK).execute(
            select(ledger_entries.c.event_id, ledger_entries.c.escrow_id,
                   ledger_entries.c.account, ledger_entries.c.amount)
            .order_by(ledger_entries.c.id)
        )  # fmt: skip
        for rows in result.partitions():
            writer["ledger"].extend(
                {"event_id": r.event_id, "escrow_id": r.escrow_id, "account": r.account,
                 "amount": int(r.amount)}
                for r in rows
            )  # fmt: skip
        result = conn.execution_options(yield_per=CHUNK).execute(
            select(risk_scores)
            .where(risk_scores.c.group_name == "analytics")
            .order_by(risk_scores.c.scored_at, risk_scores.c.event_id)
        )
        for rows in result.partitions():
            writer["risk"].extend(
                {"event_id": r.event_id, "event_type": r.event_type, "seller_id": r.seller_id,
                 "score": r.score, "model_version": r.model_version,
                 "t_event": r.event_at - epoch, "t_scored": r.scored_at - epoch}
                for r in rows
            )  # fmt: skip


def _published(events: list[ev.Event], rows: Any, epoch: float) -> pd.DataFrame:
    return pd.DataFrame(
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


def _effects(conn: Connection, ids: list[str]) -> dict[str, Counter[str]]:
    """Effect rows per event of ``ids``, per handler group (what each handler made)."""
    queries = {
        "ledger": select(ledger_entries.c.event_id).where(ledger_entries.c.event_id.in_(ids)),
        "notifications": select(notifications.c.event_id).where(
            notifications.c.channel == "sms", notifications.c.event_id.in_(ids)
        ),
        "push": select(notifications.c.event_id).where(
            notifications.c.channel == "push", notifications.c.event_id.in_(ids)
        ),
        "disputes": select(dispute_timeline.c.event_id).where(dispute_timeline.c.event_id.in_(ids)),
        "analytics": select(analytics_facts.c.event_id).where(
            analytics_facts.c.group_name == "analytics", analytics_facts.c.event_id.in_(ids)
        ),
    }
    return {g: Counter(conn.execute(q).scalars()) for g, q in queries.items()}


def _handled_row(
    group: str,
    event: ev.Event,
    calls: dict[str, list[Any]],
    effects: Counter[str],
    handlers: dict[str, Any],
    epoch: float,
) -> dict[str, Any]:
    """One event of one group: what its handlers were given, what they made, and
    what they should have made."""
    n, most, first, last = calls.get(event.event_id, (0, 0, None, None))
    expected = (
        len(set(event.user_ids))
        if group == "fanout"
        else 1  # the analytics group folds each event into one fact row
        if group == "analytics"
        else len(handlers[group].rows(event))
    )
    return {
        "group": group, "event_id": event.event_id, "handler_calls": n,
        "max_delivery_count": most,
        "t_first": None if first is None else first - epoch,
        "t_last": None if last is None else last - epoch,
        "effects": int(effects.get(event.event_id, 0)), "expected_effects": expected,
    }  # fmt: skip


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
        "mode": "virtual",
        "params": scenario.params,
        "virtual_seconds": load_s + drain_s,
        "wall_seconds": round(time.monotonic() - started, 3),
        "redis": "external" if server is None else f"private redis-server {url}",
        "versions": versions,
        "git_sha": sha,
    }
