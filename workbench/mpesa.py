"""M-Pesa STK push: Daraja's callback JSON, and a simulated gateway.

The real flow: we ask Daraja for an STK push, it answers with a
``CheckoutRequestID``, the buyer enters a PIN on the phone, and Daraja POSTs
a callback to us. Callbacks can arrive late, twice, out of order or not at
all; :class:`SimulatedGateway` produces all of these from a seeded RNG, in
exactly Daraja's JSON shape, so the same parsing code serves both.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from workbench.escrow import RecordPaymentResult

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
            result_desc=str(callback.get("ResultDesc", "")),
            receipt=receipt,
            amount=int(amount_value),
        )
    return RecordPaymentResult(
        checkout_request_id=checkout,
        result_code=code,
        result_desc=str(callback.get("ResultDesc", "")),
    )


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


@dataclass(order=True)
class ScheduledCallback:
    deliver_at: float
    order: int
    body: dict[str, Any] = field(compare=False)


class SimulatedGateway:
    """A seeded stand-in for Daraja: ``stk_push`` now, callbacks due later.

    ``due(now)`` pops the callbacks whose time has come, in delivery order;
    randomised delays make callbacks of different escrows arrive out of order,
    and duplicates arrive at their own random times.
    """

    def __init__(
        self,
        clock: Any,
        behaviour: GatewayBehaviour | None = None,
        seed: int | None = None,
    ) -> None:
        self.clock = clock
        self.behaviour = behaviour or GatewayBehaviour()
        self.rng = random.Random(seed)
        self._queue: list[ScheduledCallback] = []
        self._count = 0
        self.requests: dict[str, tuple[str, int]] = {}

    def stk_push(self, escrow_id: str, amount: int, phone: str) -> str:
        b, rng = self.behaviour, self.rng
        self._count += 1
        checkout = f"ws_CO_{self._count:08d}{rng.getrandbits(32):08x}"
        self.requests[checkout] = (escrow_id, amount)
        if rng.random() < b.lost_rate:
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
        self._schedule(self.clock.now() + delay, body)
        if rng.random() < b.duplicate_rate:
            self._schedule(self.clock.now() + delay + rng.uniform(0.0, b.delay_max), body)
        return checkout

    def _schedule(self, at: float, body: dict[str, Any]) -> None:
        self._count += 1
        heapq.heappush(self._queue, ScheduledCallback(at, self._count, body))

    def due(self, now: float | None = None) -> list[dict[str, Any]]:
        now = self.clock.now() if now is None else now
        out = []
        while self._queue and self._queue[0].deliver_at <= now:
            out.append(heapq.heappop(self._queue).body)
        return out

    def next_due(self) -> float | None:
        return self._queue[0].deliver_at if self._queue else None

    @property
    def pending(self) -> int:
        return len(self._queue)
