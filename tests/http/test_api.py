"""The HTTP API over real HTTP: a uvicorn process, real Redis, real SQLite."""

from __future__ import annotations

import contextlib
import hashlib
import threading

import httpx
import pytest
import redis
import sqlalchemy as sa

from tests.http_support import SECRET, Deployment, auth, gateway_callback, read_events, token
from workbench.domain.clock import ManualClock
from workbench.domain.events import decode
from workbench.handlers.ledger import MONEY_EVENTS
from workbench.http.app import Settings
from workbench.http.auth import issue_token
from workbench.http.commands import scoped_key
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.payments.mpesa import RESULT_CANCELLED_BY_USER, RESULT_OK, stk_callback
from workbench.store import Store

EXPIRED = issue_token("alice", SECRET, ttl_s=1, clock=ManualClock(1e9))


def _create(api: str, buyer: str, seller: str, **extra) -> httpx.Response:  # type: ignore[no-untyped-def]
    body = {"buyer_id": buyer, "seller_id": seller, "amount": 1500, "description": "shoes"}
    return httpx.post(f"{api}/escrows", json=body, headers={**auth(buyer), **extra})


def _escrow(api: str, escrow_id: str, user: str) -> dict:  # type: ignore[type-arg]
    response = httpx.get(f"{api}/escrows/{escrow_id}", headers=auth(user))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def test_openapi_spec_is_published(api: str) -> None:
    spec = httpx.get(f"{api}/openapi.json").json()
    for path in (
        "/escrows",
        "/escrows/{escrow_id}/fund",
        "/mpesa/callback/{token}",
        "/users/{user_id}/events",
    ):
        assert path in spec["paths"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {issue_token('alice', 'another-secret-0123456789abcdef012')}"},
        {"Authorization": f"Bearer {EXPIRED}"},
    ],
    ids=["missing", "garbage", "wrong-scheme", "wrong-secret", "expired"],
)
def test_requests_without_a_valid_token_get_401(api: str, headers: dict[str, str]) -> None:
    response = httpx.post(f"{api}/escrows", json={}, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["detail"]


def test_create_returns_201_and_a_retry_with_the_same_key_changes_nothing(
    api: str, alice: str, bob: str
) -> None:
    first = _create(api, alice, bob, **{"Idempotency-Key": f"k1-{alice}"})
    assert first.status_code == 201, first.text
    again = _create(api, alice, bob, **{"Idempotency-Key": f"k1-{alice}"})
    assert again.status_code == 201
    assert again.json()["escrow"]["id"] == first.json()["escrow"]["id"]
    assert again.json()["replayed"] is True
    listed = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice)).json()
    assert len(listed["escrows"]) == 1


def test_same_key_for_a_different_command_is_409(api: str, alice: str, bob: str) -> None:
    assert _create(api, alice, bob, **{"Idempotency-Key": f"k2-{alice}"}).status_code == 201
    body = {"buyer_id": alice, "seller_id": bob, "amount": 999}
    response = httpx.post(
        f"{api}/escrows", json=body, headers={**auth(alice), "Idempotency-Key": f"k2-{alice}"}
    )
    assert response.status_code == 409
    assert response.json()["error"] == "idempotency_conflict"


def test_scoped_keys_are_one_per_user_and_key() -> None:
    assert scoped_key("alice", "k1") == "alice:k1"  # as stored before: retries still match
    assert scoped_key("alice", None) is None
    digest = "\\" + hashlib.sha256(b"a:b").hexdigest()[:40]  # what "a:b" stands as
    pairs = [("a:b", "x"), ("a", "b:x"), ("a:", "x"), ("a", ":x"), (digest, "x")]
    assert len({scoped_key(user, key) for user, key in pairs}) == len(pairs)


def test_one_users_key_never_collides_with_anothers(api: str, alice: str, bob: str) -> None:
    # "a:b" with key "x" and "a" with key "b:x" once scoped to the same stored key:
    # the second user's command was refused, naming the first user's command.
    colon_user = f"{alice}:b"
    first = _create(api, colon_user, bob, **{"Idempotency-Key": "x"})
    assert first.status_code == 201, first.text
    second = _create(api, alice, bob, **{"Idempotency-Key": "b:x"})
    assert second.status_code == 201, second.text
    assert second.json()["replayed"] is False
    assert second.json()["escrow"]["id"] != first.json()["escrow"]["id"]


@pytest.mark.parametrize(
    "body",
    [
        {"buyer_id": "A", "seller_id": "B", "amount": -5},
        {"buyer_id": "A", "seller_id": "B", "amount": 0},
        {"buyer_id": "A", "seller_id": "B", "amount": "lots"},
        {"buyer_id": "A", "amount": 100},
        {"buyer_id": "A B", "seller_id": "B", "amount": 100},
        {"buyer_id": "A", "seller_id": "B", "amount": 100, "description": "x" * 501},
    ],
    ids=["negative", "zero", "string", "no-seller", "bad-id", "long-description"],
)
def test_malformed_commands_are_422_and_create_nothing(
    api: str, alice: str, bob: str, body: dict
) -> None:  # type: ignore[type-arg]
    body = {k: {"A": alice, "A B": f"{alice} x", "B": bob}.get(v, v) for k, v in body.items()}
    response = httpx.post(f"{api}/escrows", json=body, headers=auth(alice))
    assert response.status_code == 422
    listed = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice)).json()
    assert listed["escrows"] == []


def test_buyer_and_seller_must_differ(api: str, alice: str, bob: str) -> None:
    response = _create(api, alice, alice)
    assert response.status_code == 422
    assert response.json()["error"] == "invalid_command"


def test_a_stranger_cannot_open_an_escrow_for_others(api: str, alice: str, bob: str) -> None:
    body = {"buyer_id": alice, "seller_id": bob, "amount": 100}
    response = httpx.post(f"{api}/escrows", json=body, headers=auth("mallory"))
    assert response.status_code == 403


def _money_events(deployment: Deployment, escrow_id: str) -> list[str]:
    """The escrow's events that move money, in outbox order, read from the store."""
    engine = sa.create_engine(deployment.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT data FROM outbox ORDER BY seq")).scalars().all()
    finally:
        engine.dispose()
    events = [decode(bytes(data)) for data in rows]
    return [e.type for e in events if e.escrow_id == escrow_id and e.type in MONEY_EVENTS]


def test_full_lifecycle_with_callbacks_and_errors_that_change_nothing(
    api: str, deployment: Deployment, alice: str, bob: str
) -> None:
    escrow_id = _create(api, alice, bob).json()["escrow"]["id"]

    # Illegal: ship before funding -> 409, state unchanged.
    before = _escrow(api, escrow_id, alice)
    response = httpx.post(f"{api}/escrows/{escrow_id}/ship", headers=auth(bob))
    assert response.status_code == 409
    assert "cannot ship" in response.json()["detail"]
    assert _escrow(api, escrow_id, alice) == before

    # Wrong party: the seller cannot fund.
    assert httpx.post(f"{api}/escrows/{escrow_id}/fund", headers=auth(bob)).status_code == 403

    funded = httpx.post(
        f"{api}/escrows/{escrow_id}/fund", json={"phone": "254711000111"}, headers=auth(alice)
    )
    assert funded.status_code == 200, funded.text
    checkout = funded.json()["checkout_request_id"]
    assert checkout

    first = gateway_callback(deployment, checkout, RESULT_OK, phone="254711000111")
    assert first.status_code == 200
    assert first.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert _escrow(api, escrow_id, alice)["mpesa_receipt"] == "SAB12CD34E"
    recorded = (_escrow(api, escrow_id, alice), _money_events(deployment, escrow_id))
    assert recorded[1] == ["payment.received"]
    duplicate = gateway_callback(deployment, checkout, RESULT_OK, phone="254711000111")
    assert duplicate.status_code == 200
    assert "duplicate" in duplicate.json()["ResultDesc"]
    # A late contradicting result for the same checkout changes nothing either: the
    # whole escrow and its money events (a payment recorded twice would be received and
    # refunded, leaving the state "funded") are as they were.
    late = gateway_callback(deployment, checkout, RESULT_CANCELLED_BY_USER, settle=False)
    assert late.status_code == 200
    assert (_escrow(api, escrow_id, alice), _money_events(deployment, escrow_id)) == recorded

    assert httpx.post(f"{api}/escrows/{escrow_id}/ship", headers=auth(bob)).status_code == 200
    confirmed = httpx.post(f"{api}/escrows/{escrow_id}/confirm", headers=auth(alice))
    assert confirmed.status_code == 200
    assert confirmed.json()["escrow"]["state"] == "released"
    again = httpx.post(f"{api}/escrows/{escrow_id}/confirm", headers=auth(alice))
    assert again.status_code == 409


def test_dispute_and_resolution_need_the_admin(
    api: str, deployment: Deployment, alice: str, bob: str
) -> None:
    escrow_id = _create(api, alice, bob).json()["escrow"]["id"]
    checkout = httpx.post(f"{api}/escrows/{escrow_id}/fund", headers=auth(alice)).json()[
        "checkout_request_id"
    ]
    assert gateway_callback(deployment, checkout, RESULT_OK).status_code == 200
    opened = httpx.post(
        f"{api}/escrows/{escrow_id}/dispute",
        json={"reason": "never arrived"},
        headers=auth(alice),
    )
    assert opened.status_code == 200, opened.text
    body = {"outcome": "refund"}
    assert (
        httpx.post(f"{api}/escrows/{escrow_id}/resolve", json=body, headers=auth(alice)).status_code
        == 403
    )
    bad = httpx.post(
        f"{api}/escrows/{escrow_id}/resolve", json={"outcome": "split"}, headers=auth("admin")
    )
    assert bad.status_code == 422
    done = httpx.post(f"{api}/escrows/{escrow_id}/resolve", json=body, headers=auth("admin"))
    assert done.status_code == 200
    assert done.json()["escrow"]["state"] == "refunded"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"not json", 400),
        (b"[]", 400),
        (b'{"Body": {}}', 400),
        (b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_nope", "ResultCode": 0}}}', 400),
    ],
    ids=["not-json", "array", "no-callback", "success-without-metadata"],
)
def test_malformed_callbacks_are_rejected_not_500(
    api: str, deployment: Deployment, alice: str, bob: str, body: bytes, status: int
) -> None:
    escrow_id = _create(api, alice, bob).json()["escrow"]["id"]
    fund = httpx.post(f"{api}/escrows/{escrow_id}/fund", headers=auth(alice))
    url = deployment.daraja.pushes[fund.json()["checkout_request_id"]].callback_url
    before = _escrow(api, escrow_id, alice)
    response = httpx.post(url, content=body, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["ResultCode"] == 1
    assert _escrow(api, escrow_id, alice) == before


@pytest.mark.parametrize(
    "path",
    ["/mpesa/callback", "/mpesa/callback/nonsense", "/mpesa/callback/pay_1.AAAAAAAAAAAAAAAA"],
    ids=["retired-route", "no-mac", "wrong-mac"],
)
def test_callbacks_without_a_genuine_token_are_refused_before_any_work(api: str, path: str) -> None:
    # Not even the body is read: a bare junk body gets the same answer.
    body = stk_callback("ws_CO_never_made", RESULT_OK, amount=10, receipt="R")
    response = httpx.post(f"{api}{path}", json=body)
    assert response.status_code in (403, 410)
    assert response.json()["ResultCode"] == 1
    junk = httpx.post(f"{api}{path}", content=b"not json")
    assert junk.status_code == response.status_code


def test_cancel_and_unknown_escrow(api: str, alice: str, bob: str) -> None:
    escrow_id = _create(api, alice, bob).json()["escrow"]["id"]
    cancelled = httpx.post(f"{api}/escrows/{escrow_id}/cancel", headers=auth(alice))
    assert cancelled.status_code == 200
    assert cancelled.json()["escrow"]["state"] == "cancelled"
    missing = httpx.post(f"{api}/escrows/esc_missing/cancel", headers=auth(alice))
    assert missing.status_code == 404


def test_snapshot_is_per_user(api: str, alice: str, bob: str) -> None:
    _create(api, alice, bob)
    own = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice))
    assert own.status_code == 200
    assert own.json()["as_of"]
    assert httpx.get(f"{api}/users/{alice}/escrows", headers=auth(bob)).status_code == 403
    with_query = httpx.get(f"{api}/users/{alice}/escrows", params={"access_token": token(alice)})
    assert with_query.status_code == 200


def test_event_stream_errors(api: str, alice: str, bob: str) -> None:
    url = f"{api}/users/{alice}/events"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=auth(bob)).status_code == 403
    bad = httpx.get(url, headers={**auth(alice), "Last-Event-ID": "yesterday"})
    assert bad.status_code == 400
    assert "not a stream id" in bad.json()["detail"]
    bad_query = httpx.get(url, params={"last_event_id": "1-2-3"}, headers=auth(alice))
    assert bad_query.status_code == 400


def test_health_and_metrics(api: str, alice: str, bob: str) -> None:
    health = httpx.get(f"{api}/healthz").json()
    assert health["ok"] and health["live_feed"]
    _create(api, alice, bob)
    text = httpx.get(f"{api}/metrics").text
    for name in (
        "workbench_stream_length",
        "workbench_group_pending",
        "workbench_dead_letters",
        "workbench_sse_sessions",
        "workbench_sse_replays_total",
        "workbench_hub_stalled_disconnects_total",
        "workbench_redis_up 1.0",
    ):
        assert name in text


def test_dashboard_is_served(api: str) -> None:
    page = httpx.get(f"{api}/dashboard")
    assert page.status_code == 200
    assert "EventSource" in page.text


def test_with_redis_dead_commands_work_and_reads_say_503(
    api: str, alice: str, bob: str, redis_server
) -> None:  # type: ignore[no-untyped-def]
    redis_server.kill()
    try:
        created = _create(api, alice, bob)
        assert created.status_code == 201  # the outbox keeps it until Redis is back
        events = httpx.get(f"{api}/users/{alice}/events", headers=auth(alice), timeout=30)
        assert events.status_code == 503
        assert events.json()["error"] == "redis_unavailable"
        snapshot = httpx.get(f"{api}/users/{alice}/escrows", headers=auth(alice), timeout=30)
        assert snapshot.status_code == 503
        assert httpx.get(f"{api}/healthz", timeout=30).status_code == 503
        assert "workbench_redis_up 0.0" in httpx.get(f"{api}/metrics", timeout=30).text
    finally:
        redis_server.restart()
    # Back: the event of the command made while Redis was down arrives.
    got, reset = read_events(api, alice, last_event_id="0", until_ready_and=1)
    assert not reset and [e.event for e in got] == ["escrow.created"]


def test_a_redis_busy_with_a_script_makes_reads_503_not_500(tmp_path, alice: str) -> None:  # type: ignore[no-untyped-def]
    """A script past Redis' time limit makes it answer BUSY to everyone else until
    it is killed: the snapshot and the phone's events say 503 with Retry-After,
    and /metrics says Redis is down; they were 500s with a traceback each."""
    with RedisServer(tmp_path / "redis") as server:
        deployment = Deployment(server.url, f"sqlite:///{tmp_path / 'w.db'}", tmp_path)
        Store(deployment.database_url).create_schema()
        redis_client = server.client()
        redis_client.config_set("lua-time-limit", 20)
        spinner = threading.Thread(target=lambda: _refused_spin(server), daemon=True)
        try:
            api = deployment.start_api()
            spinner.start()
            wait_until(lambda: _busy(server), timeout=10, what="Redis to answer BUSY")
            for path in (f"/users/{alice}/escrows", f"/users/{alice}/events"):
                answer = httpx.get(f"{api}{path}", headers=auth(alice), timeout=30)
                assert answer.status_code == 503, (path, answer.text)
                assert answer.json()["error"] == "redis_unavailable"
                assert answer.headers["Retry-After"] == "2"
            assert "workbench_redis_up 0.0" in httpx.get(f"{api}/metrics", timeout=30).text
        finally:
            with contextlib.suppress(redis.ResponseError):  # not running any more
                redis_client.script_kill()
            spinner.join(10)
            redis_client.close()
            deployment.stop()


def _refused_spin(server: RedisServer) -> None:
    """Run a script that never ends, until SCRIPT KILL ends it (with an error)."""
    spinning = server.client()
    with contextlib.suppress(redis.ResponseError):
        spinning.eval("while true do end", 0)
    spinning.close()


def _busy(server: RedisServer) -> bool:
    probe = server.client()
    try:
        probe.ping()
        return False
    except redis.ResponseError as exc:
        return str(exc).startswith("BUSY ")
    finally:
        probe.close()


@pytest.mark.parametrize("last", [f"{2**64 - 1}-{2**64 - 1}", f"{2**64 - 1}-{2**64 - 2}"])
def test_a_last_event_id_past_every_entry_gets_a_reset(
    api: str, alice: str, bob: str, last: str
) -> None:
    # The largest id Redis can name: nothing can follow it (an exclusive range from
    # it is an error in Redis), and it is no entry of the stream, so: a reset.
    assert _create(api, alice, bob).status_code == 201
    got, reset = read_events(api, alice, last_event_id=last, until_ready_and=1)
    assert reset and got == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("soon", "must be a whole number of milliseconds, not 'soon'"),
        ("0", "must be positive, not 0"),
    ],
)
def test_a_bad_sse_retry_setting_is_refused_by_name(value: str, message: str) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1", "WORKBENCH_SSE_RETRY_MS": value}
    with pytest.raises(RuntimeError, match=f"WORKBENCH_SSE_RETRY_MS {message}"):
        Settings.from_env(env)


def test_the_sse_retry_hint_comes_from_the_environment(deployment) -> None:  # type: ignore[no-untyped-def]
    base = deployment.start_api(extra_env={"WORKBENCH_SSE_RETRY_MS": "4321"})
    user = "retry-user"
    with httpx.stream(
        "GET", f"{base}/users/{user}/events", headers=auth(user), timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("retry:"):
                assert line == "retry: 4321"
                break
        else:
            raise AssertionError("no retry: line")


@pytest.mark.parametrize(
    ("value", "message"), [("many", "'many'"), ("-1", "'-1'"), ("1025", "'1025'")]
)
def test_a_bad_partition_count_is_refused_by_name(value: str, message: str) -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1", "WORKBENCH_PARTITIONS": value}
    with pytest.raises(RuntimeError, match=f"WORKBENCH_PARTITIONS must be .* not {message}"):
        Settings.from_env(env)


def test_the_partition_count_comes_from_the_environment() -> None:
    env = {"REDIS_URL": "redis://127.0.0.1:1"}
    assert Settings.from_env(env).partitions == 0
    assert Settings.from_env({**env, "WORKBENCH_PARTITIONS": "16"}).partitions == 16
