"""Who gets flagged, and when: the risk model beside two detectors that need no model.

A *detector* maps a run to one flag time per seller: the run time (seconds) of
the first moment it would call the seller a fraudster. A seller it never flags
is absent from its :class:`pandas.Series` (index ``party``, values ``t``).

* :func:`model_flags`: the risk model, the first scored event whose score
  reaches the model's threshold (scores from the run's ``risk`` table, or
  :func:`~simulations.analytics.training.replay_scores`).
* :func:`unshipped_rule_flags`: the rule "a funded escrow has waited longer
  than ``max_unshipped_s`` without being shipped", read from the same feature
  (``unshipped_age_s``) at the same instants (after each of the seller's
  events) the model sees, so a difference between the two is what the model
  adds, not when it looks. :func:`fit_unshipped_rule` picks ``max_unshipped_s``
  on a training run the way the model's threshold is picked (maximum F1 of
  "ever flagged").
* :func:`timer_flags`: the runtime's shipping timer, what the platform does with
  no analytics at all: the first ``escrow.expired`` of one of the seller's
  funded escrows that was never shipped (the timer refunds the buyer then).

All three take *facts* (:func:`~simulations.analytics.frames.facts_from_published`:
``event_id, type, escrow_id, buyer_id, seller_id, amount, t``) or frames
derived from them, so they are pure functions of a run's events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from simulations.analytics.frames import facts_from_published, online_features
from simulations.analytics.training import choose_threshold, labels

if TYPE_CHECKING:
    from simulations.analysis.tables import RunTables

#: The rule's feature: how long the seller's oldest open funded escrow has waited.
RULE_FEATURE = "unshipped_age_s"


def _first_times(party: pd.Series, t: pd.Series) -> pd.Series:
    first = pd.Series(t.to_numpy(dtype="float64"), index=party.to_numpy()).groupby(level=0).min()
    first.index.name = "party"
    return first.rename("t")


def model_flags(scores: pd.DataFrame, threshold: float) -> pd.Series:
    """Per seller, the run time of its first score at or above ``threshold``
    (``scores``: ``party, t, score``, as the risk table or a replay gives)."""
    hits = scores[scores["score"] >= threshold]
    return _first_times(hits["party"], hits["t"])


def unshipped_rule_flags(rows: pd.DataFrame, max_unshipped_s: float) -> pd.Series:
    """Per seller, the run time of its first event after which its oldest open
    funded escrow had waited more than ``max_unshipped_s`` (``rows``:
    :func:`~simulations.analytics.frames.online_features` of sellers)."""
    hits = rows[rows[RULE_FEATURE] > max_unshipped_s]
    return _first_times(hits["party"], hits["t"])


def fit_unshipped_rule(tables: RunTables) -> float:
    """The rule's ``max_unshipped_s`` that maximises F1 of "ever flagged" against
    the fraud labels on a (training) run: halfway between two sellers' peak
    unshipped ages, as the model's threshold is chosen."""
    truth = labels(tables)
    rows = online_features(facts_from_published(tables.published), "seller")
    rows = rows[rows["party"].isin(truth.index)]
    cut, _ = choose_threshold(rows["party"], rows[RULE_FEATURE].to_numpy(), truth)
    # Halfway between two sellers' peaks: "longer than" and "at least" flag the same.
    return float(cut)


def never_shipped(facts: pd.DataFrame) -> pd.DataFrame:
    """The funded escrows with no ``escrow.shipped``: ``escrow_id, seller_id,
    funded_t`` (their first funding), in funding order."""
    funded = facts[facts["type"] == "escrow.funded"].sort_values("t")
    funded = funded.drop_duplicates("escrow_id")
    shipped = set(facts.loc[facts["type"] == "escrow.shipped", "escrow_id"])
    out = funded[~funded["escrow_id"].isin(shipped)]
    return out[["escrow_id", "seller_id", "t"]].rename(columns={"t": "funded_t"})


def timer_flags(facts: pd.DataFrame) -> pd.Series:
    """Per seller, the run time of the first shipping expiry: ``escrow.expired``
    of a funded escrow that was never shipped."""
    unshipped = never_shipped(facts)
    expired = facts[
        (facts["type"] == "escrow.expired") & facts["escrow_id"].isin(unshipped["escrow_id"])
    ]
    return _first_times(expired["seller_id"], expired["t"])


__all__ = [
    "RULE_FEATURE",
    "fit_unshipped_rule",
    "model_flags",
    "never_shipped",
    "timer_flags",
    "unshipped_rule_flags",
]
