"""What a user-stream entry is: an event as delivered to one user.

A :class:`UserEntry` is the value both sides of delivery share. The fan-out
writes it (:class:`workbench.delivery.userstreams.UserStreams` appends one per
user an event concerns and returns them); readers get it back from a page of
the stream or from a live message (:func:`~workbench.delivery.userstreams.entry_from_fields`,
:func:`~workbench.delivery.userstreams.live_message`), and the handoff
(:mod:`workbench.delivery.handoff`) decides what each one means for a session.

Its fields are the stream entry's: the entry's own id, ``prev`` (the id of the
entry before it when it was appended, ``0-0`` for the first: what makes gaps
visible), the event's id and type, and the event envelope as JSON. This module
is pure (no Redis), so the handoff's state machine can stay pure too.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.domain.streamid import StreamId


@dataclass(frozen=True, slots=True)
class UserEntry:
    """One entry of a user stream: an event as delivered to one user."""

    id: StreamId
    prev: StreamId
    event_id: str
    type: str
    data: str  # the event envelope, JSON


__all__ = ["UserEntry"]
