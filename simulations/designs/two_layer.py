"""Design 3: Streams + local Pub/Sub, the project's two-layer design.

The log side is the same as design 2 (:mod:`simulations.designs.logged`). The
read side is what one API server process runs, with the project's code:

* one :class:`~workbench.delivery.live.LiveReader`: ONE subscription to the live
  channel, feeding an in-process :class:`~workbench.delivery.hub.Hub` by user;
* one :class:`~workbench.delivery.userstreams.UserStreamReader` on a bounded
  connection pool (``pool_size``; the API's default is 16) for replays;
* per phone, a :class:`~workbench.delivery.sessions.SseSession`: subscribe to the hub,
  replay the user stream after Last-Event-ID, send ``ready``, then go live,
  with the ``prev`` chain catching any gap. The phone here consumes the
  session's messages directly instead of over HTTP; it keeps the id of every
  message that has one, as EventSource does, and sends it on reconnect.

Redis connections for all phones of the process: 1 + at most ``pool_size``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from simulations.designs.base import Client, Inbox, RunContext, close_quietly, stop_task
from simulations.designs.logged import LoggedDesign
from workbench.delivery.hub import Hub
from workbench.delivery.live import LiveReader
from workbench.delivery.sessions import Message, SessionStats, SseSession
from workbench.delivery.userstreams import UserStreamReader
from workbench.domain.streamid import ZERO, parse


def sse_frames(chunk: bytes) -> list[tuple[str | None, str | None, str]]:
    """``(id, event, data)`` of each message in an encoded SSE chunk (a replay page)."""
    frames = []
    for block in chunk.decode().replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, sep, value = line.partition(": ")
            if sep and name in ("id", "event", "data"):
                fields[name] = value
        if "data" in fields:
            frames.append((fields.get("id"), fields.get("event"), fields["data"]))
    return frames


class _SsePhone(Client):
    """A phone reading one :class:`SseSession`'s messages; Last-Event-ID on reconnect."""

    def __init__(self, ctx: RunContext, inbox: Inbox, design: StreamsPlusLocalPubSub) -> None:
        super().__init__(ctx, inbox)
        self.design = design
        self._task: asyncio.Task[None] | None = None
        self._messages: AsyncIterator[Message] | None = None

    async def connect(self) -> None:
        requested = parse(self.inbox.last_id) if self.inbox.last_id else ZERO
        d = self.design
        session = SseSession(
            self.inbox.user, requested, d.reader, d.hub, d.stats, page_size=d.page_size
        )
        await session.open()
        self._session = session
        self._messages = session.messages()
        ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._consume(self._messages, ready))
        await ready  # replayed, live from now on (or the task failed)
        self.inbox.connects += 1

    async def _consume(self, messages: AsyncIterator[Message], ready: asyncio.Future[None]) -> None:
        reconnect = self.inbox.connects > 0
        replaying = True
        try:
            async for message in messages:
                if isinstance(message, bytes):  # a page: replay, or a catch-up when live
                    for entry_id, _, data in sse_frames(message):
                        self.inbox.take(data, entry_id=entry_id, replayed=replaying and reconnect)
                elif message.event == "ready":
                    self.inbox.last_id = message.id
                    replaying = False
                    ready.set_result(None)
                elif message.event == "reset":
                    self.inbox.resets += 1  # history lost: the phone would resync
                    if not ready.done():
                        ready.set_result(None)
                    return
                elif message.data is not None:
                    self.inbox.take(message.data, entry_id=message.id)
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise

    async def disconnect(self) -> None:
        if self._task is None:
            return
        # Closing the hub subscription first also ends a consumer that is
        # waiting for a live message, cancelled or not.
        self._session.close()
        await stop_task(self._task)
        self._task = None
        await close_quietly(self._messages.aclose)  # type: ignore[union-attr]


class StreamsPlusLocalPubSub(LoggedDesign):
    """Per-user streams + one live subscription per process + in-process hub + SseSession."""

    name = "streams_plus_local_pubsub"

    def __init__(self, *, pool_size: int = 4, page_size: int = 500, **options: int) -> None:
        super().__init__(**options)
        self.pool_size = pool_size
        self.page_size = page_size

    async def start(self, ctx: RunContext) -> None:
        await super().start(ctx)
        self.hub = Hub()
        self.stats = SessionStats()
        self._pool_client = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                ctx.url, max_connections=self.pool_size, timeout=10, client_name=ctx.name("pool")
            ),
            socket_timeout=5.0,
        )
        self.reader = UserStreamReader(self._pool_client, self.user_names)
        self.live = LiveReader(ctx.url_for("live"), self.hub, self.user_names)
        self._live_task = asyncio.create_task(self.live.run())
        await self.live.connected.wait()

    def client(self, inbox: Inbox) -> Client:
        assert self.ctx is not None
        return _SsePhone(self.ctx, inbox, self)

    def extra(self) -> dict[str, float]:
        return {
            **super().extra(),
            "client_connection_bound": float(1 + self.pool_size),
            "catch_ups": float(self.stats.catch_ups),
            "live_reconnects": float(self.live.reconnects),
        }

    async def stop(self) -> None:
        self.hub.close_all("run over")
        await stop_task(self._live_task)
        # A Redis built on a pool we passed does not close that pool by itself.
        await close_quietly(lambda: self._pool_client.aclose(close_connection_pool=True))
        await super().stop()
