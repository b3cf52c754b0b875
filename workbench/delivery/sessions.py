"""One SSE session: subscribe live, replay from Last-Event-ID, then stay live.

The order is what makes the handoff gapless: the hub subscription exists
before the first XRANGE, so a message published during the replay waits in
the subscription's queue and :class:`~workbench.delivery.handoff.ReplaySession` skips it
if the replay already sent it. Messages on the wire:

* ``id: <user-stream id>``, ``event: <event type>``, ``data: <envelope JSON>``
  for each event;
* ``event: ready`` once replay is done (its ``id`` is the cursor, so even a
  client that received nothing can resume from the right place);
* ``event: reset`` when the requested position (or the session's cursor,
  checked with every page it reads) is no longer retained, was lost by Redis,
  or was never an entry of this user's stream: fetch the snapshot
  (``GET /users/{id}/escrows``) and reconnect with its ``as_of``. The stream
  ends after a reset;
* ``:`` comments as heartbeats: the hub queues one for every session at
  once (:meth:`~workbench.delivery.hub.Hub.heartbeat`, from one ticker per
  process), so an idle session costs no timer of its own.

Live messages are :class:`~workbench.delivery.wire.LiveEvent` objects, encoded
once by the live reader and shared by every session of the user: a session
passes the frame on, it does not encode it again.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from functools import partial

from sse_starlette import ServerSentEvent

from workbench.delivery.entries import UserEntry
from workbench.delivery.handoff import (
    HistoryLost,
    Live,
    ReplaySession,
    resume_point_known,
)
from workbench.delivery.hub import Hub, Subscription, SubscriptionClosed
from workbench.delivery.live import Resync
from workbench.delivery.userstreams import Page, UserStreamReader
from workbench.delivery.wire import HEARTBEAT, LiveEntry, LiveEvent, encode_page
from workbench.domain.streamid import StreamId

#: What :meth:`SseSession.messages` yields: pre-encoded bytes (replay pages,
#: heartbeats), a shared live event, or a rare control message (ready, reset, closing).
Message = bytes | LiveEvent | ServerSentEvent
#: Writes a frame to the connection now, without waiting; False if it cannot
#: (its buffer is full, the response is over): the frame was not written.
WriteNow = Callable[[bytes], bool]


@dataclass
class SessionStats:
    """Counters over all sessions of one server process (for /metrics)."""

    opened: int = 0
    resumed: int = 0
    replayed_entries: int = 0
    live_sent: int = 0
    #: Of ``live_sent``: written by the live reader at once, not through the queue.
    live_written_at_once: int = 0
    catch_ups: int = 0
    resets: int = 0


def page_chunk(entries: Sequence[UserEntry]) -> bytes:
    """A replayed page as one body chunk: one ASGI send and one socket write, not
    one per event (what dominates a replay's cost otherwise; bench/sse.py measures it).
    A :class:`Page` read from Redis writes its frames from the raw rows."""
    if isinstance(entries, Page):
        return entries.frames()
    return encode_page(list(entries))


class SseSession:
    """The message sequence for one connection of one user.

    One per SSE connection, so slotted: no instance dict for each of 10,000.
    """

    __slots__ = (
        "user_id",
        "requested",
        "reader",
        "hub",
        "stats",
        "page_size",
        "retry_ms",
        "_subscription",
        "_opening",
    )

    def __init__(
        self,
        user_id: str,
        requested: StreamId | None,
        reader: UserStreamReader,
        hub: Hub,
        stats: SessionStats,
        *,
        page_size: int = 500,
        retry_ms: int = 1000,
    ) -> None:
        self.user_id = user_id
        self.requested = requested
        self.reader = reader
        self.hub = hub
        self.stats = stats
        self.page_size = page_size
        self.retry_ms = retry_ms

    async def open(self) -> None:
        """Subscribe and read the first page, before any byte of the response.

        Redis errors raised here can still become an HTTP error (503) instead
        of a stream that dies after its headers.
        """
        self._subscription = self.hub.subscribe(self.user_id)
        self.stats.opened += 1
        try:
            self._opening: (
                tuple[ReplaySession, Sequence[UserEntry], bool] | HistoryLost | None
            ) = await self._start()
        except HistoryLost as lost:
            self._opening = lost
        except BaseException:
            self._subscription.close()
            raise

    def close(self) -> None:
        """Leave the hub. Idempotent; also run as the response's background task,
        because a generator the server never started has no ``finally`` to run."""
        self._subscription.close()

    @property
    def subscription(self) -> Subscription:
        """The session's hub subscription (after :meth:`open`)."""
        return self._subscription

    async def messages(self, write_now: WriteNow | None = None) -> AsyncIterator[Message]:
        """The whole message sequence; call :meth:`open` first.

        With ``write_now``, live entries that arrive while this sequence is
        waiting for one are written by the hub's publisher at once (see
        :meth:`_take_at_once`) instead of being yielded.
        """
        subscription, opening = self._subscription, self._opening
        self._opening = None  # the first page is not kept for the session's lifetime
        if opening is None:
            raise RuntimeError("messages() needs open() first, and runs once")
        try:
            if isinstance(opening, HistoryLost):
                yield self._reset(opening.reason)
                return
            session, page, more = opening
            try:
                if page:
                    yield page_chunk(page)
                async for chunk in self._pages(session, more):
                    yield chunk
            except HistoryLost as lost:
                yield self._reset(lost.reason)
                return
            yield ServerSentEvent(
                data=json.dumps({"cursor": str(session.cursor), "replayed": session.sent}),
                event="ready",
                id=str(session.cursor),
                retry=self.retry_ms,
            )
            async for message in self._live(subscription, session, write_now):
                yield message
        finally:
            subscription.close()

    async def _start(self) -> tuple[ReplaySession, Sequence[UserEntry], bool]:
        """The session and its first page; whether more pages may follow."""
        if self.requested is None:
            return ReplaySession(await self.reader.tail(self.user_id)), [], False
        self.stats.resumed += 1
        page, exists = await self.reader.first_page_and_exists(
            self.user_id, self.requested, self.page_size
        )
        if not resume_point_known(self.requested, page, exists):
            raise HistoryLost(
                f"{self.requested} is not a retained position in the stream of "
                f"{self.user_id!r} (trimmed, or never an entry of it)"
            )
        session = ReplaySession(self.requested)
        entries = session.take_page(page)
        self.stats.replayed_entries += len(entries)
        return session, entries, len(page) == self.page_size

    async def _pages(self, session: ReplaySession, more: bool) -> AsyncIterator[bytes]:
        """Page after page from the cursor until a short page: caught up."""
        while more:
            page, more = await self._page(session)
            if page:
                yield page_chunk(page)

    async def _page(self, session: ReplaySession) -> tuple[Sequence[UserEntry], bool]:
        # With the cursor's existence: an empty page after a lost cursor is a reset.
        page, exists = await self.reader.first_page_and_exists(
            self.user_id, session.cursor, self.page_size
        )
        entries = session.take_page(page, cursor_exists=exists)
        self.stats.replayed_entries += len(entries)
        return entries, len(page) == self.page_size

    async def _live(
        self, subscription: Subscription, session: ReplaySession, write_now: WriteNow | None
    ) -> AsyncIterator[Message]:
        if write_now is not None:
            subscription.sink = partial(self._take_at_once, session, write_now)
        try:
            async for message in self._live_messages(subscription, session):
                yield message
        finally:
            subscription.sink = None

    def _take_at_once(self, session: ReplaySession, write_now: WriteNow, message: object) -> bool:
        """The hub's sink: take a live entry now, while the reader waits for one.

        Only the plain case: the next entry (written now) or one the replay
        already sent (dropped). Anything else, or a connection that cannot take
        the bytes now (its buffer is full, it is gone), goes through the queue
        and :meth:`_live_messages`, which knows what to do. The entry is written
        before the cursor moves, so a refused write leaves the session as it was.
        """
        if not isinstance(message, UserEntry):
            return False
        decision = session.decide(message)
        if decision is Live.CATCH_UP:
            return False
        if decision is Live.SEND and not write_now(LiveEntry.of(message).sse.frame):
            return False
        session.take_live(message)
        if decision is Live.SEND:
            self.stats.live_sent += 1
            self.stats.live_written_at_once += 1
        return True

    async def _live_messages(
        self, subscription: Subscription, session: ReplaySession
    ) -> AsyncIterator[Message]:
        heartbeat = self.hub.heartbeat_message
        while True:
            try:
                message = await subscription.get()
            except SubscriptionClosed as closed:
                # Say why before closing ("slow consumer: ...", "dropped by the
                # server"); the client resumes from its Last-Event-ID.
                yield ServerSentEvent(comment=f"closing: {closed.reason}")
                return
            if message is heartbeat:
                yield HEARTBEAT
                continue
            if isinstance(message, UserEntry):
                decision = session.take_live(message)
                if decision is Live.SEND:
                    self.stats.live_sent += 1
                    # The frame every session of this user shares (encoded here only
                    # for an entry published by hand, not by the live reader).
                    yield LiveEntry.of(message).sse
                    continue
                if decision is Live.SKIP:
                    continue
            elif not isinstance(message, Resync):
                continue
            # A gap in the live feed, or the feed itself reconnected: read the stream.
            self.stats.catch_ups += 1
            try:
                async for chunk in self._pages(session, True):
                    yield chunk
            except HistoryLost as lost:
                yield self._reset(lost.reason)
                return

    def _reset(self, reason: str) -> ServerSentEvent:
        self.stats.resets += 1
        return ServerSentEvent(
            data=json.dumps(
                {
                    "reason": reason,
                    "snapshot": f"/users/{self.user_id}/escrows",
                    "action": "fetch the snapshot, then reconnect with last_event_id=as_of",
                }
            ),
            event="reset",
        )
