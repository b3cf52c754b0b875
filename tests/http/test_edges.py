"""The hardened HTTP edge, over real HTTP against real uvicorn processes.

Each finding of issue 11's "edges" becomes a test here: oversized bodies are
refused before they are read, silent and slowloris connections are closed,
parser edge cases and loose types are 4xx (never 500), one user cannot flood
another's history with escrows, ``/metrics`` can sit behind a token, and the
first request after a Redis restart does not fail. Every rejection is checked
to have changed nothing in the SQL store (:func:`tests.http.test_fuzz_api.fingerprint`).
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.http.test_fuzz_api import fingerprint
from tests.http_support import Deployment, auth, read_events
from workbench.domain.clock import ManualClock
from workbench.ops.redis_server import RedisServer
from workbench.payments.mpesa import RESULT_OK, stk_callback
from workbench.service import CreateLimit, EscrowService, RateLimited
from workbench.store import Store

SHORT = {
    "WORKBENCH_HEADER_TIMEOUT_S": "2",
    "WORKBENCH_BODY_TIMEOUT_S": "2",
    "WORKBENCH_KEEPALIVE_S": "2",
    "WORKBENCH_METRICS_TOKEN": "metrics-token-0123456789",
}


@pytest.fixture(scope="module")
def engine(deployment: Deployment) -> Iterator[sa.Engine]:
    engine = sa.create_engine(deployment.database_url)
    yield engine
    engine.dispose()


def _push_path(deployment: Deployment, api: str, buyer: str, seller: str) -> str:
    """Fund a new escrow; return the path of its push's CallBackURL (the genuine route)."""
    created = httpx.post(
        f"{api}/escrows",
        json={"buyer_id": buyer, "seller_id": seller, "amount": 1500},
        headers=auth(buyer),
    )
    escrow_id = created.json()["escrow"]["id"]
    funded = httpx.post(f"{api}/escrows/{escrow_id}/fund", headers=auth(buyer), timeout=30)
    checkout = funded.json()["checkout_request_id"]
    return httpx.URL(deployment.daraja.pushes[checkout].callback_url).path


@pytest.fixture(scope="module")
def short(deployment: Deployment) -> str:
    """An API process with short connection timeouts and a metrics token."""
    return deployment.start_api(extra_env=SHORT)


def _pid(deployment: Deployment, base: str) -> int:
    port = int(base.rsplit(":", 1)[1])
    return deployment.processes[f"api-{deployment.ports.index(port)}"].pid


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.settimeout(0.2)
    return sock


def _read_until_closed(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails after ``within`` s."""
    got = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk
    raise AssertionError(f"the server kept the connection open for {within}s; it sent {got!r}")


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# -- body size ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/mpesa/callback", "/escrows", "/healthz"])
def test_a_200_mb_content_length_gets_413_before_the_body_is_read(
    deployment: Deployment, api: str, engine: sa.Engine, alice: str, path: str
) -> None:
    before = fingerprint(engine)
    rss_before = _rss_kb(_pid(deployment, api))
    sock = _connect(api)
    host = api.removeprefix("http://")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth(alice)['Authorization']}\r\n"
        f"Content-Length: {200 * 1024 * 1024}\r\n\r\n"
    )
    sock.sendall(head.encode() + b'{"Body": ')
    answer = _read_until_closed(sock, within=10)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"connection: close" in answer.lower(), answer
    assert fingerprint(engine) == before
    # Nothing of the announced 200 MB was buffered.
    assert _rss_kb(_pid(deployment, api)) - rss_before < 20_000


def test_a_chunked_body_over_the_limit_gets_413(api: str, engine: sa.Engine, alice: str) -> None:
    before = fingerprint(engine)
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield b'{"buyer_id": "x", "description": "'
        for _ in range(64):  # 4 MiB in all, far above the default limit
            sent += 65536
            yield b"a" * 65536
        yield b'"}'

    try:
        response = httpx.post(
            f"{api}/escrows",
            content=chunks(),
            headers={**auth(alice), "Content-Type": "application/json"},
            timeout=30,
        )
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
        pytest.fail("the server dropped the connection instead of answering 413")
    assert response.status_code == 413, response.text
    assert "limit" in response.json()["detail"]
    assert fingerprint(engine) == before


def test_a_body_within_the_limit_is_accepted(api: str, alice: str, bob: str) -> None:
    body = {"buyer_id": alice, "seller_id": bob, "amount": 1500, "description": "d" * 500}
    response = httpx.post(f"{api}/escrows", json=body, headers=auth(alice))
    assert response.status_code == 201, response.text


# -- connection timeouts --------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed(short: str) -> None:
    sock = _connect(short)
    _read_until_closed(sock, within=8)  # the header timeout is 2 s
    sock.close()


def test_a_connection_trickling_header_bytes_is_closed(short: str) -> None:
    sock = _connect(short)
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    started = time.monotonic()
    closed = False
    for byte in request:  # one byte every 0.25 s: 25 s if never cut off
        try:
            sock.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        if _closed(sock):
            closed = True
            break
        time.sleep(0.05)
    sock.close()
    assert closed, "the server waited for the trickled header to finish"
    assert time.monotonic() - started < 8


def test_a_trickled_body_is_closed(short: str, engine: sa.Engine, alice: str) -> None:
    before = fingerprint(engine)
    sock = _connect(short)
    host = short.removeprefix("http://")
    sock.sendall(
        f"POST /escrows HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Authorization: {auth(alice)['Authorization']}\r\nContent-Length: 1000\r\n\r\n{{".encode()
    )
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 10:
        try:
            sock.send(b" ")
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        if _closed(sock):
            closed = True
            break
        time.sleep(0.05)
    sock.close()
    assert closed, "the server waited for the trickled body for 10 s"
    assert fingerprint(engine) == before


def test_an_idle_keep_alive_connection_is_closed(short: str) -> None:
    sock = _connect(short)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = _read_until_closed(sock, within=8)  # keep-alive is 2 s
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_the_default_header_timeout_closes_a_silent_connection(api: str) -> None:
    sock = _connect(api)
    _read_until_closed(sock, within=25)  # the default is 10 s
    sock.close()


@pytest.mark.parametrize("end", [b"\r\n\r\n", b""], ids=["complete", "unfinished"])
def test_oversized_headers_get_431(short: str, end: bytes) -> None:
    sock = _connect(short)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + end)
    answer = _read_until_closed(sock, within=8)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 431 "), answer


def test_an_sse_stream_outlives_every_timeout(
    deployment: Deployment, short: str, alice: str, bob: str
) -> None:
    """A long-lived response is not an idle connection: events still arrive after 5 s."""
    created = httpx.post(
        f"{short}/escrows",
        json={"buyer_id": alice, "seller_id": bob, "amount": 1500},
        headers=auth(alice),
    )
    assert created.status_code == 201, created.text
    deployment.wait_fanned_out(alice, 1)
    with (
        httpx.Client(timeout=httpx.Timeout(20, connect=5)) as client,
        client.stream("GET", f"{short}/users/{alice}/events", headers=auth(alice)) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        _until(lines, "event: ready")
        time.sleep(5)  # longer than the header, body and keep-alive timeouts together
        escrow_id = created.json()["escrow"]["id"]
        cancelled = httpx.post(f"{short}/escrows/{escrow_id}/cancel", headers=auth(alice))
        assert cancelled.status_code == 200, cancelled.text
        assert any("escrow.cancelled" in line for line in _until(lines, "escrow.cancelled"))


def _until(lines: Iterator[str], marker: str) -> list[str]:
    seen = []
    for line in lines:
        seen.append(line)
        if marker in line:
            return seen
    raise AssertionError(f"the stream ended before {marker!r}: {seen}")


# -- parser edges and strict types ----------------------------------------------------------

RAW_BODIES = {
    "1e400": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 1e400}',
    "NaN": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": NaN}',
    "Infinity": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": Infinity}',
    "-Infinity": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": -Infinity}',
    "huge-int": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": ' + b"9" * 5000 + b"}",
    "deep": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 1500, "description": '
    + b"[" * 5000
    + b"]" * 5000
    + b"}",
    "deep-object": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 1500, "x": '
    + b'{"a":' * 5000
    + b"1"
    + b"}" * 5000
    + b"}",
    "invalid-utf8": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 1500, '
    b'"description": "\xff\xfe"}',
    "lone-surrogate": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 1500, '
    b'"description": "\\ud800"}',
    "not-json": b"buyer_id=%(a)s&seller_id=%(b)s&amount=1500",
    "truncated": b'{"buyer_id": "%(a)s", "seller_id": "%(b)s", "amount": 15',
}

STRICT = {
    "amount-true": {"amount": True},
    "amount-string": {"amount": "100"},
    "amount-float": {"amount": 100.0},
    "amount-fraction": {"amount": 1.5},
    "amount-null": {"amount": None},
    "amount-list": {"amount": [100]},
    "buyer-int": {"buyer_id": 12345},
    "description-int": {"description": 5},
    "description-bool": {"description": True},
}


def _raw_post(
    base: str, path: str, body: bytes, user: str | None, content_type: str | None
) -> httpx.Response:
    headers = auth(user) if user else {}
    if content_type:
        headers["Content-Type"] = content_type
    return httpx.post(f"{base}{path}", content=body, headers=headers, timeout=30)


@pytest.mark.parametrize("case", sorted(RAW_BODIES))
def test_malformed_json_is_a_4xx_and_changes_nothing(
    deployment: Deployment, api: str, engine: sa.Engine, alice: str, bob: str, case: str
) -> None:
    body = RAW_BODIES[case] % {b"a": alice.encode(), b"b": bob.encode()}
    callback = _push_path(deployment, api, alice, bob)  # a genuine per-push URL
    before = fingerprint(engine)
    for path, user in (("/escrows", alice), (callback, None)):
        response = _raw_post(api, path, body, user, "application/json")
        assert 400 <= response.status_code < 500, (path, response.status_code, response.text)
        response.json()  # a readable error, not a traceback page
    assert fingerprint(engine) == before


@pytest.mark.parametrize("case", sorted(STRICT))
def test_loose_types_are_refused(
    api: str, engine: sa.Engine, alice: str, bob: str, case: str
) -> None:
    body: dict[str, Any] = {"buyer_id": alice, "seller_id": bob, "amount": 1500}
    body.update(STRICT[case])
    before = fingerprint(engine)
    response = httpx.post(f"{api}/escrows", json=body, headers=auth(alice))
    assert response.status_code == 422, response.text
    assert fingerprint(engine) == before


@pytest.mark.parametrize(
    ("command", "body"),
    [
        ("fund", {"phone": 254700000000}),
        ("ship", {"tracking": 42}),
        ("dispute", {"reason": ["x"]}),
        ("cancel", {"reason": False}),
        ("resolve", {"outcome": 1}),
        ("resolve", {"outcome": "refund", "note": 7}),
    ],
)
def test_every_command_body_is_strict(
    api: str, engine: sa.Engine, alice: str, bob: str, command: str, body: dict[str, Any]
) -> None:
    created = httpx.post(
        f"{api}/escrows",
        json={"buyer_id": alice, "seller_id": bob, "amount": 1500},
        headers=auth(alice),
    )
    assert created.status_code == 201, created.text
    escrow_id = created.json()["escrow"]["id"]
    user = "admin" if command == "resolve" else alice
    before = fingerprint(engine)
    response = httpx.post(f"{api}/escrows/{escrow_id}/{command}", json=body, headers=auth(user))
    assert response.status_code == 422, response.text
    assert fingerprint(engine) == before


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_declared_json_is_refused(
    api: str, engine: sa.Engine, alice: str, bob: str, content_type: str | None
) -> None:
    body = json.dumps({"buyer_id": alice, "seller_id": bob, "amount": 1500}).encode()
    before = fingerprint(engine)
    response = _raw_post(api, "/escrows", body, alice, content_type)
    assert response.status_code == 422, response.text
    assert fingerprint(engine) == before


def test_the_callback_refuses_a_non_finite_amount(
    deployment: Deployment, api: str, engine: sa.Engine, alice: str, bob: str
) -> None:
    callback = _push_path(deployment, api, alice, bob)
    checkout = next(
        c for c, p in deployment.daraja.pushes.items() if p.callback_url.endswith(callback)
    )
    text = json.dumps(stk_callback(checkout, RESULT_OK, amount=1500, receipt="RCPT1"))
    before = fingerprint(engine)
    for bad in ("1e400", "NaN", "Infinity"):
        body = text.replace('"Value": 1500', f'"Value": {bad}').encode()
        assert bad.encode() in body
        response = _raw_post(api, callback, body, None, "application/json")
        assert response.status_code == 400, response.text
    assert fingerprint(engine) == before


# -- one user flooding another's history ----------------------------------------------------


def _create(base: str, caller: str, buyer: str, seller: str, **headers: str) -> httpx.Response:
    body = {"buyer_id": buyer, "seller_id": seller, "amount": 1500}
    return httpx.post(f"{base}/escrows", json=body, headers={**auth(caller), **headers})


def test_creates_naming_another_user_are_limited_across_api_processes(
    deployment: Deployment, api: str, short: str, engine: sa.Engine, alice: str, bob: str
) -> None:
    """20 per day per (creator, named user), counted in the store that every node shares."""
    bases = [api, short]
    first = _create(api, alice, alice, bob, **{"Idempotency-Key": "first"})
    assert first.status_code == 201, first.text
    for n in range(1, 20):  # alternating between the two processes
        response = _create(bases[n % 2], alice, alice if n % 3 else bob, bob if n % 3 else alice)
        assert response.status_code == 201, (n, response.text)
    before = fingerprint(engine)
    for base in bases:
        refused = _create(base, alice, alice, bob)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "rate_limited"
        retry_after = int(refused.headers["Retry-After"])
        assert 0 < retry_after <= 24 * 3600
    assert fingerprint(engine) == before
    # A retry of an accepted create is not a new create.
    again = _create(short, alice, alice, bob, **{"Idempotency-Key": "first"})
    assert again.status_code == 201, again.text
    assert again.json()["replayed"] is True
    # Bob's own creates, and alice's creates naming someone else, have their own counts.
    assert _create(short, bob, bob, alice).status_code == 201
    assert _create(api, alice, alice, f"{bob}-other").status_code == 201
    # Bob's stream holds what alice was allowed, and his own, and nothing of the refused.
    deployment.wait_fanned_out(bob, 21)


def test_the_attack_that_evicted_a_history_is_refused(
    deployment: Deployment, api: str, alice: str, bob: str
) -> None:
    """The measured attack: 1,100 creates naming one user. Bob's first event stays resumable."""
    mine = _create(api, bob, bob, f"{bob}-shop")
    assert mine.status_code == 201
    (first_id, _), *_ = deployment.wait_fanned_out(bob, 1)
    statuses = []
    with httpx.Client(timeout=30) as client:
        for _ in range(1100):
            response = client.post(
                f"{api}/escrows",
                json={"buyer_id": alice, "seller_id": bob, "amount": 1500},
                headers=auth(alice),
            )
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
    assert statuses.count(201) == 20 and statuses[-1] == 429, statuses[-3:]
    entries = deployment.wait_fanned_out(bob, 21)
    assert entries[0][0] == first_id
    _, reset = read_events(api, bob, last_event_id=first_id, until_ready_and=20)
    assert not reset


def test_concurrent_creates_on_two_processes_never_pass_the_limit(
    api: str, short: str, alice: str, bob: str
) -> None:
    def attempt(n: int) -> int:
        return _create([api, short][n % 2], alice, alice, bob).status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        statuses = list(pool.map(attempt, range(36)))
    assert sorted(set(statuses)) == [201, 429], statuses
    assert statuses.count(201) == 20


def test_the_create_limit_holds_while_redis_is_down(
    deployment: Deployment, redis_server: RedisServer, alice: str, bob: str
) -> None:
    """Counted in SQL: commands, and their limit, do not need Redis."""
    base = deployment.start_api(extra_env={"WORKBENCH_CREATE_LIMIT": "2"})
    redis_server.kill()
    try:
        assert _create(base, alice, alice, bob).status_code == 201
        assert _create(base, alice, bob, alice).status_code == 201
        refused = _create(base, alice, alice, bob)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) > 0
    finally:
        redis_server.restart()


# -- /metrics -------------------------------------------------------------------------------


def test_metrics_behind_a_token_when_one_is_set(short: str) -> None:
    assert httpx.get(f"{short}/metrics").status_code == 401
    wrong = httpx.get(f"{short}/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    user_token = httpx.get(f"{short}/metrics", headers=auth("admin"))
    assert user_token.status_code == 401
    right = httpx.get(
        f"{short}/metrics", headers={"Authorization": f"Bearer {SHORT['WORKBENCH_METRICS_TOKEN']}"}
    )
    assert right.status_code == 200, right.text
    assert "workbench_redis_up" in right.text


def test_metrics_open_without_a_token_configured(api: str) -> None:
    response = httpx.get(f"{api}/metrics")
    assert response.status_code == 200
    assert "workbench_redis_up" in response.text


# -- Redis restart (last: it restarts the module's shared Redis) ---------------------------


def test_the_first_snapshot_after_a_redis_restart_answers_200(
    deployment: Deployment, redis_server: RedisServer, api: str, alice: str, bob: str
) -> None:
    assert _create(api, alice, alice, bob).status_code == 201
    deployment.wait_fanned_out(alice, 1)
    # Two snapshots so the pool holds connections that the restart will make stale.
    for _ in range(2):
        assert httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice)).status_code == 200
    redis_server.restart()
    response = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice), timeout=30)
    assert response.status_code == 200, response.text
    assert len(response.json()["escrows"]) == 1


# -- the create limit on the store itself (SQLite and PostgreSQL) ---------------------------


def test_the_create_limit_slides_and_counts_per_pair(store: Store, clock: ManualClock) -> None:
    service = EscrowService(store, clock=clock, create_limit=CreateLimit(count=3, window_s=100))
    for _ in range(3):
        service.create("mallory", "victim", 1500, actor="mallory")
        clock.advance(10)
    rows_before = _row_counts(store)
    with pytest.raises(RateLimited) as refused:
        service.create("mallory", "victim", 1500, actor="mallory")
    # The oldest counted create (t=0) leaves the window at t=100; now is t=30.
    assert refused.value.retry_after_s == 70
    assert _row_counts(store) == rows_before
    # Naming someone else, or being named, has its own count; without an actor, no count.
    service.create("mallory", "someone-else", 1500, actor="mallory")
    service.create("mallory", "victim", 1500, actor="victim")
    service.create("mallory", "victim", 1500)
    clock.advance(70.001)  # the first create has left the window
    service.create("victim", "mallory", 1500, actor="mallory")
    with pytest.raises(RateLimited):
        service.create("mallory", "victim", 1500, actor="mallory")


def _row_counts(store: Store) -> tuple[int, ...]:
    with store.engine.connect() as conn:
        return tuple(
            conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in ("escrows", "outbox", "escrow_creates")
        )


def test_the_create_limit_is_exact_under_concurrent_creates(
    store: Store, clock: ManualClock
) -> None:
    service = EscrowService(store, clock=clock, create_limit=CreateLimit(count=5, window_s=100))

    def attempt(_: int) -> bool:
        try:
            service.create("mallory", "victim", 1500, actor="mallory")
        except RateLimited:
            return False
        return True

    with ThreadPoolExecutor(max_workers=8) as pool:
        accepted = list(pool.map(attempt, range(24)))
    assert accepted.count(True) == 5
    assert _row_counts(store)[0] == 5
