"""The detectors and their comparison, on hand-made facts whose answers are known.

Three sellers over a few escrows: ``h`` (honest: ships every funded escrow at
once), ``x`` (exit scammer: ships its first, never its second and third; the
timer expires the second) and ``s`` (slow: its escrow waits long, then ships).
Every flag time, delay and victim count below is worked out by hand from them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from simulations.analytics.comparison import (
    caught_curve,
    compare_detectors,
    detector_summary,
    difference,
    exposure,
    interval,
    summaries_by_seed,
)
from simulations.analytics.detectors import (
    model_flags,
    never_shipped,
    timer_flags,
    unshipped_rule_flags,
)
from simulations.analytics.frames import online_features
from simulations.analytics.training import choose_threshold


def _facts(events: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    """Facts from ``(type, escrow_id, seller_id, t)``; one buyer, amount 100."""
    return pd.DataFrame(
        [
            {
                "event_id": f"e{i}",
                "type": kind,
                "escrow_id": escrow,
                "buyer_id": "b",
                "seller_id": seller,
                "amount": 100,
                "t": t,
            }  # fmt: skip
            for i, (kind, escrow, seller, t) in enumerate(events)
        ]
    )


FACTS = _facts(
    [
        ("escrow.created", "h1", "h", 0.0),
        ("escrow.funded", "h1", "h", 10.0),
        ("escrow.shipped", "h1", "h", 20.0),
        ("escrow.created", "x1", "x", 0.0),
        ("escrow.funded", "x1", "x", 5.0),
        ("escrow.shipped", "x1", "x", 15.0),
        ("escrow.created", "x2", "x", 90.0),
        ("escrow.funded", "x2", "x", 100.0),  # the exit: never shipped
        ("escrow.created", "x3", "x", 150.0),
        ("escrow.funded", "x3", "x", 160.0),
        ("escrow.created", "x4", "x", 300.0),
        ("escrow.funded", "x4", "x", 400.0),
        ("escrow.expired", "x2", "x", 700.0),  # the shipping timer, 600 s after funding
        ("escrow.created", "s1", "s", 0.0),
        ("escrow.funded", "s1", "s", 50.0),
        ("escrow.created", "s2", "s", 350.0),  # s1 has waited 300 s
        ("escrow.shipped", "s1", "s", 400.0),
        ("escrow.created", "u1", "s", 500.0),  # created, never funded, expires: not shipping
        ("escrow.expired", "u1", "s", 1400.0),
    ]
)
CLASSES = pd.Series({"h": "honest", "x": "exit_scam", "s": "slow"}, name="seller_class")


def test_never_shipped_lists_funded_escrows_without_a_shipment_in_funding_order() -> None:
    unshipped = never_shipped(FACTS)
    assert unshipped["escrow_id"].tolist() == ["x2", "x3", "x4"]
    assert unshipped["funded_t"].tolist() == [100.0, 160.0, 400.0]


def test_the_timer_flags_at_the_first_expiry_of_a_funded_unshipped_escrow() -> None:
    # u1 expired too, but it was never funded: the payment timer, not the shipping one.
    assert timer_flags(FACTS).to_dict() == {"x": 700.0}


def test_the_rule_reads_the_unshipped_age_at_the_sellers_events() -> None:
    rows = online_features(FACTS, "seller")
    # s: s1 funded at 50 has waited 300 s at s2's creation (350), then ships at 400.
    assert unshipped_rule_flags(rows, 250.0).to_dict() == {"s": 350.0, "x": 400.0}
    # At 400 x2 has waited exactly 300 s: not longer than 300. At the timer's expiry
    # (700) x2 is closed, and x3 (funded at 160) has waited 540 s.
    assert unshipped_rule_flags(rows, 300.0).to_dict() == {"x": 700.0}
    assert unshipped_rule_flags(rows, 10_000.0).empty


def test_the_model_flags_at_its_first_score_at_the_threshold() -> None:
    scores = pd.DataFrame(
        {"party": ["x", "x", "x", "h"], "t": [1.0, 2.0, 3.0, 1.0], "score": [0.2, 0.9, 0.95, 0.5]}
    )
    assert model_flags(scores, 0.9).to_dict() == {"x": 2.0}
    assert model_flags(scores, 0.99).empty


def test_exposure_is_the_funding_of_a_fraudsters_first_unshipped_escrow() -> None:
    out = exposure(FACTS, CLASSES)
    assert out.loc["x", "exposed_t"] == 100.0
    assert out["fraud"].to_dict() == {"h": False, "x": True, "s": False}
    assert math.isnan(out.loc["s", "exposed_t"]) and math.isnan(out.loc["h", "exposed_t"])


def _flags() -> dict[str, pd.Series]:
    return {
        "early": pd.Series({"x": 150.0}),  # after x2 (100), before x3 (160)
        "late": pd.Series({"x": 700.0, "s": 350.0}),  # x2, x3, x4 paid by then
        "blind": pd.Series(dtype="float64"),
    }


def test_victims_count_the_escrows_funded_from_exposure_to_the_flag() -> None:
    table = compare_detectors(FACTS, CLASSES, _flags()).set_index(["detector", "party"])
    assert table.loc[("early", "x"), "victims"] == 1.0
    assert table.loc[("early", "x"), "delay_s"] == 50.0
    assert table.loc[("late", "x"), "victims"] == 3.0
    assert table.loc[("blind", "x"), "victims"] == 3.0  # never flagged: all of them
    assert not table.loc[("blind", "x"), "flagged"]
    assert math.isnan(table.loc[("late", "s"), "victims"])  # not a fraudster
    # A flag at the very instant x3 is funded comes too late for x3's buyer.
    at_funding = compare_detectors(FACTS, CLASSES, {"at": pd.Series({"x": 160.0})})
    assert at_funding.set_index("party").loc["x", "victims"] == 2.0


def test_the_summary_gives_precision_false_flags_and_timing_per_detector() -> None:
    summary = detector_summary(compare_detectors(FACTS, CLASSES, _flags()))
    assert summary.loc["early", "precision"] == 1.0
    assert summary.loc["late", "precision"] == 0.5  # x and the slow s
    assert math.isnan(summary.loc["blind", "precision"])  # flagged no one
    assert summary.loc["late", "flagged_slow"] == 1.0 and summary.loc["early", "flagged_slow"] == 0
    assert summary.loc["early", "caught_exit_scam"] == 1.0
    assert summary.loc["blind", "caught_exit_scam"] == 0.0
    assert summary.loc["late", "delay_s_exit_scam"] == 600.0
    assert summary.loc["late", "victims_exit_scam"] == 3.0
    assert math.isnan(summary.loc["early", "caught_fraudulent"])  # no such seller


def test_the_curve_counts_a_fraudster_once_its_victims_reach_x() -> None:
    curve = caught_curve(compare_detectors(FACTS, CLASSES, _flags()))
    assert curve.index.tolist() == [0.0, 1.0, 3.0]
    assert curve["early"].tolist() == [0.0, 1.0, 1.0]
    assert curve["late"].tolist() == [0.0, 0.0, 1.0]
    assert curve["blind"].tolist() == [0.0, 0.0, 0.0]  # never flagged never counts
    with pytest.raises(ValueError, match="by must be"):
        caught_curve(compare_detectors(FACTS, CLASSES, _flags()), by="t")


def test_intervals_and_paired_differences_over_seeds() -> None:
    comparisons = {
        seed: compare_detectors(FACTS, CLASSES, {"a": pd.Series({"x": 100.0 + seed}),
                                                 "b": pd.Series({"x": 700.0 + 2 * seed})})
        for seed in (1, 2, 3)
    }  # fmt: skip
    per_seed = summaries_by_seed(comparisons)
    assert sorted(per_seed["seed"].unique()) == [1, 2, 3]
    delay = interval(per_seed, "a", "delay_s_exit_scam")
    assert delay.mean == pytest.approx(2.0) and delay.n == 3
    gap = difference(per_seed, "a", "b", "delay_s_exit_scam")
    assert gap.mean == pytest.approx(-602.0) and gap.below(0.0)
    with pytest.raises(KeyError, match="no detector 'c'"):
        difference(per_seed, "a", "c", "delay_s_exit_scam")
    with pytest.raises(KeyError, match="no 'nope'"):
        interval(per_seed, "a", "nope")


def test_the_threshold_sits_between_the_peaks_that_separate_best() -> None:
    party = pd.Series(["a", "a", "b", "c"])
    truth = pd.Series({"a": True, "b": False, "c": False})
    cut, f1 = choose_threshold(party, np.array([0.1, 0.9, 0.4, 0.2]), truth)
    assert cut == pytest.approx(0.65) and f1 == 1.0
