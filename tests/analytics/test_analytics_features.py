"""The feature definitions, pure: by hand, and as properties of the fold.

The streaming fold (:class:`FeatureState`) and the batch computation
(:func:`features_from_facts`) are two implementations of one definition; here
they must agree on any set of facts, in any order, with any duplicates.
"""

from __future__ import annotations

import math
import random

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.analytics.frames import (
    facts_from_published,
    features_from_facts,
    online_features,
    state_frame,
)
from workbench.analytics.features import COLUMNS, MIN_SPAN_S, Fact, FeatureState
from workbench.domain.events import Event


def _facts_frame(facts: list[Fact]) -> pd.DataFrame:
    return pd.DataFrame(facts, columns=list(Fact._fields))


def _assert_same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-9)


def _lifecycle(escrow: str, seller: str, buyer: str, amount: int, t0: float, *steps: str):
    """Facts of one escrow: ``escrow.created`` at t0, then each step 100 s apart."""
    kinds = ("escrow.created", *steps)
    return [
        Fact(f"{escrow}-{i}", kind, escrow, buyer, seller, amount, t0 + 100 * i)
        for i, kind in enumerate(kinds)
    ]


def test_a_seller_by_hand() -> None:
    facts = [
        # funded at +200, shipped at +300: fulfilment 100 s, then released
        *_lifecycle("e1", "s", "b1", 1000, 0, "payment.requested", "escrow.funded",
                    "escrow.shipped", "escrow.released"),
        # funded at 1200 and still waiting at the seller's latest event (1400)
        *_lifecycle("e2", "s", "b2", 3000, 1000, "payment.requested", "escrow.funded"),
        # cancelled before paying
        *_lifecycle("e3", "s", "b1", 500, 1300, "escrow.cancelled"),
    ]  # fmt: skip
    state = FeatureState()
    assert state.apply_all(facts) == len(facts)
    v = state.vector("seller", "s")
    assert (v["escrows"], v["funded"], v["shipped"], v["released"], v["cancelled"]) == (
        3, 2, 1, 1, 1,
    )  # fmt: skip
    assert v["open_funded"] == 1
    assert v["ship_rate"] == 0.5 and v["refund_rate"] == 0.0 and v["dispute_rate"] == 0.0
    assert v["cancel_rate"] == pytest.approx(1 / 3)
    assert v["mean_fulfilment_s"] == 100.0
    assert v["first_t"] == 0.0 and v["last_t"] == 1400.0
    assert v["unshipped_age_s"] == 1400.0 - 1200.0
    assert v["velocity_per_h"] == pytest.approx(3 * 3600 / 1400)
    assert v["mean_amount"] == 1500.0 and v["total_amount"] == 4500.0
    buyer = state.vector("buyer", "b1")
    assert buyer["escrows"] == 2 and buyer["cancelled"] == 1
    _assert_same(state_frame(state, "seller"), features_from_facts(_facts_frame(facts), "seller"))
    _assert_same(state_frame(state, "buyer"), features_from_facts(_facts_frame(facts), "buyer"))


def test_undefined_rates_are_nan_and_a_short_span_counts_a_minute() -> None:
    state = FeatureState()
    state.apply_all(_lifecycle("e1", "s", "b", 100, 10.0))
    v = state.vector("seller", "s")
    for name in ("ship_rate", "refund_rate", "dispute_rate", "mean_fulfilment_s"):
        assert math.isnan(v[name])
    assert v["cancel_rate"] == 0.0 and v["unshipped_age_s"] == 0.0
    assert v["velocity_per_h"] == 3600 / MIN_SPAN_S


def test_a_fraudulent_looking_seller_grows_its_unshipped_age() -> None:
    state = FeatureState()
    ages = []
    for i in range(3):
        state.apply_all(
            _lifecycle(f"e{i}", "s", "b", 100, 1000.0 * i, "payment.requested", "escrow.funded")
        )
        ages.append(state.vector("seller", "s")["unshipped_age_s"])
    assert ages == [0.0, 1000.0, 2000.0]  # the first escrow, funded at 200, waits on
    assert state.vector("seller", "s")["open_funded"] == 3


def test_fact_of_an_event_and_of_a_published_row_agree() -> None:
    event = Event(
        event_id="evt_1", type="escrow.created", aggregate_type="escrow", aggregate_id="esc_1",
        sequence=1, user_ids=("buyer-1", "seller-2"), occurred_at=1_800_000_012.5,
        correlation_id="c", payload={"amount": 700},
    )  # fmt: skip
    fact = Fact.of(event, epoch=1_800_000_000.0)
    assert fact == Fact("evt_1", "escrow.created", "esc_1", "buyer-1", "seller-2", 700, 12.5)
    published = pd.DataFrame(
        [{"event_id": "evt_1", "type": "escrow.created", "stream": "escrow",
          "escrow_id": "esc_1", "sequence": 1, "users": "buyer-1,seller-2", "amount": 700,
          "t_committed": 12.5, "t_published": 12.5},
         {"event_id": "evt_2", "type": "payout.sent", "stream": "payout",
          "escrow_id": "esc_1", "sequence": 9, "users": "buyer-1,seller-2", "amount": 690,
          "t_committed": 20.0, "t_published": 20.0}]
    )  # fmt: skip
    # Payouts are not the analytics group's: the batch path leaves them out too.
    assert list(facts_from_published(published).itertuples(index=False, name=None)) == [tuple(fact)]


# -- properties ----------------------------------------------------------------------

TYPES = (
    "escrow.created", "payment.requested", "payment.received", "payment.failed",
    "escrow.funded", "escrow.shipped", "escrow.confirmed", "escrow.released",
    "escrow.refunded", "escrow.cancelled", "escrow.expired", "dispute.opened",
    "dispute.resolved", "payment.refunded",
)  # fmt: skip


@st.composite
def fact_sets(draw: st.DrawFn) -> list[Fact]:
    """Escrows between a few sellers and buyers, each with some events (any types:
    the definitions must hold for out-of-order and partial histories too)."""
    facts: list[Fact] = []
    n_escrows = draw(st.integers(1, 8))
    for e in range(n_escrows):
        seller = f"s{draw(st.integers(0, 2))}"
        buyer = f"b{draw(st.integers(0, 2))}"
        amount = draw(st.integers(1, 250_000))
        kinds = draw(st.lists(st.sampled_from(TYPES), min_size=1, max_size=7))
        for i, kind in enumerate(kinds):
            t = draw(st.floats(0, 10_000, allow_nan=False, allow_infinity=False))
            facts.append(Fact(f"evt-{e}-{i}", kind, f"esc-{e}", buyer, seller, amount, t))
    return facts


@settings(max_examples=60, deadline=None)
@given(facts=fact_sets(), seed=st.integers(0, 2**32 - 1), dup_p=st.floats(0, 1))
def test_order_and_redelivery_do_not_change_features(
    facts: list[Fact], seed: int, dup_p: float
) -> None:
    """At-least-once, reordered delivery = the set of facts: same features, both paths."""
    rng = random.Random(seed)
    delivered = facts + [f for f in facts if rng.random() < dup_p]
    rng.shuffle(delivered)
    once, many = FeatureState(), FeatureState()
    assert once.apply_all(facts) == len(facts)
    assert many.apply_all(delivered) == len(facts)  # duplicates are not new
    for role in ("seller", "buyer"):
        expected = state_frame(once, role)
        assert list(expected.columns) == list(COLUMNS)
        _assert_same(state_frame(many, role), expected)
        _assert_same(features_from_facts(_facts_frame(delivered), role), expected)


@settings(max_examples=25, deadline=None)
@given(facts=fact_sets())
def test_online_features_end_where_the_batch_ends(facts: list[Fact]) -> None:
    frame = _facts_frame(facts + facts[:3])  # with duplicates
    rows = online_features(frame, "seller")
    assert len(rows) == len(facts)
    last = rows.groupby("party").tail(1).set_index("party")[list(COLUMNS)].sort_index()
    last.index = pd.Index(last.index.astype(object), name="party")
    _assert_same(last, features_from_facts(frame, "seller"))
