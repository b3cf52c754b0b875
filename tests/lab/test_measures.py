"""A run's measures (what a sweep tabulates) against the tables they come from."""

from __future__ import annotations

import pytest

import simulations
from simulations.analysis.measures import MEASURES, run_measures
from simulations.analysis.timings import client_latency, handling_latency, recovery_times


def test_run_measures_are_the_runs_counts_latencies_lag_and_recoveries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = simulations.run_scenario(
        "flaky-phones", 1,
        ["run.duration_s=60", "run.drain_s=30", "phones.count=10", "market.buyers=10",
         "consumers.mtbf_s=30", "run.sample_every_s=1"],
        out=tmp_path / "run",
    )  # fmt: skip
    m = run_measures(run)
    assert set(m) == {"ok", *MEASURES}
    groups, clients = run.report.groups, run.report.clients
    assert m["ok"] is run.ok and m["events"] == len(run.published) > 0
    assert m["faults"] == len(run.faults) > 0
    assert m["lost"] == groups["lost"].sum() and m["client_lost"] == clients["lost"].sum()
    handling = handling_latency(run).groupby("group")["latency_s"]
    assert m["handling_p99_s"] == pytest.approx(handling.quantile(0.99).max())
    assert m["handling_p50_s"] == pytest.approx(handling.quantile(0.5).max())
    phones = client_latency(run)
    for source in ("replay", "live"):
        latencies = phones[phones["source"] == source]["latency_s"]
        assert len(latencies) > 0
        assert m[f"phone_{source}_p99_s"] == pytest.approx(latencies.quantile(0.99))
    assert m["lag_max_s"] == run.samples["lag_s"].max()
    recovery = recovery_times(run)["recovery_s"].dropna()
    assert len(recovery) > 0
    assert m["recovery_mean_s"] == pytest.approx(recovery.mean())
    assert m["recovery_max_s"] == recovery.max()
