"""Design 2: Streams only: every phone session reads its user stream itself.

The log side is the project's (:mod:`simulations.designs.logged`): aggregate
stream, fan-out consumer group, per-user streams. The read side is the seed's
sentence taken literally: "the reconnect becomes ``XREAD STREAMS user:42
<id>``. Redis returns everything since that ID, then I switch the connection
back to the blocking ``XREAD BLOCK`` for new events."

Each session therefore holds its own Redis connection, always reads from the
last id it received (never ``$``, which would skip what arrives between two
calls), and on reconnect first pages through what it missed without
blocking (counted as replayed), then blocks. Redis connections = one per
connected phone; an idle phone costs one XREAD every ``block_ms``.
"""

from __future__ import annotations

import asyncio

from simulations.designs.base import Client, Inbox, RunContext, close_quietly, stop_task
from simulations.designs.logged import LoggedDesign


class _XreadSession(Client):
    """One phone on its own connection: replay with XREAD, then XREAD BLOCK."""

    def __init__(
        self, ctx: RunContext, inbox: Inbox, stream: str, *, block_ms: int, page_size: int
    ) -> None:
        super().__init__(ctx, inbox)
        self.stream = stream
        self.block_ms = block_ms
        self.page_size = page_size
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._conn = self.ctx.connect("client", single_connection_client=True)
        reconnect = self.inbox.connects > 0
        cursor = self.inbox.last_id or "0-0"  # Last-Event-ID, or the beginning
        while True:  # replay: pages after the cursor until a short one
            page = await self._read(cursor, block=None)
            for entry_id, fields in page:
                cursor = entry_id.decode()
                self.inbox.take(fields[b"data"], entry_id=cursor, replayed=reconnect)
            if len(page) < self.page_size:
                break
        self.inbox.connects += 1
        self._task = asyncio.create_task(self._live(cursor))

    async def _read(self, cursor: str, block: int | None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply = await self._conn.xread({self.stream: cursor}, count=self.page_size, block=block)
        return reply[0][1] if reply else []

    async def _live(self, cursor: str) -> None:
        while True:
            for entry_id, fields in await self._read(cursor, block=self.block_ms):
                cursor = entry_id.decode()
                self.inbox.take(fields[b"data"], entry_id=cursor)

    async def disconnect(self) -> None:
        if self._task is None:
            return
        await stop_task(self._task)
        self._task = None
        await close_quietly(self._conn.aclose)


class StreamsOnly(LoggedDesign):
    """Per-user streams; each phone session does its own XREAD BLOCK."""

    name = "streams_only"

    def __init__(self, *, block_ms: int = 1000, page_size: int = 500, **options: int) -> None:
        super().__init__(**options)
        self.block_ms = block_ms
        self.page_size = page_size

    def client(self, inbox: Inbox) -> Client:
        assert self.ctx is not None
        return _XreadSession(
            self.ctx,
            inbox,
            self.user_names.stream(inbox.user),
            block_ms=self.block_ms,
            page_size=self.page_size,
        )
