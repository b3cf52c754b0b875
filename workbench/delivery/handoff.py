"""The replay-then-live handoff of one SSE session, as a pure state machine.

Every entry of a user stream records ``prev``, the id of the entry before it
at the time it was appended (``0-0`` for the first). That makes gaps visible
without asking Redis anything else:

* a page read with ``XRANGE (cursor +`` is gapless exactly when its first
  entry's ``prev`` is the cursor; otherwise entries after the cursor were
  trimmed (or lost: see below) and the session must tell the client ``reset``;
* an *empty* page proves nothing by itself: the cursor may be an entry Redis
  lost (a restart from an AOF that lacked the last writes, a FLUSHALL). So
  every page is read together with whether the cursor is still an entry, and
  an empty page after a cursor that is gone is ``reset`` too, never "caught
  up". (A re-appended or new entry never names a lost entry as ``prev``: prev
  is read from the stream when the entry is appended.)
* a live message whose ``prev`` is the cursor is the next entry: send it. One
  at or before the cursor was already sent by the replay: skip it. One whose
  ``prev`` is past the cursor means something was missed (the live reader lost
  Redis, or the message raced the replay): catch up from the stream.

The session subscribes to live messages *before* it replays, so nothing falls
between the two; this class decides what each entry means. The Redis and
HTTP loops around it live in :mod:`workbench.delivery.sessions`.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from workbench.delivery.entries import UserEntry
from workbench.domain.streamid import ZERO, StreamId


class HistoryLost(Exception):
    """Entries after the cursor are gone (trimmed), or the cursor was never an entry."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Live(enum.Enum):
    SEND = "send"
    SKIP = "skip"
    CATCH_UP = "catch_up"


class ReplaySession:
    """The position of one client in its user stream: ``cursor`` = last id it has."""

    def __init__(self, cursor: StreamId) -> None:
        self.cursor = cursor
        self.sent = 0
        self.skipped = 0

    def take_page(
        self, page: Sequence[UserEntry], *, cursor_exists: bool = True
    ) -> Sequence[UserEntry]:
        """Accept a page read strictly after the cursor; return it, advance the cursor.

        Raise :class:`HistoryLost` if the page does not start right after the
        cursor, or if it is empty and the cursor (read with the page) is no
        longer an entry. A caller that did not read ``cursor_exists`` must
        interpret an empty page itself (see :func:`resume_point_known`).
        """
        if not page:
            if not cursor_exists and self.cursor != ZERO:
                raise HistoryLost(
                    f"{self.cursor} is no longer an entry of the stream (Redis lost it) "
                    "and nothing follows it"
                )
            return []
        if page[0].prev != self.cursor:
            raise HistoryLost(
                f"entries after {self.cursor} are no longer retained "
                f"(oldest following entry {page[0].id} follows {page[0].prev})"
            )
        self.cursor = page[-1].id
        self.sent += len(page)
        return page

    def decide(self, entry: UserEntry) -> Live:
        """What :meth:`take_live` would decide for ``entry``, changing nothing."""
        if entry.id <= self.cursor:
            return Live.SKIP
        if entry.prev == self.cursor:
            return Live.SEND
        return Live.CATCH_UP

    def take_live(self, entry: UserEntry) -> Live:
        """Decide what to do with a live message; on SEND the cursor moves to it."""
        decision = self.decide(entry)
        if decision is Live.SEND:
            self.cursor = entry.id
            self.sent += 1
        elif decision is Live.SKIP:
            self.skipped += 1
        return decision


def resume_point_known(
    requested: StreamId, first_page: Sequence[UserEntry], requested_exists: bool
) -> bool:
    """Is ``requested`` a position we can resume from without a gap?

    Yes if the entry after it still names it as ``prev`` (even if the entry
    itself has since been trimmed), or if nothing follows it and it is an entry
    of the stream (the client is at the tail). ``0-0`` is "before the first
    entry": known while the first entry ever appended is still retained.
    """
    if first_page:
        return first_page[0].prev == requested
    return requested_exists or requested == ZERO
