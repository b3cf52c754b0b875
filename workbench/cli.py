"""The ``workbench`` command line: the runtime's commands, and the lab's when installed.

The runtime's commands (``serve``, ``worker``, ``relay``, ``timers``,
``inspect``, ``token``) live here. The lab's (``simulate``, ``check``,
``sweep``, ``run``, …) are named by the ``workbench.commands`` entry points
(see ``pyproject.toml``) and imported only when called, so this module never
imports the lab; without the ``lab`` extra such a command explains how to
install it and exits 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import redis

from workbench import paths
from workbench.delivery.userstreams import DEFAULT_USER_MAXLEN
from workbench.domain.clock import clock_from_env, simulated
from workbench.handlers import ALL_GROUPS, handler_for
from workbench.handlers.fanout import FanoutHandler
from workbench.store import Store, database_url
from workbench.streams.connection import connect, redacted, refused
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
from workbench.streams.relay import DEFAULT_FSYNC_TIMEOUT_MS, OutboxRelay


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _redis_url(value: str | None) -> str:
    url = value or os.environ.get("REDIS_URL")
    if not url:
        raise click.UsageError(
            "no Redis to talk to: pass --redis-url or set REDIS_URL "
            "(`workbench serve` starts its own Redis; this command attaches to one)"
        )
    return url


def _client(url: str) -> Any:
    """A client for ``url``; a cluster none of whose named nodes answers (its client
    connects at once) or a URL that is not Redis' is an exit-2 message, not a traceback."""
    from redis.exceptions import RedisClusterException

    try:
        return connect(url)
    except RedisClusterException as exc:
        click.echo(redacted(f"Error: cannot reach the Redis Cluster at {url}: {exc}"), err=True)
        sys.exit(2)
    except ValueError as exc:  # redis-py: "Redis URL must specify one of the ..."
        raise click.UsageError(redacted(f"--redis-url / REDIS_URL {url!r}: {exc}")) from None


def _store(url: str | None) -> Store:
    """The store at ``url`` (or the default), its tables created if missing (a process
    started on its own, on a fresh database, works as under serve); a URL SQLAlchemy
    cannot use, or a database that cannot be reached, is exit 2."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    try:
        store = Store(url or _default_database())
    except (ArgumentError, NoSuchModuleError) as exc:
        raise click.UsageError(redacted(f"--database-url / DATABASE_URL {url!r}: {exc}")) from None
    try:
        store.create_schema()
    except OperationalError as exc:
        click.echo(f"Error: cannot use the database {store!r}: {exc.orig}", err=True)
        sys.exit(2)
    return store


class FiniteFloat(click.FloatRange):
    """click's ``FloatRange`` that also refuses ``nan`` and the infinities: a range
    alone lets ``nan`` through (it compares false with every bound)."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


redis_option = click.option("--redis-url", envvar="REDIS_URL", help="Redis URL [env REDIS_URL]")
database_option = click.option(
    "--database-url", envvar="DATABASE_URL",
    help="SQLAlchemy URL of the store [env DATABASE_URL; default sqlite DATA/workbench.db]",
)  # fmt: skip
_prefix_only = click.option(
    "--prefix", default="wb", show_default=True, help="key prefix of the streams"
)
_partitions_only = click.option(
    "--partitions", envvar="WORKBENCH_PARTITIONS", default=0, show_default=True,
    type=click.IntRange(0, 1024),
    help="partitions of the log (0: one, with unpartitioned key names; a Redis Cluster "
    "needs more, e.g. 16) [env WORKBENCH_PARTITIONS]",
)  # fmt: skip


def prefix_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--prefix`` and ``--partitions``: together they name every key (:func:`_names`)."""
    return _prefix_only(_partitions_only(command))


def _names(prefix: str, partitions: int) -> Any:
    from workbench.streams.keys import names_for

    return names_for(prefix, partitions)


#: Entry-point group through which the lab (``simulations``) adds its commands.
COMMANDS_GROUP = "workbench.commands"
LAB_INSTALL_HINT = (
    "it is part of the lab: install it with `pip install 'escrow-workbench[lab]'` "
    "(`make venv` does)"
)


class _WithLabCommands(click.Group):
    """A group that also offers the commands named by :data:`COMMANDS_GROUP`, loaded
    when called (so ``workbench worker`` never imports SimPy or pandas). Commands
    named ``sim-*`` are the lab's internal processes: hidden from ``--help``."""

    def _plugins(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self._plugins()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        if command is not None or cmd_name not in (plugins := self._plugins()):
            return command
        try:
            return plugins[cmd_name].load()
        except ImportError as exc:
            return _unavailable(cmd_name, exc, hidden=cmd_name.startswith("sim-"))


def _unavailable(name: str, exc: ImportError, *, hidden: bool) -> click.Command:
    missing = getattr(exc, "name", None) or str(exc)

    @click.command(
        name=name,
        hidden=hidden,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help=f"(not installed: {LAB_INSTALL_HINT})",
    )
    def command() -> None:
        click.echo(f"workbench {name}: {LAB_INSTALL_HINT}; missing module {missing!r}", err=True)
        sys.exit(2)

    return command


@click.group(cls=_WithLabCommands)
@click.version_option(package_name="escrow-workbench")
def main() -> None:
    """Escrow event workbench: an M-Pesa escrow runtime on Redis Streams."""


@main.command()
@click.argument("group", type=click.Choice((*ALL_GROUPS, "analytics")))
@click.option("--consumer", help="consumer name [default GROUP-PID]")
@redis_option
@database_option
@prefix_option
@click.option("--batch-size", default=500, show_default=True, type=click.IntRange(1, 100_000))
@click.option(
    "--block-ms", default=1000, show_default=True, type=click.IntRange(min=1),
    help="longest wait of one read for new entries",
)  # fmt: skip
@click.option("--max-deliveries", default=5, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--max-crashes", default=2, show_default=True, type=click.IntRange(min=1),
    help="deaths of this group's consumers while handling an entry alone before it is "
    "dead-lettered unhandled (each such entry costs serve 1 + this many restarts)",
)  # fmt: skip
@click.option(
    "--retry-backoff", default=1.0, show_default=True, type=FiniteFloat(min=0), help="seconds"
)
@click.option(
    "--dead-after", default=10.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
    help="seconds without heartbeat before a consumer counts as dead",
)  # fmt: skip
@click.option(
    "--claim-idle-ms", default=60_000, show_default=True, type=click.IntRange(min=1),
    help="backstop: claim any entry idle this long",
)  # fmt: skip
@click.option(
    "--user-maxlen", default=DEFAULT_USER_MAXLEN, show_default=True,
    type=click.IntRange(1, 10_000_000),
    help="fanout only: entries kept per user stream (approximate MAXLEN)",
)  # fmt: skip
@click.option(
    "--user-max-age", default=0.0, show_default=True, type=FiniteFloat(min=0),
    help="fanout only: seconds of history kept per user stream (0: no age limit)",
)  # fmt: skip
@click.option(
    "--wait-replicas", default=0, show_default=True, type=click.IntRange(0, 16),
    envvar="WORKBENCH_WAIT_REPLICAS",
    help="fanout only: ack a batch once this many replicas of every node written to have "
    "it (WAIT); on a Redis Cluster with replicas use 1, or a failover can lose user-stream "
    "entries whose events were acked [env WORKBENCH_WAIT_REPLICAS]",
)  # fmt: skip
@click.option(
    "--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
    help="analytics only (required): the risk model's directory (model.joblib + metadata.json)",
)  # fmt: skip
@click.option("--risk-prefix", help="analytics only: key prefix of the risk stream [--prefix]")
@click.option(
    "--group-name",
    help="analytics only: the consumer group's name [analytics] (two models side by side)",
)
@click.option(
    "--wait-for-redis", is_flag=True,
    help="if Redis cannot be reached at start, wait for it instead of exiting 2 (serve "
    "passes it: a worker restarted while serve restarts Redis must not give up)",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True)
def worker(
    group: str,
    consumer: str | None,
    redis_url: str | None,
    database_url: str | None,
    prefix: str,
    partitions: int,
    batch_size: int,
    block_ms: int,
    max_deliveries: int,
    max_crashes: int,
    retry_backoff: float,
    dead_after: float,
    claim_idle_ms: int,
    user_maxlen: int,
    user_max_age: float,
    wait_replicas: int,
    model_dir: Path | None,
    risk_prefix: str | None,
    group_name: str | None,
    wait_for_redis: bool,
    verbose: bool,
    make_worker: Callable[..., ConsumerWorker] = ConsumerWorker,
) -> None:
    """Consume GROUP until SIGTERM (finishes the batch, acks, exits).

    GROUP is a handler group, ``fanout`` (copy events into per-user streams), or
    ``analytics`` (score sellers with the risk model of ``--model``, publishing
    ``risk.scored`` entries).
    """
    from workbench.streams.groups import PartitionCountMismatch

    names = _names(prefix, partitions)
    if (group == "analytics") != (model_dir is not None):
        raise click.UsageError("--model is required for the analytics group, and only for it")
    if group != "analytics" and (risk_prefix or group_name):
        raise click.UsageError("--risk-prefix and --group-name are for the analytics group")
    setup_logging(verbose)
    model = _risk_model(model_dir) if model_dir is not None else None
    store = _store(database_url)
    client = _client(_redis_url(redis_url))
    clock = clock_from_env()
    try:
        settings = ConsumerSettings(
            batch_size=batch_size,
            block_ms=block_ms,
            max_deliveries=max_deliveries,
            max_crashes=max_crashes,
            retry_backoff_s=retry_backoff,
            dead_after_s=dead_after,
            claim_idle_ms=claim_idle_ms,
            ids_on_clock=simulated(clock) is not None,  # a real-time simulation's timeline
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    handler: Any = handler_for(
        group, store, clock,
        fanout=lambda: FanoutHandler(
            client, names, user_maxlen=user_maxlen, user_max_age_s=user_max_age,
            clock=simulated(clock), wait_replicas=wait_replicas,
        ),
        analytics=lambda: _risk_scorer(
            store, client, clock, model, names, risk_prefix, group_name
        ),
    )  # fmt: skip
    w = make_worker(
        client, handler, consumer=consumer, names=names, settings=settings,
        clock=clock,
    )  # fmt: skip
    w.install_signal_handlers()
    try:
        w.setup()
    except PartitionCountMismatch as exc:
        click.echo(f"workbench worker {group} --partitions {partitions}: {exc}", err=True)
        sys.exit(2)
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        if not wait_for_redis:  # most likely a wrong URL: say so
            click.echo(f"Error: cannot reach Redis at --redis-url / REDIS_URL: {exc}", err=True)
            sys.exit(2)
        # Down for now (serve restarting it): the loop sets up once it answers.
        click.echo(f"{w.consumer}: cannot reach Redis yet ({exc}); waiting", err=True)
    except redis.ResponseError as exc:
        if not refused(exc):
            raise
        # Up but refusing writes (out of memory, a full disk): the loop sets up once it takes them.
        click.echo(f"{w.consumer}: Redis refuses writes for now ({exc}); waiting", err=True)
    click.echo(f"{w.consumer}: consuming {group} from {', '.join(w.streams)}", err=True)
    w.run()
    w.leave()
    scored = f"; published {handler.published}" if group == "analytics" else ""
    click.echo(f"{w.consumer}: stopped; {w.stats}{scored}", err=True)


def _risk_model(model_dir: Path) -> Any:
    """The risk model of ``--model``, or a usage error (before the store is touched)."""
    from importlib.util import find_spec

    from workbench.analytics.model import ANALYTICS_EXTRA, load

    if missing := [name for name in ANALYTICS_EXTRA if find_spec(name) is None]:
        raise click.UsageError(
            "the analytics scorer needs the analytics extra: "
            f"pip install 'escrow-workbench[analytics]' (missing: {', '.join(missing)})"
        )
    try:
        return load(model_dir)
    except (OSError, ValueError) as exc:  # not a model directory; a model file altered
        raise click.UsageError(f"--model {model_dir}: {exc}") from None


def _risk_scorer(
    store: Store, client: Any, clock: Any, model: Any, names: Any,
    risk_prefix: str | None, group_name: str | None,
) -> Any:  # fmt: skip
    from workbench.analytics.scorer import RiskScorer
    from workbench.streams.keys import RiskNames

    return RiskScorer(
        store, client, model, group=group_name or "analytics", names=names,
        risk_names=RiskNames(risk_prefix or names.prefix, names.partitioning), clock=clock,
        ids_on_clock=simulated(clock) is not None,
    )  # fmt: skip


@main.command()
@redis_option
@database_option
@prefix_option
@click.option(
    "--wait-fsync/--no-wait-fsync", default=False, show_default=True,
    envvar="WORKBENCH_WAIT_FSYNC",
    help="durable mode: mark rows published only after WAITAOF confirms the AOF fsync "
    "(Redis >= 7.2 or Valkey, appendonly yes) [env WORKBENCH_WAIT_FSYNC]",
)  # fmt: skip
@click.option(
    "--fsync-timeout-ms", type=click.IntRange(min=1), default=DEFAULT_FSYNC_TIMEOUT_MS,
    show_default=True, envvar="WORKBENCH_FSYNC_TIMEOUT_MS",
    help="WAITAOF timeout; on timeout the batch goes out again [env WORKBENCH_FSYNC_TIMEOUT_MS]",
)  # fmt: skip
@click.option(
    "--repair/--no-repair", default=True, show_default=True, envvar="WORKBENCH_RELAY_REPAIR",
    help="check the streams against the outbox and put back what Redis lost "
    "(off only to measure its cost) [env WORKBENCH_RELAY_REPAIR]",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True)
def relay(
    redis_url: str | None,
    database_url: str | None,
    prefix: str,
    partitions: int,
    wait_fsync: bool,
    fsync_timeout_ms: int,
    repair: bool,
    verbose: bool,
    make_relay: Callable[..., OutboxRelay] = OutboxRelay,
) -> None:
    """Publish the outbox to the streams until SIGTERM, repairing what Redis lost."""
    import signal

    from workbench.streams.connection import TRANSIENT
    from workbench.streams.groups import PartitionCountMismatch
    from workbench.streams.relay import DurabilityUnavailable, PartitionCountChanged

    setup_logging(verbose)
    clock = clock_from_env()
    r = make_relay(
        _store(database_url),
        _client(_redis_url(redis_url)),
        names=_names(prefix, partitions),
        clock=clock,
        ids_on_clock=simulated(clock) is not None,  # a real-time simulation's timeline
        repair=repair,
        wait_fsync=wait_fsync,
        fsync_timeout_ms=fsync_timeout_ms,
    )
    signal.signal(signal.SIGTERM, lambda *_: r.stop())
    signal.signal(signal.SIGINT, lambda *_: r.stop())
    try:
        if wait_fsync:
            with contextlib.suppress(TRANSIENT):  # Redis down: checked at the first batch
                r.check_durability()
        r.run()
    except DurabilityUnavailable as exc:
        click.echo(f"workbench relay --wait-fsync: {exc}", err=True)
        sys.exit(2)
    except (PartitionCountChanged, PartitionCountMismatch) as exc:
        click.echo(f"workbench relay --partitions {partitions}: {exc}", err=True)
        sys.exit(2)


@main.command()
@database_option
@click.option(
    "--redis-url", envvar="REDIS_URL",
    help="beat in <prefix>:heartbeats:timers (for /healthz) [env REDIS_URL]",
)  # fmt: skip
@prefix_option
@click.option(
    "--every", default=5.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
    help="seconds between sweeps",
)  # fmt: skip
@click.option("-v", "--verbose", is_flag=True)
def timers(
    database_url: str | None,
    redis_url: str | None,
    prefix: str,
    partitions: int,
    every: float,
    verbose: bool,
) -> None:
    """Expire escrows whose payment, shipping or confirmation deadline passed, until SIGTERM."""
    import time

    from workbench.ops.shutdown import StopRequest
    from workbench.service import EscrowService

    setup_logging(verbose)
    clock = clock_from_env()
    names = _names(prefix, partitions)
    service = EscrowService(_store(database_url), clock=clock, partitioning=names.partitioning)
    beats = _client(redis_url) if redis_url else None
    key, me = names.heartbeats("timers"), f"timers-{os.getpid()}"
    stop = StopRequest()
    stop.on_signals()
    next_sweep = 0.0
    while not stop.is_set():
        if beats is not None:
            try:
                beats.hset(key, me, repr(clock.now()))
            except Exception as exc:  # noqa: BLE001 - Redis down: the sweeps go on
                click.echo(f"timers: heartbeat failed: {exc}", err=True)
        if time.monotonic() >= next_sweep:
            next_sweep = time.monotonic() + every
            try:
                expired = service.expire_due()
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again next sweep
                click.echo(f"timers: {exc}; retrying", err=True)
                expired = 0
            if expired:
                click.echo(f"timers: {expired} events from expired escrows", err=True)
        stop.wait(min(every, 1.0))  # beat every second even when sweeps are rarer
    if beats is not None:
        with contextlib.suppress(Exception):  # a clean exit is not a death
            beats.hdel(key, me)


@main.command(name="inspect")
@redis_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
def inspect_command(redis_url: str | None, prefix: str, partitions: int, as_json: bool) -> None:
    """Print streams, groups (pending, lag), consumers and dead letters."""
    from workbench.ops.inspection import inspect, print_inspection

    try:
        client = _client(_redis_url(redis_url))
        result = inspect(client, _names(prefix, partitions), clock=clock_from_env())
    except Exception as exc:  # redis down, wrong URL: say so plainly
        if isinstance(exc, click.UsageError):
            raise
        raise click.ClickException(f"cannot inspect Redis: {exc}") from None
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_inspection(result)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64),
    help="HTTP server processes (each holds its own SSE sessions)",
)  # fmt: skip
@click.option(
    "--mpesa", type=click.Choice(["sim", "external"]), default="sim", show_default=True,
    help="sim: a simulated M-Pesa pushes, calls back and answers queries in this server; "
    "external: Daraja at WORKBENCH_DARAJA_URL",
)  # fmt: skip
@redis_option
@database_option
@prefix_option
@click.option("--user-maxlen", default=DEFAULT_USER_MAXLEN, show_default=True,
              type=click.IntRange(1, 10_000_000), help="entries kept per user stream")  # fmt: skip
@click.option("--api-only", is_flag=True, help="no relay or workers (another serve runs them)")
@click.option("--debug", is_flag=True, help="enable /debug endpoints (tests)")
@click.option(
    "--data-dir", type=click.Path(file_okay=False, path_type=Path),
    help="embedded Redis, SQLite file and worker logs [default: DATA/serve, DATA being"
    " WORKBENCH_DATA or the project's data/]",
)  # fmt: skip
@click.option(
    "--restart-backoff", default=0.5, show_default=True, type=FiniteFloat(0.01, 60),
    help="seconds before restarting a crashed child (doubles per crash in a row, up to 30 s)",
)  # fmt: skip
@click.option(
    "--restart-limit", default=5, show_default=True, type=click.IntRange(0, 1000),
    help="restarts of one child within 60 s before serve gives up and exits 1",
)  # fmt: skip
def serve(
    host: str,
    port: int,
    workers: int,
    mpesa: str,
    redis_url: str | None,
    database_url: str | None,
    prefix: str,
    partitions: int,
    user_maxlen: int,
    api_only: bool,
    debug: bool,
    data_dir: Path | None,
    restart_backoff: float,
    restart_limit: int,
) -> None:
    """Serve the HTTP API, the relay and the workers (embedded Redis unless REDIS_URL).

    Every process it starts is supervised (restarted with backoff; a crash loop
    stops serve with exit 1) and dies with it. Exit 2: a startup check failed.
    """
    from workbench.http.auth import issue_token, secret_from_env
    from workbench.ops.serve import ServeOptions, ServeRefused, check_secret
    from workbench.ops.serve import serve as run_server
    from workbench.ops.supervision import RestartPolicy

    try:
        warning = check_secret(host, os.environ)
    except ServeRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    if warning:
        click.echo(click.style(warning, fg="red", bold=True), err=True)
    demo_user = "buyer-1"
    token = issue_token(demo_user, secret_from_env(), ttl_s=DEMO_TOKEN_TTL_S)
    options = ServeOptions(
        host=host,
        port=port,
        workers=workers,
        mpesa=mpesa,
        redis_url=redis_url,
        database_url=database_url,
        prefix=prefix,
        partitions=partitions,
        debug=debug,
        api_only=api_only,
        data_dir=data_dir or paths.data_dir() / "serve",
        user_maxlen=user_maxlen,
        policy=RestartPolicy(
            initial_backoff_s=restart_backoff,
            max_backoff_s=max(30.0, restart_backoff),
            max_restarts=restart_limit,
        ),
    )  # fmt: skip
    try:
        code = run_server(options, ready=lambda: click.echo(
            f"serving on http://{host}:{port}  (API docs: /docs)\n"
            f"dashboard for {demo_user} (link valid {DEMO_TOKEN_TTL_S // 60:.0f} min): "
            f"http://{host}:{port}/dashboard?user={demo_user}&access_token={token}\n"
            f"other users, or a fresh link: `workbench token USER_ID`",
            err=True,
        ))  # fmt: skip
    except ServeRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


#: Lifetime of the dashboard token serve prints (it lands in terminals and logs).
DEMO_TOKEN_TTL_S = 30 * 60


@main.command(name="api-process", hidden=True)
@click.option("--fd", type=int, required=True, help="the listening socket, inherited")
def api_process(fd: int) -> None:
    """One HTTP server process of `serve`, accepting on the socket serve bound."""
    import gc
    import socket

    import uvicorn

    import workbench.http.app  # noqa: F401 - imported before the freeze below
    from workbench.http.edge import uvicorn_options

    # What the imports made lives as long as the process: out of the collector's
    # sight, a full collection scans only what serving allocates, not every
    # module, class and function (a full scan stalls every SSE session at once).
    gc.collect()
    gc.freeze()

    listener = socket.socket(fileno=fd)  # family and type read from the socket itself
    config = uvicorn.Config(
        "workbench.http.app:app_from_env",
        factory=True,
        log_level="warning",
        timeout_graceful_shutdown=3,
        **uvicorn_options(),  # body, header and idle limits (workbench.http.edge)
    )
    uvicorn.Server(config).run(sockets=[listener])


@main.command()
@click.argument("user_id")
@click.option(
    "--ttl", default=3600.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
    help="seconds until it expires",
)  # fmt: skip
def token(user_id: str, ttl: float) -> None:
    """Print a signed bearer token for USER_ID (HMAC with WORKBENCH_SECRET)."""
    from workbench.http.auth import issue_token, secret_from_env

    try:
        click.echo(issue_token(user_id, secret_from_env(), ttl_s=ttl))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


def _default_database() -> str:
    return database_url()


if __name__ == "__main__":  # pragma: no cover
    main()
