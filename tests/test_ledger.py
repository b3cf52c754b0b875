"""check_ledger catches what can go wrong, not only what holds by construction.

``balanced`` (entries sum to zero) holds for any posting :func:`postings_for` makes, and
``conserved`` is the same sum whenever every line is booked to a buyer, hold, seller or fee
account. So each corruption below keeps both true and posts every money event once: only
comparing each account with the escrows' states can see it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import select, update

from tests.support import make_service, run_lifecycles
from workbench import events as ev
from workbench.clock import ManualClock
from workbench.handlers.ledger import LedgerHandler, check_ledger, expected_balances
from workbench.store import Store, escrows, ledger_entries, outbox


def _post_everything(store: Store, clock: ManualClock) -> None:
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.data).order_by(outbox.c.seq)).scalars().all()
    LedgerHandler(store, clock).handle([ev.decode(bytes(data)) for data in rows])


@pytest.fixture
def booked(store: Store, clock: ManualClock) -> Store:
    service, gateway = make_service(store, clock)
    run_lifecycles(service, gateway, clock, 12)
    _post_everything(store, clock)
    return store


def test_a_complete_ledger_matches_every_account(booked: Store) -> None:
    check = check_ledger(booked)
    assert check.ok, check
    assert check.mismatched_accounts == {}
    with booked.engine.connect() as conn:
        states = set(conn.execute(select(escrows.c.state)).scalars())
    assert {"released", "refunded"} <= states  # both settlements are among the accounts checked
    assert sum(1 for a in expected_balances(booked) if a.startswith("seller:")) >= 2


def _one_posting(store: Store, event_type: str) -> str:
    with store.engine.connect() as conn:
        return conn.execute(
            select(ledger_entries.c.event_id)
            .join(outbox, outbox.c.event_id == ledger_entries.c.event_id)
            .where(outbox.c.type == event_type)
            .limit(1)
        ).scalar_one()


def _to_another_buyer(store: Store) -> None:
    event_id = _one_posting(store, "payment.received")
    with store.begin() as conn:
        conn.execute(
            update(ledger_entries)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.account.like("buyer:%"))
            .values(account="buyer:someone-else")
        )


def _short_amount(store: Store) -> None:
    # Both legs of one payment a shilling short: still balanced, still conserved.
    event_id = _one_posting(store, "payment.received")
    with store.begin() as conn:
        conn.execute(
            update(ledger_entries)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.amount > 0)
            .values(amount=ledger_entries.c.amount - 1)
        )
        conn.execute(
            update(ledger_entries)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.amount < 0)
            .values(amount=ledger_entries.c.amount + 1)
        )


def _seller_paid_the_fee(store: Store) -> None:
    # The release booked the fee to the seller: balanced, conserved, posted once.
    event_id = _one_posting(store, "escrow.released")
    with store.begin() as conn:
        fee = conn.execute(
            select(ledger_entries.c.amount)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.account == "fees")
        ).scalar_one()
        conn.execute(
            update(ledger_entries)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.account.like("seller:%"))
            .values(amount=ledger_entries.c.amount + fee)
        )
        conn.execute(
            update(ledger_entries)
            .where(ledger_entries.c.event_id == event_id)
            .where(ledger_entries.c.account == "fees")
            .values(amount=0)
        )


def _state_moved_without_money(store: Store) -> None:
    # An escrow marked refunded whose money went to the seller (a refund never booked).
    with store.engine.connect() as conn:
        escrow_id = conn.execute(
            select(escrows.c.id).where(escrows.c.state == "released").limit(1)
        ).scalar_one()
    with store.begin() as conn:
        conn.execute(update(escrows).where(escrows.c.id == escrow_id).values(state="refunded"))


@pytest.mark.parametrize(
    "corrupt", [_to_another_buyer, _short_amount, _seller_paid_the_fee, _state_moved_without_money]
)
def test_corruptions_that_balance_are_caught(
    booked: Store, corrupt: Callable[[Store], None]
) -> None:
    corrupt(booked)
    check = check_ledger(booked)
    assert check.balanced and check.conserved  # what the old check looked at still holds
    assert not check.accounts_match
    assert not check.ok
    assert check.mismatched_accounts
