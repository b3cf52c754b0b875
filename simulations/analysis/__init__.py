"""A run, judged: its tables on disk, the checker's verdict, timings, the analyst's view.

* :mod:`.tables`: the manifest and Parquet tables a driver writes (``RunTables``).
* :mod:`.checker`: was every event delivered once, in order, and is the money right?
* :mod:`.timings`: latencies, backlogs, recovery times (pure pandas).
* :mod:`.handling`: consumers' handling logs (real-time runs' SIGKILLed workers).
* :mod:`.measures`: a run's figures in one row (what a sweep tabulates).
* :mod:`.intervals`: means over seeds with their Student-t intervals.
* :mod:`.results`: ``load_run`` and ``run_scenario``, what notebooks call.
* :mod:`.report`: terminal tables, and inspections as frames.
* :mod:`.figures` and :mod:`.page`: a run or a sweep as one self-contained HTML page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from simulations.analysis.checker import CheckReport, check, check_dir, print_report
    from simulations.analysis.measures import MEASURES, run_measures
    from simulations.analysis.report import inspection_frames
    from simulations.analysis.results import Run, load_run, run_scenario
    from simulations.analysis.tables import RunTables, RunWriter
    from simulations.analysis.timings import summarise

__all__ = [
    "MEASURES",
    "CheckReport",
    "Run",
    "RunTables",
    "RunWriter",
    "check",
    "check_dir",
    "inspection_frames",
    "load_run",
    "print_report",
    "run_measures",
    "run_scenario",
    "summarise",
]
__getattr__ = lazy(
    __name__,
    {
        "MEASURES": "measures",
        "CheckReport": "checker",
        "Run": "results",
        "RunTables": "tables",
        "RunWriter": "tables",
        "check": "checker",
        "check_dir": "checker",
        "inspection_frames": "report",
        "load_run": "results",
        "print_report": "checker",
        "run_measures": "measures",
        "run_scenario": "results",
        "summarise": "timings",
    },
)
