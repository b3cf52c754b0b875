"""Drivers: a world built from a scenario, run, and written as tables.

* :mod:`.virtual`: SimPy's virtual time; the runtime's loops ticked at SimPy's
  instants (:mod:`.loops`) against a private redis-server and SQLite.
* :mod:`.realtime`: wall time against ``serve``'s real processes, HTTP and SSE.
* :mod:`.sweep`: one scenario over a grid of values and seeds, in parallel.
* :mod:`.cache`: a finished run's key, so that it is reused, not simulated again.
* :mod:`.demo`: ``workbench run``, the end-to-end demo with a real crash.
* :mod:`.interruption`: Ctrl-C and SIGTERM stop a run cleanly (children
  stopped, temporary directories removed, the run directory left unfinished).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from simulations.drivers.demo import DemoConfig, run_demo
    from simulations.drivers.realtime import simulate_realtime, simulate_realtime_to
    from simulations.drivers.sweep import sweep
    from simulations.drivers.virtual import simulate, simulate_to

__all__ = [
    "DemoConfig",
    "run_demo",
    "simulate",
    "simulate_realtime",
    "simulate_realtime_to",
    "simulate_to",
    "sweep",
]
__getattr__ = lazy(
    __name__,
    {
        "DemoConfig": "demo",
        "run_demo": "demo",
        "simulate": "virtual",
        "simulate_realtime": "realtime",
        "simulate_realtime_to": "realtime",
        "simulate_to": "virtual",
        "sweep": "sweep",
    },
)
