"""Connections to Redis: bounded timeouts, quick retries, and what counts as "Redis is down".

Two pauses, on two scales. A client retries a command twice within a fraction
of a second (:func:`_quick_backoff`): that smooths over a dropped connection or
a restarted server. A loop above the clients (relay, consumers, the live
reader) that still sees Redis or the database fail waits
:func:`outage_backoff` before its next pass, growing towards two seconds
while the outage lasts, with jitter so that many processes do not come back
in step.

**A cluster.** A URL with the scheme ``redis+cluster://`` (or
``rediss+cluster://``) names any node of a Redis Cluster: :func:`connect` and
:func:`async_client` then return redis-py's cluster clients, which discover
the other nodes and route each command by its key's slot. The same runtime
code runs on both, because every script, MULTI and multi-key read it sends
touches one partition's keys (:mod:`workbench.streams.keys`). While a master
fails over, the cluster answers CLUSTERDOWN or TRYAGAIN: those count as
"Redis is down" too, and the loops retry after their pause.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import sqlalchemy.exc
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterDownError, ClusterError, SlotNotCoveredError, TryAgainError
from redis.retry import Retry

# BLOCK must stay below this, or redis-py raises TimeoutError mid-read.
SOCKET_TIMEOUT_S = 5.0

#: Redis is unreachable (restarting, or the connection dropped): retry later.
REDIS_DOWN = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterDownError,  # a master failing over (also MasterDownError)
    TryAgainError,  # a slot migrating
    ClusterError,  # redirections exhausted ("TTL exhausted") while the slot map settles
    SlotNotCoveredError,  # no node serves the slot yet: a failover not finished
)
#: URL schemes naming a Redis Cluster (any one node; the client finds the rest).
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
#: Failures a loop retries after a pause: Redis down, or the database connection lost.
TRANSIENT = (*REDIS_DOWN, sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
#: Error codes of a Redis that is up but refuses writes for a while: out of memory
#: under ``noeviction`` (OOM), a replica or a demoted master (READONLY), a failed
#: AOF write or background save (MISCONF), too few replicas for
#: ``min-replicas-to-write`` (NOREPLICAS), a script past its time limit (BUSY),
#: a blocked read cut short because the server changed role (UNBLOCKED).
REFUSAL_CODES = frozenset({"OOM", "READONLY", "MISCONF", "NOREPLICAS", "BUSY", "UNBLOCKED"})
# Where the code stands in redis-py's message: first; after a pipeline's note
# (the async client quotes the error as a tuple); after "-" in an error that a
# script's redis.call raised (Redis 6.2); after "because of: " in EXECABORT.
_REFUSAL = re.compile(
    r"(?:^|of pipeline caused error: \(?'?|: -|because of: )"
    rf"(?:{'|'.join(sorted(REFUSAL_CODES))}) "
)


def refused(exc: BaseException) -> bool:
    """Is ``exc`` Redis refusing a command for a while (:data:`REFUSAL_CODES`)?

    Not the entry's fault and not a bug: a loop waits its pause and tries
    again, as when Redis is down, instead of dying (a supervisor would restart
    it into the same refusal) or counting a failure against the events in hand
    (which would dead-letter them). redis-py names OOM and READONLY with their
    own classes and leaves the code out of the message; the others keep it in
    the message, where :data:`_REFUSAL` looks for it.
    """
    if isinstance(exc, (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError)):
        return True
    return isinstance(exc, redis.ResponseError) and _REFUSAL.search(str(exc)) is not None


def transient(exc: BaseException) -> bool:
    """Will a later pass likely succeed: Redis or the database down (:data:`TRANSIENT`),
    or Redis refusing for a while (:func:`refused`)?"""
    return isinstance(exc, TRANSIENT) or refused(exc)


_USERINFO_PASSWORD = re.compile(r"(//[^/@:]*):[^/@]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*")


def redacted(url: str) -> str:
    """``url`` fit for a log or an error message: a password in its user info
    (``redis://:secret@host``, ``postgresql://user:secret@host``) or its query
    (``unix://...?password=secret``) shown as ``***``. Works on URLs no parser
    accepts, so a message about a bad URL does not print its secret."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO_PASSWORD.sub(r"\1:***@", url))


def outage_backoff() -> ExponentialWithJitterBackoff:
    """The pause schedule of a loop whose pass failed because Redis or the database was down.

    ``outage_backoff().compute(failures)`` is the wait after ``failures``
    failures in a row: uniformly random below ``0.05 * 2**failures`` seconds
    (full jitter), never more than 2 s. The loop counts the failures and resets
    the count after a pass that succeeds.
    """
    return ExponentialWithJitterBackoff(cap=2.0, base=0.05)


def _quick_backoff() -> ExponentialWithJitterBackoff:
    # A client's own retries: short, so a command fails fast when Redis is really down.
    return ExponentialWithJitterBackoff(cap=0.5, base=0.02)


def is_cluster_url(url: str) -> bool:
    """Does ``url`` name a Redis Cluster (``redis+cluster://host:port``)?"""
    return url.startswith(CLUSTER_SCHEMES)


def node_url(url: str) -> str:
    """``url`` with a cluster scheme turned into the plain one of its node."""
    return url.replace("+cluster://", "://", 1) if is_cluster_url(url) else url


def is_cluster(client: object) -> bool:
    """Is ``client`` one of redis-py's cluster clients (sync or asyncio)?"""
    kind = type(client)
    known = _CLUSTER_TYPES.get(kind)
    if known is None:  # once per class: the asyncio client's check goes through typing
        known = _CLUSTER_TYPES[kind] = issubclass(kind, (RedisCluster, aiocluster.RedisCluster))
    return known


#: Whether each client class seen is a cluster client (:func:`is_cluster`).
_CLUSTER_TYPES: dict[type, bool] = {}


def on_slot_of(client: Any, key: str) -> dict[str, Any]:
    """``execute_command`` options sending a command to the node serving ``key``'s slot
    (nothing on a single server). For commands whose keys redis-py cannot find by
    itself (EVALSHA in a pipeline, XREADGROUP's ``STREAMS``), it otherwise asks the
    server with ``COMMAND GETKEYS``: a round trip per command. If the slot moved,
    the node answers MOVED and redis-py sends that command again, routed afresh."""
    return {"target_nodes": client.get_node_from_key(key)} if is_cluster(client) else {}


def queue_script(pipe: Any, client: Any, sha: str, keys: list[str], *args: Any) -> None:
    """Queue ``EVALSHA sha`` with ``keys`` and ``args`` on ``pipe`` (a pipeline of ``client``).

    Not ``pipe.evalsha``: a cluster's pipeline refuses it. On a cluster the
    command goes to the node serving ``keys[0]``'s slot, found in the client's
    slot map: left to itself redis-py asks the server which keys each EVALSHA
    names (``COMMAND GETKEYS``), a round trip per script. A script's keys share
    one slot (:mod:`workbench.streams.keys`); if the slot moved, the node answers
    MOVED and redis-py sends that command again, routed afresh.
    """
    pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args, **on_slot_of(client, keys[0]))


def execute(client: Any, pipe: Any, *, raise_on_error: bool = True) -> list[Any]:
    """``pipe.execute(raise_on_error=...)`` for a pipeline of ``client``, on the
    client's own connection when it has one (``single_connection_client``, as a
    virtual run's client), else as redis-py runs it.

    Same commands, one write, the same replies (parsed by the pipeline) and the
    same retry (reconnect, send again): what is left out is redis-py's per-call
    bookkeeping around a pipeline, mostly a pool checkout that polls the socket of
    the connection it hands out, which costs as much again as the round trip, and
    its per-argument packing pass (:func:`packed`).
    Plain pipelines only: a MULTI, a WATCH, queued scripts or a cluster's
    pipeline go to ``pipe.execute`` (and no HIMPORT command: the runtime sends none).
    A client with one connection is driven by one thread at a time, so the
    pipeline and the client's commands take turns on it (under its lock) in the
    order they are made.
    """
    conn = getattr(client, "connection", None)
    stack = pipe.command_stack
    if (conn is None or not isinstance(pipe, redis.client.Pipeline) or is_cluster(client)
            or pipe.transaction or pipe.explicit_transaction or pipe.watching
            or pipe.scripts or not stack):  # fmt: skip
        return pipe.execute(raise_on_error=raise_on_error)  # type: ignore[no-any-return]
    pipe.command_stack = []  # run once, as execute's reset does
    with client.single_connection_lock:
        return conn.retry.call_with_retry(  # type: ignore[no-any-return]
            lambda: _run_pipeline(pipe, conn, stack, raise_on_error),
            lambda _error: conn.disconnect(),
        )


def _run_pipeline(pipe: Any, conn: Any, stack: list[Any], raise_on_error: bool) -> list[Any]:
    # redis-py's Pipeline._execute_pipeline for plain commands: one write, then every
    # reply read (an error reply kept in its place) before the first error is raised,
    # so the connection is never left with a reply unread.
    conn.send_packed_command(packed(conn, [args for args, _ in stack]))
    replies: list[Any] = []
    for args, options in stack:
        try:
            replies.append(pipe.parse_response(conn, args[0], **options))
        except redis.ResponseError as exc:
            replies.append(exc)
    if raise_on_error:
        pipe.raise_first_error(stack, replies)
    return replies


def packed(conn: Any, commands: Sequence[Sequence[Any]]) -> list[bytes]:
    """``commands`` in Redis' protocol, ready for ``conn.send_packed_command`` (one
    buffer in a list: it sends a list item by item).

    What ``conn.pack_commands`` sends, packed by hiredis straight from the
    arguments (str, bytes, int, float): redis-py first passes over every argument
    in Python, which costs more than the packing. A command name of two words
    ("XINFO STREAM") is split, as redis-py does; the runtime names its commands
    in str (a name given as bytes is sent as it is). An argument hiredis
    refuses (None, a bool, a bytearray) goes to redis-py's packer, which converts
    it or refuses it (``DataError``). Not for a memoryview: hiredis would copy its
    buffer as it lies, where redis-py copies the view (the runtime sends none).
    """
    try:
        return [b"".join([hiredis.pack_command(_words(args)) for args in commands])]
    except TypeError:
        return conn.pack_commands(commands)  # type: ignore[no-any-return]


def _words(args: Sequence[Any]) -> tuple[Any, ...]:
    name = args[0]
    if isinstance(name, str) and " " in name:
        return (*name.split(), *args[1:])
    return tuple(args)


def connect(url: str | None = None, **overrides: object) -> redis.Redis:
    """A client with bounded timeouts and a few quick retries.

    Loops above this (relay, consumers) add :func:`outage_backoff`; the retry here
    only smooths over a dropped connection. A retried XADD may append an event
    twice: consumers dedupe by event id. A ``redis+cluster://`` URL gives a
    :class:`~redis.cluster.RedisCluster` (typed as a client: same commands).
    """
    url = url or os.environ.get("REDIS_URL")
    if not url:
        raise RuntimeError("no Redis URL: set REDIS_URL or start the embedded server")
    options: dict[str, object] = {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": 2.0,
        "retry": Retry(_quick_backoff(), retries=2),
    }
    if is_cluster_url(url):
        options.update(overrides)
        return RedisCluster.from_url(node_url(url), **options)  # type: ignore[arg-type,return-value]
    options["health_check_interval"] = 30
    options.update(overrides)
    return redis.Redis.from_url(url, **options)  # type: ignore[arg-type]


def async_client(url: str, *, max_connections: int = 16) -> aioredis.Redis:
    """An asyncio client on a bounded pool whose connections are retried after a restart.

    A pooled connection goes stale when redis-server restarts; without a
    retry the first command on it fails (the API answered 503 once per stale
    connection). Each command is retried twice on a connection or timeout
    error, reconnecting first, so a restart costs a reconnect, not a failure.
    A ``redis+cluster://`` URL gives redis-py's asyncio cluster client, with
    ``max_connections`` per node.
    """
    if is_cluster_url(url):
        return aiocluster.RedisCluster.from_url(  # type: ignore[return-value]
            node_url(url),
            max_connections=max_connections,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=2.0,
            retry=AsyncRetry(_quick_backoff(), retries=2),
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,  # waiting for a free connection
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=2.0,
        retry=AsyncRetry(_quick_backoff(), retries=2),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


async def close_async_client(client: aioredis.Redis | aiocluster.RedisCluster) -> None:
    """Close an :func:`async_client` and its connections, whichever kind it is.

    The plain client was given its pool, so it must be told to close that too;
    the cluster client owns its nodes' pools and refuses the argument.
    """
    if isinstance(client, aiocluster.RedisCluster):
        await client.aclose()
    else:
        await client.aclose(close_connection_pool=True)


def server_version(client: redis.Redis) -> tuple[int, ...]:
    version = client.info("server")["redis_version"]
    return tuple(int(part) for part in str(version).split(".")[:3])
