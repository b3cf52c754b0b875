"""Running the runtime: serve, its supervisor, an embedded Redis, inspection.

:mod:`.serve` is ``workbench serve`` (every process of the service on one
machine, supervised; :mod:`.supervision` decides restarts, sans-IO);
:mod:`.redis_server` starts a private redis-server; :mod:`.inspection`
snapshots streams, groups and dead letters. Plumbing: :mod:`.children`
(children die with their parent), :mod:`.shutdown` (stop on a signal),
:mod:`.waiting` (wait on a condition with a deadline), :mod:`.affinity`
(CPU pinning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.ops.inspection import Inspection, inspect, print_inspection
    from workbench.ops.redis_server import RedisServer
    from workbench.ops.serve import ServeOptions, serve
    from workbench.ops.shutdown import StopRequest
    from workbench.ops.supervision import RestartPolicy, Supervisor
    from workbench.ops.waiting import wait_until

__all__ = [
    "Inspection",
    "RedisServer",
    "RestartPolicy",
    "ServeOptions",
    "StopRequest",
    "Supervisor",
    "inspect",
    "print_inspection",
    "serve",
    "wait_until",
]
__getattr__ = lazy(
    __name__,
    {
        "Inspection": "inspection",
        "RedisServer": "redis_server",
        "RestartPolicy": "supervision",
        "ServeOptions": "serve",
        "StopRequest": "shutdown",
        "Supervisor": "supervision",
        "inspect": "inspection",
        "print_inspection": "inspection",
        "serve": "serve",
        "wait_until": "waiting",
    },
)
