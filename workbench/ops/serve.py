"""``workbench serve``: the whole service on one machine, supervised.

Before starting anything, serve takes an exclusive lock on ``serve.lock`` in
its data directory and binds the listening socket: a second serve on the same
data directory or port fails at once (:class:`ServeRefused`, exit 2) instead
of half-starting. Then it starts (unless given ``--redis-url``) a private
redis-server with a random password, and runs as supervised children the
outbox relay, one worker per handler group, the fan-out worker, the expiry
timers and ``--workers`` API processes (uvicorn, one per process, all
accepting on the one socket serve bound and handed down).

Supervision (rules in :mod:`workbench.ops.supervision`): a child that exits
unasked is restarted after an exponential backoff; one that crash-loops makes
serve stop everything and exit 1 naming it. Every restart is logged on
stderr and counted in ``supervision.json`` in the data directory, which the
API processes read for ``/healthz`` and ``/metrics``.

No child outlives serve, however serve dies: each is started with
``PR_SET_PDEATHSIG`` = SIGKILL (:mod:`workbench.ops.children`), and none of them
forks further long-lived processes (the API runs without uvicorn's
multiprocess manager).
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from workbench import paths
from workbench.handlers import ALL_GROUPS
from workbench.ops.children import signal_on_parent_death
from workbench.ops.redis_server import RedisServer
from workbench.ops.shutdown import StopRequest
from workbench.ops.supervision import GiveUp, RestartPolicy, Supervisor, describe_exit

BACKGROUND = ("relay", "timers", *ALL_GROUPS)
STATE_FILE = "supervision.json"
LOCK_FILE = "serve.lock"


class ServeRefused(Exception):
    """A startup check failed; nothing was started. The message says what to do."""


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    mpesa: str = "sim"
    redis_url: str | None = None
    database_url: str | None = None
    prefix: str = "wb"
    partitions: int = 0  # of the log; 0: unpartitioned (workbench.streams.keys)
    debug: bool = False
    api_only: bool = False
    data_dir: Path = field(default_factory=lambda: paths.data_dir() / "serve")
    user_maxlen: int = 1000
    policy: RestartPolicy = field(default_factory=RestartPolicy)


# -- startup checks ---------------------------------------------------------------------


def fanout_wait_replicas(redis_url: str, environ: dict[str, str]) -> tuple[str | None, str | None]:
    """What ``WORKBENCH_WAIT_REPLICAS`` the fan-out gets, and a warning, if any.

    On a Redis Cluster whose every master has a replica the fan-out must wait for
    it before acking (:class:`workbench.delivery.userstreams.NotReplicated`: a
    failover could otherwise lose user-stream entries whose events were acked on
    another node), so that is the default there; the simulations prove this
    configuration. A value set in the environment wins; on one server nothing is
    set (there a kill loses a prefix of the history and redelivery repairs it).
    """
    from workbench.streams.connection import connect, is_cluster_url, redacted

    if "WORKBENCH_WAIT_REPLICAS" in environ or not is_cluster_url(redis_url):
        return None, None
    from redis.exceptions import RedisClusterException

    try:
        client = connect(redis_url)
    except RedisClusterException as exc:  # none of the named nodes answers
        message = f"cannot reach the Redis Cluster at {redis_url}: {exc}"
        raise ServeRefused(redacted(message)) from None
    try:  # each master's own word: gossip may not have spread yet
        replicas = [
            int(client.info("replication", target_nodes=node).get("connected_slaves", 0))
            for node in client.get_primaries()  # type: ignore[attr-defined]
        ]
    finally:
        client.close()
    if without := replicas.count(0):
        return "0", (
            f"{without} cluster master(s) have no replica: the fan-out does not wait for "
            "replicas (WORKBENCH_WAIT_REPLICAS=0); a master lost with its data can lose "
            "phone events for good"
        )
    return "1", None


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_secret(host: str, environ: dict[str, str] | os._Environ[str]) -> str | None:
    """Refuse a reachable server signed with the public development key.

    Raises :class:`ServeRefused` for a non-loopback ``host`` without
    ``WORKBENCH_SECRET``; returns a warning to print for loopback without it.
    """
    if environ.get("WORKBENCH_SECRET"):
        return None
    if not is_loopback(host):
        raise ServeRefused(
            f"--host {host} is reachable from other machines, and WORKBENCH_SECRET is not set: "
            "anyone could mint tokens with the public development key. Set a secret first, "
            'e.g. export WORKBENCH_SECRET="$(python -c "import secrets; '
            'print(secrets.token_hex(32))")"'
        )
    return (
        "WARNING: WORKBENCH_SECRET is not set: tokens are signed with the PUBLIC development "
        "key, so anyone who can reach this port can act as any user. Fine on your own "
        "machine only; set WORKBENCH_SECRET for anything else."
    )


def lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold ``serve.lock`` for this process's life (the kernel drops it when we die)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held until we exit
    except OSError as exc:  # a file in the way, no permission, a read-only disk
        raise ServeRefused(
            f"cannot use the data dir {data_dir}: {exc.strerror or exc}; pass another --data-dir"
        ) from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise ServeRefused(
            f"another workbench serve (pid {holder}) is using the data dir {data_dir}; "
            "stop it first, or pass another --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def bind_listener(host: str, port: int) -> socket.socket:
    """The API's listening socket, bound now so a busy port fails before anything starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ServeRefused(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: one owner
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ServeRefused(
            f"cannot listen on {host}:{port}: {exc.strerror} "
            "(another server on that port? pick another with --port)"
        ) from None
    return sock


# -- children ---------------------------------------------------------------------------


class Process(Protocol):
    """A child serve can start, watch and stop."""

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout: float) -> None: ...


class Spawned:
    """A ``python -m workbench ...`` child, output appended to ``<logs>/<name>.log``."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        logs: Path,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.name, self.argv, self.env, self.logs, self.pass_fds = name, argv, env, logs, pass_fds
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> None:
        with open(self.logs / f"{self.name}.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workbench", *self.argv],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=self.pass_fds,
                # Its own process group: a Ctrl-C in the terminal reaches serve
                # alone, which then stops the children in order (API first).
                process_group=0,
                # SIGKILL when serve dies, however it dies: nothing outlives it.
                preexec_fn=signal_on_parent_death(signal.SIGKILL),
            )

    def poll(self) -> int | None:
        return self.process.poll() if self.process else None

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class SupervisedRedis:
    """The private redis-server as a child: restarted on its port, dir, AOF and password."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> None:
        self.server.start()  # waits until it answers PING (AOF replayed)

    def poll(self) -> int | None:
        return self.server.poll()

    def terminate(self) -> None:
        pass  # stopped last, in wait()

    def wait(self, timeout: float) -> None:
        self.server.stop()


def children_of(
    options: ServeOptions, env: dict[str, str], listener: socket.socket
) -> dict[str, Process]:
    """Every child serve runs except Redis, by name, in start order."""
    logs = options.data_dir
    found: dict[str, Process] = {}
    if not options.api_only:
        for name in BACKGROUND:
            if name == "relay":
                argv = ["relay", "--prefix", options.prefix]
            elif name == "timers":
                argv = ["timers", "--prefix", options.prefix]
            else:
                # One consumer name for every incarnation in this serve: a restarted
                # worker re-reads its predecessor's pending entries first, in order,
                # instead of leaving them to be claimed when it is known dead.
                argv = ["worker", name, "--prefix", options.prefix, "--block-ms", "1000",
                        "--consumer", f"{name}-serve{os.getpid()}", "--wait-for-redis"]  # fmt: skip
                if name == "fanout":
                    argv += ["--user-maxlen", str(options.user_maxlen)]
            found[name] = Spawned(name, argv, env, logs)
    fd = listener.fileno()
    for i in range(options.workers):
        name = f"api-{i}"
        found[name] = Spawned(name, ["api-process", "--fd", str(fd)], env, logs, pass_fds=(fd,))
    return found


# -- the loop ---------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} serve: {message}", file=sys.stderr, flush=True)


def _write_state(path: Path, supervisor: Supervisor) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "serve_pid": os.getpid(),
                "updated_at": time.time(),
                "components": supervisor.snapshot(),
            }
        )
    )
    os.replace(tmp, path)  # readers see the old file or the new one, never half


def supervise(
    children: dict[str, Process], policy: RestartPolicy, state_file: Path, stop: StopRequest
) -> GiveUp | None:
    """Start every child, restart those that exit, until ``stop`` or a crash loop.

    Runs on the main thread: the parent-death signal is tied to the thread that
    forked each child. Returns the :class:`GiveUp` that ended it, if one did.
    """
    supervisor = Supervisor(list(children), policy)
    gave_up: GiveUp | None = None

    def start(name: str) -> None:
        nonlocal gave_up
        try:
            children[name].start()
        except Exception as exc:  # noqa: BLE001 - a failed start is a crash like any other
            _say(f"{name} did not start: {exc}")
            decision = supervisor.exited(name, time.time(), None)
            if isinstance(decision, GiveUp):
                gave_up = decision
            return
        supervisor.started(name, time.time(), children[name].pid)

    try:
        for name in children:
            start(name)
        _write_state(state_file, supervisor)
        while not stop.is_set() and gave_up is None:
            changed = False
            for name, child in children.items():
                if supervisor.children[name].state != "running":
                    continue
                returncode = child.poll()
                if returncode is None:
                    continue
                now = time.time()
                pid = supervisor.children[name].pid
                started = supervisor.children[name].started_at or now
                decision = supervisor.exited(name, now, returncode)
                changed = True
                if isinstance(decision, GiveUp):
                    gave_up = decision
                    break
                _say(
                    f"{name} (pid {pid}) exited ({describe_exit(returncode)}) after "
                    f"{now - started:.1f} s; restart {decision.restart_no} "
                    f"in {decision.delay_s:g} s"
                )
            for name in [] if gave_up else supervisor.due(time.time()):
                start(name)
                changed = True
                if supervisor.children[name].state == "running":
                    _say(f"{name} restarted (pid {children[name].pid})")
            if changed:
                _write_state(state_file, supervisor)
            stop.wait(0.1)
    finally:
        supervisor.stopping()
        with contextlib.suppress(OSError):
            _write_state(state_file, supervisor)
        for child in reversed(children.values()):  # API first, Redis last
            child.terminate()
        for child in reversed(children.values()):
            child.wait(15)
    return gave_up


def serve(options: ServeOptions, ready: Callable[[], None] | None = None) -> int:
    """Run until SIGTERM / SIGINT (exit code 0) or a crash loop (1).

    Raises :class:`ServeRefused` when a startup check fails (nothing started).
    """
    data_dir = options.data_dir
    lock = lock_data_dir(data_dir)
    listener = bind_listener(options.host, options.port)
    stop = StopRequest()
    stop.on_signals()
    database_url = options.database_url or f"sqlite:///{data_dir / 'workbench.db'}"
    children: dict[str, Process] = {}
    redis_url = options.redis_url
    if not redis_url:
        server = RedisServer(
            data_dir / "redis", appendonly=True, appendfsync="everysec",
            password=secrets.token_urlsafe(24),
        )  # fmt: skip
        children["redis"] = SupervisedRedis(server)
        redis_url = server.url
    env = dict(os.environ)
    wait_replicas, warning = fanout_wait_replicas(redis_url, env)
    if warning:
        _say(f"warning: {warning}")
    if wait_replicas is not None:
        env["WORKBENCH_WAIT_REPLICAS"] = wait_replicas
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        WORKBENCH_PREFIX=options.prefix,
        WORKBENCH_PARTITIONS=str(options.partitions),
        WORKBENCH_MPESA=options.mpesa,
        WORKBENCH_CALLBACK_URL=f"http://{options.host}:{options.port}/mpesa/callback",
        WORKBENCH_DEBUG="1" if options.debug else "",
        WORKBENCH_SUPERVISION_FILE=str((data_dir / STATE_FILE).resolve()),
    )
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    from workbench.store import Store
    from workbench.streams.connection import redacted

    try:
        store = Store(database_url)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ServeRefused(
            redacted(f"--database-url / DATABASE_URL {database_url!r}: {exc}")
        ) from None
    store.create_schema()  # once, before several processes race to create it
    store.close()
    children.update(children_of(options, env, listener))
    if ready is not None:
        ready()  # every check passed: the socket is bound, the children are starting
    try:
        gave_up = supervise(children, options.policy, data_dir / STATE_FILE, stop)
    finally:
        listener.close()
        lock.close()
    if gave_up is not None:
        _say(f"giving up: {gave_up.reason} (its log: {data_dir / (gave_up.name + '.log')})")
        return 1
    return 0
