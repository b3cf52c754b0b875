"""The plain anchor of live delivery: Redis Pub/Sub -> a plain asyncio forwarder -> TCP.

``bench/sse.py`` judges the live latency of ``workbench serve`` (fan-out
script -> live reader -> hub -> SSE session -> phone) against Redis' own
``XADD -> XREADGROUP``. That anchor has no fan-out, no HTTP and no per-user
routing, so it says how far the runtime is from Redis, not from what plain
code of the same shape could do. This module is that plain code, the best we
know how to write for the same job on the same machine: one process

* subscribes to the live channel with a hand-written ``SUBSCRIBE`` on a raw
  socket and parses the replies with hiredis' reader (no redis-py);
* answers every ``GET /users/<id>/events`` with a bare HTTP/1.1 200 head (no
  chunking, no auth, no ASGI), an ``event: ready`` frame, and keeps the socket;
* for each message, decodes the live envelope (the JSON array the fan-out
  publishes), formats one SSE frame (``id``, ``event``, ``data``) and writes it
  to every socket of that user.

Same producer (the real fan-out script), same clients, same rate, same
envelopes: what it adds over ``XADD -> XREADGROUP`` is what Pub/Sub, a JSON
decode, routing and a TCP write cost at this load; ``sse/plain`` is then what
the runtime's delivery adds on top of plain code. uvloop if installed, as the
server. Run as a spawned process by :func:`start`; it reports its port, then
serves until killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import sys
from typing import Any
from urllib.parse import urlparse

import hiredis

__all__ = ["PlainForwarder", "start"]

_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-store\r\n"
    b"connection: close\r\n\r\nevent: ready\r\ndata: {}\r\n\r\n"
)


class _Phone(asyncio.Protocol):
    """One client: read its request head, then it only receives."""

    def __init__(self, sockets: dict[str, list[asyncio.Transport]]) -> None:
        self.sockets = sockets
        self.head = b""
        self.user: str | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.user is not None:
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        assert self.transport is not None
        path = self.head.split(b" ", 2)[1].decode()  # /users/<id>/events
        self.user = path.split("/")[2]
        self.sockets.setdefault(self.user, []).append(self.transport)
        self.transport.write(_HEAD)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.user is not None and self.transport is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sockets[self.user].remove(self.transport)


class _Feed(asyncio.Protocol):
    """The subscription: hiredis parses, each message goes to its user's sockets."""

    def __init__(self, sockets: dict[str, list[asyncio.Transport]], subscribed: Any) -> None:
        self.sockets = sockets
        self.subscribed = subscribed
        self.reader = hiredis.Reader()
        self.messages = 0

    def data_received(self, data: bytes) -> None:
        try:
            self._forward(data)
        except Exception as exc:  # noqa: BLE001 - an anchor that guesses is worse than none
            _die(f"plain forwarder: {exc!r}")

    def _forward(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, Exception):
                raise reply  # an error reply (a refused AUTH, a wrong database)
            if not isinstance(reply, list):
                continue  # +OK of AUTH or SELECT
            if reply[0] == b"message":
                user, entry_id, _prev, _event_id, type_, payload = json.loads(reply[2])
                frame = f"id: {entry_id}\r\nevent: {type_}\r\ndata: {payload}\r\n\r\n".encode()
                for transport in self.sockets.get(user, ()):
                    transport.write(frame)
                self.messages += 1
            elif reply[0] == b"subscribe":
                self.subscribed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        _die(f"plain forwarder: Redis closed the subscription ({exc!r})")


def _die(reason: str) -> None:
    """End the process at once: the bench sees it dead and fails the run."""
    print(reason, file=sys.stderr, flush=True)
    os._exit(1)


def _command(*args: str | bytes) -> bytes:
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)


class PlainForwarder:
    """Serve on ``127.0.0.1:<any port>`` what ``channel`` on ``redis_url`` publishes."""

    def __init__(self, redis_url: str, channel: str) -> None:
        self.redis_url, self.channel = redis_url, channel
        self.sockets: dict[str, list[asyncio.Transport]] = {}

    async def run(self, report: Any) -> None:
        loop = asyncio.get_running_loop()
        url = urlparse(self.redis_url)
        subscribed = loop.create_future()
        feed_transport, _ = await loop.create_connection(
            lambda: _Feed(self.sockets, subscribed), url.hostname or "127.0.0.1", url.port or 6379
        )
        if url.password:
            feed_transport.write(_command("AUTH", url.username or "default", url.password))
        if url.path.strip("/") not in ("", "0"):
            feed_transport.write(_command("SELECT", url.path.strip("/")))
        feed_transport.write(_command("SUBSCRIBE", self.channel))
        await subscribed
        server = await loop.create_server(
            lambda: _Phone(self.sockets), "127.0.0.1", 0, backlog=4096
        )
        report.put(server.sockets[0].getsockname()[1])
        await server.serve_forever()


def _main(redis_url: str, channel: str, report: Any) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(PlainForwarder(redis_url, channel).run(report))
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        asyncio.run(PlainForwarder(redis_url, channel).run(report))


def start(redis_url: str, channel: str, timeout: float = 60) -> tuple[Any, int]:
    """Spawn the forwarder; return (process, port) once it is subscribed and listening."""
    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    process = ctx.Process(target=_main, args=(redis_url, channel, report), daemon=True)
    process.start()
    try:
        port = report.get(True, timeout)
    except Exception:
        process.kill()
        raise
    return process, int(port)
