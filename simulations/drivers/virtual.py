"""One simulation run: build the world, run it in virtual time, write the tables.

A run is a :class:`World` (a dataclass of every part: SimPy environment and
clock, redis-server and client, store, service, gateway, runtime loops, market,
phones, faults, table writer) built once in named steps, each part given what
it needs when it is made, then run in named phases: schedule its processes,
*load* (``run.duration_s``: arrivals, faults), *drain* (``run.drain_s``: no new
escrows, faults healed, every consumer alive) so the checker can tell lost from
unseen, finish, collect the tables. Everything random comes from one
``numpy.random.SeedSequence(seed)``, spawned per model, and every stream entry id
comes from the simulation's clock (the README's "One clock"), so a run is a
function of (scenario, seed): bit-identical tables every time, entry ids included,
however fast the machine ran it; only the manifest records wall time. (Redis kills
keep this when their only loss is the forced one, ``redis.lose_last_writes``: under
``everysec`` a kill may also lose writes by the chance of a pending fsync. A run on
a local Redis Cluster, ``redis.cluster_masters``, is not expected to:
:mod:`simulations.drivers.cluster`.)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import redis
import simpy
from sqlalchemy import Connection, select

from simulations.analysis.handling import HandlingIndex
from simulations.analysis.tables import RunTables, RunWriter, TableWriter
from simulations.drivers.cluster import ClusterFaults, cluster_url, start_cluster
from simulations.drivers.interruption import held
from simulations.drivers.loops import Doorbell, Runtime, backlog
from simulations.models.clock import SimClock
from simulations.models.gateway import MpesaGateway
from simulations.models.market import Market
from simulations.models.phones import Phone, ServerFaults, ServerPool
from simulations.models.supervision import SupervisedRestarts
from simulations.scenario import RedisParams, Scenario
from workbench.delivery.entries import UserEntry
from workbench.domain import events as ev
from workbench.domain.escrow import Timeouts
from workbench.domain.ids import IdFactory
from workbench.handlers import HANDLERS, aggregate_types_of, make_handler
from workbench.ops import affinity
from workbench.ops.redis_cluster import LocalCluster
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
from workbench.streams.keys import StreamNames, UserStreamNames, names_for
from workbench.streams.partitions import partitioning

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
        params: RedisParams,
        faults: list[dict[str, Any]],
        until: float,
        restarts: SupervisedRestarts,
        on_restart: Callable[[], int] | None = None,
    ) -> None:
        self.env, self.server, self.p, self.faults, self.until = env, server, params, faults, until
        self.restarts, self.on_restart = restarts, on_restart

    def run(self) -> Any:
        every = self.p.restart_every_s
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
            if lose := self.p.lose_last_writes:
                # What a kill during an everysec fsync does, every time: the last
                # acknowledged writes are gone (a prefix of the history survives).
                fault["detail"] += f"; lost the last {self.server.lose_last_writes(lose)} writes"
            down_for = self.restarts.down_for("redis-server", self.env.now)
            if down_for is None:
                fault["detail"] += f"; {self.restarts.given_up['redis-server']}"
                return
            yield self.env.timeout(down_for)
            with held():  # a Ctrl-C waits until the server is back under our control
                self.server.restart()
            self.restarts.started("redis-server", self.env.now)
            if self.on_restart is not None and (lost := self.on_restart()):
                fault["detail"] += f"; {lost} user-stream entries lost"
            fault["t_end"] = self.env.now


class CommandRecord:
    """The ``commands`` table as the market and the gateway's callbacks fill it: a row
    per command, on the simulation's clock. A command that succeeded committed outbox
    rows, so it rings the relay's bell (what the relay's ``BLOCK`` would notice)."""

    def __init__(self, env: simpy.Environment, rows: TableWriter, relay_bell: Doorbell) -> None:
        self.env, self.rows, self.relay_bell = env, rows, relay_bell

    def __call__(
        self, command: str, escrow_id: str | None, actor: str, ok: bool, error: str | None
    ) -> None:
        self.rows.append({"t": self.env.now, "command": command, "escrow_id": escrow_id,
                          "actor": actor, "ok": ok, "error": error})  # fmt: skip
        if ok:
            self.relay_bell.ring()


@dataclass(frozen=True)
class World:
    """Everything one virtual run is made of, built once by :func:`_build_world`.

    The parts know each other through their constructors; nothing is wired by
    assigning to an object after it was made. The phases (:func:`_schedule`,
    :func:`_run`, :func:`_finish`, :func:`_collect`) only read the world and run it.
    """

    scenario: Scenario
    seed: int
    url: str  # the redis-server's, or the cluster's (redis+cluster://)
    server: RedisServer | None  # ours, or None for an external one or a cluster
    cluster: LocalCluster | None  # ours (redis.cluster_masters), or None
    cpu: int | None  # the CPU this thread and our server share (None: the OS decides)
    client: redis.Redis  # a RedisCluster on a cluster: the same commands
    names: StreamNames
    user_names: UserStreamNames
    store: Store
    writer: RunWriter
    handling_dir: Path  # the consumers' handling logs (the checker's truth)
    env: simpy.Environment
    clock: SimClock
    rngs: list[np.random.Generator]  # SeedSequence(seed).spawn(8): one per model
    faults: list[dict[str, Any]]  # small, and a fault's end is filled in later
    service: EscrowService
    gateway: MpesaGateway
    market: Market
    pool: ServerPool
    phones: list[Phone]
    runtime: Runtime
    redis_faults: RedisFaults | ClusterFaults
    server_faults: ServerFaults

    @property
    def groups(self) -> tuple[str, ...]:
        return self.runtime.groups

    @property
    def load_s(self) -> float:
        return self.scenario.run.duration_s

    @property
    def total_s(self) -> float:
        return self.scenario.run.duration_s + self.scenario.run.drain_s


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

    The phases: build the world, schedule its processes, run the load and the
    drain, finish (last relay pass, consumers and phones take everything), collect
    the end-of-run tables; the manifest is written once the servers are gone.
    """
    started = time.monotonic()
    writer = RunWriter(out)
    try:
        with contextlib.ExitStack() as resources:
            world = _build_world(
                resources, scenario, seed, writer, redis_url=redis_url, prefix=prefix, cpu=cpu
            )
            _schedule(world)
            _run(world, progress)
            _finish(world)
            manifest = _collect(world, started)
    except BaseException:  # a failure or a stop (Ctrl-C): files closed, no manifest
        writer.abandon()
        raise
    writer.close(manifest)
    return manifest


def _build_world(
    resources: contextlib.ExitStack,
    scenario: Scenario,
    seed: int,
    writer: RunWriter,
    *,
    redis_url: str | None,
    prefix: str,
    cpu: affinity.Choice,
) -> World:
    """Every part of a run, each made with the parts it needs; closed by ``resources``."""
    work = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="workbench-sim-")))
    not_ours = redis_url or scenario.redis.cluster_masters  # no server of ours to share a CPU
    on = affinity.resolve(None if not_ours and cpu == "auto" else cpu)
    url, server, cluster, client = _start_redis(resources, scenario, redis_url, work, on, prefix)
    store = _open_store(resources, work)
    names = names_for(prefix, scenario.redis.partitions)
    user_names = UserStreamNames.of(names)
    env = simpy.Environment()
    clock = SimClock(env, scenario.run.epoch)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    faults: list[dict[str, Any]] = []
    relay_bell = Doorbell(env, enabled=scenario.relay.wake_on_commit)
    record = CommandRecord(env, writer["commands"], relay_bell)
    service, gateway = _build_service(env, clock, store, scenario, seed, rngs, record)
    market = Market(env, rngs[1], scenario.market, service, record, until=scenario.run.duration_s)
    pool = ServerPool(scenario.servers.count)
    phones = _build_phones(env, rngs[3], scenario, market, client, user_names, writer, pool)
    handling_dir = work / "handled"
    handling_dir.mkdir()
    runtime = Runtime(
        env, clock, service, store, client, names, scenario, faults, handling_dir,
        outbox_bell=relay_bell, on_fanout=_live_messages_to(phones),
        on_user_entry=writer["user_streams"].append, on_lost_entry=writer["lost_entries"].append,
    )  # fmt: skip
    load_s = scenario.run.duration_s
    redis_faults: RedisFaults | ClusterFaults = (
        RedisFaults(env, server, scenario.redis, faults, load_s, runtime.restarts,
                    on_restart=runtime.redis_restarted)
        if cluster is None
        else ClusterFaults(env, cluster, names, scenario.redis, faults, load_s,
                           on_failover=runtime.redis_restarted)
    )  # fmt: skip
    server_faults = ServerFaults(
        env, rngs[5], scenario.servers, pool, faults, load_s, runtime.restarts
    )
    return World(
        scenario=scenario, seed=seed, url=url, server=server, cluster=cluster, cpu=on,
        client=client,
        names=names, user_names=user_names, store=store, writer=writer,
        handling_dir=handling_dir, env=env, clock=clock, rngs=rngs, faults=faults,
        service=service, gateway=gateway, market=market, pool=pool, phones=phones,
        runtime=runtime, redis_faults=redis_faults, server_faults=server_faults,
    )  # fmt: skip


def _start_redis(
    resources: contextlib.ExitStack,
    scenario: Scenario,
    redis_url: str | None,
    work: Path,
    cpu: int | None,
    prefix: str,
) -> tuple[str, RedisServer | None, LocalCluster | None, redis.Redis]:
    """Our redis-server (or the one at ``redis_url``), or our local cluster
    (``redis.cluster_masters``), and a client with ``prefix`` cleared."""
    server = cluster = None
    if scenario.redis.cluster_masters:
        if redis_url:
            raise ValueError(
                "redis.cluster_masters starts the run's own cluster: give no Redis URL"
            )
        # Its nodes are left to the OS; a chosen CPU pins this thread only.
        resources.enter_context(affinity.pinned(cpu))
        with held():  # started and known to `resources`, or not started
            cluster = start_cluster(resources, scenario.redis, work)
        url = cluster_url(cluster)
    else:
        with held():
            url, server = resources.enter_context(
                paired(redis_url, work / "redis", cpu, appendonly=True,
                       appendfsync=scenario.redis.appendfsync)
            )  # fmt: skip
    # One thread drives every part: one connection, no pool to check out from
    # (redis-py's pool checks a connection out and back in around every call:
    # locking and bookkeeping that a single-threaded driver pays for nothing).
    client = connect(url, single_connection_client=True)
    resources.callback(client.close)
    clear_prefix(client, prefix)
    return url, server, cluster, client


def _open_store(resources: contextlib.ExitStack, work: Path) -> Store:
    store = Store(f"sqlite:///{work / 'store.db'}")
    resources.callback(store.close)
    store.reset()
    return store


def _build_service(
    env: simpy.Environment,
    clock: SimClock,
    store: Store,
    scenario: Scenario,
    seed: int,
    rngs: list[np.random.Generator],
    record: CommandRecord,
) -> tuple[EscrowService, MpesaGateway]:
    """The escrow service and the M-Pesa gateway it pushes to.

    They call each other (pushes one way, callbacks the other), as over HTTP: the
    gateway's callbacks go to a function that finds the service by name when a
    callback comes, which is after both exist.
    """

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

    m, mpesa = scenario.market, scenario.mpesa
    gateway = MpesaGateway(env, rngs[0], mpesa, callback, query_rng=rngs[6])
    service = EscrowService(
        store,
        clock=clock,
        ids=IdFactory(seed),
        partitioning=partitioning(scenario.redis.partitions),
        timeouts=Timeouts(
            payment=m.payment_timeout_s,
            shipping=m.shipping_timeout_s,
            confirmation=m.confirmation_timeout_s,
        ),
        payments=PaymentSettings(
            callback_base_url="sim://mpesa/callback",
            verify_after_s=mpesa.verify_after_s,
            retry_s=mpesa.verify_retry_s,
        ),
        gateway=gateway,
    )
    return service, gateway


def _build_phones(
    env: simpy.Environment,
    rng: np.random.Generator,
    scenario: Scenario,
    market: Market,
    client: redis.Redis,
    user_names: UserStreamNames,
    writer: RunWriter,
    pool: ServerPool,
) -> list[Phone]:
    """``phones.count`` of the market's buyers with the app open, seated in ``pool``."""
    buyers = market.buyers
    return [
        Phone(env, np.random.default_rng(rng.integers(2**63)), scenario.phones,
              buyers[i % len(buyers)], client, user_names,
              writer["deliveries"], pool=pool)  # type: ignore[arg-type]
        for i in range(min(scenario.phones.count, len(buyers)))
    ]  # fmt: skip


def _live_messages_to(phones: list[Phone]) -> Callable[[dict[str, list[UserEntry]]], None]:
    """The fan-out's live messages, each user's to that user's phone (if it has one)."""
    by_user = {phone.user: phone for phone in phones}

    def fanned_out(live: dict[str, list[UserEntry]]) -> None:
        for user, entries in live.items():
            if (phone := by_user.get(user)) is not None:
                phone.notify(entries)

    return fanned_out


def _schedule(world: World) -> None:
    """Start every SimPy process. The order is part of the run: processes due at the
    same instant run in the order they were started, and each group's generators are
    drawn here, so changing it changes the tables."""
    env, runtime, rngs = world.env, world.runtime, world.rngs
    env.process(world.market.run())
    env.process(runtime.relay_loop())
    env.process(runtime.timer_loop())
    samples = world.writer["samples"]
    env.process(runtime.sampler(world.scenario.run.sample_every_s, samples))  # type: ignore[arg-type]
    for i, group in enumerate(world.groups):
        env.process(
            runtime.consumer_loop(group, np.random.default_rng(rngs[4].integers(2**63) + i))
        )
        env.process(runtime.crash_loop(group, np.random.default_rng(rngs[2].integers(2**63) + i)))
    env.process(world.redis_faults.run())
    for phone in world.phones:
        env.process(phone.run())
    for server_no in range(world.scenario.servers.count):
        env.process(world.server_faults.run(server_no))


def _run(world: World, progress: Progress | None) -> None:
    """The load, then the drain: at ``run.duration_s`` the runtime heals (no more
    faults, every consumer back). Run in steps so ``progress`` hears of it."""
    env, runtime = world.env, world.runtime
    load_s, total = world.load_s, world.total_s
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


def _finish(world: World) -> None:
    """The last instant: publish what it committed, let every consumer take it, and
    let every phone connect once more and take what is waiting for it."""
    world.runtime.finish()
    for phone in world.phones:
        phone.stop = True
        phone.final_drain()
    world.runtime.close()


def _collect(world: World, started: float) -> dict[str, Any]:
    """The end-of-run tables (:func:`collect`) and the manifest (not yet written)."""
    world.writer["faults"].extend(world.faults)
    collect(world, world.writer)
    manifest = run_manifest(
        world.scenario, world.seed, started, world.load_s, world.scenario.run.drain_s,
        world.url, world.server,
    )  # fmt: skip
    manifest["cpu"] = world.cpu
    if world.cluster is not None:
        masters = len(world.cluster.masters)
        manifest["redis"] = f"private Redis Cluster {world.url}"
        manifest["cluster"] = {
            "masters": masters,
            "replicas": len(world.cluster.replicas) // masters,
            "failovers": sum(f["kind"] == "redis_failover" for f in world.faults),
        }
    stats = world.runtime.relay.stats  # what the repair put back after Redis lost writes
    manifest["relay"] = {
        "published": stats.published,
        "repairs": stats.repairs,
        "repaired": stats.repaired,
        "unrepairable": stats.unrepairable,
    }
    manifest["supervisor_gave_up"] = dict(world.runtime.restarts.given_up)
    return manifest


def clear_prefix(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix:``: a run starts from an empty keyspace of its own.

    On a cluster (a ``RedisCluster``) SCAN goes to every master and each DEL to its
    key's slot, so this clears the prefix on every node.
    """
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)


CHUNK = 5000  # events per step of the end-of-run collection


class EndOfRun(Protocol):
    """What :func:`collect` reads of a world once its run is over (a virtual
    :class:`World`, or a real-time run's world)."""

    @property
    def store(self) -> Store: ...
    @property
    def client(self) -> redis.Redis: ...
    @property
    def names(self) -> StreamNames: ...
    @property
    def user_names(self) -> UserStreamNames: ...
    @property
    def groups(self) -> tuple[str, ...]: ...
    @property
    def handling_dir(self) -> Path: ...
    @property
    def clock(self) -> SimClock: ...
    @property
    def market(self) -> Market: ...
    @property
    def phones(self) -> Sequence[Phone]: ...


def collect(world: EndOfRun, writer: RunWriter) -> None:
    """Write the end-of-run tables to ``writer``: what the world's store and Redis hold
    at the end, joined with the consumers' handling logs (``handling_dir/<group>-<n>.log``).

    If the fan-out recorded its entries as it made them (virtual time: the
    ``user_streams`` table is written already, and ``effects-fanout-*.log`` has
    each event's entry count), those are the truth, so history trimmed since
    still counts; otherwise the user streams are read from Redis as they are now.
    The outbox, escrows and ledger are read in chunks of :data:`CHUNK` rows and
    per-event lookups go through an on-disk index, so a long run does not need
    its whole history in memory at once.
    """
    effect_logs = sorted(world.handling_dir.glob("effects-fanout-*.log"))
    fanout_effects = None if effect_logs else _user_streams_from_redis(world, writer)
    _write_published_and_handled(world, writer, effect_logs, fanout_effects)
    final = []
    for group in world.groups:
        pending, _, lag, _ = backlog(world.client, world.names, group)
        final.append({"group": group, "pending": pending, "lag": lag})
    writer["final"].extend(final)
    writer["phones"].extend({"phone": p.user, "start_after": "0-0"} for p in world.phones)
    _write_store_tables(world, writer)


def _user_streams_from_redis(world: EndOfRun, writer: RunWriter) -> Counter[str]:
    """The ``user_streams`` table as Redis holds it now; each event's entry count."""
    user_rows = []
    names = world.user_names
    for key in world.client.scan_iter(match=f"{names.prefix}:*user:*", count=1000):
        user = key.decode().split(":user:", 1)[1]
        if key.decode() != names.stream(user):
            continue  # another key naming a user (none today), not a user stream
        for entry_id, fields in world.client.xrange(key):
            user_rows.append((user, entry_id.decode(), fields[b"event_id"].decode()))
    user_rows.sort(key=lambda r: (r[0], tuple(map(int, r[1].split("-")))))
    writer["user_streams"].write_frame(
        pd.DataFrame(user_rows, columns=["user", "entry_id", "event_id"])
    )
    return Counter(r[2] for r in user_rows)


def _write_published_and_handled(
    world: EndOfRun,
    writer: RunWriter,
    effect_logs: list[Path],
    fanout_effects: Counter[str] | None,
) -> None:
    """The ``published`` table (the outbox) and the ``handled`` table: per event and
    group, what the handlers were given, what they made, what they should have made."""
    store, groups, epoch = world.store, world.groups, world.clock.epoch
    handling_dir = world.handling_dir
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


def _write_store_tables(world: EndOfRun, writer: RunWriter) -> None:
    """The ``escrows`` (with the market's ground-truth classes), ``ledger`` and
    ``risk`` tables, from the store."""
    classes, epoch = world.market.escrows, world.clock.epoch
    with world.store.engine.connect() as conn:
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


def run_manifest(
    scenario: Scenario,
    seed: int,
    started: float,
    load_s: float,
    drain_s: float,
    url: str,
    server: RedisServer | None,
) -> dict[str, Any]:
    """What a run's ``manifest.json`` records: scenario, seed, parameters, its
    virtual and wall seconds, which Redis, package versions and the git commit
    (a real-time run adds its mode and factor)."""
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
