"""Connections: a ``redis+cluster://`` URL gives a cluster client; failover errors count
as "Redis is down"; a server refusing writes for a while counts as transient."""

from __future__ import annotations

import asyncio
import shutil
import threading

import pytest
import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    ClusterDownError,
    ClusterError,
    MasterDownError,
    SlotNotCoveredError,
    TryAgainError,
)

from workbench.ops.redis_cluster import LocalCluster
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.streams.connection import (
    REDIS_DOWN,
    REFUSAL_CODES,
    async_client,
    close_async_client,
    connect,
    execute,
    is_cluster,
    is_cluster_url,
    node_url,
    packed,
    queue_script,
    redacted,
    refused,
    transient,
)


def test_cluster_urls_are_told_from_node_urls() -> None:
    assert is_cluster_url("redis+cluster://127.0.0.1:7000")
    assert is_cluster_url("rediss+cluster://h:1")
    assert not is_cluster_url("redis://127.0.0.1:6379/0")
    assert node_url("redis+cluster://127.0.0.1:7000") == "redis://127.0.0.1:7000"
    assert node_url("unix:///tmp/r.sock") == "unix:///tmp/r.sock"


@pytest.mark.parametrize(
    "error", [ClusterDownError, MasterDownError, TryAgainError, ClusterError, SlotNotCoveredError]
)
def test_a_failing_over_cluster_counts_as_redis_down(error: type[Exception]) -> None:
    assert isinstance(error("CLUSTERDOWN"), REDIS_DOWN)


def _error_of(command) -> redis.ResponseError:  # type: ignore[no-untyped-def]
    with pytest.raises(redis.ResponseError) as raised:
        command()
    return raised.value


def _write_errors(client: redis.Redis, key: str = "s") -> list[redis.ResponseError]:
    """A write's error: alone, in a pipeline (where redis-py prefixes a note), in
    MULTI, and met by a script's ``redis.call`` (which Redis 6.2 wraps)."""
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, {"a": 1})
    multi = client.pipeline(transaction=True)
    multi.xadd(key, {"a": 1})
    script = "return redis.call('XADD', KEYS[1], '*', 'a', '1')"
    return [
        _error_of(lambda: client.xadd(key, {"a": 1})),
        _error_of(pipe.execute),
        _error_of(multi.execute),
        _error_of(lambda: client.eval(script, 1, key)),
    ]


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_a_server_refusing_writes_for_a_while_is_transient_and_a_bad_command_is_not(
    tmp_path, binary: str
) -> None:  # type: ignore[no-untyped-def]
    """Each refusal produced on a real redis-server, as redis-py raises it, alone
    and in a pipeline: OOM (maxmemory, noeviction), MISCONF (a background save
    that failed: its directory was removed), NOREPLICAS, READONLY (a replica),
    UNBLOCKED (a blocked read when the master turns replica), BUSY (a script
    past its time limit); on Redis 7 and on the bundled 6.2, which wraps an
    error a script's ``redis.call`` met (UNBLOCKED on 7 only). A wrong type or a
    script's own error is the command's fault, not a refusal."""
    with RedisServer(tmp_path / "redis", binary=binary) as server:
        client = server.client()
        client.set("text", "x")
        errors: dict[str, list[redis.ResponseError]] = {}
        client.config_set("maxmemory", 1)
        errors["OOM"] = _write_errors(client)
        client.config_set("maxmemory", 0)
        client.config_set("min-replicas-to-write", 1)
        errors["NOREPLICAS"] = _write_errors(client)
        client.config_set("min-replicas-to-write", 0)
        client.config_set("save", "3600 1")  # MISCONF guards configured saves only
        shutil.rmtree(server.directory)  # where the save would go
        client.bgsave()
        wait_until(
            lambda: client.info("persistence")["rdb_last_bgsave_status"] == "err",
            timeout=10,
            what="the background save to fail",
        )
        errors["MISCONF"] = _write_errors(client)
        server.directory.mkdir()
        client.config_set("save", "")  # or the shutdown's save fails too, and it waits
        client.config_set("lua-time-limit", 20)  # busy-reply-threshold on 7
        spinner = threading.Thread(
            target=lambda: _error_of(lambda: server.client().eval("while true do end", 0))
        )
        spinner.start()
        errors["BUSY"] = wait_until(lambda: _busy_errors(server), timeout=10, what="BUSY")
        client.script_kill()
        spinner.join(10)
        if server.version >= (7,):  # 6.2 does not unblock a read when the role changes
            errors["UNBLOCKED"] = _unblocked_read(server, client)
        client.replicaof("127.0.0.1", server.port + 1)  # a master that is not there
        errors["READONLY"] = _write_errors(client)
        client.replicaof("NO", "ONE")
        bad = [
            *_write_errors(client, "text"),
            _error_of(lambda: client.eval("return redis.call('nope')", 0)),
        ]
        version = server.version
        client.close()
    assert sorted(errors) == sorted(REFUSAL_CODES - ({"UNBLOCKED"} if version < (7,) else set()))
    for code, found in errors.items():
        assert len(found) == (1 if code == "UNBLOCKED" else 2 if code == "BUSY" else 4)
        for error in found:
            assert refused(error) and transient(error), (code, error)
    for error in bad:
        assert not refused(error) and not transient(error), error


def _unblocked_read(server: RedisServer, client: redis.Redis) -> list[redis.ResponseError]:
    """The error of a read blocked when its master is made a replica."""
    client.xgroup_create("s", "g", "$", mkstream=True)
    blocked: list[redis.ResponseError] = []
    reader = server.client()
    waiting = threading.Thread(
        target=lambda: blocked.append(
            _error_of(lambda: reader.xreadgroup("g", "c", {"s": ">"}, block=4000))
        )
    )
    waiting.start()
    wait_until(lambda: client.info("clients")["blocked_clients"] == 1, timeout=10, what="a block")
    client.replicaof("127.0.0.1", server.port + 1)  # a master that is not there
    waiting.join(10)
    client.replicaof("NO", "ONE")
    reader.close()
    return blocked


def _busy_errors(server: RedisServer) -> list[redis.ResponseError] | None:
    """PING's error alone and in a pipeline, once a script has run too long."""
    probe = server.client()
    try:
        probe.ping()
    except redis.ResponseError as alone:
        pipe = probe.pipeline(transaction=False)
        pipe.ping()
        return [alone, _error_of(pipe.execute)]
    finally:
        probe.close()
    return None


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss+cluster://me:s3cret@node:7000", "rediss+cluster://me:***@node:7000"),
        ("postgresql+psycopg://wb:s3cret@db/wb", "postgresql+psycopg://wb:***@db/wb"),
        ("unix:///tmp/r.sock?db=0&password=s3cret", "unix:///tmp/r.sock?db=0&password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("postgresql://wb@db/wb", "postgresql://wb@db/wb"),
        ("bad 'redis://:s3cret@h:1' in a message", "bad 'redis://:***@h:1' in a message"),
    ],
)
def test_a_url_for_a_log_hides_its_password_and_keeps_the_rest(url: str, shown: str) -> None:
    assert redacted(url) == shown


def test_a_plain_url_gives_a_plain_client(redis_url: str) -> None:
    client = connect(redis_url)
    assert isinstance(client, redis.Redis) and not is_cluster(client)
    assert client.ping()
    client.close()


def test_a_cluster_url_reaches_every_master(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    url = redis_cluster.url.replace("redis://", "redis+cluster://")
    client = connect(url)
    assert isinstance(client, RedisCluster) and is_cluster(client)
    keys = [f"{cluster_prefix}:{{p{n}}}:k" for n in range(30)]
    for key in keys:
        client.set(key, "v")
    assert len({redis_cluster.master_of(client.keyslot(k)).port for k in keys}) == 3
    assert [client.get(k) for k in keys] == [b"v"] * 30

    async def read_back() -> list[bytes | None]:
        aclient = async_client(url)
        assert is_cluster(aclient)
        try:
            return [await aclient.get(k) for k in keys]
        finally:
            await close_async_client(aclient)  # what the API does on shutdown

    assert asyncio.run(read_back()) == [b"v"] * 30
    client.close()


def _getkeys_calls(cluster: LocalCluster) -> int:
    total = 0
    for node in cluster.nodes:
        with node.client() as direct:
            stats = direct.info("commandstats")
            total += int(stats.get("cmdstat_command|getkeys", {}).get("calls", 0))
    return total


def test_scripts_queued_on_a_cluster_go_straight_to_their_slot_s_node(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    client = connect(redis_cluster.url.replace("redis://", "redis+cluster://"))
    sha = client.script_load("return redis.call('SET', KEYS[1], ARGV[1])")
    keys = [f"{cluster_prefix}:{{s{n}}}:k" for n in range(30)]
    before = _getkeys_calls(redis_cluster)
    pipe = client.pipeline(transaction=False)
    for n, key in enumerate(keys):
        queue_script(pipe, client, sha, [key], str(n))
    assert pipe.execute() == [b"OK"] * 30
    assert _getkeys_calls(redis_cluster) == before  # no COMMAND GETKEYS round trips
    assert [client.get(k) for k in keys] == [str(n).encode() for n in range(30)]
    plain = client.pipeline(transaction=False)
    plain.execute_command("EVALSHA", sha, 1, keys[0], "x")
    plain.execute()
    assert _getkeys_calls(redis_cluster) > before  # what redis-py does by itself
    client.close()


def test_a_plain_async_client_is_closed_with_its_pool(redis_url: str) -> None:
    async def open_and_close() -> list[bool]:
        aclient = async_client(redis_url)
        assert await aclient.ping()
        pooled = list(aclient.connection_pool._available_connections)  # type: ignore[attr-defined]
        assert pooled and all(c.is_connected for c in pooled)
        await close_async_client(aclient)
        return [c.is_connected for c in pooled]

    assert asyncio.run(open_and_close()) == [False]


def test_execute_runs_a_pipeline_on_a_single_connection_clients_own_connection(
    redis_url: str,
) -> None:
    """The same replies as ``pipe.execute`` (parsed, errors raised or returned), on the
    client's one connection (no second one from the pool), retried over a dropped one."""
    client = connect(redis_url, single_connection_client=True)
    client.delete("conn:s", "conn:k")
    client.xadd("conn:s", {"data": "x"}, id="1-1")
    own = client.client_id()

    def pipe() -> redis.client.Pipeline:
        p = client.pipeline(transaction=False)
        p.xrange("conn:s", "-", "+")
        p.client_id()
        p.incr("conn:k")
        return p

    assert execute(client, pipe()) == [[(b"1-1", {b"data": b"x"})], own, 1]
    pooled = pipe().execute()  # redis-py's own: the same replies, on a pool connection
    assert pooled[0] == [(b"1-1", {b"data": b"x"})] and pooled[1] != own and pooled[2] == 2
    bad = client.pipeline(transaction=False)
    bad.incr("conn:k")
    bad.hset("conn:s", "f", "v")  # WRONGTYPE
    bad.incr("conn:k")
    with pytest.raises(redis.ResponseError, match="Command # 2"):
        execute(client, bad)
    bad = client.pipeline(transaction=False)
    bad.hset("conn:s", "f", "v")
    bad.incr("conn:k")
    error, n = execute(client, bad, raise_on_error=False)
    assert isinstance(error, redis.ResponseError) and n == 5
    # A dropped connection is reconnected and the pipeline sent again, as redis-py would.
    connect(redis_url).client_kill_filter(_id=own)
    assert execute(client, pipe())[1:] == [client.client_id(), 6]
    assert client.client_id() != own
    client.close()


def test_packed_is_what_redis_py_sends(redis_url: str) -> None:
    """The bytes redis-py's packer makes, for every kind of argument the runtime sends
    (a two-word command name split); what hiredis refuses goes to redis-py's packer."""
    client = connect(redis_url, single_connection_client=True)
    conn = client.connection
    commands = [
        ("XREADGROUP", "GROUP", "g", "c-1", "COUNT", 100, "STREAMS", "s", ">"),
        ("XINFO STREAM", "conn:s"),
        ("HSET", "h", "c-1", repr(1.5), b"raw", 2.25),
        ("XACK", "s", "g", "1-1", "1-2"),
    ]
    assert b"".join(packed(conn, commands)) == b"".join(conn.pack_commands(commands))
    odd = [("SET", "k", bytearray(b"v"))]  # hiredis takes no bytearray; redis-py converts it
    assert packed(conn, odd) == conn.pack_commands(odd)
    odd = [("SET", "k", True)]  # nor a bool, which redis-py refuses too
    with pytest.raises(redis.DataError):
        packed(conn, odd)
    odd = [("SET", "k", bytearray(b"v"))]
    assert packed(conn, odd) == conn.pack_commands(odd)
    with pytest.raises(redis.DataError):  # redis-py refuses what it cannot send
        packed(conn, [("SET", "k", {"not": "sendable"})])
    client.delete("conn:s")
    client.xadd("conn:s", {"data": "x"}, id="1-1")
    pipe = client.pipeline(transaction=False)
    pipe.xinfo_stream("conn:s")  # sent as XINFO STREAM, parsed by the pipeline
    [info] = execute(client, pipe)
    assert info["length"] == 1 and info["last-generated-id"] == b"1-1"
    client.delete("conn:s")
    client.close()
