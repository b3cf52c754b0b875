"""The market: buyers open escrows with sellers and take them through their lives.

Escrows arrive as a Poisson process. Each one is a SimPy process that calls
the real :class:`~workbench.service.EscrowService` at virtual instants:
create, maybe cancel, fund (an STK push; the gateway's callback funds it
later), then the seller ships after a delay that depends on its class and the
buyer confirms or disputes; the admin resolves disputes. A seller's class is
ground truth for analytics: honest, slow (ships ``slow_factor`` times later),
exit_scam (ships its first ``exit_after_escrows`` funded escrows like an honest
seller, then never again) and fraudulent (never ships); the shipping timer
refunds what is never shipped.
Anything the service rejects is recorded, not raised: a late or illegal step
is part of the load, and the escrow timers (run by the runtime) clean up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import simpy

from simulations.scenario import MarketParams
from workbench.domain.escrow import ADMIN, DomainError, EscrowState
from workbench.service import EscrowService

Record = Callable[[str, str | None, str, bool, str | None], None]


class Market:
    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: MarketParams,
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
        self.buyers = [f"buyer-{i}" for i in range(params.buyers)]
        self.sellers = [f"seller-{i}" for i in range(params.sellers)]
        cut = np.cumsum([params.honest_p, params.slow_p, params.exit_scam_p])
        self.seller_class = {
            s: _seller_class(u, cut)
            for s, u in zip(self.sellers, rng.random(len(self.sellers)), strict=True)
        }
        self.promised: dict[str, int] = {}  # exit scammer -> funded escrows it chose to ship
        cut_b = np.cumsum([params.disputer_p, params.abandoner_p])
        self.buyer_class = {
            b: ("disputer" if u < cut_b[0] else "abandoner" if u < cut_b[1] else "regular")
            for b, u in zip(self.buyers, rng.random(len(self.buyers)), strict=True)
        }
        self.escrows: dict[str, tuple[str, str]] = {}  # id -> (seller class, buyer class)
        self.opened = 0

    def run(self) -> Any:
        rate = self.p.arrival_rate
        profile = self.p.profile or [1.0] * 24
        peak = rate * max(profile)
        if peak <= 0:
            return
        while True:
            # A non-homogeneous Poisson process by thinning: candidates at the
            # peak rate, each kept with probability rate(t) / peak.
            yield self.env.timeout(self.rng.exponential(1.0 / peak))
            if self.env.now >= self.until:
                return
            hour = int(self.env.now % self.p.day_s * 24 // self.p.day_s)
            if self.rng.random() * peak <= rate * profile[hour]:
                self.env.process(self.lifecycle())

    def _do(self, command: str, escrow_id: str | None, actor: str, call: Callable[[], Any]) -> Any:
        try:
            result = call()
        except DomainError as exc:
            self.record(command, escrow_id, actor, False, f"{exc.code}: {exc}")
            return None
        self.record(command, escrow_id, actor, True, None)
        return result

    def _state(self, escrow_id: str) -> EscrowState | None:
        """The escrow's state as the app would read it; None if the read failed."""
        try:
            return self.service.get(escrow_id).state
        except DomainError:
            return None

    def _ships_as_exit_scam(self, seller: str, cls: str) -> bool:
        """False once an exit scammer has shipped its quota (decided at funding, so
        escrows funded together are counted in funding order)."""
        if cls != "exit_scam":
            return True
        promised = self.promised.get(seller, 0)
        if promised >= self.p.exit_after_escrows:
            return False
        self.promised[seller] = promised + 1
        return True

    def lifecycle(self) -> Any:
        p, rng = self.p, self.rng
        buyer = self.buyers[int(rng.integers(len(self.buyers)))]
        seller = self.sellers[int(rng.integers(len(self.sellers)))]
        amount = int(rng.integers(p.amount_min, p.amount_max + 1))
        created = self._do(
            "create", None, buyer, lambda: self.service.create(buyer, seller, amount)
        )
        if created is None:
            return
        escrow_id = created.escrow["id"]
        self.opened += 1
        buyer_class = self.buyer_class[buyer]
        self.escrows[escrow_id] = (self.seller_class[seller], buyer_class)
        if not p.lifecycle:
            return
        if rng.random() < p.cancel_p:
            yield self.env.timeout(rng.exponential(p.fund_delay_mean_s))
            self._do("cancel", escrow_id, buyer, lambda: self.service.cancel(escrow_id, buyer))
            return
        if buyer_class == "abandoner":
            return  # never pays: the payment timer expires the escrow
        yield self.env.timeout(rng.exponential(p.fund_delay_mean_s))
        self._do(
            "fund", escrow_id, buyer, lambda: self.service.fund(escrow_id, buyer, "254700000000")
        )
        # Wait for the callback: look again now and then, as the app would.
        for _ in range(20):
            yield self.env.timeout(5.0)
            state = self._state(escrow_id)
            if state is not None and state is not EscrowState.AWAITING_PAYMENT:
                break
        if self._state(escrow_id) is not EscrowState.FUNDED:
            return  # payment failed or never came: the timer expires it
        cls = self.seller_class[seller]
        if cls == "fraudulent" or not self._ships_as_exit_scam(seller, cls):
            return  # never ships: the shipping timer refunds the buyer
        ship_mean = p.ship_delay_mean_s * (p.slow_factor if cls == "slow" else 1.0)
        yield self.env.timeout(rng.exponential(ship_mean))
        if (
            self._do("ship", escrow_id, seller, lambda: self.service.ship(escrow_id, seller))
            is None
        ):
            return
        yield self.env.timeout(rng.exponential(p.confirm_delay_mean_s))
        dispute_p = p.dispute_p * (p.disputer_factor if buyer_class == "disputer" else 1.0)
        if rng.random() < min(1.0, dispute_p):
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
            yield self.env.timeout(rng.exponential(p.confirm_delay_mean_s))
            outcome = "refund" if rng.random() < p.refund_p else "release"
            self._do(
                "resolve", escrow_id, ADMIN, lambda: self.service.resolve(escrow_id, ADMIN, outcome)
            )
            return
        self._do("confirm", escrow_id, buyer, lambda: self.service.confirm(escrow_id, buyer))


def _seller_class(u: float, cut: np.ndarray) -> str:
    """The class of a seller drawn ``u`` ~ U(0, 1): cumulative ``cut`` of honest,
    slow and exit_scam; the rest is fraudulent."""
    for name, bound in zip(("honest", "slow", "exit_scam"), cut, strict=True):
        if u < bound:
            return name
    return "fraudulent"
