"""Notebook 03 (issue #5): the same load and faults delivered three ways.

* :class:`PubSubOnly`: broker fan-out only (Redis Pub/Sub, no log);
* :class:`StreamsOnly`: per-user streams, each phone session its own XREAD BLOCK;
* :class:`StreamsPlusLocalPubSub`: the project's two-layer design (per-user
  streams, one live subscription per process, in-process hub, SseSession).

All three have the same shape (producer -> fan-out step -> per-user delivery
-> phones), are driven against a real redis-server with the same
:class:`Schedule` (load, fan-out crash and restart, phone disconnects), and are
measured the same way (:mod:`simulations.designs.harness`). :func:`claims` turns
the results into the notebook's last table: each claim of the design note,
the numbers for and against it, and a verdict. :func:`connection_scaling`
(:mod:`simulations.designs.scaling`) repeats the runs over phone counts and
seeds for the note's central claim: the Redis connections each design needs as
phones grow.

    from simulations.designs import Schedule, compare, claims
    results = compare(Schedule(), "redis://127.0.0.1:6379/0")
    claims(results)
"""

from simulations.designs.base import Design, Inbox, Probe, Receipt, RunContext
from simulations.designs.claims import claims
from simulations.designs.harness import (
    compare,
    default_designs,
    results_frame,
    run_all,
    run_design,
    run_design_async,
)
from simulations.designs.pubsub_only import PubSubOnly
from simulations.designs.scaling import connection_scaling, connection_slopes
from simulations.designs.schedule import Disconnect, PlannedEvent, Schedule, Window
from simulations.designs.scoring import DesignResult, Sample
from simulations.designs.streams_only import StreamsOnly
from simulations.designs.two_layer import StreamsPlusLocalPubSub

__all__ = [
    "Design",
    "DesignResult",
    "Disconnect",
    "Inbox",
    "PlannedEvent",
    "Probe",
    "PubSubOnly",
    "Receipt",
    "RunContext",
    "Sample",
    "Schedule",
    "StreamsOnly",
    "StreamsPlusLocalPubSub",
    "Window",
    "claims",
    "compare",
    "connection_scaling",
    "connection_slopes",
    "default_designs",
    "results_frame",
    "run_all",
    "run_design",
    "run_design_async",
]
