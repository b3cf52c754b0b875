"""A real local Redis Cluster: partitions spread over masters, scripts stay in one slot,
and a killed master's replica takes over with what was written before the kill."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException, ResponseError

from workbench.ops.redis_cluster import LocalCluster
from workbench.ops.waiting import wait_until
from workbench.streams.partitions import Partitioning, slot_of

SUM_OF_LENGTHS = "return redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2])"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with LocalCluster(tmp_path_factory.mktemp("cluster"), masters=3, replicas=1) as running:
        yield running


def test_partition_keys_spread_over_every_master(cluster: LocalCluster) -> None:
    parts = Partitioning(16)
    with cluster.client() as client:
        for tag in parts.tags:
            client.xadd(f"wb:{{{tag}}}:escrow", {"type": "escrow.created"})
        owners = Counter(cluster.master_of(slot_of(tag)).port for tag in parts.tags)
        lengths = [client.xlen(f"wb:{{{tag}}}:escrow") for tag in parts.tags]
    assert sorted(owners.values()) == [5, 5, 6]
    assert lengths == [1] * 16


def test_a_script_runs_within_a_partition_and_is_refused_across(cluster: LocalCluster) -> None:
    first, other = Partitioning(16).tags[:2]
    with cluster.client() as client:
        client.xadd(f"wb:{{{first}}}:payment", {"type": "payment.requested"})
        same = client.eval(SUM_OF_LENGTHS, 2, f"wb:{{{first}}}:escrow", f"wb:{{{first}}}:payment")
        assert same >= 1
        with pytest.raises((RedisClusterException, ResponseError), match="same key slot|CROSSSLOT"):
            client.eval(SUM_OF_LENGTHS, 2, f"wb:{{{first}}}:escrow", f"wb:{{{other}}}:escrow")


def test_a_killed_master_is_replaced_by_its_replica_with_the_acknowledged_entries(
    tmp_path,
) -> None:
    with LocalCluster(tmp_path, masters=3, replicas=1) as cl:
        tag = Partitioning(16).tags[3]
        key = f"wb:{{{tag}}}:escrow"
        with cl.client() as client:
            ids = [client.xadd(key, {"n": str(n)}) for n in range(20)]
            # WAIT: the replica has every entry before the master dies.
            master = cl.master_of(slot_of(tag))
            with master.client() as direct:
                assert direct.execute_command("WAIT", 1, 5000) == 1
        cl.kill(master)

        def entries_after_failover() -> list[bytes] | None:
            try:
                with RedisCluster.from_url(cl.url) as client:
                    return [entry_id for entry_id, _ in client.xrange(key)]
            except Exception:  # noqa: BLE001 - the cluster is failing over
                return None

        def failed_over() -> bool:
            # Both: a node that still serves the slot, and one that is not the dead
            # master in the cluster's view (which reaches every node by gossip, not at once).
            try:
                moved = cl.master_of(slot_of(tag)).port != master.port
            except Exception:  # noqa: BLE001 - the cluster is failing over
                return False
            return moved and entries_after_failover() is not None

        wait_until(failed_over, timeout=30,
                   what="the replica to take over the killed master's slots")  # fmt: skip
        assert entries_after_failover() == ids
