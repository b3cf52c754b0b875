"""The log: Redis Streams between the outbox and the handlers.

Guarantees. Every committed outbox row reaches its aggregate stream, in
commit order per escrow, under one id forever (:mod:`.relay`: it also puts
back what a restarted Redis lost). Every entry reaches every consumer group's
handler at least once, in escrow order, and is acked only after the handler
made its effect durable (:mod:`.consumer`, the loop; :mod:`.decisions`, its
pure decisions); entries of a crashed consumer are claimed, poison ends in
the group's dead letters. Streams are trimmed only behind every group
(:mod:`.retention`).

Rooms. :mod:`.keys`: every key name. :mod:`.connection`: clients with bounded
timeouts, and what counts as "Redis is down". :mod:`.append`: appends on a
clock of ours. :mod:`.groups`: group creation and ages. :mod:`.retention`:
trimming. :mod:`.replies`: reply values.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.streams.connection import REDIS_DOWN, TRANSIENT, async_client, connect
    from workbench.streams.consumer import ConsumerSettings, ConsumerStats, ConsumerWorker, Handler
    from workbench.streams.decisions import Delivery
    from workbench.streams.groups import ensure_groups, group_ages
    from workbench.streams.keys import RiskNames, StreamNames, UserStreamNames
    from workbench.streams.relay import OutboxRelay
    from workbench.streams.retention import trim

__all__ = [
    "ConsumerSettings",
    "ConsumerStats",
    "ConsumerWorker",
    "Delivery",
    "Handler",
    "OutboxRelay",
    "REDIS_DOWN",
    "RiskNames",
    "StreamNames",
    "TRANSIENT",
    "UserStreamNames",
    "async_client",
    "connect",
    "ensure_groups",
    "group_ages",
    "trim",
]
__getattr__ = lazy(
    __name__,
    {
        "ConsumerSettings": "consumer",
        "ConsumerStats": "consumer",
        "ConsumerWorker": "consumer",
        "Delivery": "decisions",
        "Handler": "consumer",
        "OutboxRelay": "relay",
        "REDIS_DOWN": "connection",
        "RiskNames": "keys",
        "StreamNames": "keys",
        "TRANSIENT": "connection",
        "UserStreamNames": "keys",
        "async_client": "connection",
        "connect": "connection",
        "ensure_groups": "groups",
        "group_ages": "groups",
        "trim": "retention",
    },
)
