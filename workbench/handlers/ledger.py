"""The ledger: double-entry postings for every movement of money.

Accounts (amounts in KES, each posting sums to zero):

* ``buyer:<id>``   the buyer's M-Pesa side: negative when the buyer has paid in
* ``hold:<escrow>`` money held in escrow
* ``seller:<id>``  payable to the seller
* ``fees``         the platform's fee income

Postings by event type:

===================  ======================================================
payment.received     buyer -amount, hold +amount
escrow.released      hold -amount, seller +(amount - fee), fees +fee
escrow.refunded      hold -amount, buyer +amount
payment.refunded     hold -amount, buyer +amount  (late or double payment)
===================  ======================================================

The posting id is the event id and ``(posting_id, account)`` is unique, so
even a bug that skipped the inbox could not post an event twice.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from workbench.domain.events import Event
from workbench.handlers.base import SqlHandler
from workbench.store import Store, escrows, ledger_entries, outbox


def postings_for(event: Event) -> list[tuple[str, int]]:
    """The (account, amount) lines an event posts; empty for events that move no money."""
    p = event.payload
    buyer, seller = event.user_ids[0], event.user_ids[1]
    hold = f"hold:{event.escrow_id}"
    match event.type:
        case "payment.received":
            return [(f"buyer:{buyer}", -p["amount"]), (hold, p["amount"])]
        case "escrow.released":
            return [
                (hold, -p["amount"]),
                (f"seller:{seller}", p["amount"] - p["fee"]),
                ("fees", p["fee"]),
            ]
        case "escrow.refunded" | "payment.refunded":
            return [(hold, -p["amount"]), (f"buyer:{buyer}", p["amount"])]
    return []


class LedgerHandler(SqlHandler):
    group = "ledger"
    aggregate_types = ("escrow", "payment")

    table = ledger_entries

    def rows(self, event: Event) -> list[dict[str, Any]]:
        return [
            {
                "posting_id": event.event_id,
                "event_id": event.event_id,
                "escrow_id": event.escrow_id,
                "account": account,
                "amount": amount,
                "at": event.occurred_at,
            }
            for account, amount in postings_for(event)
        ]


@dataclass(frozen=True)
class LedgerCheck:
    """The ledger against itself, the event log and the escrows it books.

    ``balanced``: all entries sum to zero (true by construction of
    :func:`postings_for`; kept as a cheap guard). ``matches_outbox``: every money
    event in the outbox is posted exactly once, and nothing else is.
    ``accounts_match``: every account's balance is what the escrows' states say
    it must be, which is what can actually go wrong (a posting with the wrong
    amount, to the wrong party, or a state change whose money never moved):

    * ``hold:<escrow>`` holds the amount while the escrow is funded, shipped or
      disputed, and nothing in every other state (late and double payments are
      received and refunded, netting to zero);
    * ``buyer:<id>`` has paid in the amounts of their escrows that hold money or
      were released (refunds returned the rest);
    * ``seller:<id>`` is owed amount minus fee of their released escrows;
    * ``fees`` is the sum of the released escrows' fees.

    Checked after the ledger group has drained: a ledger behind the escrows
    fails it, by design.
    """

    entries: int
    total: int
    funded: int
    held: int
    released: int
    refunded: int
    fees: int
    posted_events: int
    expected_events: int
    duplicate_postings: int
    #: accounts whose balance differs from the escrows': account -> (booked, expected)
    mismatched_accounts: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def balanced(self) -> bool:
        return self.total == 0

    @property
    def conserved(self) -> bool:
        return self.funded == self.held + self.released + self.refunded

    @property
    def matches_outbox(self) -> bool:
        return self.posted_events == self.expected_events and self.duplicate_postings == 0

    @property
    def accounts_match(self) -> bool:
        return not self.mismatched_accounts

    @property
    def ok(self) -> bool:
        return self.balanced and self.conserved and self.matches_outbox and self.accounts_match


MONEY_EVENTS = ("payment.received", "escrow.released", "escrow.refunded", "payment.refunded")
#: States in which an escrow's hold account carries its amount.
HOLDING_STATES = ("funded", "shipped", "disputed")


def expected_balances(store: Store) -> dict[str, int]:
    """Every account's balance as the escrows' current states say it must be."""
    e = escrows.c
    expected: dict[str, int] = defaultdict(int)
    with store.read() as conn:
        rows = conn.execute(select(e.id, e.buyer_id, e.seller_id, e.amount, e.fee, e.state))
        for escrow_id, buyer, seller, amount, fee, state in rows:
            expected[f"hold:{escrow_id}"] += amount if state in HOLDING_STATES else 0
            if state in HOLDING_STATES or state == "released":
                expected[f"buyer:{buyer}"] -= amount
            if state == "released":
                expected[f"seller:{seller}"] += amount - fee
                expected["fees"] += fee
    return dict(expected)


def check_ledger(store: Store) -> LedgerCheck:
    le = ledger_entries.c
    with store.read() as conn:
        total, entries = conn.execute(
            select(func.coalesce(func.sum(le.amount), 0), func.count())
        ).one()

        def sum_where(condition) -> int:  # type: ignore[no-untyped-def]
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(le.amount), 0)).where(condition)
                ).scalar_one()
            )

        funded = -sum_where(le.account.like("buyer:%") & (le.amount < 0))
        held = sum_where(le.account.like("hold:%"))
        released = sum_where(le.account.like("seller:%")) + sum_where(le.account == "fees")
        refunded = sum_where(le.account.like("buyer:%") & (le.amount > 0))
        fees = sum_where(le.account == "fees")
        posted = int(conn.execute(select(func.count(func.distinct(le.event_id)))).scalar_one())
        expected = int(
            conn.execute(
                select(func.count(func.distinct(outbox.c.event_id))).where(
                    outbox.c.type.in_(MONEY_EVENTS)
                )
            ).scalar_one()
        )
        per_event = select(le.event_id, func.count().label("n")).group_by(le.event_id).subquery()
        # A posting has 2 or 3 lines; more means an event was posted twice.
        duplicates = int(
            conn.execute(
                select(func.count()).select_from(per_event).where(per_event.c.n > 3)
            ).scalar_one()
        )
        # In the read: on SQLite they join its snapshot, so every figure is of one moment.
        booked, should = balances(store), expected_balances(store)
    mismatched = {
        account: (booked.get(account, 0), should.get(account, 0))
        for account in sorted(booked.keys() | should.keys())
        if booked.get(account, 0) != should.get(account, 0)
    }
    return LedgerCheck(
        entries=int(entries),
        total=int(total),
        funded=funded,
        held=held,
        released=released,
        refunded=refunded,
        fees=fees,
        posted_events=posted,
        expected_events=expected,
        duplicate_postings=duplicates,
        mismatched_accounts=mismatched,
    )


def balances(store: Store) -> dict[str, int]:
    le = ledger_entries.c
    with store.read() as conn:
        rows = conn.execute(
            select(le.account, func.sum(le.amount)).group_by(le.account).order_by(le.account)
        ).all()
    return {account: int(amount) for account, amount in rows}
