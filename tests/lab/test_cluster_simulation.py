"""The virtual-time simulation on a real local Redis Cluster, masters failing over mid-run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from simulations.analysis.checker import check
from simulations.drivers.cluster import fault_partitions
from simulations.drivers.virtual import clear_prefix, simulate
from simulations.scenario import ScenarioError, load
from tests.lab.test_simulation import SHORT, _all_effects_exact
from tests.support import ROOT
from workbench.ops.redis_cluster import LocalCluster, slot_ranges
from workbench.streams.keys import names_for
from workbench.streams.partitions import slot_of


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["redis.cluster_masters=3"], "redis.cluster_masters needs redis.partitions >= 1"),
        (
            ["redis.cluster_masters=3", "redis.partitions=16", "redis.lose_last_writes=40"],
            "redis.lose_last_writes is single-server only",
        ),
        (
            ["redis.cluster_masters=9", "redis.partitions=16"],
            "redis.cluster_masters must be at most 8, not 9",
        ),
        (["redis.cluster_masters=1.5"], "redis.cluster_masters must be a whole number"),
    ],
)
def test_a_cluster_scenario_that_cannot_run_is_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load("baseline", overrides)
    assert message in str(info.value)


def test_one_master_or_a_single_server_scenario_loads() -> None:
    assert load("baseline").redis.cluster_masters == 0
    assert load("baseline", ["redis.cluster_masters=1", "redis.partitions=1"]).redis.partitions
    assert load("cluster-failover").redis.cluster_masters == 3


def test_the_command_refuses_a_cluster_with_a_redis_url_or_in_real_time() -> None:
    base = [sys.executable, "-m", "workbench", "simulate", "cluster-failover"]
    for extra in (["--redis-url", "redis://127.0.0.1:1"], ["--realtime"]):
        result = subprocess.run(
            [*base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 2, result.stdout + result.stderr
        assert "redis.cluster_masters runs in virtual time" in result.stderr


def test_faults_go_round_the_masters_slot_ranges() -> None:
    names = names_for("sim", 16)
    targets = fault_partitions(names, 3)
    # The first partition whose slot is in each third of the slots, in order.
    thirds = [
        next(i for i, (low, high) in enumerate(slot_ranges(3)) if low <= slot <= high)
        for slot in (slot_of(names.partitioning.tags[p]) for p in names.partitions)  # type: ignore[union-attr]
    ]
    assert targets == [thirds.index(0), thirds.index(1), thirds.index(2)]
    assert targets[0] == 0 and 4 <= targets[1] <= 6 and 9 <= targets[2] <= 11
    # Two partitions over three masters: one master serves none, and is skipped.
    assert len(fault_partitions(names_for("sim", 2), 3)) == 2


def test_clear_prefix_clears_every_master(redis_cluster: LocalCluster, cluster_prefix: str) -> None:
    client = redis_cluster.client()
    names = names_for(cluster_prefix, 16)
    keys = [names.stream("escrow", p) for p in names.partitions]
    for key in keys:
        client.xadd(key, {"n": "1"})
    client.set(f"other{cluster_prefix}:kept", "1")
    assert len({redis_cluster.master_of(client.keyslot(k)).port for k in keys}) == 3
    clear_prefix(client, cluster_prefix)
    assert not any(client.exists(key) for key in keys)
    assert client.get(f"other{cluster_prefix}:kept") == b"1"
    client.close()


def test_masters_failing_over_mid_run_lose_nothing() -> None:
    """16 partitions on 3 masters with a replica each, crashing consumers, and a
    master SIGKILLed every 20 virtual s of the load: its replica takes over, the
    killed node rejoins as the replica. The fourth failover hits the first slot range
    again, whose master is then the promoted replica: it can only fail over if the
    node killed first came back as its synced replica. The checker finds nothing
    lost or doubled, for every group and every phone."""
    scenario = load(
        "crashy-consumers",
        [*SHORT, "consumers.mtbf_s=30", "redis.partitions=16", "redis.cluster_masters=3",
         "redis.restart_every_s=20"],
    )  # fmt: skip
    tables = simulate(scenario, seed=3)
    failovers = tables.faults[tables.faults.kind == "redis_failover"]
    assert len(failovers) == 4, tables.faults.to_string()
    assert failovers.t_start.tolist() == [20.0, 40.0, 60.0, 80.0]
    assert failovers.target.nunique() == 4  # the first range's second master is another node
    assert failovers.detail.str.contains("promoted; the killed node rejoined").all()
    assert "consumer_crash" in set(tables.faults.kind)
    assert tables.manifest["redis"].startswith("private Redis Cluster redis+cluster://")
    assert tables.manifest["cluster"] == {"masters": 3, "replicas": 1, "failovers": 4}
    assert tables.manifest["cpu"] is None  # the nodes are left to the OS
    assert tables.manifest["relay"]["unrepairable"] == 0
    assert len(tables.user_streams) > 1000 and len(tables.deliveries) > 20
    _all_effects_exact(tables)
    groups = check(tables).groups
    assert (groups.ok == groups.expected).all() and (groups.expected > 0).all()


def test_a_failover_that_loses_unreplicated_writes_is_repaired() -> None:
    """Before each failover the replica is stopped and cut off for 2 virtual s of
    load: the kill loses what was written meanwhile (streams, group positions,
    dedupe markers, user-stream entries), as an asynchronous replica does. The relay
    puts the lost entries back under their ids, groups re-read, the fan-out
    re-appends; the checker finds every group and phone exact."""
    scenario = load(
        "baseline",
        [*SHORT, "redis.partitions=16", "redis.cluster_masters=3", "redis.restart_every_s=30",
         "redis.failover_unreplicated_s=2"],
    )  # fmt: skip
    tables = simulate(scenario, seed=4)
    failovers = tables.faults[tables.faults.kind == "redis_failover"]
    assert len(failovers) == 2, tables.faults.to_string()
    assert failovers.detail.str.contains("its replica cut off before").all()
    relay = tables.manifest["relay"]
    assert relay["repaired"] > 0, relay  # the failovers lost published entries
    assert relay["unrepairable"] == 0
    assert len(tables.lost_entries) > 0  # and user-stream entries, appended again
    _all_effects_exact(tables)


def test_lost_writes_on_failover_need_a_cluster() -> None:
    with pytest.raises(ScenarioError, match="failover_unreplicated_s needs redis.cluster_masters"):
        load("baseline", ["redis.failover_unreplicated_s=2"])
