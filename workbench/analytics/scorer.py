"""The online scorer: a consumer group that folds events into features and
publishes a ``risk.scored`` entry per event.

``RiskScorer`` is a :class:`~workbench.streams.consumer.Handler` for the ``analytics``
group over the escrow, payment and dispute streams (payouts repeat what
``escrow.released`` / ``escrow.refunded`` say), run by the ordinary
:class:`~workbench.streams.consumer.ConsumerWorker`. For each batch:

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

**Entry fields** (flat strings, not an :class:`~workbench.domain.events.Event`: risk
is not an escrow aggregate): ``type`` (``risk.scored``), ``source_event_id``,
``source_event_type``, ``seller_id``, ``score``, ``flagged`` (``1`` if score >=
the model's threshold), ``threshold``, ``model``, ``model_version``, ``group``,
``event_at`` (the source event's ``occurred_at``) and ``scored_at`` (the
scorer's clock when it scored). The lab's ``scorer_lag``
(:mod:`simulations.analytics.online`) turns the stream into lags.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import redis
from sqlalchemy import Connection, func, select

from workbench.analytics.features import ANALYTICS_AGGREGATES, Fact, FeatureState
from workbench.analytics.model import RiskModel
from workbench.domain.clock import Clock, SystemClock, now_ms
from workbench.domain.events import Event
from workbench.store import Store, analytics_facts, claim_inbox, insert_many, risk_scores
from workbench.streams.append import XADD_AT_LUA
from workbench.streams.connection import execute, queue_script
from workbench.streams.keys import RiskNames, StreamNames

GROUP = "analytics"
RISK_TYPE = "risk.scored"
DEFAULT_DEDUPE_TTL_S = 7 * 24 * 3600
CACHE_SELLERS = 50_000
_IN_CHUNK = 500  # ids per IN (...) list

# KEYS[1] dedupe marker, KEYS[2] the risk stream.
# ARGV: dedupe ttl, maxlen (0: none), now ms ('': Redis' clock and ids), then field,
# value, field, value... With a clock of our own (simulations) the entry id is the next
# after the stream's last on that clock (workbench.domain.streamid.next_id).
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
        with self.store.read() as conn:
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
            queue_script(
                pipe,
                self.client,
                self._sha,
                [self.risk_names.marker(self.group, row["event_id"]), self.risk_names.stream],
                self.dedupe_ttl_s,
                self.maxlen,
                now_ms(self.clock) if self.ids_on_clock else "",
                *self._fields(row),
            )
        return [int(n) for n in execute(self.client, pipe)]


def _chunks(items: list[str], size: int = _IN_CHUNK) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# -- reading the group's state and output ---------------------------------------------


def stored_facts(store: Store, group: str = GROUP, epoch: float = 0.0) -> list[Fact]:
    """Every fact the group has folded, with ``t = occurred_at - epoch``."""
    f = analytics_facts.c
    with store.read() as conn:
        return [
            Fact(event_id, type_, escrow_id, buyer, seller, int(amount), at - epoch)
            for event_id, type_, escrow_id, buyer, seller, amount, at in conn.execute(
                select(f.event_id, f.type, f.escrow_id, f.buyer_id, f.seller_id, f.amount, f.at)
                .where(f.group_name == group)
                .order_by(f.at, f.event_id)
            )
        ]
