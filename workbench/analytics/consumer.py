"""The online scorer: a consumer group that folds events into features and
publishes a ``risk.scored`` entry per event.

``RiskScorer`` is a :class:`~workbench.consumer.Handler` for the ``analytics``
group over the escrow, payment and dispute streams (payouts repeat what
``escrow.released`` / ``escrow.refunded`` say), run by the ordinary
:class:`~workbench.consumer.ConsumerWorker`. For each batch:

1. **One SQL transaction** (the group's durable state): claim the event ids in
   ``inbox`` (group ``analytics``); for the new ones, append a row each to
   ``analytics_facts`` and score the event's seller as of that event (its
   features from its facts, :class:`~workbench.analytics.features.FeatureState`,
   then the model), writing the score to ``risk_scores``. Features are a
   function of the *set* of facts, so order and redelivery do not matter, and
   any consumer of the group sees the same state: the store is the truth.
2. **Publish** a ``risk.scored`` entry per event of the batch, new *and*
   redelivered, from its ``risk_scores`` row, to ``{prefix}:risk`` with one Lua
   script per entry that first sets a dedupe marker (``SET NX`` on
   ``{prefix}:scored:{group}:{event id}``, as the fan-out does). A worker killed
   between the commit and the XADD gets the batch again, finds the events in
   its inbox, and publishes the stored scores: the same entry, once.
3. Return; the worker acks.

The scores of one batch come from one ``predict_proba`` call. Each seller's
facts are cached in memory between batches (a read-through cache checked
against the store by a per-seller count, cleared on any failure), so a batch
reads only what other consumers wrote meanwhile.

**Entry fields** (flat strings, not an :class:`~workbench.events.Event`: risk
is not an escrow aggregate): ``type`` (``risk.scored``), ``source_event_id``,
``source_event_type``, ``seller_id``, ``score``, ``flagged`` (``1`` if score >=
the model's threshold), ``threshold``, ``model``, ``model_version``, ``group``,
``event_at`` (the source event's ``occurred_at``) and ``scored_at`` (the
scorer's clock when it scored). :func:`scorer_lag` turns the stream into lags.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import redis
from sqlalchemy import Connection, func, select

from workbench.analytics.features import ANALYTICS_AGGREGATES, Fact, FeatureState, Role
from workbench.analytics.model import RiskModel
from workbench.clock import Clock, SystemClock, now_ms
from workbench.events import Event
from workbench.log import XADD_AT_LUA, StreamNames
from workbench.store import Store, analytics_facts, claim_inbox, insert_many, risk_scores

GROUP = "analytics"
RISK_TYPE = "risk.scored"
DEFAULT_DEDUPE_TTL_S = 7 * 24 * 3600
CACHE_SELLERS = 50_000
_IN_CHUNK = 500  # ids per IN (...) list

# KEYS[1] dedupe marker, KEYS[2] the risk stream.
# ARGV: dedupe ttl, maxlen (0: none), now ms ('': Redis' clock and ids), then field,
# value, field, value... With a clock of our own (simulations) the entry id is the next
# after the stream's last on that clock (workbench.streamid.next_id).
_PUBLISH_LUA = (
    XADD_AT_LUA
    + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
local id = next_id(KEYS[2], ARGV[3])
if tonumber(ARGV[2]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], id, unpack(ARGV, 4))
else
  redis.call('XADD', KEYS[2], id, unpack(ARGV, 4))
end
return 1
"""
)


@dataclass(frozen=True)
class RiskNames:
    """Key names of the risk stream and its dedupe markers under a prefix."""

    prefix: str = "wb"

    @classmethod
    def of(cls, names: StreamNames) -> RiskNames:
        return cls(names.prefix)

    @property
    def stream(self) -> str:
        return f"{self.prefix}:risk"

    def marker(self, group: str, event_id: str) -> str:
        return f"{self.prefix}:scored:{group}:{event_id}"


class RiskScorer:
    """The ``analytics`` group's handler: features, score, ``risk.scored``.

    ``names`` are the source streams' names (the worker reads them); the risk
    stream goes under ``risk_names`` (default: the same prefix). ``maxlen``
    caps the risk stream (approximate ``MAXLEN``; None: no cap, what analysis
    wants). ``clock`` stamps ``scored_at``.
    """

    aggregate_types: tuple[str, ...] = ANALYTICS_AGGREGATES

    def __init__(
        self,
        store: Store,
        client: redis.Redis,
        model: RiskModel,
        *,
        group: str = GROUP,
        names: StreamNames | None = None,
        risk_names: RiskNames | None = None,
        clock: Clock | None = None,
        ids_on_clock: bool = False,
        dedupe_ttl_s: int = DEFAULT_DEDUPE_TTL_S,
        maxlen: int | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.model = model
        self.group = group
        self.names = names or StreamNames()
        self.risk_names = risk_names or RiskNames.of(self.names)
        self.clock = clock or SystemClock()
        self.ids_on_clock = ids_on_clock  # simulations: risk entries' ids on its clock
        self.dedupe_ttl_s = dedupe_ttl_s
        self.maxlen = maxlen or 0
        self._sha = hashlib.sha1(_PUBLISH_LUA.encode()).hexdigest()
        # seller id -> its folded facts: a read-through cache of the store, current
        # while it holds as many facts as the store has for the seller.
        self._cache: OrderedDict[str, FeatureState] = OrderedDict()
        self.scored = 0  # events scored (new to the group)
        self.published = 0  # risk entries appended
        self.duplicates = 0  # entries the dedupe marker dropped

    # -- the handler -------------------------------------------------------------------

    def handle(self, events: list[Event]) -> None:
        events = [e for e in events if e.aggregate_type in self.aggregate_types]
        if not events:
            return
        ids = list(dict.fromkeys(e.event_id for e in events))
        try:
            with self.store.begin() as conn:
                new = claim_inbox(conn, self.group, ids, self.clock.now())
                fresh: list[Event] = []
                for event in events:
                    if event.event_id in new:
                        new.discard(event.event_id)  # a duplicate inside the batch counts once
                        fresh.append(event)
                rows = self._fold_and_score(conn, fresh) if fresh else []
            self.scored += len(rows)
            scored = {row["event_id"] for row in rows}
            again = [i for i in ids if i not in scored]
            if again:  # redelivered: publish what was stored (a crash may have cut it off)
                rows += self._stored_rows(again)
        except BaseException:
            self._cache.clear()  # it may hold facts of a transaction that did not commit
            raise
        self._publish(rows)

    def _fold_and_score(self, conn: Connection, fresh: list[Event]) -> list[dict[str, Any]]:
        sellers = sorted({e.user_ids[1] for e in fresh})
        states = self._states(conn, sellers)
        fresh.sort(key=lambda e: (e.occurred_at, e.sequence, e.event_id))
        facts = [Fact.of(e) for e in fresh]
        vectors = []
        for fact in facts:
            state = states[fact.seller_id]
            state.apply(fact)
            vectors.append(state.vector("seller", fact.seller_id))
        for seller, state in states.items():
            self._remember(seller, state)
        scores = self.model.score_rows(vectors)
        now = self.clock.now()
        insert_many(
            conn,
            analytics_facts,
            [
                {"group_name": self.group, "event_id": f.event_id, "type": f.type,
                 "escrow_id": f.escrow_id, "buyer_id": f.buyer_id, "seller_id": f.seller_id,
                 "amount": f.amount, "at": f.t}
                for f in facts
            ],
        )  # fmt: skip
        rows = [
            {"group_name": self.group, "event_id": f.event_id, "event_type": f.type,
             "seller_id": f.seller_id, "score": float(score), "model": self.model.name,
             "model_version": self.model.version, "event_at": f.t, "scored_at": now}
            for f, score in zip(facts, scores, strict=True)
        ]  # fmt: skip
        insert_many(conn, risk_scores, rows)
        return rows

    def _states(self, conn: Connection, sellers: list[str]) -> dict[str, FeatureState]:
        """Each seller's folded facts as the store has them now (cache if current)."""
        f = analytics_facts.c
        counts: dict[str, int] = {}
        for chunk in _chunks(sellers):
            query = (
                select(f.seller_id, func.count())
                .where(f.group_name == self.group, f.seller_id.in_(chunk))
                .group_by(f.seller_id)
            )
            counts.update((seller, int(n)) for seller, n in conn.execute(query))
        states: dict[str, FeatureState] = {}
        stale = []
        for seller in sellers:
            cached = self._cache.get(seller)
            expected = counts.get(seller, 0)
            if cached is not None and len(cached.seen) == expected:
                states[seller] = cached
            elif expected == 0:
                states[seller] = FeatureState()
            else:
                stale.append(seller)
        for chunk in _chunks(stale):
            loaded: dict[str, FeatureState] = {s: FeatureState() for s in chunk}
            for row in conn.execute(
                select(
                    f.event_id, f.type, f.escrow_id, f.buyer_id, f.seller_id, f.amount, f.at
                ).where(f.group_name == self.group, f.seller_id.in_(chunk))
            ):
                loaded[row[4]].apply(Fact(*row))
            states.update(loaded)
        return states

    def _remember(self, seller: str, state: FeatureState) -> None:
        self._cache[seller] = state
        self._cache.move_to_end(seller)
        while len(self._cache) > CACHE_SELLERS:
            self._cache.popitem(last=False)

    def _stored_rows(self, event_ids: list[str]) -> list[dict[str, Any]]:
        s = risk_scores.c
        rows: list[dict[str, Any]] = []
        with self.store.engine.connect() as conn:
            for chunk in _chunks(event_ids):
                rows += [
                    dict(r._mapping)
                    for r in conn.execute(
                        select(risk_scores).where(s.group_name == self.group, s.event_id.in_(chunk))
                    )
                ]
        order = {event_id: i for i, event_id in enumerate(event_ids)}
        return sorted(rows, key=lambda r: order[r["event_id"]])

    # -- publishing ---------------------------------------------------------------------

    def _fields(self, row: dict[str, Any]) -> list[str]:
        score = float(row["score"])
        return [
            "type", RISK_TYPE,
            "source_event_id", row["event_id"],
            "source_event_type", row["event_type"],
            "seller_id", row["seller_id"],
            "score", repr(score),
            "flagged", "1" if score >= self.model.threshold else "0",
            "threshold", repr(self.model.threshold),
            "model", row["model"],
            "model_version", row["model_version"],
            "group", self.group,
            "event_at", repr(float(row["event_at"])),
            "scored_at", repr(float(row["scored_at"])),
        ]  # fmt: skip

    def _publish(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        try:
            results = self._evalsha(rows)
        except redis.exceptions.NoScriptError:
            # A restarted Redis forgot the script; the markers make a repeat harmless.
            self._sha = self.client.script_load(_PUBLISH_LUA)
            results = self._evalsha(rows)
        appended = sum(results)
        self.published += appended
        self.duplicates += len(results) - appended

    def _evalsha(self, rows: list[dict[str, Any]]) -> list[int]:
        pipe = self.client.pipeline(transaction=False)
        for row in rows:
            pipe.evalsha(
                self._sha,
                2,
                self.risk_names.marker(self.group, row["event_id"]),
                self.risk_names.stream,
                self.dedupe_ttl_s,
                self.maxlen,
                now_ms(self.clock) if self.ids_on_clock else "",
                *self._fields(row),
            )
        return [int(n) for n in pipe.execute()]


def _chunks(items: list[str], size: int = _IN_CHUNK) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- reading the group's state and output ---------------------------------------------


def stored_facts(store: Store, group: str = GROUP, epoch: float = 0.0) -> list[Fact]:
    """Every fact the group has folded, with ``t = occurred_at - epoch``."""
    f = analytics_facts.c
    with store.engine.connect() as conn:
        return [
            Fact(event_id, type_, escrow_id, buyer, seller, int(amount), at - epoch)
            for event_id, type_, escrow_id, buyer, seller, amount, at in conn.execute(
                select(f.event_id, f.type, f.escrow_id, f.buyer_id, f.seller_id, f.amount, f.at)
                .where(f.group_name == group)
                .order_by(f.at, f.event_id)
            )
        ]


def streaming_features(
    store: Store, role: Role = "seller", *, group: str = GROUP, epoch: float = 0.0
) -> pd.DataFrame:
    """The features the consumer's durable state holds, per party of ``role``
    (times as ``occurred_at - epoch``: pass a run's epoch to compare with
    :func:`~workbench.analytics.features.batch_features`)."""
    state = FeatureState()
    state.apply_all(stored_facts(store, group, epoch))
    return state.frame(role)


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
    :func:`~workbench.analytics.model.evaluate` and
    :func:`~workbench.analytics.model.detection_delays` take: ``event_id, t,
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
        mine = [g for g in groups if _text(g["name"]) == group]
        if not mine:
            behind += int(client.xlen(stream) > 0)
            continue
        pending += int(mine[0]["pending"])
        if _id(mine[0]["last-delivered-id"]) < _id(last):
            behind += 1
    return pending, behind


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _id(value: bytes | str) -> tuple[int, int]:
    ms, _, seq = _text(value).partition("-")
    return int(ms), int(seq or 0)
