"""SSE frames encoded once: the same bytes as sse_starlette, shared by every session."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import redis
import redis.asyncio as aioredis
from sse_starlette import ServerSentEvent

from workbench.delivery.entries import UserEntry
from workbench.delivery.hub import Hub, SubscriptionClosed
from workbench.delivery.live import LiveReader
from workbench.delivery.sessions import SessionStats, SseSession
from workbench.delivery.userstreams import Page, UserStreamReader, UserStreams
from workbench.delivery.wire import (
    HEARTBEAT,
    LiveEntry,
    LiveEvent,
    encode_comment,
    encode_entry,
    encode_event,
    encode_page,
)
from workbench.domain import events as ev
from workbench.domain.streamid import ZERO, StreamId
from workbench.streams.keys import UserStreamNames

DEADLINE = 10.0
_N = itertools.count()

TEXTS = [
    "{}",
    '{"event_id":"e1","payload":{"amount":1500}}',
    "two\nlines",
    "crlf\r\nand cr\rand lf\n",
    "",
    "ünïcødé ✓",
    "\n",
    "a lone\rcarriage return",
]


@pytest.mark.parametrize("data", TEXTS)
@pytest.mark.parametrize("event", ["escrow.created", "odd\nname"])
def test_an_event_frame_is_byte_for_byte_sse_starlettes(data: str, event: str) -> None:
    assert (
        encode_event("5-1", event, data)
        == ServerSentEvent(data=data, event=event, id="5-1").encode()
    )


@pytest.mark.parametrize("data", TEXTS)
@pytest.mark.parametrize("event", ["escrow.created", "odd\nname", "cr\rname"])
def test_a_live_entrys_frame_is_byte_for_byte_sse_starlettes(data: str, event: str) -> None:
    """The live path builds a one-line frame itself; any line break takes encode_event."""
    entry = LiveEntry(StreamId(1700000000000, 12), StreamId(5, 0), "e", event, data)
    assert entry.sse.id == "1700000000000-12"
    assert entry.sse.frame == ServerSentEvent(data=data, event=event, id=entry.sse.id).encode()
    assert entry == UserEntry(StreamId(1700000000000, 12), StreamId(5, 0), "e", event, data)


@pytest.mark.parametrize("text", ["closing: slow consumer", "two\nlines", "ping"])
def test_a_comment_frame_is_byte_for_byte_sse_starlettes(text: str) -> None:
    assert encode_comment(text) == ServerSentEvent(comment=text).encode()
    assert encode_comment("ping") == HEARTBEAT


def test_a_page_is_its_entries_frames_in_order() -> None:
    entries = [
        UserEntry(StreamId(7, i), StreamId(7, i - 1) if i else ZERO, f"e{i}", "t", TEXTS[i])
        for i in range(len(TEXTS))
    ]
    assert encode_page(entries) == b"".join(encode_entry(e) for e in entries)
    assert encode_page([]) == b""


def _rows(types: list[str]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Raw rows as redis-py hands an XRANGE page over: one per text, ids 9-i."""
    return [
        (
            f"9-{i}".encode(),
            {
                b"prev": f"9-{i - 1}".encode() if i else b"0-0",
                b"event_id": f"e{i}".encode(),
                b"type": type_.encode(),
                b"data": data.encode(),
            },
        )
        for i, (type_, data) in enumerate(zip(types, TEXTS, strict=True))
    ]


@pytest.mark.parametrize("odd_type", ["escrow.created", "odd\nname", "cr\rname"])
def test_a_raw_page_writes_the_frames_of_its_entries(odd_type: str) -> None:
    # Line breaks in the data (most rows) and in the type of one row take the
    # careful path; the others are written from the raw bytes: the same frames.
    types = ["escrow.funded"] * len(TEXTS)
    types[1] = odd_type
    page = Page(_rows(types))
    entries = list(page)
    assert [e.data for e in entries] == TEXTS and entries[1].type == odd_type
    assert page.frames() == encode_page(entries)
    assert Page([]).frames() == b""


def test_a_raw_page_is_the_sequence_of_its_entries() -> None:
    rows = _rows(["t"] * len(TEXTS))
    page = Page(rows)
    assert len(page) == len(TEXTS) and bool(page) and not Page([])
    assert page[0] == UserEntry(StreamId(9, 0), ZERO, "e0", "t", TEXTS[0])
    assert page[-1].id == StreamId(9, len(TEXTS) - 1)
    assert page[-1].prev == StreamId(9, len(TEXTS) - 2)
    assert page[1:3] == [page[1], page[2]] and page == list(page)
    assert page != list(page)[:-1] and page != Page(rows[1:])


def test_a_live_entry_is_still_the_entry_it_carries() -> None:
    plain = UserEntry(StreamId(3, 1), StreamId(3, 0), "e", "escrow.funded", '{"a":1}')
    live = LiveEntry.of(plain)
    assert live == plain and plain == live and hash(live) == hash(plain)
    assert live != UserEntry(StreamId(3, 2), StreamId(3, 1), "e", "escrow.funded", '{"a":1}')
    assert LiveEntry.of(live) is live  # never encoded twice
    sse = live.sse
    assert isinstance(sse, LiveEvent)
    assert (sse.id, sse.event, sse.data) == ("3-1", "escrow.funded", '{"a":1}')
    assert sse.encode() is sse.frame == encode_entry(plain)


async def _until_ready(session: SseSession) -> object:
    messages = session.messages()
    while True:
        message = await asyncio.wait_for(anext(messages), DEADLINE)
        if isinstance(message, ServerSentEvent) and message.event == "ready":
            return messages


def test_sessions_of_one_user_share_one_encoded_frame_per_live_message(redis_url: str) -> None:
    """Two sessions (two phones of one user) get the very same object and bytes: the
    live reader encoded the message once, the sessions only pass it on."""
    names = UserStreamNames(f"wire{next(_N)}")
    user = f"u{next(_N)}"
    client = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        aclient = aioredis.Redis.from_url(redis_url)
        hub = Hub()
        live = LiveReader(redis_url, hub, names)
        task = asyncio.create_task(live.run())
        sessions = [
            SseSession(user, None, UserStreamReader(aclient, names), hub, SessionStats())
            for _ in range(2)
        ]
        try:
            await asyncio.wait_for(live.connected.wait(), DEADLINE)
            for session in sessions:
                await session.open()
            streams = [await _until_ready(s) for s in sessions]
            event = ev.Event(
                event_id=f"evt_w{next(_N)}", type="escrow.created", aggregate_type="escrow",
                aggregate_id="esc_1", sequence=1, user_ids=(user,), occurred_at=1.0,
                correlation_id="c", payload={"amount": 10},
            )  # fmt: skip
            [[(_, entry)]] = UserStreams(client, names).append_entries([(event, ev.encode(event))])
            first, second = [
                await asyncio.wait_for(anext(m), DEADLINE)  # type: ignore[call-overload]
                for m in streams
            ]
            assert first is second
            assert isinstance(first, LiveEvent) and first.encode() is second.encode()
            assert first.id == str(entry.id) and first.event == "escrow.created"
            assert first.frame == encode_event(first.id, "escrow.created", first.data)
        finally:
            for session in sessions:
                session.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await aclient.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
    client.close()


# -- the hub's heartbeat -------------------------------------------------------------------


def test_a_heartbeat_reaches_everyone_and_a_subscriber_that_never_took_one_is_closed() -> None:
    async def scenario() -> None:
        hub = Hub()
        reading, stalled = hub.subscribe("a"), hub.subscribe("b")
        woken: list[str] = []
        stalled.on_close = lambda: woken.append("stalled")
        assert hub.heartbeat() == 2
        assert await reading.get() is hub.heartbeat_message
        # reading took its heartbeat, stalled did not: the next beat closes it.
        assert hub.heartbeat() == 1
        assert stalled.closed_reason is not None and "stalled" in stalled.closed_reason
        assert woken == ["stalled"] and stalled.on_close is None
        assert hub.dropped_stalled == 1 and hub.subscriptions() == 1
        with pytest.raises(SubscriptionClosed):
            await stalled.get()
        assert await reading.get() is hub.heartbeat_message

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))


def test_a_cancelled_getter_does_not_cancel_another_waiting_on_the_same_subscription() -> None:
    async def scenario() -> None:
        hub = Hub()
        sub = hub.subscribe("a")
        first = asyncio.create_task(sub.get())
        second = asyncio.create_task(sub.get())
        await asyncio.sleep(0)  # both park on the shared wake-up
        first.cancel()
        await asyncio.gather(first, return_exceptions=True)
        assert first.cancelled() and not second.done()
        hub.publish("a", "hello")
        assert await asyncio.wait_for(second, DEADLINE) == "hello"

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))


def test_a_burst_of_live_messages_arrives_whole_and_in_order(redis_url: str) -> None:
    """A burst read off the socket at once is delivered from the parser's buffer (not
    one get_message each): every message, in order, for each user."""
    names = UserStreamNames(f"burst{next(_N)}")
    users = [f"b{next(_N)}" for _ in range(4)]
    client = redis.Redis.from_url(redis_url)
    events = [
        ev.Event(
            event_id=f"evt_b{next(_N)}", type="escrow.created", aggregate_type="escrow",
            aggregate_id=f"esc_{i}", sequence=1, user_ids=(users[i % 4],), occurred_at=1.0,
            correlation_id="c", payload={"i": i},
        )
        for i in range(2000)
    ]  # fmt: skip

    async def scenario() -> None:
        hub = Hub(max_queue=10_000)
        subs = {u: hub.subscribe(u) for u in users}
        live = LiveReader(redis_url, hub, names)
        task = asyncio.create_task(live.run())
        try:
            await asyncio.wait_for(live.connected.wait(), DEADLINE)
            for u in users:
                assert await asyncio.wait_for(subs[u].get(), DEADLINE) is not None  # the Resync
            pairs = UserStreams(client, names).append_entries([(e, ev.encode(e)) for e in events])
            for u in users:
                want = [entry for batch in pairs for user, entry in batch if user == u]
                got = [await asyncio.wait_for(subs[u].get(), DEADLINE) for _ in want]
                assert got == want
                assert all(isinstance(g, LiveEntry) for g in got)
            assert live.messages == len(events) and live.bad_messages == 0
            assert live.drained > 0  # the burst came through the buffer, not one by one
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))
    client.close()
