"""Schemathesis fuzzing of the live API: no 5xx, and a rejected request changes nothing.

Every operation of the running server's ``/openapi.json`` is fuzzed over real
HTTP (a uvicorn process, real Redis, a SQLite file) with positive and negative
data from schemathesis. Each case is sent with one of several credentials
(mostly a valid token of the fixed user ``fuzz-buyer``, also the seller, the
admin, a stranger, no token and a garbage token), and a share of the cases has
its path parameter replaced by a real escrow id or user id, seeded per test in
every state the escrow machine has, so requests reach the domain logic instead
of stopping at 404/403.

Checks on every response:

* ``not_a_server_error`` (no 5xx) and ``response_schema_conformance``, from
  schemathesis. ``status_code_conformance`` is not run: the routes answer
  401/403/404/409 without declaring them (FastAPI only documents 2xx/422), so
  it would fail on every rejection. The schema check skips one known gap: a
  :class:`~workbench.domain.escrow.DomainError` answered 422 (``invalid_command``,
  e.g. an amount above the domain's 250 000 KES cap, which the spec allows up
  to 10 000 000) has the body ``{"error", "detail": "<text>"}``, not the
  documented ``HTTPValidationError`` (``detail`` a list).
* for every 4xx, and for every GET whatever its status: the SQL store is
  unchanged, compared by :func:`fingerprint` read straight from the SQLite file.

The SSE route is fuzzed too: schemathesis stops reading an event stream after
``max-stream-events`` events (1 here; a 200 always sends ``ready`` at once) or
the request timeout, so an endless stream costs milliseconds, not a hang.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup, ServerError
from schemathesis.specs.openapi.checks import response_schema_conformance

from tests.http_support import Deployment, auth, gateway_callback, token
from workbench.payments.mpesa import RESULT_CANCELLED_BY_USER, RESULT_OK, stk_callback

BUYER = "fuzz-buyer"  # the fixed test user: most cases carry its token
SELLER = "fuzz-seller"
STRANGER = "fuzz-stranger"
ADMIN = "admin"
AMOUNT = 1500

# Every operation the live spec must have; test_every_live_operation_is_fuzzed
# fails when a route is added or removed, so nothing escapes the fuzzer silently.
OPERATIONS = [
    ("POST", "/escrows"),
    ("GET", "/escrows/{escrow_id}"),
    ("POST", "/escrows/{escrow_id}/fund"),
    ("POST", "/escrows/{escrow_id}/ship"),
    ("POST", "/escrows/{escrow_id}/confirm"),
    ("POST", "/escrows/{escrow_id}/dispute"),
    ("POST", "/escrows/{escrow_id}/resolve"),
    ("POST", "/escrows/{escrow_id}/cancel"),
    ("POST", "/mpesa/callback"),
    ("POST", "/mpesa/callback/{token}"),
    ("GET", "/users/{user_id}/escrows"),
    ("GET", "/users/{user_id}/events"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("POST", "/debug/users/{user_id}/drop"),
]


def schema_conformance(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> None:
    """``response_schema_conformance``, except for the service's own 422s.

    The domain's 422 body does not match the documented ``HTTPValidationError``
    (see the module docstring); every other response, pydantic's own 422s
    included, is still validated against the spec.
    """
    if response.status_code == 422 and _is_domain_error(response):
        return None
    return response_schema_conformance(ctx, response, case)  # type: ignore[no-any-return]


def _is_domain_error(response: schemathesis.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and isinstance(body.get("error"), str)


CHECKS = [not_a_server_error, schema_conformance]
TIMEOUT_S = 30.0  # a loaded CI machine is slow, not wrong
CONFIG = schemathesis.Config.from_dict(
    {"max-stream-events": 1, "request-timeout": TIMEOUT_S, "max-redirects": 0}
)
FUZZ = settings(
    max_examples=40,
    deadline=None,  # real HTTP + SQL: timing is not the property under test
    derandomize=True,  # the same cases on every run and in CI
    database=None,
    phases=[Phase.explicit, Phase.generate, Phase.shrink],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
    print_blob=False,
)

# Who a case claims to be. Duplicates weight the draw towards the fixed user.
CREDENTIALS = ["buyer", "buyer", "buyer", "seller", "admin", "stranger", "none", "garbage"]
_USER_OF = {"buyer": BUYER, "seller": SELLER, "admin": ADMIN, "stranger": STRANGER}


# -- the SQL fingerprint -------------------------------------------------------------------

FINGERPRINT_TABLES = ("escrows", "outbox", "commands", "checkouts")


def fingerprint(engine: sa.Engine) -> dict[str, Any]:
    """What a command may change, read from the SQLite file (not through the API).

    Row counts of the command-side tables, the escrows' (id, state, version)
    and the checkouts' results. ``outbox.published_at`` (the relay) and the
    handlers' tables (the fan-out worker) change in the background, so they
    are left out.
    """
    with engine.connect() as conn:
        out: dict[str, Any] = {
            table: conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one()
            for table in FINGERPRINT_TABLES
        }
        rows = conn.execute(sa.text("SELECT id, state, version FROM escrows ORDER BY id")).all()
        results = conn.execute(
            sa.text("SELECT checkout_request_id, result_code FROM checkouts ORDER BY 1")
        ).all()
    out["max_version"] = max((row.version for row in rows), default=0)
    out["escrows_hash"] = hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()[:16]
    out["checkouts_hash"] = hashlib.sha256(repr([tuple(r) for r in results]).encode()).hexdigest()[
        :16
    ]
    return out


def judge(
    case: schemathesis.Case,
    response: schemathesis.Response,
    before: dict[str, Any],
    after: dict[str, Any],
) -> None:
    """Raise if the response is a 5xx / breaks the schema, or a rejection changed the store."""
    case.validate_response(response, checks=CHECKS)
    rejected = 400 <= response.status_code < 500
    if (rejected or case.method.upper() == "GET") and after != before:
        changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
        raise AssertionError(
            f"{case.method.upper()} {case.formatted_path} answered {response.status_code} "
            f"but changed the store: {changed}\nresponse: {response.text[:500]}\n"
            f"request: {case.as_curl_command()}"
        )


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(deployment: Deployment) -> str:
    """The API under fuzz, with the per-pair create limit off.

    Every test seeds escrows between the same two fixed users, far more than
    the limit allows a pair in a day; the limit itself is tested in test_edges.
    """
    return deployment.start_api(extra_env={"WORKBENCH_CREATE_LIMIT": "0"})


@pytest.fixture(scope="module")
def live_schema(api: str) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{api}/openapi.json", config=CONFIG)


@pytest.fixture(scope="module")
def engine(deployment: Deployment) -> Iterator[sa.Engine]:
    engine = sa.create_engine(deployment.database_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def api_log(deployment: Deployment, api: str) -> str:
    """The log name of the API process behind ``api`` (``api-N``), for failure reports."""
    port = urlsplit(api).port
    return f"api-{deployment.ports.index(port)}"  # type: ignore[arg-type]


@dataclass
class Seed:
    escrow_ids: list[str]  # one per state: created .. disputed, plus one of strangers
    open_checkout: str  # an STK push without a callback yet
    settled_checkout: str  # one whose callback was recorded


def _post(api: str, path: str, user: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = httpx.post(f"{api}{path}", json=body, headers=auth(user))
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def _new(api: str, buyer: str = BUYER, seller: str = SELLER) -> str:
    body = {"buyer_id": buyer, "seller_id": seller, "amount": AMOUNT, "description": "fuzz"}
    return str(_post(api, "/escrows", buyer, body)["escrow"]["id"])


def _fund(api: str, escrow_id: str, *, pay: bool, deployment: Deployment) -> str:
    checkout = str(_post(api, f"/escrows/{escrow_id}/fund", BUYER)["checkout_request_id"])
    if pay:
        receipt = f"R{escrow_id[-8:]}"
        paid = gateway_callback(deployment, checkout, RESULT_OK, amount=AMOUNT, receipt=receipt)
        assert paid.status_code == 200, paid.text
    return checkout


def _token(deployment: Deployment, checkout: str) -> str:
    return deployment.daraja.pushes[checkout].callback_url.rsplit("/", 1)[1]


@pytest.fixture
def seed(api: str, deployment: Deployment) -> Seed:
    """Fresh escrows of the fixed users in every state, so path ids hit real rows."""
    created = _new(api)
    awaiting = _new(api)
    open_checkout = _fund(api, awaiting, pay=False, deployment=deployment)
    funded = _new(api)
    settled_checkout = _fund(api, funded, pay=True, deployment=deployment)
    shipped = _new(api)
    _fund(api, shipped, pay=True, deployment=deployment)
    _post(api, f"/escrows/{shipped}/ship", SELLER)
    disputed = _new(api)
    _fund(api, disputed, pay=True, deployment=deployment)
    _post(api, f"/escrows/{disputed}/dispute", BUYER, {"reason": "fuzz"})
    foreign = _new(api, "fuzz-other-a", "fuzz-other-b")
    return Seed(
        [created, awaiting, funded, shipped, disputed, foreign], open_checkout, settled_checkout
    )


# -- shaping generated cases ---------------------------------------------------------------


def _strategy(operation: Any) -> st.SearchStrategy[schemathesis.Case]:
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    if not any(True for _ in operation.iter_parameters()) and not operation.body:
        return positive  # nothing to negate: the negative strategy is unsatisfiable
    return st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))


def _credentials(case: schemathesis.Case, who: str) -> dict[str, str]:
    """Headers that make ``case`` be sent as ``who`` (overriding generated credentials)."""
    if who == "none":
        for name in [n for n in (case.headers or {}) if n.lower() == "authorization"]:
            del case.headers[name]  # type: ignore[union-attr]
        if case.query:
            case.query.pop("access_token", None)
        return {}
    if who == "garbage":
        return {"Authorization": "Bearer not-a-token"}
    return {"Authorization": f"Bearer {token(_USER_OF[who])}"}


def _aim(case: schemathesis.Case, who: str, seed: Seed, pick: int | None) -> None:
    """Point a share of the cases at real rows: a seeded escrow, the caller's own user id."""
    if pick is None:
        return
    params = case.path_parameters or {}
    if "escrow_id" in params:
        params["escrow_id"] = seed.escrow_ids[pick % len(seed.escrow_ids)]
    if "user_id" in params:
        params["user_id"] = _USER_OF.get(who, BUYER)
    body = case.body
    if case.operation.path == "/escrows" and isinstance(body, dict) and "buyer_id" in body:
        body["buyer_id"] = _USER_OF.get(who, BUYER)  # the caller is a party: 201 or 422


def _exchange(
    case: schemathesis.Case,
    *,
    api: str,
    engine: sa.Engine,
    deployment: Deployment,
    log_name: str,
    headers: dict[str, str],
    **kwargs: Any,
) -> schemathesis.Response:
    log = deployment.tmp / f"{log_name}.log"
    offset = log.stat().st_size
    before = fingerprint(engine)
    response = case.call(base_url=api, headers=headers, timeout=TIMEOUT_S, **kwargs)
    after = fingerprint(engine)
    try:
        judge(case, response, before, after)
    except BaseException as exc:
        if "json" in kwargs:
            exc.add_note(f"request body: {json.dumps(kwargs['json'])[:2000]}")
        logged = _log_after(log, offset, wait=response.status_code >= 500)
        exc.add_note(f"{log_name}.log during the request:\n{logged}")
        raise
    return response


def _log_after(log: Path, offset: int, *, wait: bool) -> str:
    # uvicorn logs a 500's traceback after sending the response: give it a moment.
    deadline = time.monotonic() + (2.0 if wait else 0.0)
    while log.stat().st_size <= offset and time.monotonic() < deadline:
        time.sleep(0.05)
    with log.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")[-4000:] or "(nothing)"


# -- tests ---------------------------------------------------------------------------------


def test_every_live_operation_is_fuzzed(live_schema: schemathesis.BaseSchema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in live_schema.get_all_operations()}
    assert live == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation(
    method: str,
    path: str,
    api: str,
    live_schema: schemathesis.BaseSchema,
    engine: sa.Engine,
    deployment: Deployment,
    api_log: str,
    seed: Seed,
) -> None:
    operation = live_schema[path][method]

    @FUZZ
    @given(
        case=_strategy(operation),
        who=st.sampled_from(CREDENTIALS),
        pick=st.none() | st.integers(0, 50),
    )
    def fuzz(case: schemathesis.Case, who: str, pick: int | None) -> None:
        headers = _credentials(case, who)
        _aim(case, who, seed, pick)
        _exchange(
            case, api=api, engine=engine, deployment=deployment, log_name=api_log, headers=headers
        )

    fuzz()


def _mostly(valid: st.SearchStrategy[Any], junk: st.SearchStrategy[Any]) -> Any:
    """Mostly ``valid``, sometimes ``junk``: most bodies get past the parser.

    (Hypothesis favours 0, the simplest integer, so 0 picks ``valid``.)
    """
    return st.integers(0, 3).flatmap(lambda i: junk if i == 3 else valid)


def _callback_bodies(checkouts: list[str]) -> st.SearchStrategy[Any]:
    """Daraja-shaped callbacks with fuzzed fields, plus arbitrary JSON.

    The spec declares no request body for the callback (the route parses raw
    JSON), so schemathesis alone would only send empty bodies.
    """
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=False, allow_infinity=False)  # JSON has no NaN/Infinity
        | st.text(max_size=20)
    )
    json_values = st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=8,
    )
    checkout = _mostly(st.sampled_from([*checkouts, "ws_CO_never_made"]), json_values)
    code = _mostly(st.sampled_from([RESULT_OK, RESULT_CANCELLED_BY_USER, "0", "1032"]), scalars)
    amount = _mostly(st.sampled_from([AMOUNT, str(AMOUNT), float(AMOUNT), AMOUNT + 1]), scalars)
    receipt = _mostly(st.sampled_from(["FUZZ0001", "FUZZ0002"]), scalars)
    extra_item = st.fixed_dictionaries(
        {"Name": st.sampled_from(["Amount", "MpesaReceiptNumber", "PhoneNumber"]), "Value": scalars}
    )

    @st.composite
    def daraja(draw: st.DrawFn) -> Any:
        items = [
            {"Name": "Amount", "Value": draw(amount)},
            {"Name": "MpesaReceiptNumber", "Value": draw(receipt)},
            *draw(st.lists(_mostly(extra_item, json_values), max_size=2)),
        ]
        callback: dict[str, Any] = {
            "MerchantRequestID": "m-1",
            "CheckoutRequestID": draw(checkout),
            "ResultCode": draw(code),
            "ResultDesc": draw(_mostly(st.just("fuzz"), json_values)),
        }
        metadata = draw(_mostly(st.just({"Item": items}), json_values))
        if metadata is not None:
            callback["CallbackMetadata"] = metadata
        return {"Body": {"stkCallback": callback}}

    return _mostly(daraja(), json_values)


# A successful callback whose CallbackMetadata.Item holds a non-object: parse_callback
# evaluates ``item.get("Value")`` first, so an int/str/list/None item raises
# AttributeError, which it does not catch -> 500.
NON_OBJECT_ITEM = {
    "Body": {
        "stkCallback": {
            "CheckoutRequestID": "ws_CO_never_made",
            "ResultCode": 0,
            "CallbackMetadata": {"Item": [1]},
        }
    }
}


def test_fuzz_mpesa_callback_bodies(
    api: str,
    live_schema: schemathesis.BaseSchema,
    engine: sa.Engine,
    deployment: Deployment,
    api_log: str,
    seed: Seed,
) -> None:
    operation = live_schema["/mpesa/callback/{token}"]["POST"]
    # The first result per checkout is final, so give the fuzzer several open ones.
    checkouts = [
        seed.open_checkout,
        *(_fund(api, _new(api), pay=False, deployment=deployment) for _ in range(5)),
    ]
    checkouts.append(seed.settled_checkout)
    # Each checkout's genuine callback URL, and one that is not genuine.
    tokens = [_token(deployment, c) for c in checkouts] + ["pay_0.AAAA"]

    @settings(FUZZ, max_examples=60)
    @given(
        case=operation.as_strategy(),
        token=st.sampled_from(tokens),
        body=_callback_bodies(checkouts),
    )
    # Once a 500: a non-object in CallbackMetadata.Item.
    @example(case=operation.Case(), token=tokens[0], body=NON_OBJECT_ITEM)
    def fuzz(case: schemathesis.Case, token: str, body: Any) -> None:
        case.path_parameters = {"token": token}
        _exchange(
            case,
            api=api,
            engine=engine,
            deployment=deployment,
            log_name=api_log,
            headers={},
            json=body,
        )

    fuzz()


# -- the checks can fail -------------------------------------------------------------------


def test_the_checks_reject_a_500_and_a_changed_store(
    api: str, live_schema: schemathesis.BaseSchema, engine: sa.Engine
) -> None:
    """The judge is not vacuous: a fake 500 fails it, so does a 4xx that changed the store."""
    case = live_schema["/escrows/{escrow_id}"]["GET"].Case(path_parameters={"escrow_id": "nope"})
    real = case.call(base_url=api, headers=auth(BUYER))
    assert real.status_code == 404
    state = fingerprint(engine)
    judge(case, real, state, state)  # the genuine answer passes

    def fake(status: int) -> schemathesis.Response:
        return schemathesis.Response(
            status_code=status,
            headers={"content-type": ["application/json"]},
            content=b'{"detail": "boom"}',
            request=real.request,
            elapsed=0.01,
            verify=True,
        )

    with pytest.raises(FailureGroup) as failed:
        judge(case, fake(500), state, state)
    assert [type(e) for e in failed.value.exceptions] == [ServerError]

    # A real state change (a new escrow) moves the fingerprint...
    _new(api)
    changed = fingerprint(engine)
    assert changed["escrows"] == state["escrows"] + 1
    assert changed["escrows_hash"] != state["escrows_hash"]
    # ...and a rejection that coincided with one fails the judge.
    with pytest.raises(AssertionError, match="changed the store"):
        judge(case, fake(409), state, changed)


def test_fingerprint_sees_checkout_results(
    api: str, engine: sa.Engine, deployment: Deployment
) -> None:
    escrow_id = _new(api)
    before = fingerprint(engine)
    checkout = _fund(api, escrow_id, pay=False, deployment=deployment)
    requested = fingerprint(engine)
    assert requested["checkouts"] == before["checkouts"] + 1
    response = gateway_callback(deployment, checkout, RESULT_CANCELLED_BY_USER)
    assert response.status_code == 200
    settled = fingerprint(engine)
    assert settled["checkouts_hash"] != requested["checkouts_hash"]
    assert settled["escrows_hash"] != requested["escrows_hash"]


# -- bugs the fuzzer found (fixed; kept as regressions) ---------------------------------


class KnownBug(AssertionError):
    """A 5xx from the server (these were bugs; kept as regression checks)."""


@pytest.mark.parametrize("code", [2**63, -(2**63) - 1, "9" * 30], ids=["2**63", "-2**63-1", "str"])
def test_callback_with_an_out_of_range_result_code_is_rejected_not_500(
    api: str, engine: sa.Engine, deployment: Deployment, code: int | str
) -> None:
    escrow_id = _new(api)
    checkout = _fund(api, escrow_id, pay=False, deployment=deployment)
    before = fingerprint(engine)
    body = {"Body": {"stkCallback": {"CheckoutRequestID": checkout, "ResultCode": code}}}
    response = httpx.post(deployment.daraja.pushes[checkout].callback_url, json=body)
    assert fingerprint(engine) == before  # holds today: the transaction rolls back
    if response.status_code >= 500:
        raise KnownBug(f"{response.status_code}: {response.text}")
    assert response.status_code == 400, response.text


@pytest.mark.parametrize("item", [1, "Amount", None, ["Amount", AMOUNT]])
def test_callback_with_a_non_object_metadata_item_is_rejected_not_500(
    api: str, engine: sa.Engine, deployment: Deployment, item: Any
) -> None:
    checkout = _fund(api, _new(api), pay=False, deployment=deployment)
    callback = stk_callback(checkout, RESULT_OK, amount=AMOUNT, receipt="FUZZ0003")
    callback["Body"]["stkCallback"]["CallbackMetadata"]["Item"].append(item)
    before = fingerprint(engine)
    response = httpx.post(deployment.daraja.pushes[checkout].callback_url, json=callback)
    assert fingerprint(engine) == before
    if response.status_code >= 500:
        raise KnownBug(f"{response.status_code}: {response.text}")
    assert response.status_code == 400, response.text
