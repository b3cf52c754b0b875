"""A virtual-time run on a real local Redis Cluster, and its master failovers.

``[redis] cluster_masters = N`` (N >= 1) runs the simulation on a Redis Cluster
instead of one redis-server: :func:`start_cluster` builds a
:class:`~workbench.ops.redis_cluster.LocalCluster` of ``N`` masters with one
replica each in the run's temporary directory (each node with the scenario's
``redis.appendfsync``), and the run's one client is redis-py's
:class:`~redis.cluster.RedisCluster` from its ``redis+cluster://`` URL
(:func:`workbench.streams.connection.connect`). Everything else (relay,
workers, fan-out, phones, the end-of-run tables) uses that client unchanged:
the log is partitioned (``redis.partitions >= 1``, checked when the scenario
loads), so every script and multi-key read touches one partition's slot.

**Failovers** (:class:`ClusterFaults`). With ``redis.restart_every_s > 0``,
every that many virtual seconds of the load one master is SIGKILLed: the one
serving a chosen partition's slot, the partitions chosen so that the faults
go round the masters' slot ranges (after a failover a range is served by the
promoted replica, so the next round kills that one). The SimPy process then
blocks in *real* time, so virtual time stands still, as it does while a killed
redis-server replays its AOF in
:class:`~simulations.drivers.virtual.RedisFaults`: it waits until the
replica has taken over and every node says ``cluster_state:ok``, restarts the
killed node (it keeps its ``nodes.conf``, so it rejoins as the new master's
replica), waits until that replica has synced, and lets the run go on. The
runtime meets the failover as a process does after a pause: connections to
the dead node fail, the client finds the new owner, the loops retry.

Replication is asynchronous: writes the master acknowledged but had not sent
to its replica are lost, a suffix of the history as an ``everysec`` kill
loses (streams, groups' state, the fan-out's markers and user streams
together). The relay's repair (ids on the simulation's clock, checked per
partition) puts lost stream entries back under their original ids, groups
re-read, the fan-out re-appends what user streams lost, and the run's own
bookkeeping (``Runtime.redis_restarted``) takes the lost user entries out of
the truth. The checker judges the rest.

**Not bit-identical.** How much the replica had received at the kill depends
on wall-clock timing, so two runs of the same scenario and seed on a cluster
are not expected to give the same tables (what was lost and made again, and
everything after it, may differ); the fault rows carry wall seconds too. The
determinism tests run on one redis-server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import simpy

from simulations.drivers.interruption import held
from simulations.scenario import RedisParams
from workbench.ops.redis_cluster import LocalCluster, slot_ranges
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.streams.keys import StreamNames
from workbench.streams.partitions import slot_of

#: Each master's replicas in a simulation's cluster.
REPLICAS = 1
#: Real seconds a failover, or the killed node's rejoining, may take.
FAILOVER_TIMEOUT_S = 60.0


def start_cluster(resources: contextlib.ExitStack, params: RedisParams, work: Path) -> LocalCluster:
    """A running local cluster of ``params.cluster_masters`` masters (one replica
    each) under ``work``; closed, every node stopped, by ``resources``."""
    cluster = LocalCluster(
        work / "cluster",
        masters=params.cluster_masters,
        replicas=REPLICAS,
        appendfsync=params.appendfsync,
    )
    return resources.enter_context(cluster)


def cluster_url(cluster: LocalCluster) -> str:
    """The cluster's ``redis+cluster://`` URL (any running node; the client finds the rest)."""
    return cluster.url.replace("redis://", "redis+cluster://", 1)


def fault_partitions(names: StreamNames, masters: int) -> list[int]:
    """The partition each fault picks, in turn: the first partition in each master's
    share of the slots (masters serving none are skipped), so the faults go round
    the masters."""
    ranges = slot_ranges(masters)
    firsts: dict[int, int] = {}
    for partition in names.partitions:
        slot = _slot_of_partition(names, partition)
        share = next(i for i, (low, high) in enumerate(ranges) if low <= slot <= high)
        firsts.setdefault(share, partition)
    return [firsts[share] for share in sorted(firsts)]


def _slot_of_partition(names: StreamNames, partition: int) -> int:
    assert names.partitioning is not None, "a cluster needs a partitioned log"
    return slot_of(names.partitioning.tags[partition])


class ClusterFaults:
    """SIGKILL a master every ``restart_every_s`` of the load, wait (in real time)
    for its replica to take over, bring the killed node back as a replica.

    Each failover is a ``faults`` row: kind ``redis_failover``, target the killed
    node (``127.0.0.1:<port>``), its partition, slots and successor, and the wall
    seconds it took, in ``detail``; ``on_failover`` (the runtime's
    ``redis_restarted``) then counts the user-stream entries the failover lost.
    """

    def __init__(
        self,
        env: simpy.Environment,
        cluster: LocalCluster,
        names: StreamNames,
        params: RedisParams,
        faults: list[dict[str, Any]],
        until: float,
        on_failover: Callable[[], int] | None = None,
    ) -> None:
        self.env, self.cluster, self.names, self.p = env, cluster, names, params
        self.faults, self.until, self.on_failover = faults, until, on_failover
        self.targets = fault_partitions(names, params.cluster_masters)
        self.failovers = 0

    def run(self) -> Any:
        every = self.p.restart_every_s
        if every <= 0:
            return
        while True:
            yield self.env.timeout(every)
            if self.env.now >= self.until:
                return
            partition = self.targets[self.failovers % len(self.targets)]
            cut = None
            if self.p.failover_unreplicated_s > 0:
                cut = self.cut_off_replica(partition)
                yield self.env.timeout(self.p.failover_unreplicated_s)  # writes it misses
            fault = self.fail_over(partition, cut)  # blocks: virtual time stands still
            self.faults.append(fault)
            self.failovers += 1
            if self.on_failover is not None and (lost := self.on_failover()):
                fault["detail"] += f"; {lost} user-stream entries lost"

    def cut_off_replica(self, partition: int) -> RedisServer:
        """Stop the replica of ``partition``'s master (SIGSTOP) and close its link, so
        it receives nothing until its master is killed; return it."""
        master = self.cluster.master_of(_slot_of_partition(self.names, partition))
        replica = self._replica_of(master)
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)  # cannot reconnect while stopped
        with master.client() as direct:
            direct.client_kill_filter(_type="replica")
        return replica

    def fail_over(self, partition: int, cut: RedisServer | None = None) -> dict[str, Any]:
        """Kill the master of ``partition``'s slot; return once its replica serves
        the slot and the killed node is back as that replica's synced replica.
        ``cut``: the replica :meth:`cut_off_replica` stopped, continued after the kill."""
        slot = _slot_of_partition(self.names, partition)
        master = self.cluster.master_of(slot)
        replica = cut or self._replica_of(master)
        started = time.monotonic()
        self.cluster.kill(master)
        if cut is not None and cut.pid is not None:
            os.kill(cut.pid, signal.SIGCONT)
        wait_until(
            lambda: _role(replica)[0] == "master" and self.cluster.master_of(slot) is replica,
            timeout=FAILOVER_TIMEOUT_S, what=f"{replica!r} to take over from port {master.port}",
        )  # fmt: skip
        self.cluster.wait_ok(FAILOVER_TIMEOUT_S)
        with held():  # a Ctrl-C waits until the node is back under the cluster's control
            master.start()  # same port, directory and nodes.conf: it rejoins as a replica
        wait_until(
            lambda: _role(master) == ("slave", replica.port, "up"),
            timeout=FAILOVER_TIMEOUT_S, what=f"port {master.port} to rejoin as a synced replica",
        )  # fmt: skip
        self.cluster.wait_ok(FAILOVER_TIMEOUT_S)
        return {
            "t_start": self.env.now, "t_end": self.env.now, "kind": "redis_failover",
            "target": f"127.0.0.1:{master.port}",
            "detail": f"SIGKILL master of partition {partition} (slot {slot})"
                      f"{'' if cut is None else ', its replica cut off before'}; replica"
                      f" 127.0.0.1:{replica.port} promoted; the killed node rejoined as its"
                      f" replica and synced; {time.monotonic() - started:.1f} wall s",
        }  # fmt: skip

    def _replica_of(self, master: RedisServer) -> RedisServer:
        for node in self.cluster.nodes:
            if node is not master and node.running and _role(node)[:2] == ("slave", master.port):
                return node
        raise RuntimeError(f"port {master.port} has no running replica to fail over to")


def _role(node: RedisServer) -> tuple[str, int | None, str | None]:
    """``(role, master port, link status)`` as ``node`` reports them (``"down"`` if it
    does not answer)."""
    try:
        with node.client(socket_timeout=1, socket_connect_timeout=1) as c:
            info = c.info("replication")
    except redis.RedisError:
        return ("down", None, None)
    port = info.get("master_port")
    return (info["role"], None if port is None else int(port), info.get("master_link_status"))
