"""A run's figures in one flat row: what a sweep tabulates and averages over seeds.

:func:`run_measures` reduces a run's tables to numbers, one per name of
:data:`MEASURES` (plus ``ok``): the checker's counts, latencies, the consumer
lag, recovery after crashes, faults and events. A figure a run cannot have (no
consumer crashed, so no recovery time; no phone reconnected, so no replay
latency) is None, not 0, so that averages over seeds leave it out rather than
pull towards zero. Times are seconds of the run's clock.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from simulations.analysis.checker import CheckReport, check
from simulations.analysis.tables import RunTables
from simulations.analysis.timings import recovery_times, summarise

#: Every measure of a run, and what it is.
MEASURES: dict[str, str] = {
    "events": "events published",
    "faults": "faults injected (crashes, kills)",
    "lost": "events some consumer group never handled",
    "duplicated": "events a group handled more than once",
    "unseen": "events a group had not reached when the run ended",
    "unexpected": "events a group handled that it should not have",
    "client_lost": "user-stream entries a phone never got",
    "client_duplicated": "entries a phone got twice",
    "client_reordered": "entries a phone got out of order",
    "handling_p50_s": "commit -> handled, median, of the slowest group",
    "handling_p99_s": "commit -> handled, 99th percentile, of the slowest group",
    "phone_replay_p99_s": "commit -> on a phone, 99th percentile, replayed on reconnect",
    "phone_live_p99_s": "commit -> on a phone, 99th percentile, delivered live",
    "lag_max_s": "the largest consumer-group lag sampled (seconds behind the stream)",
    "recovery_mean_s": "consumer crash -> its group's backlog empty again, mean",
    "recovery_max_s": "consumer crash -> its group's backlog empty again, longest",
}


def run_measures(run: RunTables, report: CheckReport | None = None) -> dict[str, Any]:
    """``ok`` and every :data:`MEASURES` of ``run`` (``report``: its checked verdict,
    if already at hand)."""
    report = report if report is not None else check(run)
    groups, clients = report.groups, report.clients
    metrics = summarise(run)
    recovery = recovery_times(run)["recovery_s"].dropna()
    return {
        "ok": report.ok,
        "events": len(run.published),
        "faults": len(run.faults),
        **{name: int(groups[name].sum()) for name in ("lost", "duplicated", "unseen",
                                                      "unexpected")},
        **{f"client_{name}": int(clients[name].sum()) if not clients.empty else 0
           for name in ("lost", "duplicated", "reordered")},
        "handling_p50_s": _largest(metrics["handling"], "p50"),
        "handling_p99_s": _largest(metrics["handling"], "p99"),
        "phone_replay_p99_s": _of_source(metrics["clients"], "replay"),
        "phone_live_p99_s": _of_source(metrics["clients"], "live"),
        "lag_max_s": _largest(run.samples, "lag_s"),
        "recovery_mean_s": float(recovery.mean()) if len(recovery) else None,
        "recovery_max_s": float(recovery.max()) if len(recovery) else None,
    }  # fmt: skip


def _largest(frame: pd.DataFrame, column: str) -> float | None:
    value = frame[column].max() if not frame.empty else math.nan
    return None if pd.isna(value) else float(value)


def _of_source(clients: pd.DataFrame, source: str) -> float | None:
    return _largest(clients[clients["source"] == source], "p99")


__all__ = ["MEASURES", "run_measures"]
