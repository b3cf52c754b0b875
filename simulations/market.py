"""The market: buyers open escrows with sellers and take them through their lives.

Escrows arrive as a Poisson process. Each one is a SimPy process that calls
the real :class:`~workbench.service.EscrowService` at virtual instants:
create, maybe cancel, fund (an STK push; the gateway's callback funds it
later), then the seller ships after a delay that depends on its class and the
buyer confirms or disputes; the admin resolves disputes. A seller's class
(honest, slow, fraudulent: never ships) is ground truth for analytics.
Anything the service rejects is recorded, not raised: a late or illegal step
is part of the load, and the escrow timers (run by the runtime) clean up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import simpy

from workbench.escrow import ADMIN, DomainError, EscrowState
from workbench.service import EscrowService

Record = Callable[[str, str | None, str, bool, str | None], None]


class Market:
    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: dict[str, Any],
        service: EscrowService,
        record: Record,
        *,
        until: float,
    ) -> None:
        self.env = env
        self.rng = rng
        self.p = params
        self.service = service
        self.record = record
        self.until = until
        self.buyers = [f"buyer-{i}" for i in range(params["buyers"])]
        self.sellers = [f"seller-{i}" for i in range(params["sellers"])]
        cut = np.cumsum([params["honest_p"], params["slow_p"]])
        self.seller_class = {
            s: ("honest" if u < cut[0] else "slow" if u < cut[1] else "fraudulent")
            for s, u in zip(self.sellers, rng.random(len(self.sellers)), strict=True)
        }
        self.escrows: dict[str, tuple[str, str]] = {}  # id -> (seller class, buyer class)
        self.opened = 0

    def run(self) -> Any:
        rate = self.p["arrival_rate"]
        if rate <= 0:
            return
        while True:
            yield self.env.timeout(self.rng.exponential(1.0 / rate))
            if self.env.now >= self.until:
                return
            self.env.process(self.lifecycle())

    def _do(self, command: str, escrow_id: str | None, actor: str, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except DomainError as exc:
            self.record(command, escrow_id, actor, False, f"{exc.code}: {exc}")
            return None
        self.record(command, escrow_id, actor, True, None)
        return result

    def lifecycle(self) -> Any:
        p, rng = self.p, self.rng
        buyer = self.buyers[int(rng.integers(len(self.buyers)))]
        seller = self.sellers[int(rng.integers(len(self.sellers)))]
        amount = int(rng.integers(p["amount_min"], p["amount_max"] + 1))
        created = self._do(
            "create", None, buyer, lambda: self.service.create(buyer, seller, amount)
        )
        if created is None:
            return
        escrow_id = created.escrow["id"]
        self.opened += 1
        self.escrows[escrow_id] = (self.seller_class[seller], "regular")
        if not p["lifecycle"]:
            return
        if rng.random() < p["cancel_p"]:
            yield self.env.timeout(rng.exponential(p["fund_delay_mean_s"]))
            self._do("cancel", escrow_id, buyer, lambda: self.service.cancel(escrow_id, buyer))
            return
        yield self.env.timeout(rng.exponential(p["fund_delay_mean_s"]))
        self._do(
            "fund", escrow_id, buyer, lambda: self.service.fund(escrow_id, buyer, "254700000000")
        )
        # Wait for the callback: look again now and then, as the app would.
        for _ in range(20):
            yield self.env.timeout(5.0)
            state = self.service.get(escrow_id).state
            if state is not EscrowState.AWAITING_PAYMENT:
                break
        if self.service.get(escrow_id).state is not EscrowState.FUNDED:
            return  # payment failed or never came: the timer expires it
        cls = self.seller_class[seller]
        if cls == "fraudulent":
            return  # never ships: the shipping timer refunds the buyer
        ship_mean = p["ship_delay_mean_s"] * (p["slow_factor"] if cls == "slow" else 1.0)
        yield self.env.timeout(rng.exponential(ship_mean))
        if (
            self._do("ship", escrow_id, seller, lambda: self.service.ship(escrow_id, seller))
            is None
        ):
            return
        yield self.env.timeout(rng.exponential(p["confirm_delay_mean_s"]))
        if rng.random() < p["dispute_p"]:
            if (
                self._do(
                    "dispute",
                    escrow_id,
                    buyer,
                    lambda: self.service.dispute(escrow_id, buyer, "late"),
                )
                is None
            ):
                return
            yield self.env.timeout(rng.exponential(p["confirm_delay_mean_s"]))
            outcome = "refund" if rng.random() < p["refund_p"] else "release"
            self._do(
                "resolve", escrow_id, ADMIN, lambda: self.service.resolve(escrow_id, ADMIN, outcome)
            )
            return
        self._do("confirm", escrow_id, buyer, lambda: self.service.confirm(escrow_id, buyer))
