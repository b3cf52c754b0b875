"""The dispute timeline: what happened to a disputed escrow, in order.

It records every ``dispute.*`` event and the money movement that settles a
dispute (release or refund with reason ``dispute``), keyed by the escrow's
sequence number, so the timeline reads in order whatever the delivery order.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select

from workbench.domain.events import Event
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

    table = dispute_timeline

    def rows(self, event: Event) -> list[dict[str, Any]]:
        if not on_timeline(event):
            return []
        return [
            {
                "escrow_id": event.escrow_id,
                "sequence": event.sequence,
                "event_id": event.event_id,
                "type": event.type,
                "at": event.occurred_at,
                "detail": json.dumps(event.payload, sort_keys=True),
            }
        ]


def timeline(store: Store, escrow_id: str) -> list[dict[str, object]]:
    t = dispute_timeline.c
    with store.read() as conn:
        rows = conn.execute(
            select(t.sequence, t.type, t.at, t.detail)
            .where(t.escrow_id == escrow_id)
            .order_by(t.sequence)
        ).all()
    return [
        {"sequence": r.sequence, "type": r.type, "at": r.at, "detail": json.loads(r.detail)}
        for r in rows
    ]
