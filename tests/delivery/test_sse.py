"""SSE delivery over real HTTP: replay, reconnects, two servers, trimming, lost live feed."""

from __future__ import annotations

import itertools
import random
import socket
import struct
import threading

import httpx
import redis
from httpx_sse import connect_sse

from tests.http_support import Deployment, auth, read_events
from workbench.delivery.entries import UserEntry
from workbench.delivery.userstreams import UserStreams
from workbench.domain import events as ev
from workbench.ops.waiting import wait_until
from workbench.service import EscrowService
from workbench.streams.keys import UserStreamNames


def produce(service: EscrowService, buyer: str, seller: str, escrows: int) -> int:
    """Open escrows, cancelling every third; return the events the buyer will get."""
    events = 0
    for i in range(escrows):
        escrow_id = service.create(buyer, seller, 100 + i).escrow["id"]  # type: ignore[index]
        events += 1
        if i % 3 == 0:
            service.cancel(escrow_id, buyer)
            events += 1
    return events


def _storm(
    bases: list[str], user: str, expected: int, seed: int
) -> tuple[list[tuple[str, str]], int]:
    """Read ``expected`` events, walking away at random points and reconnecting
    with Last-Event-ID each time, cycling through ``bases``. Returns (id, event id)
    pairs and the number of connections used."""
    rng = random.Random(seed)
    received: list[tuple[str, str]] = []
    connections = 0
    while len(received) < expected:
        base = bases[connections % len(bases)]
        connections += 1
        last = received[-1][0] if received else "0"
        take = min(rng.randint(1, 12), expected - len(received))
        got, reset = read_events(base, user, last_event_id=last, stop_after=take)
        assert not reset, "a retained position was answered with reset"
        received += [(e.id, _event_id(e.data)) for e in got]
    # One more connection: nothing further, and the stream says it is live.
    got, reset = read_events(bases[0], user, last_event_id=received[-1][0], until_ready_and=0)
    assert got == [] and not reset
    return received, connections


def _event_id(data: str) -> str:
    import json

    return json.loads(data)["event_id"]  # type: ignore[no-any-return]


def test_random_disconnects_with_last_event_id_lose_nothing(
    deployment: Deployment, api: str, service: EscrowService, alice: str, bob: str
) -> None:
    expected = produce_while(service, alice, bob, escrows=45)
    received, connections = _storm([api], alice, expected.count, seed=1)
    expected.join()
    stream = deployment.wait_fanned_out(alice, expected.count)
    assert received == stream  # exactly the published sequence: no loss, dup or reorder
    assert connections > 5


def test_switching_between_two_server_processes(
    deployment: Deployment, api: str, service: EscrowService, alice: str, bob: str
) -> None:
    second = deployment.start_api()
    expected = produce_while(service, alice, bob, escrows=30)
    received, _ = _storm([api, second], alice, expected.count, seed=2)
    expected.join()
    assert received == deployment.wait_fanned_out(alice, expected.count)


class produce_while:  # noqa: N801 - reads as a verb at the call site
    """Produce in a thread while the client reads; ``count`` is known up front."""

    def __init__(self, service: EscrowService, buyer: str, seller: str, escrows: int) -> None:
        self.count = escrows + len(range(0, escrows, 3))
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(service, buyer, seller, escrows), daemon=True
        )
        self._thread.start()

    def _run(self, service: EscrowService, buyer: str, seller: str, escrows: int) -> None:
        try:
            produce(service, buyer, seller, escrows)
        except BaseException as exc:  # noqa: BLE001 - re-raised in join()
            self.error = exc

    def join(self) -> None:
        self._thread.join(60)
        if self.error is not None:
            raise self.error


def test_trimmed_history_gets_reset_and_the_snapshot_resumes_gaplessly(
    deployment: Deployment, api: str, service: EscrowService, alice: str, bob: str
) -> None:
    count = produce(service, alice, bob, 30)
    stream = deployment.wait_fanned_out(alice, count)
    client = redis.Redis.from_url(deployment.redis_url)
    client.xtrim(f"{deployment.prefix}:user:{alice}", maxlen=10, approximate=False)

    got, reset = read_events(api, alice, last_event_id=stream[5][0], until_ready_and=0)
    assert reset and got == []
    # Well-formed ids that were never entries are unknown positions too.
    ms, seq = stream[-3][0].split("-")
    between = f"{ms}-{int(seq) + 777}"  # inside the retained range, never an entry
    assert between not in {i for i, _ in stream}
    for unknown in ("1-0", "99999999999999-0", between):
        assert read_events(api, alice, last_event_id=unknown, until_ready_and=0)[1], unknown

    snapshot = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice)).json()
    assert snapshot["as_of"] == stream[-1][0]
    assert len(snapshot["escrows"]) == 30
    more = produce(service, alice, bob, 4)
    after = deployment.wait_fanned_out(alice, 10 + more)[-more:]
    got, reset = read_events(api, alice, last_event_id=snapshot["as_of"], until_ready_and=more)
    assert not reset
    assert [(e.id, _event_id(e.data)) for e in got] == after


def test_resume_at_the_tail_and_from_the_beginning(
    deployment: Deployment, api: str, service: EscrowService, alice: str, bob: str
) -> None:
    count = produce(service, alice, bob, 5)
    stream = deployment.wait_fanned_out(alice, count)
    got, reset = read_events(api, alice, last_event_id="0", until_ready_and=count)
    assert not reset and [e.id for e in got] == [i for i, _ in stream]
    got, reset = read_events(api, alice, last_event_id=stream[-1][0], until_ready_and=0)
    assert not reset and got == []


def test_the_live_reader_losing_redis_makes_sessions_catch_up(
    deployment: Deployment, service: EscrowService, alice: str, bob: str
) -> None:
    base = deployment.start_api()  # its own process: its live reader is the one we kill
    first = produce(service, alice, bob, 3)
    deployment.wait_fanned_out(alice, first)
    total = first + produce_count(12)
    result: dict[str, object] = {}

    def listen() -> None:
        try:
            result["got"] = read_events(base, alice, last_event_id="0", until_ready_and=total)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    wait_until(
        lambda: httpx.get(f"{base}/healthz").json()["sessions"] >= 1,
        what="the SSE session to open",
    )
    client = redis.Redis.from_url(deployment.redis_url)
    killed = client.client_kill_filter(_type="pubsub")
    assert killed >= 1
    produce(service, alice, bob, 12)
    listener.join(60)
    assert "error" not in result, result.get("error")
    got, reset = result["got"]  # type: ignore[misc]
    assert not reset
    assert [(e.id, _event_id(e.data)) for e in got] == deployment.wait_fanned_out(alice, total)
    assert _metric(base, "workbench_live_reconnects_total") >= 1


def produce_count(escrows: int) -> int:
    return escrows + len(range(0, escrows, 3))


def test_server_side_drops_are_resumed_by_the_client(
    deployment: Deployment, api: str, service: EscrowService, alice: str, bob: str
) -> None:
    """Live sessions closed by the server; each reconnect resumes from Last-Event-ID."""
    rounds = 4
    received: list[str] = []
    for connection in range(rounds + 1):
        headers = {**auth(alice), "Last-Event-ID": received[-1] if received else "0"}
        live = 0
        with (
            httpx.Client(timeout=20) as http,
            connect_sse(http, "GET", f"{api}/users/{alice}/events", headers=headers) as source,
        ):
            for sse in source.iter_sse():
                if sse.event == "message" and not sse.data:
                    continue  # a comment block (": closing: dropped by the server")
                if sse.event == "ready":
                    if connection == rounds:
                        break
                    service.create(alice, bob, 100)
                    service.create(alice, bob, 200)
                    continue
                assert sse.event == "escrow.created", sse
                received.append(sse.id)
                live += 1
                if live == 2:
                    # The server closes every session of this user; iter_sse
                    # ends when the response does.
                    assert httpx.post(f"{api}/debug/users/{alice}/drop").json()["dropped"] >= 1
        assert connection == rounds or live == 2
    assert received == [i for i, _ in deployment.wait_fanned_out(alice, 2 * rounds)]


def test_stream_carries_retry_hint_and_heartbeats(deployment: Deployment, alice: str) -> None:
    base = deployment.start_api(extra_env={"WORKBENCH_SSE_PING_S": "0.2"})
    lines: list[str] = []
    with (
        httpx.Client(timeout=10) as http,
        http.stream("GET", f"{base}/users/{alice}/events", headers=auth(alice)) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            lines.append(line)
            if sum(1 for x in lines if x.startswith(":")) >= 2:
                break
    assert "event: ready" in lines
    assert "retry: 1000" in lines
    assert "id: 0-0" in lines  # a fresh user: the cursor to resume from
    # The server notices the client left and drops the hub subscription.
    wait_until(
        lambda: httpx.get(f"{base}/healthz").json()["sessions"] == 0,
        what="the session to be released",
    )


def test_a_dropped_session_is_told_why(deployment: Deployment, api: str, alice: str) -> None:
    lines: list[str] = []
    with (
        httpx.Client(timeout=10) as http,
        http.stream("GET", f"{api}/users/{alice}/events", headers=auth(alice)) as response,
    ):
        for line in response.iter_lines():
            lines.append(line)
            if line == "event: ready":
                assert httpx.post(f"{api}/debug/users/{alice}/drop").json()["dropped"] == 1
    assert ": closing: dropped by the server" in lines


def test_clients_that_leave_mid_replay_release_their_sessions(
    deployment: Deployment, api: str, alice: str
) -> None:
    """A client that closes while its replay is still being read from Redis must
    not leave its session behind. The disconnect cancels the session's task at
    whatever it awaits, often a redis-py call, and redis-py's asyncio client can
    swallow a cancel on Python 3.11 (CPython gh-86296). Heartbeats are 60 s apart
    here, so a session that survived the cancel would still be counted."""
    client = redis.Redis.from_url(deployment.redis_url)
    # The whole history kept (the default cap of 1,000 would trim it and make
    # every connection a reset, with no replay to leave).
    streams = UserStreams(client, UserStreamNames(deployment.prefix), maxlen=50_000)
    history = [
        ev.Event(event_id=f"evt_{i}", type="escrow.created", aggregate_type="escrow",
                 aggregate_id=f"esc_{i}", sequence=1, user_ids=(alice,), occurred_at=1.0,
                 correlation_id="c", payload={"amount": i})
        for i in range(20_000)
    ]  # fmt: skip
    for start in range(0, len(history), 1000):
        streams.append([(e, ev.encode(e)) for e in history[start : start + 1000]])
    client.close()
    headers = {**auth(alice), "Last-Event-ID": "0"}
    left_mid_replay = 0
    with httpx.Client(timeout=30) as http:
        for _ in range(20):
            with http.stream("GET", f"{api}/users/{alice}/events", headers=headers) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("id:"):
                        left_mid_replay += 1
                        break  # the first page is here: the server is replaying the rest
    assert left_mid_replay == 20
    wait_until(
        lambda: httpx.get(f"{api}/healthz").json()["sessions"] == 0,
        timeout=20,
        what="every session left mid-replay to be released",
    )


def _metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_client_that_stops_reading_gets_the_rest_in_order_once_it_reads_again(
    deployment: Deployment, alice: str
) -> None:
    """Live entries go straight to the socket while it takes them, through the
    session's queue once its buffers are full, and arrive whole and in order."""
    base = deployment.start_api()  # its own process: its counters are this test's
    sent_before = _metric(base, "workbench_sse_live_sent_total")
    at_once_before = _metric(base, "workbench_sse_live_written_at_once_total")
    host, port = base.removeprefix("http://").split(":")
    phone = socket.socket()
    phone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: fills soon
    phone.settimeout(30)
    phone.connect((host, int(port)))
    phone.sendall(_sse_request(host, alice))
    received = _until_ready(phone)

    # About 6 MB: more than the kernel's socket buffers and the transport's
    # high-water mark together, while the phone reads nothing.
    padding = "x" * 30_000
    events = [
        ev.Event(
            event_id=f"evt_slow_{alice}_{i}", type="escrow.created", aggregate_type="escrow",
            aggregate_id=f"esc_{i}", sequence=1, user_ids=(alice,), occurred_at=1.0,
            correlation_id="c", payload={"i": i, "padding": padding},
        )
        for i in range(200)
    ]  # fmt: skip
    client = redis.Redis.from_url(deployment.redis_url)
    streams = UserStreams(client, UserStreamNames(deployment.prefix))
    appended = [entry.id for pairs in streams.append_entries([(e, ev.encode(e)) for e in events])
                for _, entry in pairs]  # fmt: skip
    assert len(appended) == len(events)
    wait_until(
        lambda: _metric(base, "workbench_sse_live_written_at_once_total") > at_once_before,
        what="the first entries written at once",
    )

    ids: list[str] = []
    while len(ids) < 1 + len(events):  # the ready event's, then every entry's
        whole, end, received = received.rpartition(b"\r\n\r\n")  # complete frames only
        ids += [line[4:].decode() for line in whole.split(b"\r\n") if line.startswith(b"id: ")]
        if end and len(ids) >= 1 + len(events):
            break
        chunk = phone.recv(1 << 20)
        assert chunk, f"the stream ended after {len(ids)} ids"
        received += chunk
    phone.close()
    client.close()
    assert ids[1:] == [str(i) for i in appended]  # all, in order, none twice
    sent = _metric(base, "workbench_sse_live_sent_total") - sent_before
    at_once = _metric(base, "workbench_sse_live_written_at_once_total") - at_once_before
    assert sent == len(events)
    assert 0 < at_once < sent  # some straight to the socket, the rest through the queue


def _sse_request(host: str, user: str) -> bytes:
    return (
        f"GET /users/{user}/events HTTP/1.1\r\nhost: {host}\r\n"
        f"authorization: {auth(user)['Authorization']}\r\n\r\n"
    ).encode()


def _until_ready(phone: socket.socket) -> bytes:
    received = b""
    while b"event: ready" not in received:
        chunk = phone.recv(65536)
        assert chunk, "the stream ended before ready"
        received += chunk
    return received


def test_a_client_that_pipelines_a_request_behind_its_stream_and_resets_is_released(
    deployment: Deployment, alice: str, bob: str
) -> None:
    """The attack: a stream, a second request pipelined behind it, then a reset.
    uvicorn stops reading a connection with a request queued, so the reset is
    noticed at the next write to it; then the stream's session must be released
    (uvicorn marks only its latest request disconnected), and the process's live
    reader, which made that write, must keep serving everyone."""
    base = deployment.start_api()
    host, port = base.removeprefix("http://").split(":")
    phone = socket.create_connection((host, int(port)), timeout=30)
    phone.sendall(_sse_request(host, bob))
    _until_ready(phone)
    attacker = socket.create_connection((host, int(port)), timeout=30)
    behind = f"GET /healthz HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
    attacker.sendall(_sse_request(host, alice) + behind)
    _until_ready(attacker)
    assert httpx.get(f"{base}/healthz").json()["sessions"] == 2
    attacker.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    attacker.close()  # a reset, not a goodbye

    client = redis.Redis.from_url(deployment.redis_url)
    streams = UserStreams(client, UserStreamNames(deployment.prefix))
    published = itertools.count()

    def publish(user: str) -> UserEntry:
        i = next(published)
        event = ev.Event(
            event_id=f"evt_pipelined_{user}_{i}", type="escrow.created", aggregate_type="escrow",
            aggregate_id=f"esc_p{i}", sequence=1, user_ids=(user,), occurred_at=1.0,
            correlation_id="c", payload={"i": i},
        )  # fmt: skip
        ((_, entry),) = streams.append_entries([(event, ev.encode(event))])[0]
        return entry

    def released() -> bool:
        publish(alice)  # a write to the reset connection
        return httpx.get(f"{base}/healthz").json()["sessions"] == 1

    wait_until(released, what="the reset stream's session to be released")
    entry = publish(bob)
    received = b""
    while f"id: {entry.id}".encode() not in received:
        chunk = phone.recv(65536)
        assert chunk, "bob's stream ended"
        received += chunk
    phone.close()
    client.close()
