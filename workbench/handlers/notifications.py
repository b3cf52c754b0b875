"""SMS notifications: one text per event for each party it concerns.

Texts are stored in ``notifications`` (channel ``sms``); sending them is an
SMS gateway's job, out of scope here. The inbox makes each text exactly-once
per event and user even when the event is delivered several times.
"""

from __future__ import annotations

from typing import Any

from workbench.domain.events import Event
from workbench.handlers.base import SqlHandler, notification_rows
from workbench.store import notifications

# event type -> (text to the buyer, text to the seller); None: no text.
_TEXTS: dict[str, tuple[str | None, str | None]] = {
    "escrow.created": (
        "Escrow {ref} for KES {amount} created. Pay to fund it.",
        "A buyer opened escrow {ref} for KES {amount}. Wait for funding before shipping.",
    ),
    "payment.requested": ("Enter your M-Pesa PIN to pay KES {amount} for {ref}.", None),
    "payment.failed": ("Payment for {ref} failed: {result_desc}. You can try again.", None),
    "escrow.funded": (
        "KES {amount} is held safely for {ref}.",
        "Escrow {ref} is funded with KES {amount}. You can ship now.",
    ),
    "escrow.shipped": ("Your order {ref} has shipped. Confirm when it arrives.", None),
    "escrow.released": (
        "Escrow {ref} completed. Thank you.",
        "KES {seller_amount} for {ref} is on its way to you.",
    ),
    "escrow.refunded": (
        "KES {amount} for {ref} is being refunded to you.",
        "Escrow {ref} was refunded to the buyer.",
    ),
    "payment.refunded": ("A payment of KES {amount} for {ref} is refunded to you.", None),
    "escrow.cancelled": ("Escrow {ref} was cancelled.", "Escrow {ref} was cancelled."),
    "escrow.expired": ("Escrow {ref} expired: {reason}.", "Escrow {ref} expired: {reason}."),
    "dispute.opened": (
        "A dispute is open on {ref}. We will review it.",
        "A dispute is open on {ref}. We will review it.",
    ),
    "dispute.resolved": (
        "The dispute on {ref} is resolved: {outcome}.",
        "The dispute on {ref} is resolved: {outcome}.",
    ),
}


class _Fields(dict):  # type: ignore[type-arg]
    def __missing__(self, key: str) -> str:
        return "-"


def sms_texts(event: Event) -> list[tuple[str, str]]:
    """(user id, text) for each party this event should text."""
    templates = _TEXTS.get(event.type)
    if templates is None:
        return []
    fields = _Fields(event.payload)
    fields["ref"] = event.escrow_id[-8:].upper()
    out = []
    for user_id, template in zip(event.user_ids[:2], templates, strict=True):
        if template is not None:
            out.append((user_id, template.format_map(fields)))
    return out


class NotificationHandler(SqlHandler):
    group = "notifications"
    aggregate_types = ("escrow", "payment", "dispute")

    table = notifications

    def rows(self, event: Event) -> list[dict[str, Any]]:
        return notification_rows(event, "sms", sms_texts(event))
