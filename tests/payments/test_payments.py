"""Payments that can't be forged, over real HTTP.

Real API processes (``--mpesa external``) whose gateway is a local Daraja over
real HTTP (:class:`~workbench.payments.daraja.DarajaStub`: it takes the pushes, knows each
CallBackURL, answers STK Push Queries with what the test says the buyer did),
the relay, the ledger and fan-out workers as real processes, real SQLite.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.http_support import Deployment, auth, gateway_callback
from workbench.domain import events as ev
from workbench.ops.waiting import wait_until
from workbench.payments.mpesa import RESULT_CANCELLED_BY_USER, RESULT_OK, stk_callback
from workbench.store import (
    Store,
    checkouts,
    escrows,
    inbox,
    ledger_entries,
    outbox,
    payment_requests,
)

PHONE = "254711000111"


@pytest.fixture(scope="module")
def ledger_worker(deployment: Deployment) -> None:
    deployment.start_worker("ledger")


@pytest.fixture(scope="module")
def store(deployment: Deployment) -> Any:
    s = Store(deployment.database_url)
    yield s
    s.close()


def _create(api: str, buyer: str, seller: str, amount: int = 1500) -> str:
    body = {"buyer_id": buyer, "seller_id": seller, "amount": amount}
    response = httpx.post(f"{api}/escrows", json=body, headers=auth(buyer))
    assert response.status_code == 201, response.text
    return response.json()["escrow"]["id"]  # type: ignore[no-any-return]


def _fund(api: str, escrow_id: str, buyer: str, phone: str = PHONE) -> str:
    response = httpx.post(
        f"{api}/escrows/{escrow_id}/fund", json={"phone": phone}, headers=auth(buyer), timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()["checkout_request_id"]  # type: ignore[no-any-return]


def _everything(store: Store, escrow_id: str) -> dict[str, Any]:
    """All the service holds about one escrow, once the ledger has handled its events."""
    with store.engine.connect() as conn:
        events = [
            ev.decode(bytes(data))
            for data in conn.execute(select(outbox.c.data).order_by(outbox.c.seq)).scalars()
        ]
    ids = [e.event_id for e in events if e.aggregate_id == escrow_id]

    def ledger_caught_up() -> bool:
        with store.engine.connect() as conn:
            handled = set(
                conn.execute(
                    select(inbox.c.event_id).where(
                        inbox.c.group_name == "ledger", inbox.c.event_id.in_(ids)
                    )
                ).scalars()
            )
        return handled == set(ids)

    wait_until(ledger_caught_up, timeout=30, what=f"the ledger to handle {escrow_id}'s events")
    with store.engine.connect() as conn:
        return {
            "escrow": conn.execute(select(escrows).where(escrows.c.id == escrow_id)).all(),
            "events": ids,
            # A checkout's recorded result (its verification bookkeeping may move).
            "checkouts": conn.execute(
                select(
                    checkouts.c.checkout_request_id,
                    checkouts.c.result_code,
                    checkouts.c.result_desc,
                    checkouts.c.receipt,
                    checkouts.c.settled_at,
                ).where(checkouts.c.escrow_id == escrow_id)
            ).all(),
            "ledger": conn.execute(
                select(ledger_entries).where(ledger_entries.c.escrow_id == escrow_id)
            ).all(),
        }


def _state(api: str, escrow_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api}/escrows/{escrow_id}", headers=auth("admin"))
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _counter(api: str, name: str, outcome: str) -> float:
    for line in httpx.get(f"{api}/metrics").text.splitlines():
        if line.startswith(f'workbench_{name}_total{{outcome="{outcome}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.usefixtures("ledger_worker")
def test_forged_callbacks_by_buyer_seller_and_stranger_change_nothing(
    api: str, deployment: Deployment, store: Store, alice: str, bob: str
) -> None:
    victim = _create(api, alice, bob)
    checkout = _fund(api, victim, alice)
    assert _state(api, victim)["checkout_request_id"] == checkout  # what all of them can see
    forgers: dict[str, str] = {}  # each forger's own genuine callback URL
    for forger in (alice, bob, f"mallory-{bob}"):
        own = _create(api, forger, f"carol-{forger}", amount=200)
        own_checkout = _fund(api, own, forger)
        forgers[forger] = deployment.daraja.pushes[own_checkout].callback_url
        # Claiming one's own payment succeeded, at one's own genuine URL, is not enough:
        # the gateway says the payment is still being processed.
        claim = stk_callback(own_checkout, RESULT_OK, amount=200, receipt="FORGEDOWN", phone=PHONE)
        own_before = _everything(store, own)
        assert httpx.post(forgers[forger], json=claim).status_code == 202
        assert _everything(store, own) == own_before
    before = _everything(store, victim)
    success = stk_callback(checkout, RESULT_OK, amount=1500, receipt="FORGED", phone=PHONE)
    failure = stk_callback(checkout, RESULT_CANCELLED_BY_USER)
    victim_url = deployment.daraja.pushes[checkout].callback_url
    for forger, own_url in forgers.items():
        for body in (success, failure):
            at_own_url = httpx.post(own_url, json=body)
            assert at_own_url.status_code == 403, (forger, at_own_url.text)
            assert at_own_url.json()["ResultCode"] == 1
            assert httpx.post(f"{api}/mpesa/callback", json=body).status_code == 410
            guessed = victim_url[:-4] + "AAAA"  # the right reference, a guessed MAC
            assert httpx.post(guessed, json=body).status_code == 403
    assert _everything(store, victim) == before
    assert _counter(api, "mpesa_callbacks", "rejected_checkout_mismatch") >= 6
    assert _counter(api, "mpesa_callbacks", "rejected_bad_token") >= 12
    assert _counter(api, "mpesa_callbacks", "unverified") >= 3

    genuine = gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE, receipt="GENUINE1")
    assert genuine.status_code == 200, genuine.text
    after = _state(api, victim)
    assert (after["state"], after["mpesa_receipt"]) == ("funded", "GENUINE1")
    assert len(_everything(store, victim)["ledger"]) > 0  # the payment is in the ledger now


@pytest.mark.usefixtures("ledger_worker")
def test_a_forged_failure_first_does_not_shadow_the_genuine_success(
    api: str, deployment: Deployment, store: Store, alice: str, bob: str
) -> None:
    escrow_id = _create(api, alice, bob)
    checkout = _fund(api, escrow_id, alice)
    before = _everything(store, escrow_id)
    # Even at the genuine URL (leaked, say), a failure the gateway does not confirm is nothing.
    forged = gateway_callback(deployment, checkout, RESULT_CANCELLED_BY_USER, settle=False)
    assert forged.status_code == 202, forged.text
    assert _everything(store, escrow_id) == before
    genuine = gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE)
    assert genuine.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    assert _state(api, escrow_id)["state"] == "funded"


@pytest.mark.parametrize(
    ("amount", "phone"), [(1499, PHONE), (1500, "254799999999")], ids=["amount", "phone"]
)
def test_a_callback_that_differs_from_the_request_is_refused(
    api: str, deployment: Deployment, store: Store, alice: str, bob: str, amount: int, phone: str
) -> None:
    escrow_id = _create(api, alice, bob)
    checkout = _fund(api, escrow_id, alice)
    before = _state(api, escrow_id)
    refused = gateway_callback(deployment, checkout, RESULT_OK, amount=amount, phone=phone)
    assert refused.status_code == 400, refused.text
    assert _state(api, escrow_id) == before
    assert gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE).status_code == 200
    assert _state(api, escrow_id)["state"] == "funded"


def test_nothing_is_recorded_while_the_query_is_unanswered(
    api: str, deployment: Deployment, alice: str, bob: str
) -> None:
    escrow_id = _create(api, alice, bob)
    checkout = _fund(api, escrow_id, alice)
    before = _state(api, escrow_id)
    deployment.daraja.unavailable = True
    try:
        unanswered = _counter(api, "mpesa_verifications", "unavailable")
        response = gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE)
        assert response.status_code == 202, response.text
        # The verification pass keeps asking (every 0.3 s, backing off) and records nothing.
        wait_until(
            lambda: _counter(api, "mpesa_verifications", "unavailable") >= unanswered + 3,
            timeout=30,
            what="three unanswered queries",
        )
        assert _state(api, escrow_id) == before
    finally:
        deployment.daraja.unavailable = False
    wait_until(
        lambda: _state(api, escrow_id)["state"] == "funded",
        timeout=30,
        what="the verification pass to record the confirmed payment",
    )
    assert _state(api, escrow_id)["mpesa_receipt"] == "SAB12CD34E"  # the callback's receipt


def test_a_payment_whose_callback_never_came_is_found(
    deployment: Deployment, alice: str, bob: str
) -> None:
    api = deployment.start_api(extra_env={"WORKBENCH_MPESA_VERIFY_AFTER_S": "1"})
    escrow_id = _create(api, alice, bob)
    checkout = _fund(api, escrow_id, alice)
    deployment.daraja.settle(checkout, RESULT_OK)  # the buyer paid; the callback is lost
    wait_until(
        lambda: _state(api, escrow_id)["state"] == "funded",
        timeout=30,
        what="the verification pass to find the payment",
    )


def test_a_slow_gateway_does_not_block_another_escrows_command(
    api: str, deployment: Deployment, alice: str, bob: str
) -> None:
    slow = _create(api, alice, bob)
    started = deployment.daraja.pushes_started
    deployment.daraja.push_delay_s = 8.0
    funded: list[str] = []
    try:
        funding = threading.Thread(target=lambda: funded.append(_fund(api, slow, alice)))
        funding.start()
        wait_until(lambda: deployment.daraja.pushes_started > started, timeout=10, what="the push")
        # The push is in flight; SQLite allows one writer at a time, so these two
        # writes would wait for the push if it ran inside the fund's transaction.
        t0 = time.monotonic()
        other = _create(api, bob, alice)
        cancelled = httpx.post(f"{api}/escrows/{other}/cancel", headers=auth(bob))
        elapsed = time.monotonic() - t0
        assert cancelled.status_code == 200
        assert funding.is_alive(), "the push was not slow after all"
        assert elapsed < 6.0, f"another escrow's commands took {elapsed:.1f}s"
        funding.join(timeout=30)
    finally:
        deployment.daraja.push_delay_s = 0.0
    assert funded and _state(api, slow)["checkout_request_id"] == funded[0]


def test_a_crash_between_commit_and_push_is_recovered(
    deployment: Deployment, store: Store, alice: str, bob: str
) -> None:
    env = {"WORKBENCH_MPESA_PUSH_GRACE_S": "2"}
    api = deployment.start_api(extra_env=env)
    name = f"api-{len(deployment.ports) - 1}"
    escrow_id = _create(api, alice, bob)
    started = deployment.daraja.pushes_started
    deployment.daraja.push_delay_s, deployment.daraja.drop_pushes = 2.0, True
    try:

        def fund() -> None:
            with contextlib.suppress(httpx.HTTPError):  # its server is killed mid-request
                httpx.post(
                    f"{api}/escrows/{escrow_id}/fund", json={"phone": PHONE}, headers=auth(alice)
                )

        threading.Thread(target=fund, daemon=True).start()
        wait_until(lambda: deployment.daraja.pushes_started > started, timeout=10, what="push")
        deployment.processes[name].kill()  # SIGKILL: committed, the push never taken
        deployment.processes[name].wait(10)
    finally:
        deployment.daraja.push_delay_s, deployment.daraja.drop_pushes = 0.0, False
    # Committed and owed: the request is in the store, the escrow still waits for funding.
    with store.engine.connect() as conn:
        owed = conn.execute(
            select(payment_requests.c.state, payment_requests.c.checkout_request_id).where(
                payment_requests.c.escrow_id == escrow_id
            )
        ).all()
        state = conn.execute(select(escrows.c.state).where(escrows.c.id == escrow_id)).scalar()
    assert (owed, state) == ([("pushing", None)], "created")
    api = deployment.start_api(extra_env=env)
    wait_until(
        lambda: _state(api, escrow_id)["state"] == "awaiting_payment",
        timeout=30,
        what="the verification pass to send the owed push",
    )
    checkout = _state(api, escrow_id)["checkout_request_id"]
    assert deployment.daraja.pushes[checkout].amount == 1500
    assert gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE).status_code == 200
    assert _state(api, escrow_id)["state"] == "funded"


def test_the_source_allow_list_refuses_other_addresses(
    deployment: Deployment, alice: str, bob: str
) -> None:
    api = deployment.start_api(extra_env={"WORKBENCH_MPESA_ALLOW": "192.0.2.0/24"})
    escrow_id = _create(api, alice, bob)
    checkout = _fund(api, escrow_id, alice)
    before = _state(api, escrow_id)
    refused = gateway_callback(deployment, checkout, RESULT_OK, phone=PHONE)
    assert refused.status_code == 403, refused.text
    assert _state(api, escrow_id) == before
    assert _counter(api, "mpesa_callbacks", "rejected_source") == 1
