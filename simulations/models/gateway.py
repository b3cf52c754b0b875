"""M-Pesa (Daraja) in virtual time.

``stk_push`` answers at once with a CheckoutRequestID, as Daraja does; the
result arrives later as a callback body in Daraja's JSON shape, delivered to
the push's CallBackURL by a SimPy process after a uniform delay. Some pushes
fail (the buyer cancels, times out, lacks funds), some callbacks are sent
twice, and independent delays reorder callbacks of different escrows.

``query`` is Daraja's STK Push Query: "being processed" until the buyer has
answered (the first callback's time), the result after; with probability
``query_unavailable_p`` the gateway does not answer at all. A query takes
``query_latency()`` seconds (the caller waits that long in virtual time).
Queries draw from their own generator, so asking never changes the market.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import simpy

from simulations.scenario import MpesaParams
from workbench.payments.mpesa import (
    _DESCRIPTIONS,
    RESULT_CANCELLED_BY_USER,
    RESULT_INSUFFICIENT_FUNDS,
    RESULT_OK,
    RESULT_TIMEOUT,
    GatewayUnavailable,
    QueryResult,
    stk_callback,
)

_FAILURES = (RESULT_CANCELLED_BY_USER, RESULT_TIMEOUT, RESULT_INSUFFICIENT_FUNDS)


class MpesaGateway:
    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: MpesaParams,
        deliver: Callable[[str, dict[str, Any]], None],
        query_rng: np.random.Generator | None = None,
    ) -> None:
        self.env = env
        self.rng = rng
        self.query_rng = query_rng if query_rng is not None else np.random.default_rng(0)
        self.p = params
        self.deliver = deliver
        self.pushes = 0
        self.callbacks_sent = 0
        self.queries = 0
        self.results: dict[str, tuple[int, float]] = {}  # checkout -> (code, decided at)

    def stk_push(
        self,
        escrow_id: str,
        amount: int,
        phone: str,
        *,
        reference: str = "",
        callback_url: str = "",
    ) -> str:
        """Daraja's STK push: a CheckoutRequestID now, the callback later."""
        self.pushes += 1
        checkout = f"ws_CO_{self.pushes:08d}{int(self.rng.integers(2**32)):08x}"
        self.answer(checkout, amount, callback_url, phone)
        return checkout

    def answer(self, checkout: str, amount: int, callback_url: str = "", phone: str = "") -> None:
        """Schedule the callback(s) of a push whose CheckoutRequestID was made elsewhere
        (in real time, by the gateway the service called)."""
        failed = self.rng.random() < self.p.failure_p
        code = int(self.rng.choice(_FAILURES)) if failed else RESULT_OK
        receipt = f"S{int(self.rng.integers(2**40)):010X}"
        body = stk_callback(
            checkout, code, amount=amount, receipt=receipt, phone=phone or "254700000000"
        )
        copies = 2 if self.rng.random() < self.p.duplicate_p else 1
        delays = [self.rng.uniform(self.p.delay_min_s, self.p.delay_max_s) for _ in range(copies)]
        self.results[checkout] = (code, self.env.now + min(delays))
        for delay in delays:
            self.env.process(self._send(delay, callback_url, body))

    def query(self, checkout: str) -> QueryResult:
        """STK Push Query, as the gateway knows the payment now."""
        self.queries += 1
        if self.query_rng.random() < self.p.query_unavailable_p:
            raise GatewayUnavailable("simulated M-Pesa: the query service is unavailable")
        decided = self.results.get(checkout)
        if decided is None:
            raise GatewayUnavailable(f"simulated M-Pesa: no checkout {checkout!r}")
        code, at = decided
        if self.env.now < at:
            return QueryResult(checkout, None, "The transaction is being processed")
        return QueryResult(checkout, code, _DESCRIPTIONS.get(code, "Failed"))

    def query_latency(self) -> float:
        low, high = self.p.query_delay_min_s, self.p.query_delay_max_s
        return float(self.query_rng.uniform(low, high)) if high > 0 else 0.0

    def _send(self, delay: float, url: str, body: dict[str, Any]) -> Any:
        yield self.env.timeout(delay)
        self.callbacks_sent += 1
        self.deliver(url, body)
