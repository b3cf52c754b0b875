"""Escrow event workbench: an M-Pesa escrow runtime on Redis Streams, driven and measured.

The public surface most people need::

    import workbench
    frames = workbench.inspect(redis_client)   # streams, groups, consumers, dead letters
    run = workbench.load_run("data/runs/baseline-1")  # a run's tables, verdict, metrics
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workbench.analysis import Run, load_run, run_scenario
    from workbench.inspection import Inspection, inspect

__all__ = ["Inspection", "Run", "inspect", "load_run", "run_scenario"]
_LAZY = {"Inspection": "inspection", "inspect": "inspection", "Run": "analysis",
         "load_run": "analysis", "run_scenario": "analysis"}  # fmt: skip
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: these need pandas, which workers and API processes do not.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"workbench.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
