"""Escrow event workbench: the runtime. An M-Pesa escrow on SQL and Redis Streams.

The house, one room per concern (each package's docstring says what it guarantees):

* :mod:`workbench.domain`: the escrow state machine, events, ids, stream ids, clocks (pure).
* :mod:`workbench.store`, :mod:`workbench.service`: the system of record in SQL and
  the commands applied to it, each in one transaction with its outbox row.
* :mod:`workbench.payments`: M-Pesa callbacks verified against Daraja.
* :mod:`workbench.streams`: the relay, consumer groups and every Redis key name.
* :mod:`workbench.handlers`: one handler per consumer group, and the registry.
* :mod:`workbench.delivery`: per-user streams, the live hub, gapless SSE sessions.
* :mod:`workbench.http`: the FastAPI app, auth, edge limits, health, metrics.
* :mod:`workbench.ops`: ``serve`` and its supervisor, embedded Redis, inspection.
* :mod:`workbench.analytics`: the online seller-risk scorer.

The lab that drives and measures this runtime is the separate ``simulations``
package (the ``lab`` extra); the runtime never imports it.

The names most people call::

    import workbench
    service = workbench.EscrowService(workbench.Store(url))
    snapshot = workbench.inspect(redis_client)   # streams, groups, consumers, dead letters
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.handlers import make_handler
    from workbench.handlers.fanout import FanoutHandler
    from workbench.http.app import create_app
    from workbench.ops.inspection import Inspection, inspect
    from workbench.ops.redis_server import RedisServer
    from workbench.ops.serve import serve
    from workbench.service import EscrowService
    from workbench.store import Store
    from workbench.streams.connection import connect
    from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
    from workbench.streams.keys import StreamNames
    from workbench.streams.relay import OutboxRelay

__all__ = [
    "ConsumerSettings",
    "ConsumerWorker",
    "EscrowService",
    "FanoutHandler",
    "Inspection",
    "OutboxRelay",
    "RedisServer",
    "Store",
    "StreamNames",
    "connect",
    "create_app",
    "inspect",
    "make_handler",
    "serve",
]
__version__ = "0.1.0"
__getattr__ = lazy(
    __name__,
    {
        "ConsumerSettings": "streams.consumer",
        "ConsumerWorker": "streams.consumer",
        "EscrowService": "service",
        "FanoutHandler": "handlers.fanout",
        "Inspection": "ops.inspection",
        "OutboxRelay": "streams.relay",
        "RedisServer": "ops.redis_server",
        "Store": "store",
        "StreamNames": "streams.keys",
        "connect": "streams.connection",
        "create_app": "http.app",
        "inspect": "ops.inspection",
        "make_handler": "handlers",
        "serve": "ops.serve",
    },
)
