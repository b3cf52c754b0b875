"""The event envelope and its wire encoding.

Every state change of an escrow is an :class:`Event`. The producer sets a
unique ``event_id``; consumers dedupe on it, because delivery is at-least-once
and a relay that crashes between XADD and marking its outbox row publishes an
event twice. One stream per aggregate type carries the events.

On the wire a stream entry has three fields: ``event_id`` and ``type`` in clear
(so ``XRANGE`` is readable and Lua scripts can dedupe without decoding) and
``data``, the whole envelope as compact JSON (msgspec).
"""

from __future__ import annotations

from typing import Any

import msgspec

SCHEMA_VERSION = 1

# Event type -> the aggregate type (and so the stream) that carries it.
EVENT_TYPES: dict[str, str] = {
    "escrow.created": "escrow",
    "escrow.funded": "escrow",
    "escrow.shipped": "escrow",
    "escrow.confirmed": "escrow",
    "escrow.released": "escrow",
    "escrow.refunded": "escrow",
    "escrow.cancelled": "escrow",
    "escrow.expired": "escrow",
    "payment.requested": "payment",
    "payment.received": "payment",
    "payment.failed": "payment",
    "payment.refunded": "payment",
    "payout.sent": "payout",
    "payout.refunded": "payout",
    "dispute.opened": "dispute",
    "dispute.resolved": "dispute",
}

AGGREGATE_TYPES: tuple[str, ...] = ("escrow", "payment", "payout", "dispute")


class EventDecodeError(ValueError):
    """A stream entry is not a valid event; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class UnknownEventType(EventDecodeError):
    """The entry decodes but names an event type this code does not know."""


class Event(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """One domain event.

    ``aggregate_id`` is the escrow id for every aggregate type: a payment, a
    payout and a dispute each belong to exactly one escrow. ``sequence`` is the
    escrow's version after this event (1 for ``escrow.created``), so the events
    of one escrow are totally ordered across streams.
    """

    event_id: str
    type: str
    aggregate_type: str
    aggregate_id: str
    sequence: int
    user_ids: tuple[str, ...]
    occurred_at: float
    correlation_id: str
    causation_id: str | None = None
    schema_version: int = SCHEMA_VERSION
    payload: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def escrow_id(self) -> str:
        return self.aggregate_id


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def decode(data: bytes | str) -> Event:
    """Decode and validate one envelope; raise :class:`EventDecodeError` if bad."""
    try:
        event = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise EventDecodeError(f"malformed event: {exc}") from None
    expected = EVENT_TYPES.get(event.type)
    if expected is None:
        raise UnknownEventType(f"unknown event type {event.type!r}")
    if event.aggregate_type != expected:
        raise EventDecodeError(
            f"event type {event.type!r} belongs to {expected!r}, "
            f"not aggregate type {event.aggregate_type!r}"
        )
    if event.schema_version > SCHEMA_VERSION:
        raise EventDecodeError(
            f"schema version {event.schema_version} is newer than {SCHEMA_VERSION}"
        )
    return event


def to_fields(event: Event) -> dict[str, bytes | str]:
    """The stream entry fields for ``event``."""
    return {"event_id": event.event_id, "type": event.type, "data": encode(event)}


def from_fields(fields: dict[bytes, bytes] | dict[str, Any] | list[Any] | None) -> Event:
    """Decode a stream entry's fields; raise :class:`EventDecodeError` if bad.

    ``fields`` is a mapping, or the flat ``[name, value, ...]`` list of a raw
    Redis reply (what the consumer reads).
    """
    if not fields:
        raise EventDecodeError("entry has no fields (deleted while pending?)")
    data = entry_data(fields)
    if data is None:
        raise EventDecodeError("entry has no 'data' field")
    return decode(data)


def entry_data(fields: dict[bytes, bytes] | dict[str, Any] | list[Any]) -> Any:
    """The ``data`` field of an entry's fields (a mapping or a flat list), or None."""
    if isinstance(fields, dict):
        data = fields.get(b"data")
        return fields.get("data") if data is None else data
    if len(fields) == 6 and fields[4] == b"data":  # the relay's layout: event_id, type, data
        return fields[5]
    for i in range(0, len(fields) - 1, 2):
        if fields[i] in (b"data", "data"):
            return fields[i + 1]
    return None


def escrow_order(events: list[Event]) -> list[int]:
    """The order in which to handle a batch: indices into ``events``.

    One escrow's events live in several streams (``payment.received`` in
    ``payment``, ``escrow.funded`` in ``escrow``) and XREADGROUP returns a
    read's entries grouped by stream, so a batch can hold an escrow's events
    out of ``sequence`` order. Each escrow's events are put back in sequence
    order in the slots they held; the interleaving of escrows stays as read.
    The sort is stable: the same event read twice keeps its read order.
    """
    slots: dict[str, list[int]] = {}
    for i, event in enumerate(events):
        slots.setdefault(event.aggregate_id, []).append(i)
    order = list(range(len(events)))
    for indices in slots.values():
        if len(indices) > 1:
            by_sequence = sorted(indices, key=lambda i: events[i].sequence)
            for slot, i in zip(indices, by_sequence, strict=True):
                order[slot] = i
    return order
