"""The log: Redis Streams between the outbox and the handlers.

Guarantees. Every committed outbox row reaches its aggregate stream, in
commit order per escrow, under one id forever (:mod:`.relay`: it also puts
back what a restarted Redis lost). Every entry reaches every consumer group's
handler at least once, in escrow order, and is acked only after the handler
made its effect durable (:mod:`.consumer`, the loop; :mod:`.decisions`, its
pure decisions); entries of a crashed consumer are claimed, poison ends in
the group's dead letters. Streams are trimmed only behind every group
(:mod:`.retention`).

Scale. The log can be cut into partitions (:mod:`.partitions`): an escrow's
events all go to one, and every key a script or read touches together lives in
one Redis Cluster slot (:mod:`.keys`). Relays and each group's workers share
the partitions through leases (:mod:`.leases`): one reader (one publisher) per
partition at a time, rebalanced as members come and go, so the guarantees
above hold per partition on one server and on a cluster alike.

Rooms. :mod:`.keys`: every key name. :mod:`.connection`: clients with bounded
timeouts, and what counts as "Redis is down". :mod:`.append`: appends on a
clock of ours. :mod:`.groups`: group creation and ages. :mod:`.retention`:
trimming. :mod:`.replies`: reply values. :mod:`.partitions` and
:mod:`.leases`: the log over several readers, machines and slots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.streams.connection import REDIS_DOWN, TRANSIENT, async_client, connect
    from workbench.streams.consumer import ConsumerSettings, ConsumerStats, ConsumerWorker, Handler
    from workbench.streams.decisions import Delivery
    from workbench.streams.groups import ensure_groups, group_ages
    from workbench.streams.keys import RiskNames, StreamNames, UserStreamNames, names_for
    from workbench.streams.leases import Leases, assign
    from workbench.streams.partitions import Partitioning
    from workbench.streams.relay import OutboxRelay
    from workbench.streams.retention import trim

__all__ = [
    "ConsumerSettings",
    "ConsumerStats",
    "ConsumerWorker",
    "Delivery",
    "Handler",
    "Leases",
    "OutboxRelay",
    "Partitioning",
    "REDIS_DOWN",
    "RiskNames",
    "StreamNames",
    "TRANSIENT",
    "UserStreamNames",
    "assign",
    "async_client",
    "connect",
    "ensure_groups",
    "group_ages",
    "names_for",
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
        "Leases": "leases",
        "OutboxRelay": "relay",
        "Partitioning": "partitions",
        "REDIS_DOWN": "connection",
        "RiskNames": "keys",
        "StreamNames": "keys",
        "TRANSIENT": "connection",
        "UserStreamNames": "keys",
        "assign": "leases",
        "async_client": "connection",
        "connect": "connection",
        "ensure_groups": "groups",
        "group_ages": "groups",
        "names_for": "keys",
        "trim": "retention",
    },
)
