"""M-Pesa (Daraja) in virtual time.

``stk_push`` answers at once with a CheckoutRequestID, as Daraja does; the
result arrives later as a callback body in Daraja's JSON shape, delivered by a
SimPy process after a uniform delay. Some pushes fail (the buyer cancels, times
out, lacks funds), some callbacks are sent twice, and independent delays
reorder callbacks of different escrows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import simpy

from workbench.mpesa import (
    RESULT_CANCELLED_BY_USER,
    RESULT_INSUFFICIENT_FUNDS,
    RESULT_OK,
    RESULT_TIMEOUT,
    stk_callback,
)

_FAILURES = (RESULT_CANCELLED_BY_USER, RESULT_TIMEOUT, RESULT_INSUFFICIENT_FUNDS)


class MpesaGateway:
    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: dict[str, Any],
        deliver: Callable[[dict[str, Any]], None],
    ) -> None:
        self.env = env
        self.rng = rng
        self.p = params
        self.deliver = deliver
        self.pushes = 0
        self.callbacks_sent = 0

    def stk_push(self, escrow_id: str, amount: int, phone: str) -> str:
        """Daraja's STK push: a CheckoutRequestID now, the callback later."""
        self.pushes += 1
        checkout = f"ws_CO_{self.pushes:08d}{int(self.rng.integers(2**32)):08x}"
        self.answer(checkout, amount)
        return checkout

    def answer(self, checkout: str, amount: int) -> None:
        """Schedule the callback(s) of a push whose CheckoutRequestID was made elsewhere
        (in real time, by the service's own gateway)."""
        failed = self.rng.random() < self.p["failure_p"]
        code = int(self.rng.choice(_FAILURES)) if failed else RESULT_OK
        receipt = f"S{int(self.rng.integers(2**40)):010X}"
        body = stk_callback(checkout, code, amount=amount, receipt=receipt)
        copies = 2 if self.rng.random() < self.p["duplicate_p"] else 1
        for _ in range(copies):
            delay = self.rng.uniform(self.p["delay_min_s"], self.p["delay_max_s"])
            self.env.process(self._send(delay, body))

    def _send(self, delay: float, body: dict[str, Any]) -> Any:
        yield self.env.timeout(delay)
        self.callbacks_sent += 1
        self.deliver(body)
