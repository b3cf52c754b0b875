"""The run checker on small hand-built runs: every verdict, every invariant, the CLI.

Runs are built from rows with the helpers below; anything not given is empty, so
each test shows only the tables it is about.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.analysis.checker import (
    GROUP_COLUMNS,
    CheckReport,
    check,
    check_clients,
    check_dir,
    check_groups,
    check_invariants,
    print_report,
    rank_ids,
    streams_of,
)
from simulations.analysis.tables import COLUMNS, RunTables
from workbench.cli import main
from workbench.domain.events import AGGREGATE_TYPES, EVENT_TYPES
from workbench.domain.streamid import MalformedStreamId

# -- builders -------------------------------------------------------------------------


def frame(table: str, rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS[table])


def pub(event_id: str, type_: str = "escrow.created", escrow: str = "esc-1", amount: int = 0):
    return {
        "event_id": event_id, "type": type_, "stream": EVENT_TYPES[type_], "escrow_id": escrow,
        "sequence": 1, "users": "buyer-1,seller-1", "amount": amount,
        "t_committed": 0.0, "t_published": 0.1,
    }  # fmt: skip


def handled(group: str, event_id: str, effects: int = 1, expected: int = 1, calls: int = 1,
            deliveries: int = 1) -> dict[str, Any]:  # fmt: skip
    return {
        "group": group, "event_id": event_id, "handler_calls": calls,
        "max_delivery_count": deliveries, "t_first": 1.0, "t_last": 1.0,
        "effects": effects, "expected_effects": expected,
    }  # fmt: skip


def final(group: str, pending: int = 0, lag: float | None = 0) -> dict[str, Any]:
    return {"group": group, "pending": pending, "lag": lag}


def delivery(phone: str, entry_id: str, event_id: str = "", source: str = "live",
             connection: str = "c1") -> dict[str, Any]:  # fmt: skip
    return {
        "phone": phone, "connection": connection, "source": source, "entry_id": entry_id,
        "event_id": event_id or f"evt-{entry_id}", "t": 0.0,
    }  # fmt: skip


def snapshot(phone: str, as_of: str, connection: str = "c1") -> dict[str, Any]:
    return {
        "phone": phone, "connection": connection, "source": "snapshot", "entry_id": as_of,
        "event_id": None, "t": 0.0,
    }  # fmt: skip


def truth(phone: str, entry_ids: list[str]) -> list[dict[str, Any]]:
    return [{"user": phone, "entry_id": e, "event_id": f"evt-{e}"} for e in entry_ids]


def run(**tables: list[dict[str, Any]]) -> RunTables:
    return RunTables(manifest={"test": True}, **{k: frame(k, v) for k, v in tables.items()})


def group_row(report: CheckReport, group: str) -> dict[str, Any]:
    return report.groups.set_index("group").loc[group].to_dict()


def client_row(report: CheckReport, phone: str) -> dict[str, Any]:
    return report.clients.set_index("phone").loc[phone].to_dict()


def verdicts(report: CheckReport) -> list[tuple[str, str, str, Any, Any]]:
    return [tuple(r) for r in report.problems.itertuples(index=False)]


ZEROS = {"lost": 0, "duplicated": 0, "unseen": 0, "unexpected": 0}


# -- consumer groups ------------------------------------------------------------------


def test_group_all_ok_and_only_its_streams_are_expected() -> None:
    report = check(
        run(
            published=[pub("e1"), pub("e2", "payment.requested"), pub("e3", "payout.sent")],
            handled=[
                handled("ledger", "e1", effects=0, expected=0, calls=0),  # nothing to do
                handled("ledger", "e2", effects=2, expected=2),
            ],
            final=[final("ledger")],
        )
    )
    assert group_row(report, "ledger") == {
        "expected": 2, "ok": 2, **ZEROS, "recovered": 0, "max_delivery_count": 1,
        "drained": True,
    }  # fmt: skip
    assert report.ok
    assert report.problems.empty


def test_lost_when_drained_unseen_when_not() -> None:
    rows = {
        "published": [pub("e1"), pub("e2"), pub("e3")],
        "handled": [
            handled("ledger", "e1"),
            handled("ledger", "e2", effects=0, calls=0),  # never handled
            # e3: no handled row at all
        ],
    }
    drained = check(run(**rows, final=[final("ledger")]))
    assert group_row(drained, "ledger")["lost"] == 2
    assert group_row(drained, "ledger")["unseen"] == 0
    assert not drained.ok
    assert sorted(drained.problems["event_id"]) == ["e2", "e3"]
    assert set(drained.problems["verdict"]) == {"lost"}

    for backlog in ([final("ledger", pending=1)], [final("ledger", lag=4)],
                    [final("ledger", lag=None)], []):  # fmt: skip
        behind = check(run(**rows, final=backlog))
        row = group_row(behind, "ledger")
        assert (row["lost"], row["unseen"], row["ok"], row["drained"]) == (0, 2, 1, False)
        # Nothing is lost, yet the run is not OK: its drain never finished.
        assert not behind.finished and behind.unseen == 2
        assert not behind.ok, "an unfinished run (events unseen) must never pass"
        assert set(behind.problems["verdict"]) == {"unseen"}
    assert drained.finished


def test_fewer_effects_than_expected_is_lost() -> None:
    report = check(
        run(
            published=[pub("e1", "escrow.released")],
            handled=[handled("ledger", "e1", effects=2, expected=3)],
            final=[final("ledger")],
        )
    )
    assert group_row(report, "ledger")["lost"] == 1


def test_duplicated() -> None:
    report = check(
        run(
            published=[pub("e1"), pub("e2")],
            handled=[
                handled("fanout", "e1", effects=4, expected=2, deliveries=2),
                handled("fanout", "e2", effects=2, expected=2),
            ],  # fmt: skip
            final=[final("fanout")],
        )
    )
    row = group_row(report, "fanout")
    assert (row["ok"], row["duplicated"], row["recovered"]) == (1, 1, 0)
    assert not report.ok
    assert verdicts(report) == [("group", "fanout", "duplicated", "e1", None)]


def test_unexpected() -> None:
    report = check(
        run(
            published=[pub("e1"), pub("p1", "payout.sent")],
            handled=[
                handled("ledger", "e1"),
                handled("ledger", "ghost"),  # never published
                handled("ledger", "p1"),  # published, but on a stream ledger does not read
                handled("ledger", "idle", effects=0, calls=0),  # a placeholder: ignored
            ],
            final=[final("ledger")],
        )
    )
    row = group_row(report, "ledger")
    assert (row["expected"], row["ok"], row["unexpected"]) == (1, 1, 2)
    assert not report.ok
    assert sorted(report.problems["event_id"]) == ["ghost", "p1"]
    assert set(report.problems["verdict"]) == {"unexpected"}


def test_recovered_is_ok_after_a_redelivery() -> None:
    report = check(
        run(
            published=[pub("e1"), pub("e2")],
            handled=[handled("push", "e1", calls=2, deliveries=3), handled("push", "e2")],
            final=[final("push")],
        )
    )
    row = group_row(report, "push")
    assert (row["ok"], row["recovered"], row["max_delivery_count"]) == (2, 1, 3)
    assert report.ok


def test_delivery_count_distribution() -> None:
    report = check(
        run(
            published=[pub(f"e{i}") for i in range(6)],
            handled=[
                handled("disputes", "e0"),
                handled("disputes", "e1"),
                handled("disputes", "e2", deliveries=2),
                handled("disputes", "e3", deliveries=5),
                handled("disputes", "e4", calls=0, effects=0, deliveries=0),
            ],  # e5: no row, so delivery count 0
            final=[final("disputes", pending=1)],
        )
    )
    counts = report.delivery_counts
    assert list(counts.columns) == ["group", "max_delivery_count", "events"]
    assert list(counts.itertuples(index=False, name=None)) == [
        ("disputes", 0, 2), ("disputes", 1, 2), ("disputes", 2, 1), ("disputes", 5, 1),
    ]  # fmt: skip
    assert counts["events"].sum() == group_row(report, "disputes")["expected"]


def test_groups_come_from_handled_and_final_and_fanout_reads_every_stream() -> None:
    types = ["escrow.created", "payment.received", "payout.sent", "dispute.opened"]
    report = check(
        run(
            published=[pub(f"e{i}", t) for i, t in enumerate(types)],
            handled=[handled("fanout", f"e{i}") for i in range(4)],
            final=[final("fanout"), final("disputes", pending=2)],
        )
    )
    assert list(report.groups["group"]) == ["disputes", "fanout"]
    assert group_row(report, "fanout")["ok"] == 4
    assert group_row(report, "disputes")["unseen"] == 2  # escrow + dispute streams
    assert streams_of("fanout") == AGGREGATE_TYPES
    assert streams_of("ledger") == ("escrow", "payment")


def test_unknown_group_is_an_error() -> None:
    with pytest.raises(ValueError, match="'mystery'"):
        check(run(published=[pub("e1")], handled=[handled("mystery", "e1")]))


def test_group_counts_add_up() -> None:
    report = check(
        run(
            published=[pub(f"e{i}") for i in range(5)],
            handled=[
                handled("ledger", "e0"),
                handled("ledger", "e1", effects=2),
                handled("ledger", "e2", effects=0),
            ],  # fmt: skip
            final=[final("ledger")],
        )
    )
    row = group_row(report, "ledger")
    assert row["ok"] + row["lost"] + row["duplicated"] + row["unseen"] == row["expected"] == 5


# -- phones ---------------------------------------------------------------------------

IDS = ["1-0", "1-1", "2-0", "3-0", "5-0", "8-0"]


def clients_of(entries: list[str], rows: list[dict[str, Any]], start_after: str = "0-0",
               phone: str = "p1") -> CheckReport:  # fmt: skip
    return check(
        run(
            user_streams=truth(phone, entries),
            deliveries=rows,
            phones=[{"phone": phone, "start_after": start_after}],
        )
    )


def test_phone_exact() -> None:
    report = clients_of(IDS, [delivery("p1", e) for e in IDS])
    assert client_row(report, "p1") == {
        "expected": 6, "delivered": 6, "ok": 6, "lost": 0, "duplicated": 0, "reordered": 0,
        "unexpected": 0, "connections": 1, "snapshots": 0,
    }  # fmt: skip
    assert report.ok


def test_phone_lost() -> None:
    report = clients_of(IDS, [delivery("p1", e) for e in IDS if e != "3-0"])
    assert client_row(report, "p1")["lost"] == 1
    assert verdicts(report) == [("client", "p1", "lost", "evt-3-0", "3-0")]
    assert not report.ok


def test_phone_duplicate_resuming_too_early() -> None:
    # Reconnects after 2-0 but resumes after 1-1: 2-0 again, yet still in order.
    rows = [delivery("p1", e) for e in IDS[:3]]
    rows += [delivery("p1", e, connection="c2") for e in IDS[2:]]
    report = clients_of(IDS, rows)
    row = client_row(report, "p1")
    assert (row["ok"], row["duplicated"], row["reordered"], row["connections"]) == (5, 1, 0, 2)
    assert verdicts(report) == [("client", "p1", "duplicated", "evt-2-0", "2-0")]
    assert not report.ok


def test_phone_reordered() -> None:
    order = ["1-0", "2-0", "1-1", "3-0", "8-0", "5-0"]
    report = clients_of(IDS, [delivery("p1", e) for e in order])
    row = client_row(report, "p1")
    assert (row["ok"], row["reordered"], row["lost"], row["duplicated"]) == (6, 2, 0, 0)
    assert [p[4] for p in verdicts(report)] == ["1-1", "5-0"]
    assert not report.ok


def test_phone_unexpected() -> None:
    rows = [delivery("p1", e) for e in IDS[2:]]
    rows.insert(1, delivery("p1", "2-5"))  # not in the stream
    rows.append(delivery("p1", "9-0", event_id="evt-8-0"))  # not in the stream either
    report = clients_of(IDS, rows, start_after="1-1")
    assert client_row(report, "p1")["unexpected"] == 2
    assert client_row(report, "p1")["expected"] == 4

    before_start = clients_of(IDS, [delivery("p1", e) for e in IDS], start_after="1-1")
    row = client_row(before_start, "p1")
    assert (row["expected"], row["ok"], row["unexpected"]) == (4, 4, 2)

    wrong_event = clients_of(IDS[:2], [delivery("p1", "1-0"), delivery("p1", "1-1", "evt-x")])
    row = client_row(wrong_event, "p1")
    assert (row["ok"], row["unexpected"], row["lost"]) == (1, 1, 1)
    assert not wrong_event.ok


def test_snapshot_covers_what_was_missed() -> None:
    # 2-0 is lost; the phone loses its place, fetches the snapshot as of 3-0 and resumes.
    rows = [delivery("p1", "1-0"), delivery("p1", "1-1"), snapshot("p1", "3-0", "c2")]
    rows += [delivery("p1", e, connection="c2") for e in ("5-0", "8-0")]
    report = clients_of(IDS, rows)
    assert client_row(report, "p1") == {
        "expected": 6, "delivered": 4, "ok": 6, "lost": 0, "duplicated": 0, "reordered": 0,
        "unexpected": 0, "connections": 2, "snapshots": 1,
    }  # fmt: skip
    assert report.ok

    without = clients_of(IDS, [r for r in rows if r["source"] != "snapshot"])
    assert client_row(without, "p1")["lost"] == 2  # 2-0 and 3-0

    short = [*rows[:2], snapshot("p1", "2-0"), *rows[3:]]  # covers 2-0, not 3-0
    assert verdicts(clients_of(IDS, short)) == [("client", "p1", "lost", "evt-3-0", "3-0")]


def test_snapshot_resets_the_order() -> None:
    rows = [delivery("p1", e) for e in ("1-0", "1-1", "2-0", "3-0")]
    rows += [snapshot("p1", "1-0"), delivery("p1", "1-1"), delivery("p1", "5-0")]
    report = clients_of(IDS, rows)
    row = client_row(report, "p1")
    assert (row["reordered"], row["duplicated"], row["lost"]) == (0, 1, 1)  # 1-1 twice, 8-0


def test_ids_compare_as_numbers() -> None:
    entries = ["9-0", "9-10", "10-0", "10-2", "100-0"]
    report = clients_of(entries, [delivery("p1", e) for e in entries[1:]], start_after="9-0")
    row = client_row(report, "p1")
    assert (row["expected"], row["ok"], row["reordered"], row["unexpected"]) == (4, 4, 0, 0)
    assert report.ok

    ranks = rank_ids(pd.Series(["10-0", "9-0", "9-10", "0", None, "18446744073709551615-0"]))[0]
    assert list(ranks) == [3, 1, 2, 0, 0, 4]


def test_malformed_id_says_what_is_wrong() -> None:
    with pytest.raises(MalformedStreamId, match="not a stream id"):
        clients_of(["1-0"], [delivery("p1", "1-x")])


def test_phones_are_kept_apart() -> None:
    rows = [delivery("p1", "1-0"), delivery("p2", "2-0"), delivery("p2", "1-0")]
    report = check(
        run(
            user_streams=truth("p1", ["1-0", "2-0"])
            + truth("p2", ["1-0", "2-0"])
            + truth("user-without-phone", ["1-0"]),
            deliveries=rows,
            phones=[{"phone": "p1", "start_after": "0-0"}],  # p2: from the start
        )
    )
    assert client_row(report, "p1")["lost"] == 1
    assert client_row(report, "p2")["reordered"] == 1
    assert client_row(report, "p2")["ok"] == 2
    assert "user-without-phone" not in set(report.clients["phone"])


# -- invariants -----------------------------------------------------------------------


def money_run(**overrides: list[dict[str, Any]]) -> RunTables:
    """esc-1 released, esc-2 refunded after a dispute, esc-3 funded and held, esc-4 paid
    late and refunded at once, esc-5 created."""
    tables: dict[str, list[dict[str, Any]]] = {
        "published": [
            pub("a1", "payment.received", "esc-1", 1000),
            pub("a2", "escrow.funded", "esc-1", 1000),
            pub("a3", "escrow.released", "esc-1", 1000),
            pub("a4", "payout.sent", "esc-1", 985),
            pub("b1", "payment.received", "esc-2", 500),
            pub("b2", "escrow.refunded", "esc-2", 500),
            pub("b3", "payout.refunded", "esc-2", 500),
            pub("c1", "payment.received", "esc-3", 200),
            pub("d1", "payment.received", "esc-4", 300),
            pub("d2", "payment.refunded", "esc-4", 300),
            pub("e1", "escrow.created", "esc-5", 50),
        ],
        "escrows": [
            {
                "id": i,
                "buyer_id": "b",
                "seller_id": "s",
                "amount": a,
                "state": s,
                "seller_class": "honest",
                "buyer_class": "honest",
            }
            for i, a, s in [
                ("esc-1", 1000, "released"),
                ("esc-2", 500, "refunded"),
                ("esc-3", 200, "funded"),
                ("esc-4", 300, "expired"),
                ("esc-5", 50, "created"),
            ]
        ],  # fmt: skip
        "ledger": [
            {"event_id": e, "escrow_id": x, "account": acc, "amount": amt}
            for e, x, acc, amt in [
                ("a1", "esc-1", "buyer:b", -1000),
                ("a1", "esc-1", "hold:esc-1", 1000),
                ("a3", "esc-1", "hold:esc-1", -1000),
                ("a3", "esc-1", "seller:s", 985),
                ("a3", "esc-1", "fees", 15),
                ("b1", "esc-2", "buyer:b", -500),
                ("b1", "esc-2", "hold:esc-2", 500),
                ("b2", "esc-2", "hold:esc-2", -500),
                ("b2", "esc-2", "buyer:b", 500),
                ("c1", "esc-3", "buyer:b", -200),
                ("c1", "esc-3", "hold:esc-3", 200),
                ("d1", "esc-4", "buyer:b", -300),
                ("d1", "esc-4", "hold:esc-4", 300),
                ("d2", "esc-4", "hold:esc-4", -300),
                ("d2", "esc-4", "buyer:b", 300),
            ]
        ],  # fmt: skip
        "final": [final("ledger")],
    }
    tables.update(overrides)
    if "handled" not in tables:  # the ledger group handled every event exactly once
        postings = pd.Series([r["event_id"] for r in tables["ledger"]]).value_counts()
        tables["handled"] = [
            handled("ledger", e["event_id"], *[int(postings.get(e["event_id"], 0))] * 2)
            for e in tables["published"]
            if e["stream"] in ("escrow", "payment")
        ]
    return run(**tables)


def invariant(report: CheckReport, name: str) -> tuple[bool, str]:
    row = report.invariants.set_index("name").loc[name]
    return bool(row["ok"]), str(row["detail"])


def test_invariants_hold() -> None:
    report = check(money_run())
    assert list(report.invariants.columns) == ["name", "ok", "detail"]
    assert report.invariants["ok"].all(), report.invariants.to_dict("records")
    assert invariant(report, "money conserved")[1] == (
        "received 2,000 = held 200 + released 1,000 + refunded 800"
    )
    assert report.ok


def test_ledger_unbalanced() -> None:
    ledger = money_run().ledger.to_dict("records")
    total_off = check(money_run(ledger=[*ledger, {"event_id": "x", "escrow_id": "esc-1",
                                                  "account": "fees", "amount": 5}]))  # fmt: skip
    ok, detail = invariant(total_off, "ledger balanced")
    assert not ok and "sum to 5" in detail and "e.g. x" in detail
    # Two events off by opposite amounts: the total is 0, each event is not.
    skewed = [dict(r) for r in ledger]
    skewed[0]["amount"] -= 7  # a1
    skewed[2]["amount"] += 7  # a3
    ok, detail = invariant(check(money_run(ledger=skewed)), "ledger balanced")
    assert not ok and "sum to 0" in detail and "2 events do not balance" in detail


def test_money_not_conserved() -> None:
    base = money_run()
    released_without_event = base.published[base.published["event_id"] != "a3"]
    report = check(money_run(published=released_without_event.to_dict("records")))
    ok, detail = invariant(report, "money conserved")
    assert not ok
    assert "esc-1 (released: holds 1,000, should hold 0)" in detail
    assert not report.ok

    escrows = base.escrows.to_dict("records")
    escrows[4]["state"] = "funded"  # created, never paid, yet "funded"
    ok, detail = invariant(check(money_run(escrows=escrows)), "money conserved")
    assert not ok and "esc-5 (funded: holds 0, should hold 50)" in detail


def test_released_twice_and_released_and_refunded() -> None:
    published = money_run().published.to_dict("records")
    twice = [*published, pub("a5", "escrow.released", "esc-1", 1000)]
    report = check(money_run(published=twice))
    assert not invariant(report, "no escrow released twice")[0]
    assert invariant(report, "no escrow both released and refunded")[0]
    assert not report.ok

    both = [*published, pub("a5", "escrow.refunded", "esc-1", 1000)]
    report = check(money_run(published=both))
    ok, detail = invariant(report, "no escrow both released and refunded")
    assert not ok and "e.g. esc-1" in detail
    assert invariant(report, "no escrow released twice")[0]


def test_user_streams_in_escrow_order() -> None:
    def with_sequence(event_id: str, escrow: str, sequence: int) -> dict[str, Any]:
        return {**pub(event_id, "escrow.shipped", escrow), "sequence": sequence}

    name = "user streams in escrow order"
    published = [
        with_sequence("e1", "esc-1", 1),
        with_sequence("e2", "esc-1", 2),
        with_sequence("f1", "esc-2", 1),
    ]

    def report_for(order: list[str]) -> tuple[bool, str]:
        entries = [
            {"user": "u", "entry_id": f"{n}-0", "event_id": e} for n, e in enumerate(order, 1)
        ]
        return invariant(check(run(published=published, user_streams=entries)), name)

    # Escrows may interleave; one escrow's events may not go back.
    assert report_for(["e1", "f1", "e2"]) == (True, "3 entries in 1 user streams")
    ok, detail = report_for(["e2", "f1", "e1"])
    assert not ok
    assert "1 entries placed after a later event of their escrow, e.g. u / esc-1" in detail
    # Unless the fan-out had that event redelivered: a crash's pending entry claimed
    # late, while the next consumer went on. Counted, not failed.
    redelivered = [handled("fanout", "e1", deliveries=2), handled("fanout", "e2")]
    entries = [
        {"user": "u", "entry_id": f"{n}-0", "event_id": e}
        for n, e in enumerate(["e2", "f1", "e1"], 1)
    ]
    report = check(run(published=published, user_streams=entries, handled=redelivered))
    ok, detail = invariant(report, name)
    assert ok and "1 placed after a later event because the fan-out had them redelivered" in detail
    assert not check(run(published=published, user_streams=[
        {"user": "u", "entry_id": "2-0", "event_id": "e1"},
        {"user": "u", "entry_id": "1-0", "event_id": "e2"},  # stream order is id order
    ])).ok  # fmt: skip


def test_ledger_matches_events_only_when_drained() -> None:
    ledger = [r for r in money_run().ledger.to_dict("records") if r["event_id"] != "c1"]
    ok, detail = invariant(check(money_run(ledger=ledger)), "ledger matches events")
    assert not ok and "esc-3 (ledger 0, events 200)" in detail
    behind = check(money_run(ledger=ledger, final=[final("ledger", pending=1)]))
    ok, detail = invariant(behind, "ledger matches events")
    assert ok and detail.startswith("not checked")


# -- the verdict --------------------------------------------------------------------


FAILURES: dict[str, RunTables] = {
    "group lost": run(published=[pub("e1")], final=[final("ledger")]),
    "group duplicated": run(published=[pub("e1")], handled=[handled("ledger", "e1", 2)]),
    "group unexpected": run(handled=[handled("ledger", "e1")], final=[final("ledger")]),
    "client lost": run(user_streams=truth("p1", ["1-0"]), phones=[{"phone": "p1"}]),
    "client duplicated": run(
        user_streams=truth("p1", ["1-0"]), deliveries=[delivery("p1", "1-0")] * 2
    ),
    "client reordered": run(
        user_streams=truth("p1", ["1-0", "2-0"]),
        deliveries=[delivery("p1", "2-0"), delivery("p1", "1-0")],
    ),
    "client unexpected": run(deliveries=[delivery("p1", "1-0")]),
    "invariant": run(
        ledger=[{"event_id": "x", "escrow_id": "esc-1", "account": "fees", "amount": 1}]
    ),
}


@pytest.mark.parametrize("kind", FAILURES)
def test_each_failure_fails_the_run(kind: str) -> None:
    report = check(FAILURES[kind])
    assert not report.ok
    if not kind.startswith("invariant"):
        scope, verdict = kind.split()
        assert list(report.problems[["scope", "verdict"]].itertuples(index=False, name=None)) == [
            ("group" if scope == "group" else "client", verdict)
        ]


def test_empty_run_is_ok() -> None:
    report = check(RunTables())
    assert report.ok
    assert report.groups.empty and report.clients.empty and report.problems.empty


def test_check_dir_round_trip_and_print(tmp_path) -> None:
    original = money_run(
        handled=[handled("ledger", "a1"), handled("ledger", "zz")],
        user_streams=truth("p1", IDS),
        deliveries=[delivery("p1", e) for e in IDS[:-1]],
        phones=[{"phone": "p1", "start_after": "0-0"}],
    )
    original.save(tmp_path / "run")
    loaded, direct = check_dir(tmp_path / "run"), check(original)
    for name in ("groups", "clients", "invariants", "delivery_counts", "problems"):
        pd.testing.assert_frame_equal(
            getattr(loaded, name), getattr(direct, name), check_dtype=False
        )
    assert not loaded.ok
    assert json.loads(json.dumps(loaded.to_dict()))["ok"] is False

    from rich.console import Console

    console = Console(record=True, width=160)
    print_report(loaded, console)
    text = console.export_text()
    assert "consumer groups" in text and "NOT OK" in text and "evt-8-0" in text

    with pytest.raises(FileNotFoundError, match="not a run directory"):
        check_dir(tmp_path)


def test_cli_check(tmp_path) -> None:
    cli = CliRunner()
    money_run().save(tmp_path / "good")
    result = cli.invoke(main, ["check", str(tmp_path / "good")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output

    FAILURES["client lost"].save(tmp_path / "bad")
    result = cli.invoke(main, ["check", str(tmp_path / "bad"), "--json"])
    assert result.exit_code == 1, result.output
    data = json.loads(result.output)
    assert data["ok"] is False
    assert data["problems"] == [
        {"scope": "client", "who": "p1", "verdict": "lost", "event_id": "evt-1-0",
         "entry_id": "1-0"}
    ]  # fmt: skip

    result = cli.invoke(main, ["check", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a run directory" in result.output
    result = cli.invoke(main, ["check", str(tmp_path / "missing")])
    assert result.exit_code == 2


# -- property: a valid delivery process is ok, one dropped delivery is one loss -------


@st.composite
def delivery_processes(draw: st.DrawFn) -> tuple[list[str], str, list[dict[str, Any]]]:
    """A phone's stream, where it starts, and a valid delivery process over it.

    Ids start below 10 so "9-x" < "10-x" gets exercised. The phone delivers in order,
    disconnects at random (resuming after the last id it received), sometimes loses its
    place and fetches a snapshot (as of some id not before its last), and finally drains.
    """
    n = draw(st.integers(0, 25))
    ms, seq, entries = draw(st.integers(0, 9)), 0, []
    for _ in range(n):
        step = draw(st.integers(0, 3))
        ms, seq = (ms, seq + 1) if step == 0 else (ms + step, 0)
        entries.append(f"{ms}-{seq}")
    start = draw(st.integers(0, n))
    after = "0-0" if start == 0 else entries[start - 1]
    rows: list[dict[str, Any]] = []
    position, connection = start, 1
    actions = draw(st.lists(st.tuples(st.sampled_from("dds"), st.integers(0, 4)), max_size=12))
    for action, k in actions:
        connection += 1  # every action starts on a new connection
        if action == "d":
            for entry in entries[position : position + k]:
                rows.append(delivery("p1", entry, connection=f"c{connection}"))
            position = min(n, position + k)
        elif position + k <= n and position + k > 0:  # a snapshot as of entries[pos+k-1]
            rows.append(snapshot("p1", entries[position + k - 1], f"c{connection}"))
            position += k
    for entry in entries[position:]:
        rows.append(delivery("p1", entry, connection=f"c{connection + 1}"))
    return entries, after, rows


@settings(max_examples=60, deadline=None)
@given(delivery_processes(), st.randoms(use_true_random=False))
def test_valid_delivery_is_ok_and_one_drop_is_one_loss(process, random) -> None:
    entries, after, rows = process
    users = pd.DataFrame(truth("p1", entries), columns=COLUMNS["user_streams"])
    phones = frame("phones", [{"phone": "p1", "start_after": after}])
    clients, problems = check_clients(users, frame("deliveries", rows), phones)
    row = clients.set_index("phone").loc["p1"]
    expected = len(entries) - (entries.index(after) + 1 if after != "0-0" else 0)
    assert (row["expected"], row["ok"]) == (expected, expected)
    assert problems.empty

    marks = [r["entry_id"] for r in rows if r["source"] == "snapshot"]
    last_mark = entries.index(marks[-1]) if marks else -1  # marks only grow
    droppable = [
        i for i, r in enumerate(rows)
        if r["source"] != "snapshot" and entries.index(r["entry_id"]) > last_mark
    ]  # fmt: skip
    if not droppable:
        return
    dropped = random.choice(droppable)
    clients, problems = check_clients(
        users, frame("deliveries", rows[:dropped] + rows[dropped + 1 :]), phones
    )
    row = clients.set_index("phone").loc["p1"]
    assert (row["lost"], row["ok"], row["duplicated"], row["reordered"]) == (
        1, expected - 1, 0, 0,
    )  # fmt: skip
    assert list(problems["verdict"]) == ["lost"]
    assert list(problems["entry_id"]) == [rows[dropped]["entry_id"]]


def test_entries_redis_lost_are_out_of_the_truth_and_their_deliveries_forgiven() -> None:
    # The fan-out made 2-0 and 3-0; Redis lost both (a kill that lost writes), the phone
    # had received 2-0 live; the fan-out made the events again as 4-0 and 5-0; the phone
    # was reset, resynced from the snapshot as of 1-0 and replayed 4-0 and 5-0.
    ids = ["1-0", "2-0", "3-0", "4-0", "5-0"]
    rows = [delivery("p1", "1-0"), delivery("p1", "2-0"), snapshot("p1", "1-0", "c2")]
    rows += [delivery("p1", e, connection="c2") for e in ("4-0", "5-0")]
    lost = [{"user": "p1", "entry_id": e, "event_id": f"evt-{e}", "t": 1.0} for e in ("2-0", "3-0")]
    tables = {"user_streams": truth("p1", ids), "deliveries": rows,
              "phones": [{"phone": "p1", "start_after": "0"}]}  # fmt: skip
    report = check(run(**tables, lost_entries=lost))
    assert client_row(report, "p1")["expected"] == 3  # 1-0, 4-0, 5-0
    assert (client_row(report, "p1")["lost"], client_row(report, "p1")["unexpected"]) == (0, 0)
    assert report.clients["reordered"].sum() == 0
    # Without the record of the loss, the same run has a lost entry (3-0, never sent).
    blind = check(run(**tables))
    assert client_row(blind, "p1")["lost"] == 1


def test_a_snapshot_as_of_an_entry_redis_lost_still_covers_what_came_before() -> None:
    # The phone resynced from a snapshot as of 3-0; Redis lost 3-0 afterwards. The
    # snapshot row is a position, not an entry received, so it stays and still covers
    # 2-0, which the phone never received on its own.
    ids = ["1-0", "2-0", "3-0", "4-0", "5-0"]
    rows = [delivery("p1", "1-0"), snapshot("p1", "3-0", "c2")]
    rows += [delivery("p1", e, connection="c2") for e in ("4-0", "5-0")]
    lost = [{"user": "p1", "entry_id": "3-0", "event_id": "evt-3-0", "t": 1.0}]
    report = check(
        run(
            user_streams=truth("p1", ids),
            deliveries=rows,
            phones=[{"phone": "p1", "start_after": "0-0"}],
            lost_entries=lost,
        )
    )
    row = client_row(report, "p1")
    assert (row["expected"], row["ok"], row["lost"], row["snapshots"]) == (4, 4, 0, 1)
    assert report.ok


# -- found by mutation testing (make mutation) ----------------------------------------


def test_to_dict_holds_every_table_under_its_name() -> None:
    report = check(FAILURES["client lost"])
    as_dict = report.to_dict()
    assert list(as_dict) == [
        "ok", "finished", "groups", "clients", "invariants", "delivery_counts", "problems",
    ]  # fmt: skip
    assert (as_dict["ok"], as_dict["finished"]) == (False, True)
    for name in ("groups", "clients", "invariants", "delivery_counts", "problems"):
        table = getattr(report, name)
        assert len(as_dict[name]) == len(table)
        assert all(list(row) == list(table.columns) for row in as_dict[name])
    assert as_dict["problems"][0]["verdict"] == "lost"


def test_public_group_and_invariant_checks_agree_with_check() -> None:
    # The ledger group is behind (c1 never handled, one pending): c1 is unseen.
    behind = [r for r in money_run().handled.to_dict("records") if r["event_id"] != "c1"]
    tables = money_run(handled=behind, final=[final("ledger", pending=1)])
    whole = check(tables)
    groups, counts, problems = check_groups(tables.published, tables.handled, tables.final)
    pd.testing.assert_frame_equal(groups, whole.groups)
    pd.testing.assert_frame_equal(counts, whole.delivery_counts)
    assert list(problems["event_id"]) == ["c1"] and set(problems["verdict"]) == {"unseen"}
    invariants = check_invariants(tables.published, tables.escrows, tables.ledger, tables.final)
    pd.testing.assert_frame_equal(invariants, whole.invariants.iloc[: len(invariants)])
    assert list(invariants["name"]) == list(whole.invariants["name"])[:-1]


def test_the_same_event_twice_in_a_user_stream_is_not_out_of_escrow_order() -> None:
    # A duplicate entry is the phones' verdict (duplicated); it does not go back.
    published = [{**pub("e1", "escrow.shipped"), "sequence": 1}]
    entries = [{"user": "u", "entry_id": f"{n}-0", "event_id": "e1"} for n in (1, 2)]
    ok, detail = invariant(
        check(run(published=published, user_streams=entries)), "user streams in escrow order"
    )
    assert (ok, detail) == (True, "2 entries in 1 user streams")


def test_an_entry_out_of_order_without_a_redelivery_fails_and_says_how_many() -> None:
    published = [
        {**pub(e, "escrow.shipped", "esc-1"), "sequence": s} for e, s in [("e1", 1), ("e2", 2)]
    ]
    entries = [
        {"user": "u", "entry_id": f"{n}-0", "event_id": e} for n, e in [(1, "e2"), (2, "e1")]
    ]
    once = [handled("fanout", "e1", deliveries=1), handled("fanout", "e2")]
    ok, detail = invariant(
        check(run(published=published, user_streams=entries, handled=once)),
        "user streams in escrow order",
    )
    assert not ok
    assert detail == (
        "2 entries in 1 user streams; 1 entries placed after a later event of their escrow,"
        " e.g. u / esc-1"
    )


def test_an_empty_user_stream_table_says_so() -> None:
    ok, detail = invariant(check(run(published=[pub("e1")])), "user streams in escrow order")
    assert (ok, detail) == (True, "no user-stream entries")


def test_the_last_row_of_an_escrow_is_its_final_state() -> None:
    tables = _tables(money_run())
    rows = tables["escrows"]
    stale = next(r for r in rows if r["id"] == "esc-1") | {"state": "funded"}
    # esc-1's last row (released) wins over an earlier "funded" row...
    ok, _ = invariant(check(run(**{**tables, "escrows": [stale, *rows]})), "money conserved")
    assert ok
    # ...and a later "funded" row wins over "released": then its hold must be 1,000.
    ok, detail = invariant(check(run(**{**tables, "escrows": [*rows, stale]})), "money conserved")
    assert not ok and "esc-1 (funded: holds 0, should hold 1,000)" in detail


def _tables(tables: RunTables) -> dict[str, list[dict[str, Any]]]:
    return {name: getattr(tables, name).to_dict("records") for name in COLUMNS}


def test_a_failing_invariant_names_its_first_three_examples() -> None:
    released = [pub(f"r{i}", "escrow.released", f"esc-{i}", 10) for i in range(5)]
    twice = released + [pub(f"s{i}", "escrow.released", f"esc-{i}", 10) for i in range(5)]
    ok, detail = invariant(check(run(published=twice)), "no escrow released twice")
    assert not ok
    assert detail == "5 escrows released; 5 more than once, e.g. esc-0, esc-1, esc-2"


def _printed(report: CheckReport, limit: int) -> list[str]:
    from rich.console import Console

    console = Console(record=True, width=200)
    print_report(report, console, limit=limit)
    return console.export_text().splitlines()


def test_print_report_shows_every_table_and_the_verdict() -> None:
    text = _printed(check(money_run()), limit=20)
    joined = "\n".join(text)
    titles = {line.strip() for line in text}
    assert {"consumer groups", "delivery counts", "phones", "invariants"} <= titles
    assert text[-1] == "OK"
    assert "problems" not in joined
    behind = [r for r in money_run().handled.to_dict("records") if r["event_id"] != "c1"]
    unfinished = _printed(check(money_run(handled=behind, final=[final("ledger", pending=1)])), 20)
    assert unfinished[-1] == "NOT OK (UNFINISHED: 1 events unseen, a group had not drained)"
    assert "problems" in "\n".join(unfinished)


def test_print_report_summarises_many_phones_and_limits_long_tables() -> None:
    phones = [f"p{i}" for i in range(4)]
    tables = run(
        user_streams=[row for p in phones for row in truth(p, ["1-0", "2-0"])],
        deliveries=[delivery(p, "1-0") for p in phones],  # each phone lost 2-0
        phones=[{"phone": p, "start_after": "0-0"} for p in phones],
    )
    report = check(tables)
    text = "\n".join(_printed(report, limit=3))
    assert (
        "4 phones: expected 8, delivered 4, ok 4, lost 4, duplicated 0, reordered 0,"
        " unexpected 0, connections 4, snapshots 0" in text
    )
    assert "phones with problems" in text and "... and 1 more phones with problems" in text
    assert "p3" not in text  # the fourth phone is past the limit in both tables
    assert "... and 1 more problems" in text
    at_limit = "\n".join(_printed(report, limit=4))
    assert "more problems" not in at_limit and "4 phones:" not in at_limit
    assert text.splitlines()[-1] == "NOT OK"


def test_a_redelivered_entry_out_of_order_is_counted_after_the_totals() -> None:
    published = [{**pub(e, "escrow.shipped"), "sequence": s} for e, s in [("e1", 1), ("e2", 2)]]
    order = [(1, "e2"), (2, "e1")]
    entries = [{"user": "u", "entry_id": f"{n}-0", "event_id": e} for n, e in order]
    redelivered = [handled("fanout", "e1", deliveries=2), handled("fanout", "e2")]
    ok, detail = invariant(
        check(run(published=published, user_streams=entries, handled=redelivered)),
        "user streams in escrow order",
    )
    assert ok
    assert detail == (
        "2 entries in 1 user streams; 1 placed after a later event because the fan-out"
        " had them redelivered (crash recovery)"
    )


def test_a_ledger_group_missing_from_final_is_not_checked_against_the_events() -> None:
    ledger = [r for r in money_run().ledger.to_dict("records") if r["event_id"] != "c1"]
    ok, detail = invariant(check(money_run(ledger=ledger, final=[])), "ledger matches events")
    assert ok and detail.startswith("not checked")


def test_money_conserved_names_escrows_missing_from_the_table_or_without_a_state() -> None:
    tables = _tables(money_run())
    rows = [r for r in tables["escrows"] if r["id"] not in ("esc-3", "esc-4")]
    # esc-4 was paid and refunded (holds 0): fine without a row. esc-3 holds 200.
    ok, detail = invariant(check(run(**{**tables, "escrows": rows})), "money conserved")
    assert not ok
    assert detail == (
        "received 2,000 = held 200 + released 1,000 + refunded 800;"
        " 1 escrows hold the wrong amount, e.g. esc-3 (not in escrows: holds 200, should hold 0)"
    )
    no_state = [r | {"state": None} if r["id"] == "esc-3" else r for r in tables["escrows"]]
    ok, detail = invariant(check(run(**{**tables, "escrows": no_state})), "money conserved")
    assert not ok and "e.g. esc-3 (no state: holds 200, should hold 0)" in detail


def test_released_and_refunded_details_count_both() -> None:
    published = [
        pub("r1", "escrow.released", "esc-1", 10),
        pub("f1", "escrow.refunded", "esc-1", 10),
        pub("f2", "escrow.refunded", "esc-2", 10),
    ]
    ok, detail = invariant(check(run(published=published)), "no escrow both released and refunded")
    assert (ok, detail) == (False, "1 released, 2 refunded; 1 both, e.g. esc-1")


def test_print_report_by_default_lists_twenty_phones_and_summarises_more() -> None:
    def report_of(n: int) -> CheckReport:
        phones = [f"p{i}" for i in range(n)]
        return check(
            run(
                user_streams=[row for p in phones for row in truth(p, ["1-0"])],
                deliveries=[delivery(p, "1-0") for p in phones],
                phones=[{"phone": p, "start_after": "0-0"} for p in phones],
            )
        )

    from rich.console import Console

    def printed(report: CheckReport) -> str:
        console = Console(record=True, width=200)
        print_report(report, console)
        return console.export_text()

    assert "phones:" not in printed(report_of(20))
    assert "21 phones: expected 21" in printed(report_of(21))


def test_handled_rows_without_an_event_id_are_unexpected_unless_placeholders() -> None:
    def ledger_with(extra: dict[str, Any]) -> dict[str, Any]:
        report = check(
            run(published=[pub("e1")], handled=[handled("ledger", "e1"), extra],
                final=[final("ledger")])
        )  # fmt: skip
        return group_row(report, "ledger")

    worked = ledger_with(handled("ledger", None))  # type: ignore[arg-type]
    assert (worked["ok"], worked["unexpected"]) == (1, 1)
    idle = ledger_with(handled("ledger", None, effects=0, calls=0))  # type: ignore[arg-type]
    assert (idle["ok"], idle["unexpected"]) == (1, 0)


def test_a_group_with_no_handled_rows_is_not_credited_with_another_groups() -> None:
    # Three groups handled e1; "disputes" handled nothing at all (it only has a final row).
    published = [pub("e1"), pub("d1", "dispute.opened")]
    rows = [handled(g, e) for g in ("ledger", "notifications", "push") for e in ("e1", "d1")]
    finals = [final(g) for g in ("ledger", "notifications", "push", "disputes")]
    report = check(run(published=published, handled=rows, final=finals))
    row = group_row(report, "disputes")
    assert (row["expected"], row["ok"], row["lost"], row["max_delivery_count"]) == (2, 0, 2, 0)


def test_to_dict_counts_are_whole_numbers() -> None:
    as_dict = check(money_run()).to_dict()
    group = as_dict["groups"][0]
    assert all(type(group[c]) is int for c in ("expected", "ok", "lost", "max_delivery_count"))
    assert all(type(v) is int for r in as_dict["delivery_counts"] for v in list(r.values())[1:])


def test_a_hold_booked_for_an_escrow_without_money_events_is_a_difference() -> None:
    tables = _tables(money_run())
    ledger = [*tables["ledger"], {"event_id": "x", "escrow_id": "esc-9", "account": "hold:esc-9"}]
    ledger[-1]["amount"] = 5
    ok, detail = invariant(check(run(**{**tables, "ledger": ledger})), "ledger matches events")
    assert not ok
    assert detail == (
        "5 escrow holds, 205 KES held in the ledger;"
        " 1 differ from the events, e.g. esc-9 (ledger 5, events 0)"
    )


def test_any_sign_of_handling_an_event_not_expected_is_unexpected() -> None:
    report = check(
        run(
            published=[pub("e1")],
            handled=[
                handled("ledger", "e1"),
                handled("ledger", "called", effects=0, calls=1),  # ran, left nothing
                handled("ledger", "effect", effects=1, calls=0),  # left a row, no call
            ],
            final=[final("ledger")],
        )
    )
    assert group_row(report, "ledger")["unexpected"] == 2
    assert sorted(report.problems["event_id"]) == ["called", "effect"]


def test_one_redelivery_is_recovered() -> None:
    report = check(
        run(
            published=[pub("e1")],
            handled=[handled("push", "e1", deliveries=2)],
            final=[final("push")],
        )
    )
    row = group_row(report, "push")
    assert (row["ok"], row["recovered"], row["max_delivery_count"]) == (1, 1, 2)


def test_a_group_that_handled_nothing_has_delivery_count_zero() -> None:
    report = check(run(published=[pub("e1")], final=[final("ledger")]))
    row = group_row(report, "ledger")
    assert (row["lost"], row["max_delivery_count"]) == (1, 0)


def test_empty_tables_keep_their_integer_columns() -> None:
    # An empty report concatenates with others (sweeps, notebooks) without turning
    # its count columns into objects.
    report = check(RunTables())
    assert set(report.groups.dtypes[GROUP_COLUMNS[1:-1]].astype(str)) == {"int64"}
    assert set(report.delivery_counts.dtypes[["max_delivery_count", "events"]].astype(str)) == {
        "int64"
    }


def test_a_backlog_figure_that_is_not_a_number_means_not_drained() -> None:
    rows = {"published": [pub("e1")], "handled": [handled("ledger", "e1")]}
    for backlog in ({"pending": "n/a", "lag": 0}, {"pending": 0, "lag": "n/a"}):
        report = check(run(**rows, final=[{"group": "ledger", **backlog}]))
        assert group_row(report, "ledger")["drained"] is False, backlog


def test_final_rows_without_a_group_are_ignored() -> None:
    blank = [{"group": g, "pending": 5, "lag": 5} for g in ("", None)]
    report = check(
        run(published=[pub("e1")], handled=[handled("ledger", "e1")],
            final=[final("ledger"), *blank])
    )  # fmt: skip
    assert list(report.groups["group"]) == ["ledger"]
    assert report.ok


def test_delivery_rows_without_a_phone_are_ignored() -> None:
    stray = [delivery(p, "9-0") for p in ("", None)]  # type: ignore[arg-type]
    report = clients_of(IDS, [delivery("p1", e) for e in IDS] + stray)
    assert list(report.clients["phone"]) == ["p1"]
    assert client_row(report, "p1")["unexpected"] == 0
    assert report.ok


def test_streams_are_named_by_the_last_part_of_a_prefixed_name() -> None:
    published = [
        {**pub("e1"), "stream": "wb:escrow"},
        {**pub("p1", "payment.requested"), "stream": "run-7:wb:payment"},
        {**pub("d1", "dispute.opened"), "stream": "run-7:wb:dispute"},
    ]
    report = check(
        run(published=published, handled=[handled("ledger", "e1"), handled("ledger", "p1")],
            final=[final("ledger")])
    )  # fmt: skip
    assert (group_row(report, "ledger")["expected"], group_row(report, "ledger")["ok"]) == (2, 2)
    assert report.ok


def test_missing_or_unreadable_handling_figures_count_as_nothing_done() -> None:
    placeholder = handled("ledger", "ghost") | {"handler_calls": None, "effects": "n/a"}
    report = check(
        run(published=[pub("e1")], handled=[handled("ledger", "e1"), placeholder],
            final=[final("ledger")])
    )  # fmt: skip
    assert group_row(report, "ledger")["unexpected"] == 0
    assert report.ok


def test_the_first_start_after_of_a_phone_wins() -> None:
    report = check(
        run(
            user_streams=truth("p1", IDS) + truth("p2", IDS),
            deliveries=[delivery("p1", e) for e in IDS[2:]] + [delivery("p2", e) for e in IDS[3:]],
            phones=[
                {"phone": "p1", "start_after": "1-1"},
                {"phone": "p1", "start_after": "0-0"},
                {"phone": "p2", "start_after": "2-0"},
            ],
        )
    )
    assert (client_row(report, "p1")["expected"], client_row(report, "p1")["lost"]) == (4, 0)
    assert (client_row(report, "p2")["expected"], client_row(report, "p2")["lost"]) == (3, 0)
    assert report.ok


def test_blank_ids_mean_from_the_start_and_no_event() -> None:
    # start_after "" is 0-0 (like NULL and "0"); an empty event id is no event id.
    report = clients_of(IDS, [delivery("p1", e) for e in IDS], start_after="")
    assert (client_row(report, "p1")["expected"], client_row(report, "p1")["ok"]) == (6, 6)
    groups = check(
        run(published=[pub("e1"), pub("e2")],
            handled=[handled("ledger", ""), handled("ledger", "e2"), handled("ledger", "e1"),
                     handled("ledger", "ghost")],
            final=[final("ledger")])
    )  # fmt: skip
    row = group_row(groups, "ledger")
    assert (row["expected"], row["ok"], row["unexpected"]) == (2, 2, 2)
    assert groups.problems["event_id"].fillna("(none)").tolist() == ["ghost", "(none)"]


def test_a_drop_after_a_resync_is_reordered() -> None:
    rows = [
        delivery("p1", "5-0"),
        snapshot("p1", "5-0"),
        delivery("p1", "8-0"),
        delivery("p1", "3-0"),  # after 8-0 with no snapshot between
    ]
    report = clients_of(IDS, rows)
    assert client_row(report, "p1")["reordered"] == 1
    assert verdicts(report)[-1] == ("client", "p1", "reordered", "evt-3-0", "3-0")


def test_row_order_decides_reordering_in_long_interleaved_deliveries() -> None:
    ids = [f"{i}-0" for i in range(1, 101)]
    rows = [delivery(p, e) for e in ids for p in ("p1", "p2")]
    report = check(
        run(
            user_streams=truth("p1", ids) + truth("p2", ids),
            deliveries=rows,
            phones=[{"phone": p, "start_after": "0-0"} for p in ("p1", "p2")],
        )
    )
    assert report.clients["reordered"].tolist() == [0, 0]
    assert report.ok


def test_a_delivery_without_an_event_id_counts_for_its_entry() -> None:
    rows = [delivery("p1", e) for e in IDS[:4]]
    rows += [
        {**delivery("p1", IDS[4]), "event_id": ""},
        {**delivery("p1", IDS[5]), "event_id": None},
    ]
    report = clients_of(IDS, rows)
    assert (client_row(report, "p1")["ok"], client_row(report, "p1")["unexpected"]) == (6, 0)


def test_connections_count_only_named_ones() -> None:
    rows = [delivery("p1", e) for e in IDS[:3]]
    rows += [{**delivery("p1", e), "connection": None} for e in IDS[3:]]
    assert client_row(clients_of(IDS, rows), "p1")["connections"] == 1


def test_client_problems_name_their_phone_and_counts_are_whole_numbers() -> None:
    report = check(FAILURES["client unexpected"])
    assert verdicts(report) == [("client", "p1", "unexpected", "evt-1-0", "1-0")]
    reordered = check(FAILURES["client reordered"])
    assert verdicts(reordered) == [("client", "p1", "reordered", "evt-1-0", "1-0")]
    client = report.to_dict()["clients"][0]
    assert all(type(v) is int for k, v in client.items() if k != "phone")
