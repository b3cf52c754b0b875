"""The lab: SimPy load models that drive the real escrow runtime, and the tools that judge it.

The models (market, M-Pesa gateway, phones) and the fault schedules decide *when*
things happen; the runtime's own code (``workbench``) decides *what* happens, against
a real Redis and a real SQL store. Nothing of the runtime is re-implemented here.
The lab imports the runtime; the runtime never imports the lab.

* :mod:`simulations.scenario` and ``scenarios/*.toml``: the parameters of a run.
* :mod:`simulations.models`: market, M-Pesa, phones, serve's supervisor, SimPy's clock.
* :mod:`simulations.drivers`: a run in virtual time (:mod:`~simulations.drivers.virtual`),
  in real time against ``serve``'s processes (:mod:`~simulations.drivers.realtime`),
  sweeps, and the end-to-end demo.
* :mod:`simulations.faults`: crash hooks and the deliberately broken runtime.
* :mod:`simulations.analysis`: run tables, the checker, timings, ``load_run``.
* :mod:`simulations.designs`: notebook 03's three delivery designs.
* :mod:`simulations.analytics`: training and evaluating the risk model.

The names most people call::

    import simulations
    run = simulations.run_scenario("baseline", seed=1)     # simulate, check, load
    run = simulations.load_run("data/runs/baseline-1")      # a run's tables, verdict, metrics
    simulations.report("data/runs/baseline-1")              # -> .../report.html, one page
    result = simulations.sweep("baseline", grid={"consumers.mtbf_s": [30, 120]}, seeds=5)
    result.runs, result.summary                              # per run; per grid point, intervals
    result.interval("lost", mtbf_s=30)                       # mean [low, high] over the seeds

Runs already made (same parameters, seed and code) are loaded, not simulated
again: ``force=True`` re-simulates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from simulations.analysis.checker import CheckReport, check, check_dir
    from simulations.analysis.page import report
    from simulations.analysis.report import inspection_frames
    from simulations.analysis.results import Run, load_run, run_scenario
    from simulations.analysis.tables import RunTables
    from simulations.drivers.sweep import SweepResult, sweep
    from simulations.drivers.virtual import simulate, simulate_to
    from simulations.scenario import Scenario, ScenarioError, load

__all__ = [
    "CheckReport",
    "Run",
    "RunTables",
    "Scenario",
    "ScenarioError",
    "SweepResult",
    "check",
    "check_dir",
    "inspection_frames",
    "load",
    "load_run",
    "report",
    "run_scenario",
    "simulate",
    "simulate_to",
    "sweep",
]
__getattr__ = lazy(
    __name__,
    {
        "CheckReport": "analysis.checker",
        "Run": "analysis.results",
        "RunTables": "analysis.tables",
        "Scenario": "scenario",
        "ScenarioError": "scenario",
        "SweepResult": "drivers.sweep",
        "check": "analysis.checker",
        "check_dir": "analysis.checker",
        "inspection_frames": "analysis.report",
        "load": "scenario",
        "load_run": "analysis.results",
        "report": "analysis.page",
        "run_scenario": "analysis.results",
        "simulate": "drivers.virtual",
        "simulate_to": "drivers.virtual",
        "sweep": "drivers.sweep",
    },
)
