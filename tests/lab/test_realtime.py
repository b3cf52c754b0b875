"""Real time: the same models drive the served runtime (processes, HTTP, SSE, SIGKILL),
and the checker reaches the same verdict as in virtual time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulations.analysis.checker import check
from simulations.analysis.tables import RunTables
from simulations.drivers.realtime import simulate_realtime
from simulations.drivers.virtual import simulate
from simulations.scenario import load
from tests.support import ROOT

# Small and busy: every phone is a buyer, lifecycles are short, consumers crash
# every few seconds, an SSE server dies now and then. 60 virtual s at factor 0.5.
SMALL = [
    "run.duration_s=40", "run.drain_s=20", "run.sample_every_s=2",
    "market.arrival_rate=3", "market.buyers=12", "market.sellers=6",
    "market.fund_delay_mean_s=4", "market.ship_delay_mean_s=6", "market.confirm_delay_mean_s=6",
    "mpesa.delay_min_s=1", "mpesa.delay_max_s=6",
    "phones.count=12", "phones.connection_mean_s=12", "phones.reconnect_mean_s=2",
    "phones.poll_every_s=0.5", "phones.lose_id_p=0.1",
    "consumers.mtbf_s=8", "consumers.mttr_s=3", "consumers.dead_after_s=3",
    "servers.mtbf_s=20", "realtime.factor=0.5",
]  # fmt: skip


def test_correct_runtime_passes_in_both_clocks(redis_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    virtual = simulate(load("crashy-consumers", SMALL), seed=3, redis_url=redis_server.url,
                       prefix="v-ok")  # fmt: skip
    out = tmp_path / "rt"
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "crashy-consumers", "--realtime",
         "--seed", "3", "--out", str(out), *[a for s in SMALL for a in ("--set", s)]],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    real = RunTables.load(out)
    assert real.manifest["mode"] == "realtime"

    v, r = check(virtual), check(real)
    assert v.ok and r.ok, (v.problems.head(20), r.problems.head(20))
    for report in (v, r):
        assert not report.groups[["lost", "unexpected", "duplicated"]].to_numpy().any()
        assert not report.clients[["lost", "duplicated", "reordered"]].to_numpy().any()
    # The faults really happened, in real processes: SIGKILLed workers (some at the
    # runtime's crash points) and SSE servers killed with their sessions.
    crashes = real.faults[real.faults.kind == "consumer_crash"]
    assert len(crashes) >= 5 and crashes.t_end.notna().all()
    assert (real.faults.kind == "server_kill").any()
    # Phones were served over SSE: replays after reconnects, live delivery, resyncs.
    sources = set(real.deliveries.source)
    assert {"replay", "live", "snapshot"} <= sources
    assert real.deliveries.groupby("phone").connection.max().max() > 2
    # Work was done: commands and callbacks went over HTTP and were handled.
    assert len(real.published) > 100
    assert (real.commands.command == "callback").any()


def test_broken_runtime_fails_in_both_clocks(redis_server) -> None:  # type: ignore[no-untyped-def]
    broken = [*SMALL, "consumers.ack_before_effect=true", "consumers.mtbf_s=5",
              "servers.mtbf_s=0", "phones.count=0"]  # fmt: skip
    virtual = simulate(load("crashy-consumers", broken), seed=3, redis_url=redis_server.url,
                       prefix="v-broken")  # fmt: skip
    real = simulate_realtime(load("crashy-consumers", broken), seed=3,
                             redis_url=redis_server.url, prefix="rt-broken")  # fmt: skip
    v, r = check(virtual), check(real)
    assert not v.ok and not r.ok
    assert v.groups["lost"].sum() > 0 and r.groups["lost"].sum() > 0


def test_factor_needs_realtime() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "baseline", "--factor", "0.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "--factor only applies with --realtime" in result.stderr


@pytest.mark.parametrize("override", ["realtime.factor=0", "servers.count=0"])
def test_realtime_parameters_are_checked(override: str) -> None:
    from simulations.scenario import ScenarioError

    with pytest.raises(ScenarioError, match="must be greater than 0"):
        load("baseline", [override])
