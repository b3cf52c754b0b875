"""The SSE response: one session streamed by the request's own task.

``sse_starlette.EventSourceResponse`` runs four tasks per connection in an
anyio task group (the stream, a ping timer, a disconnect listener, a shutdown
listener), each with its cancel scope, and a lock and a timeout scope per
write. At 10,000 connections that is most of a process's memory per
connection, and most of its CPU per live message. This response keeps what a
connection must have and shares the rest:

* the session's messages are written by the task uvicorn already runs for the
  request, each as the bytes it arrives as (live frames are encoded once per
  message by the live reader, replay pages once per page);
* except the common live case: while that task waits for a message, the next
  live entry is written by the live reader itself as it publishes it to the
  hub (the session's ``write_now``, from the protocol's chunk writer
  :data:`~workbench.http.edge.WRITE_CHUNK`), with no task switch and no trip
  through the ASGI ``send`` chain; a connection that cannot take it at once
  (its buffer is full) gets it the ordinary way, through the queue;
* the client leaving closes the session's subscription, so the writer stops
  after its next write, or at once if it was waiting: the server's protocol
  (:class:`~workbench.http.edge.GuardedHttpToolsProtocol`) calls the hook
  this response leaves in the scope. Under another protocol, which says so
  only to a pending ``receive``, one small task per connection waits there;
* heartbeats come from one ticker per process (:class:`Ticker`), through the
  hub, which also closes a session that never took its last heartbeat: its
  client stopped reading, its write is blocked, and closing it cancels that
  write (``Subscription.on_close``), as a per-write timeout would have;
* server shutdown closes every session from the same ticker, so uvicorn's
  graceful shutdown is not held open by streams that never end.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from workbench.delivery.hub import Hub
from workbench.delivery.sessions import SseSession, WriteNow
from workbench.http import edge

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]


class SseResponse(Response):
    """An ASGI response that streams ``session`` (opened) until it ends or the client leaves.

    A :class:`~starlette.responses.Response` only so that FastAPI passes it
    through as the route's answer; none of its body machinery is used.
    """

    media_type = "text/event-stream"

    def __init__(self, session: SseSession, background: BackgroundTask | None = None) -> None:
        self.session = session
        self.background = background
        self.status_code = 200
        self.raw_headers = list(_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        session = self.session
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            if scope.get("method") == "HEAD":  # headers only; a stream would never end
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            task = asyncio.current_task()
            assert task is not None
            watcher = None
            if scope.get(edge.DISCONNECT_HOOKED):
                scope[edge.DISCONNECT_HOOK] = self._client_left
            else:
                watcher = asyncio.get_running_loop().create_task(_watch(receive, session))
            try:
                await _stream(session, send, task, scope.get(edge.WRITE_CHUNK))
            finally:
                scope.pop(edge.DISCONNECT_HOOK, None)
                if watcher is not None:
                    watcher.cancel()
        finally:
            session.close()
            if self.background is not None:
                await self.background()

    def _client_left(self) -> None:
        self.session.subscription.close("client disconnected")


async def _stream(
    session: SseSession, send: Send, task: asyncio.Task[Any], write_now: WriteNow | None
) -> None:
    subscription = session.subscription
    messages = session.messages(write_now)
    cancelled = False

    def cancel_write() -> None:
        nonlocal cancelled
        cancelled = True
        task.cancel()

    body: dict[str, Any] = {"type": "http.response.body", "body": b"", "more_body": True}
    try:
        async for message in messages:
            body["body"] = message if isinstance(message, bytes) else message.encode()
            if subscription.closed_reason is not None:
                # The client left, or the server closed it: the closing comment
                # (the last message) is still worth a try; nothing after it.
                await send(body)
                break
            # A write blocks while the client does not read; whoever closes the
            # subscription meanwhile (slow consumer, stalled, shutdown) ends it.
            subscription.on_close = cancel_write
            try:
                await send(body)
            finally:
                subscription.on_close = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if cancelled and task.uncancel() == 0:
            return  # our own cancel: the write was abandoned, the response ends here
        raise
    finally:
        await messages.aclose()


async def _watch(receive: Receive, session: SseSession) -> None:
    """Wait for ``http.disconnect`` and close the session (its writer then stops)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            session.subscription.close("client disconnected")
            return


def _server_exiting() -> bool:
    """Whether uvicorn was told to stop (SIGTERM/SIGINT): its handler's server says so."""
    from sse_starlette.sse import AppStatus  # patched onto uvicorn's handle_exit

    if AppStatus.should_exit:
        return True
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    return bool(getattr(server, "should_exit", False))


#: How often the ticker wakes: the grain of the heartbeat's spread, and how
#: soon a shutdown closes the sessions.
TICK_S = 0.1


def heartbeat_shares(ping_s: float, tick_s: float = TICK_S) -> int:
    """Into how many shares to deal the subscribers: one share beaten per tick."""
    return max(1, round(ping_s / tick_s)) if ping_s > 0 else 1


def beat_is_due(now: float, beat_at: float, tick_s: float) -> bool:
    """Whether a wake-up at ``now`` beats the share due at ``beat_at``.

    Half a tick early is on time: uvloop's timers keep whole milliseconds, and
    a wake-up a hair before the beat would skip it to the next tick, so the
    heartbeats would come late.
    """
    return now >= beat_at - tick_s / 2


class Ticker:
    """One task per process: heartbeats for every session, and shutdown.

    Every ``ping_s`` each subscriber of the hub gets a heartbeat
    (:meth:`Hub.heartbeat`), one of the hub's ``heartbeat_shares`` shares
    after another, evenly over the interval, so the writes are spread instead
    of landing in one burst (build the hub with :func:`heartbeat_shares`).
    The ticker wakes every ``check_s``, and also looks whether the server is
    shutting down; if so it closes every session so their responses end.
    ``beats`` counts whole intervals (every share beaten once).
    """

    def __init__(self, hub: Hub, ping_s: float, *, check_s: float = TICK_S) -> None:
        self.hub = hub
        self.ping_s = ping_s
        self.check_s = min(check_s, ping_s / hub.heartbeat_shares) if ping_s > 0 else check_s
        self.beats = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        shares = self.hub.heartbeat_shares
        every = self.ping_s / shares
        next_beat = loop.time() + every
        share = 0
        closed = False
        while True:
            await asyncio.sleep(self.check_s)
            if not closed and _server_exiting():
                closed = True
                self.hub.close_all("server shutting down")
            if self.ping_s <= 0:
                continue
            if beat_is_due(loop.time(), next_beat, self.check_s):
                # One share per wake-up, the next one counted from now: after a
                # late wake-up (a blocked loop) catching up would beat a share
                # again before its readers could take the last beat (stalled!).
                next_beat = loop.time() + every
                self.hub.heartbeat(share)
                share = (share + 1) % shares
                if share == 0:
                    self.beats += 1


with contextlib.suppress(ImportError):  # the patch of uvicorn's handle_exit, made on import
    import sse_starlette.sse  # noqa: F401

__all__ = ["SseResponse", "Ticker", "beat_is_due", "heartbeat_shares"]
