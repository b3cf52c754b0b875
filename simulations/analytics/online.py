"""The online scorer seen from outside: its features, its stream, its lag, as frames."""

from __future__ import annotations

import pandas as pd
import redis

from simulations.analytics.frames import state_frame
from workbench.analytics.features import ANALYTICS_AGGREGATES, FeatureState, Role
from workbench.analytics.scorer import GROUP, stored_facts
from workbench.store import Store
from workbench.streams.keys import RiskNames, StreamNames
from workbench.streams.replies import id_tuple, text


def streaming_features(
    store: Store, role: Role = "seller", *, group: str = GROUP, epoch: float = 0.0
) -> pd.DataFrame:
    """The features the consumer's durable state holds, per party of ``role``
    (times as ``occurred_at - epoch``: pass a run's epoch to compare with
    :func:`~simulations.analytics.frames.batch_features`)."""
    state = FeatureState()
    state.apply_all(stored_facts(store, group, epoch))
    return state_frame(state, role)


RISK_COLUMNS = [
    "entry_id", "entry_ms", "source_event_id", "source_event_type", "seller_id", "score",
    "flagged", "threshold", "model", "model_version", "group", "event_at", "scored_at",
]  # fmt: skip


def read_risk_stream(
    client: redis.Redis, risk_names: RiskNames | None = None, page: int = 1000
) -> pd.DataFrame:
    """The risk stream as a DataFrame (:data:`RISK_COLUMNS`), in stream order."""
    key = (risk_names or RiskNames()).stream
    rows = []
    start = "-"
    while True:
        entries = client.xrange(key, start, "+", count=page)
        for entry_id, fields in entries:
            text = {k.decode(): v.decode() for k, v in fields.items()}
            eid = entry_id.decode()
            rows.append(
                {
                    "entry_id": eid,
                    "entry_ms": int(eid.split("-")[0]),
                    "source_event_id": text["source_event_id"],
                    "source_event_type": text["source_event_type"],
                    "seller_id": text["seller_id"],
                    "score": float(text["score"]),
                    "flagged": text["flagged"] == "1",
                    "threshold": float(text["threshold"]),
                    "model": text["model"],
                    "model_version": text["model_version"],
                    "group": text["group"],
                    "event_at": float(text["event_at"]),
                    "scored_at": float(text["scored_at"]),
                }
            )
        if len(entries) < page:
            break
        start = "(" + entries[-1][0].decode()
    return pd.DataFrame(rows, columns=RISK_COLUMNS)


def online_scores(risk: pd.DataFrame, epoch: float = 0.0) -> pd.DataFrame:
    """The risk stream (:func:`read_risk_stream`) in the shape
    :func:`~simulations.analytics.training.evaluate` and
    :func:`~simulations.analytics.training.detection_delays` take: ``event_id, t,
    party, score`` with ``t = event_at - epoch`` (a run's epoch: run time)."""
    return pd.DataFrame(
        {
            "event_id": risk["source_event_id"],
            "t": risk["event_at"] - epoch,
            "party": risk["seller_id"],
            "score": risk["score"],
        }
    )


def risk_table_scores(risk: pd.DataFrame) -> pd.DataFrame:
    """A run's ``risk`` table (the simulator's record of the analytics group's
    scores, times already in run time) in the shape :func:`online_scores` gives."""
    return pd.DataFrame(
        {
            "event_id": risk["event_id"],
            "t": risk["t_event"],
            "party": risk["seller_id"],
            "score": risk["score"],
        }
    )


def source_entries(
    client: redis.Redis,
    names: StreamNames | None = None,
    aggregate_types: tuple[str, ...] = ANALYTICS_AGGREGATES,
    page: int = 1000,
) -> pd.DataFrame:
    """``event_id, stream, entry_id, entry_ms`` of every retained source entry (the
    first copy of an event the relay published twice)."""
    names = names or StreamNames()
    rows = []
    for stream in names.streams(aggregate_types):
        start = "-"
        while True:
            entries = client.xrange(stream, start, "+", count=page)
            for entry_id, fields in entries:
                eid = entry_id.decode()
                rows.append((fields[b"event_id"].decode(), stream, eid, int(eid.split("-")[0])))
            if len(entries) < page:
                break
            start = "(" + entries[-1][0].decode()
    frame = pd.DataFrame(rows, columns=["event_id", "stream", "entry_id", "entry_ms"])
    return frame.sort_values("entry_ms", kind="stable").drop_duplicates("event_id")


def scorer_lag(
    client: redis.Redis,
    names: StreamNames | None = None,
    risk_names: RiskNames | None = None,
) -> pd.DataFrame:
    """How far the scorer ran behind the stream, per ``risk.scored`` entry.

    * ``lag_s``: ``scored_at - event_at``, on the runtime's clock (virtual
      seconds in a simulation): from the event's commit to its score, relay
      and queueing included;
    * ``stream_lag_ms``: the risk entry's id time minus the source entry's id
      time, both on the clock ids come from (Redis' in production, the
      simulation's in a simulation): from the source entry's append to the risk
      entry's. NaN where the source entry was trimmed.
    """
    names = names or StreamNames()
    risk = read_risk_stream(client, risk_names or RiskNames.of(names))
    source = source_entries(client, names)
    joined = risk.merge(
        source.rename(
            columns={"event_id": "source_event_id", "entry_id": "source_entry_id",
                     "entry_ms": "source_ms"}
        ),
        on="source_event_id",
        how="left",
    )  # fmt: skip
    joined["lag_s"] = joined["scored_at"] - joined["event_at"]
    joined["stream_lag_ms"] = joined["entry_ms"] - joined["source_ms"]
    return joined


def lag_summary(lags: pd.DataFrame) -> dict[str, float]:
    """p50 / p90 / p99 / max of ``lag_s`` and ``stream_lag_ms`` (:func:`scorer_lag`)."""
    out: dict[str, float] = {"entries": float(len(lags))}
    for column in ("lag_s", "stream_lag_ms"):
        values = lags[column].dropna() if column in lags else pd.Series(dtype=float)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)):
            out[f"{column}_{name}"] = float(values.quantile(q)) if len(values) else float("nan")
    return out


def backlog(
    client: redis.Redis,
    names: StreamNames | None = None,
    group: str = GROUP,
    aggregate_types: tuple[str, ...] = ANALYTICS_AGGREGATES,
) -> tuple[int, int]:
    """(pending, undelivered streams) of the analytics group: (0, 0) when it has
    taken and acked everything in its streams. A stream without the group
    counts as undelivered if it has entries."""
    names = names or StreamNames()
    pending = behind = 0
    for stream in names.streams(aggregate_types):
        try:
            last = client.xinfo_stream(stream)["last-generated-id"]
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:  # no such stream
            continue
        mine = [g for g in groups if text(g["name"]) == group]
        if not mine:
            behind += int(client.xlen(stream) > 0)
            continue
        pending += int(mine[0]["pending"])
        if id_tuple(mine[0]["last-delivered-id"]) < id_tuple(last):
            behind += 1
    return pending, behind
