"""M-Pesa STK push: Daraja's callback JSON, callback URLs, and a simulated gateway.

The real flow: we ask Daraja for an STK push, it answers with a
``CheckoutRequestID``, the buyer enters a PIN on the phone, and Daraja POSTs
a callback to the ``CallBackURL`` we gave with the push. Callbacks can arrive
late, twice, out of order or not at all; :class:`SimulatedGateway` produces all
of these from a seeded RNG, in exactly Daraja's JSON shape, so the same parsing
code serves both.

A callback carries no signature, so it is a claim, not a fact. Two things make
it trustworthy: each push gets its own callback URL whose last path segment is
:func:`callback_token` (an HMAC of the payment reference, so nobody but the
gateway learns it), and every result is confirmed with the gateway's STK Push
Query (:meth:`SimulatedGateway.query`, :class:`QueryResult`) before it is
recorded. A query that cannot be answered raises :class:`GatewayUnavailable`;
a payment still in progress answers ``pending``.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workbench.domain.escrow import RecordPaymentResult

RESULT_OK = 0
RESULT_CANCELLED_BY_USER = 1032
RESULT_TIMEOUT = 1037
RESULT_INSUFFICIENT_FUNDS = 1

_DESCRIPTIONS = {
    RESULT_OK: "The service request is processed successfully.",
    RESULT_CANCELLED_BY_USER: "Request cancelled by user",
    RESULT_TIMEOUT: "DS timeout user cannot be reached",
    RESULT_INSUFFICIENT_FUNDS: "The balance is insufficient for the transaction.",
}


class CallbackError(ValueError):
    """The body is not a Daraja STK callback."""


class GatewayUnavailable(RuntimeError):
    """The gateway did not answer (network error, 5xx, throttled): try again later."""


class NotThisGateway(GatewayUnavailable):
    """This process's simulated gateway never made that checkout (another API worker's did).

    Not the gateway failing: ask again soon without backing off, so the worker
    whose gateway made it answers.
    """


@dataclass(frozen=True)
class QueryResult:
    """The gateway's answer to an STK Push Query.

    ``result_code`` is None while the payment is still being processed
    (Daraja answers errorCode 500.001.1001 then); otherwise it is final.
    """

    checkout_request_id: str
    result_code: int | None
    result_desc: str = ""

    @property
    def pending(self) -> bool:
        return self.result_code is None


# -- per-checkout callback URLs ------------------------------------------------------

_TOKEN_CONTEXT = b"workbench mpesa callback v1:"


def callback_token(secret: str, reference: str) -> str:
    """The unguessable last path segment of one push's CallBackURL: ``<reference>.<mac>``."""
    mac = hmac.new(secret.encode(), _TOKEN_CONTEXT + reference.encode(), hashlib.sha256)
    return f"{reference}.{base64.urlsafe_b64encode(mac.digest()[:24]).decode()}"


def reference_of(secret: str, token: str) -> str | None:
    """The payment reference a callback token was made for, or None if it is not genuine."""
    reference, dot, _ = token.rpartition(".")
    if not dot or not reference or len(token) > 200:
        return None
    expected = callback_token(secret, reference)
    return reference if hmac.compare_digest(expected.encode(), token.encode()) else None


def token_of(callback_url: str) -> str:
    """The token at the end of a callback URL (what the route receives)."""
    return callback_url.rstrip("/").rsplit("/", 1)[-1]


def stk_callback(
    checkout_request_id: str,
    result_code: int,
    *,
    merchant_request_id: str = "",
    amount: int | None = None,
    receipt: str | None = None,
    phone: str = "254700000000",
    transaction_date: int = 20261129120000,
) -> dict[str, Any]:
    """A callback body exactly as Daraja sends it."""
    callback: dict[str, Any] = {
        "MerchantRequestID": merchant_request_id or f"MR-{checkout_request_id[-10:]}",
        "CheckoutRequestID": checkout_request_id,
        "ResultCode": result_code,
        "ResultDesc": _DESCRIPTIONS.get(result_code, "Failed"),
    }
    if result_code == RESULT_OK:
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": float(amount or 0)},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "TransactionDate", "Value": transaction_date},
                {"Name": "PhoneNumber", "Value": int(phone) if phone.isdigit() else phone},
            ]
        }
    return {"Body": {"stkCallback": callback}}


def parse_callback(body: Any) -> RecordPaymentResult:
    """Parse a Daraja STK callback body; raise :class:`CallbackError` if it is not one."""
    try:
        callback = body["Body"]["stkCallback"]
        checkout = callback["CheckoutRequestID"]
        code = callback["ResultCode"]
    except (KeyError, TypeError) as exc:
        raise CallbackError(f"not an STK callback: missing {exc}") from None
    if not isinstance(checkout, str) or not checkout or len(checkout) > 64:
        raise CallbackError("CheckoutRequestID must be a non-empty string of at most 64 chars")
    _no_nul(checkout, "CheckoutRequestID")
    desc = str(callback.get("ResultDesc", ""))
    _no_nul(desc, "ResultDesc")
    if isinstance(code, bool) or not isinstance(code, int | str):
        raise CallbackError("ResultCode must be an integer")
    try:
        code = int(code)
    except ValueError:
        raise CallbackError(f"ResultCode must be an integer, not {code!r}") from None
    if not 0 <= code < 2**31:  # Daraja's codes are small; the column is 32-bit
        raise CallbackError(f"ResultCode {code} is out of range")
    items: dict[str, Any] = {}
    if code == RESULT_OK:
        try:
            for item in callback["CallbackMetadata"]["Item"]:
                if not isinstance(item, dict):
                    raise TypeError(f"an Item is {type(item).__name__}, not an object")
                items[item["Name"]] = item.get("Value")
        except (KeyError, TypeError) as exc:
            raise CallbackError(f"successful callback without CallbackMetadata: {exc}") from None
        receipt = items.get("MpesaReceiptNumber")
        if not isinstance(receipt, str) or not receipt or len(receipt) > 64:
            raise CallbackError("successful callback needs a MpesaReceiptNumber (<= 64 chars)")
        _no_nul(receipt, "MpesaReceiptNumber")
        amount = items.get("Amount")
        if isinstance(amount, bool) or not isinstance(amount, int | float | str):
            raise CallbackError(f"successful callback needs a numeric Amount, not {amount!r}")
        try:
            amount_value = float(amount)
        except ValueError:
            raise CallbackError(f"Amount must be a number, not {amount!r}") from None
        if not amount_value.is_integer() or amount_value <= 0:
            raise CallbackError(f"Amount must be a positive whole number of KES, not {amount!r}")
        return RecordPaymentResult(
            checkout_request_id=checkout,
            result_code=code,
            result_desc=desc,
            receipt=receipt,
            amount=int(amount_value),
            phone=_phone(items.get("PhoneNumber")),
        )
    return RecordPaymentResult(
        checkout_request_id=checkout,
        result_code=code,
        result_desc=desc,
    )


def _phone(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        return None
    phone = str(value)[:16]
    _no_nul(phone, "PhoneNumber")
    return phone


def _no_nul(text: str, name: str) -> None:
    # Daraja sends none; PostgreSQL's text cannot hold one (the driver would raise).
    if "\x00" in text:
        raise CallbackError(f"{name} must not contain NUL")


@dataclass(frozen=True)
class GatewayBehaviour:
    """How the simulated M-Pesa misbehaves. Delays are in seconds."""

    failure_rate: float = 0.1  # the buyer cancels, times out, or lacks funds
    duplicate_rate: float = 0.05  # the same callback sent twice
    late_rate: float = 0.02  # the callback comes after the payment timeout
    lost_rate: float = 0.0  # no callback at all
    delay_min: float = 2.0
    delay_max: float = 30.0
    late_delay: float = 3600.0
    # STK Push Query: how long an answer takes, and how often the gateway is unavailable.
    query_delay_min: float = 0.0
    query_delay_max: float = 0.0
    query_unavailable_rate: float = 0.0


@dataclass(order=True)
class ScheduledCallback:
    deliver_at: float
    order: int
    body: dict[str, Any] = field(compare=False)
    url: str = field(compare=False, default="")


@dataclass(frozen=True)
class Delivery:
    """A callback due: the body, and the CallBackURL it goes to."""

    url: str
    body: dict[str, Any]


class SimulatedGateway:
    """A seeded stand-in for Daraja: ``stk_push`` now, callbacks due later.

    ``due(now)`` pops the callbacks whose time has come, in delivery order;
    randomised delays make callbacks of different escrows arrive out of order,
    and duplicates arrive at their own random times. ``query`` answers the STK
    Push Query from what the gateway decided: pending until the buyer has
    answered (the first callback's time, also for a callback that is lost),
    the result after; now and then unavailable, after a random delay (``sleep``
    is called with it: ``time.sleep`` in real time, nothing in tests).
    """

    def __init__(
        self,
        clock: Any,
        behaviour: GatewayBehaviour | None = None,
        seed: int | None = None,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.clock = clock
        self.behaviour = behaviour or GatewayBehaviour()
        self.rng = random.Random(seed)
        # Queries draw from their own stream, so asking never changes the callbacks.
        self.query_rng = random.Random(None if seed is None else f"query-{seed}")
        self.sleep = sleep
        self._queue: list[ScheduledCallback] = []
        self._count = 0
        self.requests: dict[str, tuple[str, int]] = {}
        self.results: dict[str, tuple[int, float]] = {}  # checkout -> (code, decided at)
        self.queries = 0

    def stk_push(
        self,
        escrow_id: str,
        amount: int,
        phone: str,
        *,
        reference: str = "",
        callback_url: str = "",
    ) -> str:
        b, rng = self.behaviour, self.rng
        self._count += 1
        checkout = f"ws_CO_{self._count:08d}{rng.getrandbits(32):08x}"
        self.requests[checkout] = (escrow_id, amount)
        now = self.clock.now()
        if rng.random() < b.lost_rate:
            # The buyer still answers; only the callback never comes.
            self.results[checkout] = (RESULT_OK, now + b.delay_max)
            return checkout
        if rng.random() < b.failure_rate:
            code = rng.choice([RESULT_CANCELLED_BY_USER, RESULT_TIMEOUT, RESULT_INSUFFICIENT_FUNDS])
        else:
            code = RESULT_OK
        receipt = f"S{rng.getrandbits(40):010X}"
        body = stk_callback(
            checkout, code, amount=amount, receipt=receipt, phone=phone or "254700000000"
        )
        delay = rng.uniform(b.delay_min, b.delay_max)
        if rng.random() < b.late_rate:
            delay += b.late_delay
        self.results[checkout] = (code, now + delay)
        self._schedule(now + delay, body, callback_url)
        if rng.random() < b.duplicate_rate:
            self._schedule(now + delay + rng.uniform(0.0, b.delay_max), body, callback_url)
        return checkout

    def query(self, checkout_request_id: str) -> QueryResult:
        """Daraja's STK Push Query, answered from what this gateway decided."""
        b = self.behaviour
        self.queries += 1
        if b.query_delay_max > 0 and self.sleep is not None:
            self.sleep(self.query_rng.uniform(b.query_delay_min, b.query_delay_max))
        if self.query_rng.random() < b.query_unavailable_rate:
            raise GatewayUnavailable("simulated M-Pesa: the query service is unavailable")
        decided = self.results.get(checkout_request_id)
        if decided is None:
            raise NotThisGateway(f"simulated M-Pesa: no checkout {checkout_request_id!r}")
        code, at = decided
        if self.clock.now() < at:
            return QueryResult(checkout_request_id, None, "The transaction is being processed")
        return QueryResult(checkout_request_id, code, _DESCRIPTIONS.get(code, "Failed"))

    def _schedule(self, at: float, body: dict[str, Any], url: str = "") -> None:
        self._count += 1
        heapq.heappush(self._queue, ScheduledCallback(at, self._count, body, url))

    def due(self, now: float | None = None) -> list[dict[str, Any]]:
        return [d.body for d in self.due_deliveries(now)]

    def due_deliveries(self, now: float | None = None) -> list[Delivery]:
        """The callbacks due by ``now``, with the CallBackURL each goes to."""
        now = self.clock.now() if now is None else now
        out = []
        while self._queue and self._queue[0].deliver_at <= now:
            scheduled = heapq.heappop(self._queue)
            out.append(Delivery(scheduled.url, scheduled.body))
        return out

    def next_due(self) -> float | None:
        return self._queue[0].deliver_at if self._queue else None

    @property
    def pending(self) -> int:
        return len(self._queue)
