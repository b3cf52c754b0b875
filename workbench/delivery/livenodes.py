"""Where the live reader connects: one seed, and on Redis Cluster the node of each channel.

Unpartitioned, the fan-out publishes on one channel (``wb:live``) with plain
``PUBLISH``, which a cluster forwards to every node: any one connection reads it.
Partitioned, it publishes with ``SPUBLISH`` on each partition's channel
(``wb:{<tag>}:live``), and sharded Pub/Sub is served only by the node that owns
the channel's slot. So the live reader must hold a connection to every node
that owns some partition's slot, and no more: Redis connections per server
process stay bounded by the nodes (or the partitions), never the phones.

redis-py's asyncio client has no cluster Pub/Sub, so :meth:`LiveNodes.plan`
asks a node ``CLUSTER SLOTS`` and groups the channels by the master that owns
their slot; the reader opens one plain ``redis.asyncio`` connection per group
and ``SSUBSCRIBE``\\ s there, one channel per command (a cluster refuses one
``SSUBSCRIBE`` naming channels of several slots). A single redis-server says
"cluster support disabled": every channel goes over the one connection.

The plan is made again on every reconnect, from whichever known node answers
(the seeds, then every node a previous ``CLUSTER SLOTS`` named), so after a
failover or a slot migration the reader follows the slots to their new owner.

:meth:`LiveNodes.of` accepts what a caller has: a URL (``redis://``,
``rediss://``, ``unix://``, or ``redis+cluster://host:port[,host:port...]``), a
sync or asyncio ``Redis`` or ``RedisCluster`` client (only its address and
credentials are used: Pub/Sub needs connections of its own), or a list of node
addresses (``"host:port"`` or ``(host, port)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.cluster
from redis.asyncio.connection import ConnectionPool, SSLConnection, parse_url
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

#: What :meth:`LiveNodes.of` accepts.
LiveSource = (
    str
    | redis.Redis
    | aioredis.Redis
    | redis.cluster.RedisCluster
    | aioredis.RedisCluster
    | Sequence[str | tuple[str, int]]
)

# Credentials and TLS carried over from a client the caller passed.
_CARRIED = ("username", "password", "db", "client_name")


class NoOwner(RedisConnectionError):
    """A channel's slot has no master right now (a failover under way): retry later."""


@dataclass(frozen=True, order=True)
class Node:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class LiveNodes:
    """How to reach the node(s) serving the live channels; see the module docstring."""

    def __init__(
        self,
        seeds: Sequence[Node] = (),
        *,
        url: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        if not seeds and url is None:
            raise ValueError("the live reader needs a URL or at least one node address")
        self.url = url
        self.options = dict(options or {})
        self.known: list[Node] = list(dict.fromkeys(seeds))

    @classmethod
    def of(cls, source: LiveSource | LiveNodes) -> LiveNodes:
        """From a URL, a client, or node addresses (see the module docstring)."""
        if isinstance(source, LiveNodes):
            return source
        if isinstance(source, str):
            return cls._of_url(source)
        manager = getattr(source, "nodes_manager", None)
        if manager is not None:  # a sync or asyncio RedisCluster
            nodes = [*manager.startup_nodes.values(), *manager.nodes_cache.values()]
            seeds = [Node(n.host, int(n.port)) for n in nodes]
            return cls(seeds, options=_carried(manager.connection_kwargs, ssl=_is_ssl(source)))
        pool = getattr(source, "connection_pool", None)
        if pool is not None:  # a sync or asyncio Redis
            kwargs = pool.connection_kwargs
            seed = Node(kwargs.get("host", "localhost"), int(kwargs.get("port", 6379)))
            return cls([seed], options=_carried(kwargs, ssl=_is_ssl(source)))
        return cls([_node(address) for address in source])  # type: ignore[union-attr]

    @classmethod
    def _of_url(cls, url: str) -> LiveNodes:
        scheme = urlsplit(url).scheme
        if not scheme.endswith("+cluster"):
            return cls(url=url)
        # redis+cluster://[user:pass@]host:port[,host:port...][/db]: every address a seed.
        plain = scheme.removesuffix("+cluster")
        rest = url.split("://", 1)[1]
        credentials, _, hosts = rest.rpartition("@")
        hosts = hosts.split("/", 1)[0].split("?", 1)[0]
        first = f"{plain}://{credentials + '@' if credentials else ''}{hosts.split(',')[0]}"
        options = _carried(parse_url(first), ssl=plain == "rediss")
        options.pop("db", None)  # a cluster has only db 0
        return cls([_node(h) for h in hosts.split(",") if h], options=options)

    # -- connections -------------------------------------------------------------

    def connect(self, node: Node | None = None) -> aioredis.Redis:
        """A connection of its own to ``node`` (None: the URL as given), without retries:
        redis-py would reconnect and resubscribe silently, and the reader must know
        when messages may have been lost."""
        settings = {"socket_connect_timeout": 2.0, "socket_timeout": None}
        if node is None:
            assert self.url is not None
            return aioredis.Redis.from_url(self.url, retry=Retry(NoBackoff(), 0), **settings)
        kwargs = {**self.options, **settings, "host": node.host, "port": node.port}
        kwargs["retry"] = Retry(NoBackoff(), 0)
        return aioredis.Redis.from_pool(ConnectionPool(**kwargs))

    @property
    def candidates(self) -> list[Node | None]:
        """Whom to ask for the slot map, in order: the URL, then every known node."""
        return ([None] if self.url is not None else []) + list(self.known)

    async def plan(self, channels: list[str]) -> dict[Node | None, list[str]]:
        """The channels grouped by the connection to read them on (None: the URL's).

        Asks the first candidate that answers; raises the last connection error if
        none does, or :class:`NoOwner` if a channel's slot has no master now.
        """
        error: Exception = RedisConnectionError("no node to ask for the slot map")
        for candidate in self.candidates:
            client = self.connect(candidate)
            try:
                reply = await client.execute_command("CLUSTER", "SLOTS")
            except ResponseError as exc:
                if "cluster support disabled" not in str(exc).lower():
                    raise
                return {candidate: list(channels)}  # a single redis-server serves them all
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                error = exc
                continue
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            return self._group(reply, channels, fallback=candidate)
        raise error

    def _group(
        self, reply: list[Any], channels: list[str], fallback: Node | None
    ) -> dict[Node | None, list[str]]:
        ranges = []
        for first, last, master, *replicas in reply:
            nodes = [_reply_node(n, fallback) for n in (master, *replicas)]
            self.known.extend(n for n in nodes if n not in self.known)
            ranges.append((int(first), int(last), nodes[0]))
        groups: dict[Node | None, list[str]] = {}
        for channel in channels:
            slot = key_slot(channel.encode())
            owner = next((n for first, last, n in ranges if first <= slot <= last), None)
            if owner is None:
                raise NoOwner(f"no master serves slot {slot} of {channel}")
            groups.setdefault(owner, []).append(channel)
        return groups


def _node(address: str | tuple[str, int]) -> Node:
    if isinstance(address, str):
        host, _, port = address.rpartition(":")
        return Node(host or "localhost", int(port))
    return Node(address[0], int(address[1]))


def _reply_node(entry: list[Any], fallback: Node | None) -> Node:
    """A node of a CLUSTER SLOTS reply; an empty host is "the node you asked"."""
    host = entry[0].decode() if isinstance(entry[0], bytes) else str(entry[0])
    if host in ("", "?") and fallback is not None:
        host = fallback.host
    return Node(host or "127.0.0.1", int(entry[1]))


def _is_ssl(client: Any) -> bool:
    manager = getattr(client, "nodes_manager", None)
    if manager is not None:
        kwargs = manager.connection_kwargs
        kind = getattr(kwargs.get("connection_class"), "__name__", "")
        return bool(kwargs.get("ssl")) or "SSL" in kind
    return "SSL" in client.connection_pool.connection_class.__name__


def _carried(kwargs: dict[str, Any], *, ssl: bool) -> dict[str, Any]:
    options = {k: kwargs[k] for k in _CARRIED if kwargs.get(k) is not None}
    if ssl:
        options["connection_class"] = SSLConnection
        options.update({k: v for k, v in kwargs.items() if k.startswith("ssl_")})
    return options
