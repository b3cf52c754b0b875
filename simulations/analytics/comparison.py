"""Judging detectors against the market's ground truth: precision, false flags, how early.

The detectors (:mod:`simulations.analytics.detectors`) give flag times; this
module scores them per seller and per run, the same way for each.

**Exposure.** A fraudster starts costing buyers money at its *exposure*: the
funding of its first escrow it never ships (an exit scammer's exit, a plain
fraudster's first sale; :func:`~simulations.analytics.detectors.never_shipped`).
Sellers of other classes, and fraudsters that never stopped shipping within the
run, have none.

**Per seller and detector** (:func:`compare_detectors`): ``flagged`` (ever, by
the end of the run), ``flagged_t``, ``delay_s`` (flag time minus exposure;
negative: flagged before it stopped shipping) and ``victims``: the seller's
escrows funded from its exposure until the flag, inclusive (0 when flagged
before; all of them up to the end of the run when never flagged): buyers who
paid a seller that was already not shipping, before anyone said so.

**Per run and detector** (:func:`detector_summary`): ``precision`` and
``recall`` of "ever flagged" against the fraud label; ``flagged_<class>`` the
share of each seller class flagged (for honest and slow sellers: false flags);
for each fraud class ``caught_<class>`` (share of its exposed sellers flagged),
``delay_s_<class>`` (median delay of those flagged) and ``victims_<class>``
(mean victims per exposed seller). Over seeds, :func:`summaries_by_seed` stacks
them, :func:`interval` gives a measure's mean with its confidence interval and
:func:`difference` the paired difference between two detectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from simulations.analysis.intervals import Interval, mean_ci
from simulations.analytics.detectors import (
    model_flags,
    never_shipped,
    timer_flags,
    unshipped_rule_flags,
)
from simulations.analytics.frames import facts_from_published, online_features
from simulations.analytics.training import FRAUD_CLASSES, replay_scores, seller_classes

if TYPE_CHECKING:
    from simulations.analysis.tables import RunTables
    from workbench.analytics.model import RiskModel

MODEL, RULE, TIMER = "risk model", "unshipped rule", "shipping timer"
COMPARISON_COLUMNS = ["party", "seller_class", "fraud", "exposed_t", "detector", "flagged",
                      "flagged_t", "delay_s", "victims"]  # fmt: skip


def exposure(facts: pd.DataFrame, classes: pd.Series) -> pd.DataFrame:
    """Per seller of ``classes`` (``seller_class`` by party): ``seller_class``,
    ``fraud`` and ``exposed_t`` (NaN for non-fraudsters and the never exposed)."""
    unshipped = never_shipped(facts)
    first = unshipped.groupby("seller_id")["funded_t"].min()
    out = pd.DataFrame({"seller_class": classes, "fraud": classes.isin(FRAUD_CLASSES)})
    out["exposed_t"] = first.reindex(out.index).where(out["fraud"])
    out.index.name = "party"
    return out


def compare_detectors(
    facts: pd.DataFrame, classes: pd.Series, flags: Mapping[str, pd.Series]
) -> pd.DataFrame:
    """One row per seller and detector (:data:`COMPARISON_COLUMNS`; see the module
    docstring). ``flags``: detector name -> flag time per seller."""
    sellers = exposure(facts, classes)
    funded = facts[facts["type"] == "escrow.funded"].drop_duplicates("escrow_id")
    funded_t = funded.groupby("seller_id")["t"].apply(np.sort)
    frames = []
    for name, flagged_at in flags.items():
        frame = sellers.reset_index()
        frame["detector"] = name
        frame["flagged_t"] = flagged_at.reindex(frame["party"]).to_numpy(dtype="float64")
        frame["flagged"] = frame["flagged_t"].notna()
        frame["delay_s"] = frame["flagged_t"] - frame["exposed_t"]
        frame["victims"] = [
            _victims(funded_t.get(p), exposed, flag)
            for p, exposed, flag in zip(
                frame["party"], frame["exposed_t"], frame["flagged_t"], strict=True
            )
        ]
        frames.append(frame[COMPARISON_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def _victims(funded_t: np.ndarray | None, exposed_t: float, flagged_t: float) -> float:
    """Escrows funded in [exposed_t, flagged_t] (to the end when never flagged)."""
    if np.isnan(exposed_t) or funded_t is None:
        return np.nan
    until = np.inf if np.isnan(flagged_t) else flagged_t
    return float(np.count_nonzero((funded_t >= exposed_t) & (funded_t <= until)))


def evaluate_detectors(
    model: RiskModel,
    max_unshipped_s: float,
    tables: RunTables,
    scores: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """:func:`compare_detectors` for the risk model (``scores``: the run's online
    scores, by default a replay), the unshipped rule and the shipping timer."""
    facts = facts_from_published(tables.published)
    classes = seller_classes(tables)
    if scores is None:
        scores = replay_scores(model, tables)
    rows = online_features(facts, "seller")
    flags = {
        MODEL: model_flags(scores, model.threshold),
        RULE: unshipped_rule_flags(rows, max_unshipped_s),
        TIMER: timer_flags(facts),
    }
    return compare_detectors(facts, classes, flags)


def detector_summary(comparison: pd.DataFrame) -> pd.DataFrame:
    """One row per detector (in order of appearance): the measures of the
    module docstring."""
    out = {}
    for name, rows in comparison.groupby("detector", sort=False):
        flagged, fraud = rows["flagged"], rows["fraud"]
        row: dict[str, float] = {
            "flagged": float(flagged.sum()),
            "precision": float(fraud[flagged].mean()) if flagged.any() else np.nan,
            "recall": float(flagged[fraud].mean()) if fraud.any() else np.nan,
        }
        for cls, members in rows.groupby("seller_class"):
            row[f"flagged_{cls}"] = float(members["flagged"].mean())
        for cls in FRAUD_CLASSES:
            exposed = rows[(rows["seller_class"] == cls) & rows["exposed_t"].notna()]
            caught = exposed[exposed["flagged"]]
            row[f"caught_{cls}"] = float(exposed["flagged"].mean()) if len(exposed) else np.nan
            row[f"delay_s_{cls}"] = float(caught["delay_s"].median()) if len(caught) else np.nan
            row[f"victims_{cls}"] = float(exposed["victims"].mean()) if len(exposed) else np.nan
        out[name] = row
    frame = pd.DataFrame.from_dict(out, orient="index")
    frame.index.name = "detector"
    return frame


def summaries_by_seed(comparisons: Mapping[int, pd.DataFrame]) -> pd.DataFrame:
    """:func:`detector_summary` of each seed's comparison, stacked: one row per
    seed and detector, columns ``seed, detector`` and the measures."""
    frames = {seed: detector_summary(c) for seed, c in comparisons.items()}
    return pd.concat(frames, names=["seed"]).reset_index()


def interval(per_seed: pd.DataFrame, detector: str, measure: str, level: float = 0.95) -> Interval:
    """The mean of ``measure`` for ``detector`` over the seeds of ``per_seed``
    (:func:`summaries_by_seed`) with its Student-t interval (NaN seeds dropped)."""
    rows = per_seed[per_seed["detector"] == detector]
    if rows.empty or measure not in rows:
        raise KeyError(f"no {measure!r} for detector {detector!r} in the per-seed table")
    return mean_ci(rows[measure], level)


def difference(
    per_seed: pd.DataFrame, detector: str, baseline: str, measure: str, level: float = 0.95
) -> Interval:
    """``measure`` of ``detector`` minus that of ``baseline``, paired by seed, with
    its interval: seeds share their market, so the pairing removes its noise."""
    table = per_seed.pivot(index="seed", columns="detector", values=measure)
    for name in (detector, baseline):
        if name not in table:
            raise KeyError(f"no detector {name!r} in the per-seed table")
    return mean_ci(table[detector] - table[baseline], level)


def caught_curve(
    comparison: pd.DataFrame, by: str = "victims", fraud_class: str | None = None
) -> pd.DataFrame:
    """The share of exposed fraudsters (of ``fraud_class``, default all) each
    detector has flagged once ``by`` (``victims`` or ``delay_s``) reaches x:
    index x (every value seen, and 0), one column per detector. A fraudster
    never flagged never counts, so a curve may end below 1."""
    if by not in ("victims", "delay_s"):
        raise ValueError(f"by must be 'victims' or 'delay_s', not {by!r}")
    rows = comparison[comparison["exposed_t"].notna()]
    if fraud_class is not None:
        rows = rows[rows["seller_class"] == fraud_class]
    value = rows[by].where(rows["flagged"], np.inf)
    grid = np.unique(np.r_[0.0, value[np.isfinite(value)].to_numpy(dtype="float64")])
    curve = {
        name: [float((v <= x).mean()) for x in grid]
        for name, v in value.groupby(rows["detector"], sort=False)
    }
    return pd.DataFrame(curve, index=pd.Index(grid, name=by))


__all__ = [
    "COMPARISON_COLUMNS",
    "MODEL",
    "RULE",
    "TIMER",
    "caught_curve",
    "compare_detectors",
    "detector_summary",
    "difference",
    "evaluate_detectors",
    "exposure",
    "interval",
    "summaries_by_seed",
]
