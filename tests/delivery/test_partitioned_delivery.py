"""Delivery on a partitioned log: fan-out per user partition, sharded live channels, replay.

The same code on a single redis-server with ``P`` partitions and on a real local
Redis Cluster (the session's ``redis_cluster``; tests that break nodes start
their own): an event reaches each of its users once whatever their partitions,
a redelivery appends nothing, a failed partition is completed on redelivery,
and the live reader (one connection per node) feeds the hub from every
partition's channel and tells sessions to catch up when a connection breaks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster

from workbench.delivery.entries import UserEntry
from workbench.delivery.hub import Hub, Subscription
from workbench.delivery.live import LiveReader, Resync
from workbench.delivery.livenodes import LiveNodes, Node
from workbench.delivery.sessions import SessionStats, SseSession
from workbench.delivery.userstreams import (
    FanoutIncomplete,
    NotReplicated,
    UserStreamReader,
    UserStreams,
    entry_from_fields,
)
from workbench.domain import events as ev
from workbench.domain.streamid import parse
from workbench.handlers.fanout import FanoutHandler
from workbench.ops.redis_cluster import LocalCluster
from workbench.ops.waiting import wait_until
from workbench.streams.connection import REDIS_DOWN, connect, server_version
from workbench.streams.keys import StreamNames, UserStreamNames
from workbench.streams.partitions import Partitioning, slot_of

P = 8
DEADLINE = 20.0
_EVENTS = iter(range(10**9))


def user_names(prefix: str, partitions: int = P) -> UserStreamNames:
    return UserStreamNames.of(StreamNames(prefix, Partitioning(partitions)))


def users_in(names: UserStreamNames, partitions: list[int]) -> list[str]:
    """One user id per partition asked for, in that order."""
    found: dict[int, str] = {}
    n = 0
    while not set(partitions) <= found.keys():
        user = f"u{n}"
        found.setdefault(names.partition_of(user), user)
        n += 1
    return [found[p] for p in partitions]


def event(*users: str) -> ev.Event:
    n = next(_EVENTS)
    return ev.Event(
        event_id=f"evt_{n}", type="escrow.created", aggregate_type="escrow",
        aggregate_id=f"esc_{n}", sequence=1, user_ids=users, occurred_at=1.0,
        correlation_id="c", payload={"n": n},
    )  # fmt: skip


def batch(*events: ev.Event) -> list[tuple[ev.Event, bytes]]:
    return [(e, ev.encode(e)) for e in events]


def stream_of(client: Any, names: UserStreamNames, user: str) -> list[UserEntry]:
    return [entry_from_fields(i, f) for i, f in client.xrange(names.stream(user))]


async def until(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def next_of(subscription: Subscription, kind: type) -> Any:
    """The next message of ``kind`` (others skipped), within the deadline."""
    while True:
        message = await asyncio.wait_for(subscription.get(), DEADLINE)
        if isinstance(message, kind):
            return message


class Target:
    """A place to run on: its sync client, an asyncio client factory, a key prefix."""

    def __init__(
        self, client: redis.Redis | RedisCluster, aclient: Callable[[], Any], prefix: str
    ) -> None:
        self.client, self.aclient, self.prefix = client, aclient, prefix


def needs_sharded_pubsub(client: redis.Redis) -> None:
    if server_version(client) < (7,):
        pytest.skip("Redis >= 7 needed: sharded Pub/Sub (SPUBLISH) came with 7.0")


@pytest.fixture(params=["server", "cluster"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    if request.param == "server":
        url = request.getfixturevalue("redis_url")
        client = redis.Redis.from_url(url)
        needs_sharded_pubsub(client)
        client.flushall()
        yield Target(client, lambda: aioredis.Redis.from_url(url), "wb")
    else:
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        prefix = request.getfixturevalue("cluster_prefix")
        client = cluster.client()
        yield Target(client, lambda: aioredis.RedisCluster.from_url(cluster.url), prefix)
    client.close()


# -- the fan-out ---------------------------------------------------------------------


def test_an_event_lands_once_in_each_users_stream_across_partitions(target: Target) -> None:
    names = user_names(target.prefix)
    alice, bob = users_in(names, [1, 6])
    streams = UserStreams(target.client, names)
    first, second = event(alice, bob), event(bob, alice)

    appended = streams.append_entries(batch(first, second))
    assert [[u for u, _ in pairs] for pairs in appended] == [[alice, bob], [bob, alice]]
    # The whole batch again (a worker died before its XACK): nothing twice, anywhere.
    assert streams.append_entries(batch(first, second)) == [[], []]

    for user in (alice, bob):
        entries = stream_of(target.client, names, user)
        assert [e.event_id for e in entries] == [first.event_id, second.event_id]
        assert entries[0].prev == parse("0-0") and entries[1].prev == entries[0].id
        assert entries == [e for pairs in appended for u, e in pairs if u == user]
    # Each partition has its own marker, in its own slot.
    for user in (alice, bob):
        assert target.client.exists(names.fanout_marker(first.event_id, names.partition_of(user)))


def test_the_fanout_handler_counts_partitions_runs_of_one_event_once(target: Target) -> None:
    names = user_names(target.prefix)
    users = users_in(names, [0, 3, 5, 7])
    handler = FanoutHandler(target.client, StreamNames(target.prefix, Partitioning(P)))
    one = event(*users)
    handler.handle([one])
    handler.handle([one])
    assert (handler.appended, handler.duplicates) == (4, 1)
    assert all(len(stream_of(target.client, names, u)) == 1 for u in users)


def test_a_node_that_forgot_the_script_gets_it_again(target: Target) -> None:
    names = user_names(target.prefix)
    alice, bob = users_in(names, [2, 5])
    streams = UserStreams(target.client, names)
    streams.append(batch(event(alice, bob)))
    target.client.script_flush()  # every primary of a cluster: as after restarts
    assert streams.append(batch(event(alice, bob))) == [2]


def test_a_failed_partition_is_completed_on_redelivery_and_the_others_deduped(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    """One node refuses writes (OOM): its partition's run fails, the others append;
    the handler raises the refusal as an outage (not the event's failure: it must
    not count towards a dead letter), so nothing is acked; redelivered, only that
    partition appends."""
    names = user_names(cluster_prefix)
    alice, bob = users_in(names, [0, 7])  # the first and the last slot range: two masters
    full = redis_cluster.master_of(slot_of(names.partitioning.tags[7]))  # type: ignore[union-attr]
    assert full.port != redis_cluster.master_of(slot_of(names.partitioning.tags[0])).port  # type: ignore[union-attr]
    client = redis_cluster.client()
    handler = FanoutHandler(client, StreamNames(cluster_prefix, Partitioning(P)))
    one = event(alice, bob)
    with full.client() as node:
        node.config_set("maxmemory", 1)
        try:
            with pytest.raises(redis.exceptions.OutOfMemoryError) as refused:
                handler.handle([one])
        finally:
            node.config_set("maxmemory", 0)
    failed = refused.value.__cause__
    assert isinstance(failed, FanoutIncomplete)
    assert [type(e) for e in failed.errors] == [redis.exceptions.OutOfMemoryError]
    assert [[u for u, _ in pairs] for pairs in failed.appended] == [[alice]]
    assert [len(stream_of(client, names, u)) for u in (alice, bob)] == [1, 0]

    redelivered = handler.append([one])
    assert [[u for u, _ in pairs] for pairs in redelivered] == [[bob]]
    assert [len(stream_of(client, names, u)) for u in (alice, bob)] == [1, 1]
    client.close()


# -- live messages -------------------------------------------------------------------


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))


class Running:
    """A live reader on its task; stopped on exit."""

    def __init__(self, reader: LiveReader) -> None:
        self.reader = reader

    async def __aenter__(self) -> LiveReader:
        self.task = asyncio.create_task(self.reader.run())
        await asyncio.wait_for(self.reader.connected.wait(), DEADLINE)
        return self.reader

    async def __aexit__(self, *exc: object) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def test_live_messages_go_out_on_each_users_partition_channel(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    needs_sharded_pubsub(client)
    names = user_names(f"live{next(_EVENTS)}")
    alice, bob = users_in(names, [1, 6])
    raw = client.pubsub()
    raw.ssubscribe(names.live_channel(names.partition_of(alice)))
    assert raw.get_message(timeout=5)["type"] == "ssubscribe"

    async def scenario() -> None:
        hub = Hub()
        subs = {user: hub.subscribe(user) for user in (alice, bob)}
        async with Running(LiveReader(redis_url, hub, names)) as reader:
            assert reader.connections == 1  # one server: every channel on one connection
            [pairs] = UserStreams(client, names).append_entries(batch(event(alice, bob)))
            for user, entry in pairs:
                assert await next_of(subs[user], UserEntry) == entry
            assert reader.messages == 2

    run(scenario)
    message = raw.get_message(timeout=5)
    assert message["channel"].decode() == names.live_channel(names.partition_of(alice))
    assert json.loads(message["data"])[0] == alice  # only alice's partition's message here
    assert raw.get_message(timeout=0.2) is None
    raw.close()
    client.close()


@pytest.mark.parametrize("source", ["sync client", "async client", "addresses"])
def test_on_the_cluster_one_connection_per_node_and_every_partition_delivers(
    redis_cluster: LocalCluster, cluster_prefix: str, source: str
) -> None:
    names = user_names(cluster_prefix)
    users = users_in(names, list(range(P)))
    client = redis_cluster.client()

    async def scenario() -> None:
        aclient = aioredis.RedisCluster.from_url(redis_cluster.url)
        given = {
            "sync client": client,
            "async client": aclient,
            "addresses": [f"127.0.0.1:{redis_cluster.nodes[1].port}"],
        }[source]
        hub = Hub()
        subs = {user: hub.subscribe(user) for user in users}
        async with Running(LiveReader(given, hub, names)) as reader:  # type: ignore[arg-type]
            assert reader.connections == len(redis_cluster.masters)
            [pairs] = UserStreams(client, names).append_entries(batch(event(*users)))
            assert len(pairs) == P
            for user, entry in pairs:
                assert await next_of(subs[user], UserEntry) == entry
        await aclient.aclose()

    run(scenario)
    client.close()


def test_replay_from_last_event_id_then_live_in_every_partition_on_the_cluster(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    names = user_names(cluster_prefix)
    users = users_in(names, [0, 3, 5])
    client = redis_cluster.client()
    streams = UserStreams(client, names)
    history = [streams.append_entries(batch(event(*users)))[0] for _ in range(4)]

    async def phone(reader: UserStreamReader, hub: Hub, user: str) -> None:
        mine = [entry for pairs in history for u, entry in pairs if u == user]
        session = SseSession(user, mine[0].id, reader, hub, SessionStats(), page_size=2)
        await session.open()
        try:
            messages = session.messages()
            replayed: list[str] = []
            while True:
                message = await asyncio.wait_for(anext(messages), DEADLINE)
                if isinstance(message, bytes):
                    replayed += [
                        line.removeprefix("id: ")
                        for line in message.decode().splitlines()
                        if line.startswith("id: ")
                    ]
                elif message.event == "ready":
                    break
            assert replayed == [str(e.id) for e in mine[1:]]
            [pairs] = streams.append_entries(batch(event(user)))
            live = await asyncio.wait_for(anext(messages), DEADLINE)
            assert live.id == str(pairs[0][1].id) and live.event == "escrow.created"
        finally:
            session.close()

    async def scenario() -> None:
        aclient = aioredis.RedisCluster.from_url(redis_cluster.url)
        hub = Hub()
        async with Running(LiveReader(client, hub, names)):
            reader = UserStreamReader(aclient, names)
            await asyncio.gather(*(phone(reader, hub, user) for user in users))
        await aclient.aclose()

    run(scenario)
    client.close()


# -- the live feed breaking ----------------------------------------------------------


def test_a_killed_live_connection_makes_the_hub_tell_sessions_to_catch_up(
    redis_cluster: LocalCluster, cluster_prefix: str
) -> None:
    names = user_names(cluster_prefix)
    [user] = users_in(names, [4])
    node = redis_cluster.master_of(slot_of(names.partitioning.tags[4]))  # type: ignore[union-attr]
    client = redis_cluster.client()

    async def scenario() -> None:
        hub = Hub()
        subscription = hub.subscribe(user)
        async with Running(LiveReader(client, hub, names)) as reader:
            await next_of(subscription, Resync)  # the first subscription's
            with node.client() as direct:
                assert direct.client_kill_filter(_type="pubsub") == 1
            assert (await next_of(subscription, Resync)).reason == "live feed (re)connected"
            assert reader.reconnects == 1
            assert reader.connections == len(redis_cluster.masters)
            [pairs] = UserStreams(client, names).append_entries(batch(event(user)))
            assert await next_of(subscription, UserEntry) == pairs[0][1]

    run(scenario)
    client.close()


def test_a_failover_moves_the_live_feed_to_the_new_master(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The server pushes ``sunsubscribe`` when its slots go to the promoted replica;
    the reader resubscribes there, sessions catch up, and the new master (which
    never loaded the fan-out script) gets it again."""
    names = user_names("fo", partitions=4)
    [user] = users_in(names, [2])
    with LocalCluster(tmp_path, masters=1, replicas=1) as cluster:
        client = cluster.client()
        old, new = cluster.masters[0], cluster.replicas[0]

        async def scenario() -> None:
            hub = Hub()
            subscription = hub.subscribe(user)
            async with Running(LiveReader(cluster.url, hub, names)) as reader:
                await next_of(subscription, Resync)
                UserStreams(client, names).append(batch(event(user)))
                await next_of(subscription, UserEntry)
                with new.client() as replica:
                    replica.execute_command("CLUSTER", "FAILOVER")
                await next_of(subscription, Resync)
                assert reader.reconnects == 1 and reader.connections == 1
                await until(lambda: cluster.master_of(0).port == new.port, "the promotion")
                [pairs] = UserStreams(client, names).append_entries(batch(event(user)))
                assert await next_of(subscription, UserEntry) == pairs[0][1]
                assert [e.id for e in stream_of(client, names, user)][-1] == pairs[0][1].id

        run(scenario)
        assert old.running
        client.close()


# -- where the reader connects ---------------------------------------------------------


def test_live_nodes_from_urls_clients_and_addresses() -> None:
    nodes = LiveNodes.of("redis+cluster://me:secret@10.0.0.1:7000,10.0.0.2:7001/0")
    assert nodes.url is None and nodes.known == [Node("10.0.0.1", 7000), Node("10.0.0.2", 7001)]
    assert (nodes.options["username"], nodes.options["password"]) == ("me", "secret")
    assert LiveNodes.of("redis://localhost:6379/0").candidates == [None]
    assert LiveNodes.of(["h:1", ("k", 2)]).known == [Node("h", 1), Node("k", 2)]
    plain = LiveNodes.of(redis.Redis(host="h", port=3, password="pw"))
    assert plain.known == [Node("h", 3)] and plain.options["password"] == "pw"
    with pytest.raises(ValueError):
        LiveNodes([])


def test_runs_refused_while_the_cluster_is_down_are_not_the_events_fault(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """CLUSTERDOWN (a master gone, no replica yet promoted) fails every run: the
    handler raises it as Redis down, which the consumer retries after its pause
    instead of counting a failure against each event (and dead-lettering it)."""
    names = user_names("down")
    alice, bob = users_in(names, [0, 1])  # the first slot range: the first master
    with LocalCluster(tmp_path, masters=3, replicas=0) as cluster:
        client = cluster.client()
        handler = FanoutHandler(client, StreamNames("down", Partitioning(P)))
        handler.handle([event(alice, bob)])
        cluster.kill(cluster.masters[2])  # not alice's nor bob's master
        wait_until(
            lambda: cluster._state(cluster.masters[0]) == "fail",
            timeout=DEADLINE,
            what="the cluster to say it is down",
        )
        with pytest.raises(REDIS_DOWN) as down:
            handler.handle([event(alice, bob)])
        assert isinstance(down.value.__cause__, FanoutIncomplete)
        client.close()


def test_a_redelivered_batch_waits_for_what_its_first_run_wrote(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """WAIT covers the writes of its own connection only. A batch whose first run's
    WAIT timed out comes back on a new connection (a restarted worker, another
    node's); every run finds its marker, yet the batch must not be acked while the
    replica still lacks the first run's entries: the duplicate writes too."""
    names = user_names("wait", 4)
    with LocalCluster(tmp_path, masters=1, replicas=1) as cluster:
        replica = next(n for n in cluster.nodes if n is not cluster.master_of(0))
        url = cluster.url.replace("redis://", "redis+cluster://")
        fanned = batch(event(*users_in(names, [0, 1])))
        first = connect(url)
        assert replica.pid is not None
        os.kill(replica.pid, signal.SIGSTOP)
        try:
            with pytest.raises(NotReplicated):
                UserStreams(first, names, wait_replicas=1, wait_timeout_ms=200).append(fanned)
            again = connect(url)  # another process's connections
            with pytest.raises(NotReplicated):
                UserStreams(again, names, wait_replicas=1, wait_timeout_ms=200).append(fanned)
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        done = UserStreams(again, names, wait_replicas=1, wait_timeout_ms=5000).append(fanned)
        assert done == [0]  # the replica caught up: the redelivery is acked, nothing twice
        first.close()
        again.close()


def test_a_live_connection_that_goes_silent_is_found_dead_by_its_ping(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A lost machine sends no reset: the reader's connection would wait forever.
    Stopped (SIGSTOP), the server answers no ping; the reader takes the feed for
    lost, reconnects once it answers again, and sessions are told to catch up."""
    from workbench.ops.redis_server import RedisServer

    names = user_names("silent", partitions=4)
    [user] = users_in(names, [1])
    with RedisServer(tmp_path / "r") as server:
        client = connect(server.url)
        assert server.pid is not None

        async def scenario() -> None:
            hub = Hub()
            subscription = hub.subscribe(user)
            async with Running(LiveReader(server.url, hub, names, liveness_s=0.2)) as reader:
                await next_of(subscription, Resync)
                os.kill(server.pid, signal.SIGSTOP)  # type: ignore[arg-type]
                try:
                    await wait_for_async(lambda: not reader.connected.is_set(), 10)
                finally:
                    os.kill(server.pid, signal.SIGCONT)  # type: ignore[arg-type]
                assert (await next_of(subscription, Resync)).reason == "live feed (re)connected"
                assert reader.reconnects == 1
                [pairs] = UserStreams(client, names).append_entries(batch(event(user)))
                assert await next_of(subscription, UserEntry) == pairs[0][1]

        run(scenario)
        client.close()


async def wait_for_async(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
