"""The inbox: which event ids are new to a group, inside the effect's transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from workbench.store import Store, claim_inbox, inbox


def _count(store: Store, group: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(inbox).where(inbox.c.group_name == group)
        ).scalar_one()


def test_new_ids_are_all_claimed(store: Store) -> None:
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e1", "e2", "e3"], 1.0) == {"e1", "e2", "e3"}
    assert _count(store, "ledger") == 3


def test_seen_ids_are_not_claimed_again_and_new_ones_in_the_batch_are(store: Store) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1", "e2"], 1.0)
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e2", "e3", "e1", "e4"], 2.0) == {"e3", "e4"}
    assert _count(store, "ledger") == 4


def test_a_duplicate_inside_one_batch_counts_once(store: Store) -> None:
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e1", "e1", "e2"], 1.0) == {"e1", "e2"}
    assert _count(store, "ledger") == 2


def test_groups_have_separate_inboxes(store: Store) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        assert claim_inbox(conn, "push", ["e1"], 1.0) == {"e1"}


def test_a_conflict_keeps_the_rest_of_the_transaction(store: Store) -> None:
    """The fast path's failed insert rolls back to its savepoint, not the transaction."""
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        assert claim_inbox(conn, "ledger", ["e1", "e2"], 1.0) == {"e2"}
    assert _count(store, "ledger") == 2


def test_a_rolled_back_transaction_claims_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        raise RuntimeError("the effect failed")
    assert _count(store, "ledger") == 0
