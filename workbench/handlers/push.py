"""Mobile push: a payload per event for each party's devices.

Payloads (channel ``push``) carry what the app needs to refresh: escrow id,
event type and the escrow's sequence number, so a stale push is ignorable.
"""

from __future__ import annotations

from typing import Any

import msgspec

from workbench.domain.events import Event
from workbench.handlers.base import SqlHandler, notification_rows
from workbench.store import notifications

_encode_sorted = msgspec.json.Encoder(order="sorted").encode

_TITLES = {
    "escrow.created": "New escrow",
    "escrow.funded": "Escrow funded",
    "escrow.shipped": "Order shipped",
    "escrow.released": "Funds released",
    "escrow.refunded": "Refund",
    "escrow.cancelled": "Escrow cancelled",
    "escrow.expired": "Escrow expired",
    "payment.failed": "Payment failed",
    "payment.refunded": "Payment refunded",
    "dispute.opened": "Dispute opened",
    "dispute.resolved": "Dispute resolved",
}


def push_payloads(event: Event) -> list[tuple[str, dict[str, object]]]:
    """(user id, payload) for each party of this event; none for an event without a title."""
    title = _TITLES.get(event.type)
    if title is None:
        return []
    data = {"escrow_id": event.escrow_id, "type": event.type, "sequence": event.sequence}
    return [
        (user, {"title": title, "body": f"Escrow {event.escrow_id[-8:].upper()}", "data": data})
        for user in event.user_ids
    ]


class PushHandler(SqlHandler):
    group = "push"
    aggregate_types = ("escrow", "payment", "dispute")

    table = notifications

    def rows(self, event: Event) -> list[dict[str, Any]]:
        bodies = ((user, _encode_sorted(p).decode()) for user, p in push_payloads(event))
        return notification_rows(event, "push", bodies)
