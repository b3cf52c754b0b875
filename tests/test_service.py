"""EscrowService against the real SQL store (SQLite, and PostgreSQL with TEST_DATABASE_URL)."""

from __future__ import annotations

import random
import sqlite3
import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import func, select

from workbench.domain import events as ev
from workbench.domain.clock import ManualClock
from workbench.domain.escrow import (
    ADMIN,
    DomainError,
    EscrowState,
    IllegalTransition,
    InvalidCommand,
    NotAllowed,
    RecordPaymentResult,
    Timeouts,
    fee_for,
)
from workbench.domain.ids import IdFactory
from workbench.handlers.ledger import LedgerHandler, balances, check_ledger
from workbench.payments.mpesa import (
    RESULT_CANCELLED_BY_USER,
    RESULT_OK,
    GatewayBehaviour,
    GatewayUnavailable,
    QueryResult,
    SimulatedGateway,
    parse_callback,
    stk_callback,
    token_of,
)
from workbench.service import (
    EscrowNotFound,
    EscrowService,
    IdempotencyKeyReused,
    PaymentInProgress,
    PaymentSettings,
    UnknownCheckout,
)
from workbench.store import Store, checkouts, commands, escrows, ledger_entries, outbox
from workbench.streams.partitions import Partitioning

S = EscrowState
TIMEOUTS = Timeouts()


class FixedGateway:
    """A stand-in for Daraja's STK push: predictable checkout ids, no callbacks."""

    def __init__(self) -> None:
        self.pushes: list[tuple[str, str, int, str]] = []

    def stk_push(
        self,
        escrow_id: str,
        amount: int,
        phone: str,
        *,
        reference: str = "",
        callback_url: str = "",
    ) -> str:
        checkout = f"co-{escrow_id}-{len(self.pushes) + 1}"
        self.pushes.append((checkout, escrow_id, amount, phone))
        return checkout


@pytest.fixture
def gateway() -> FixedGateway:
    return FixedGateway()


@pytest.fixture
def service(
    store: Store, clock: ManualClock, ids: IdFactory, gateway: FixedGateway
) -> EscrowService:
    return EscrowService(store, clock=clock, ids=ids, gateway=gateway)


# -- helpers --------------------------------------------------------------------


def outbox_events(store: Store) -> list[ev.Event]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.data).order_by(outbox.c.seq)).scalars().all()
    return [ev.decode(bytes(data)) for data in rows]


def count(store: Store, table) -> int:  # type: ignore[no-untyped-def]
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the tables a command may touch, in a stable order."""
    out = {}
    with store.engine.connect() as conn:
        for table in (escrows, outbox, commands, checkouts, ledger_entries):
            key = list(table.primary_key.columns)
            rows = conn.execute(select(table).order_by(*key)).all()
            out[table.name] = [
                tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in rows
            ]
    return out


def ok_callback(checkout: str, amount: int, receipt: str = "RCPT") -> RecordPaymentResult:
    return parse_callback(stk_callback(checkout, RESULT_OK, amount=amount, receipt=receipt))


def fail_callback(checkout: str) -> RecordPaymentResult:
    return parse_callback(stk_callback(checkout, RESULT_CANCELLED_BY_USER))


def run_ledger(store: Store, clock: ManualClock) -> None:
    LedgerHandler(store, clock).handle(outbox_events(store))


def funded_escrow(
    service: EscrowService,
    escrow_id: str = "e1",
    amount: int = 1000,
    buyer: str = "b1",
    seller: str = "s1",
) -> str:
    service.create(buyer, seller, amount, escrow_id=escrow_id)
    checkout = service.fund(escrow_id, buyer).escrow["checkout_request_id"]
    service.record_payment_result(ok_callback(checkout, amount, receipt=f"R-{escrow_id}"))
    return checkout


# -- basics ---------------------------------------------------------------------


def test_lifecycle_stores_state_and_outbox(
    service: EscrowService, store: Store, gateway: FixedGateway
) -> None:
    created = service.create("b1", "s1", 1000, "phone", escrow_id="e1")
    assert created.event_types == ["escrow.created"]
    assert created.replayed is False
    assert created.escrow["state"] == "created"
    funding = service.fund("e1", "b1", "254700000001")
    assert funding.event_types == ["payment.requested"]
    assert gateway.pushes == [("co-e1-1", "e1", 1000, "254700000001")]
    assert service.get("e1").checkout_request_id == "co-e1-1"
    paid = service.record_payment_result(ok_callback("co-e1-1", 1000, "RC1"))
    assert paid.event_types == ["payment.received", "escrow.funded"]
    assert service.ship("e1", "s1").event_types == ["escrow.shipped"]
    done = service.confirm("e1", "b1")
    assert done.event_types == ["escrow.confirmed", "escrow.released", "payout.sent"]
    escrow = service.get("e1")
    assert escrow.state is S.RELEASED
    assert escrow.version == 8
    assert escrow.mpesa_receipt == "RC1"
    logged = outbox_events(store)
    assert [e.sequence for e in logged] == list(range(1, 9))
    assert [e.type for e in logged] == [
        "escrow.created",
        "payment.requested",
        "payment.received",
        "escrow.funded",
        "escrow.shipped",
        "escrow.confirmed",
        "escrow.released",
        "payout.sent",
    ]
    with store.engine.connect() as conn:
        streams = conn.execute(select(outbox.c.stream).order_by(outbox.c.seq)).scalars().all()
    assert streams == [e.aggregate_type for e in logged]
    assert [e.id for e in service.escrows_of("b1")] == ["e1"]
    assert [e.id for e in service.escrows_of("s1")] == ["e1"]
    assert service.escrows_of("nobody") == []


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)  # SQLite's write lock
def test_queries_go_on_while_another_process_holds_the_write_lock(
    service: EscrowService, store: Store
) -> None:
    """A writer elsewhere (a relay, a consumer, another API process) in a transaction
    that has not committed: GET-style queries answer from the last commit at once;
    they do not queue behind it (SQLite: BEGIN IMMEDIATE for reads did)."""
    funded_escrow(service)
    writer = sqlite3.connect(store.engine.url.database or "", isolation_level=None)
    answers: list[object] = []

    def query() -> None:
        answers.append(
            (service.get("e1").state, [e.id for e in service.escrows_of("b1")], balances(store))
        )

    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE escrows SET state = 'released' WHERE id = 'e1'")
        thread = threading.Thread(target=query, daemon=True)
        thread.start()
        thread.join(timeout=10)  # the busy timeout is 60 s
        assert not thread.is_alive(), "a query waited for the write lock"
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert answers == [(S.FUNDED, ["e1"], {})]


def test_outbox_rows_carry_their_escrows_partition(
    store: Store, clock: ManualClock, ids: IdFactory
) -> None:
    partitioning = Partitioning(4)
    service = EscrowService(store, clock=clock, ids=ids, partitioning=partitioning)
    unpartitioned = EscrowService(store, clock=clock, ids=ids)
    escrow_ids = [f"p-{n}" for n in range(12)]
    for escrow_id in escrow_ids:
        service.create("b1", "s1", 1000, escrow_id=escrow_id)
        service.cancel(escrow_id, "b1")
    unpartitioned.create("b1", "s1", 1000, escrow_id="plain")
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.data, outbox.c.partition)).all()
    by_escrow: dict[str, set[int]] = {}
    for data, partition in rows:
        by_escrow.setdefault(ev.decode(bytes(data)).escrow_id, set()).add(partition)
    assert by_escrow.pop("plain") == {0}  # no partitioning: partition 0
    assert by_escrow == {e: {partitioning.of(e)} for e in escrow_ids}
    assert len(set().union(*by_escrow.values())) > 1  # several partitions, so the check bites


def test_get_unknown_escrow_raises(service: EscrowService) -> None:
    with pytest.raises(EscrowNotFound, match="no escrow 'nope'"):
        service.get("nope")


@pytest.mark.parametrize(
    "command",
    [
        lambda s, e: s.get(e),
        lambda s, e: s.ship(e, "s1"),
        lambda s, e: s.cancel(e, "b1", "why"),
        lambda s, e: s.expire(e),
    ],
    ids=["get", "ship", "cancel", "expire"],
)
def test_an_escrow_id_with_a_nul_is_not_found_and_changes_nothing(
    service: EscrowService, store: Store, command: Any
) -> None:
    # PostgreSQL's text cannot hold NUL: asked as it is, the driver would raise.
    service.create("b1", "s1", 100, escrow_id="e1")
    before = snapshot(store)
    with pytest.raises(EscrowNotFound, match="no escrow"):
        command(service, "e1\x00")
    assert snapshot(store) == before


def test_fund_without_gateway_raises(store: Store, clock: ManualClock) -> None:
    bare = EscrowService(store, clock=clock, ids=IdFactory(1))
    bare.create("b1", "s1", 100, escrow_id="e1")
    with pytest.raises(RuntimeError, match="no payment gateway"):
        bare.fund("e1", "b1")


# -- idempotency ----------------------------------------------------------------


def test_same_key_same_create_is_replayed(service: EscrowService, store: Store) -> None:
    first = service.create("b1", "s1", 1000, "phone", escrow_id="e1", idempotency_key="k1")
    before = snapshot(store)
    second = service.create("b1", "s1", 1000, "phone", escrow_id="e1", idempotency_key="k1")
    assert (first.replayed, second.replayed) == (False, True)
    assert second.escrow == first.escrow
    assert [e.event_id for e in second.events] == [e.event_id for e in first.events]
    assert second.events == first.events
    assert snapshot(store) == before
    assert count(store, outbox) == 1
    assert count(store, commands) == 1


def test_retry_of_create_with_generated_id_returns_the_same_escrow(
    service: EscrowService, store: Store
) -> None:
    first = service.create("b1", "s1", 500, idempotency_key="create-1")
    second = service.create("b1", "s1", 500, idempotency_key="create-1")
    assert second.replayed is True
    assert second.escrow["id"] == first.escrow["id"]
    assert count(store, escrows) == 1
    assert count(store, outbox) == 1


def test_same_key_replays_later_commands(
    service: EscrowService, store: Store, gateway: FixedGateway
) -> None:
    service.create("b1", "s1", 1000, escrow_id="e1")
    funding = service.fund("e1", "b1", idempotency_key="fund-1")
    again = service.fund("e1", "b1", idempotency_key="fund-1")
    assert again.replayed is True
    assert again.escrow == funding.escrow
    assert len(gateway.pushes) == 1  # the retry did not push to the phone again
    service.record_payment_result(ok_callback("co-e1-1", 1000))
    shipped = service.ship("e1", "s1", "T1", idempotency_key="ship-1")
    before = snapshot(store)
    replay = service.ship("e1", "s1", "T1", idempotency_key="ship-1")
    assert replay.replayed is True
    assert replay.event_types == ["escrow.shipped"]
    assert [e.event_id for e in replay.events] == [e.event_id for e in shipped.events]
    assert snapshot(store) == before
    # Without the key, shipping again is an illegal transition.
    with pytest.raises(IllegalTransition):
        service.ship("e1", "s1", "T1")


def test_same_key_different_command_is_rejected(service: EscrowService, store: Store) -> None:
    service.create("b1", "s1", 1000, escrow_id="e1", idempotency_key="k1")
    before = snapshot(store)
    with pytest.raises(IdempotencyKeyReused, match="'k1' was used for a different create command"):
        service.cancel("e1", "b1", idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused):
        service.create("b1", "s1", 2000, escrow_id="e1", idempotency_key="k1")
    with pytest.raises(IdempotencyKeyReused):
        service.create("b1", "s1", 1000, escrow_id="e2", idempotency_key="k1")
    assert snapshot(store) == before
    assert service.get("e1").state is S.CREATED


def test_same_key_same_command_on_another_escrow_is_rejected(service: EscrowService) -> None:
    service.create("b1", "s1", 1000, escrow_id="e1")
    service.create("b1", "s1", 1000, escrow_id="e2")
    service.cancel("e1", "b1", idempotency_key="c")
    with pytest.raises(IdempotencyKeyReused):
        service.cancel("e2", "b1", idempotency_key="c")
    assert service.get("e2").state is S.CREATED


def test_rejected_command_does_not_burn_its_key(service: EscrowService) -> None:
    service.create("b1", "s1", 1000, escrow_id="e1")
    with pytest.raises(IllegalTransition):
        service.ship("e1", "s1", idempotency_key="ship")
    funded_checkout = service.fund("e1", "b1").escrow["checkout_request_id"]
    service.record_payment_result(ok_callback(funded_checkout, 1000))
    result = service.ship("e1", "s1", idempotency_key="ship")
    assert result.replayed is False
    assert result.event_types == ["escrow.shipped"]


# -- rejected commands change nothing ---------------------------------------------

REJECTED = {
    "confirm-funded": (lambda s: s.confirm("e1", "b1", idempotency_key="bad"), IllegalTransition),
    "fund-funded": (lambda s: s.fund("e1", "b1", idempotency_key="bad"), IllegalTransition),
    "resolve-funded": (
        lambda s: s.resolve("e1", ADMIN, "refund", idempotency_key="bad"),
        IllegalTransition,
    ),
    "ship-by-buyer": (lambda s: s.ship("e1", "b1", idempotency_key="bad"), NotAllowed),
    "fund-by-seller": (lambda s: s.fund("e1", "s1", idempotency_key="bad"), NotAllowed),
    "cancel-by-stranger": (lambda s: s.cancel("e1", "x", idempotency_key="bad"), NotAllowed),
    "resolve-bad-outcome": (
        lambda s: s.resolve("e1", ADMIN, "split", idempotency_key="bad"),
        InvalidCommand,
    ),
    "create-existing": (
        lambda s: s.create("b1", "s1", 1000, escrow_id="e1", idempotency_key="bad"),
        DomainError,
    ),
    "ship-unknown": (lambda s: s.ship("nope", "s1", idempotency_key="bad"), EscrowNotFound),
    "expire-unknown": (lambda s: s.expire("nope"), EscrowNotFound),
    "callback-unknown": (
        lambda s: s.record_payment_result(ok_callback("co-x", 1000)),
        UnknownCheckout,
    ),
    "callback-wrong-amount": (
        lambda s: s.record_payment_result(ok_callback("co-e2-2", 999)),
        InvalidCommand,
    ),
}


@pytest.mark.parametrize(("action", "error"), REJECTED.values(), ids=REJECTED.keys())
def test_rejected_command_leaves_every_table_unchanged(
    service: EscrowService, store: Store, gateway: FixedGateway, action, error
) -> None:  # type: ignore[no-untyped-def]
    funded_escrow(service, "e1", 1000)
    service.create("b2", "s2", 1000, escrow_id="e2")
    service.fund("e2", "b2")  # awaiting payment on co-e2-2
    before = snapshot(store)
    pushes = list(gateway.pushes)
    with pytest.raises(error):
        action(service)
    assert snapshot(store) == before
    assert gateway.pushes == pushes  # an illegal fund never reaches M-Pesa
    # The rejected key was not stored: it is free for a legal command.
    assert service.cancel("e2", "b2", idempotency_key="bad").event_types == ["escrow.cancelled"]


@pytest.mark.parametrize(
    ("amount", "buyer", "seller"),
    [
        (0, "b1", "s1"),
        (250_001, "b1", "s1"),
        (True, "b1", "s1"),
        (100, "b1", "b1"),
        (100, "", "s1"),
    ],
    ids=["zero", "too-much", "bool", "same-party", "no-buyer"],
)
def test_malformed_create_stores_nothing(
    service: EscrowService, store: Store, amount: Any, buyer: str, seller: str
) -> None:
    before = snapshot(store)
    with pytest.raises(InvalidCommand):
        service.create(buyer, seller, amount, escrow_id="e1", idempotency_key="k")
    assert snapshot(store) == before
    assert count(store, escrows) == 0
    assert count(store, commands) == 0


# -- M-Pesa callbacks -------------------------------------------------------------


def test_unknown_checkout_raises(service: EscrowService, store: Store) -> None:
    funded_escrow(service)
    before = snapshot(store)
    with pytest.raises(UnknownCheckout, match="no checkout request 'ws_CO_unknown'") as info:
        service.record_payment_result(ok_callback("ws_CO_unknown", 1000))
    assert info.value.code == "unknown_checkout"
    assert snapshot(store) == before


def test_first_result_per_checkout_is_final(service: EscrowService, store: Store) -> None:
    service.create("b1", "s1", 700, escrow_id="e1")
    service.fund("e1", "b1")
    first = service.record_payment_result(fail_callback("co-e1-1"))
    assert first.event_types == ["payment.failed"]
    before = snapshot(store)
    second = service.record_payment_result(ok_callback("co-e1-1", 700))
    assert second.replayed is True
    assert second.events == []
    assert snapshot(store) == before
    assert service.get("e1").state is S.CREATED
    with store.engine.connect() as conn:
        row = conn.execute(select(checkouts)).one()
    assert (row.checkout_request_id, row.escrow_id, row.result_code) == ("co-e1-1", "e1", 1032)


def test_wrong_amount_callback_does_not_settle_the_checkout(service: EscrowService) -> None:
    service.create("b1", "s1", 700, escrow_id="e1")
    service.fund("e1", "b1")
    with pytest.raises(InvalidCommand, match="callback amount 70 does not match"):
        service.record_payment_result(ok_callback("co-e1-1", 70))
    result = service.record_payment_result(ok_callback("co-e1-1", 700))
    assert result.replayed is False
    assert result.event_types == ["payment.received", "escrow.funded"]


def test_duplicate_late_and_shuffled_callbacks_fund_each_escrow_once(
    service: EscrowService, store: Store, clock: ManualClock
) -> None:
    amounts = {f"e{i}": 1000 * (i + 1) + i for i in range(6)}
    buyer = {e: f"b-{e}" for e in amounts}
    seller = {e: f"s-{e}" for e in amounts}
    # e5 is created first so that it alone is past its payment deadline later.
    service.create(buyer["e5"], seller["e5"], amounts["e5"], escrow_id="e5")
    service.fund("e5", buyer["e5"])
    clock.advance(10 * 60)
    for e in ["e0", "e1", "e2", "e3", "e4"]:
        service.create(buyer[e], seller[e], amounts[e], escrow_id=e)
        service.fund(e, buyer[e])
    checkout = {e: service.get(e).checkout_request_id for e in amounts}
    assert len(set(checkout.values())) == 6

    service.cancel("e4", buyer["e4"], "changed my mind")  # the buyer pays anyway, later
    clock.advance(6 * 60)
    assert service.expire_due() == 1  # only e5: created 16 minutes ago
    assert service.get("e5").state is S.EXPIRED

    callbacks = [
        fail_callback(checkout[e]) if e == "e3" else ok_callback(checkout[e], amounts[e], f"R{e}")
        for e in amounts
    ] * 2
    random.Random(1234).shuffle(callbacks)
    replayed = Counter()
    for callback in callbacks:
        clock.advance(1)
        replayed[service.record_payment_result(callback).replayed] += 1
    assert replayed == {False: 6, True: 6}

    # e3's payment failed: fund again; its old failure arrives once more, late.
    service.fund("e3", buyer["e3"])
    retry = service.get("e3").checkout_request_id
    assert retry != checkout["e3"]
    for callback in [ok_callback(retry, amounts["e3"], "Re3b"), fail_callback(checkout["e3"])] * 2:
        service.record_payment_result(callback)

    states = {e: service.get(e).state for e in amounts}
    assert states == {
        "e0": S.FUNDED,
        "e1": S.FUNDED,
        "e2": S.FUNDED,
        "e3": S.FUNDED,
        "e4": S.CANCELLED,
        "e5": S.EXPIRED,
    }
    assert service.get("e3").mpesa_receipt == "Re3b"
    logged = outbox_events(store)
    funded = Counter(e.aggregate_id for e in logged if e.type == "escrow.funded")
    assert funded == {"e0": 1, "e1": 1, "e2": 1, "e3": 1}
    received = Counter(e.aggregate_id for e in logged if e.type == "payment.received")
    assert received == {e: 1 for e in amounts}
    refunded = Counter(e.aggregate_id for e in logged if e.type == "payment.refunded")
    assert refunded == {"e4": 1, "e5": 1}
    assert Counter(e.aggregate_id for e in logged if e.type == "payment.failed") == {"e3": 1}

    run_ledger(store, clock)
    check = check_ledger(store)
    assert check.ok, check
    assert check.funded == sum(amounts.values())
    assert check.held == sum(amounts[e] for e in ["e0", "e1", "e2", "e3"])
    assert check.refunded == amounts["e4"] + amounts["e5"]
    assert check.released == 0
    money = balances(store)
    for e in ["e0", "e1", "e2", "e3"]:
        assert money[f"buyer:{buyer[e]}"] == -amounts[e]
        assert money[f"hold:{e}"] == amounts[e]
    for e in ["e4", "e5"]:
        assert money[f"buyer:{buyer[e]}"] == 0
        assert money[f"hold:{e}"] == 0

    # Settle two of them and post again: the events seen before are not posted twice.
    service.ship("e0", seller["e0"])
    service.confirm("e0", buyer["e0"])
    service.dispute("e1", seller["e1"], "buyer unreachable")
    service.resolve("e1", ADMIN, "refund")
    run_ledger(store, clock)
    check = check_ledger(store)
    assert check.ok, check
    money = balances(store)
    fee = fee_for(amounts["e0"])
    assert money["hold:e0"] == 0
    assert money[f"seller:{seller['e0']}"] == amounts["e0"] - fee
    assert money["fees"] == fee
    assert money["hold:e1"] == 0
    assert money[f"buyer:{buyer['e1']}"] == 0
    assert check.released == amounts["e0"]
    assert check.held == amounts["e2"] + amounts["e3"]


def test_simulated_gateway_callbacks_settle_with_exact_balances(
    store: Store, clock: ManualClock, ids: IdFactory
) -> None:
    behaviour = GatewayBehaviour(failure_rate=0.3, duplicate_rate=0.5, late_rate=0.0)
    gateway = SimulatedGateway(clock, behaviour, seed=5)
    service = EscrowService(store, clock=clock, ids=ids, gateway=gateway)
    amounts = {f"g{i}": 100 + 17 * i for i in range(8)}
    for e, amount in amounts.items():
        service.create(f"b-{e}", f"s-{e}", amount, escrow_id=e)
        service.fund(e, f"b-{e}")
    delivered = 0
    while gateway.pending:
        clock.advance(5)
        for body in gateway.due():
            delivered += 1
            service.record_payment_result(parse_callback(body))
        for e in amounts:
            if service.get(e).state is S.CREATED:  # failed: ask again
                service.fund(e, f"b-{e}")
    assert delivered > len(gateway.requests)  # some duplicates were delivered
    assert all(service.get(e).state is S.FUNDED for e in amounts)
    logged = outbox_events(store)
    assert Counter(e.aggregate_id for e in logged if e.type == "escrow.funded") == {
        e: 1 for e in amounts
    }
    run_ledger(store, clock)
    check = check_ledger(store)
    assert check.ok, check
    assert check.held == sum(amounts.values())
    assert balances(store) == {
        **{f"buyer:b-{e}": -a for e, a in amounts.items()},
        **{f"hold:{e}": a for e, a in amounts.items()},
    }


# -- expiry -----------------------------------------------------------------------


def test_expire_due_follows_the_manual_clock(
    service: EscrowService, store: Store, clock: ManualClock
) -> None:
    start = clock.now()
    service.create("b1", "s1", 100, escrow_id="unpaid")
    service.create("b2", "s2", 200, escrow_id="waiting")
    service.fund("waiting", "b2")
    funded_escrow(service, "funded", 300, "b3", "s3")
    funded_escrow(service, "shipped", 400, "b4", "s4")
    service.ship("shipped", "s4")
    funded_escrow(service, "disputed", 500, "b5", "s5")
    service.dispute("disputed", "b5")

    def states() -> dict[str, str]:
        return {
            e.id: e.state.value
            for b in ["b1", "b2", "b3", "b4", "b5"]
            for e in service.escrows_of(b)
        }

    initial = states()
    assert service.expire_due() == 0
    clock.advance(TIMEOUTS.payment - 1)
    before = snapshot(store)
    assert service.expire_due() == 0
    assert snapshot(store) == before

    clock.set(start + TIMEOUTS.payment)  # exactly at the deadline
    assert service.expire_due() == 2
    assert states() == {**initial, "unpaid": "expired", "waiting": "expired"}
    assert service.expire_due() == 0  # nothing left due: idempotent

    clock.set(start + TIMEOUTS.confirmation - 1)
    assert service.expire_due() == 0
    clock.advance(1)
    assert service.expire_due() == 2  # escrow.released + payout.sent
    assert service.get("shipped").state is S.RELEASED

    clock.set(start + TIMEOUTS.shipping)
    assert service.expire_due() == 3  # escrow.expired + escrow.refunded + payout.refunded
    assert service.get("funded").state is S.REFUNDED

    clock.advance(365 * 24 * 3600)
    assert service.expire_due() == 0
    assert service.get("disputed").state is S.DISPUTED
    reasons = {
        e.aggregate_id: e.payload["reason"]
        for e in outbox_events(store)
        if e.type in ("escrow.expired", "escrow.released")
    }
    assert reasons == {
        "unpaid": "not paid in time",
        "waiting": "not paid in time",
        "shipped": "auto-release: not confirmed in time",
        "funded": "not shipped in time",
    }


def test_expire_due_respects_limit(service: EscrowService, clock: ManualClock) -> None:
    for i in range(5):
        service.create("b1", "s1", 100, escrow_id=f"e{i}")
    clock.advance(TIMEOUTS.payment)
    assert service.expire_due(limit=2) == 2
    assert service.expire_due(limit=10) == 3
    assert service.expire_due() == 0


def test_expire_before_deadline_emits_nothing(service: EscrowService, store: Store) -> None:
    service.create("b1", "s1", 100, escrow_id="e1")
    before = snapshot(store)
    result = service.expire("e1")
    assert result.events == []
    assert result.escrow["state"] == "created"
    assert snapshot(store) == before


def test_custom_timeouts_drive_deadlines(store: Store, clock: ManualClock, ids: IdFactory) -> None:
    service = EscrowService(store, clock=clock, ids=ids, timeouts=Timeouts(payment=10))
    service.create("b1", "s1", 100, escrow_id="e1")
    assert service.get("e1").deadline == clock.now() + 10
    clock.advance(10)
    assert service.expire_due() == 1


# -- the ledger handler -----------------------------------------------------------


def _settled_mix(service: EscrowService) -> None:
    funded_escrow(service, "r1", 1000, "b1", "s1")
    service.ship("r1", "s1")
    service.confirm("r1", "b1")
    funded_escrow(service, "r2", 2000, "b2", "s2")
    service.cancel("r2", "s2")
    funded_escrow(service, "h3", 3000, "b3", "s3")


def _expected_balances() -> dict[str, int]:
    return {
        "buyer:b1": -1000,
        "hold:r1": 0,
        "seller:s1": 1000 - fee_for(1000),
        "fees": fee_for(1000),
        "buyer:b2": 0,
        "hold:r2": 0,
        "buyer:b3": -3000,
        "hold:h3": 3000,
    }


def test_ledger_handler_posts_each_event_once(
    service: EscrowService, store: Store, clock: ManualClock
) -> None:
    _settled_mix(service)
    events = outbox_events(store)
    LedgerHandler(store, clock).handle(events)
    entries = count(store, ledger_entries)
    assert entries == 3 * 2 + 3 + 2  # payment.received x3, escrow.released, escrow.refunded
    assert balances(store) == _expected_balances()
    before = snapshot(store)
    LedgerHandler(store, clock).handle(events)  # redelivered, e.g. after a restart
    LedgerHandler(store, clock).handle(list(reversed(events[3:])))
    assert snapshot(store) == before
    check = check_ledger(store)
    assert check.ok, check
    assert (check.funded, check.held, check.released, check.refunded) == (6000, 3000, 1000, 2000)
    assert check.fees == fee_for(1000)


def test_ledger_handler_dedupes_within_a_batch(
    service: EscrowService, store: Store, clock: ManualClock
) -> None:
    _settled_mix(service)
    events = outbox_events(store)
    LedgerHandler(store, clock).handle(events + events[::-1] + events[:4])
    assert balances(store) == _expected_balances()
    check = check_ledger(store)
    assert check.ok, check
    assert check.duplicate_postings == 0
    assert check.posted_events == check.expected_events == 5


def test_ledger_check_notices_missing_postings(
    service: EscrowService, store: Store, clock: ManualClock
) -> None:
    _settled_mix(service)
    events = outbox_events(store)
    LedgerHandler(store, clock).handle([e for e in events if e.type != "escrow.refunded"])
    check = check_ledger(store)
    assert not check.ok
    assert check.conserved  # the unposted refund still looks held...
    assert check.held == 5000
    assert not check.matches_outbox  # ...but one money event in the outbox is not posted
    assert (check.posted_events, check.expected_events) == (4, 5)
    LedgerHandler(store, clock).handle(events)
    assert check_ledger(store).ok


# -- payments that can't be forged ------------------------------------------------------


class CrashAfterCommit(BaseException):
    """The process dies between the commit of a payment request and its push."""


class SimGateway(SimulatedGateway):
    """The project's simulated gateway, with switches for one test's faults."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(
            clock, GatewayBehaviour(failure_rate=0, duplicate_rate=0, late_rate=0), seed=3
        )
        self.down = False
        self.crash_next_push = False
        self.crash_after_next_push = False
        self.during_push: Any = None

    def stk_push(self, *args: Any, **kwargs: Any) -> str:
        if self.crash_next_push:
            self.crash_next_push = False
            raise CrashAfterCommit
        if self.crash_after_next_push:  # the gateway took it; its answer is lost with us
            self.crash_after_next_push = False
            super().stk_push(*args, **kwargs)
            raise CrashAfterCommit
        if self.during_push is not None:
            self.during_push()
        return super().stk_push(*args, **kwargs)

    def query(self, checkout_request_id: str) -> QueryResult:
        if self.down:
            raise GatewayUnavailable("test: gateway down")
        return super().query(checkout_request_id)


PAY = PaymentSettings(callback_secret="test-callback-secret", verify_after_s=60, retry_s=5)


@pytest.fixture
def paying(store: Store, clock: ManualClock, ids: IdFactory) -> tuple[EscrowService, SimGateway]:
    gateway = SimGateway(clock)
    return EscrowService(store, clock=clock, ids=ids, gateway=gateway, payments=PAY), gateway


def _state_of(store: Store, escrow_id: str) -> dict[str, Any]:
    """Everything about one escrow: its row, its events, its checkouts and its ledger."""
    events = [e.event_id for e in outbox_events(store) if e.aggregate_id == escrow_id]
    with store.engine.connect() as conn:
        return {
            "escrow": conn.execute(select(escrows).where(escrows.c.id == escrow_id)).all(),
            "events": events,
            "checkouts": conn.execute(
                select(checkouts.c.checkout_request_id, checkouts.c.result_code).where(
                    checkouts.c.escrow_id == escrow_id
                )
            ).all(),
            "ledger": conn.execute(
                select(ledger_entries).where(ledger_entries.c.escrow_id == escrow_id)
            ).all(),
        }


def _delivery(gateway: SimGateway, clock: ManualClock) -> tuple[str, dict[str, Any]]:
    clock.advance(gateway.behaviour.delay_max + 1)
    (delivery,) = gateway.due_deliveries()
    return token_of(delivery.url), delivery.body


def test_a_forged_failure_before_the_result_changes_nothing_and_never_shadows_it(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    checkout = service.fund("e1", "b1", "254700000001").escrow["checkout_request_id"]
    (push,) = gateway._queue  # the genuine callback, not yet due
    token = token_of(push.url)  # a forger who somehow has the genuine URL
    before = _state_of(store, "e1")
    forged = service.handle_callback(token, stk_callback(checkout, RESULT_CANCELLED_BY_USER))
    assert (forged.status, forged.outcome) == (202, "unverified")  # the query says: pending
    run_ledger(store, clock)
    assert _state_of(store, "e1") == before
    # The genuine success still applies, with its receipt.
    applied = service.handle_callback(*_delivery(gateway, clock))
    assert (applied.status, applied.outcome) == (200, "applied")
    assert service.get("e1").state is S.FUNDED
    assert service.get("e1").mpesa_receipt is not None


def test_a_forged_success_is_not_recorded_and_the_genuine_failure_is(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    gateway.behaviour = GatewayBehaviour(failure_rate=1.0, duplicate_rate=0, late_rate=0)
    service.create("b1", "s1", 1000, escrow_id="e1")
    checkout = service.fund("e1", "b1", "254700000001").escrow["checkout_request_id"]
    token = token_of(gateway._queue[0].url)
    before = _state_of(store, "e1")
    body = stk_callback(checkout, RESULT_OK, amount=1000, receipt="FORGED", phone="254700000001")
    assert service.handle_callback(token, body).outcome == "unverified"
    assert _state_of(store, "e1") == before
    assert service.handle_callback(*_delivery(gateway, clock)).outcome == "applied"
    escrow = service.get("e1")
    assert escrow.state is S.CREATED and escrow.mpesa_receipt is None
    assert [e.type for e in outbox_events(store)][-1] == "payment.failed"


def test_a_success_claimed_after_the_gateway_said_failure_is_contradicted(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    gateway.behaviour = GatewayBehaviour(failure_rate=1.0, duplicate_rate=0, late_rate=0)
    service.create("b1", "s1", 1000, escrow_id="e1")
    checkout = service.fund("e1", "b1", "254700000001").escrow["checkout_request_id"]
    token = token_of(gateway._queue[0].url)
    clock.advance(gateway.behaviour.delay_max + 1)  # the buyer has cancelled by now
    body = stk_callback(checkout, RESULT_OK, amount=1000, receipt="FORGED", phone="254700000001")
    outcome = service.handle_callback(token, body)
    assert (outcome.status, outcome.outcome) == (409, "contradicted")
    escrow = service.get("e1")
    assert escrow.state is S.CREATED and escrow.mpesa_receipt is None
    assert service.payment_stats.verifications["contradicted"] == 1


@pytest.mark.parametrize(
    ("amount", "phone", "reason"),
    [(999, "254700000001", "amount_mismatch"), (1000, "254799999999", "phone_mismatch")],
)
def test_a_callback_that_differs_from_the_request_is_refused(
    paying: tuple[EscrowService, SimGateway],
    store: Store,
    clock: ManualClock,
    amount: int,
    phone: str,
    reason: str,
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    checkout = service.fund("e1", "b1", "254700000001").escrow["checkout_request_id"]
    token, genuine = _delivery(gateway, clock)  # the result is decided: the query would say OK
    before = _state_of(store, "e1")
    body = stk_callback(checkout, RESULT_OK, amount=amount, receipt="R", phone=phone)
    refused = service.handle_callback(token, body)
    assert (refused.status, refused.outcome) == (400, f"rejected_{reason}")
    assert _state_of(store, "e1") == before
    assert gateway.queries == 0  # refused before asking anyone
    assert service.handle_callback(token, genuine).outcome == "applied"


def _victim_funded_and_own_created(service: EscrowService) -> str:
    """The victim's escrow (b1) funded, a forger's own (m1) created at the same
    amount; the victim's checkout id."""
    service.create("b1", "s1", 1000, escrow_id="victim")
    service.create("m1", "s9", 1000, escrow_id="own")
    return service.fund("victim", "b1", "254700000001").escrow["checkout_request_id"]  # type: ignore[no-any-return]


def test_a_token_for_another_payment_is_refused(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    victim = _victim_funded_and_own_created(service)
    service.fund("own", "m1", "254700000009")
    own_token = token_of(gateway._queue[1].url)
    clock.advance(gateway.behaviour.delay_max + 1)  # the victim's payment has succeeded
    before = _state_of(store, "victim")
    body = stk_callback(victim, RESULT_CANCELLED_BY_USER)
    outcome = service.handle_callback(own_token, body)
    assert (outcome.status, outcome.outcome) == (403, "rejected_checkout_mismatch")
    bad = service.handle_callback(own_token[:-2] + "xx", body)
    assert (bad.status, bad.outcome) == (403, "rejected_bad_token")
    assert _state_of(store, "victim") == before


def test_a_checkout_of_another_payment_is_not_adopted_at_a_url_without_one(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    # A forger's own payment whose push answer was lost (no checkout recorded: its URL
    # would adopt the checkout a callback names) must not take the victim's checkout.
    service, gateway = paying
    victim = _victim_funded_and_own_created(service)
    gateway.crash_after_next_push = True
    with pytest.raises(CrashAfterCommit):
        service.fund("own", "m1", "254700000001")  # the victim's phone, the same amount
    pushes = {parse_callback(c.body).checkout_request_id: c for c in gateway._queue}
    victim_push = pushes.pop(victim)
    (own_push,) = pushes.values()
    own_token = token_of(own_push.url)
    clock.advance(gateway.behaviour.delay_max + 1)  # the victim's payment has succeeded
    before = {e: _state_of(store, e) for e in ("victim", "own")}
    body = stk_callback(victim, RESULT_OK, amount=1000, receipt="FORGED", phone="254700000001")
    outcome = service.handle_callback(own_token, body)
    assert (outcome.status, outcome.outcome) == (403, "rejected_checkout_mismatch")
    assert {e: _state_of(store, e) for e in ("victim", "own")} == before
    genuine = service.handle_callback(token_of(victim_push.url), victim_push.body)
    assert (genuine.status, genuine.outcome) == (200, "applied")
    escrow = service.get("victim")
    assert escrow.state is S.FUNDED and escrow.mpesa_receipt != "FORGED"
    assert service.get("own").state is S.CREATED


def test_an_unanswered_query_changes_nothing_until_the_gateway_answers(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    service.fund("e1", "b1", "254700000001")
    gateway.down = True
    token, body = _delivery(gateway, clock)
    before = _state_of(store, "e1")
    assert service.handle_callback(token, body).outcome == "unverified"
    clock.advance(PAY.retry_s + 1)
    assert service.verify_payments() == {"unavailable": 1}
    assert _state_of(store, "e1") == before
    gateway.down = False
    assert service.verify_payments() == {}  # not due yet: the retry backs off (10 s now)
    clock.advance(2 * PAY.retry_s + 1)
    assert service.verify_payments() == {"applied": 1}
    escrow = service.get("e1")
    assert escrow.state is S.FUNDED and escrow.mpesa_receipt is not None  # the claim's receipt


def test_a_result_whose_callback_never_came_is_found_by_the_verification_pass(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    service.fund("e1", "b1", "254700000001")
    gateway._queue.clear()  # the callback is lost
    clock.advance(PAY.verify_after_s - 1)
    assert service.verify_payments() == {}
    clock.advance(2)
    assert service.verify_payments() == {"applied": 1}
    assert service.get("e1").state is S.FUNDED


def test_the_push_runs_outside_any_transaction(
    paying: tuple[EscrowService, SimGateway], store: Store
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    seen: list[str] = []

    def cancel_meanwhile() -> None:
        # Another thread cancels the same escrow while its push is in flight: were
        # the escrow row locked (PostgreSQL) or the database (SQLite), this would wait.
        def cancel() -> None:
            seen.append(service.cancel("e1", "b1", "changed my mind").escrow["state"])

        worker = threading.Thread(target=cancel)
        worker.start()
        worker.join(timeout=5)
        assert not worker.is_alive(), "the cancel waited for the push's transaction"

    gateway.during_push = cancel_meanwhile
    funded = service.fund("e1", "b1", "254700000001")
    assert seen == ["cancelled"]
    # The escrow moved on: no payment.requested, but the checkout is kept, so
    # money that arrives for it anyway is recorded and refunded.
    assert funded.events == []
    assert service.get("e1").state is S.CANCELLED
    assert count(store, checkouts) == 1


def test_a_crash_between_commit_and_push_is_recovered(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    gateway.crash_next_push = True
    with pytest.raises(CrashAfterCommit):
        service.fund("e1", "b1", "254700000001", idempotency_key="k1")
    assert service.get("e1").state is S.CREATED and len(gateway.requests) == 0
    # The buyer's retry while the owed push may still be on its way: refused, not doubled.
    with pytest.raises(PaymentInProgress):
        service.fund("e1", "b1", "254700000001", idempotency_key="k2")
    assert service.verify_payments() == {}  # not owed yet
    clock.advance(PAY.push_grace_s + 1)
    assert service.verify_payments() == {"push_sent": 1}
    assert len(gateway.requests) == 1
    escrow = service.get("e1")
    assert escrow.state is S.AWAITING_PAYMENT and escrow.checkout_request_id
    assert service.handle_callback(*_delivery(gateway, clock)).outcome == "applied"
    assert service.get("e1").state is S.FUNDED


def test_a_crash_after_the_gateway_took_the_push_is_recovered_by_its_callback(
    paying: tuple[EscrowService, SimGateway], store: Store, clock: ManualClock
) -> None:
    service, gateway = paying
    service.create("b1", "s1", 1000, escrow_id="e1")
    gateway.crash_after_next_push = True
    with pytest.raises(CrashAfterCommit):
        service.fund("e1", "b1", "254700000001")
    assert service.get("e1").state is S.CREATED and len(gateway.requests) == 1
    # The callback comes to the URL made for this payment: its checkout is adopted.
    assert service.handle_callback(*_delivery(gateway, clock)).outcome == "applied"
    escrow = service.get("e1")
    assert escrow.state is S.FUNDED and escrow.checkout_request_id in gateway.requests
    assert [e.type for e in outbox_events(store)][-3:] == [
        "payment.requested",
        "payment.received",
        "escrow.funded",
    ]
    clock.advance(PAY.push_grace_s + 1)
    assert "push_sent" not in service.verify_payments()  # not pushed a second time
    assert len(gateway.requests) == 1
