"""The SSE response on its own: driven through ASGI as uvicorn drives it, with a real
session (real Redis), to see what it costs per connection and how it ends."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from typing import Any

import redis.asyncio as aioredis

from workbench.delivery.hub import Hub, SubscriptionClosed
from workbench.delivery.sessions import SessionStats, SseSession
from workbench.delivery.userstreams import UserStreamReader
from workbench.http import edge
from workbench.http.sse import SseResponse, Ticker, beat_is_due, heartbeat_shares
from workbench.streams.keys import UserStreamNames

DEADLINE = 10.0
_N = itertools.count()


class Wire:
    """What uvicorn gives an app: ``send`` (here recording, or blocking like a socket
    whose client stopped reading) and a ``receive`` that waits until the client leaves."""

    def __init__(self, *, block_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.block_after = block_after
        self.gone = asyncio.Event()
        self.blocked = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if self.block_after is not None and len(self.sent) >= self.block_after:
            self.blocked.set()
            await asyncio.Event().wait()  # the socket's buffer is full, forever
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent[1:])


async def _opened(redis_url: str, hub: Hub) -> tuple[SseSession, aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    names = UserStreamNames(f"resp{next(_N)}")
    session = SseSession(f"u{next(_N)}", None, UserStreamReader(client, names), hub, SessionStats())
    await session.open()
    return session, client


async def _until(condition: Any, what: str) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


def test_the_protocols_disconnect_hook_ends_the_stream_with_no_task_of_its_own(
    redis_url: str,
) -> None:
    async def scenario() -> None:
        hub = Hub()
        session, client = await _opened(redis_url, hub)
        wire = Wire()
        scope: dict[str, Any] = {"type": "http", "method": "GET", edge.DISCONNECT_HOOKED: True}
        before = len(asyncio.all_tasks())
        response = asyncio.create_task(SseResponse(session)(scope, wire.receive, wire.send))
        await _until(lambda: b"event: ready" in wire.body(), "ready")
        # The request's own task only: no disconnect watcher, no ping timer.
        assert len(asyncio.all_tasks()) == before + 1
        assert hub.subscriptions() == 1
        scope[edge.DISCONNECT_HOOK]()  # what GuardedHttpToolsProtocol.connection_lost does
        await asyncio.wait_for(response, DEADLINE)
        assert hub.subscriptions() == 0
        assert edge.DISCONNECT_HOOK not in scope
        assert wire.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))


def test_without_the_hook_a_watcher_notices_the_client_leaving(redis_url: str) -> None:
    async def scenario() -> None:
        hub = Hub()
        session, client = await _opened(redis_url, hub)
        wire = Wire()
        response = asyncio.create_task(
            SseResponse(session)({"type": "http", "method": "GET"}, wire.receive, wire.send)
        )
        await _until(lambda: b"event: ready" in wire.body(), "ready")
        wire.gone.set()
        await asyncio.wait_for(response, DEADLINE)
        assert hub.subscriptions() == 0
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))


def test_a_client_that_stops_reading_is_cut_off_by_the_shared_heartbeat(redis_url: str) -> None:
    """Its write blocks; the hub's next heartbeats find it never took one and close it,
    which abandons the blocked write: no per-write timeout needed."""

    async def scenario() -> None:
        hub = Hub()
        session, client = await _opened(redis_url, hub)
        wire = Wire(block_after=2)  # the headers and the ready event get through
        scope: dict[str, Any] = {"type": "http", "method": "GET", edge.DISCONNECT_HOOKED: True}
        response = asyncio.create_task(SseResponse(session)(scope, wire.receive, wire.send))
        await _until(lambda: len(wire.sent) == 2, "ready")
        hub.heartbeat()  # taken from the queue, and its write blocks
        await asyncio.wait_for(wire.blocked.wait(), DEADLINE)
        hub.heartbeat()  # queued behind the blocked write: never taken
        assert not response.done()
        hub.heartbeat()  # the one before was never taken: stalled
        await asyncio.wait_for(response, DEADLINE)
        assert response.exception() is None
        assert hub.subscriptions() == 0 and hub.dropped_stalled == 1
        await client.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 3 * DEADLINE))


def test_one_ticker_beats_for_everyone_and_closes_every_session_when_the_server_stops() -> None:
    from sse_starlette.sse import AppStatus

    async def scenario() -> None:
        hub = Hub(heartbeat_shares=heartbeat_shares(1.0, 0.2))
        assert hub.heartbeat_shares == 5
        subs = [hub.subscribe(f"u{i}") for i in range(10)]
        ticker = Ticker(hub, ping_s=1.0, check_s=0.2)
        task = asyncio.create_task(ticker.run())
        try:
            # Spread over the interval: a wake-up beats one share (two of the ten),
            # not everyone (seen long before the interval's five wake-ups are done).
            await _until(lambda: any(s.qsize() for s in subs), "a first share beaten")
            assert 2 <= sum(s.qsize() for s in subs) < 10
            await _until(lambda: ticker.beats >= 1, "a whole heartbeat interval")
            assert all(s.get_nowait() is hub.heartbeat_message for s in subs)
            AppStatus.should_exit = True  # what uvicorn's patched handle_exit sets on SIGTERM
            await _until(lambda: hub.subscriptions() == 0, "every session closed")
            assert {s.closed_reason for s in subs} == {"server shutting down"}
        finally:
            AppStatus.should_exit = False
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))


def test_a_late_tick_does_not_take_readers_for_stalled() -> None:
    """A blocked loop delays the ticker past several shares' turns: it must not
    beat a share twice before its readers could take the first beat."""

    async def scenario() -> None:
        hub = Hub(heartbeat_shares=heartbeat_shares(0.5, 0.1))
        subs = [hub.subscribe(f"u{i}") for i in range(10)]

        async def read(sub: Any) -> None:
            with contextlib.suppress(SubscriptionClosed):
                while True:
                    await sub.get()

        readers = [asyncio.create_task(read(s)) for s in subs]
        ticker = Ticker(hub, ping_s=0.5, check_s=0.1)
        ticking = asyncio.create_task(ticker.run())
        try:
            await _until(lambda: any(s._beat for s in subs), "a first share beaten")
            time.sleep(0.6)  # the loop blocked for more than a whole interval
            after = ticker.beats
            await _until(lambda: ticker.beats >= after + 2, "two more whole intervals")
            assert hub.dropped_stalled == 0
            assert [s.closed_reason for s in subs] == [None] * 10
        finally:
            for task in [ticking, *readers]:
                task.cancel()
            await asyncio.gather(ticking, *readers, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), DEADLINE))


class _Transport:
    def __init__(self, fail: bool = False) -> None:
        self.written: list[bytes] = []
        self.fail = fail

    def write(self, data: bytes) -> None:
        if self.fail:
            raise RuntimeError("unable to perform operation: the handler is closed")
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


class _Cycle:
    """The attributes of uvicorn's RequestResponseCycle the chunk writer reads."""

    def __init__(self, transport: _Transport) -> None:
        self.transport = transport
        self.disconnected = False
        self.response_started = True
        self.response_complete = False
        self.chunked_encoding = True
        self.flow = type("Flow", (), {"write_paused": False})()


def test_the_chunk_writer_frames_a_chunk_and_refuses_what_it_cannot_write() -> None:
    import weakref

    transport = _Transport()
    cycle = _Cycle(transport)
    write = functools.partial(edge._write_chunk, weakref.ref(cycle))
    assert write(b"id: 1-0\r\n\r\n") and transport.written == [b"b\r\nid: 1-0\r\n\r\n\r\n"]
    assert not write(b"")  # an empty chunk would end the response
    cycle.flow.write_paused = True  # the buffer is full: the awaiting path waits for room
    assert not write(b"x")
    cycle.flow.write_paused = False
    cycle.disconnected = True
    assert not write(b"x")
    assert transport.written == [b"b\r\nid: 1-0\r\n\r\n\r\n"]
    broken = _Cycle(_Transport(fail=True))  # closed under us: refused, never raised
    assert not edge._write_chunk(weakref.ref(broken), b"x")
    gone = weakref.ref(_Cycle(_Transport()))  # the request is over and collected
    assert not edge._write_chunk(gone, b"x")


def test_a_wake_up_a_hair_before_the_beat_is_on_time() -> None:
    """uvloop's timers keep whole milliseconds: a wake-up a hair early must still
    beat, or heartbeats come late (skipped to the next tick);
    one half a tick early is not due yet."""
    beat_at, tick = 100.0, 0.05
    assert beat_is_due(beat_at - 0.0004, beat_at, tick)
    assert beat_is_due(beat_at + 0.2, beat_at, tick)
    assert not beat_is_due(beat_at - 0.03, beat_at, tick)
