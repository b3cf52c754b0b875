"""Real time: the same models drive the *served* runtime, over HTTP, in wall time.

``simpy.rt.RealtimeEnvironment(factor)`` paces the market, the M-Pesa gateway
and the phones exactly as in virtual time, but the runtime they drive is the
deployment ``workbench serve`` runs, every part a real process: API/SSE
servers (uvicorn), the outbox relay, one worker per consumer group, the expiry
timers; redis-server and a SQLite store underneath. So here:

* the market's commands are HTTP requests with an ``Idempotency-Key`` (a
  request that dies with its server is retried on another one, safely);
* the gateway posts Daraja callbacks to each push's ``/mpesa/callback/{token}``,
  and the servers confirm them with the STK Push Query of a local Daraja
  (:class:`~workbench.payments.daraja.DarajaStub`, which also takes the pushes);
* each phone holds a real SSE connection (``Last-Event-ID`` on reconnect,
  ``reset`` -> snapshot -> resume), dropped by closing the socket;
* a consumer crash is SIGKILL of the worker process; by default
  (``consumers.restart = "supervisor"``) it is started again after serve's
  backoff under the same consumer name and re-reads its own pending entries;
  with ``"replacement"`` a new one (a new consumer name) starts after
  ``mttr_s`` and the runtime's own recovery claims the dead one's entries;
* a server fault is SIGKILL of an SSE server with all its sessions;
* Redis faults are the same kill -9 and restart from the AOF.

Every process reads a :class:`~workbench.domain.clock.ScaledClock` that maps wall
time onto the simulation's timeline, so expiry, heartbeats and the tables'
times are in virtual seconds as in virtual mode. Workers write handling logs
(``workbench sim-worker --record``) for the checker; the tables are then built
by the same :func:`simulations.drivers.virtual.collect`. Runs are not bit-for-bit
reproducible (the OS schedules the processes), but the checker's verdict is
the same as in virtual time: that is what ``tests/lab/test_realtime.py`` proves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import redis
import simpy
import simpy.rt
from httpx_sse import aconnect_sse

from simulations.analysis.tables import RunTables, RunWriter
from simulations.drivers.interruption import held
from simulations.drivers.loops import sample_backlog, waiting
from simulations.drivers.virtual import (
    Progress,
    RedisFaults,
    clear_prefix,
    collect,
    run_manifest,
)
from simulations.faults import CRASH_POINTS, crash_signal
from simulations.models.clock import SimClock
from simulations.models.gateway import MpesaGateway
from simulations.models.market import Market
from simulations.models.phones import Phone, ServerFaults, ServerPool
from simulations.models.supervision import SupervisedRestarts, policy_of
from simulations.scenario import ConsumersParams, PhonesParams, Scenario
from workbench.domain.clock import ScaledClock, clock_env
from workbench.domain.escrow import DomainError, EscrowState
from workbench.domain.streamid import parse
from workbench.handlers import ALL_GROUPS
from workbench.http.auth import issue_token
from workbench.ops.children import signal_on_parent_death
from workbench.ops.redis_server import RedisServer, attach_or_start, free_port
from workbench.ops.waiting import WaitTimeout, wait_until
from workbench.payments.daraja import DarajaStub
from workbench.store import Store, outbox
from workbench.streams.connection import connect
from workbench.streams.keys import StreamNames, UserStreamNames, names_for

log = logging.getLogger(__name__)


class Rejected(DomainError):
    """The service answered a command with an error (or no server answered)."""

    def __init__(self, detail: str, code: str = "rejected") -> None:
        super().__init__(detail)
        self.code = code


class Fleet:
    """The served runtime's processes, by name: started, SIGKILLed, restarted."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.argv: dict[str, list[str]] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        self.argv[name] = [sys.executable, "-m", "workbench", *argv]
        return self._spawn(name)

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        with held():  # a Ctrl-C waits until the process is in the fleet (stopped with it)
            process = subprocess.Popen(
                self.argv[name], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Like redis-server: its own session, so a terminal's Ctrl-C reaches the
                # simulator only (which stops the fleet), and killed if the simulator dies.
                start_new_session=True, preexec_fn=signal_on_parent_death(signal.SIGKILL),
            )  # fmt: skip
            self.processes[name] = process
        log.close()
        return process

    def kill(self, name: str) -> None:
        """SIGKILL: no cleanup, no acks, sockets reset."""
        process = self.processes[name]
        process.send_signal(signal.SIGKILL)
        process.wait()

    def reap(self, name: str) -> None:
        """Forget a process that has died."""
        self.processes.pop(name).wait()

    def restart(self, name: str) -> None:
        self._spawn(name)

    def alive(self, name: str) -> bool:
        process = self.processes.get(name)
        return process is not None and process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every process, and SIGKILL what has not exited ``timeout`` s later."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()


class Servers:
    """The API/SSE server processes, and HTTP calls that fail over between them."""

    def __init__(self, fleet: Fleet, count: int, data: Path) -> None:
        self.fleet = fleet
        self.urls: list[str] = []
        self.http = httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))
        self._next = 0
        for i in range(count):
            port = free_port()
            self.urls.append(f"http://127.0.0.1:{port}")
            fleet.start(
                f"api-{i}", "serve", "--api-only", "--mpesa", "external", "--port", str(port),
                "--prefix", fleet.env["WORKBENCH_PREFIX"], "--data-dir", str(data / f"api-{i}"),
            )  # fmt: skip
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        """Until every server answers /healthz (raises if one exited instead)."""
        for i, url in enumerate(self.urls):
            wait_until(
                lambda i=i, url=url: self._healthy(i, url),
                timeout=timeout,
                what=f"api-{i} to answer /healthz",
            )

    def _healthy(self, i: int, url: str) -> bool:
        if not self.fleet.alive(f"api-{i}"):
            log = (self.fleet.logs / f"api-{i}.log").read_text()[-2000:]
            raise RuntimeError(f"api-{i} exited while starting:\n{log}")
        with contextlib.suppress(httpx.TransportError):
            return self.http.get(f"{url}/healthz").status_code == 200
        return False

    def request(self, method: str, path: str, token: str | None, **kwargs: Any) -> httpx.Response:
        """Send to the servers in turn until one answers (a load balancer's retry)."""
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        errors = []
        for _ in range(len(self.urls)):
            url = self.urls[self._next % len(self.urls)]
            self._next += 1
            try:
                return self.http.request(method, url + path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                errors.append(f"{url}: {type(exc).__name__}")
        raise Rejected("no server answered: " + "; ".join(errors), "unavailable")

    def close(self) -> None:
        self.http.close()


class HttpService:
    """The command surface the :class:`~simulations.models.market.Market` calls, over HTTP.

    Every command carries an ``Idempotency-Key``, so the failover retry of a
    request whose server died mid-way cannot apply it twice.
    """

    def __init__(
        self, servers: Servers, tokens: Tokens, gateway: MpesaGateway, daraja: DarajaStub
    ) -> None:
        self.servers, self.tokens, self.gateway, self.daraja = servers, tokens, gateway, daraja
        self._keys = 0

    def _command(
        self, actor: str, path: str, body: dict[str, Any] | None = None
    ) -> SimpleNamespace:
        self._keys += 1
        r = self.servers.request(
            "POST", path, self.tokens(actor), json=body or {},
            headers={"Idempotency-Key": f"sim-{self._keys}"},
        )  # fmt: skip
        data = r.json()
        if r.status_code >= 400:
            raise Rejected(data.get("detail", r.text), data.get("error", str(r.status_code)))
        return SimpleNamespace(**data)

    def create(self, buyer: str, seller: str, amount: int) -> SimpleNamespace:
        return self._command(
            buyer, "/escrows", {"buyer_id": buyer, "seller_id": seller, "amount": amount}
        )

    def fund(self, escrow_id: str, buyer: str, phone: str) -> SimpleNamespace:
        result = self._command(buyer, f"/escrows/{escrow_id}/fund", {"phone": phone})
        push = self.daraja.pushes.get(result.checkout_request_id or "")
        if not result.replayed and push is not None:
            # The CallBackURL is the gateway's to know: the stub saw it with the push.
            self.gateway.answer(push.checkout_request_id, push.amount, push.callback_url, phone)
        return result

    def get(self, escrow_id: str) -> SimpleNamespace:
        r = self.servers.request("GET", f"/escrows/{escrow_id}", self.tokens("admin"))
        if r.status_code != 200:
            raise Rejected(f"GET /escrows/{escrow_id}: {r.status_code}", "unavailable")
        return SimpleNamespace(state=EscrowState(r.json()["state"]))

    def cancel(self, escrow_id: str, actor: str) -> SimpleNamespace:
        return self._command(actor, f"/escrows/{escrow_id}/cancel", {"reason": "changed mind"})

    def ship(self, escrow_id: str, seller: str) -> SimpleNamespace:
        return self._command(seller, f"/escrows/{escrow_id}/ship", {})

    def confirm(self, escrow_id: str, buyer: str) -> SimpleNamespace:
        return self._command(buyer, f"/escrows/{escrow_id}/confirm")

    def dispute(self, escrow_id: str, buyer: str, reason: str) -> SimpleNamespace:
        return self._command(buyer, f"/escrows/{escrow_id}/dispute", {"reason": reason})

    def resolve(self, escrow_id: str, admin: str, outcome: str) -> SimpleNamespace:
        return self._command(admin, f"/escrows/{escrow_id}/resolve", {"outcome": outcome})


class Tokens:
    """Bearer tokens per user, issued on the simulation's clock."""

    def __init__(self, secret: str, clock: ScaledClock, ttl_s: float) -> None:
        self.secret, self.clock, self.ttl_s = secret, clock, ttl_s
        self._cache: dict[str, str] = {}

    def __call__(self, user: str) -> str:
        if user not in self._cache:
            self._cache[user] = issue_token(user, self.secret, ttl_s=self.ttl_s, clock=self.clock)
        return self._cache[user]


class Radio:
    """Every phone's SSE connection, as tasks on one asyncio loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="radio", daemon=True)
        self.thread.start()
        self.http: httpx.AsyncClient = self.call(self._client())

    @staticmethod
    async def _client() -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        return httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), limits=limits)

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, coro: Any) -> asyncio.Task[Any]:
        async def spawn() -> asyncio.Task[Any]:
            return asyncio.ensure_future(coro)

        return self.call(spawn())

    def hang_up(self, task: asyncio.Task[Any]) -> None:
        """Close the connection and wait until its task has finished recording."""

        async def cancel() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

        if not self.loop.is_closed():
            self.call(cancel())

    def close(self) -> None:
        self.call(self.http.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class SsePhone(Phone):
    """A :class:`~simulations.models.phones.Phone` whose connections are real SSE requests.

    The lifecycle (connection lifetimes, reconnect delays, lost ids, server
    choice) is the base class's; only the connection itself differs.
    """

    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: PhonesParams,
        user: str,
        client: redis.Redis,
        names: UserStreamNames,
        deliveries: list[dict[str, Any]],
        *,
        pool: ServerPool,
        radio: Radio,
        servers: Servers,
        tokens: Tokens,
        timeline: ScaledClock,
    ) -> None:
        super().__init__(env, rng, params, user, client, names, deliveries, pool=pool)
        self.radio, self.servers, self.tokens, self.timeline = radio, servers, tokens, timeline

    def _t(self) -> float:
        return self.timeline.now() - self.timeline.epoch

    def _record(self, source: str, entry_id: str, event_id: str) -> None:
        self.deliveries.append(
            {"phone": self.user, "connection": self.connection, "source": source,
             "entry_id": entry_id, "event_id": event_id, "t": self._t()}
        )  # fmt: skip

    async def _snapshot_async(self, url: str) -> None:
        r = await self.radio.http.get(
            f"{url}/users/{self.user}/escrows",
            headers={"Authorization": f"Bearer {self.tokens(self.user)}"},
        )
        r.raise_for_status()
        as_of = parse(r.json()["as_of"])
        self._record("snapshot", str(as_of), "")
        self.cursor = as_of

    async def _listen(self, url: str, until_ready: bool = False) -> None:
        """One connection: replay, then live until cancelled; a reset resyncs and
        reconnects at once, as the server tells the client to."""
        with contextlib.suppress(httpx.HTTPError):
            await self._session(url, until_ready)
        # An HTTP error ends the connection (server gone, Redis down: 503); the
        # phone's lifecycle reconnects after its usual delay.

    async def _session(self, url: str, until_ready: bool) -> None:
        while True:
            if self.cursor is None:
                await self._snapshot_async(url)
            assert self.cursor is not None
            headers = {
                "Authorization": f"Bearer {self.tokens(self.user)}",
                "Last-Event-ID": str(self.cursor),
            }
            source = "replay"
            async with aconnect_sse(
                self.radio.http, "GET", f"{url}/users/{self.user}/events", headers=headers
            ) as events:
                events.response.raise_for_status()
                async for sse in events.aiter_sse():
                    if sse.event == "ready":
                        source = "live"
                        if until_ready:
                            return
                    elif sse.event == "reset":
                        self.cursor = None
                        break
                    elif sse.data and sse.event != "message":
                        # (an id-less "message" with no data is a heartbeat: the
                        # parser repeats the last id on it)
                        self._record(source, sse.id, json.loads(sse.data)["event_id"])
                        self.cursor = parse(sse.id)
                else:
                    return  # the server ended the stream

    def _connected_until(self, ends: float) -> Any:
        assert self.server is not None
        task = self.radio.start(self._listen(self.servers.urls[self.server]))
        try:
            while self.env.now < ends and not self.stop:
                yield self.env.timeout(self.p.poll_every_s)
                if self.dropped or task.done():
                    return
        finally:
            self.radio.hang_up(task)

    def final_drain(self) -> None:
        self.connection += 1
        server = self.pool.choose(self.rng) if self.pool else 0
        url = self.servers.urls[server or 0]
        with contextlib.suppress(Exception):
            self.radio.call(self._listen(url, until_ready=True), timeout=60)


class ConsumerFaults:
    """Crash a group's worker process every MTBF (exponential); back after serve's
    backoff (``restart = "supervisor"``) or a replacement after MTTR.

    Each crash is, at random, a SIGKILL from outside at whatever the worker is
    doing, or one of the runtime's crash points (after read, mid-batch, after
    effect): the worker is signalled to SIGKILL itself when it next reaches it.
    """

    def __init__(
        self,
        env: simpy.Environment,
        fleet: Fleet,
        params: ConsumersParams,
        faults: list[dict[str, Any]],
        workers: _Workers,
        restarts: SupervisedRestarts,
    ) -> None:
        self.env, self.fleet, self.p, self.faults = env, fleet, params, faults
        self.workers, self.restarts = workers, restarts
        self.healed = False

    def heal(self) -> None:
        """The drain begins: no more crashes (one under way still completes)."""
        self.healed = True

    def run(self, group: str, rng: np.random.Generator) -> Any:
        if self.p.mtbf_s <= 0:
            return
        ways = ("anywhere", *CRASH_POINTS)
        while not self.healed:
            yield self.env.timeout(rng.exponential(self.p.mtbf_s))
            if self.healed or not self.fleet.alive(group):
                continue
            consumer = self.workers.names[group]
            way = ways[int(rng.integers(len(ways)))]
            if way != "anywhere":
                self.fleet.processes[group].send_signal(crash_signal(way))
                # It dies when it next reaches the point: when entries come.
                while self.fleet.alive(group) and not self.healed:
                    yield self.env.timeout(0.1)
            if self.fleet.alive(group):
                self.fleet.kill(group)
                way = "anywhere"
            self.fleet.reap(group)
            fault = {"t_start": self.env.now, "t_end": None, "kind": "consumer_crash",
                     "target": consumer, "detail": f"SIGKILL {way}"}  # fmt: skip
            self.faults.append(fault)
            if self.p.restart == "replacement":
                down_for: float | None = self.p.mttr_s
            else:
                down_for = self.restarts.down_for(group, self.env.now)
            if down_for is None:  # serve gives up on a crash loop: the group stays down
                fault["detail"] += f"; {self.restarts.given_up[group]}"
                return
            yield self.env.timeout(down_for)
            self.workers(group)
            self.restarts.started(group, self.env.now)
            fault["t_end"] = self.env.now


class _Workers:
    """Starts a group's worker process: as serve does, under one consumer name
    (``consumers.restart = "supervisor"``), or a new name each time (a replacement)."""

    def __init__(self, fleet: Fleet, params: ConsumersParams, prefix: str, handled: Path) -> None:
        self.fleet, self.p, self.prefix, self.handled = fleet, params, prefix, handled
        self.generation: dict[str, int] = {}
        self.names: dict[str, str] = {}

    def __call__(self, group: str) -> None:
        n = self.generation[group] = self.generation.get(group, 0) + 1
        consumer = f"{group}-1" if self.p.restart == "supervisor" else f"{group}-{n}"
        self.names[group] = consumer
        self.fleet.start(
            group, "sim-worker", group, "--prefix", self.prefix, "--consumer", consumer,
            "--block-ms", "100", "--batch-size", str(self.p.batch_size),
            "--dead-after", str(self.p.dead_after_s),
            "--record", str(self.handled / f"{group}-{n}.log"), "--crash-on-signal",
            *(["--user-maxlen", str(self.p.user_maxlen)] if group == "fanout" else []),
            *(["--ack-before-effect"] if self.p.ack_before_effect else []),
        )  # fmt: skip


@dataclass(frozen=True)
class RealtimeWorld:
    """Everything a real-time run is made of, built once by :func:`_build_world`: the
    served runtime's processes (``fleet``: relay, timers, a worker per group, API/SSE
    servers), the clocks, and the same models as in virtual time driving it.

    The rows are kept in lists until the end (the phones' SSE connections record
    from the radio's thread); :func:`_write` turns them into the run's tables.
    """

    scenario: Scenario
    seed: int
    factor: float  # wall seconds per virtual second
    url: str
    server: RedisServer | None
    client: redis.Redis
    names: StreamNames
    user_names: UserStreamNames
    store: Store
    timeline: ScaledClock  # what every process reads: wall time on the simulation's timeline
    fleet: Fleet
    workers: _Workers
    groups: tuple[str, ...]
    handling_dir: Path
    servers: Servers
    radio: Radio
    t0: float  # where the simulation's time was when SimPy started
    env: simpy.rt.RealtimeEnvironment
    clock: SimClock
    rngs: list[np.random.Generator]
    rows: _Rows
    market: Market
    restarts: SupervisedRestarts
    consumer_faults: ConsumerFaults
    redis_faults: RedisFaults
    pool: ServerPool
    phones: list[SsePhone]
    server_faults: _ServerKills


@dataclass
class _Rows:
    """The tables a real-time run fills as it goes (written at the end)."""

    commands: list[dict[str, Any]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    deliveries: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)


def simulate_realtime(
    scenario: Scenario,
    seed: int,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
    prefix: str = "rt",
    factor: float | None = None,
    out: str | Path | None = None,
) -> RunTables:
    """Run ``scenario`` against the served runtime in real time; return its tables
    (written to ``out``, or a temporary directory, then loaded)."""
    with tempfile.TemporaryDirectory(prefix="workbench-run-") as tmp:
        directory = out if out is not None else tmp
        simulate_realtime_to(
            scenario, seed, directory, redis_url=redis_url, progress=progress, prefix=prefix,
            factor=factor,
        )  # fmt: skip
        return RunTables.load(directory)


def simulate_realtime_to(
    scenario: Scenario,
    seed: int,
    out: str | Path,
    *,
    redis_url: str | None = None,
    progress: Progress | None = None,
    prefix: str = "rt",
    factor: float | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` against the served runtime in real time, writing its tables
    to ``out``; return the manifest.

    The phases: build the world (redis-server, store, the served processes, the
    models), schedule the models' processes, run the load and the drain in wall
    time, settle (every process up again, everything published and handled, the
    phones' last connection), write the tables. Every process and connection is
    closed on the way out, whatever happened.
    """
    if scenario.redis.cluster_masters:
        raise ValueError("redis.cluster_masters runs in virtual time only")
    started = time.monotonic()
    factor = factor or scenario.realtime.factor
    with contextlib.ExitStack() as resources:
        world = _build_world(resources, scenario, seed, redis_url, prefix, factor)
        _schedule(world)
        _run(world, progress)
        settled = _settle(world)
        return _write(world, out, started, settled)


def _build_world(
    resources: contextlib.ExitStack,
    scenario: Scenario,
    seed: int,
    redis_url: str | None,
    prefix: str,
    factor: float,
) -> RealtimeWorld:
    """Start the served runtime and build the models that drive it; ``resources``
    stops and closes everything in reverse order."""
    run_p = scenario.run
    load_s, drain_s = run_p.duration_s, run_p.drain_s
    # Removed last, once every process that writes into it has stopped.
    work = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="workbench-rt-")))
    with held():  # started and known to `resources`, or not started
        url, server = resources.enter_context(
            attach_or_start(
                redis_url, work / "redis", appendonly=True, appendfsync=scenario.redis.appendfsync
            )
        )
    client = connect(url)
    resources.callback(client.close)
    clear_prefix(client, prefix)
    database_url = f"sqlite:///{work / 'store.db'}"
    store = Store(database_url)
    resources.callback(store.close)
    store.reset()
    origin = time.time()
    timeline = ScaledClock(origin, run_p.epoch, 1.0 / factor)
    # Daraja for the API servers: pushes and queries over HTTP; the results
    # are what the simulated gateway decides, set as it sends each callback.
    daraja = DarajaStub()
    resources.callback(daraja.close)
    secret = secrets.token_hex(32)
    fleet = Fleet(_fleet_env(scenario, url, database_url, secret, prefix, origin, factor, daraja),
                  work / "logs")  # fmt: skip
    resources.callback(fleet.stop)
    handling_dir = work / "handled"
    handling_dir.mkdir()
    only = scenario.consumers.only_groups
    groups = tuple(g for g in ALL_GROUPS if not only or g in only)
    workers = _Workers(fleet, scenario.consumers, prefix, handling_dir)
    fleet.start("relay", "relay", "--prefix", prefix)
    fleet.start("timers", "timers", "--every", "1")
    for group in groups:
        workers(group)
    servers = Servers(fleet, scenario.servers.count, work)
    resources.callback(servers.close)
    radio = Radio()
    resources.callback(radio.close)
    # The timeline began at `origin`; SimPy starts where it is now.
    t0 = timeline.now() - timeline.epoch
    env = simpy.rt.RealtimeEnvironment(initial_time=t0, factor=factor, strict=False)
    tokens = Tokens(secret, timeline, ttl_s=10 * (load_s + drain_s) + 3600)
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    rows = _Rows()
    record = _command_record(env, rows.commands)
    gateway = MpesaGateway(env, rngs[0], scenario.mpesa, _callback_poster(servers, daraja, record))
    service = HttpService(servers, tokens, gateway, daraja)
    until = t0 + load_s
    market = Market(env, rngs[1], scenario.market, service, record, until=until)  # type: ignore[arg-type]
    restarts = SupervisedRestarts(policy_of(scenario.supervisor))
    names = names_for(prefix, scenario.redis.partitions)
    user_names = UserStreamNames.of(names)
    pool = ServerPool(scenario.servers.count)
    buyers = market.buyers
    phones = [
        SsePhone(env, np.random.default_rng(rngs[3].integers(2**63)), scenario.phones,
                 buyers[i % len(buyers)], client, user_names, rows.deliveries, pool=pool,
                 radio=radio, servers=servers, tokens=tokens, timeline=timeline)
        for i in range(min(scenario.phones.count, len(buyers)))
    ]  # fmt: skip
    return RealtimeWorld(
        scenario=scenario, seed=seed, factor=factor, url=url, server=server, client=client,
        names=names, user_names=user_names, store=store, timeline=timeline,
        fleet=fleet, workers=workers, groups=groups, handling_dir=handling_dir,
        servers=servers, radio=radio, t0=t0, env=env, clock=SimClock(env, run_p.epoch),
        rngs=rngs, rows=rows, market=market, restarts=restarts,
        consumer_faults=ConsumerFaults(
            env, fleet, scenario.consumers, rows.faults, workers, restarts
        ),
        redis_faults=RedisFaults(env, server, scenario.redis, rows.faults, until, restarts),
        pool=pool, phones=phones,
        server_faults=_ServerKills(
            env, rngs[5], scenario.servers, pool, rows.faults, until, restarts, fleet=fleet
        ),
    )  # fmt: skip


def _fleet_env(
    scenario: Scenario,
    redis_url: str,
    database_url: str,
    secret: str,
    prefix: str,
    origin: float,
    factor: float,
    daraja: DarajaStub,
) -> dict[str, str]:
    """The environment every served process starts with: where Redis, the store and
    Daraja are, and the clock that maps wall time onto the simulation's timeline."""
    return dict(
        os.environ,
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        WORKBENCH_SECRET=secret,
        WORKBENCH_PREFIX=prefix,
        WORKBENCH_PARTITIONS=str(scenario.redis.partitions),
        WORKBENCH_SSE_PING_S=str(scenario.realtime.sse_ping_s),
        # The market's buyers return to the same sellers at simulated speed;
        # the per-pair create limit guards against abuse, not trade.
        WORKBENCH_CREATE_LIMIT="0",
        **clock_env(origin, scenario.run.epoch, 1.0 / factor),
        **daraja.env,
    )


def _command_record(env: simpy.Environment, commands: list[dict[str, Any]]) -> Any:
    """The ``commands`` table's rows, on the simulation's clock."""

    def record(
        command: str, escrow_id: str | None, actor: str, ok: bool, error: str | None
    ) -> None:
        commands.append({"t": env.now, "command": command, "escrow_id": escrow_id,
                         "actor": actor, "ok": ok, "error": error})  # fmt: skip

    return record


def _callback_poster(servers: Servers, daraja: DarajaStub, record: Any) -> Any:
    """What the gateway does with a callback: settle the push at the Daraja stub (so the
    servers' STK Push Query sees the result), then POST it to the servers."""

    def callback(url: str, body: dict[str, Any]) -> None:
        stk = body["Body"]["stkCallback"]
        daraja.settle(stk["CheckoutRequestID"], int(stk["ResultCode"]))
        try:
            r = servers.request("POST", urlsplit(url).path, None, json=body)
        except Rejected as exc:
            record("callback", None, "mpesa", False, str(exc))
            return
        desc = r.json().get("ResultDesc", "")
        ok = r.status_code in (200, 202)  # 202: recorded once the query confirms it
        record("callback", None, "mpesa", ok, None if desc == "Accepted" else desc)

    return callback


def _schedule(world: RealtimeWorld) -> None:
    """Start the models' SimPy processes, in the order the virtual driver starts them."""
    env, rngs, scenario = world.env, world.rngs, world.scenario
    env.process(world.market.run())
    env.process(sample_backlog(env, world.client, world.names, world.groups,
                               scenario.run.sample_every_s, world.rows.samples,
                               world.clock))  # fmt: skip
    for i, group in enumerate(world.groups):
        rng = np.random.default_rng(rngs[2].integers(2**63) + i)
        env.process(world.consumer_faults.run(group, rng))
    env.process(world.redis_faults.run())
    for phone in world.phones:
        env.process(phone.run())
    for i in range(scenario.servers.count):
        env.process(world.server_faults.run(i))


def _run(world: RealtimeWorld, progress: Progress | None) -> None:
    """The load, then the drain, in wall time; consumer faults stop with the load."""
    load_s = world.scenario.run.duration_s
    total = load_s + world.scenario.run.drain_s
    step = max(total / 200, 0.5)
    t = 0.0
    while t < total:
        t = min(total, t + step)
        if t >= load_s and not world.consumer_faults.healed:
            world.consumer_faults.heal()
        world.env.run(until=world.t0 + t)
        if progress:
            progress(t, total)


def _settle(world: RealtimeWorld) -> bool:
    """Faults healed: every worker and server up again; wait (in wall time) until the
    service has published and handled everything, then let every phone connect once
    more and take what is waiting. Whether it settled in time goes to the manifest."""
    fleet = world.fleet
    for group in world.groups:
        if not fleet.alive(group):
            world.workers(group)
    for i in range(len(world.servers.urls)):
        if not fleet.alive(f"api-{i}"):
            fleet.restart(f"api-{i}")
    settled = _wait_settled(
        world.store, world.client, world.names, world.groups,
        timeout=60 + 2 * world.scenario.run.drain_s,
    )  # fmt: skip
    world.servers.wait_healthy()  # a server restarted late may still be starting
    for phone in world.phones:
        phone.stop = True
    for phone in world.phones:
        phone.final_drain()
    return settled


def _write(world: RealtimeWorld, out: str | Path, started: float, settled: bool) -> dict[str, Any]:
    """The run's tables and manifest, to ``out``; return the manifest."""
    writer = RunWriter(out)
    rows = world.rows
    for table, table_rows in (("commands", rows.commands), ("deliveries", rows.deliveries),
                              ("samples", rows.samples), ("faults", rows.faults)):  # fmt: skip
        writer[table].extend(table_rows)
    collect(world, writer)
    run_p = world.scenario.run
    manifest = run_manifest(
        world.scenario, world.seed, started, run_p.duration_s, run_p.drain_s, world.url,
        world.server,
    )  # fmt: skip
    manifest.update(mode="realtime", factor=world.factor, t_start=world.t0, settled=settled)
    writer.close(manifest)
    return manifest


class _ServerKills(ServerFaults):
    """Server faults done for real: SIGKILL the process, start it again."""

    def __init__(self, *args: Any, fleet: Fleet, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fleet = fleet

    def kill(self, server: int) -> None:
        self.fleet.kill(f"api-{server}")

    def restart(self, server: int) -> None:
        self.fleet.restart(f"api-{server}")


def _wait_settled(
    store: Store, client: Any, names: StreamNames, groups: tuple[str, ...], timeout: float
) -> bool:
    """Wait until the outbox is published and every group has taken everything.

    Not settling is recorded, not raised: the run's tables are still written, the
    manifest says ``settled: false`` and the checker reports the run unfinished
    (events unseen), which fails it.
    """
    from sqlalchemy import func, select

    def settled() -> bool:
        with store.read() as conn:
            unpublished = conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            ).scalar_one()
        return not unpublished and not any(waiting(client, names, g) for g in groups)

    try:
        wait_until(settled, timeout=timeout, interval=0.1, what="the service to settle")
    except WaitTimeout as exc:
        log.warning("real-time run did not settle: %s; the checker will call it unfinished", exc)
        return False
    return True
