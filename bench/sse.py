"""SSE delivery to phones: replay rate, connections per process, live latency.

One run, three phases against ONE real API process (``workbench serve
--api-only``: uvicorn, started as a separate OS process, fresh SQLite store,
serve's own settings, heartbeats included), each beside a
figure from raw Redis measured in the same run:

* **a replay**  one SSE client catching up: ``--replay`` entries are appended to
  its user stream with :meth:`UserStreams.append`, then it connects with
  ``Last-Event-ID: 0`` and reads until ``event: ready``: entries/s end to end over
  HTTP. The anchor, interleaved round by round: ``XRANGE`` in pages of 500 over
  the same stream with redis-py + hiredis.
* **b connections**  ``--connections`` SSE connections (one per user) held by the
  server process; then ``--rounds`` rounds of events (two users per event, as an
  escrow names its buyer and seller) fanned out to all of them. Reported: how
  many connections were established (and why not, if some were not), whether
  every client got exactly its events in order, the server's RSS before and
  after (per connection), and the server process's own Redis connections
  (its sockets to the Redis port, matched by inode in ``/proc``) at every tenth
  of the ramp: they must not grow with N. Runs first, so "before" is a server
  that has served nothing. The memory target (at most 32 KiB per connection,
  issue #16) is judged on the RSS each tenth of the ramp adds per connection it
  opened: ten values, their median and interval.
* **c latency**  ``--latency-clients`` connected clients, a producer process
  appending ``--rate`` events/s for ``--duration`` seconds (one user per event,
  round robin) with ``time.time_ns()`` in the payload, taken just before
  :meth:`UserStreams.append`; the client takes the difference on receipt:
  fan-out script (XADD + PUBLISH) -> live reader -> hub -> SSE -> client. Two
  anchors at the same rate and envelope size: Redis alone, XADD in the producer
  process -> a blocked ``XREADGROUP`` (NOACK) in this one; and plain code of
  the same shape, the same fan-out script under another key prefix -> a plain
  asyncio forwarder process (:mod:`bench.plain_forwarder`: raw ``SUBSCRIBE``,
  hiredis, one SSE frame per message written to the user's sockets) -> its own
  ``--latency-clients`` clients in this process. The first ``--warmup`` seconds
  of each are left out of the percentiles. ``--latency-rounds`` rounds of
  ``--duration`` s per side, the six orders of the three sides in turn;
  the target (SSE p99 and p99.9 at most 1.3x Redis', at 1,000 clients and
  5,000 events/s) is judged on the per-round ratios, and plain / Redis is its
  floor: what any Python process between Pub/Sub and the phones costs here.

The load client is this process: raw asyncio streams (uvloop if installed), a
GET written by hand, chunked framing and SSE lines parsed incrementally, so one
process holds thousands of connections. Producers run in a helper process
(spawned at the start, so it imports while the server starts). RLIMIT_NOFILE
is raised to the hard limit here and in the server. Timing is printed, never
asserted: on a small VM the client, the server, Redis and the producer share
the cores, and the load average is printed with the figures.

A private redis-server (AOF off) is started unless ``REDIS_URL`` is set; on a
shared Redis every key lives under a per-run prefix and is deleted at the end.

Besides the summary, a record (``bench/records.py``) goes to
``bench/records/sse.json`` (``--quick`` writes none unless ``--record`` is
given): the replay rounds with the median of per-round SSE/XRANGE ratios and
its interval and verdict against 0.3, the bounds (KiB per connection, the
latency ratios) with theirs, and the headline figures, for ``bench/report.py``.
Without ``--quick`` and ``--record`` it writes ``bench/records/sse.json``.

Usage::

    .venv/bin/python bench/sse.py                      # 10k replay, 10k conns, 6x3x10 s
    .venv/bin/python bench/sse.py --quick              # smoke run
    .venv/bin/python bench/sse.py --connections 8000 --json out.json

The last line of output is one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import itertools
import json
import multiprocessing
import os
import queue
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse

import click
import httpx
import numpy as np
import redis
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import plain_forwarder, records, stats  # noqa: E402
from bench.cpu import process_cpu_s, redis_cpu_s  # noqa: E402
from workbench.delivery.userstreams import UserStreams  # noqa: E402
from workbench.domain.events import Event, encode  # noqa: E402
from workbench.http.auth import issue_token  # noqa: E402
from workbench.ops.children import signal_on_parent_death  # noqa: E402
from workbench.ops.redis_server import attach_or_start, free_port  # noqa: E402
from workbench.ops.waiting import wait_until  # noqa: E402
from workbench.streams.connection import server_version  # noqa: E402
from workbench.streams.keys import UserStreamNames  # noqa: E402

PAGE = 500  # the raw XRANGE page, as the server's page_size default
MAX_BATCH = 50  # (c) events a paced producer sends in one round trip when behind
POOL_BOUND = 16 + 1 + 1  # Settings.redis_pool + the live reader's pubsub + the sync client
# The targets of issue #16, stated in the record with a verdict each.
KIB_PER_CONNECTION_TARGET = 32.0  # server RSS per held SSE connection, at most
LATENCY_RATIO_TARGET = 1.3  # SSE p99 / XREADGROUP p99 (and p99.9), at most
REPLAY_RATIO_TARGET = 0.3  # SSE replay rate / raw XRANGE rate, at least

EVENT_ID_RE = re.compile(rb'"event_id":"([^"]*)"')
T_NS_RE = re.compile(rb'"t_ns":(\d+)')
SEQ_RE = re.compile(rb'"seq":(\d+)')


# -- events ---------------------------------------------------------------------------


def bench_event(event_id: str, users: tuple[str, ...], seq: int, t_ns: int = 0) -> Event:
    """An ``escrow.funded``-sized envelope; ``t_ns`` is when it is handed to Redis."""
    return Event(
        event_id=event_id,
        type="escrow.funded",
        aggregate_type="escrow",
        aggregate_id=f"esc_{seq:012d}",
        sequence=2,
        user_ids=users,
        occurred_at=t_ns / 1e9,
        correlation_id=f"cmd_{seq:012d}",
        causation_id=f"cmd_{seq:012d}",
        payload={
            "amount": 1500 + seq % 1000,
            "phone": "254700000000",
            "checkout_request_id": f"ws_CO_{seq:016d}",
            "seq": seq,
            "t_ns": t_ns,
        },
    )


# -- environment ----------------------------------------------------------------------


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit; return (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def rss_kib(pid: int | str = "self") -> int:
    """VmRSS of a process, KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return f"{soft}/{hard}"
    return "?"


def tcp_peers(pid: int, remote_port: int) -> int:
    """Established TCP sockets of process ``pid`` whose remote port is ``remote_port``."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                # remote address is "HEXIP:HEXPORT"; state 01 = ESTABLISHED
                if (
                    parts[3] == "01"
                    and int(parts[2].rsplit(":", 1)[1], 16) == remote_port
                    and parts[9] in inodes
                ):
                    count += 1
    return count


def redis_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


class CpuMeter:
    """CPU seconds spent by the API process, this process and redis-server between marks."""

    def __init__(self, server_pid: int, client: redis.Redis) -> None:
        self.server_pid = server_pid
        self.client = client
        self.total = {"server": 0.0, "client": 0.0, "redis": 0.0}
        self._mark: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        return {
            "server": process_cpu_s(self.server_pid),
            "client": time.process_time(),
            "redis": redis_cpu_s(self.client),
        }

    def start(self) -> None:
        self._mark = self._now()

    def stop(self) -> None:
        for key, value in self._now().items():
            self.total[key] += value - self._mark[key]

    def per_item_us(self, items: int) -> dict[str, float]:
        return {k: round(v / max(1, items) * 1e6, 1) for k, v in self.total.items()}

    def share(self, seconds: float) -> dict[str, float]:
        """CPU seconds per wall second: 1.0 is one core busy."""
        return {k: round(v / seconds, 3) for k, v in self.total.items()} if seconds else {}


@contextlib.contextmanager
def redis_for_bench() -> Iterator[tuple[str, str]]:
    """Yield (url, description): ``REDIS_URL`` or a private redis-server without AOF."""
    with attach_or_start(os.environ.get("REDIS_URL"), appendonly=False) as (url, server):
        yield url, "external (REDIS_URL)" if server is None else "private redis-server, AOF off"


class ApiServer:
    """One ``workbench serve`` process (``--api-only`` by default) and its first API process."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        secret: str,
        directory: Path,
        *,
        api_only: bool = True,
        mpesa: str = "external",
        database_url: str | None = None,
        workers: int = 1,
        extra_env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.secret = secret
        self.dir = directory
        # The defaults are this bench's: API only, no M-Pesa, SQLite in ``directory``;
        # bench/capacity.py runs the whole service (relay, workers, simulated M-Pesa).
        self.api_only = api_only
        self.mpesa = mpesa
        self.database_url = database_url or f"sqlite:///{directory / 'workbench.db'}"
        self.workers = workers
        self.extra_env = dict(extra_env or {})
        self.extra_args = extra_args
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The API process (uvicorn) serve runs, the one whose CPU, memory and sockets count."""
        assert self.process is not None
        state = json.loads((self.dir / "supervision.json").read_text())
        return int(state["components"]["api-0"]["pid"])

    def launch(self) -> None:
        """Start the process; :meth:`wait_ready` waits for it to serve."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKBENCH_", "DATABASE_"))}
        env.update(WORKBENCH_SECRET=self.secret)
        env.update(self.extra_env)
        argv = [
            sys.executable, "-m", "workbench", "serve", *(["--api-only"] * self.api_only),
            "--host", "127.0.0.1", "--port", str(self.port), "--mpesa", self.mpesa,
            "--workers", str(self.workers),
            "--redis-url", self.redis_url, "--prefix", self.prefix,
            "--database-url", self.database_url,
            "--data-dir", str(self.dir), *self.extra_args,
        ]  # fmt: skip
        with open(self.dir / "server.log", "ab") as log:
            self.process = subprocess.Popen(
                argv,
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # SIGTERM when the bench goes away, however it goes; the fd limit
                # is inherited by the exec'd server.
                preexec_fn=signal_on_parent_death(signal.SIGTERM, raise_fd_limit),
            )

    def wait_ready(self, timeout: float = 120) -> None:
        wait_until(self._healthy, timeout=timeout, what="the API process to answer /healthz")

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"the API process exited with {self.process.returncode}:\n{self.log_tail()}"
            )
        try:
            body = self.health()
        except httpx.HTTPError:
            return False
        return bool(body.get("ok") and body.get("live_feed"))

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()  # type: ignore[no-any-return]

    async def sessions(self) -> int | str:
        """The hub's session count per /healthz, or why it could not be read."""
        try:
            return int((await asyncio.to_thread(self.health))["sessions"])
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            return f"/healthz failed: {type(exc).__name__}"

    def log_tail(self, chars: int = 3000) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"

    def errors_logged(self) -> list[str]:
        """Lines of the server log that say something went wrong (EMFILE, tracebacks)."""
        path = self.dir / "server.log"
        if not path.exists():
            return []
        keep = ("Error", "error", "Too many open files", "Traceback", "WARNING")
        lines = path.read_text(errors="replace").splitlines()
        return [line for line in lines if any(k in line for k in keep)]

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the load client: raw asyncio streams -------------------------------------------


class SseParser:
    """Incremental: HTTP/1.1 chunked framing (if any), then SSE lines -> messages.

    A message is ``(id, event, data)`` as bytes (``None`` for a field not sent).
    Comments (the heartbeats) are dropped.
    """

    __slots__ = ("chunked", "raw", "remaining", "crlf", "text", "ended", "_id", "_event", "_data")

    def __init__(self, chunked: bool) -> None:
        self.chunked = chunked
        self.raw = bytearray()  # chunked framing not yet decoded
        self.remaining = 0  # bytes left in the current chunk
        self.crlf = False  # the current chunk's CRLF is still to come
        self.text = bytearray()  # decoded body not yet split into lines
        self.ended = False  # the terminating zero-size chunk was read
        self._id: bytes | None = None
        self._event: bytes | None = None
        self._data: list[bytes] = []

    def _dechunk(self, data: bytes) -> bytearray:
        raw = self.raw
        raw += data
        out = bytearray()
        pos, end = 0, len(raw)
        while pos < end:
            if self.remaining:
                take = min(self.remaining, end - pos)
                out += raw[pos : pos + take]
                pos += take
                self.remaining -= take
            elif self.crlf:
                if end - pos < 2:
                    break
                pos += 2
                self.crlf = False
            else:
                nl = raw.find(b"\r\n", pos)
                if nl < 0:
                    break
                size = int(bytes(raw[pos:nl]).split(b";", 1)[0], 16)
                pos = nl + 2
                if size == 0:
                    self.ended = True
                    break
                self.remaining, self.crlf = size, True
        del raw[:pos]
        return out

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes | None, bytes]]:
        self.text += self._dechunk(data) if self.chunked else data
        lines = self.text.split(b"\n")
        self.text = lines.pop()
        messages: list[tuple[bytes | None, bytes | None, bytes]] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data or self._event is not None or self._id is not None:
                    messages.append((self._id, self._event, b"\n".join(self._data)))
                self._id, self._event, self._data = None, None, []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                self._data.append(bytes(value))
            elif name == b"event":
                self._event = bytes(value)
            elif name == b"id":
                self._id = bytes(value)
        return messages


OnEvent = Callable[["SseConnection", bytes | None, bytes, int], None]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, f"errno {exc.errno}")
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, asyncio.IncompleteReadError | ConnectionError | EOFError):
        return "closed by server"
    return type(exc).__name__


class SseConnection:
    """One phone: ``GET /users/<id>/events``, read until ``ready``, then pump."""

    def __init__(
        self,
        host: str,
        port: int,
        user: str,
        token: str,
        *,
        last_event_id: str | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self.on_event = on_event
        headers = [
            f"GET /users/{user}/events HTTP/1.1",
            f"Host: {host}:{port}",
            f"Authorization: Bearer {token}",
            "Accept: text/event-stream",
        ]
        if last_event_id is not None:
            headers.append(f"Last-Event-ID: {last_event_id}")
        self.request = ("\r\n".join(headers) + "\r\n\r\n").encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.parser: SseParser | None = None
        self.ready = False
        self.ready_data = b""
        self.events = 0  # domain events received (replayed and live)
        self.resets = 0
        self.error: str | None = None  # why it never got to ready
        self.ended: str | None = None  # why the stream ended after ready
        self.seconds = 0.0  # request to ready
        self.first_event_s = float("nan")  # request to the first domain event
        self._started = 0.0
        self.task: asyncio.Task[None] | None = None

    def _handle(self, data: bytes) -> None:
        now = time.time_ns()
        assert self.parser is not None
        for sse_id, event, payload in self.parser.feed(data):
            if event == b"ready":
                self.ready = True
                self.ready_data = payload
            elif event == b"reset":
                self.resets += 1
            elif event is not None:
                if not self.events:
                    self.first_event_s = time.perf_counter() - self._started
                self.events += 1
                if self.on_event is not None:
                    self.on_event(self, sse_id, payload, now)

    async def open(self, timeout: float) -> bool:
        """Connect and read until ``event: ready``; on failure set ``error`` and close."""
        started = self._started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
                self.writer.write(self.request)
                head = await self.reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                if status != b"200":
                    raise _Refused(f"HTTP {status.decode()}")
                self.parser = SseParser(b"transfer-encoding: chunked" in head.lower())
                while not self.ready:
                    data = await self.reader.read(65536)
                    if not data:
                        raise EOFError
                    self._handle(data)
                    if self.resets:
                        raise _Refused("event: reset")
        except Exception as exc:  # noqa: BLE001 - every failure is counted by its reason
            self.error = str(exc) if isinstance(exc, _Refused) else _reason(exc)
            self.close()
            return False
        finally:
            self.seconds = time.perf_counter() - started
        return True

    def start_pump(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        assert self.reader is not None
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    self.ended = "closed by server"
                    return
                self._handle(data)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self.ended = _reason(exc)

    def close(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None


class _Refused(Exception):
    """The server answered, but not with a stream we can use (a status, a reset)."""


async def close_all(conns: list[SseConnection]) -> None:
    tasks = [c.task for c in conns if c.task is not None]
    for c in conns:
        c.close()
    await asyncio.gather(*tasks, return_exceptions=True)


async def ramp(
    conns: list[SseConnection],
    *,
    concurrency: int,
    timeout: float,
    steps: int = 1,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, int]:
    """Open ``conns`` (``concurrency`` handshakes at a time) in ``steps`` waves.

    After each wave ``on_step(established so far)``. A wave in which nothing
    could be opened ends the ramp: the rest count as "not attempted". Returns
    the failure reasons with their counts.
    """
    gate = asyncio.Semaphore(concurrency)

    async def one(conn: SseConnection) -> None:
        async with gate:
            if await conn.open(timeout):
                conn.start_pump()

    size = max(1, -(-len(conns) // steps))
    established = 0
    for start in range(0, len(conns), size):
        wave = conns[start : start + size]
        await asyncio.gather(*(one(c) for c in wave))
        opened = sum(1 for c in wave if c.ready)
        established += opened
        if on_step is not None:
            on_step(established)
        if not opened:
            for c in conns[start + size :]:
                c.error = "not attempted (a whole wave failed)"
            break
    return dict(Counter(c.error for c in conns if c.error is not None))


# -- helpers: separate processes, started once ------------------------------------------


def paced_producer(
    url: str,
    prefix: str,
    mode: str,
    users: list[str],
    rate: float,
    count: int,
    tag: str,
    out: Any,
) -> None:
    """Send ``count`` events at ``rate``/s, each stamped just before sending; the events
    due at once (the producer fell behind) go in one round trip, up to :data:`MAX_BATCH`.

    mode ``append``: :meth:`UserStreams.append` (the fan-out script: XADD to the
    user's stream + PUBLISH), users round robin. mode ``xadd``: a plain XADD of
    the same envelope to ``<prefix>:anchor:<tag>``, then a stop entry. ``tag``
    names the round: event ids must differ between rounds (the fan-out dedupes them).
    """
    client = redis.Redis.from_url(url)
    streams = UserStreams(client, UserStreamNames(prefix), maxlen=1000)
    stream = f"{prefix}:anchor:{tag}"
    template = encode(bench_event("evt_anchor_000000", (users[0],), 0, time.time_ns()))
    late = 0
    started = time.perf_counter()
    i = 0
    while i < count:
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        # Every event due by now goes in one round trip (at most MAX_BATCH): one
        # command per round trip cannot reach 5,000/s on a loaded machine. Both
        # sides are sent alike, each event stamped just before its batch goes.
        due = min(count, i + MAX_BATCH, int((time.perf_counter() - started) * rate) + 1)
        batch = range(i, max(due, i + 1))
        now = time.perf_counter()
        late += sum(1 for k in batch if now - (started + k / rate) > 0.005)
        t_ns = time.time_ns()
        if mode == "append":
            events = [
                bench_event(f"evt_lat_{tag}_{k:08d}", (users[k % len(users)],), k, t_ns)
                for k in batch
            ]
            streams.append([(event, encode(event)) for event in events])
        else:
            pipe = client.pipeline(transaction=False)
            for k in batch:
                pipe.xadd(stream, {"seq": k, "t_ns": t_ns, "data": template})
            pipe.execute()
        i = batch.stop
    seconds = time.perf_counter() - started
    if mode == "xadd":
        client.xadd(stream, {"stop": 1})
    client.close()
    out.put(("result", {"sent": count, "seconds": seconds, "late": late}))


def anchor_reader(url: str, prefix: str, tag: str, out: Any) -> None:
    """XREADGROUP BLOCK (NOACK) on the anchor stream: (seq, latency ns) per entry until stop."""
    client = redis.Redis.from_url(url)
    stream = f"{prefix}:anchor:{tag}"
    client.xgroup_create(stream, "anchor", id="$", mkstream=True)
    out.put(("ready", None))
    samples: list[tuple[int, int]] = []
    deadline = time.monotonic() + 600
    done = False
    while not done and time.monotonic() < deadline:
        reply = client.xreadgroup("anchor", "r", {stream: ">"}, count=100, block=1000, noack=True)
        now = time.time_ns()
        for _, fields in reply[0][1] if reply else ():
            if b"stop" in fields:
                done = True
                break
            samples.append((int(fields[b"seq"]), now - int(fields[b"t_ns"])))
    client.close()
    out.put(("result", samples))


def broadcast_producer(url: str, prefix: str, users: list[str], rounds: int, out: Any) -> None:
    """``rounds`` rounds; each appends one event per pair of users (batches of 500)."""
    client = redis.Redis.from_url(url)
    streams = UserStreams(client, UserStreamNames(prefix), maxlen=1000)
    pairs = [tuple(users[i : i + 2]) for i in range(0, len(users), 2)]
    started = time.perf_counter()
    first_ns = time.time_ns()
    appended = 0
    for r in range(rounds):
        for start in range(0, len(pairs), 500):
            batch = []
            for k in range(start, min(start + 500, len(pairs))):
                event = bench_event(f"evt_bc_{r}_{k:06d}", pairs[k], k, time.time_ns())
                batch.append((event, encode(event)))
            appended += sum(streams.append(batch))
    client.close()
    seconds = time.perf_counter() - started
    out.put(("result", {"appended": appended, "seconds": seconds, "first_ns": first_ns}))


JOBS: dict[str, Callable[..., None]] = {
    "paced_producer": paced_producer,
    "broadcast_producer": broadcast_producer,
}


def helper_loop(inbox: Any, out: Any) -> None:
    """A helper process: run jobs from ``inbox`` until ``None``; they answer on ``out``."""
    while (job := inbox.get()) is not None:
        name, args = job
        try:
            JOBS[name](*args, out)
        except Exception as exc:  # noqa: BLE001 - reported to the bench, which raises
            out.put(("error", f"{name}: {exc!r}"))


class Helper:
    """A spawned process that runs :data:`JOBS`. Started early: it imports while we work."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.inbox, self.out = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=helper_loop, args=(self.inbox, self.out), daemon=True)
        self.process.start()

    def submit(self, name: str, *args: Any) -> None:
        self.inbox.put((name, args))

    async def next(self, kind: str, timeout: float) -> Any:
        """The next message, which must be ``kind`` (``ready`` or ``result``)."""
        got, value = await asyncio.to_thread(self.out.get, True, timeout)
        if got == "error":
            raise RuntimeError(f"helper process failed: {value}")
        if got != kind:
            raise RuntimeError(f"helper process said {got!r}, expected {kind!r}")
        return value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.inbox.put(None)
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


# -- figures --------------------------------------------------------------------------


def percentiles_ms(samples_ns: list[int]) -> dict[str, float | int]:
    if not samples_ns:
        return {"n": 0}
    arr = np.asarray(samples_ns, dtype=np.float64) / 1e6
    p50, p99, p999 = np.percentile(arr, [50, 99, 99.9])
    return {
        "n": len(samples_ns),
        "p50_ms": round(float(p50), 3),
        "p99_ms": round(float(p99), 3),
        "p99_9_ms": round(float(p999), 3),
        "max_ms": round(float(arr.max()), 3),
        "mean_ms": round(float(arr.mean()), 3),
    }


def tokens(users: list[str], secret: str) -> list[str]:
    return [issue_token(u, secret, ttl_s=3600) for u in users]


@dataclass
class Env:
    url: str
    prefix: str
    secret: str
    client: redis.Redis
    redis_port: int
    server: ApiServer
    helper: Helper

    def connection(self, user: str, token: str, **kwargs: Any) -> SseConnection:
        return SseConnection("127.0.0.1", self.server.port, user, token, **kwargs)

    async def sessions_drained(self, timeout: float = 60) -> int | str:
        """Wait for the server's hub to have no sessions left; return how many remain."""
        deadline = time.monotonic() + timeout
        while True:
            left = await self.server.sessions()
            if left == 0 or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.1)


# -- phase a: replay -------------------------------------------------------------------


def raw_xrange(client: redis.Redis, stream: str) -> int:
    total, cursor = 0, "-"
    while True:
        page = client.xrange(stream, cursor, "+", count=PAGE)
        total += len(page)
        if len(page) < PAGE:
            return total
        cursor = "(" + page[-1][0].decode()


async def phase_replay(env: Env, entries: int, repeat: int) -> dict[str, Any]:
    user = "replay-0"
    names = UserStreamNames(env.prefix)
    streams = UserStreams(env.client, names, maxlen=entries * 2)
    appended = 0
    for start in range(0, entries, PAGE):
        batch = []
        for i in range(start, min(start + PAGE, entries)):
            event = bench_event(f"evt_rp_{i:08d}", (user,), i, time.time_ns())
            batch.append((event, encode(event)))
        appended += sum(streams.append(batch))
    stream = names.stream(user)
    length = env.client.xlen(stream)
    if appended != entries or length != entries:
        raise RuntimeError(f"appended {appended}, stream holds {length}; expected {entries}")
    envelope = len(env.client.xrange(stream, count=1)[0][1][b"data"])
    token = tokens([user], env.secret)[0]
    sse_runs: list[float] = []
    raw_runs: list[float] = []
    first_event: list[float] = []
    cpu = CpuMeter(env.server.pid, env.client)
    for _ in range(repeat):  # interleaved: a noisy neighbour slows both sides alike
        started = time.perf_counter()
        got = raw_xrange(env.client, stream)
        raw_runs.append(time.perf_counter() - started)
        if got != entries:
            raise RuntimeError(f"raw XRANGE read {got} of {entries}")
        conn = env.connection(user, token, last_event_id="0")
        cpu.start()
        ok = await conn.open(timeout=300)
        cpu.stop()
        conn.close()
        if not ok:
            raise RuntimeError(f"replay client failed: {conn.error}\n{env.server.log_tail()}")
        replayed = json.loads(conn.ready_data)["replayed"]
        if conn.events != entries or replayed != entries:
            raise RuntimeError(
                f"replay delivered {conn.events} events (ready says {replayed}), expected {entries}"
            )
        sse_runs.append(conn.seconds)
        first_event.append(conn.first_event_s)
    sse_s, raw_s = statistics.median(sse_runs), statistics.median(raw_runs)
    return {
        "entries": entries,
        "envelope_bytes": envelope,
        "rounds": repeat,
        "sse_seconds": round(sse_s, 6),
        "sse_per_second": round(entries / sse_s, 1),
        "sse_runs_seconds": [round(s, 6) for s in sse_runs],
        "first_event_ms": round(statistics.median(first_event) * 1000, 3),
        "raw_seconds": round(raw_s, 6),
        "raw_per_second": round(entries / raw_s, 1),
        "raw_runs_seconds": [round(s, 6) for s in raw_runs],
        "ratio_sse_vs_raw": round(raw_s / sse_s, 4),
        "cpu_us_per_entry": cpu.per_item_us(entries * repeat),
        "sessions_left": await env.sessions_drained(),
    }


# -- phase b: connections ----------------------------------------------------------------


async def phase_connections(
    env: Env, target: int, rounds: int, concurrency: int, timeout: float
) -> dict[str, Any]:
    users = [f"conn-{i:06d}" for i in range(target)]
    expected: dict[str, list[bytes]] = {u: [] for u in users}
    for r in range(rounds):
        for k in range(0, target, 2):
            for u in users[k : k + 2]:
                expected[u].append(f"evt_bc_{r}_{k // 2:06d}".encode())
    received: dict[str, list[bytes]] = {u: [] for u in users}
    sse_ids: dict[str, list[bytes]] = {u: [] for u in users}
    lags: list[int] = []

    def on_event(conn: SseConnection, sse_id: bytes | None, data: bytes, now: int) -> None:
        match = EVENT_ID_RE.search(data)
        received[conn.user].append(match.group(1) if match else b"?")
        sse_ids[conn.user].append(sse_id or b"")
        t = T_NS_RE.search(data)
        lags.append(now - int(t.group(1)) if t else 0)

    tks = tokens(users, env.secret)
    pid, port = env.server.pid, env.redis_port
    out: dict[str, Any] = {"target": target, "rounds": rounds, "concurrency": concurrency}
    out["server_open_files_limit"] = open_files_limit(pid)
    out["server_rss_before_kib"] = rss_kib(pid)
    out["server_redis_conns_before"] = tcp_peers(pid, port)
    out["redis_connected_clients_before"] = redis_clients(env.client)
    client_rss_before = rss_kib()
    conns = [env.connection(u, t, on_event=on_event) for u, t in zip(users, tks, strict=True)]
    ramp_samples: list[dict[str, int]] = []

    def sample(established: int) -> None:
        ramp_samples.append(
            {
                "established": established,
                "server_rss_kib": rss_kib(pid),
                "server_redis_conns": tcp_peers(pid, port),
                "client_rss_kib": rss_kib(),
            }
        )

    started = time.perf_counter()
    failures = await ramp(conns, concurrency=concurrency, timeout=timeout, steps=10, on_step=sample)
    out["ramp_seconds"] = round(time.perf_counter() - started, 3)
    live = [c for c in conns if c.ready]
    out["established"] = len(live)
    out["failures"] = failures
    if failures:
        out["server_log_errors"] = env.server.errors_logged()[-10:]
    await asyncio.sleep(0.5)
    out["hub_sessions"] = await env.server.sessions()
    out["server_rss_connected_kib"] = rss_kib(pid)
    out["client_rss_connected_kib"] = rss_kib()
    out["ramp"] = ramp_samples

    # Events to everyone (users whose connection failed get theirs appended too).
    want = sum(len(expected[c.user]) for c in live)
    cpu = CpuMeter(pid, env.client)
    cpu.start()
    env.helper.submit("broadcast_producer", env.url, env.prefix, users, rounds)
    produced = await env.helper.next("result", timeout=600)
    deadline = time.monotonic() + max(30.0, timeout)
    while len(lags) < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    cpu.stop()
    out["cpu_us_per_delivery"] = cpu.per_item_us(len(lags))
    await asyncio.sleep(0.2)  # anything extra (a duplicate) would show up now
    out["events_appended"] = produced["appended"]
    out["append_seconds"] = round(produced["seconds"], 3)
    out["deliveries_expected"] = want
    out["deliveries"] = len(lags)
    out["delivery_lag"] = percentiles_ms(lags)
    exact = 0
    for c in live:
        ids = [tuple(map(int, i.split(b"-"))) for i in sse_ids[c.user]]
        ordered = all(a < b for a, b in zip(ids, ids[1:], strict=False))
        if received[c.user] == expected[c.user] and ordered and not c.resets:
            exact += 1
    out["clients_exact"] = exact
    out["clients_ended_early"] = sum(1 for c in live if c.ended)
    out["all_received"] = bool(live) and exact == len(live) and len(lags) == want
    out["server_rss_after_kib"] = rss_kib(pid)
    out["server_redis_conns_after"] = tcp_peers(pid, port)
    out["redis_connected_clients_after"] = redis_clients(env.client)
    out["client_rss_after_kib"] = rss_kib()
    await close_all(conns)
    out["sessions_left"] = await env.sessions_drained()

    n = max(1, out["established"])
    out["server_kib_per_connection"] = round(
        (out["server_rss_connected_kib"] - out["server_rss_before_kib"]) / n, 2
    )
    out["server_kib_per_connection_waves"] = wave_slopes(out["server_rss_before_kib"], ramp_samples)
    out["client_kib_per_connection"] = round(
        (out["client_rss_connected_kib"] - client_rss_before) / n, 2
    )
    during = [s["server_redis_conns"] for s in ramp_samples] + [out["server_redis_conns_after"]]
    out["server_redis_conns_max"] = max(during)
    out["server_redis_conns_bound"] = POOL_BOUND
    out["redis_conns_o1"] = max(during) <= POOL_BOUND
    return out


def wave_slopes(rss_before: int, ramp_samples: list[dict[str, int]]) -> list[float]:
    """KiB of server RSS per connection added in each wave of the ramp (its tenths):
    the per-round values the memory bound is judged on (a wave that opened nothing is left out)."""
    slopes = []
    est, rss = 0, rss_before
    for sample in ramp_samples:
        opened = sample["established"] - est
        if opened > 0:
            slopes.append(round((sample["server_rss_kib"] - rss) / opened, 3))
        est, rss = sample["established"], sample["server_rss_kib"]
    return slopes


# -- phase c: latency -------------------------------------------------------------------


LATENCY_KEYS = (("p50_ms", "p50"), ("p99_ms", "p99"), ("p99_9_ms", "p99.9"))
#: The sides of a latency round: the runtime, the plain forwarder, Redis alone.
LATENCY_SIDES = ("sse", "plain", "anchor")


class LatencyRatio(NamedTuple):
    """One latency ratio of a round: ``numerator`` side / ``denominator`` side, kept in
    the record as ``latency_<percentile>_<name>`` (with ``target``, or none: a floor
    or a breakdown)."""

    numerator: str
    denominator: str
    name: str
    what: str
    target: float | None


#: Every latency ratio: key in a round's result -> what it divides and how the record
#: names it.
LATENCY_RATIOS = {
    "ratio_sse_vs_anchor": LatencyRatio(
        "sse", "anchor", "sse_vs_xreadgroup",
        "fan-out -> SSE client / XADD -> XREADGROUP", LATENCY_RATIO_TARGET,
    ),
    "ratio_plain_vs_anchor": LatencyRatio(
        "plain", "anchor", "plain_vs_xreadgroup",
        "floor: fan-out -> plain forwarder -> client / XADD -> XREADGROUP (plain code's share)",
        None,
    ),
    "ratio_sse_vs_plain": LatencyRatio(
        "sse", "plain", "sse_vs_plain",
        "fan-out -> SSE client / fan-out -> plain forwarder -> client", None,
    ),
}  # fmt: skip


def latency_ratios(sse: dict[str, Any], anchor: dict[str, Any]) -> dict[str, float | None]:
    """SSE percentile / anchor percentile, for p50, p99 and p99.9 (None if either is missing)."""
    ratios: dict[str, float | None] = {}
    for key, _ in LATENCY_KEYS:
        ours, raw = sse.get(key), anchor.get(key)
        ratios[key] = round(ours / raw, 4) if ours is not None and raw else None
    return ratios


def side_order(round_: int) -> tuple[str, ...]:
    """Round ``round_``'s order of the sides: the six orders of three in turn, so over
    six rounds every side runs before each other side as often as after it (a
    rotation alone would put one side of each pair first in two rounds of three)."""
    return _ORDERS[round_ % len(_ORDERS)]


_ORDERS = list(itertools.permutations(LATENCY_SIDES))


async def _live_window(
    env: Env,
    conns: list[SseConnection],
    users: list[str],
    samples: list[tuple[int, int]],
    rate: float,
    count: int,
    tag: str,
    prefix: str,
    meter_pid: int,
) -> dict[str, Any]:
    """One round of a live side: ``count`` events at ``rate`` through the fan-out
    script under ``prefix``; wait for what the clients expect."""
    clients = len(conns)
    samples.clear()
    cpu = CpuMeter(meter_pid, env.client)
    env.helper.submit("paced_producer", env.url, prefix, "append", users, rate, count, tag)
    cpu.start()
    started = time.perf_counter()
    sent = await env.helper.next("result", timeout=count / rate * 5 + 60)
    want = sum(1 for i in range(count) if conns[i % clients].ready)
    deadline = time.monotonic() + 10
    while len(samples) < want and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    cpu.stop()
    return {
        "sent": sent,
        "want": want,
        "samples": list(samples),
        "cores": cpu.share(time.perf_counter() - started),
    }


async def _anchor_window(env: Env, users: list[str], rate: float, count: int, tag: str) -> Any:
    """One round's anchor: XADD in the helper process -> XREADGROUP BLOCK in a thread
    of this one (its event loop idle meanwhile), same rate and envelope size."""
    answers: queue.Queue[tuple[str, Any]] = queue.Queue()
    reader = asyncio.ensure_future(
        asyncio.to_thread(anchor_reader, env.url, env.prefix, tag, answers)
    )
    kind, _ = await asyncio.to_thread(answers.get, True, 60)
    if kind != "ready":
        raise RuntimeError(f"anchor reader: {kind}")
    env.helper.submit("paced_producer", env.url, env.prefix, "xadd", users, rate, count, tag)
    sent = await env.helper.next("result", timeout=count / rate * 5 + 60)
    await reader
    _, got = answers.get_nowait()
    return sent, got


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """This process's garbage collector off while it measures a latency window.

    The load client holds thousands of connections and the samples; a full
    collection of its heap stops it for longer than the tails it measures
    (seen with ``gc.callbacks``), delaying every message in flight on every
    side alike: the tails were the instrument's. Collected before each window.
    """
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@contextlib.contextmanager
def collector_frozen() -> Iterator[None]:
    """What this process holds now (connections, phones) out of its collector's sight
    while it measures a longer stretch: full collections then scan only what the
    stretch allocates, and the collector stays on (no garbage piles up)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class _Side:
    """What one side of the latency phase gathers over the rounds."""

    def __init__(self) -> None:
        self.kept: list[int] = []
        self.sent = self.late = self.want = self.received = 0
        self.seconds = 0.0
        self.cores: list[dict[str, float]] = []

    def add(self, sent: dict[str, Any], samples: list[tuple[int, int]], skip: int) -> list[int]:
        kept = [ns for seq, ns in samples if seq >= skip]
        self.kept += kept
        self.sent += sent["sent"]
        self.seconds += sent["seconds"]
        self.late += sent["late"]
        self.received += len(samples)
        return kept


def _recorder(samples: list[tuple[int, int]]) -> OnEvent:
    def on_event(conn: SseConnection, sse_id: bytes | None, data: bytes, now: int) -> None:
        t = T_NS_RE.search(data)
        s = SEQ_RE.search(data)
        if t and s:
            samples.append((int(s.group(1)), now - int(t.group(1))))

    return on_event


async def phase_latency(
    env: Env,
    clients: int,
    rate: float,
    duration: float,
    warmup: float,
    timeout: float,
    rounds: int = 1,
) -> dict[str, Any]:
    """``rounds`` interleaved rounds of ``duration`` s each over three sides: the
    runtime (SSE), the plain forwarder (:mod:`bench.plain_forwarder`, its own
    ``clients`` connections and key prefix, so the server hears none of its
    events) and Redis alone; the six orders of the sides in turn (:func:`side_order`),
    the ratios taken inside each round. A forwarder that died fails the run; what
    each side received against what it was sent is reported."""
    users = [f"lat-{i:05d}" for i in range(clients)]
    count = int(rate * duration)
    skip = int(rate * warmup)
    plain_prefix = f"{env.prefix}:plain"
    forwarder, plain_port = await asyncio.to_thread(
        plain_forwarder.start, env.url, UserStreamNames(plain_prefix).live_channel()
    )
    out: dict[str, Any] = {
        "clients": clients,
        "rate": rate,
        "duration_s": duration,
        "warmup_s": warmup,
        "events": count,
        "rounds": rounds,
    }
    samples: dict[str, list[tuple[int, int]]] = {"sse": [], "plain": []}
    conns = [
        env.connection(u, t, on_event=_recorder(samples["sse"]))
        for u, t in zip(users, tokens(users, env.secret), strict=True)
    ]
    plain_conns = [
        SseConnection("127.0.0.1", plain_port, u, "-", on_event=_recorder(samples["plain"]))
        for u in users
    ]
    try:
        out["failures"] = await ramp(conns, concurrency=200, timeout=timeout)
        out["plain_failures"] = await ramp(plain_conns, concurrency=200, timeout=timeout)
        out["connected"] = sum(1 for c in conns if c.ready)
        out["plain_connected"] = sum(1 for c in plain_conns if c.ready)
        sides = {name: _Side() for name in LATENCY_SIDES}
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            order = side_order(r)
            result: dict[str, Any] = {"order": list(order)}
            for name in order:
                side = sides[name]
                if name == "anchor":
                    with collector_paused():
                        sent, got = await _anchor_window(env, users, rate, count, f"r{r}")
                    result["anchor"] = percentiles_ms(side.add(sent, got, skip))
                    side.want += sent["sent"]
                    continue
                with collector_paused():
                    window = await _live_window(
                        env,
                        conns if name == "sse" else plain_conns,
                        users,
                        samples[name],
                        rate,
                        count,
                        f"r{r}",
                        env.prefix if name == "sse" else plain_prefix,
                        env.server.pid if name == "sse" else forwarder.pid,
                    )
                if name == "plain" and not forwarder.is_alive():
                    raise RuntimeError(f"the plain forwarder died (exit {forwarder.exitcode})")
                result[name] = percentiles_ms(side.add(window["sent"], window["samples"], skip))
                result[f"{name}_received"] = len(window["samples"])
                result[f"{name}_expected"] = window["want"]
                side.want += window["want"]
                side.cores.append(window["cores"])
            for key, ratio in LATENCY_RATIOS.items():
                result[key] = latency_ratios(result[ratio.numerator], result[ratio.denominator])
            per_round.append(result)
        out["server_rss_kib"] = rss_kib(env.server.pid)
    finally:
        await close_all(conns)
        await close_all(plain_conns)
        forwarder.kill()
        forwarder.join()
    out["per_round"] = per_round
    for name, side in sides.items():
        # Pooled over the rounds (the per-round ratios are in per_round and the record).
        out[name] = percentiles_ms(side.kept)
        out[f"{name}_achieved_rate"] = round(side.sent / side.seconds, 1)
        out[f"{name}_late_sends"] = side.late
        out[f"{name}_received"] = side.received
        out[f"{name}_expected"] = side.want
        out[f"{name}_cpu_cores_busy"] = (
            {k: round(statistics.mean(c[k] for c in side.cores), 3) for k in side.cores[0]}
            if side.cores and side.cores[0]
            else {}
        )
    for key, ratio in LATENCY_RATIOS.items():
        out[key] = latency_ratios(out[ratio.numerator], out[ratio.denominator])
    out["sessions_left"] = await env.sessions_drained()
    return out


# -- the run ----------------------------------------------------------------------------


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()  # type: ignore[no-any-return]


def loop_kind() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:  # pragma: no cover
        return "asyncio"
    return "uvloop"


def run(options: dict[str, Any]) -> dict[str, Any]:
    from simulations.analysis.report import (
        wide_console,  # here: it imports pandas, the helper need not
    )

    console = wide_console()
    soft, hard = raise_fd_limit()
    prefix = f"ssebench{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="workbench-sse-bench-"))
    load_before = os.getloadavg()
    clock = time.perf_counter()
    wall: dict[str, float] = {}

    def lap(name: str) -> float:
        nonlocal clock
        now = time.perf_counter()
        wall[name] = round(now - clock, 2)
        clock = now
        return wall[name]

    with redis_for_bench() as (url, redis_desc):
        client = redis.Redis.from_url(url)
        server = ApiServer(url, prefix, secrets.token_hex(32), tmp / "api")
        helper: Helper | None = None
        try:
            # The API process and the helper import while we look around.
            server.launch()
            helper = Helper()
            version = ".".join(map(str, server_version(client)))
            console.print(
                f"[bold]sse[/]: Redis {version}, {redis_desc}; {os.cpu_count()} CPUs, load "
                f"{load_before[0]:.1f}; client loop {loop_kind()}; RLIMIT_NOFILE {soft}/{hard}"
            )
            needed = options["connections"] + 200
            if hard != resource.RLIM_INFINITY and hard < needed:
                console.print(
                    f"[yellow]the hard fd limit {hard} is below the {needed} files "
                    f"{options['connections']} connections need: expect EMFILE[/]"
                )
            server.wait_ready()
            lap("startup")
            port = urlparse(url).port or 6379
            env = Env(url, prefix, server.secret, client, port, server, helper)
            with asyncio.Runner(loop_factory=new_loop) as runner:
                # b first: its "before" is a server that has served nothing yet.
                conns = runner.run(
                    phase_connections(
                        env,
                        options["connections"],
                        options["rounds"],
                        options["concurrency"],
                        options["timeout"],
                    )
                )
                console.print(
                    f"b connections: {conns['established']} of {conns['target']} established, "
                    f"{conns['deliveries']} of {conns['deliveries_expected']} deliveries "
                    f"({lap('connections')} s)"
                )
                replay = runner.run(phase_replay(env, options["replay"], options["repeat"]))
                console.print(
                    f"a replay: {replay['sse_per_second']:,.0f} entries/s over SSE, "
                    f"raw XRANGE {replay['raw_per_second']:,.0f}/s ({lap('replay')} s)"
                )
                latency = runner.run(
                    phase_latency(
                        env,
                        options["latency_clients"],
                        options["rate"],
                        options["duration"],
                        options["warmup"],
                        options["timeout"],
                        options["latency_rounds"],
                    )
                )
                lap("latency")
        finally:
            server.stop()
            if helper is not None:
                helper.close()
            with contextlib.suppress(redis.RedisError):
                keys = list(client.scan_iter(f"{prefix}:*", count=1000))
                for start in range(0, len(keys), 1000):
                    client.delete(*keys[start : start + 1000])
            client.close()
            shutil.rmtree(tmp, ignore_errors=True)

    summary: dict[str, Any] = {
        "bench": "sse",
        "quick": options["quick"],
        "redis_version": version,
        "redis": redis_desc,
        "cpus": os.cpu_count(),
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
        "client_loop": loop_kind(),
        "fd_limit": {"soft": soft, "hard": hard},
        "wall_seconds": wall,
        "replay": replay,
        "connections": conns,
        "latency": latency,
        "ratios": {
            "replay_sse_vs_raw_xrange": replay["ratio_sse_vs_raw"],
            "latency_p50_sse_vs_xreadgroup": latency["ratio_sse_vs_anchor"]["p50_ms"],
            "latency_p99_sse_vs_xreadgroup": latency["ratio_sse_vs_anchor"]["p99_ms"],
            "latency_p99_9_sse_vs_xreadgroup": latency["ratio_sse_vs_anchor"]["p99_9_ms"],
        },
    }
    print_report(console, summary)
    return summary


def _mib(kib: int) -> str:
    return f"{kib / 1024:,.1f} MiB"


def _cpu(us: dict[str, float]) -> str:
    return f"{us['server']:.0f} / {us['client']:.0f} / {us['redis']:.0f} µs"


def _ms(figures: dict[str, Any], key: str) -> str:
    value = figures.get(key)
    return "n/a" if value is None else f"{value:.2f} ms"


def print_report(console: Any, summary: dict[str, Any]) -> None:
    rp, cn, lt = summary["replay"], summary["connections"], summary["latency"]
    lag = cn["delivery_lag"]
    table = Table(
        title="SSE: one API process (uvicorn) vs raw Redis", title_justify="left", expand=True
    )
    table.add_column("phase", no_wrap=True)
    table.add_column("measurement", ratio=5)
    table.add_column("workbench SSE", justify="right", ratio=3)
    table.add_column("anchor: raw Redis", justify="right", ratio=3)
    table.add_column("ratio", justify="right", ratio=3)

    table.add_row(
        "a replay",
        f"{rp['entries']:,} missed entries ({rp['envelope_bytes']} B envelopes), "
        f"Last-Event-ID 0 -> ready; median of {rp['rounds']}",
        f"{rp['sse_per_second']:,.0f} entries/s ({rp['sse_seconds']:.3f} s)",
        f"XRANGE COUNT {PAGE}: {rp['raw_per_second']:,.0f}/s ({rp['raw_seconds']:.3f} s)",
        f"{rp['ratio_sse_vs_raw']:.1%} of raw",
    )
    table.add_row("", "first replayed event after the request", f"{rp['first_event_ms']:.1f} ms")
    table.add_row(
        "",
        "CPU per replayed entry: API process / load client / redis-server",
        _cpu(rp["cpu_us_per_entry"]),
    )

    failures = ", ".join(f"{k}: {v}" for k, v in cn["failures"].items()) or "none"
    table.add_row(
        "b connections",
        "SSE connections held by one server process (ready received)",
        f"{cn['established']:,} of {cn['target']:,} in {cn['ramp_seconds']:.1f} s",
        "",
        f"hub reports {cn['hub_sessions']}",
    )
    table.add_row(
        "",
        "connections that failed, by reason",
        failures,
        "",
        f"fd limits: client {summary['fd_limit']['soft']}, server {cn['server_open_files_limit']}",
    )
    table.add_row(
        "",
        f"events to all: {cn['rounds']} rounds x 1 event per user (2 users per event)",
        f"{cn['deliveries']:,} of {cn['deliveries_expected']:,} delivered",
        "",
        f"{cn['clients_exact']:,} of {cn['established']:,} clients got exactly theirs",
    )
    table.add_row(
        "",
        "lag append -> client, all rounds in a burst: p50 / p99 / max",
        f"{_ms(lag, 'p50_ms')} / {_ms(lag, 'p99_ms')} / {_ms(lag, 'max_ms')}",
        f"(appending took {cn['append_seconds']:.2f} s)",
        "",
    )
    table.add_row(
        "",
        "CPU per delivery: API process / load client / redis-server",
        _cpu(cn["cpu_us_per_delivery"]),
    )
    table.add_row(
        "",
        "server RSS: before -> all connected -> after events",
        f"{_mib(cn['server_rss_before_kib'])} -> {_mib(cn['server_rss_connected_kib'])} -> "
        f"{_mib(cn['server_rss_after_kib'])}",
        "",
        f"{cn['server_kib_per_connection']:.1f} KiB/connection",
    )
    series = ", ".join(str(s["server_redis_conns"]) for s in cn["ramp"])
    table.add_row(
        "",
        "server process's Redis connections: idle; each tenth of the ramp; after",
        f"{cn['server_redis_conns_before']}; {series}; {cn['server_redis_conns_after']}",
        f"bound {POOL_BOUND} (pool 16 + pubsub + sync)",
        "O(1): yes" if cn["redis_conns_o1"] else "O(1): NO",
    )
    table.add_row(
        "",
        "Redis INFO connected_clients (everyone): before -> after",
        f"{cn['redis_connected_clients_before']} -> {cn['redis_connected_clients_after']}",
    )
    table.add_row(
        "",
        "hub sessions left after the clients closed",
        str(cn["sessions_left"]),
    )
    table.add_row(
        "",
        "load client (this process) RSS",
        _mib(cn["client_rss_connected_kib"]),
        "",
        f"{cn['client_kib_per_connection']:.1f} KiB/connection",
    )

    sse, plain, anchor = lt["sse"], lt["plain"], lt["anchor"]
    table.add_row(
        "c latency",
        f"{lt['connected']:,} clients, {lt['rate']:,.0f} events/s for {lt['duration_s']:g} s "
        f"(first {lt['warmup_s']:g} s left out): delivered",
        f"{lt['sse_received']:,} of {lt['sse_expected']:,} at {lt['sse_achieved_rate']:,.0f}/s",
        f"{lt['anchor_received']:,} of {lt['anchor_expected']:,} "
        f"at {lt['anchor_achieved_rate']:,.0f}/s",
        "",
    )
    table.add_row(
        "",
        "plain forwarder (Pub/Sub -> plain asyncio -> TCP): delivered",
        f"{lt['plain_received']:,} of {lt['plain_expected']:,} "
        f"at {lt['plain_achieved_rate']:,.0f}/s",
        "",
        "",
    )
    for side, value, what in (
        ("sse", sse, "fan-out script -> SSE client | XADD -> XREADGROUP BLOCK"),
        ("plain", plain, "fan-out script -> plain forwarder -> client | XADD -> XREADGROUP"),
    ):
        ratios = lt[f"ratio_{side}_vs_anchor"]
        for key, label in LATENCY_KEYS:
            ratio = ratios.get(key)
            table.add_row(
                "",
                f"{label}: {what}" if key == "p50_ms" else label,
                _ms(value, key),
                _ms(anchor, key),
                "n/a" if ratio is None else f"{ratio:.1f}x",
            )
        table.add_row("", "max", _ms(value, "max_ms"), _ms(anchor, "max_ms"), "")
    busy, plain_busy = lt["sse_cpu_cores_busy"], lt["plain_cpu_cores_busy"]
    table.add_row(
        "",
        "cores busy while sending: API process (plain forwarder) / load client / redis-server",
        f"{busy['server']:.2f} ({plain_busy['server']:.2f}) / {busy['client']:.2f} "
        f"({plain_busy['client']:.2f}) / {busy['redis']:.2f} ({plain_busy['redis']:.2f})",
        "",
        f"{lt['sse_late_sends']:,} sends > 5 ms late (plain {lt['plain_late_sends']:,}, "
        f"anchor {lt['anchor_late_sends']:,})",
    )
    console.print(table)
    # Plain prints: unwrapped lines that scripts and the smoke test can find.
    print(
        f"replay: {rp['sse_per_second']:,.0f} entries/s to one SSE client = "
        f"{rp['ratio_sse_vs_raw']:.1%} of raw XRANGE ({rp['raw_per_second']:,.0f}/s)"
    )
    print(
        f"connections: {cn['established']} of {cn['target']} held by one process "
        f"(failures: {failures}); all events received: {cn['all_received']}; "
        f"{cn['server_kib_per_connection']:.1f} KiB/connection; server Redis connections "
        f"{cn['server_redis_conns_before']} -> {cn['server_redis_conns_after']} "
        f"(max {cn['server_redis_conns_max']}, bound {POOL_BOUND})"
    )
    print(
        f"latency at {lt['rate']:,.0f} events/s, {lt['connected']} clients: "
        f"p50 {_ms(sse, 'p50_ms')}, p99 {_ms(sse, 'p99_ms')}, p99.9 {_ms(sse, 'p99_9_ms')}; "
        f"plain forwarder p50 {_ms(plain, 'p50_ms')}, p99 {_ms(plain, 'p99_ms')}, "
        f"p99.9 {_ms(plain, 'p99_9_ms')}; "
        f"Redis XADD->XREADGROUP p50 {_ms(anchor, 'p50_ms')}, p99 {_ms(anchor, 'p99_ms')}, "
        f"p99.9 {_ms(anchor, 'p99_9_ms')}"
    )


def latency_bounds(lt: dict[str, Any]) -> list[stats.Summary]:
    """Per-round latency ratios at p99 and p99.9 as summaries: the target's (SSE / Redis),
    the floor plain code sets on it (plain / Redis) and the runtime against plain code."""
    out = []
    for key_in_round, (_, _, name, what, target) in LATENCY_RATIOS.items():
        floor = "floor: " if what.startswith("floor: ") else ""
        clients = lt["connected"]
        if "plain" in name:
            clients = min(clients, lt.get("plain_connected", clients))
        for key, label in LATENCY_KEYS[1:]:
            values = [r[key_in_round][key] for r in lt["per_round"]]
            if any(v is None for v in values):
                continue
            out.append(
                stats.summarise(
                    f"latency_{key.removesuffix('_ms')}_{name}",
                    values,
                    what=f"{floor}live latency {label}: {what.removeprefix(floor)}, "
                    f"{clients:,} clients at {lt['rate']:,.0f} events/s, per round",
                    unit="ratio",
                    target=target,
                    at_most=True,
                )
            )
    return out


def record_of(
    summary: dict[str, Any], options: dict[str, Any], load_before: list[float]
) -> dict[str, Any]:
    """The bench record: replay rounds with per-round ratios, headline figures of b and c."""
    rp, cn, lt = summary["replay"], summary["connections"], summary["latency"]
    rounds = [
        {
            "replay_xrange": stats.Sample(rp["entries"], raw),
            "replay_sse": stats.Sample(rp["entries"], sse),
        }
        for raw, sse in zip(rp["raw_runs_seconds"], rp["sse_runs_seconds"], strict=True)
    ]
    sse, plain, anchor = lt["sse"], lt["plain"], lt["anchor"]
    latency = [
        [f"live latency {label}, {lt['connected']:,} clients at {lt['rate']:,.0f} events/s: "
         "SSE client / plain forwarder / XADD -> XREADGROUP",
         f"{_ms(sse, key)} / {_ms(plain, key)} / {_ms(anchor, key)}"]
        for key, label in LATENCY_KEYS
    ]  # fmt: skip
    busy, plain_busy = lt.get("sse_cpu_cores_busy"), lt.get("plain_cpu_cores_busy")
    if busy and plain_busy:  # what each side's latency cost the machine's shared cores
        latency.append(
            ["cores busy while sending, API process / load client / redis-server: "
             "SSE | plain forwarder",
             " / ".join(f"{busy[k]:.2f}" for k in ("server", "client", "redis")) + " | "
             + " / ".join(f"{plain_busy[k]:.2f}" for k in ("server", "client", "redis"))]
        )  # fmt: skip
    headline = [
        ["SSE connections held by one server process",
         f"{cn['established']:,} of {cn['target']:,}"],
        ["clients that got exactly their events", f"{cn['clients_exact']:,}"],
        ["server memory per connection (RSS all connected - before, / connections)",
         f"{cn['server_kib_per_connection']:.1f} KiB (target ≤ {KIB_PER_CONNECTION_TARGET:g} KiB)"],
        ["server's Redis connections: idle, most, after",
         f"{cn['server_redis_conns_before']}, {cn['server_redis_conns_max']}, "
         f"{cn['server_redis_conns_after']} (bound {POOL_BOUND})"],
        *latency,
    ]  # fmt: skip
    waves = cn["server_kib_per_connection_waves"] or [cn["server_kib_per_connection"]]
    bounds = [
        stats.summarise(
            "server_kib_per_connection",
            waves,
            what="server RSS (KiB) added per SSE connection, each tenth of the ramp to "
            f"{cn['target']:,}",
            unit="KiB",
            target=KIB_PER_CONNECTION_TARGET,
            at_most=True,
        ),
        *latency_bounds(lt),
    ]
    env = records.environment(summary["redis_version"], load_before)
    return records.build(
        "sse",
        env,
        parameters={k: options[k] for k in sorted(options)},
        rounds=rounds,
        orders=[["replay_xrange", "replay_sse"]] * len(rounds),
        ratios=[
            stats.ratio_summary(
                "replay_sse_vs_xrange",
                rounds,
                "replay_sse",
                "replay_xrange",
                what="one SSE client replaying / XRANGE in pages of 500",
                target=REPLAY_RATIO_TARGET,
            )
        ],  # fmt: skip
        bounds=bounds,
        rates=[
            stats.rate_summary(
                "replay_sse", rounds, what="SSE replay, Last-Event-ID 0 -> ready", unit="entries/s"
            ),
            stats.rate_summary(
                "replay_xrange", rounds, what=f"XRANGE COUNT {PAGE}", unit="entries/s"
            ),
        ],  # fmt: skip
        figures={"headline": headline, "summary": summary},
        notes=["the replay rounds run XRANGE then SSE in every round (not reversed)"],
    )


@click.command()
@click.option("--replay", default=10_000, show_default=True, help="(a) missed entries to replay")
@click.option("--repeat", default=5, show_default=True, help="(a) rounds; medians are shown")
@click.option(
    "--connections", default=10_000, show_default=True, help="(b) SSE connections to one process"
)
@click.option("--rounds", default=3, show_default=True, help="(b) rounds of events to everyone")
@click.option(
    "--concurrency", default=200, show_default=True, help="(b) handshakes in flight at once"
)
@click.option("--latency-clients", default=1000, show_default=True, help="(c) connected clients")
@click.option("--rate", default=5000.0, show_default=True, help="(c) events per second")
@click.option(
    "--duration", default=10.0, show_default=True, help="(c) seconds of events, per round and side"
)
@click.option(
    "--latency-rounds",
    default=6,
    show_default=True,
    help="(c) interleaved rounds of SSE, the plain forwarder and Redis (the six "
    "orders in turn); ratios per round",
)
@click.option("--warmup", default=1.0, show_default=True, help="(c) seconds not counted")
@click.option(
    "--timeout", default=60.0, show_default=True, help="seconds a connection may take to be ready"
)
@click.option(
    "--quick",
    is_flag=True,
    help="a small smoke run (1000 entries, 200 connections, 100 clients, 1000/s for 3 s)",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the JSON summary to this file",
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="where to write the record [bench/records/sse.json; none with --quick]",
)
def main(json_path: Path | None, record_path: Path | None, **options: Any) -> None:
    """SSE replay rate, connections per process and live latency vs raw Redis."""
    if options["quick"]:
        options.update(
            replay=min(options["replay"], 1000),
            repeat=1,
            connections=min(options["connections"], 200),
            rounds=min(options["rounds"], 2),
            latency_clients=min(options["latency_clients"], 100),
            rate=min(options["rate"], 1000.0),
            duration=min(options["duration"], 3.0),
            warmup=min(options["warmup"], 0.5),
            latency_rounds=1,
        )
    for name in (
        "replay",
        "repeat",
        "connections",
        "rounds",
        "latency_clients",
        "latency_rounds",
        "concurrency",
    ):
        if options[name] < 1:
            raise click.UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if options["rate"] <= 0 or options["duration"] <= options["warmup"]:
        raise click.UsageError("--rate must be positive and --duration longer than --warmup")
    load_before = records.load_average()
    summary = run(options)
    if record_path is None and not options["quick"]:
        record_path = records.RECORDS_DIR / "sse.json"
    if record_path is not None:
        records.write(record_of(summary, options, load_before), record_path)
    line = json.dumps(summary, sort_keys=True)
    if json_path is not None:
        json_path.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
