"""Check a finished simulation run: was every event delivered once, and is the money right?

The input is a :class:`~simulations.analysis.tables.RunTables`; the output a :class:`CheckReport` of
DataFrames. Everything here is sans-IO and vectorised (pandas, numpy, pyarrow for
parsing stream ids), so a run with a million deliveries checks in seconds.

The vocabulary is Jepsen's total-queue checker (``jepsen.checker/total-queue``): a run
ends with a drain, and each message that should have arrived is **ok**, **lost** or
**duplicated**; a message that arrived but was never sent is **unexpected**; an ok
message that needed a redelivery is **recovered**; and, as in Jepsen's Kafka
workload, a message still waiting in a backlog that never drained is **unseen**,
which is kept apart from lost. A run with unseen messages is **unfinished**: its
drain did not end, so nothing can be said of those messages, and an unfinished run
is never OK (a group that stopped consuming must not pass as "nothing lost").

Consumer groups
    A group consumes the streams :func:`~workbench.handlers.aggregate_types_of` names
    (``fanout``: all four). Its expected events are the published events on those streams. The
    ``handled`` row of (group, event) says how many rows or entries the event left
    behind (``effects``) and how many it should have (``expected_effects``):

    * ok: ``effects == expected_effects``, and the handler ran (or there was nothing
      to do, ``expected_effects == 0``); recovered: ok, with ``max_delivery_count > 1``
      (so ``recovered`` is a subset of ``ok``);
    * duplicated: more effects than expected;
    * otherwise (fewer effects, no ``handled`` row at all, or effects without any
      handler call): lost when the group drained at the end (its ``final`` row has
      ``pending == 0`` and ``lag == 0``), unseen when it had not (or there is no
      ``final`` row, or its lag is unknown);
    * unexpected: a ``handled`` row of the group for an event it should not have seen
      (never published, or published on a stream the group does not read) that shows
      some handling (a handler call or an effect). Rows with neither are placeholders.

    So ``ok + lost + duplicated + unseen == expected`` for every group. Should the
    table hold several rows for one (group, event), their handler calls add up and
    the largest effects and delivery count are taken. ``published`` counts once per
    ``event_id``, and a stream may be named "escrow" or "wb:escrow".

Phones
    A phone is checked against the entries of its user stream (``user_streams``, the
    truth: every entry made, also those trimmed since, when the run recorded them).
    It should receive every entry after ``phones.start_after``, in order.
    Ids compare as ``(ms, seq)`` integers, never as text. Walking its ``deliveries`` in
    row order, a "snapshot" row is a resync: the phone fetched the snapshot as of its
    ``entry_id``, so every expected entry up to that id that it never received is
    covered (ok, not lost). Each expected entry is then ok (delivered once, or not at
    all but covered), duplicated (delivered more than once) or lost. A delivery of an
    entry that is not expected (not in the truth, at or before ``start_after``, or with
    an ``event_id`` other than the truth's) is unexpected. A delivery is reordered when
    its id is lower than the previous delivery's with no snapshot row between them.

Invariants
    Double entry in the ledger, money conservation per escrow (derived from the
    published events and the final escrow states, see :func:`check_invariants`), no
    escrow released twice, none both released and refunded, and (when the ledger group
    drained) the ledger's holds agree with the events.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console

from simulations.analysis.report import frame_table, wide_console
from simulations.analysis.tables import RunTables
from workbench.domain.streamid import MalformedStreamId, parse
from workbench.handlers import aggregate_types_of

GROUP_COLUMNS = [
    "group", "expected", "ok", "lost", "duplicated", "unseen", "unexpected", "recovered",
    "max_delivery_count", "drained",
]  # fmt: skip
CLIENT_COLUMNS = [
    "phone", "expected", "delivered", "ok", "lost", "duplicated", "reordered", "unexpected",
    "connections", "snapshots",
]  # fmt: skip
INVARIANT_COLUMNS = ["name", "ok", "detail"]
DELIVERY_COUNT_COLUMNS = ["group", "max_delivery_count", "events"]
PROBLEM_COLUMNS = ["scope", "who", "verdict", "event_id", "entry_id"]

# Verdicts that fail a run; "recovered" does not, and "unseen" makes it unfinished.
GROUP_FAILURES = ("lost", "duplicated", "unexpected")
CLIENT_FAILURES = ("lost", "duplicated", "reordered", "unexpected")

# Escrow states in which the escrow holds its amount (see workbench.domain.escrow).
HOLDING_STATES = frozenset({"funded", "shipped", "disputed"})
MONEY_IN = "payment.received"
MONEY_OUT = ("escrow.released", "escrow.refunded", "payment.refunded")

_ID_PATTERN = r"^(?P<ms>[0-9]{1,20})-(?P<seq>[0-9]{1,20})$"


@dataclass
class CheckReport:
    """The verdicts of one run, as DataFrames.

    ``groups``: one row per consumer group (:data:`GROUP_COLUMNS`); ``clients``: one
    row per phone (:data:`CLIENT_COLUMNS`); ``invariants``: name, ok, detail;
    ``delivery_counts``: how many expected events of each group reached each
    ``max_delivery_count`` (0: no ``handled`` row); ``problems``: one row per item
    that is not ok (lost, duplicated, unexpected, reordered, and unseen).
    """

    groups: pd.DataFrame
    clients: pd.DataFrame
    invariants: pd.DataFrame
    delivery_counts: pd.DataFrame
    problems: pd.DataFrame

    @property
    def unseen(self) -> int:
        """Events some group never took because its backlog had not drained."""
        return int(self.groups["unseen"].sum())

    @property
    def finished(self) -> bool:
        """Every group drained: each expected event was judged ok, lost or duplicated."""
        return self.unseen == 0

    @property
    def ok(self) -> bool:
        """False when anything is lost, duplicated, unexpected or reordered, an
        invariant fails, or the run is unfinished (events unseen)."""
        groups_ok = not self.groups[list(GROUP_FAILURES)].to_numpy().any()
        clients_ok = not self.clients[list(CLIENT_FAILURES)].to_numpy().any()
        return bool(groups_ok and clients_ok and self.invariants["ok"].all() and self.finished)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: ``ok`` and each table as a list of records."""

        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return json.loads(df.to_json(orient="records"))

        return {
            "ok": self.ok,
            "finished": self.finished,
            "groups": records(self.groups),
            "clients": records(self.clients),
            "invariants": records(self.invariants),
            "delivery_counts": records(self.delivery_counts),
            "problems": records(self.problems),
        }


# -- entry points -----------------------------------------------------------------


def check(run: RunTables) -> CheckReport:
    """Check every group, every phone and the money invariants of ``run``.

    Raises ``ValueError`` for a group that :func:`~workbench.handlers.aggregate_types_of`
    does not know, and :class:`~workbench.domain.streamid.MalformedStreamId` for a bad entry id.
    """
    published = _published(run.published)
    groups, delivery_counts, group_problems = _check_groups(published, run.handled, run.final)
    # Entries Redis lost (``lost_entries``) were rolled back: they are no part of any
    # user's history, and a phone that had one was sent a reset (checked by its
    # snapshot row), so neither the truth nor the deliveries hold them.
    lost = _lost_keys(run.lost_entries)
    user_streams = _drop_lost(run.user_streams, "user", lost)
    deliveries = _drop_lost(run.deliveries, "phone", lost)
    clients, client_problems = check_clients(user_streams, deliveries, run.phones)
    invariants = _check_invariants(
        published, run.escrows, run.ledger, run.final, user_streams, run.handled
    )
    return CheckReport(
        groups=groups,
        clients=clients,
        invariants=invariants,
        delivery_counts=delivery_counts,
        problems=_concat([group_problems, client_problems], PROBLEM_COLUMNS),
    )


def check_dir(path: str | Path) -> CheckReport:
    """``check(RunTables.load(path))``; FileNotFoundError when it is not a run directory."""
    return check(RunTables.load(path))


streams_of = aggregate_types_of  # the aggregate types (streams) a consumer group reads


# -- groups -----------------------------------------------------------------------


def check_groups(
    published: pd.DataFrame, handled: pd.DataFrame, final: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-group verdicts: (groups, delivery_counts, problems). See the module docstring."""
    return _check_groups(_published(published), handled, final)


def _check_groups(
    pub: pd.DataFrame, handled: pd.DataFrame, final: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    # Event ids become integer codes 0..n-1 shared by both tables; slot n collects
    # handled rows without an event id. Per group, arrays indexed by code then say
    # what the handled rows found for each event, and the expected codes pick them.
    (pub_codes, codes), events = _factorize(pub["event_id"], handled["event_id"])
    n = len(events)
    codes = np.where(codes < 0, n, codes)
    (group_codes,), group_names = _factorize(handled["group"])
    calls_all = _number(handled["handler_calls"]).to_numpy()
    deliveries_all = _number(handled["max_delivery_count"]).to_numpy()
    effects_all = _number(handled["effects"]).to_numpy()
    wanted_all = _number(handled["expected_effects"]).to_numpy()
    drained = _drained(final)
    names = sorted(set(group_names) | set(drained.index))
    code_of = {name: code for code, name in enumerate(group_names)}
    stream = pub["stream"].to_numpy()
    event_text = np.append(np.asarray(events, dtype=object), None)

    rows: list[dict[str, Any]] = []
    counts: list[pd.DataFrame] = []
    problems: list[pd.DataFrame] = []
    for name in names:
        expected = pub_codes[np.isin(stream, streams_of(name)) & (pub_codes >= 0)]
        mine = group_codes == code_of.get(name, -2)
        c = codes[mine]
        has_row = np.bincount(c, minlength=n + 1) > 0
        calls = np.bincount(c, weights=calls_all[mine], minlength=n + 1)
        deliveries = _max_by(c, deliveries_all[mine], n + 1)
        effects = _max_by(c, effects_all[mine], n + 1)
        wanted = _max_by(c, wanted_all[mine], n + 1)

        row, eff, want = has_row[expected], effects[expected], wanted[expected]
        duplicated = row & (eff > want)
        ok = row & (eff == want) & ((calls[expected] >= 1) | (want == 0))
        missing = ~(ok | duplicated)
        done = bool(drained.get(name, False))
        lost = missing if done else np.zeros_like(missing)
        unseen = np.zeros_like(missing) if done else missing
        is_expected = np.zeros(n + 1, dtype=bool)
        is_expected[expected] = True
        unexpected = np.flatnonzero(has_row & ~is_expected & ((calls > 0) | (effects > 0)))
        rows.append(
            {
                "group": name,
                "expected": len(expected),
                "ok": int(ok.sum()),
                "lost": int(lost.sum()),
                "duplicated": int(duplicated.sum()),
                "unseen": int(unseen.sum()),
                "unexpected": len(unexpected),
                "recovered": int((ok & (deliveries[expected] > 1)).sum()),
                "max_delivery_count": int(deliveries_all[mine].max(initial=0)),
                "drained": done,
            }
        )
        values, events_per_value = np.unique(deliveries[expected], return_counts=True)
        counts.append(
            pd.DataFrame({"group": name, "max_delivery_count": values, "events": events_per_value})
        )
        for verdict, selected in (
            ("lost", expected[lost]),
            ("duplicated", expected[duplicated]),
            ("unseen", expected[unseen]),
            ("unexpected", unexpected),
        ):
            problems.append(_problems("group", name, verdict, event_text[selected], None))

    groups = pd.DataFrame(rows, columns=GROUP_COLUMNS)
    groups = _ints(groups, GROUP_COLUMNS[1:-1]).astype({"drained": bool})
    delivery_counts = _ints(_concat(counts, DELIVERY_COUNT_COLUMNS), DELIVERY_COUNT_COLUMNS[1:])
    return groups, delivery_counts, _concat(problems, PROBLEM_COLUMNS)


def _drained(final: pd.DataFrame) -> pd.Series:
    """group -> True when its backlog was empty at the end (every row, if several).

    A NULL lag means Redis could not tell, so the group does not count as drained.
    """
    pending = pd.to_numeric(final["pending"], errors="coerce")
    lag = pd.to_numeric(final["lag"], errors="coerce")
    empty = ((pending == 0) & (lag == 0)).to_numpy()
    by_group = pd.Series(empty, index=_text(final["group"]).to_numpy(), dtype=bool)
    return by_group[by_group.index != ""].groupby(level=0).all().astype(bool)


# -- phones -----------------------------------------------------------------------


def check_clients(
    user_streams: pd.DataFrame, deliveries: pd.DataFrame, phones: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-phone verdicts: (clients, problems). See the module docstring.

    The phones are those in ``phones`` and in ``deliveries`` (a phone is the user
    whose stream it reads); a phone missing from ``phones`` is checked from the start
    of its stream. Delivery rows without a phone are ignored.
    """
    deliveries = deliveries[(deliveries["phone"].fillna("") != "").to_numpy()]
    index = _index_phones(user_streams, deliveries, phones)
    truth = _expected_entries(user_streams, index)
    # Deliveries in row order; snapshots cover, the others are deliveries proper.
    snapshot = (deliveries["source"] == "snapshot").to_numpy(dtype=bool, na_value=False)
    received = _Entries.of_rows(
        deliveries, index.delivery_phone, index.delivery_rank, np.flatnonzero(~snapshot)
    )
    verdicts = _judge_entries(truth, received, index, snapshot)
    clients = _client_table(deliveries, index, truth, received, verdicts, snapshot)
    return clients, _client_problems(index, truth, received, verdicts)


@dataclass(frozen=True)
class _PhoneIndex:
    """Phones as codes and entry ids as ranks, shared by the truth and the deliveries.

    A phone is a code ``0..p-1`` (``p == len(names)``); code ``p`` collects truth
    rows without a user. Entry ids are dense stream-order ranks below ``span``, so
    (phone, entry) is one integer key, ``phone * span + rank``, and every step is
    a numpy operation over whole tables.
    """

    names: np.ndarray
    span: int
    delivery_phone: np.ndarray  # per delivery row
    delivery_rank: np.ndarray
    truth_phone: np.ndarray  # per user_streams row
    truth_rank: np.ndarray
    is_phone: np.ndarray  # per code: a phone to check (named in phones or deliveries)
    start: np.ndarray  # per code: the rank of its start_after (-1: its whole stream)


@dataclass(frozen=True)
class _Entries:
    """User-stream entries, one per row: whose (phone code), where (rank), which event."""

    phone: np.ndarray
    rank: np.ndarray
    event: np.ndarray
    entry: np.ndarray  # the entry ids as the table has them

    @classmethod
    def of_rows(
        cls, frame: pd.DataFrame, phone: np.ndarray, rank: np.ndarray, rows: np.ndarray
    ) -> _Entries:
        event = frame["event_id"].to_numpy(dtype=object)
        entry = frame["entry_id"].to_numpy(dtype=object)
        return cls(phone[rows], rank[rows], event[rows], entry[rows])


@dataclass(frozen=True)
class _PhoneVerdicts:
    """Per expected entry: ok, lost, duplicated; per delivery proper: unexpected, reordered."""

    ok: np.ndarray
    lost: np.ndarray
    duplicated: np.ndarray
    unexpected: np.ndarray
    reordered: np.ndarray


def _index_phones(
    user_streams: pd.DataFrame, deliveries: pd.DataFrame, phones: pd.DataFrame
) -> _PhoneIndex:
    (d_phone, t_phone, s_phone), phone_names = _factorize(
        deliveries["phone"], user_streams["user"], phones["phone"]
    )
    d_rank, t_rank, s_rank = rank_ids(
        deliveries["entry_id"], user_streams["entry_id"], phones["start_after"]
    )
    p = len(phone_names)
    span = int(max(d_rank.max(initial=0), t_rank.max(initial=0))) + 1
    t_phone = np.where(t_phone < 0, p, t_phone)  # slot p: truth rows without a user
    is_phone = np.zeros(p + 1, dtype=bool)
    is_phone[d_phone] = True
    is_phone[s_phone[s_phone >= 0]] = True
    start = np.full(p + 1, -1, dtype=np.int64)
    known = s_phone >= 0
    start[s_phone[known][::-1]] = s_rank[known][::-1]  # the first row of a phone wins
    return _PhoneIndex(phone_names, span, d_phone, d_rank, t_phone, t_rank, is_phone, start)


def _expected_entries(user_streams: pd.DataFrame, index: _PhoneIndex) -> _Entries:
    """The truth: the entries after each phone's start_after, one per (phone, id)."""
    t_phone, t_rank = index.truth_phone, index.truth_rank
    keep = np.flatnonzero(index.is_phone[t_phone] & (t_rank > index.start[t_phone]))
    _, first = np.unique(t_phone[keep] * index.span + t_rank[keep], return_index=True)
    return _Entries.of_rows(user_streams, t_phone, t_rank, keep[np.sort(first)])


def _judge_entries(
    truth: _Entries, received: _Entries, index: _PhoneIndex, snapshot: np.ndarray
) -> _PhoneVerdicts:
    """Each expected entry ok, lost or duplicated; each delivery proper unexpected or
    reordered, or neither."""
    where, unexpected = _match_truth(truth, received, index.span)
    copies = np.bincount(where[~unexpected], minlength=len(truth.phone))
    covered = _covered_by_snapshots(truth, index, snapshot)
    ok = (copies == 1) | ((copies == 0) & covered)
    duplicated = copies > 1
    lost = ~(ok | duplicated)
    reordered = _reordered(index.delivery_phone, index.delivery_rank, snapshot)[~snapshot]
    return _PhoneVerdicts(ok, lost, duplicated, unexpected, reordered)


def _match_truth(truth: _Entries, received: _Entries, span: int) -> tuple[np.ndarray, np.ndarray]:
    """Per delivery: the position of its entry in ``truth`` (-1: none), and whether it is
    unexpected (not an expected entry, or not the event the truth has there)."""
    truth_index = pd.Index(truth.phone * span + truth.rank)
    where = truth_index.get_indexer(received.phone * span + received.rank)
    found = where >= 0
    truth_event = np.append(truth.event, None)[where]  # where == -1 picks the None
    blank = pd.isna(received.event) | (received.event == "")
    return where, ~(found & (blank | (received.event == truth_event)))


def _covered_by_snapshots(truth: _Entries, index: _PhoneIndex, snapshot: np.ndarray) -> np.ndarray:
    """Per expected entry: at or before the highest snapshot its phone fetched."""
    mark = np.full(len(index.names) + 1, -1, dtype=np.int64)
    np.maximum.at(mark, index.delivery_phone[snapshot], index.delivery_rank[snapshot])
    return truth.rank <= mark[truth.phone]


def _reordered(phone: np.ndarray, rank: np.ndarray, snapshot: np.ndarray) -> np.ndarray:
    """Per delivery row: lower than the previous delivery of its phone, no snapshot between."""
    order = np.argsort(phone, kind="stable")
    resyncs = np.cumsum(snapshot[order])  # changes exactly where a snapshot row lies
    walk = order[~snapshot[order]]
    walk_resyncs = resyncs[~snapshot[order]]
    reordered_rows = walk[1:][
        (phone[walk[1:]] == phone[walk[:-1]])
        & (walk_resyncs[1:] == walk_resyncs[:-1])
        & (rank[walk[1:]] < rank[walk[:-1]])
    ]
    reordered = np.zeros(len(phone), dtype=bool)
    reordered[reordered_rows] = True
    return reordered


def _connection_phones(deliveries: pd.DataFrame, phone: np.ndarray) -> np.ndarray:
    """The phone of each distinct (phone, connection) pair: a phone per connection made."""
    (connection,), connection_names = _factorize(deliveries["connection"])
    named = connection >= 0
    width = len(connection_names) + 1
    return np.unique(phone[named] * width + connection[named]) // width


def _client_table(
    deliveries: pd.DataFrame,
    index: _PhoneIndex,
    truth: _Entries,
    received: _Entries,
    v: _PhoneVerdicts,
    snapshot: np.ndarray,
) -> pd.DataFrame:
    """One row per phone checked, in phone order (:data:`CLIENT_COLUMNS`)."""
    p = len(index.names)

    def per_phone(codes: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(codes, weights=weights, minlength=p + 1)[:p].astype(np.int64)

    clients = pd.DataFrame(
        {
            "phone": np.asarray(index.names, dtype=object),
            "expected": per_phone(truth.phone),
            "delivered": per_phone(received.phone),
            "ok": per_phone(truth.phone, v.ok),
            "lost": per_phone(truth.phone, v.lost),
            "duplicated": per_phone(truth.phone, v.duplicated),
            "reordered": per_phone(received.phone, v.reordered),
            "unexpected": per_phone(received.phone, v.unexpected),
            "connections": per_phone(_connection_phones(deliveries, index.delivery_phone)),
            "snapshots": per_phone(index.delivery_phone[snapshot]),
        },
        columns=CLIENT_COLUMNS,
    )
    checked = clients[index.is_phone[:p]]
    return checked.sort_values("phone", kind="stable").reset_index(drop=True)


def _client_problems(
    index: _PhoneIndex, truth: _Entries, received: _Entries, v: _PhoneVerdicts
) -> pd.DataFrame:
    """One row per failing entry: lost and duplicated expected entries, then unexpected
    and reordered deliveries."""
    names = np.append(np.asarray(index.names, dtype=object), None)
    problems = [
        _problems("client", names[entries.phone[m]], verdict, entries.event[m], entries.entry[m])
        for entries, verdict, m in (
            (truth, "lost", v.lost),
            (truth, "duplicated", v.duplicated),
            (received, "unexpected", v.unexpected),
            (received, "reordered", v.reordered),
        )
    ]
    return _concat(problems, PROBLEM_COLUMNS)


def rank_ids(*columns: pd.Series) -> list[np.ndarray]:
    """Stream-order ranks of entry ids: equal ids get equal ranks, and ``a < b`` as ids
    exactly when ``rank(a) < rank(b)``, across all ``columns`` together.

    Ids are parsed as ``(ms, seq)`` integer pairs with the grammar of
    :func:`workbench.domain.streamid.parse` ("", NULL and "0" mean ``0-0``); a malformed id
    raises :class:`~workbench.domain.streamid.MalformedStreamId` with ``parse``'s message.
    """
    codes, uniques = _factorize(*columns)
    texts = np.append(np.asarray(uniques, dtype=object), "0-0")  # code -1: NULL or ""
    texts[texts == "0"] = "0-0"
    ms, seq = _parse_ids(texts)
    order = np.lexsort((seq, ms))
    new_value = np.ones(len(order), dtype=bool)
    new_value[1:] = (np.diff(ms[order]) != 0) | (np.diff(seq[order]) != 0)
    dense = np.empty(len(order), dtype=np.int64)
    dense[order] = np.cumsum(new_value) - 1
    return [dense[c] for c in codes]  # code -1 picks the last slot, "0-0"


def _parse_ids(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    array = pa.array(texts, type=pa.string())
    parts = pc.extract_regex(array, _ID_PATTERN)
    try:
        if parts.null_count:
            raise MalformedStreamId("malformed")
        ms = pc.cast(parts.field("ms"), pa.uint64()).to_numpy(zero_copy_only=False)
        seq = pc.cast(parts.field("seq"), pa.uint64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, MalformedStreamId):
        for text in texts:  # rare: let parse say what is wrong with the first bad id
            parse(text)
        raise
    return ms, seq


# -- invariants -------------------------------------------------------------------


def check_invariants(
    published: pd.DataFrame, escrows: pd.DataFrame, ledger: pd.DataFrame, final: pd.DataFrame
) -> pd.DataFrame:
    """The money invariants, one row each (name, ok, detail).

    From :mod:`workbench.domain.escrow`, the events whose payload ``amount`` is money moving
    are ``payment.received`` (into the hold), and ``escrow.released`` (its amount
    includes the fee), ``escrow.refunded`` and ``payment.refunded`` (a late or double
    payment returned) out of it. ``escrow.created``, ``payment.requested`` and
    ``escrow.funded`` repeat the amount without moving money, and ``payout.sent`` /
    ``payout.refunded`` pay out what a release or refund already took from the hold.
    So an escrow holds ``received - released - refunded``, which must be its amount
    while it is funded, shipped or disputed, and 0 in every other state.
    """
    return _check_invariants(_published(published), escrows, ledger, final)


def _check_invariants(
    pub: pd.DataFrame,
    escrows: pd.DataFrame,
    ledger: pd.DataFrame,
    final: pd.DataFrame,
    user_streams: pd.DataFrame | None = None,
    handled: pd.DataFrame | None = None,
) -> pd.DataFrame:
    rows = [
        _ledger_balanced(ledger),
        _money_conserved(pub, escrows),
        _released_twice(pub),
        _released_and_refunded(pub),
        _ledger_matches_events(pub, ledger, final),
    ]
    if user_streams is not None:
        rows.append(_user_streams_in_escrow_order(pub, user_streams, handled))
    return pd.DataFrame(rows, columns=INVARIANT_COLUMNS).astype({"ok": bool})


def _user_streams_in_escrow_order(
    pub: pd.DataFrame, user_streams: pd.DataFrame, handled: pd.DataFrame | None = None
) -> tuple[str, bool, str]:
    """Each user stream holds each escrow's events in ``sequence`` order (phones read
    a stream in order, so this is the order a user sees an escrow change in).

    An entry placed after a later event of its escrow fails the invariant,
    unless the fan-out had that event redelivered (``handled``: delivery count
    above 1): a crashed fan-out's pending entries are claimed only when it is
    known dead, while its successor goes on with newer ones. Those are counted
    in the detail, as Jepsen counts recovered operations.
    """
    name = "user streams in escrow order"
    if user_streams.empty:
        return name, True, "no user-stream entries"
    by_event = pub.set_index("event_id")
    event_ids = _text(user_streams["event_id"])
    [rank] = rank_ids(user_streams["entry_id"])
    frame = pd.DataFrame(
        {
            "user": _text(user_streams["user"]).to_numpy(),
            "rank": rank,
            "event_id": event_ids.to_numpy(),
            "escrow": event_ids.map(by_event["escrow_id"]).to_numpy(),
            "sequence": event_ids.map(by_event["sequence"]).to_numpy(),
        }
    ).dropna(subset=["escrow"])
    frame = frame.sort_values(["user", "rank"], kind="stable")
    went_back = frame.groupby(["user", "escrow"], sort=False)["sequence"].diff() < 0
    late = frame[went_back.to_numpy()]
    redelivered: set[str] = set()
    if handled is not None and not handled.empty:
        fanout = handled[_text(handled["group"]).to_numpy() == "fanout"]
        redelivered = set(_text(fanout["event_id"])[_number(fanout["max_delivery_count"]) > 1])
    recovered = late["event_id"].isin(redelivered).to_numpy()
    bad = late[~recovered]
    detail = f"{len(frame):,} entries in {frame['user'].nunique():,} user streams"
    if len(bad):
        examples = [f"{u} / {e}" for u, e in zip(bad["user"], bad["escrow"], strict=True)]
        detail += (
            f"; {len(bad):,} entries placed after a later event of their escrow,"
            f" e.g. {_examples(examples)}"
        )
    if recovered.any():
        detail += (
            f"; {int(recovered.sum()):,} placed after a later event because the fan-out"
            " had them redelivered (crash recovery)"
        )
    return name, bad.empty, detail


def _ledger_balanced(ledger: pd.DataFrame) -> tuple[str, bool, str]:
    amounts = _number(ledger["amount"])
    total = int(amounts.sum())
    per_event = amounts.groupby(_text(ledger["event_id"]).to_numpy()).sum()
    off = per_event[per_event != 0]
    detail = f"{len(amounts):,} entries of {len(per_event):,} events sum to {total:,}"
    if len(off):
        detail += f"; {len(off):,} events do not balance, e.g. {_examples(off.index)}"
    return "ledger balanced", total == 0 and off.empty, detail


def _holdings(pub: pd.DataFrame) -> pd.Series:
    """escrow_id -> what the published events leave in its hold."""
    money = pub[pub["type"].isin([MONEY_IN, *MONEY_OUT])]
    sign = np.where(money["type"] == MONEY_IN, 1, -1)
    return (money["amount"] * sign).groupby(money["escrow_id"].to_numpy()).sum()


def _money_conserved(pub: pd.DataFrame, escrows: pd.DataFrame) -> tuple[str, bool, str]:
    def total(event_type: str) -> int:
        return int(pub.loc[pub["type"] == event_type, "amount"].sum())

    received = total(MONEY_IN)
    released = total("escrow.released")
    refunded = total("escrow.refunded") + total("payment.refunded")
    held = _holdings(pub)
    ids = _text(escrows["id"]).to_numpy()
    state = pd.Series(_text(escrows["state"]).to_numpy(), index=ids)
    amount = pd.Series(_number(escrows["amount"]).to_numpy(), index=ids)
    keep = ~state.index.duplicated(keep="last")
    state, amount = state[keep], amount[keep]
    ids = held.index.union(state.index)
    holds = held.reindex(ids, fill_value=0)
    should = amount.where(state.isin(list(HOLDING_STATES)), 0).reindex(ids, fill_value=0)
    off = holds[holds != should]
    detail = (
        f"received {received:,} = held {int(holds.sum()):,} + released {released:,}"
        f" + refunded {refunded:,}"
    )
    if len(off):
        first = off.index[0]
        shown = state.get(first, "not in escrows") or "no state"
        detail += (
            f"; {len(off):,} escrows hold the wrong amount, e.g. {first} ({shown}:"
            f" holds {int(off.iloc[0]):,}, should hold {int(should[first]):,})"
        )
    return "money conserved", off.empty, detail


def _type_counts(pub: pd.DataFrame, event_type: str) -> pd.Series:
    rows = pub.loc[pub["type"] == event_type, "escrow_id"]
    return rows.value_counts()


def _released_twice(pub: pd.DataFrame) -> tuple[str, bool, str]:
    releases = _type_counts(pub, "escrow.released")
    twice = releases[releases > 1]
    detail = f"{len(releases):,} escrows released"
    if len(twice):
        detail += f"; {len(twice):,} more than once, e.g. {_examples(twice.index)}"
    return "no escrow released twice", twice.empty, detail


def _released_and_refunded(pub: pd.DataFrame) -> tuple[str, bool, str]:
    released = set(_type_counts(pub, "escrow.released").index)
    refunded = set(_type_counts(pub, "escrow.refunded").index)
    both = sorted(released & refunded)
    detail = f"{len(released):,} released, {len(refunded):,} refunded"
    if both:
        detail += f"; {len(both):,} both, e.g. {_examples(both)}"
    return "no escrow both released and refunded", not both, detail


def _ledger_matches_events(
    pub: pd.DataFrame, ledger: pd.DataFrame, final: pd.DataFrame
) -> tuple[str, bool, str]:
    """Each escrow's ``hold:<id>`` balance equals what its events leave in the hold.

    Only checked when the ledger group drained: an undrained ledger is behind, which
    the groups table reports as unseen.
    """
    name = "ledger matches events"
    drained = _drained(final)
    if not bool(drained.get("ledger", False)):
        return name, True, "not checked: the ledger group did not drain (or is not in final)"
    accounts = _text(ledger["account"])
    holds = accounts.str.startswith("hold:").to_numpy()
    booked = _number(ledger["amount"])[holds].groupby(accounts[holds].str.slice(5).to_numpy()).sum()
    expected = _holdings(pub)
    ids = booked.index.union(expected.index)
    booked = booked.reindex(ids, fill_value=0)
    expected = expected.reindex(ids, fill_value=0)
    off = booked[booked != expected]
    detail = f"{len(ids):,} escrow holds, {int(booked.sum()):,} KES held in the ledger"
    if len(off):
        first = off.index[0]
        detail += (
            f"; {len(off):,} differ from the events, e.g. {first} (ledger"
            f" {int(booked[first]):,}, events {int(expected[first]):,})"
        )
    return name, off.empty, detail


# -- printing -----------------------------------------------------------------------


def print_report(report: CheckReport, console: Console | None = None, *, limit: int = 20) -> None:
    """Print the report as rich tables; long tables show their first ``limit`` rows."""
    console = console or wide_console()
    console.print(frame_table(report.groups, "consumer groups"))
    console.print(frame_table(report.delivery_counts, "delivery counts"))
    clients = report.clients
    failing = clients[clients[list(CLIENT_FAILURES)].to_numpy().any(axis=1)]
    if len(clients) > limit:
        totals = clients.drop(columns="phone").sum()
        console.print(
            f"{len(clients):,} phones: "
            + ", ".join(f"{column} {int(value):,}" for column, value in totals.items())
        )
        if len(failing):
            _print_limited(console, failing, "phones with problems", limit)
    else:
        console.print(frame_table(clients, "phones"))
    console.print(frame_table(report.invariants, "invariants"))
    if len(report.problems):
        _print_limited(console, report.problems, "problems", limit)
    verdict = "[bold green]OK[/]" if report.ok else "[bold red]NOT OK[/]"
    unseen = report.unseen
    note = f" (UNFINISHED: {unseen:,} events unseen, a group had not drained)" if unseen else ""
    console.print(f"{verdict}{note}")


def _print_limited(console: Console, df: pd.DataFrame, title: str, limit: int) -> None:
    console.print(frame_table(df.head(limit), title))
    if len(df) > limit:
        console.print(f"... and {len(df) - limit:,} more {title}")


# -- helpers ------------------------------------------------------------------------


def _lost_keys(lost_entries: pd.DataFrame) -> pd.Index:
    """(user, entry id) of every entry Redis lost, as an index to filter by."""
    return pd.MultiIndex.from_arrays([_text(lost_entries["user"]), _text(lost_entries["entry_id"])])


def _drop_lost(frame: pd.DataFrame, who: str, lost: pd.Index) -> pd.DataFrame:
    """``frame`` without the rows whose (``who``, entry_id) Redis lost; snapshot rows
    stay (their id is a position the phone resynced to, not an entry received)."""
    if lost.empty or frame.empty:
        return frame
    keys = pd.MultiIndex.from_arrays([_text(frame[who]), _text(frame["entry_id"])])
    drop = keys.isin(lost)
    if "source" in frame:
        drop &= (_text(frame["source"]) != "snapshot").to_numpy()
    return frame[~drop].reset_index(drop=True)


def _published(published: pd.DataFrame) -> pd.DataFrame:
    """``published`` with one row per event id, the stream named by its aggregate type
    ("wb:escrow" -> "escrow") and integer amounts."""
    pub = published.iloc[np.flatnonzero(~published["event_id"].duplicated().to_numpy())]
    codes, uniques = pd.factorize(pub["stream"])
    names = np.array([str(u).rsplit(":", 1)[-1] for u in uniques] + [""], dtype=object)
    return pd.DataFrame(
        {
            "event_id": pub["event_id"].to_numpy(),
            "type": pub["type"].to_numpy(),
            "stream": names[codes],
            "escrow_id": pub["escrow_id"].to_numpy(),
            "sequence": _number(pub["sequence"]).to_numpy(),
            "amount": _number(pub["amount"]).to_numpy(),
        }
    )


def _factorize(*columns: pd.Series) -> tuple[list[np.ndarray], np.ndarray]:
    """Integer codes for the values of ``columns`` together (NULL and "" get -1)."""
    values = pd.concat([c.reset_index(drop=True) for c in columns], ignore_index=True)
    codes, uniques = pd.factorize(values)
    uniques = np.asarray(uniques, dtype=object)
    blank = np.flatnonzero(uniques == "")
    if len(blank):
        b = blank[0]
        codes = np.where(codes == b, -1, np.where(codes > b, codes - 1, codes))
        uniques = np.delete(uniques, b)
    bounds = np.cumsum([0, *(len(c) for c in columns)])
    return [codes[a:z] for a, z in zip(bounds[:-1], bounds[1:], strict=True)], uniques


def _max_by(codes: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros(size, dtype=np.int64)
    np.maximum.at(out, codes, values)
    return out


def _problems(
    scope: str, who: Any, verdict: str, event_ids: np.ndarray, entry_ids: np.ndarray | None
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "scope": scope,
            "who": who,
            "verdict": verdict,
            "event_id": event_ids,
            "entry_id": entry_ids,
        },
        index=pd.RangeIndex(len(event_ids)),
        columns=PROBLEM_COLUMNS,
    )


def _text(column: pd.Series) -> pd.Series:
    """A column as strings, NULL as "" (empty tables load as float columns)."""
    if not len(column):
        return pd.Series([], dtype=object)
    return column.fillna("").astype(str).reset_index(drop=True)


def _number(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce").fillna(0).astype("int64").reset_index(drop=True)


def _ints(df: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    for column in columns:
        df[column] = df[column].fillna(0).astype("int64")
    return df


def _concat(frames: list[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})
    return pd.concat(frames, ignore_index=True)[columns]


def _examples(ids: Iterable[Any], n: int = 3) -> str:
    return ", ".join(str(i) for i in list(ids)[:n])


__all__ = [
    "CheckReport",
    "check",
    "check_clients",
    "check_dir",
    "check_groups",
    "check_invariants",
    "print_report",
    "rank_ids",
    "streams_of",
]
