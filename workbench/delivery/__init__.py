"""Delivery to phones: per-user streams, one live subscription, gapless SSE.

The fan-out worker copies each event into the stream of every user it
concerns and publishes it on one live channel (:mod:`.userstreams`). Each
server process holds one subscription to that channel (:mod:`.live`) and
fans it out in-process (:mod:`.hub`). On a partitioned log each partition
has its channel (sharded Pub/Sub) and the reader one connection per node
that serves some (:mod:`.livenodes`). A session subscribes live first, then
replays from ``Last-Event-ID`` and hands over to live without a gap or a
duplicate (:mod:`.handoff`, a pure state machine; :mod:`.sessions`, the
async loop around it); a cursor the stream no longer holds gets an explicit
``reset``, never a silent gap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.delivery.entries import UserEntry
    from workbench.delivery.handoff import HistoryLost, ReplaySession
    from workbench.delivery.hub import Hub
    from workbench.delivery.live import LiveReader
    from workbench.delivery.sessions import SseSession
    from workbench.delivery.userstreams import FanoutIncomplete, UserStreamReader, UserStreams

__all__ = [
    "FanoutIncomplete",
    "HistoryLost",
    "Hub",
    "LiveReader",
    "ReplaySession",
    "SseSession",
    "UserEntry",
    "UserStreamReader",
    "UserStreams",
]
__getattr__ = lazy(
    __name__,
    {
        "FanoutIncomplete": "userstreams",
        "HistoryLost": "handoff",
        "Hub": "hub",
        "LiveReader": "live",
        "ReplaySession": "handoff",
        "SseSession": "sessions",
        "UserEntry": "entries",
        "UserStreamReader": "userstreams",
        "UserStreams": "userstreams",
    },
)
