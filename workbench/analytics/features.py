"""Per-seller and per-buyer features from escrow, payment and dispute events.

A *party* is a seller or a buyer; its features describe the escrows it is party
to, as far as the events seen so far tell:

================== ==============================================================
``escrows``        escrows opened (``escrow.created``)
``funded``         ... funded (``escrow.funded``)
``shipped``        ... shipped
``released``       ... released to the seller (confirmed, auto-released or dispute)
``refunded``       ... refunded to the buyer (dispute, cancel after funding, expiry)
``cancelled``      ... cancelled
``expired``        ... expired (unpaid, or funded and never shipped)
``disputes``       disputes opened (``dispute.opened``)
``payment_failures`` failed STK pushes (``payment.failed``)
``open_funded``    funded escrows still waiting to be shipped (not shipped, disputed
                   or closed)
``ship_rate``      shipped / funded (NaN while nothing is funded)
``refund_rate``    refunded / funded (NaN while nothing is funded)
``dispute_rate``   disputes / funded (NaN while nothing is funded)
``cancel_rate``    cancelled / escrows (NaN while no escrow is open)
``mean_fulfilment_s`` mean seconds from funded to shipped (NaN until one ships)
``unshipped_age_s`` how long the oldest open funded escrow has waited, as of the
                   party's latest event (0 if none waits): fulfilment time so
                   far, including the escrows that have not shipped *yet*
``velocity_per_h`` escrows per hour since the party was first seen (the span
                   counts at least a minute)
``mean_amount``    mean escrow amount, KES (NaN while no escrow is open)
``total_amount``   sum of escrow amounts, KES
``first_t``        time of the party's first event
``last_t``         time of its latest event ("now" for the party)
================== ==============================================================

Every feature is a function of the *set* of events seen, never of their order
or of how often each was delivered: an escrow keeps, per event type, a count
and the earliest time; the party's features are computed from its escrows. So
at-least-once delivery (the same event id again) and events of one escrow
arriving out of order across streams (a redelivered ``escrow.funded`` after
``escrow.shipped``) give the same features, which is what makes the streaming
consumer and the lab's batch computation agree.

Two implementations of the same definitions exist on purpose:

* :class:`FeatureState`, here: pure, sans-IO, incremental; it folds one
  :class:`Fact` at a time (what the consumer does) and answers the features of
  one party cheaply (what the scorer needs after each event);
* ``features_from_facts`` / ``batch_features`` in the lab
  (:mod:`simulations.analytics.frames`): vectorised pandas over a run's
  ``published`` table (what an analyst does).

The tests assert they agree (two paths, one answer). Times are seconds on one
timeline: a run's tables use seconds since the run's epoch (``t_committed``),
so the streaming side subtracts the same epoch from ``occurred_at``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, NamedTuple

from workbench.domain.events import Event

if TYPE_CHECKING:
    pass

Role = Literal["seller", "buyer"]
ROLES: tuple[Role, ...] = ("seller", "buyer")

# The streams the analytics group reads. Payouts repeat what escrow.released and
# escrow.refunded already say, so the group does not read them.
ANALYTICS_AGGREGATES: tuple[str, ...] = ("escrow", "payment", "dispute")

COUNTED: dict[str, str] = {
    "escrow.created": "escrows",
    "escrow.funded": "funded",
    "escrow.shipped": "shipped",
    "escrow.released": "released",
    "escrow.refunded": "refunded",
    "escrow.cancelled": "cancelled",
    "escrow.expired": "expired",
    "dispute.opened": "disputes",
    "payment.failed": "payment_failures",
}
COUNT_COLUMNS: tuple[str, ...] = (*COUNTED.values(), "open_funded")
FLOAT_COLUMNS: tuple[str, ...] = (
    "ship_rate",
    "refund_rate",
    "dispute_rate",
    "cancel_rate",
    "mean_fulfilment_s",
    "unshipped_age_s",
    "velocity_per_h",
    "mean_amount",
    "total_amount",
)
TIME_COLUMNS: tuple[str, ...] = ("first_t", "last_t")
# Every column of a feature frame, in order; the index is the party id.
COLUMNS: tuple[str, ...] = (*COUNT_COLUMNS, *FLOAT_COLUMNS, *TIME_COLUMNS)
# What a model may use: everything but the clock readings themselves.
MODEL_FEATURES: tuple[str, ...] = (*COUNT_COLUMNS, *FLOAT_COLUMNS)

MIN_SPAN_S = 60.0  # velocity's span counts at least this long
# An escrow that has left "waiting for the seller to ship".
CLOSING_TYPES = ("escrow.shipped", "escrow.released", "escrow.refunded", "escrow.cancelled",
           "escrow.expired", "dispute.opened")  # fmt: skip


class Fact(NamedTuple):
    """What the features need of one event: a row of the consumer's fact table,
    and of a run's ``published`` table."""

    event_id: str
    type: str
    escrow_id: str
    buyer_id: str
    seller_id: str
    amount: int
    t: float

    @classmethod
    def of(cls, event: Event, epoch: float = 0.0) -> Fact:
        """The fact of an event; ``t`` is ``occurred_at - epoch``."""
        buyer, seller = event.user_ids[0], event.user_ids[1]
        return cls(
            event.event_id,
            event.type,
            event.escrow_id,
            buyer,
            seller,
            int(event.payload.get("amount") or 0),
            event.occurred_at - epoch,
        )

    def party(self, role: Role) -> str:
        return self.seller_id if role == "seller" else self.buyer_id


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(slots=True)
class _EscrowFacts:
    """One escrow as its events tell it: per type, a count and the earliest time."""

    counts: dict[str, int] = field(default_factory=dict)
    first: dict[str, float] = field(default_factory=dict)
    amount: int | None = None

    def add(self, fact: Fact) -> None:
        self.counts[fact.type] = self.counts.get(fact.type, 0) + 1
        t = self.first.get(fact.type)
        if t is None or fact.t < t:
            self.first[fact.type] = fact.t
        if fact.type == "escrow.created":
            self.amount = fact.amount

    def open_funded(self) -> bool:
        return "escrow.funded" in self.counts and not any(k in self.counts for k in CLOSING_TYPES)


@dataclass(slots=True)
class _Party:
    escrows: set[str] = field(default_factory=set)
    first_t: float = math.inf
    last_t: float = -math.inf


class FeatureState:
    """The features of every party, folded from facts one at a time.

    ``apply`` ignores an event id it has seen (at-least-once delivery); facts
    may come in any order. ``vector(role, party)`` costs one pass over that
    party's escrows, so a scorer can ask after every event.
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.escrows: dict[str, _EscrowFacts] = {}
        self.parties: dict[Role, dict[str, _Party]] = {role: {} for role in ROLES}

    def apply(self, fact: Fact) -> bool:
        """Fold one fact in; False (and nothing changes) if its event id was seen."""
        if fact.event_id in self.seen:
            return False
        self.seen.add(fact.event_id)
        self.escrows.setdefault(fact.escrow_id, _EscrowFacts()).add(fact)
        for role in ROLES:
            party = self.parties[role].setdefault(fact.party(role), _Party())
            party.escrows.add(fact.escrow_id)
            party.first_t = min(party.first_t, fact.t)
            party.last_t = max(party.last_t, fact.t)
        return True

    def apply_all(self, facts: Iterable[Fact]) -> int:
        """Fold many facts; return how many were new."""
        return sum(self.apply(f) for f in facts)

    def vector(self, role: Role, party_id: str) -> dict[str, float]:
        """The features of one party (see the module docstring), as a dict."""
        party = self.parties[role][party_id]
        counts = dict.fromkeys(COUNTED.values(), 0)
        open_funded = 0
        fulfil_sum, fulfil_n = 0.0, 0
        oldest_open: float | None = None
        amount_sum, amount_n = 0, 0
        for escrow_id in party.escrows:
            e = self.escrows[escrow_id]
            for event_type, n in e.counts.items():
                name = COUNTED.get(event_type)
                if name is not None:
                    counts[name] += n
            funded = e.first.get("escrow.funded")
            shipped = e.first.get("escrow.shipped")
            if funded is not None and shipped is not None:
                fulfil_sum += shipped - funded
                fulfil_n += 1
            if e.open_funded():
                open_funded += 1
                assert funded is not None
                oldest_open = funded if oldest_open is None else min(oldest_open, funded)
            if e.amount is not None:
                amount_sum += e.amount
                amount_n += 1
        span = max(party.last_t - party.first_t, MIN_SPAN_S)
        vec: dict[str, float] = {name: counts[name] for name in COUNTED.values()}
        vec["open_funded"] = open_funded
        funded_n = counts["funded"]
        vec["ship_rate"] = _ratio(counts["shipped"], funded_n)
        vec["refund_rate"] = _ratio(counts["refunded"], funded_n)
        vec["dispute_rate"] = _ratio(counts["disputes"], funded_n)
        vec["cancel_rate"] = _ratio(counts["cancelled"], counts["escrows"])
        vec["mean_fulfilment_s"] = _ratio(fulfil_sum, fulfil_n)
        vec["unshipped_age_s"] = party.last_t - oldest_open if oldest_open is not None else 0.0
        vec["velocity_per_h"] = counts["escrows"] * 3600.0 / span
        vec["mean_amount"] = _ratio(amount_sum, amount_n)
        vec["total_amount"] = float(amount_sum)
        vec["first_t"] = party.first_t
        vec["last_t"] = party.last_t
        return vec
