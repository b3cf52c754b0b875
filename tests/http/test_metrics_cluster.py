"""``/metrics``' stream figures on a Redis Cluster that is down: a 0, not a failed scrape."""

from __future__ import annotations

from pathlib import Path

from workbench.domain.clock import ManualClock
from workbench.http.metrics import _stream_metrics
from workbench.ops.redis_cluster import LocalCluster
from workbench.ops.waiting import wait_until
from workbench.streams.connection import connect
from workbench.streams.keys import names_for


def test_a_cluster_without_a_master_for_some_slots_scrapes_as_redis_down(tmp_path: Path) -> None:
    names = names_for("m", 16)
    with LocalCluster(tmp_path, masters=3, replicas=0) as cluster:
        client = connect(cluster.url.replace("redis://", "redis+cluster://"))
        up = {m.name: m for m in _stream_metrics(client, names, ManualClock())}
        assert [s.value for s in up["workbench_redis_up"].samples] == [1]
        # No replica: its slots have no master. Not the first partitions' master, so the
        # scrape meets CLUSTERDOWN from a live node before any refused connection.
        cluster.kill(cluster.masters[2])
        survivor = cluster.masters[0]
        wait_until(
            lambda: cluster._state(survivor) == "fail",
            timeout=30,
            what="the surviving masters to say cluster_state:fail",
        )
        down = {m.name: m for m in _stream_metrics(client, names, ManualClock())}
        assert [s.value for s in down["workbench_redis_up"].samples] == [0]
        client.close()
