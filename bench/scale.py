"""Throughput of the partitioned runtime in three layouts, in interleaved rounds (issue #14).

The same escrow lifecycles' outbox rows, published and consumed by the
runtime's own classes, in three layouts on this machine:

* ``single``  one redis-server, the log unpartitioned (``names_for(prefix, 0)``);
* ``partitioned``  the same redis-server, ``--partitions`` (16) partitions;
* ``cluster``  a private :class:`~workbench.ops.redis_cluster.LocalCluster` of
  ``--masters`` (3) masters, no replicas, AOF off, the same partitions, through
  redis-py's ``RedisCluster`` (``redis+cluster://``).

Per layout, each at least ``--min-seconds`` of timed work per round (a step
is repeated until it adds up; its set-up is not timed), every measurement of
every layout in one interleaved round, order reversed every other round:

* ``<layout>:relay``  :meth:`OutboxRelay.drain` of the ``--escrows``
  lifecycles' outbox rows (marked unpublished again, their stream ids
  forgotten and their streams deleted between steps; a new relay per step).
* ``<layout>:relays_2``  (partitioned layouts) two relays in two processes
  sharing the partitions through their leases, from the moment both leave a
  barrier to the last one's end.
* ``<layout>:ledger``  the ledger group (its SQL handler, the real one) drained
  by one :class:`ConsumerWorker` through a fresh group; inbox and ledger rows
  deleted between steps.
* ``<layout>:ledger_2``  (partitioned layouts) the same by two worker
  processes sharing the partitions.
* ``<layout>:fanout``  the fan-out group
  (:class:`~workbench.handlers.fanout.FanoutHandler`: user streams, dedupe
  markers, live messages) drained by one worker; user streams and markers
  deleted between steps.

The two-process steps start from the steady state of two running members:
both have beaten before the step, so each takes only its own share of the
partitions (checked) and no rebalance is timed. The rows are produced once per
partitioning with :class:`EscrowService` and the simulated gateway
(``bench/throughput.py``'s ``produce``): one set unpartitioned for ``single``,
one set with the partitions for ``partitioned`` and ``cluster``, in one store.

Figures: the rate of every measurement; per measurement the ratios
``partitioned_vs_single:<m>`` and ``cluster_vs_single:<m>`` (median of
per-round ratios), and ``<layout>:relays_2_vs_relay`` / ``ledger_2_vs_ledger``;
per measurement the rate per busy partition, and the Redis CPU it cost (the
servers' ``used_cpu_user + used_cpu_sys`` over the timed work, summed over the
masters) per entry. From those, :mod:`bench.projection` projects what 1, 2, 4
and 8 machines would carry; the record holds its inputs, rows and assumptions.

A private redis-server (AOF off) serves ``single`` and ``partitioned`` unless
``REDIS_URL`` is set (then every key lives under a per-run prefix and is
deleted at the end); the cluster is always private. The store is SQLite in a
temporary directory; ``DATABASE_URL`` selects another one, with
``--reset-store`` (its tables are dropped and recreated).

The record goes to ``bench/records/scale.json`` (``--quick`` writes none
unless ``--record`` is given); the last line of output is the record as one
JSON object.

Usage::

    .venv/bin/python bench/scale.py                 # 2000 escrows, 5 rounds
    .venv/bin/python bench/scale.py --quick         # smoke run
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import redis
from rich.table import Table
from sqlalchemy import distinct, func, select, update

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import projection, records, stats  # noqa: E402
from bench.cpu import redis_cpu_s  # noqa: E402
from bench.stats import Sample  # noqa: E402
from bench.throughput import BATCH, produce, redis_for_bench, store_for_bench  # noqa: E402
from simulations.analysis.report import wide_console  # noqa: E402
from workbench.domain.clock import ManualClock  # noqa: E402
from workbench.domain.ids import IdFactory  # noqa: E402
from workbench.handlers import FanoutHandler, LedgerHandler, make_handler  # noqa: E402
from workbench.ops.redis_cluster import LocalCluster  # noqa: E402
from workbench.payments.mpesa import GatewayBehaviour, SimulatedGateway  # noqa: E402
from workbench.service import EscrowService  # noqa: E402
from workbench.store import Store, inbox, ledger_entries, outbox  # noqa: E402
from workbench.streams.connection import connect, server_version  # noqa: E402
from workbench.streams.consumer import ConsumerWorker  # noqa: E402
from workbench.streams.keys import StreamNames, names_for  # noqa: E402
from workbench.streams.leases import assign  # noqa: E402
from workbench.streams.relay import OutboxRelay  # noqa: E402

LAYOUTS: tuple[str, ...] = ("single", "partitioned", "cluster")
STAGES: tuple[str, ...] = ("relay", "ledger", "fanout")  # measured in every layout
TWO: dict[str, str] = {"relay": "relays_2", "ledger": "ledger_2"}  # partitioned layouts
MEASURES: dict[str, str] = {
    "relay": "OutboxRelay.drain, one relay",
    "relays_2": "OutboxRelay.drain, two relay processes sharing the partitions",
    "ledger": "ledger group (SQL handler), one worker",
    "ledger_2": "ledger group (SQL handler), two worker processes sharing the partitions",
    "fanout": "fan-out group (user streams), one worker",
}
CREW = ("a", "b")  # the two processes' member names


# -- layouts ----------------------------------------------------------------------------


@dataclass
class Layout:
    """One layout: where its Redis is, how its log is cut, which rows it publishes."""

    name: str
    url: str
    partitions: int  # 0: unpartitioned
    nodes: list[redis.Redis]  # plain clients of the servers (cluster: the masters)
    prefix: str
    rows: tuple[int, int] = (0, 0)  # the seq range of its outbox rows
    busy: int = 0  # partitions its rows fall in
    client: redis.Redis = field(init=False)
    _names: dict[str, StreamNames] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.client = connect(self.url)

    @property
    def partitioned(self) -> bool:
        return self.partitions > 0

    def names(self, role: str) -> StreamNames:
        """``consume`` streams (published once) or ``relay`` streams (per step)."""
        if role not in self._names:
            self._names[role] = names_for(f"{self.prefix}-{role}", self.partitions)
        return self._names[role]

    def redis_cpu(self) -> float:
        """CPU seconds the layout's servers have used (user + sys, summed)."""
        return sum(redis_cpu_s(node) for node in self.nodes)

    def measures(self) -> list[str]:
        names = [*STAGES, *(TWO.values() if self.partitioned else ())]
        return [f"{self.name}:{m}" for m in MEASURES if m in names]


@contextlib.contextmanager
def cluster_for_bench(masters: int) -> Iterator[LocalCluster]:
    with LocalCluster(masters=masters, replicas=0, appendonly=False) as cluster:
        yield cluster


def delete_keys(client: redis.Redis, pattern: str, where: Callable[[str], bool]) -> int:
    """Delete the keys matching ``pattern`` that ``where`` accepts (every cluster node)."""
    keys = [k for k in client.scan_iter(match=pattern, count=1000) if where(_text(k))]
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])
    return len(keys)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


# -- the rows: produced once per partitioning ------------------------------------------------


def produce_rows(store: Store, escrows: int, partitions: int, seed: int) -> tuple[int, int]:
    """Run ``escrows`` lifecycles with ``partitions``; return their outbox seq range."""
    names = names_for("unused", partitions)
    clock = ManualClock()
    gateway = SimulatedGateway(
        clock,
        GatewayBehaviour(failure_rate=0, duplicate_rate=0, late_rate=0, lost_rate=0),
        seed=seed,
    )
    service = EscrowService(
        store, clock=clock, ids=IdFactory(seed), gateway=gateway, partitioning=names.partitioning
    )
    with store.engine.connect() as conn:
        before = conn.execute(select(func.coalesce(func.max(outbox.c.seq), 0))).scalar_one()
    produce(service, gateway, clock, escrows)
    with store.engine.connect() as conn:
        last = conn.execute(select(func.max(outbox.c.seq))).scalar_one()
    return before + 1, last


def row_counts(store: Store, rows: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, rows the ledger reads, distinct partitions) of a seq range."""
    in_range = outbox.c.seq.between(*rows)
    with store.engine.connect() as conn:
        n = conn.execute(select(func.count()).where(in_range)).scalar_one()
        ledger = conn.execute(
            select(func.count()).where(in_range, outbox.c.stream.in_(LedgerHandler.aggregate_types))
        ).scalar_one()
        busy = conn.execute(select(func.count(distinct(outbox.c.partition))).where(in_range))
        return int(n), int(ledger), int(busy.scalar_one())


def mark_unpublished(store: Store, rows: tuple[int, int]) -> None:
    """The range's rows as never published, and no row's stream id known.

    Both row sets share the store: a relay expects of its streams the last id
    any row of its partition (unpartitioned: of its aggregate type) was given,
    so the ids the other layouts' relays wrote are forgotten too, and a new
    relay expects nothing (and repairs nothing) of the streams it starts on.
    """
    with store.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.stream_id.is_not(None)).values(stream_id=None))
        conn.execute(update(outbox).where(outbox.c.seq.between(*rows)).values(published_at=None))


# -- one member's work, in this process or in a crew process ------------------------------------


def prepare(
    kind: str, store: Store, client: redis.Redis, names: StreamNames, member: str
) -> tuple[Callable[[], int], int]:
    """Set up a relay or a ledger worker (untimed); return its timed work and the
    partitions it holds. The work returns what it published or handled."""
    if kind == "relay":
        relay = OutboxRelay(store, client, names=names, batch_size=BATCH, member=member)
        relay.heartbeat(force=True)
        held = len(relay.sync_leases(force=True))

        def publish() -> int:
            count = relay.drain()
            if relay.stats.repairs:
                raise RuntimeError(f"relay {member} repaired {relay.stats.repairs} times")
            return count

        return publish, held
    worker = ConsumerWorker(client, make_handler("ledger", store), consumer=member, names=names)
    worker.setup()

    def consume() -> int:
        worker.drain()
        if worker.stats.failed:
            raise RuntimeError(f"worker {member}: {worker.stats.failed} entries failed")
        return worker.stats.handled

    return consume, len(worker.reading)


def _crew_member(store_url: str, ready: Any, go: Any, pipe: Any) -> None:
    """One process of the crew: per step set up, meet the others twice, run, report."""
    store = Store(store_url)
    clients: dict[str, redis.Redis] = {}
    while True:
        step = pipe.recv()
        if step is None:
            return
        kind, url, prefix, partitions, member = step
        try:
            client = clients.get(url) or clients.setdefault(url, connect(url))
            work, held = prepare(kind, store, client, names_for(prefix, partitions), member)
            ready.wait(timeout=120)  # everyone set up: the parent reads Redis' CPU
            go.wait(timeout=120)
            started = time.monotonic()
            count = work()
            ended = time.monotonic()
            pipe.send(("ok", count, held, started, ended))
        except Exception:
            for barrier in (ready, go):
                with contextlib.suppress(Exception):
                    barrier.abort()
            pipe.send(("error", traceback.format_exc(), 0, 0.0, 0.0))


class Crew:
    """Two processes that run one step at a time together, from two barriers."""

    def __init__(self, store: Store) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready = ctx.Barrier(len(CREW) + 1)  # the crew and this process
        self.go = ctx.Barrier(len(CREW) + 1)
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        for _ in CREW:
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_crew_member, args=(store.url, self.ready, self.go, theirs), daemon=True
            )
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)

    def step(
        self, kind: str, layout: Layout, names: StreamNames, members: list[str]
    ) -> tuple[list[int], list[int], float, float]:
        """Both at once; (counts, partitions held, seconds first start to last end,
        Redis CPU seconds of the layout over the step)."""
        for pipe, member in zip(self.pipes, members, strict=True):
            pipe.send((kind, layout.url, names.prefix, layout.partitions, member))
        try:
            self.ready.wait(timeout=120)
            cpu = layout.redis_cpu()
            self.go.wait(timeout=120)
        except threading.BrokenBarrierError:
            pass  # a member failed: its reply says why
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(600):
                raise RuntimeError("crew: no reply within 600 s")
            replies.append(pipe.recv())
        cpu = layout.redis_cpu() - cpu
        for status, detail, *_ in replies:
            if status != "ok":
                self.ready.reset()
                self.go.reset()
                raise RuntimeError(f"crew member failed:\n{detail}")
        started = min(r[3] for r in replies)
        return (
            [r[1] for r in replies],
            [r[2] for r in replies],
            max(r[4] for r in replies) - started,
            cpu,
        )

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


# -- the steps ----------------------------------------------------------------------------------


class Steps:
    """The measurements of every layout; each step resets what the last one left."""

    def __init__(self, store: Store, crew: Crew) -> None:
        self.store = store
        self.crew = crew
        self.cpu: dict[str, float] = {}  # Redis CPU seconds per measurement, this round
        self.expected: dict[str, int] = {}  # entries per step, per measurement

    def measures(self, layouts: list[Layout]) -> dict[str, Callable[[], tuple[int, float]]]:
        out: dict[str, Callable[[], tuple[int, float]]] = {}
        for layout in layouts:
            n, ledger, _ = row_counts(self.store, layout.rows)
            for name in layout.measures():
                what = name.split(":", 1)[1]
                self.expected[name] = ledger if what.startswith("ledger") else n
                out[name] = lambda layout=layout, what=what, name=name: self.step(
                    layout, what, name
                )
        return out

    def step(self, layout: Layout, what: str, name: str) -> tuple[int, float]:
        kind = "relay" if what.startswith("relay") else what.split("_")[0]
        names = layout.names("relay" if kind == "relay" else "consume")
        self._reset(layout, kind, names)
        members = [f"{kind}-bench-{m}" for m in CREW]
        if what in TWO.values():
            self._seed_heartbeats(layout, kind, names, members)
            counts, held, seconds, cpu = self.crew.step(kind, layout, names, members)
            share = assign(members, layout.partitions)
            if held != [len(share[m]) for m in members] or min(counts) < 1:
                raise RuntimeError(f"{name}: partitions held {held}, entries {counts}")
            count = sum(counts)
        elif kind == "fanout":
            count, seconds, cpu = self._fanout(layout, names)
        else:
            work, held_one = prepare(kind, self.store, layout.client, names, f"{kind}-bench-1")
            if held_one != max(layout.partitions, 1):
                raise RuntimeError(f"{name}: one member holds {held_one} partitions")
            before = layout.redis_cpu()
            count, seconds = stats.timed(work)
            cpu = layout.redis_cpu() - before
        if count != self.expected[name]:
            raise RuntimeError(f"{name}: {count} entries, expected {self.expected[name]}")
        if kind == "ledger":
            self._check_inbox(name)
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu
        return count, seconds

    def _fanout(self, layout: Layout, names: StreamNames) -> tuple[int, float, float]:
        handler = FanoutHandler(layout.client, names)
        worker = ConsumerWorker(layout.client, handler, consumer="fanout-bench-1", names=names)
        worker.setup()
        before = layout.redis_cpu()
        _, seconds = stats.timed(worker.drain)
        cpu = layout.redis_cpu() - before
        if worker.stats.failed or handler.duplicates or not handler.appended:
            raise RuntimeError(
                f"fan-out: {worker.stats.failed} failed, {handler.duplicates} duplicates, "
                f"{handler.appended} user entries"
            )
        return worker.stats.handled, seconds, cpu

    def _reset(self, layout: Layout, kind: str, names: StreamNames) -> None:
        """Forget the last step of ``kind``: its streams or groups, leases, heartbeats,
        rows and effects."""
        client = layout.client
        group = kind if kind != "relay" else None
        keys = [names.heartbeats(kind), *(names.lease(kind, p) for p in names.partitions)]
        if kind == "relay":
            keys += [*names.streams(), names.last_publish()]
            mark_unpublished(self.store, layout.rows)
        else:
            types = (
                LedgerHandler.aggregate_types if kind == "ledger" else FanoutHandler.aggregate_types
            )
            pipe = client.pipeline(transaction=False)
            for stream in names.streams(types):
                pipe.xgroup_destroy(stream, group)
            pipe.execute(raise_on_error=False)  # a stream no event went to does not exist
            keys += names.dead_letters(kind)
        client.delete(*keys)
        if kind == "ledger":
            with self.store.begin() as conn:
                conn.execute(inbox.delete())
                conn.execute(ledger_entries.delete())
        if kind == "fanout":
            delete_keys(client, f"{names.prefix}:*", lambda k: ":user:" in k or ":fanout:" in k)

    @staticmethod
    def _seed_heartbeats(layout: Layout, kind: str, names: StreamNames, members: list[str]) -> None:
        """Both members live before either starts: each takes only its own share."""
        now = repr(time.time())
        layout.client.hset(names.heartbeats(kind), mapping=dict.fromkeys(members, now))

    def _check_inbox(self, name: str) -> None:
        with self.store.engine.connect() as conn:
            count = conn.execute(
                select(func.count()).where(inbox.c.group_name == "ledger")
            ).scalar_one()
        if count != self.expected[name]:
            raise RuntimeError(f"{name}: {count} inbox rows, expected {self.expected[name]}")


# -- the run ----------------------------------------------------------------------------------


def publish_consume_streams(store: Store, layout: Layout) -> None:
    """Publish the layout's rows once to the streams every consume step reads."""
    mark_unpublished(store, layout.rows)
    relay = OutboxRelay(store, layout.client, names=layout.names("consume"), batch_size=BATCH,
                        member="relay-setup")  # fmt: skip
    relay.sync_leases(force=True)
    published = relay.drain()
    n, _, _ = row_counts(store, layout.rows)
    if published != n:
        raise RuntimeError(f"{layout.name}: set-up published {published} of {n} rows")
    layout.client.delete(layout.names("consume").heartbeats("relay"))
    layout.client.delete(
        *(layout.names("consume").lease("relay", p) for p in layout.names("consume").partitions)
    )


def summaries(
    rounds: list[dict[str, Sample]], layouts: list[Layout]
) -> tuple[list[stats.Summary], list[stats.Summary]]:
    """(ratios, rates) of the rounds."""
    rates = [
        stats.rate_summary(name, rounds, what=MEASURES[name.split(":", 1)[1]], unit="entries/s")
        for layout in layouts
        for name in layout.measures()
    ]
    ratios = []
    for other in ("partitioned", "cluster"):
        for stage in STAGES:
            ratios.append(
                stats.ratio_summary(
                    f"{other}_vs_single:{stage}",
                    rounds,
                    f"{other}:{stage}",
                    f"single:{stage}",
                    what=f"{stage}: {other} / single",
                )  # fmt: skip
            )
    for layout in layouts:
        if layout.partitioned:
            for one, two in TWO.items():
                ratios.append(
                    stats.ratio_summary(
                        f"{layout.name}:{two}_vs_{one}",
                        rounds,
                        f"{layout.name}:{two}",
                        f"{layout.name}:{one}",
                        what=f"{layout.name}: two processes / one",
                    )  # fmt: skip
                )
    return ratios, rates


def per_measure_figures(
    rounds: list[dict[str, Sample]], cpu_rounds: list[dict[str, float]], layouts: list[Layout]
) -> dict[str, dict[str, Any]]:
    """Per measurement: busy partitions, the median rate per busy partition, and the
    Redis CPU per entry (median over rounds; None where a round measured no CPU)."""
    out: dict[str, dict[str, Any]] = {}
    for layout in layouts:
        for name in layout.measures():
            rate = statistics.median(r[name].rate for r in rounds)
            per_entry = [c[name] / r[name].items for r, c in zip(rounds, cpu_rounds, strict=True)]
            out[name] = {
                "partitions_busy": layout.busy,
                "rate_per_partition": rate / layout.busy,
                "redis_nodes": len(layout.nodes),
                "redis_cpu_s": [c[name] for c in cpu_rounds],
                "redis_cpu_per_entry": (
                    statistics.median(per_entry) if all(x > 0 for x in per_entry) else None
                ),
            }
    return out


def projection_inputs(
    rates: dict[str, stats.Summary],
    ratios: dict[str, stats.Summary],
    figures: dict[str, dict[str, Any]],
    cluster: Layout,
    masters: int,
    share_ledger: float,
) -> projection.Inputs:
    """The projection's inputs from this run's summaries."""
    shares = {"relay": 1.0, "ledger": share_ledger, "fanout": 1.0}
    stages = tuple(
        projection.Stage(
            name=stage,
            single_rate=rates[f"single:{stage}"].median,
            cluster_vs_single=ratios[f"cluster_vs_single:{stage}"].median,
            redis_cpu_per_entry=figures[f"cluster:{stage}"]["redis_cpu_per_entry"],
            share=shares[stage],
        )
        for stage in STAGES
    )
    store_rate = max(s.median for name, s in rates.items() if ":ledger" in name)
    return projection.Inputs(
        stages=stages,
        partitions=cluster.busy,
        masters_measured=masters,
        store_rate=store_rate,
        store_share=share_ledger,
    )


def build_layouts(url: str, cluster: LocalCluster, partitions: int, prefix: str) -> list[Layout]:
    single_node = redis.Redis.from_url(url)
    masters = [m.client() for m in cluster.masters]
    cluster_url = cluster.url.replace("redis://", "redis+cluster://", 1)
    return [
        Layout("single", url, 0, [single_node], f"{prefix}-single"),
        Layout("partitioned", url, partitions, [single_node], f"{prefix}-part"),
        Layout("cluster", cluster_url, partitions, masters, f"{prefix}-cluster"),
    ]


def run(
    escrows: int, partitions: int, masters: int, repeat: int, min_seconds: float, reset_store: bool
) -> dict[str, Any]:
    console = wide_console()
    load_before = records.load_average()
    prefix = f"scale{os.getpid()}"
    layouts: list[Layout] = []
    crew: Crew | None = None
    with (
        redis_for_bench() as (url, redis_desc),
        cluster_for_bench(masters) as cluster,
        store_for_bench(reset_store) as store,
    ):
        try:
            layouts = build_layouts(url, cluster, partitions, prefix)
            version = ".".join(map(str, server_version(layouts[0].client)))
            env = records.environment(version, load_before)
            console.print(
                f"[bold]scale[/]: {escrows} escrows, {repeat} round(s) of >= {min_seconds:g} s "
                f"per measurement; Redis {version}, {redis_desc} and a {masters}-master local "
                f"cluster (AOF off); {partitions} partitions; store {store.dialect}; "
                f"{os.cpu_count()} CPUs; load {load_before}"
            )
            single, part, clus = layouts
            single.rows = produce_rows(store, escrows, 0, seed=1)
            publish_consume_streams(store, single)
            part.rows = clus.rows = produce_rows(store, escrows, partitions, seed=2)
            for layout in (part, clus):
                publish_consume_streams(store, layout)
            for layout in layouts:
                layout.busy = max(row_counts(store, layout.rows)[2], 1) if layout.partitioned else 1
            n, n_ledger, _ = row_counts(store, single.rows)
            console.print(
                f"{n} entries per layout ({n_ledger} read by the ledger); busy partitions "
                + ", ".join(f"{x.name} {x.busy}" for x in layouts)
            )
            crew = Crew(store)
            steps = Steps(store, crew)
            cpu_rounds: list[dict[str, float]] = []

            def progress(r: int, name: str, s: Sample) -> None:
                if len(cpu_rounds) <= r:
                    cpu_rounds.append({})
                cpu_rounds[r][name] = steps.cpu.pop(name, 0.0)
                print(
                    f"round {r + 1}/{repeat} {name}: {s.rate:,.0f}/s "
                    f"({s.items} in {s.seconds:.2f} s, {s.steps} steps)",
                    file=sys.stderr,
                )

            measures = {
                name: (lambda step=step: stats.accumulate(step, min_seconds))
                for name, step in steps.measures(layouts).items()
            }
            rounds, orders = stats.interleave(measures, repeat, progress)
        finally:
            if crew is not None:
                crew.close()
            _clean(layouts, prefix)
    ratio_list, rate_list = summaries(rounds, layouts)
    figures = per_measure_figures(rounds, cpu_rounds, layouts)
    inputs = projection_inputs(
        {s.name: s for s in rate_list}, {s.name: s for s in ratio_list}, figures, clus,
        masters, n_ledger / n,
    )  # fmt: skip
    record = records.build(
        "scale",
        env,
        parameters={
            "escrows": escrows,
            "entries": n,
            "entries_ledger": n_ledger,
            "partitions": partitions,
            "masters": masters,
            "rounds": repeat,
            "min_seconds": min_seconds,
            "batch": BATCH,
            "redis": redis_desc,
            "cluster": f"LocalCluster, {masters} masters, no replicas, AOF off",
            "store": store.dialect,
        },
        rounds=rounds,
        orders=orders,
        ratios=ratio_list,
        rates=rate_list,
        figures={
            "layouts": {
                x.name: {
                    "partitions": x.partitions,
                    "redis_nodes": len(x.nodes),
                    "partitions_busy": x.busy,
                }
                for x in layouts
            },  # fmt: skip
            "measures": figures,
            "projection": {
                "inputs": inputs.to_dict(),
                "rows": [row.to_dict() for row in projection.project(inputs)],
                "assumptions": projection.assumptions(inputs),
            },
        },
    )
    print_report(console, record)
    return record


def _clean(layouts: list[Layout], prefix: str) -> None:
    """Delete every key of the run (a shared REDIS_URL keeps nothing of ours)."""
    for layout in layouts[:2]:  # the cluster goes away with its servers
        with contextlib.suppress(redis.RedisError):
            delete_keys(layout.client, f"{layout.prefix}*", lambda k: True)
    for layout in layouts:
        with contextlib.suppress(Exception):
            layout.client.close()
        for node in layout.nodes:
            with contextlib.suppress(Exception):
                node.close()


def print_report(console: Any, record: dict[str, Any]) -> None:
    p = record["parameters"]
    table = Table(
        title=f"scale: medians of {p['rounds']} interleaved rounds "
        f"(>= {p['min_seconds']:g} s of work each), 95% bootstrap interval",
        title_justify="left",
    )
    for column in ("figure", "median", "min-max", "interval", "per partition", "Redis µs/entry"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    measures = record["figures"]["measures"]
    for section in ("ratios", "rates"):
        for name, s in record[section].items():
            lo, hi = s["interval"]
            f = f"{{:,.{3 if s['unit'] == 'ratio' else 0}f}}"
            m = measures.get(name, {})
            cpu = m.get("redis_cpu_per_entry")
            table.add_row(
                name, f.format(s["median"]), f"{f.format(s['min'])}-{f.format(s['max'])}",
                f"{f.format(lo)}-{f.format(hi)}",
                f"{m['rate_per_partition']:,.0f}" if m else "",
                f"{cpu * 1e6:.2f}" if cpu else "",
            )  # fmt: skip
    console.print(table)
    proj = Table(title="projection (log entries/s)", title_justify="left")
    for column in (
        "machines",
        "masters",
        "machines' limit",
        "Redis",
        "store",
        "projected",
        "bound by",
    ):
        proj.add_column(column, justify="right")
    for row in record["figures"]["projection"]["rows"]:
        redis_limit = row["redis_limit"]
        proj.add_row(
            str(row["machines"]), str(row["masters"]), f"{row['machines_limit']:,.0f}",
            "–" if redis_limit is None else f"{redis_limit:,.0f}", f"{row['store_limit']:,.0f}",
            f"{row['projected']:,.0f}", row["bound_by"],
        )  # fmt: skip
    console.print(proj)
    for name, s in record["ratios"].items():
        lo, hi = s["interval"]
        print(f"ratio {name}: median {s['median']:.3f}, interval {lo:.3f}-{hi:.3f}")


@click.command()
@click.option("--escrows", default=2000, show_default=True, help="escrow lifecycles per layout")
@click.option("--partitions", default=16, show_default=True,
              help="partitions of the partitioned layouts")  # fmt: skip
@click.option("--masters", default=3, show_default=True, help="masters of the local cluster")
@click.option("--repeat", default=5, show_default=True, help="interleaved rounds")
@click.option(
    "--min-seconds",
    default=1.0,
    show_default=True,
    help="timed work per measurement per round (steps are repeated until it adds up)",
)
@click.option(
    "--quick", is_flag=True, help="a smoke run: 100 escrows, 3 rounds of >= 0.05 s, no record file"
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="where to write the record [bench/records/scale.json; none with --quick]",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the record to this file",
)
@click.option("--reset-store", is_flag=True,
              help="allow dropping and recreating the tables of DATABASE_URL")  # fmt: skip
def main(
    escrows: int,
    partitions: int,
    masters: int,
    repeat: int,
    min_seconds: float,
    quick: bool,
    record_path: Path | None,
    json_path: Path | None,
    reset_store: bool,
) -> None:
    """Runtime throughput on one redis-server, partitioned, and on a local Redis Cluster."""
    if quick:
        escrows, repeat, min_seconds = min(escrows, 100), 3, min(min_seconds, 0.05)
    if escrows < 1 or repeat < 1:
        raise click.UsageError("--escrows and --repeat must be at least 1")
    if not 2 <= partitions <= 1024:
        raise click.UsageError("--partitions must be between 2 and 1024 (two processes share them)")
    if masters < 1:
        raise click.UsageError("--masters must be at least 1")
    if not min_seconds >= 0:
        raise click.UsageError("--min-seconds must be 0 or more")
    record = run(escrows, partitions, masters, repeat, min_seconds, reset_store)
    records.emit(
        record, (record_path, json_path), None if quick else records.RECORDS_DIR / "scale.json"
    )


if __name__ == "__main__":
    main()
