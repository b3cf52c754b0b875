"""``simulations.load_run`` / ``run_scenario``: the analysts' way into a run."""

from __future__ import annotations

import pytest

import simulations


def test_run_scenario_writes_and_loads_a_run_with_its_verdict(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = simulations.run_scenario(
        "flaky-phones", seed=2,
        overrides=["run.duration_s=60", "run.drain_s=30", "phones.count=10"],
        out=tmp_path / "run", redis_url=redis_server.url,
    )  # fmt: skip
    assert run.ok and run.report.groups["lost"].sum() == 0
    assert run.summary()["scenario"] == "flaky-phones" and run.summary()["events"] > 0
    assert {"handling", "clients", "replay_sizes"} <= set(run.metrics)
    again = simulations.load_run(tmp_path / "run")
    assert again.published.equals(run.published)
    assert again.manifest["rows"]["published"] == len(run.published)


def test_loading_something_that_is_not_a_run_says_so(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        simulations.load_run(tmp_path)
