"""The live reader on a real redis-server: what its socket loop must keep doing.

Once every channel is subscribed the reader reads the socket itself
(``LiveReader._pump``) instead of redis-py's ``get_message``; these tests hold
what that loop owes: replies split over socket reads, both protocols, pongs,
unreadable messages, and a quiet connection that is alive. (A burst, a killed
connection, a failover and a silent server are in ``test_wire.py`` and
``test_partitioned_delivery.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from workbench.delivery import live
from workbench.delivery.entries import UserEntry
from workbench.delivery.hub import Hub, Subscription
from workbench.delivery.live import LiveReader, Resync
from workbench.delivery.userstreams import UserStreams, live_message
from workbench.domain import events as ev
from workbench.ops.redis_server import RedisServer
from workbench.streams.keys import UserStreamNames

DEADLINE = 10.0
_N = itertools.count()


def _event(user: str, payload: dict[str, Any]) -> ev.Event:
    n = next(_N)
    return ev.Event(
        event_id=f"evt_live{n}", type="escrow.created", aggregate_type="escrow",
        aggregate_id=f"esc_live{n}", sequence=1, user_ids=(user,), occurred_at=1.0,
        correlation_id="c", payload=payload,
    )  # fmt: skip


async def _next_of(subscription: Subscription, kind: type) -> Any:
    while True:
        message = await asyncio.wait_for(subscription.get(), DEADLINE)
        if isinstance(message, kind):
            return message


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _running(reader: LiveReader) -> AsyncIterator[LiveReader]:
    """The reader on its task, cancelled on the way out."""
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _with_protocol(url: str, protocol: int) -> str:
    return url if protocol == 2 else f"{url}{'&' if '?' in url else '?'}protocol=3"


@pytest.mark.parametrize("protocol", [2, 3])
def test_entries_larger_than_a_socket_read_arrive_whole_and_in_order(
    redis_url: str, protocol: int
) -> None:
    """Live messages of ~200 KB span several socket reads (64 KiB each): the
    reader feeds the parser and delivers a reply only once it is whole, with
    RESP2 arrays and RESP3 pushes alike; small ones around them keep their order."""
    names = UserStreamNames(f"big{next(_N)}")
    user = f"u{next(_N)}"
    client = redis.Redis.from_url(redis_url)
    sizes = [10, 200_000, 10, 150_000, 10]
    events = [_event(user, {"blob": "x" * size}) for size in sizes]

    async def scenario() -> None:
        hub = Hub(max_queue=100)
        subscription = hub.subscribe(user)
        async with _running(LiveReader(_with_protocol(redis_url, protocol), hub, names)) as reader:
            await _next_of(subscription, Resync)
            batches = UserStreams(client, names).append_entries([(e, ev.encode(e)) for e in events])
            want = [entry for batch in batches for _, entry in batch]
            got = [await _next_of(subscription, UserEntry) for _ in want]
            assert got == want
            assert reader.drained == len(events)  # all read by the reader's own loop
            assert reader.bad_messages == 0

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
    client.close()


def test_a_quiet_connection_is_pinged_and_kept(redis_url: str) -> None:
    """Nothing published for several liveness periods: the reader pings, the pongs
    count as hearing from the server, and the connection is kept (no reconnect, no
    Resync); an entry published afterwards still arrives."""
    names = UserStreamNames(f"quiet{next(_N)}")
    user = f"u{next(_N)}"
    client = redis.Redis.from_url(redis_url)

    def pings() -> int:
        return int(client.info("commandstats").get("cmdstat_ping", {}).get("calls", 0))

    async def scenario() -> None:
        hub = Hub()
        subscription = hub.subscribe(user)
        async with _running(LiveReader(redis_url, hub, names, liveness_s=0.2)) as reader:
            await _next_of(subscription, Resync)
            before = pings()
            await _until(lambda: pings() >= before + 5, "five liveness pings")
            assert reader.reconnects == 0 and reader.connected.is_set()
            assert subscription.qsize() == 0  # no second Resync
            [batch] = UserStreams(client, names).append_entries(
                [(e, ev.encode(e)) for e in [_event(user, {})]]
            )
            assert await _next_of(subscription, UserEntry) == batch[0][1]

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
    client.close()


def test_an_unreadable_live_message_is_counted_and_the_next_one_delivered(
    redis_url: str,
) -> None:
    """Whatever else is published on the live channel (not JSON, not six strings,
    a bad id) is counted and logged; the reader goes on with the next message."""
    names = UserStreamNames(f"bad{next(_N)}")
    user = f"u{next(_N)}"
    client = redis.Redis.from_url(redis_url)
    garbage = [b"not json", b"[1, 2, 3, 4, 5, 6]", b'["u", "x-1", "0-0", "e", "t", "{}"]', b"[]"]

    async def scenario() -> None:
        hub = Hub()
        subscription = hub.subscribe(user)
        async with _running(LiveReader(redis_url, hub, names)) as reader:
            await _next_of(subscription, Resync)
            for raw in garbage:
                client.publish(names.live_channel(), raw)
            [batch] = UserStreams(client, names).append_entries(
                [(e, ev.encode(e)) for e in [_event(user, {})]]
            )
            assert await _next_of(subscription, UserEntry) == batch[0][1]
            assert reader.bad_messages == len(garbage)
            assert reader.reconnects == 0

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
    client.close()


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{}",
        b'["u", "1-0", "0-0", "e", "t"]',
        b'["u", "1-0", "0-0", "e", "t", 7]',
        b'["u\xff", "1-0", "0-0", "e", "t", "{}"]',  # not UTF-8
    ],
)
def test_live_message_refuses_anything_but_six_strings_with_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a live message"):
        live_message(raw)


def test_live_message_reads_the_fan_outs_six_strings() -> None:
    user, entry = live_message(b'["alice", "5-1", "4-0", "evt_1", "escrow.created", "{}"]')
    assert user == "alice"
    assert (str(entry.id), str(entry.prev), entry.event_id, entry.type, entry.data) == (
        "5-1", "4-0", "evt_1", "escrow.created", "{}",
    )  # fmt: skip


def test_the_parser_the_pump_reads_with_says_not_enough_data_with_the_marker_it_expects(
    redis_url: str,
) -> None:
    """The pump stops draining at redis-py's "not enough data" marker: on a real
    subscribed connection, a reply cut in half must give exactly that marker (a
    redis-py that made its reader otherwise would fail here, not spin in production)."""

    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(f"marker{next(_N)}")
            assert await asyncio.wait_for(pubsub.get_message(timeout=DEADLINE), DEADLINE)
            feed = live._raw_feed(pubsub)
            assert feed is not None
            _, reader = feed
            reader.feed(b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$5\r\nhel")
            assert reader.gets() is live._NOT_ENOUGH_DATA
            reader.feed(b"lo\r\n")
            assert reader.gets() == [b"message", b"c", b"hello"]
        finally:
            await pubsub.aclose()
            await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))


def test_a_lost_feed_is_logged_without_the_redis_password(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """The reader's connection killed on a password-protected Redis: the warning
    names the server with its password as ``***`` (it printed the whole URL into
    the API's log, undoing the care that keeps it off ``ps``), and the reader
    reconnects."""
    password = "s3cret-in-the-url"
    names = UserStreamNames(f"pw{next(_N)}")
    with RedisServer(tmp_path / "redis", password=password) as server:
        client = server.client()

        async def scenario() -> None:
            hub = Hub()
            subscription = hub.subscribe(f"u{next(_N)}")
            async with _running(LiveReader(server.url, hub, names, liveness_s=0.2)) as reader:
                await _next_of(subscription, Resync)
                client.client_kill_filter(_type="pubsub")
                await _until(lambda: reader.reconnects >= 1, "a reconnect")
                await _next_of(subscription, Resync)

        with caplog.at_level(logging.WARNING, logger=live.__name__):
            asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
        client.close()
    lost = [r.getMessage() for r in caplog.records if "live reader lost Redis" in r.getMessage()]
    assert lost, caplog.text
    assert all(":***@" in message for message in lost), lost
    assert password not in caplog.text
