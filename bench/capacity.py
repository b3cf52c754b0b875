"""End-to-end serve capacity: escrow lifecycles per second over HTTP, phones keeping up.

One run starts the whole service as a separate OS process, ``workbench serve``
(relay, one worker per handler group, the fan-out, timers, ``--api-workers``
API processes, ``--mpesa sim``: the simulated M-Pesa calls back over HTTP), on
a private redis-server configured as serve's embedded one (AOF everysec) and
a fresh store: SQLite in a temporary directory, or PostgreSQL when
``--database-url`` names one, in a schema of its own that is dropped at the
end. ``--users`` phones hold SSE streams for the
whole run, and the load generator (``bench/loadgen.py``: asyncio, httpx) drives
lifecycles through them: create, fund, the callback, ship, confirm, each phone
waiting for its events.

**Keeping up.** A step offers one rate of lifecycle arrivals (open loop) for
``--window`` seconds and keeps up when every lifecycle completed within
``--drain`` seconds after the window, every consumer group's lag and oldest
pending age stayed at or below ``--lag-bound`` seconds, the p99 of all command
latencies was at or below ``--p99-bound`` ms, every phone received exactly its
user stream, and the generator itself started no lifecycle more than
``--late-bound`` seconds late (otherwise the step measured the client, not
the server). Between steps the bench waits until every group and phone has
caught up. The drain (45 s) is wider than any queueing needs because serve's
simulated M-Pesa leaves 5% of its status queries unanswered and the
verification pass asks again after 5 s, doubling: a lifecycle whose query went
unanswered twice (about one in 400) takes ~20 s, three times ~40 s, at any
rate. With a drain of 20 s such a lifecycle failed the step it started in,
whatever the rate, and made the search noisy.

**The sustainable rate.** Each round steps the offered rate up by ``--factor``
from ``--start-rate`` (later rounds start two factors below the previous
round's finding) until a step does not keep up, then bisects ``--refine``
times between the last rate that kept up and the first that did not. The
round's sustainable rate is the highest rate that kept up (0 when none did).

**The ratio.** The denominator is the direct :class:`EscrowService` rate
(``bench/throughput.py``'s ``commands``: the same five commands per lifecycle
in-process, at least ``--min-seconds`` per round) on a store of the same kind
(another SQLite file in the same directory; another schema of the same
PostgreSQL database), measured in the same run. ``http`` and ``direct`` are
interleaved round by round (order reversed every other round) and the ratio
``http_vs_direct`` (sustainable lifecycles/s over HTTP / direct lifecycles/s)
is the median of per-round ratios with its bootstrap interval, judged against
``--target`` (0.5) by ``bench/stats.py``: a verdict only when the interval
clears it.

Timing is printed and recorded, never asserted: the load generator, the
server's processes, Redis and the store share the machine's cores, and the
load average goes into the record. The CPU each step cost is read per process
(serve's from its supervision file, Redis' from ``INFO cpu``, the generator's
own) and, when the PostgreSQL server is on this machine (the URL's host is
local or a socket), every ``postgres`` process's too (``bench/cpu.py``): the
database's work shares the cores and counts toward what they allow. The record
goes to ``bench/records/capacity.json`` (``capacity_postgresql.json`` on PostgreSQL;
``--quick`` writes none unless ``--record``). ``--keep`` keeps the temporary
directory with the logs of serve's processes; the record counts the lines in
them that report trouble.

Usage::

    .venv/bin/python bench/capacity.py                   # SQLite, 3 rounds
    .venv/bin/python bench/capacity.py --quick           # smoke run (< 1 min)
    .venv/bin/python bench/capacity.py --database-url "$TEST_DATABASE_URL"   # PostgreSQL
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import httpx
import redis
import sqlalchemy
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import records, stats  # noqa: E402
from bench.cpu import is_local_host, local_postgres_cpu_s, process_cpu_s, redis_cpu_s  # noqa: E402
from bench.loadgen import Bounds, Driver, Phones, StepResult, run_step, step_verdict  # noqa: E402
from bench.sse import ApiServer, new_loop, raise_fd_limit  # noqa: E402
from bench.throughput import STEP_ESCROWS, produce  # noqa: E402
from simulations.analysis.report import wide_console  # noqa: E402
from workbench.domain.clock import ManualClock  # noqa: E402
from workbench.domain.ids import IdFactory  # noqa: E402
from workbench.ops.inspection import inspect  # noqa: E402
from workbench.ops.redis_server import attach_or_start  # noqa: E402
from workbench.payments.mpesa import GatewayBehaviour, SimulatedGateway  # noqa: E402
from workbench.service import EscrowService  # noqa: E402
from workbench.store import Store  # noqa: E402
from workbench.streams.connection import connect, server_version  # noqa: E402
from workbench.streams.keys import StreamNames, UserStreamNames, names_for  # noqa: E402

COMMANDS_PER_LIFECYCLE = 5  # create, fund, callback, ship, confirm (throughput.produce)
TARGET = 0.5  # issue 16: HTTP lifecycles/s >= half the direct EscrowService rate
USER_MAXLEN = 1_000_000  # no trimming during a run: each phone is compared with its stream
SETTLE_S = 60.0  # how long the system may take to catch up between steps


@dataclass(frozen=True)
class Config:
    """Everything one run is made of; :func:`main` builds it from the options."""

    database_url: str | None  # None: SQLite in a temporary directory
    users: int
    api_workers: int
    start_rate: float
    factor: float
    max_steps: int
    refine: int
    window_s: float
    drain_s: float
    bounds: Bounds
    rounds: int
    min_seconds: float
    target: float
    quick: bool
    keep: bool = False  # keep the temporary directory (serve's logs) after the run


def bench_name(config: Config) -> str:
    """The record's name: one record per store kind (``bench/records/<name>.json``)."""
    return "capacity" if config.database_url is None else "capacity_postgresql"


# -- the search: a pure plan ---------------------------------------------------------------


def next_rate(tried: list[tuple[float, bool]], config: Config, start: float) -> float | None:
    """The next rate to offer given (rate, kept up) so far, or None when the search is done.

    Up by ``factor`` until a step fails; down by ``factor`` while nothing has
    kept up; then ``refine`` bisections between the best good and worst bad.
    """
    if not tried:
        return start
    if len(tried) >= config.max_steps + config.refine:
        return None
    good = [r for r, ok in tried if ok]
    bad = [r for r, ok in tried if not ok]
    if not bad:
        return tried[-1][0] * config.factor if len(tried) < config.max_steps else None
    if not good:
        return min(bad) / config.factor if len(tried) < config.max_steps else None
    first_bad = next(i for i, (_, ok) in enumerate(tried) if not ok)
    if len(tried) - first_bad - 1 >= config.refine:
        return None
    return (max(good) + min(bad)) / 2


def sustainable(tried: list[tuple[float, bool]]) -> float:
    """The highest rate that kept up (0 when none did)."""
    return max((r for r, ok in tried if ok), default=0.0)


# -- stores of the same kind ---------------------------------------------------------------


@contextlib.contextmanager
def stores(config: Config, directory: Path) -> Iterator[tuple[str, str, str]]:
    """(serve's store URL, the direct measurement's store URL, what they are).

    SQLite: two files in ``directory``. PostgreSQL: two fresh schemas of the
    given database (``search_path`` per connection), dropped at the end.
    """
    if config.database_url is None:
        yield (
            f"sqlite:///{directory / 'serve.db'}",
            f"sqlite:///{directory / 'direct.db'}",
            "SQLite (a file each, same directory)",
        )
        return
    base = sqlalchemy.engine.make_url(config.database_url)
    tag = f"capacity_{os.getpid()}"
    schemas = (f"{tag}_serve", f"{tag}_direct")
    engine = sqlalchemy.create_engine(base)
    try:
        with engine.begin() as conn:
            for schema in schemas:
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
        urls = [
            base.update_query_dict({"options": f"-csearch_path={s}"}).render_as_string(
                hide_password=False
            )
            for s in schemas
        ]
        yield urls[0], urls[1], f"PostgreSQL (schemas {', '.join(schemas)})"
    finally:
        with engine.begin() as conn:
            for schema in schemas:
                conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def _local_database(url: str) -> bool:
    return is_local_host(sqlalchemy.engine.make_url(url).host)


class Direct:
    """The denominator: lifecycles through :class:`EscrowService` in this process."""

    def __init__(self, url: str) -> None:
        self.store = Store(url)
        self.store.reset()
        self.clock = ManualClock()
        behaviour = GatewayBehaviour(failure_rate=0, duplicate_rate=0, late_rate=0, lost_rate=0)
        self.gateway = SimulatedGateway(self.clock, behaviour, seed=1)
        self.service = EscrowService(
            self.store, clock=self.clock, ids=IdFactory(2), gateway=self.gateway
        )

    def _step(self) -> tuple[int, float]:
        done = stats.timed(lambda: produce(self.service, self.gateway, self.clock, STEP_ESCROWS))
        return done[0] // COMMANDS_PER_LIFECYCLE, done[1]

    def measure(self, min_seconds: float) -> stats.Sample:
        return stats.accumulate(self._step, min_seconds)

    def close(self) -> None:
        self.store.close()


# -- the HTTP side: one search per round -----------------------------------------------------


@dataclass
class Http:
    """The running service, its Redis, the phones, and every step so far."""

    config: Config
    server: ApiServer
    client: redis.Redis
    phones: Phones
    http: httpx.AsyncClient
    steps: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)
    lifecycles: int = 0  # lifecycles started so far (their index)

    @property
    def names(self) -> StreamNames:
        return names_for(self.server.prefix)

    async def settle(self) -> float | None:
        """Wait until the outbox is published, every group has nothing pending or
        undelivered and every phone has its stream's entries; the seconds that took
        (None: not within :data:`SETTLE_S`)."""
        started = time.monotonic()
        users = UserStreamNames.of(self.names)
        while time.monotonic() < started + SETTLE_S:
            idle = await asyncio.to_thread(self._groups_idle) and await self._outbox_empty()
            if idle and self.phones.received_all(self.client, users):
                return round(time.monotonic() - started, 3)
            await asyncio.sleep(0.1)
        return None

    async def _outbox_empty(self) -> bool:
        """The relay published everything (and the API answers: its queue has drained)."""
        try:
            outbox = (await self.http.get("/healthz")).json()["outbox"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return outbox.get("unpublished") == 0

    def _groups_idle(self) -> bool:
        rows = inspect(self.client, self.names).groups
        return all(not row["pending"] and not row["lag"] for row in rows)

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each of serve's processes, this one and redis-server."""
        state = json.loads((self.server.dir / "supervision.json").read_text())
        out = {
            name: process_cpu_s(c["pid"]) for name, c in state["components"].items() if c.get("pid")
        }
        out["redis"] = redis_cpu_s(self.client)
        out["load generator"] = time.process_time()
        if self.config.database_url is not None and _local_database(self.config.database_url):
            # A PostgreSQL server on this machine works on these cores too.
            out["postgresql"] = local_postgres_cpu_s()
        return out

    async def step(self, rate: float) -> StepResult:
        config = self.config
        driver = Driver(self.http, self.phones, deadline=0.0)  # run_step sets it
        before = self.cpu_seconds()
        result = await run_step(
            driver, self.client, self.names, rate, config.window_s, config.drain_s, self.lifecycles
        )
        after = self.cpu_seconds()
        # CPU seconds the step's work cost per second of offered load: the cores this
        # rate keeps busy in a steady state (the drain's work belongs to the window).
        result.cpu_cores = {
            k: round((after[k] - before[k]) / config.window_s, 3) for k in after if k in before
        }
        self.lifecycles += result.started
        result.settle_s = await self.settle()
        users = UserStreamNames.of(self.names)
        result.phones = len(self.phones.users)
        result.phones_exact, result.phones_closed = self.phones.check(self.client, users)
        result.reasons = step_verdict(result, config.bounds)
        result.keeps_up = not result.reasons
        return result

    async def search(self, start: float, say: Any) -> tuple[float, StepResult | None]:
        """One round's search; (sustainable rate, the step that sustained it)."""
        tried: list[tuple[float, bool]] = []
        done: list[dict[str, Any]] = []
        best: StepResult | None = None
        while (rate := next_rate(tried, self.config, start)) is not None:
            result = await self.step(round(rate, 3))
            tried.append((result.rate, result.keeps_up))
            done.append(result.to_dict())
            if result.keeps_up and (best is None or result.rate > best.rate):
                best = result
            say(_step_line(result))
        self.steps.append(done)
        return sustainable(tried), best


def _step_line(s: StepResult) -> str:
    verdict = "keeps up" if s.keeps_up else "NOT: " + "; ".join(s.reasons)
    lag = max(s.group_lag_s.values(), default=0.0)
    return (
        f"  {s.rate:g}/s x {s.window_s:g} s: {s.completed}/{s.started} lifecycles, "
        f"command p50 {s.command_latency.get('p50_ms')} p99 {s.command_latency.get('p99_ms')} ms, "
        f"delivery p99 {s.delivery_latency.get('p99_ms')} ms, worst group lag {lag:.2f} s, "
        f"phones {s.phones_exact}/{s.phones}, cores {_busiest(s.cpu_cores)} -> {verdict}"
    )


def _busiest(cores: dict[str, float], top: int = 4) -> str:
    """The ``top`` busiest processes: ``api-0 0.91, load generator 0.40, ...``."""
    ranked = sorted(cores.items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{name} {value:.2f}" for name, value in ranked)


# -- a run --------------------------------------------------------------------------------


@contextlib.contextmanager
def service(config: Config, directory: Path, store_url: str) -> Iterator[tuple[ApiServer, str]]:
    """A private Redis as serve would embed it, and ``workbench serve`` on it."""
    with attach_or_start(None, directory / "redis", appendonly=True, appendfsync="everysec") as (
        url,
        _,
    ):
        server = ApiServer(
            url,
            f"cap{os.getpid()}",
            secrets.token_hex(32),
            directory / "serve",
            api_only=False,
            mpesa="sim",
            database_url=store_url,
            workers=config.api_workers,
            extra_env={"WORKBENCH_CREATE_LIMIT": "0"},  # one phone creates many escrows
            extra_args=("--user-maxlen", str(USER_MAXLEN)),
        )
        server.launch()
        try:
            server.wait_ready()
            yield server, server_version_text(url)
        finally:
            server.stop()


def server_version_text(url: str) -> str:
    client = connect(url)
    try:
        return ".".join(map(str, server_version(client)))
    finally:
        client.close()


async def _open(config: Config, server: ApiServer) -> Http:
    users = [f"phone-{i:04d}" for i in range(config.users)]
    phones = Phones("127.0.0.1", server.port, users, server.secret)
    failures = await phones.connect(timeout=60)
    if failures:
        raise click.ClickException(f"phones could not connect: {failures}")
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    http = httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60)
    return Http(config, server, connect(server.redis_url), phones, http)


async def _close(h: Http) -> None:
    await h.http.aclose()
    await h.phones.close()
    h.client.close()


def run(config: Config) -> dict[str, Any]:
    """Start everything, run the interleaved rounds, return the record."""
    console = wide_console()
    load_before = records.load_average()
    raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="workbench-capacity-"))
    found: list[StepResult | None] = []
    try:
        with (
            stores(config, tmp) as (serve_url, direct_url, store_desc),
            service(config, tmp, serve_url) as (server, version),
            asyncio.Runner(loop_factory=new_loop) as runner,
        ):
            console.print(
                f"[bold]capacity[/]: serve with {config.api_workers} API process(es), "
                f"--mpesa sim, {config.users} phones on SSE; store {store_desc}; "
                f"Redis {version}; {os.cpu_count()} CPUs; load {load_before}"
            )
            h = runner.run(_open(config, server))
            direct = Direct(direct_url)
            try:
                rounds, orders = _rounds(config, runner, h, direct, found, console.print)
            finally:
                direct.close()
                runner.run(_close(h))
            errors = errors_logged(server.dir)
    finally:
        if config.keep:
            print(f"kept {tmp} (serve's logs under serve/)", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    env = records.environment(version, load_before)
    return record_of(config, env, rounds, orders, h.steps, found, store_desc, errors)


def _rounds(
    config: Config, runner: asyncio.Runner, h: Http, direct: Direct, found: list, say: Any
) -> tuple[list[stats.Round], list[list[str]]]:
    starts = [config.start_rate]

    def measure_http() -> stats.Sample:
        say(f"round {len(found) + 1}: search from {starts[-1]:g} lifecycles/s")
        rate, best = runner.run(h.search(starts[-1], say))
        found.append(best)
        starts.append(max(config.start_rate, rate / config.factor**2))
        if best is None:
            return stats.Sample(0, config.window_s)
        return stats.Sample(best.started, best.started / best.rate)

    def measure_direct() -> stats.Sample:
        sample = direct.measure(config.min_seconds)
        say(f"direct EscrowService: {sample.rate:,.1f} lifecycles/s")
        return sample

    return stats.interleave({"http": measure_http, "direct": measure_direct}, config.rounds)


def errors_logged(directory: Path, keep: int = 5) -> dict[str, Any]:
    """Per log of serve's processes: how many lines say something went wrong, the last few."""
    keys = ("Traceback", "ERROR", "Error:", "WARNING", "failed")
    out: dict[str, Any] = {}
    for log in sorted(directory.glob("*.log")):
        lines = [
            ln for ln in log.read_text(errors="replace").splitlines() if any(k in ln for k in keys)
        ]
        if lines:
            out[log.name] = {"lines": len(lines), "last": lines[-keep:]}
    return out


# -- the record ---------------------------------------------------------------------------


def ceilings(best: StepResult, cpus: int) -> dict[str, float]:
    """What the cores allow at the CPU a lifecycle cost at the sustained rate.

    ``total_ms``: CPU ms per lifecycle of every process (serve's, Redis, the
    load generator and a PostgreSQL server on this machine); ``client_ms``: the
    load generator's share. ``machine``: lifecycles/s at which ``cpus`` cores
    would be saturated at that cost;
    ``client``: the same for the load generator alone, a ceiling no server
    could lift on this machine (the phones must be driven from its cores).
    """
    per = {name: cores / best.rate for name, cores in best.cpu_cores.items()}
    total = sum(per.values())
    client = per.get("load generator", 0.0)
    return {
        "total_ms": round(total * 1000, 2),
        "client_ms": round(client * 1000, 2),
        "machine": round(cpus / total, 1) if total else float("inf"),
        "client": round(cpus / client, 1) if client else float("inf"),
    }


def _headline(
    found: list[StepResult | None], direct_median: float, target: float, cpus: int
) -> list[list[str]]:
    rows: list[list[str]] = []
    for i, best in enumerate(found, 1):
        if best is None:
            rows.append([f"round {i}: sustainable rate", "none kept up"])
            continue
        lag = max(best.group_lag_s.values(), default=0.0)
        rows.append(
            [
                f"round {i}: sustainable lifecycles/s over HTTP (HTTP commands/s offered)",
                f"{best.rate:g} ({best.rate * best.commands / best.started:,.1f})",
            ]
        )
        rows.append(
            [
                f"round {i}: command latency p50 / p99 / max at that rate",
                f"{best.command_latency['p50_ms']} / {best.command_latency['p99_ms']} / "
                f"{best.command_latency['max_ms']} ms",
            ]
        )
        rows.append(
            [
                f"round {i}: phone delivery p50 / p99, worst group lag, phones exact",
                f"{best.delivery_latency['p50_ms']} / {best.delivery_latency['p99_ms']} ms, "
                f"{lag:.2f} s, {best.phones_exact} of {best.phones}",
            ]
        )
        rows.append([f"round {i}: CPU s per offered s at that rate", _busiest(best.cpu_cores)])
        c = ceilings(best, cpus)
        rows.append(
            [
                f"round {i}: CPU ms per lifecycle, all processes (load generator's share); "
                f"lifecycles/s that saturate {cpus} cores at that cost (the generator alone)",
                f"{c['total_ms']:,.1f} ({c['client_ms']:,.1f}) ms; "
                f"{c['machine']:,.1f} ({c['client']:,.1f})/s",
            ]
        )
    rows.append(["direct EscrowService lifecycles/s (median of rounds)", f"{direct_median:,.1f}"])
    needed = target * direct_median
    reached = [ceilings(b, cpus)["machine"] for b in found if b is not None]
    if reached:
        ceiling = max(reached)
        rows.append(
            [
                f"the target needs {target:g} x direct over HTTP; these cores allow at most",
                f"{needed:,.1f}/s needed; {ceiling:,.1f}/s at the measured CPU per lifecycle"
                + (" (out of reach on this machine)" if ceiling < needed else ""),
            ]
        )
    return rows


def record_of(
    config: Config,
    env: dict[str, Any],
    rounds: list[stats.Round],
    orders: list[list[str]],
    steps: list[list[dict[str, Any]]],
    found: list[StepResult | None],
    store_desc: str,
    errors: dict[str, Any],
) -> dict[str, Any]:
    ratio = stats.ratio_summary(
        "http_vs_direct",
        rounds,
        "http",
        "direct",
        what="sustainable lifecycles/s over HTTP / direct EscrowService lifecycles/s",
        target=config.target,
    )
    rates = [
        stats.rate_summary(
            "http", rounds, what="sustainable lifecycles over HTTP, phones keeping up",
            unit="lifecycles/s",
        ),
        stats.rate_summary(
            "direct", rounds, what="EscrowService lifecycles in-process (5 commands each)",
            unit="lifecycles/s",
        ),
    ]  # fmt: skip
    parameters = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("bounds", "database_url", "keep")
    }
    parameters.update(dataclasses.asdict(config.bounds), store=store_desc)
    return records.build(
        bench_name(config),
        env,
        parameters=parameters,
        rounds=rounds,
        orders=orders,
        ratios=[ratio],
        rates=rates,
        figures={
            "headline": _headline(found, rates[1].median, config.target, os.cpu_count() or 1),
            "ceilings": [None if b is None else ceilings(b, os.cpu_count() or 1) for b in found],
            "steps": steps,
            "server_log_errors": errors,
        },
        notes=[
            "http rate: the highest offered rate that kept up in the round's search "
            f"(steps x{config.factor:g}, {config.refine} bisections)",
            "the load generator, the server's processes, Redis and the store share the cores",
            *(
                [
                    "postgresql: the CPU of every postgres process on this machine (the server "
                    "shares the cores)"
                ]
                if config.database_url is not None and _local_database(config.database_url)
                else []
            ),
        ],
    )


def print_report(record: dict[str, Any]) -> None:
    console = wide_console()
    table = Table(title="serve capacity", title_justify="left")
    for column in ("figure", "value"):
        table.add_column(column)
    for name, value in record["figures"]["headline"]:
        table.add_row(name, value)
    r = record["ratios"]["http_vs_direct"]
    table.add_row(
        "http_vs_direct (median of per-round ratios, interval)",
        f"{r['median']:.3g} ({r['interval'][0]:.3g}-{r['interval'][1]:.3g}), "
        f"target >= {r['target']:g}: {r['verdict']}",
    )
    console.print(table)
    for log, found in record["figures"]["server_log_errors"].items():
        console.print(f"[red]{log}: {found['lines']} lines report trouble[/], the last:")
        for line in found["last"]:
            console.print(f"  {line}", markup=False)


# -- the command line ---------------------------------------------------------------------

QUICK = {"users": 10, "start_rate": 2.0, "factor": 2.0, "max_steps": 2, "refine": 0,
         "window_s": 3.0, "drain_s": 20.0, "rounds": 1, "min_seconds": 0.2}  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


def _positive(options: dict[str, Any]) -> None:
    """Exit 2 naming the option, its value and what is allowed."""
    checks = [
        *[(n, options[n] > 0, "a positive number") for n in
          ("start_rate", "window_s", "drain_s", "lag_bound", "p99_bound", "late_bound")],
        *[(n, options[n] >= 1, "at least 1") for n in ("max_steps", "rounds", "api_workers")],
        ("users", options["users"] >= 2, "at least 2 (a buyer and a seller)"),
        ("factor", options["factor"] > 1, "above 1"),
        ("refine", options["refine"] >= 0, "0 or more"),
        ("min_seconds", options["min_seconds"] >= 0, "0 or more"),
    ]  # fmt: skip
    for name, ok, allowed in checks:
        if not ok:
            raise click.UsageError(f"{_flag(name)} must be {allowed}, not {options[name]}")


@click.command()
@click.option("--database-url",
              help="PostgreSQL to run on, e.g. \"$TEST_DATABASE_URL\" (two fresh schemas, "
              "dropped after) [default: SQLite in a temporary directory]")  # fmt: skip
@click.option("--users", default=100, show_default=True, help="phones on SSE (users)")
@click.option("--api-workers", default=1, show_default=True, help="serve --workers")
@click.option("--start-rate", default=5.0, show_default=True, help="lifecycles/s of the 1st step")
@click.option("--factor", default=1.5, show_default=True, help="rate step up")
@click.option("--max-steps", default=8, show_default=True, help="steps up (or down) per round")
@click.option("--refine", default=2, show_default=True, help="bisections after the first miss")
@click.option("--window", "window_s", default=10.0, show_default=True, help="seconds per step")
@click.option("--drain", "drain_s", default=45.0, show_default=True,
              help="seconds after the window for lifecycles to end")  # fmt: skip
@click.option("--lag-bound", default=2.0, show_default=True, help="max group lag, seconds")
@click.option("--p99-bound", default=500.0, show_default=True, help="max command p99, ms")
@click.option("--late-bound", default=1.0, show_default=True,
              help="max lateness of the generator's own arrivals, seconds")  # fmt: skip
@click.option("--rounds", default=3, show_default=True, help="interleaved rounds")
@click.option("--min-seconds", default=1.0, show_default=True, help="direct: seconds per round")
@click.option("--target", default=TARGET, show_default=True, help="for http_vs_direct")
@click.option("--keep", is_flag=True, help="keep the temporary directory (serve's logs)")
@click.option(
    "--quick",
    is_flag=True,
    help="smoke run: 10 phones, 2 short steps, 1 round (explicit options win)",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              help="also write the record to this file")  # fmt: skip
@click.option("--record", "record_path", type=click.Path(dir_okay=False, path_type=Path),
              help="record path [bench/records/<name>.json; none with --quick]")  # fmt: skip
def main(json_path: Path | None, record_path: Path | None, **options: Any) -> None:
    """Escrow lifecycles per second through serve's HTTP API, phones and groups keeping up."""
    if options["quick"]:  # the quick values, save for options given explicitly
        ctx = click.get_current_context()
        default = click.core.ParameterSource.DEFAULT
        options.update({k: v for k, v in QUICK.items() if ctx.get_parameter_source(k) == default})
    _positive(options)
    bounds = Bounds(options.pop("lag_bound"), options.pop("p99_bound"), options.pop("late_bound"))
    config = Config(bounds=bounds, **options)
    record = run(config)
    print_report(record)
    records.emit(
        record,
        (record_path, json_path),
        None if config.quick else records.RECORDS_DIR / f"{bench_name(config)}.json",
    )


if __name__ == "__main__":
    main()
