"""The dispute timeline: what happened to a disputed escrow, in order.

It records every ``dispute.*`` event and the money movement that settles a
dispute (release or refund with reason ``dispute``), keyed by the escrow's
sequence number, so the timeline reads in order whatever the delivery order.
"""

from __future__ import annotations

import json

from sqlalchemy import Connection, insert, select

from workbench.events import Event
from workbench.handlers.base import SqlHandler
from workbench.store import Store, dispute_timeline


def on_timeline(event: Event) -> bool:
    if event.type.startswith("dispute."):
        return True
    return event.type in ("escrow.released", "escrow.refunded") and (
        event.payload.get("reason") == "dispute"
    )


class DisputeTimelineHandler(SqlHandler):
    group = "disputes"
    aggregate_types = ("escrow", "dispute")

    def apply(self, conn: Connection, events: list[Event]) -> None:
        rows = [
            {
                "escrow_id": e.escrow_id,
                "sequence": e.sequence,
                "event_id": e.event_id,
                "type": e.type,
                "at": e.occurred_at,
                "detail": json.dumps(e.payload, sort_keys=True),
            }
            for e in events
            if on_timeline(e)
        ]
        if rows:
            conn.execute(insert(dispute_timeline), rows)


def timeline(store: Store, escrow_id: str) -> list[dict[str, object]]:
    t = dispute_timeline.c
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(t.sequence, t.type, t.at, t.detail)
            .where(t.escrow_id == escrow_id)
            .order_by(t.sequence)
        ).all()
    return [
        {"sequence": r.sequence, "type": r.type, "at": r.at, "detail": json.loads(r.detail)}
        for r in rows
    ]
