"""Daraja STK callbacks (build and parse) and the seeded simulated gateway."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from workbench.domain.clock import ManualClock
from workbench.domain.escrow import RecordPaymentResult
from workbench.payments.mpesa import (
    RESULT_CANCELLED_BY_USER,
    RESULT_INSUFFICIENT_FUNDS,
    RESULT_OK,
    RESULT_TIMEOUT,
    CallbackError,
    GatewayBehaviour,
    GatewayUnavailable,
    SimulatedGateway,
    callback_token,
    parse_callback,
    reference_of,
    stk_callback,
)

CHECKOUT = "ws_CO_191220191020363925"


# -- the callback body ----------------------------------------------------------


def test_success_callback_has_daraja_shape() -> None:
    body = stk_callback(
        CHECKOUT,
        RESULT_OK,
        merchant_request_id="29115-34620561-1",
        amount=1500,
        receipt="NLJ7RT61SV",
        phone="254708374149",
        transaction_date=20191219102115,
    )
    assert body == {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "29115-34620561-1",
                "CheckoutRequestID": CHECKOUT,
                "ResultCode": 0,
                "ResultDesc": "The service request is processed successfully.",
                "CallbackMetadata": {
                    "Item": [
                        {"Name": "Amount", "Value": 1500.0},
                        {"Name": "MpesaReceiptNumber", "Value": "NLJ7RT61SV"},
                        {"Name": "TransactionDate", "Value": 20191219102115},
                        {"Name": "PhoneNumber", "Value": 254708374149},
                    ]
                },
            }
        }
    }


def test_failure_callback_has_no_metadata() -> None:
    body = stk_callback(CHECKOUT, RESULT_CANCELLED_BY_USER)
    callback = body["Body"]["stkCallback"]
    assert callback == {
        "MerchantRequestID": f"MR-{CHECKOUT[-10:]}",
        "CheckoutRequestID": CHECKOUT,
        "ResultCode": 1032,
        "ResultDesc": "Request cancelled by user",
    }


def test_success_round_trip() -> None:
    body = stk_callback(CHECKOUT, RESULT_OK, amount=2500, receipt="QKX1ABCD23")
    assert parse_callback(body) == RecordPaymentResult(
        checkout_request_id=CHECKOUT,
        result_code=0,
        result_desc="The service request is processed successfully.",
        receipt="QKX1ABCD23",
        amount=2500,
        phone="254700000000",  # the callback's PhoneNumber, checked against the request
    )


@pytest.mark.parametrize(
    ("code", "desc"),
    [
        (RESULT_CANCELLED_BY_USER, "Request cancelled by user"),
        (RESULT_TIMEOUT, "DS timeout user cannot be reached"),
        (RESULT_INSUFFICIENT_FUNDS, "The balance is insufficient for the transaction."),
        (2001, "Failed"),
    ],
)
def test_failure_round_trip(code: int, desc: str) -> None:
    result = parse_callback(stk_callback(CHECKOUT, code))
    assert result == RecordPaymentResult(
        checkout_request_id=CHECKOUT, result_code=code, result_desc=desc, receipt=None, amount=None
    )


def test_result_code_as_numeric_string_is_accepted() -> None:
    body = stk_callback(CHECKOUT, RESULT_TIMEOUT)
    body["Body"]["stkCallback"]["ResultCode"] = "1037"
    assert parse_callback(body).result_code == 1037


def test_metadata_item_order_does_not_matter() -> None:
    body = stk_callback(CHECKOUT, RESULT_OK, amount=10, receipt="R1")
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"].reverse()
    result = parse_callback(body)
    assert (result.amount, result.receipt) == (10, "R1")


# -- bad bodies -----------------------------------------------------------------


def _success() -> dict[str, Any]:
    return stk_callback(CHECKOUT, RESULT_OK, amount=100, receipt="R100")


def _without(path: tuple[str, ...]) -> dict[str, Any]:
    body = copy.deepcopy(_success())
    node = body
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return body


def _with(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    body = copy.deepcopy(_success())
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


CB = ("Body", "stkCallback")


def _items(amount: Any, receipt: Any, phone: Any = None) -> dict[str, Any]:
    """A success's CallbackMetadata: Amount, MpesaReceiptNumber and (if given) PhoneNumber."""
    items = [{"Name": "Amount", "Value": amount}, {"Name": "MpesaReceiptNumber", "Value": receipt}]
    if phone is not None:
        items.append({"Name": "PhoneNumber", "Value": phone})
    return {"Item": items}


BAD_BODIES = {
    "none": (None, "not an STK callback"),
    "list": ([], "not an STK callback"),
    "empty": ({}, "not an STK callback: missing 'Body'"),
    "missing-Body": ({"body": _success()["Body"]}, "missing 'Body'"),
    "missing-stkCallback": ({"Body": {}}, "missing 'stkCallback'"),
    "missing-CheckoutRequestID": (
        _without((*CB, "CheckoutRequestID")),
        "missing 'CheckoutRequestID'",
    ),
    "missing-ResultCode": (_without((*CB, "ResultCode")), "missing 'ResultCode'"),
    "empty-CheckoutRequestID": (
        _with((*CB, "CheckoutRequestID"), ""),
        "CheckoutRequestID must be a non-empty string",
    ),
    "int-CheckoutRequestID": (
        _with((*CB, "CheckoutRequestID"), 12345),
        "CheckoutRequestID must be a non-empty string",
    ),
    "word-ResultCode": (_with((*CB, "ResultCode"), "zero"), "ResultCode must be an integer"),
    "float-ResultCode": (_with((*CB, "ResultCode"), 0.0), "ResultCode must be an integer"),
    "bool-ResultCode": (_with((*CB, "ResultCode"), False), "ResultCode must be an integer"),
    "null-ResultCode": (_with((*CB, "ResultCode"), None), "ResultCode must be an integer"),
    "success-without-CallbackMetadata": (
        _without((*CB, "CallbackMetadata")),
        "successful callback without CallbackMetadata",
    ),
    "success-without-Item": (
        _with((*CB, "CallbackMetadata"), {}),
        "successful callback without CallbackMetadata",
    ),
    "success-with-null-Item": (
        _with((*CB, "CallbackMetadata"), {"Item": None}),
        "successful callback without CallbackMetadata",
    ),
    "success-with-nameless-item": (
        _with((*CB, "CallbackMetadata"), {"Item": [{"Value": 1}]}),
        "successful callback without CallbackMetadata",
    ),
    "success-without-receipt": (
        _with((*CB, "CallbackMetadata"), {"Item": [{"Name": "Amount", "Value": 100.0}]}),
        "successful callback needs a MpesaReceiptNumber",
    ),
    "success-with-non-object-item": (
        _with((*CB, "CallbackMetadata"), {"Item": [1]}),
        "successful callback without CallbackMetadata",
    ),
    "huge-ResultCode": (_with((*CB, "ResultCode"), 2**63), "out of range"),
    "negative-ResultCode": (_with((*CB, "ResultCode"), -1), "out of range"),
    "long-receipt": (_with((*CB, "CallbackMetadata"), _items(1, "R" * 65)), "MpesaReceiptNumber"),
    "long-CheckoutRequestID": (_with((*CB, "CheckoutRequestID"), "x" * 65), "at most 64"),
    "NUL-in-CheckoutRequestID": (_with((*CB, "CheckoutRequestID"), "ws_CO\x00"), "NUL"),
    "NUL-in-ResultDesc": (_with((*CB, "ResultDesc"), "ok\x00"), "NUL"),
    "NUL-in-receipt": (_with((*CB, "CallbackMetadata"), _items(1, "R\x00")), "NUL"),
    "NUL-in-phone": (_with((*CB, "CallbackMetadata"), _items(1, "R1", "2547\x00")), "NUL"),
    "success-without-amount": (
        _with((*CB, "CallbackMetadata"), {"Item": [{"Name": "MpesaReceiptNumber", "Value": "R"}]}),
        "successful callback needs a numeric Amount",
    ),
}


@pytest.mark.parametrize(("body", "message"), BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_body_raises_callback_error(body: Any, message: str) -> None:
    with pytest.raises(CallbackError) as info:
        parse_callback(body)
    assert message in str(info.value)


def test_failure_does_not_need_metadata() -> None:
    body = _without((*CB, "CallbackMetadata"))
    body["Body"]["stkCallback"]["ResultCode"] = RESULT_TIMEOUT
    assert parse_callback(body).result_code == RESULT_TIMEOUT


def test_non_numeric_amount_raises_callback_error() -> None:
    body = _success()
    body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][0]["Value"] = "one hundred"
    with pytest.raises(CallbackError):
        parse_callback(body)


def test_success_with_null_receipt_raises_callback_error() -> None:
    body = stk_callback(CHECKOUT, RESULT_OK, amount=100, receipt=None)
    with pytest.raises(CallbackError):
        parse_callback(body)


# -- the simulated gateway ------------------------------------------------------


def _run(seed: int, pushes: int, behaviour: GatewayBehaviour | None = None):  # type: ignore[no-untyped-def]
    clock = ManualClock()
    gateway = SimulatedGateway(clock, behaviour, seed=seed)
    checkouts = [gateway.stk_push(f"esc-{i}", 100 + i, "254700000001") for i in range(pushes)]
    return clock, gateway, checkouts


def test_same_seed_same_checkouts_and_callbacks() -> None:
    _, a, checkouts_a = _run(seed=11, pushes=200)
    _, b, checkouts_b = _run(seed=11, pushes=200)
    assert checkouts_a == checkouts_b
    assert a.requests == b.requests
    far = 1e12
    assert a.due(far) == b.due(far)


def test_different_seeds_differ() -> None:
    _, _, checkouts_a = _run(seed=1, pushes=20)
    _, _, checkouts_b = _run(seed=2, pushes=20)
    assert checkouts_a != checkouts_b


def test_stk_push_records_requests_with_unique_checkouts() -> None:
    _, gateway, checkouts = _run(seed=3, pushes=500)
    assert len(set(checkouts)) == 500
    assert all(c.startswith("ws_CO_") and len(c) <= 64 for c in checkouts)
    assert gateway.requests[checkouts[7]] == ("esc-7", 107)


def test_every_callback_parses_and_matches_its_request() -> None:
    _, gateway, _ = _run(seed=4, pushes=300)
    for body in gateway.due(1e12):
        result = parse_callback(body)
        escrow_id, amount = gateway.requests[result.checkout_request_id]
        assert escrow_id.startswith("esc-")
        if result.result_code == RESULT_OK:
            assert result.amount == amount
            assert result.receipt and result.receipt.startswith("S")
        else:
            assert result.result_code in (
                RESULT_CANCELLED_BY_USER,
                RESULT_TIMEOUT,
                RESULT_INSUFFICIENT_FUNDS,
            )
            assert result.amount is None
    assert gateway.pending == 0


def test_rates_of_failures_duplicates_and_late_callbacks() -> None:
    n = 4000
    behaviour = GatewayBehaviour(failure_rate=0.2, duplicate_rate=0.1, late_rate=0.05)
    clock, gateway, checkouts = _run(seed=99, pushes=n, behaviour=behaviour)
    start = clock.now()
    # Not late: delay <= delay_max, a duplicate at most delay_max later still.
    on_time = [parse_callback(b) for b in gateway.due(start + 2 * behaviour.delay_max)]
    late = [parse_callback(b) for b in gateway.due(start + behaviour.late_delay + 1e6)]
    assert gateway.pending == 0
    everything = on_time + late
    per_checkout = Counter(r.checkout_request_id for r in everything)
    assert set(per_checkout) == set(checkouts)  # lost_rate is 0: every push calls back
    assert set(per_checkout.values()) <= {1, 2}
    duplicates = sum(1 for c in per_checkout.values() if c == 2)
    failures = {r.checkout_request_id for r in everything if r.result_code != RESULT_OK}
    late_checkouts = {r.checkout_request_id for r in late}
    assert not late_checkouts & {r.checkout_request_id for r in on_time}
    # Binomial: mean n*p, sd sqrt(n p (1-p)); allow about 4 sd.
    assert 0.2 * n - 110 < len(failures) < 0.2 * n + 110
    assert 0.1 * n - 80 < duplicates < 0.1 * n + 80
    assert 0.05 * n - 60 < len(late_checkouts) < 0.05 * n + 60
    # A duplicate is the same body: same result and receipt.
    by_checkout: dict[str, set[tuple[int, str | None]]] = {}
    for r in everything:
        by_checkout.setdefault(r.checkout_request_id, set()).add((r.result_code, r.receipt))
    assert all(len(v) == 1 for v in by_checkout.values())


def test_lost_callbacks_never_arrive() -> None:
    n = 2000
    behaviour = GatewayBehaviour(lost_rate=0.25, duplicate_rate=0.0)
    _, gateway, checkouts = _run(seed=5, pushes=n, behaviour=behaviour)
    delivered = {parse_callback(b).checkout_request_id for b in gateway.due(1e12)}
    assert delivered < set(checkouts)
    lost = n - len(delivered)
    assert 0.25 * n - 90 < lost < 0.25 * n + 90


def test_clean_behaviour_has_no_failures_duplicates_or_late_callbacks() -> None:
    behaviour = GatewayBehaviour(failure_rate=0, duplicate_rate=0, late_rate=0)
    clock, gateway, checkouts = _run(seed=6, pushes=300, behaviour=behaviour)
    results = [parse_callback(b) for b in gateway.due(clock.now() + behaviour.delay_max)]
    assert sorted(r.checkout_request_id for r in results) == sorted(checkouts)
    assert all(r.result_code == RESULT_OK for r in results)
    assert gateway.pending == 0


def test_due_returns_nothing_before_the_minimum_delay() -> None:
    clock, gateway, _ = _run(seed=7, pushes=100)
    assert gateway.due(clock.now() + gateway.behaviour.delay_min - 0.001) == []
    assert gateway.pending >= 100
    clock.advance(gateway.behaviour.delay_min - 0.001)
    assert gateway.due() == []  # with no argument, due() reads the clock


def test_due_returns_callbacks_in_delivery_order() -> None:
    behaviour = GatewayBehaviour(duplicate_rate=0.3, late_rate=0.1)
    clock, stepped, _ = _run(seed=8, pushes=300, behaviour=behaviour)
    _, bulk, _ = _run(seed=8, pushes=300, behaviour=behaviour)
    # Step through time one callback instant at a time: next_due never goes back.
    order: list[dict[str, Any]] = []
    times: list[float] = []
    while (at := stepped.next_due()) is not None:
        batch = stepped.due(at)
        assert batch
        order.extend(batch)
        times.extend([at] * len(batch))
    assert times == sorted(times)
    assert times[0] >= clock.now() + behaviour.delay_min
    # One call covering everything returns the same sequence: sorted by delivery time.
    assert bulk.due(1e12) == order


def test_due_with_the_clock_delivers_in_waves() -> None:
    behaviour = GatewayBehaviour(duplicate_rate=0.0, late_rate=0.0, failure_rate=0.0)
    clock, gateway, checkouts = _run(seed=9, pushes=200, behaviour=behaviour)
    seen: list[str] = []
    for _ in range(int(behaviour.delay_max)):
        clock.advance(1)
        wave = gateway.due()
        seen.extend(parse_callback(b).checkout_request_id for b in wave)
        nxt = gateway.next_due()
        assert nxt is None or nxt > clock.now()
    assert sorted(seen) == sorted(checkouts)
    assert gateway.next_due() is None


# -- callback tokens ----------------------------------------------------------------------


def test_a_callback_token_names_its_reference_and_only_its_secret_makes_it() -> None:
    token = callback_token("secret-a", "pay_123")
    assert token.startswith("pay_123.")
    assert reference_of("secret-a", token) == "pay_123"
    assert reference_of("secret-b", token) is None  # another deployment's key
    other = callback_token("secret-a", "pay_124")
    # A genuine MAC moved to another reference, a truncated MAC, no MAC at all.
    assert reference_of("secret-a", "pay_124." + token.split(".", 1)[1]) is None
    assert reference_of("secret-a", other[:-1]) is None
    for junk in ("pay_123", "", ".", "pay_123.", "x" * 500):
        assert reference_of("secret-a", junk) is None


# -- the STK Push Query -------------------------------------------------------------------


def test_query_is_pending_until_the_buyer_answers_then_final() -> None:
    behaviour = GatewayBehaviour(failure_rate=0.5, duplicate_rate=0, late_rate=0)
    clock, gateway, checkouts = _run(seed=12, pushes=50, behaviour=behaviour)
    assert all(gateway.query(c).pending for c in checkouts)
    clock.advance(behaviour.delay_max + 1)
    by_callback = {
        parse_callback(b).checkout_request_id: parse_callback(b).result_code for b in gateway.due()
    }
    answers = {c: gateway.query(c).result_code for c in checkouts}
    assert answers == by_callback  # the query says what the callback said
    assert {RESULT_OK} < set(answers.values())  # both outcomes occur
    with pytest.raises(GatewayUnavailable):
        gateway.query("ws_CO_never_made")


def test_query_answers_even_when_the_callback_is_lost() -> None:
    behaviour = GatewayBehaviour(lost_rate=1.0)
    clock, gateway, checkouts = _run(seed=13, pushes=5, behaviour=behaviour)
    clock.advance(behaviour.delay_max + 1)
    assert gateway.due() == []
    assert {gateway.query(c).result_code for c in checkouts} == {RESULT_OK}


def test_query_is_sometimes_unavailable_and_asking_never_changes_the_callbacks() -> None:
    behaviour = GatewayBehaviour(query_unavailable_rate=0.3)
    clock, asked, checkouts = _run(seed=14, pushes=400, behaviour=behaviour)
    _, quiet, _ = _run(seed=14, pushes=400, behaviour=behaviour)
    clock.advance(1e6)
    unavailable = 0
    for checkout in checkouts:
        try:
            asked.query(checkout)
        except GatewayUnavailable:
            unavailable += 1
    assert 0.3 * 400 - 45 < unavailable < 0.3 * 400 + 45
    assert asked.due(1e12) == quiet.due(1e12)


def test_query_waits_its_delay_with_the_given_sleep() -> None:
    waited: list[float] = []
    behaviour = GatewayBehaviour(query_delay_min=0.1, query_delay_max=0.4)
    gateway = SimulatedGateway(ManualClock(), behaviour, seed=1, sleep=waited.append)
    checkout = gateway.stk_push("e1", 100, "254700000001")
    gateway.query(checkout)
    gateway.query(checkout)
    assert len(waited) == 2 and all(0.1 <= w <= 0.4 for w in waited)


def test_deliveries_carry_the_callback_url_of_their_push() -> None:
    clock = ManualClock()
    gateway = SimulatedGateway(clock, GatewayBehaviour(duplicate_rate=1.0), seed=2)
    checkout = gateway.stk_push("e1", 100, "254700000001", callback_url="https://x/cb/tok1")
    clock.advance(1e6)
    deliveries = gateway.due_deliveries()
    assert len(deliveries) == 2
    assert {d.url for d in deliveries} == {"https://x/cb/tok1"}
    assert {parse_callback(d.body).checkout_request_id for d in deliveries} == {checkout}


# -- Daraja over HTTP ---------------------------------------------------------------------


def test_daraja_client_pushes_and_queries_a_daraja_over_http() -> None:
    from workbench.payments.daraja import DarajaClient, DarajaConfig, DarajaStub

    stub = DarajaStub(passkey="the-passkey")
    client = DarajaClient(DarajaConfig(stub.url, stub.shortcode, "the-passkey"))
    wrong = DarajaClient(DarajaConfig(stub.url, stub.shortcode, "not-the-passkey"))
    try:
        checkout = client.stk_push(
            "e1", 1500, "254711000111", reference="pay_abc", callback_url="https://x/cb/t"
        )
        push = stub.pushes[checkout]
        assert (push.amount, push.phone, push.callback_url) == (
            1500,
            "254711000111",
            "https://x/cb/t",
        )
        assert client.query(checkout).pending
        stub.settle(checkout, RESULT_CANCELLED_BY_USER)
        answer = client.query(checkout)
        assert (answer.pending, answer.result_code) == (False, RESULT_CANCELLED_BY_USER)
        with pytest.raises(GatewayUnavailable):  # a password Daraja refuses is no answer
            wrong.query(checkout)
        with pytest.raises(GatewayUnavailable):
            client.query("ws_CO_never_made")
        stub.unavailable = True
        with pytest.raises(GatewayUnavailable):
            client.query(checkout)
        with pytest.raises(GatewayUnavailable):
            client.stk_push("e2", 10, "254711000111", reference="pay_d", callback_url="u")
    finally:
        client.close()
        wrong.close()
        stub.close()
