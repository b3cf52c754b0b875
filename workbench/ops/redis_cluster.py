"""A local Redis Cluster: several private redis-servers joined into one keyspace.

For tests and the lab, as :mod:`workbench.ops.redis_server` is for one server:
``masters`` nodes share the 16384 slots in equal ranges (as ``redis-cli
--cluster create`` splits them), each with ``replicas`` replicas, every node a
:class:`~workbench.ops.redis_server.RedisServer` in a directory of its own,
killed with its parent (``PR_SET_PDEATHSIG``). The cluster is built with
plain cluster commands (``ADDSLOTS``, ``SET-CONFIG-EPOCH``, ``MEET``,
``REPLICATE``), so no ``redis-cli`` is needed: any binary that serves a single
server serves a cluster node (Redis >= 7 or the bundled Valkey).

A node's cluster bus listens on its port + 10000, so ports are chosen with
that one free too. ``node_timeout_ms`` is short (2 s by default) so that a
killed master's replica takes over within seconds (:meth:`LocalCluster.kill`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path

import redis
from redis.cluster import RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS

from workbench.ops.redis_server import RedisServer, RedisServerError, free_port
from workbench.ops.waiting import wait_until

_BUS_OFFSET = 10_000


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        bus = port + _BUS_OFFSET
        if bus <= 65535 and port not in taken and bus not in taken and _port_is_free(bus):
            return port
    raise RedisServerError("no free port pair (port, port + 10000) for a cluster node")


def slot_ranges(masters: int) -> list[tuple[int, int]]:
    """Equal, contiguous slot ranges, one per master: ``[(first, last), ...]``."""
    if masters < 1:
        raise ValueError(f"a cluster needs at least one master, not {masters}")
    bounds = [m * REDIS_CLUSTER_HASH_SLOTS // masters for m in range(masters + 1)]
    return [(bounds[m], bounds[m + 1] - 1) for m in range(masters)]


class LocalCluster:
    """``masters`` masters with ``replicas`` replicas each, on loopback."""

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        masters: int = 3,
        replicas: int = 0,
        binary: str | None = None,
        node_timeout_ms: int = 2000,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        start_timeout: float = 30.0,
    ) -> None:
        self.ranges = slot_ranges(masters)
        if replicas < 0:
            raise ValueError(f"replicas must not be negative, not {replicas}")
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="workbench-cluster-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for n in range(masters * (1 + replicas)):
            port = free_cluster_port(taken)
            taken |= {port, port + _BUS_OFFSET}
            self.nodes.append(
                RedisServer(
                    self.directory / f"node-{n}",
                    port=port,
                    binary=binary,
                    appendonly=appendonly,
                    appendfsync=appendfsync,
                    extra_args=(
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(node_timeout_ms),
                        # A replica syncs at once, not after the default 5 s wait for
                        # more replicas: until then it could not take over.
                        "--repl-diskless-sync-delay",
                        "0",
                    ),
                )  # fmt: skip
            )
        self.masters = self.nodes[:masters]
        self.replicas = self.nodes[masters:]

    # -- building ------------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start every node, share the slots, join them, and wait until the cluster is ok."""
        for node in self.nodes:
            node.start()
        try:
            self._assign_slots()
            self._meet()
            self._attach_replicas()
            self.wait_ok()
            wait_until(
                lambda: all(self._synced(r) for r in self.replicas),
                timeout=self.start_timeout, what="every replica to finish its first sync",
            )  # fmt: skip
        except Exception:
            self.close()
            raise
        return self

    def _assign_slots(self) -> None:
        for epoch, (node, (first, last)) in enumerate(zip(self.masters, self.ranges, strict=True)):
            with node.client() as c:
                c.execute_command("CLUSTER", "ADDSLOTS", *range(first, last + 1))
                c.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch + 1)

    def _meet(self) -> None:
        with self.nodes[0].client() as first:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        wait_until(
            lambda: all(self._known_nodes(n) == len(self.nodes) for n in self.nodes),
            timeout=self.start_timeout, what="every cluster node to know every other",
        )  # fmt: skip

    def _attach_replicas(self) -> None:
        for i, replica in enumerate(self.replicas):
            master = self.masters[i % len(self.masters)]
            with master.client() as m, replica.client() as r:
                r.execute_command("CLUSTER", "REPLICATE", m.execute_command("CLUSTER", "MYID"))

    @staticmethod
    def _synced(replica: RedisServer) -> bool:
        with replica.client() as c:
            return c.info("replication").get("master_link_status") == "up"

    @staticmethod
    def _known_nodes(node: RedisServer) -> int:
        # A peer still in handshake is listed under a provisional id: CLUSTER
        # REPLICATE <its real id> would answer "Unknown node".
        with node.client() as c:
            lines = c.execute_command("CLUSTER", "NODES").decode().splitlines()
        return sum(1 for line in lines if "handshake" not in line.split()[2])

    # -- state ---------------------------------------------------------------------

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every running node says ``cluster_state:ok``."""
        wait_until(
            lambda: all(self._state(n) == "ok" for n in self.nodes if n.running),
            timeout=timeout or self.start_timeout, what="cluster_state:ok on every node",
        )  # fmt: skip

    @staticmethod
    def _state(node: RedisServer) -> str:
        try:
            with node.client(socket_timeout=1) as c:
                info = c.execute_command("CLUSTER", "INFO").decode()
        except redis.RedisError:
            return "unreachable"
        fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
        return fields.get("cluster_state", "unknown")

    @property
    def url(self) -> str:
        """A startup node's URL (any running node: the client discovers the rest)."""
        node = next(n for n in self.nodes if n.running)
        return f"redis://127.0.0.1:{node.port}"

    def client(self, **kwargs: object) -> RedisCluster:
        return RedisCluster.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def master_of(self, slot: int) -> RedisServer:
        """The node that serves ``slot`` now (after a failover, a former replica)."""
        with self.client() as c:
            node = c.nodes_manager.get_node_from_slot(slot)
            port = int(node.port)
        return next(n for n in self.nodes if n.port == port)

    # -- faults and teardown -------------------------------------------------------

    def kill(self, node: RedisServer) -> None:
        """SIGKILL one node, as a crash would (its replica, if any, takes over)."""
        node.kill()

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.close()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()
