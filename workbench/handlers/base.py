"""The shape every SQL-backed handler shares: inbox and effect in one transaction.

Also the row shape of ``notifications``, shared by the two groups that write
it (texts and pushes differ only in channel and body): :func:`notification_rows`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Table

from workbench.domain.clock import Clock, SystemClock
from workbench.domain.events import Event
from workbench.store import Store, claim_inbox, insert_many


class SqlHandler:
    """Base for handlers whose effect is rows in one SQL table.

    Subclasses name the ``table`` and say which rows an event makes
    (``rows(event)``: pure, testable on its own). ``handle`` builds all rows
    first, then, in one transaction, records each event id in ``inbox`` for
    this group and inserts the rows of the events not seen before: a
    redelivered or republished event has no second effect. Building rows
    before the transaction keeps SQLite's write lock short, which matters when
    several worker processes share the file.
    """

    group: str = ""
    aggregate_types: tuple[str, ...] = ()
    table: Table

    def __init__(self, store: Store, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    def rows(self, event: Event) -> list[dict[str, Any]]:
        raise NotImplementedError

    def handle(self, events: list[Event]) -> None:
        if not events:
            return
        planned = [(event.event_id, self.rows(event)) for event in events]
        with self.store.begin() as conn:
            new = claim_inbox(
                conn, self.group, [event_id for event_id, _ in planned], self.clock.now()
            )
            rows: list[dict[str, Any]] = []
            for event_id, event_rows in planned:
                if event_id in new:
                    new.discard(event_id)  # a duplicate inside the batch counts once
                    rows.extend(event_rows)
            insert_many(conn, self.table, rows)


def notification_rows(
    event: Event, channel: str, messages: Iterable[tuple[str, str]]
) -> list[dict[str, Any]]:
    """The ``notifications`` rows of ``event`` on ``channel``: one per (user id, body)."""
    return [
        {
            "event_id": event.event_id,
            "user_id": user,
            "channel": channel,
            "body": body,
            "at": event.occurred_at,
        }
        for user, body in messages
    ]
