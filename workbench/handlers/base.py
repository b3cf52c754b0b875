"""The shape every SQL-backed handler shares: inbox and effect in one transaction."""

from __future__ import annotations

from sqlalchemy import Connection

from workbench.clock import Clock, SystemClock
from workbench.events import Event
from workbench.store import Store, claim_inbox


class SqlHandler:
    """Base for handlers whose effect lives in the SQL store.

    ``handle`` records each event id in ``inbox`` for this group and applies
    only the events not seen before, in the same transaction, so a redelivered
    or republished event has no second effect. Subclasses write ``apply``.
    """

    group: str = ""
    aggregate_types: tuple[str, ...] = ()

    def __init__(self, store: Store, clock: Clock | None = None) -> None:
        self.store = store
        self.clock = clock or SystemClock()

    def handle(self, events: list[Event]) -> None:
        if not events:
            return
        with self.store.begin() as conn:
            new = claim_inbox(conn, self.group, [e.event_id for e in events], self.clock.now())
            fresh: list[Event] = []
            for event in events:
                if event.event_id in new:
                    new.discard(event.event_id)  # a duplicate inside the batch counts once
                    fresh.append(event)
            if fresh:
                self.apply(conn, fresh)

    def apply(self, conn: Connection, events: list[Event]) -> None:
        raise NotImplementedError
