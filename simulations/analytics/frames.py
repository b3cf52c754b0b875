"""Features as pandas frames: over a run's tables, replayed per event, and of a state.

Two implementations, one answer: :class:`~workbench.analytics.features.FeatureState`
(incremental, what the online scorer folds) and :func:`batch_features` (pandas
over a run's tables); the tests hold them equal.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from workbench.analytics.features import (
    ANALYTICS_AGGREGATES,
    CLOSING_TYPES,
    COLUMNS,
    COUNT_COLUMNS,
    COUNTED,
    FLOAT_COLUMNS,
    MIN_SPAN_S,
    ROLES,
    TIME_COLUMNS,
    Fact,
    FeatureState,
    Role,
)

if TYPE_CHECKING:
    from simulations.analysis.tables import RunTables


def state_frame(state: FeatureState, role: Role) -> pd.DataFrame:
    """Every party of ``role`` seen so far, one row each (index: party id)."""
    ids = sorted(state.parties[role])
    return _frame({p: state.vector(role, p) for p in ids})


def _frame(rows: Mapping[str, Mapping[str, float]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(dict(rows), orient="index", columns=list(COLUMNS))
    return _typed(frame)


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.reindex(columns=list(COLUMNS))
    for column in COUNT_COLUMNS:
        frame[column] = frame[column].fillna(0).astype("int64")
    for column in (*FLOAT_COLUMNS, *TIME_COLUMNS):
        frame[column] = frame[column].astype("float64")
    frame.index = frame.index.astype(object)
    frame.index.name = "party"
    return frame.sort_index()


# -- the batch path ------------------------------------------------------------------


def facts_from_published(published: pd.DataFrame) -> pd.DataFrame:
    """A run's ``published`` table as facts (the columns of :class:`Fact`):
    the analytics streams only, one row per event id, in publication order."""
    p = published[published["stream"].isin(ANALYTICS_AGGREGATES)]
    p = p.drop_duplicates("event_id")
    users = p["users"].str.split(",", n=1, expand=True)
    return pd.DataFrame(
        {
            "event_id": p["event_id"].to_numpy(),
            "type": p["type"].to_numpy(),
            "escrow_id": p["escrow_id"].to_numpy(),
            "buyer_id": users[0].to_numpy() if len(p) else [],
            "seller_id": users[1].to_numpy() if len(p) else [],
            "amount": p["amount"].astype("int64").to_numpy(),
            "t": p["t_committed"].astype("float64").to_numpy(),
        }
    )


def features_from_facts(facts: pd.DataFrame, role: Role) -> pd.DataFrame:
    """The features of every party of ``role``, computed in bulk (pandas) from a
    frame with :class:`Fact`'s columns. Duplicate event ids count once."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    facts = facts.drop_duplicates("event_id")
    if facts.empty:
        return _typed(pd.DataFrame(columns=list(COLUMNS)))
    key = f"{role}_id"
    # Per escrow and type: how many events, and the earliest time.
    per = facts.groupby(["escrow_id", "type"])["t"].agg(["size", "min"])
    counts = per["size"].unstack(fill_value=0)
    first = per["min"].unstack()
    escrow = pd.DataFrame(index=counts.index)
    for event_type, name in COUNTED.items():
        escrow[name] = counts.get(event_type, 0)
    funded_t = first.get("escrow.funded", pd.Series(np.nan, index=first.index))
    shipped_t = first.get("escrow.shipped", pd.Series(np.nan, index=first.index))
    escrow["fulfilment_s"] = shipped_t - funded_t
    closed = np.zeros(len(escrow), dtype=bool)
    for event_type in CLOSING_TYPES:
        if event_type in counts:
            closed |= counts[event_type].to_numpy() > 0
    escrow["open"] = funded_t.notna().to_numpy() & ~closed
    escrow["open_funded_t"] = funded_t.where(escrow["open"])
    created = facts[facts["type"] == "escrow.created"].drop_duplicates("escrow_id")
    escrow["amount"] = created.set_index("escrow_id")["amount"].reindex(escrow.index)
    owner = facts.drop_duplicates("escrow_id").set_index("escrow_id")[key]
    escrow["party"] = owner.reindex(escrow.index)

    by = escrow.groupby("party")
    out = by[list(COUNTED.values())].sum()
    out["open_funded"] = by["open"].sum()
    times = facts.groupby(key)["t"].agg(["min", "max"])
    out["first_t"], out["last_t"] = times["min"], times["max"]
    out["ship_rate"] = out["shipped"] / out["funded"].replace(0, np.nan)
    out["refund_rate"] = out["refunded"] / out["funded"].replace(0, np.nan)
    out["dispute_rate"] = out["disputes"] / out["funded"].replace(0, np.nan)
    out["cancel_rate"] = out["cancelled"] / out["escrows"].replace(0, np.nan)
    out["mean_fulfilment_s"] = by["fulfilment_s"].mean()
    oldest = by["open_funded_t"].min()
    out["unshipped_age_s"] = (out["last_t"] - oldest).fillna(0.0)
    span = (out["last_t"] - out["first_t"]).clip(lower=MIN_SPAN_S)
    out["velocity_per_h"] = out["escrows"] * 3600.0 / span
    out["mean_amount"] = by["amount"].mean()
    out["total_amount"] = by["amount"].sum(min_count=0).astype("float64")
    return _typed(out)


def batch_features(tables: RunTables, role: Role = "seller") -> pd.DataFrame:
    """The features of every party of ``role`` at the end of a run (``RunTables``)."""
    return features_from_facts(facts_from_published(tables.published), role)


def online_features(facts: pd.DataFrame, role: Role = "seller") -> pd.DataFrame:
    """Replay facts in time order through a :class:`FeatureState` and record the
    party's features after each new event: what an online scorer sees.

    One row per fact (duplicates skipped), with ``event_id``, ``t`` and
    ``party`` beside the feature columns. This is the training set of the risk
    model (:mod:`simulations.analytics.training`) and the input of offline detection
    delays.
    """
    state = FeatureState()
    ordered = facts.sort_values(["t", "event_id"], kind="stable")[list(Fact._fields)]
    rows = []
    for values in ordered.itertuples(index=False, name=None):
        f = Fact(*values)
        if not state.apply(f):
            continue
        party = f.party(role)
        rows.append({"event_id": f.event_id, "t": f.t, "party": party,
                     **state.vector(role, party)})  # fmt: skip
    frame = pd.DataFrame(rows, columns=["event_id", "t", "party", *COLUMNS])
    for column in COUNT_COLUMNS:
        frame[column] = frame[column].astype("int64")
    return frame
