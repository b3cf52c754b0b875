"""The escrow domain: pure values and decisions, no I/O.

* :mod:`.escrow`: the state machine (``decide`` a command against a state,
  ``evolve`` a state by an event), commands, states and domain errors.
* :mod:`.events`: the event envelope, its wire encoding, and escrow order.
* :mod:`.ids`: identifiers, reproducible from a seed.
* :mod:`.streamid`: Redis stream ids as comparable values.
* :mod:`.clock`: the injectable clock every time decision reads.

Everything else in the runtime applies these decisions to SQL, Redis and HTTP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.domain.clock import Clock, ManualClock, ScaledClock, SystemClock
    from workbench.domain.escrow import DomainError, Escrow, EscrowState, Timeouts, decide, evolve
    from workbench.domain.events import AGGREGATE_TYPES, EVENT_TYPES, Event, decode, encode
    from workbench.domain.ids import IdFactory
    from workbench.domain.streamid import MalformedStreamId, StreamId

__all__ = [
    "AGGREGATE_TYPES",
    "Clock",
    "DomainError",
    "EVENT_TYPES",
    "Escrow",
    "EscrowState",
    "Event",
    "IdFactory",
    "MalformedStreamId",
    "ManualClock",
    "ScaledClock",
    "StreamId",
    "SystemClock",
    "Timeouts",
    "decide",
    "decode",
    "encode",
    "evolve",
]
__getattr__ = lazy(
    __name__,
    {
        "AGGREGATE_TYPES": "events",
        "Clock": "clock",
        "DomainError": "escrow",
        "EVENT_TYPES": "events",
        "Escrow": "escrow",
        "EscrowState": "escrow",
        "Event": "events",
        "IdFactory": "ids",
        "MalformedStreamId": "streamid",
        "ManualClock": "clock",
        "ScaledClock": "clock",
        "StreamId": "streamid",
        "SystemClock": "clock",
        "Timeouts": "escrow",
        "decide": "escrow",
        "decode": "events",
        "encode": "events",
        "evolve": "escrow",
    },
)
