"""Unit tests of the pure escrow state machine (workbench.domain.escrow): no I/O at all."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import msgspec
import pytest

from workbench.domain.escrow import (
    ADMIN,
    MAX_AMOUNT,
    MIN_AMOUNT,
    MUTABLE_FIELDS,
    Cancel,
    Command,
    Confirm,
    CreateEscrow,
    DomainError,
    Escrow,
    EscrowState,
    Expire,
    IllegalTransition,
    InvalidCommand,
    NotAllowed,
    OpenDispute,
    RecordPaymentResult,
    RequestPayment,
    ResolveDispute,
    Ship,
    Timeouts,
    decide,
    evolve,
    fee_for,
    replay,
)
from workbench.domain.events import EVENT_TYPES, Event
from workbench.domain.ids import IdFactory

T0 = 1_700_000_000.0
BUYER, SELLER, STRANGER = "buyer-1", "seller-1", "stranger-9"
AMOUNT = 10_000  # fee at 150 bps: 150
FEE = 150
TIMEOUTS = Timeouts()
S = EscrowState


class Flow:
    """Drives one escrow through decide/evolve, remembering every event."""

    def __init__(self, escrow_id: str = "esc-1", amount: int = AMOUNT) -> None:
        self.ids = IdFactory(seed=1)
        self.now = T0
        self.escrow: Escrow | None = None
        self.events: list[Event] = []
        self.history: list[Escrow] = []
        self.do(CreateEscrow(escrow_id, BUYER, SELLER, amount, "a bicycle"))

    def do(self, command: Command, *, after: float = 0.0) -> list[Event]:
        self.now += after
        new = decide(self.escrow, command, now=self.now, ids=self.ids)
        for event in new:
            self.escrow = evolve(self.escrow, event)
        self.events.extend(new)
        assert self.escrow is not None
        self.history.append(self.escrow)
        return new

    @property
    def state(self) -> EscrowState:
        assert self.escrow is not None
        return self.escrow.state

    def decide_only(self, command: Command, *, at: float | None = None) -> list[Event]:
        return decide(self.escrow, command, now=self.now if at is None else at, ids=self.ids)


def types(events: list[Event]) -> list[str]:
    return [e.type for e in events]


def created() -> Flow:
    return Flow()


def awaiting() -> Flow:
    flow = Flow()
    flow.do(RequestPayment(BUYER, "co-1", "254700000001"))
    return flow


def funded() -> Flow:
    flow = awaiting()
    flow.do(RecordPaymentResult("co-1", 0, "ok", receipt="RCPT1", amount=AMOUNT), after=30)
    return flow


def shipped() -> Flow:
    flow = funded()
    flow.do(Ship(SELLER, "TRACK-1"), after=3600)
    return flow


def disputed() -> Flow:
    flow = shipped()
    flow.do(OpenDispute(BUYER, "arrived broken"), after=60)
    return flow


def released() -> Flow:
    flow = shipped()
    flow.do(Confirm(BUYER), after=60)
    return flow


def refunded() -> Flow:
    flow = disputed()
    flow.do(ResolveDispute(ADMIN, "refund"), after=60)
    return flow


def cancelled() -> Flow:
    flow = created()
    flow.do(Cancel(BUYER, "changed my mind"))
    return flow


def expired() -> Flow:
    flow = created()
    flow.do(Expire(), after=TIMEOUTS.payment)
    return flow


BUILDERS = {
    S.CREATED: created,
    S.AWAITING_PAYMENT: awaiting,
    S.FUNDED: funded,
    S.SHIPPED: shipped,
    S.DISPUTED: disputed,
    S.RELEASED: released,
    S.REFUNDED: refunded,
    S.CANCELLED: cancelled,
    S.EXPIRED: expired,
}


def test_builders_reach_their_states() -> None:
    for state, build in BUILDERS.items():
        assert build().state is state


# -- create ---------------------------------------------------------------------


def test_create_emits_escrow_created_with_fee_and_payment_deadline() -> None:
    flow = Flow()
    assert types(flow.events) == ["escrow.created"]
    event = flow.events[0]
    assert event.aggregate_type == "escrow"
    assert event.aggregate_id == "esc-1"
    assert event.sequence == 1
    assert event.user_ids == (BUYER, SELLER)
    assert event.occurred_at == T0
    assert event.payload == {
        "buyer_id": BUYER,
        "seller_id": SELLER,
        "amount": AMOUNT,
        "fee": FEE,
        "description": "a bicycle",
    }
    escrow = flow.escrow
    assert escrow == Escrow(
        id="esc-1",
        buyer_id=BUYER,
        seller_id=SELLER,
        amount=AMOUNT,
        fee=FEE,
        description="a bicycle",
        state=S.CREATED,
        version=1,
        created_at=T0,
        updated_at=T0,
        deadline=T0 + TIMEOUTS.payment,
    )


@pytest.mark.parametrize(
    ("amount", "fee"), [(1, 0), (66, 0), (67, 1), (100, 1), (10_000, 150), (250_000, 3750)]
)
def test_fee_is_150_basis_points_rounded_down(amount: int, fee: int) -> None:
    assert fee_for(amount) == fee


@pytest.mark.parametrize("amount", [MIN_AMOUNT, MAX_AMOUNT])
def test_create_accepts_amount_bounds(amount: int) -> None:
    events = decide(None, CreateEscrow("e", BUYER, SELLER, amount), now=T0, ids=IdFactory(1))
    assert events[0].payload["amount"] == amount


def test_correlation_and_causation_ids_are_carried_on_every_event() -> None:
    flow = shipped()
    events = decide(
        flow.escrow,
        Confirm(BUYER),
        now=flow.now,
        ids=IdFactory(2),
        correlation_id="cor-x",
        causation_id="evt-cause",
    )
    assert types(events) == ["escrow.confirmed", "escrow.released", "payout.sent"]
    assert {e.correlation_id for e in events} == {"cor-x"}
    assert {e.causation_id for e in events} == {"evt-cause"}
    assert len({e.event_id for e in events}) == 3


# -- the happy path ---------------------------------------------------------------


def test_full_lifecycle_create_fund_pay_ship_confirm_releases_with_payout() -> None:
    flow = Flow()
    assert types(flow.do(RequestPayment(BUYER, "co-1", "254700000001"))) == ["payment.requested"]
    assert flow.state is S.AWAITING_PAYMENT
    assert flow.escrow.checkout_request_id == "co-1"
    assert flow.events[-1].payload == {
        "checkout_request_id": "co-1",
        "amount": AMOUNT,
        "phone": "254700000001",
    }
    assert flow.events[-1].aggregate_type == "payment"

    paid = flow.do(RecordPaymentResult("co-1", 0, "ok", receipt="RCPT1", amount=AMOUNT), after=30)
    assert types(paid) == ["payment.received", "escrow.funded"]
    assert paid[0].payload == {"checkout_request_id": "co-1", "receipt": "RCPT1", "amount": AMOUNT}
    assert paid[1].payload == {"amount": AMOUNT}
    assert flow.state is S.FUNDED
    assert flow.escrow.mpesa_receipt == "RCPT1"
    assert flow.escrow.deadline == T0 + 30 + TIMEOUTS.shipping

    assert types(flow.do(Ship(SELLER, "TRACK-1"), after=100)) == ["escrow.shipped"]
    assert flow.state is S.SHIPPED
    assert flow.escrow.deadline == T0 + 130 + TIMEOUTS.confirmation

    done = flow.do(Confirm(BUYER), after=100)
    assert types(done) == ["escrow.confirmed", "escrow.released", "payout.sent"]
    assert done[1].payload == {
        "amount": AMOUNT,
        "fee": FEE,
        "seller_amount": AMOUNT - FEE,
        "reason": "confirmed",
    }
    assert done[2].payload == {"to": SELLER, "amount": AMOUNT - FEE}
    assert done[2].aggregate_type == "payout"
    assert flow.state is S.RELEASED
    assert flow.state.terminal
    assert flow.escrow.deadline is None
    assert flow.escrow.version == 8
    assert [e.sequence for e in flow.events] == list(range(1, 9))
    assert all(e.aggregate_type == EVENT_TYPES[e.type] for e in flow.events)


# -- disputes ---------------------------------------------------------------------


@pytest.mark.parametrize("build", [funded, shipped], ids=["funded", "shipped"])
@pytest.mark.parametrize("who", [BUYER, SELLER])
def test_dispute_from_funded_or_shipped_by_either_party(build, who: str) -> None:  # type: ignore[no-untyped-def]
    flow = build()
    events = flow.do(OpenDispute(who, "not as described"))
    assert types(events) == ["dispute.opened"]
    assert events[0].aggregate_type == "dispute"
    assert events[0].payload == {"opened_by": who, "reason": "not as described"}
    assert flow.state is S.DISPUTED
    assert flow.escrow.deadline is None
    assert flow.escrow.dispute_reason == "not as described"


def test_resolve_refund_returns_money_to_buyer() -> None:
    flow = disputed()
    events = flow.do(ResolveDispute(ADMIN, "refund", "seller admitted it"))
    assert types(events) == ["dispute.resolved", "escrow.refunded", "payout.refunded"]
    assert events[0].payload == {"outcome": "refund", "note": "seller admitted it"}
    assert events[1].payload == {"amount": AMOUNT, "reason": "dispute"}
    assert events[2].payload == {"to": BUYER, "amount": AMOUNT}
    assert flow.state is S.REFUNDED


def test_resolve_release_pays_the_seller_minus_fee() -> None:
    flow = disputed()
    events = flow.do(ResolveDispute(ADMIN, "release"))
    assert types(events) == ["dispute.resolved", "escrow.released", "payout.sent"]
    assert events[1].payload["reason"] == "dispute"
    assert events[2].payload == {"to": SELLER, "amount": AMOUNT - FEE}
    assert flow.state is S.RELEASED


# -- cancel -----------------------------------------------------------------------


@pytest.mark.parametrize("build", [created, awaiting], ids=["created", "awaiting_payment"])
@pytest.mark.parametrize("who", [BUYER, SELLER])
def test_cancel_before_funding_only_cancels(build, who: str) -> None:  # type: ignore[no-untyped-def]
    flow = build()
    events = flow.do(Cancel(who, "no longer needed"))
    assert types(events) == ["escrow.cancelled"]
    assert events[0].payload == {"cancelled_by": who, "reason": "no longer needed"}
    assert flow.state is S.CANCELLED
    assert flow.escrow.deadline is None


def test_cancel_after_funding_refunds_the_buyer() -> None:
    flow = funded()
    events = flow.do(Cancel(SELLER, "out of stock"))
    assert types(events) == ["escrow.cancelled", "escrow.refunded", "payout.refunded"]
    assert events[1].payload == {"amount": AMOUNT, "reason": "cancelled"}
    assert events[2].payload == {"to": BUYER, "amount": AMOUNT}
    # The last event applied is the refund, so the stored state is "refunded".
    assert flow.state is S.REFUNDED
    assert flow.state.terminal


# -- expiry -----------------------------------------------------------------------


@pytest.mark.parametrize("build", [created, awaiting], ids=["created", "awaiting_payment"])
def test_unpaid_escrow_expires_at_payment_deadline(build) -> None:  # type: ignore[no-untyped-def]
    flow = build()
    deadline = T0 + TIMEOUTS.payment
    assert flow.escrow.deadline == deadline
    assert flow.decide_only(Expire(), at=deadline - 0.001) == []
    events = flow.do(Expire(), after=deadline - flow.now)
    assert types(events) == ["escrow.expired"]
    assert events[0].payload == {"reason": "not paid in time"}
    assert flow.state is S.EXPIRED
    assert flow.escrow.deadline is None


def test_funded_not_shipped_expires_and_refunds() -> None:
    flow = funded()
    deadline = flow.now + TIMEOUTS.shipping
    assert flow.escrow.deadline == deadline
    assert flow.decide_only(Expire(), at=deadline - 1) == []
    events = flow.do(Expire(), after=TIMEOUTS.shipping)
    assert types(events) == ["escrow.expired", "escrow.refunded", "payout.refunded"]
    assert events[0].payload == {"reason": "not shipped in time"}
    assert events[1].payload == {"amount": AMOUNT, "reason": "not shipped in time"}
    assert events[2].payload == {"to": BUYER, "amount": AMOUNT}
    assert flow.state is S.REFUNDED


def test_shipped_not_confirmed_is_released_automatically() -> None:
    flow = shipped()
    deadline = flow.now + TIMEOUTS.confirmation
    assert flow.decide_only(Expire(), at=deadline - 1) == []
    events = flow.do(Expire(), after=TIMEOUTS.confirmation)
    assert types(events) == ["escrow.released", "payout.sent"]
    assert events[0].payload["reason"] == "auto-release: not confirmed in time"
    assert events[1].payload == {"to": SELLER, "amount": AMOUNT - FEE}
    assert flow.state is S.RELEASED


@pytest.mark.parametrize(
    "state", [S.DISPUTED, S.RELEASED, S.REFUNDED, S.CANCELLED, S.EXPIRED], ids=str
)
def test_expire_does_nothing_without_a_deadline(state: EscrowState) -> None:
    flow = BUILDERS[state]()
    assert flow.escrow.deadline is None
    assert flow.decide_only(Expire(), at=flow.now + 365 * 24 * 3600) == []


def test_failed_payment_keeps_the_payment_deadline() -> None:
    """A failed callback does not extend the payment deadline."""
    flow = awaiting()
    flow.do(RecordPaymentResult("co-1", 1032, "Request cancelled by user"), after=10)
    assert flow.escrow.deadline == T0 + TIMEOUTS.payment


# -- failed payments ----------------------------------------------------------------


def test_failed_callback_returns_to_created_and_can_be_funded_again() -> None:
    flow = awaiting()
    failed = flow.do(RecordPaymentResult("co-1", 1032, "Request cancelled by user"))
    assert types(failed) == ["payment.failed"]
    assert failed[0].payload == {
        "checkout_request_id": "co-1",
        "result_code": 1032,
        "result_desc": "Request cancelled by user",
    }
    assert flow.state is S.CREATED
    assert flow.escrow.checkout_request_id is None

    assert types(flow.do(RequestPayment(BUYER, "co-2"))) == ["payment.requested"]
    assert flow.escrow.checkout_request_id == "co-2"
    paid = flow.do(RecordPaymentResult("co-2", 0, receipt="RCPT2", amount=AMOUNT))
    assert types(paid) == ["payment.received", "escrow.funded"]
    assert flow.state is S.FUNDED
    assert flow.escrow.mpesa_receipt == "RCPT2"


def test_failed_callback_for_a_superseded_checkout_changes_nothing() -> None:
    flow = awaiting()
    flow.do(RecordPaymentResult("co-1", 1037))
    flow.do(RequestPayment(BUYER, "co-2"))
    assert flow.decide_only(RecordPaymentResult("co-1", 1037)) == []
    assert flow.decide_only(RecordPaymentResult("co-old", 1)) == []


# -- late and duplicate payments ----------------------------------------------------


def _late_success(flow: Flow, checkout: str) -> list[Event]:
    before = flow.escrow
    events = flow.do(RecordPaymentResult(checkout, 0, receipt="LATE1", amount=AMOUNT))
    assert types(events) == ["payment.received", "payment.refunded"]
    assert events[0].payload == {
        "checkout_request_id": checkout,
        "receipt": "LATE1",
        "amount": AMOUNT,
    }
    assert events[1].payload == {
        "checkout_request_id": checkout,
        "amount": AMOUNT,
        "reason": f"payment arrived while escrow was {before.state.value}",
    }
    # Nothing but the version moves: the state and the recorded receipt stay.
    assert flow.escrow == dataclasses.replace(
        before, version=before.version + 2, updated_at=flow.now
    )
    return events


def test_late_payment_for_expired_escrow_is_received_and_refunded() -> None:
    flow = awaiting()
    flow.do(Expire(), after=TIMEOUTS.payment)
    assert flow.state is S.EXPIRED
    _late_success(flow, "co-1")
    assert flow.state is S.EXPIRED


@pytest.mark.parametrize("build", [created, awaiting], ids=["created", "awaiting_payment"])
def test_late_payment_for_cancelled_escrow_is_received_and_refunded(build) -> None:  # type: ignore[no-untyped-def]
    flow = build()
    flow.do(Cancel(BUYER))
    _late_success(flow, "co-1")
    assert flow.state is S.CANCELLED


def test_duplicate_payment_for_funded_escrow_is_refunded() -> None:
    flow = funded()
    _late_success(flow, "co-1")  # the same checkout again
    assert flow.escrow.mpesa_receipt == "RCPT1"
    _late_success(flow, "co-other")  # a superseded checkout that succeeded anyway
    assert flow.state is S.FUNDED
    assert flow.escrow.mpesa_receipt == "RCPT1"


def test_payment_for_released_escrow_is_refunded() -> None:
    flow = released()
    _late_success(flow, "co-1")
    assert flow.state is S.RELEASED


# -- illegal transitions ------------------------------------------------------------

ILLEGAL = [
    (S.CREATED, Ship(SELLER), "ship", "funded"),
    (S.CREATED, Confirm(BUYER), "confirm", "shipped"),
    (S.CREATED, OpenDispute(BUYER), "dispute", "funded, shipped"),
    (S.AWAITING_PAYMENT, RequestPayment(BUYER, "co-9"), "fund", "created"),
    (S.AWAITING_PAYMENT, Ship(SELLER), "ship", "funded"),
    (S.FUNDED, RequestPayment(BUYER, "co-9"), "fund", "created"),
    (S.FUNDED, Confirm(BUYER), "confirm", "shipped"),
    (S.FUNDED, ResolveDispute(ADMIN, "refund"), "resolve", "disputed"),
    (S.SHIPPED, Ship(SELLER), "ship", "funded"),
    (S.SHIPPED, Cancel(BUYER), "cancel", "created, awaiting_payment, funded"),
    (S.DISPUTED, Confirm(BUYER), "confirm", "shipped"),
    (S.DISPUTED, OpenDispute(SELLER), "dispute", "funded, shipped"),
    (S.DISPUTED, Cancel(SELLER), "cancel", "created, awaiting_payment, funded"),
    (S.RELEASED, Confirm(BUYER), "confirm", "shipped"),
    (S.RELEASED, OpenDispute(BUYER), "dispute", "funded, shipped"),
    (S.RELEASED, Cancel(BUYER), "cancel", "created, awaiting_payment, funded"),
    (S.REFUNDED, ResolveDispute(ADMIN, "release"), "resolve", "disputed"),
    (S.REFUNDED, Ship(SELLER), "ship", "funded"),
    (S.CANCELLED, RequestPayment(BUYER, "co-9"), "fund", "created"),
    (S.CANCELLED, Cancel(BUYER), "cancel", "created, awaiting_payment, funded"),
    (S.EXPIRED, RequestPayment(BUYER, "co-9"), "fund", "created"),
    (S.EXPIRED, Ship(SELLER), "ship", "funded"),
]


@pytest.mark.parametrize(
    ("state", "command", "verb", "allowed"),
    ILLEGAL,
    ids=[f"{c.name}-in-{s.value}" for s, c, _, _ in ILLEGAL],
)
def test_illegal_transition_raises_with_clear_message(
    state: EscrowState, command: Command, verb: str, allowed: str
) -> None:
    flow = BUILDERS[state]()
    before_escrow, before_events = flow.escrow, list(flow.events)
    with pytest.raises(IllegalTransition) as info:
        flow.do(command)
    assert str(info.value) == (
        f"cannot {verb} an escrow that is {state.value} (allowed from: {allowed})"
    )
    assert info.value.command == verb
    assert info.value.state is state
    assert info.value.code == "illegal_transition"
    # Nothing was emitted and nothing changed.
    assert flow.escrow is before_escrow
    assert flow.events == before_events


def test_create_over_an_existing_escrow_is_illegal() -> None:
    flow = funded()
    with pytest.raises(
        IllegalTransition,
        match=r"cannot create an escrow that is funded \(allowed from: no state\)",
    ):
        flow.do(CreateEscrow("esc-1", BUYER, SELLER, AMOUNT))


# -- wrong actors -------------------------------------------------------------------

WRONG_ACTOR = [
    (S.CREATED, RequestPayment(SELLER, "co-9"), SELLER, "fund"),
    (S.CREATED, RequestPayment(ADMIN, "co-9"), ADMIN, "fund"),
    (S.FUNDED, Ship(BUYER), BUYER, "ship"),
    (S.FUNDED, Ship(STRANGER), STRANGER, "ship"),
    (S.SHIPPED, Confirm(SELLER), SELLER, "confirm"),
    (S.SHIPPED, Confirm(ADMIN), ADMIN, "confirm"),
    (S.FUNDED, OpenDispute(STRANGER), STRANGER, "dispute"),
    (S.FUNDED, OpenDispute(ADMIN), ADMIN, "dispute"),
    (S.DISPUTED, ResolveDispute(BUYER, "refund"), BUYER, "resolve"),
    (S.DISPUTED, ResolveDispute(SELLER, "release"), SELLER, "resolve"),
    (S.CREATED, Cancel(STRANGER), STRANGER, "cancel"),
    (S.FUNDED, Cancel(ADMIN), ADMIN, "cancel"),
    # The actor is checked before the state: a wrong actor is NotAllowed anywhere.
    (S.RELEASED, Ship(BUYER), BUYER, "ship"),
]


@pytest.mark.parametrize(
    ("state", "command", "actor", "verb"),
    WRONG_ACTOR,
    ids=[f"{a}-{c.name}-in-{s.value}" for s, c, a, _ in WRONG_ACTOR],
)
def test_wrong_actor_is_not_allowed(
    state: EscrowState, command: Command, actor: str, verb: str
) -> None:
    flow = BUILDERS[state]()
    before = flow.escrow
    with pytest.raises(NotAllowed) as info:
        flow.do(command)
    assert str(info.value) == f"{actor!r} may not {verb} this escrow"
    assert info.value.code == "not_allowed"
    assert flow.escrow is before


# -- invalid commands ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (CreateEscrow("e", BUYER, SELLER, 0), "amount must be between 1 and 250000 KES"),
        (CreateEscrow("e", BUYER, SELLER, -5), "amount must be between 1 and 250000 KES"),
        (CreateEscrow("e", BUYER, SELLER, 250_001), "amount must be between 1 and 250000 KES"),
        (CreateEscrow("e", BUYER, SELLER, True), "amount must be a whole number of KES"),
        (CreateEscrow("e", BUYER, SELLER, 100.0), "amount must be a whole number of KES"),  # type: ignore[arg-type]
        (CreateEscrow("e", BUYER, SELLER, "100"), "amount must be a whole number of KES"),  # type: ignore[arg-type]
        (CreateEscrow("e", BUYER, BUYER, 100), "buyer and seller must be different users"),
        (CreateEscrow("", BUYER, SELLER, 100), "escrow id is required"),
        (CreateEscrow("e", "", SELLER, 100), "buyer and seller are required"),
        (CreateEscrow("e", BUYER, "", 100), "buyer and seller are required"),
        (CreateEscrow("e", ADMIN, SELLER, 100), "'admin' cannot be a buyer or seller"),
        (CreateEscrow("e", BUYER, ADMIN, 100), "'admin' cannot be a buyer or seller"),
    ],
    ids=[
        "amount-0",
        "amount-negative",
        "amount-over-max",
        "amount-bool",
        "amount-float",
        "amount-str",
        "buyer-is-seller",
        "missing-escrow-id",
        "missing-buyer",
        "missing-seller",
        "admin-buyer",
        "admin-seller",
    ],
)
def test_invalid_create_is_rejected(command: CreateEscrow, message: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        decide(None, command, now=T0, ids=IdFactory(1))
    assert str(info.value) == message
    assert info.value.code == "invalid_command"


@pytest.mark.parametrize("outcome", ["split", "", "REFUND"])
def test_resolve_with_bad_outcome_is_invalid(outcome: str) -> None:
    flow = disputed()
    with pytest.raises(InvalidCommand, match="outcome must be 'refund' or 'release'"):
        flow.do(ResolveDispute(ADMIN, outcome))
    assert flow.state is S.DISPUTED


def test_fund_without_checkout_id_is_invalid() -> None:
    flow = created()
    with pytest.raises(InvalidCommand, match="needs a checkout request id"):
        flow.do(RequestPayment(BUYER, ""))
    assert flow.state is S.CREATED


@pytest.mark.parametrize(
    "command", [Ship(SELLER), Expire(), RecordPaymentResult("co-1", 0)], ids=lambda c: c.name
)
def test_command_on_missing_escrow_is_invalid(command: Command) -> None:
    with pytest.raises(InvalidCommand, match="does not exist"):
        decide(None, command, now=T0, ids=IdFactory(1))


def test_callback_amount_mismatch_is_invalid_and_keeps_waiting() -> None:
    flow = awaiting()
    with pytest.raises(
        InvalidCommand, match=f"callback amount 9999 does not match escrow amount {AMOUNT}"
    ):
        flow.do(RecordPaymentResult("co-1", 0, receipt="R", amount=9999))
    assert flow.state is S.AWAITING_PAYMENT
    assert types(flow.do(RecordPaymentResult("co-1", 0, receipt="R", amount=AMOUNT))) == [
        "payment.received",
        "escrow.funded",
    ]


def test_domain_errors_share_a_base_class() -> None:
    for cls in (InvalidCommand, IllegalTransition, NotAllowed):
        assert issubclass(cls, DomainError)


# -- evolve and replay --------------------------------------------------------------


def test_evolve_rejects_a_sequence_gap() -> None:
    flow = funded()
    more = decide(flow.escrow, Ship(SELLER), now=flow.now, ids=IdFactory(3))
    gap = msgspec.structs.replace(more[0], sequence=flow.escrow.version + 2)
    with pytest.raises(
        ValueError, match=rf"sequence {flow.escrow.version + 2}, expected {flow.escrow.version + 1}"
    ):
        evolve(flow.escrow, gap)


def test_evolve_rejects_a_repeated_event() -> None:
    flow = funded()
    with pytest.raises(ValueError, match="expected 5"):
        evolve(flow.escrow, flow.events[-1])


def test_replay_rejects_a_log_with_a_hole() -> None:
    flow = released()
    holed = flow.events[:3] + flow.events[4:]
    with pytest.raises(ValueError, match="sequence 5, expected 4"):
        replay(holed)


def test_evolve_needs_escrow_created_first() -> None:
    flow = funded()
    with pytest.raises(ValueError, match="payment.requested before escrow.created for esc-1"):
        evolve(None, flow.events[1])


def test_evolve_rejects_an_unknown_event_type() -> None:
    flow = created()
    bogus = Event(
        event_id="evt-x",
        type="escrow.teleported",
        aggregate_type="escrow",
        aggregate_id="esc-1",
        sequence=2,
        user_ids=(BUYER, SELLER),
        occurred_at=T0,
        correlation_id="cor",
    )
    with pytest.raises(ValueError, match="does not know event type 'escrow.teleported'"):
        evolve(flow.escrow, bogus)


@pytest.mark.parametrize("state", list(BUILDERS), ids=str)
def test_replay_equals_state_built_step_by_step(state: EscrowState) -> None:
    flow = BUILDERS[state]()
    assert replay(flow.events) == flow.escrow
    # Every prefix of the log replays to the state after that step.
    count = 0
    for step_state, step in zip(flow.history, _steps(flow.events), strict=True):
        count += len(step)
        assert replay(flow.events[:count]) == step_state


def _every_event_type() -> list[Flow]:
    """Flows that between them apply every event type at least once."""
    failed = awaiting()
    failed.do(RecordPaymentResult("co-1", 1032, "Request cancelled by user"))
    late = expired()
    late.do(RecordPaymentResult("co-0", 0, receipt="LATE", amount=AMOUNT))
    lapsed = funded()
    lapsed.do(Expire(), after=TIMEOUTS.shipping)
    kept = shipped()
    kept.do(Expire(), after=TIMEOUTS.confirmation)
    after_funding = funded()
    after_funding.do(Cancel(BUYER, "found it cheaper"))
    resolved = disputed()
    resolved.do(ResolveDispute(ADMIN, "release"))
    return [*(build() for build in BUILDERS.values()), failed, late, lapsed, kept,
            after_funding, resolved]  # fmt: skip


def test_evolve_changes_only_the_mutable_fields_and_each_of_them_somewhere() -> None:
    # The service's UPDATE writes MUTABLE_FIELDS only: a field evolve changed
    # outside them would never reach the database.
    seen_types: set[str] = set()
    changed: set[str] = set()
    for flow in _every_event_type():
        state = None
        for event in flow.events:
            new = evolve(state, event)
            if state is not None:
                before, after = state.to_dict(), new.to_dict()
                changed |= {name for name in after if after[name] != before[name]}
            seen_types.add(event.type)
            state = new
    assert seen_types == set(EVENT_TYPES)
    assert changed == set(MUTABLE_FIELDS)


def _steps(events: list[Event]) -> list[list[Event]]:
    """Split a log back into decisions (events of one decision share a correlation id)."""
    steps: list[list[Event]] = []
    for event in events:
        if steps and steps[-1][-1].correlation_id == event.correlation_id:
            steps[-1].append(event)
        else:
            steps.append([event])
    return steps


def test_replay_orders_events_by_sequence() -> None:
    flow = shipped()
    assert replay(list(reversed(flow.events))) == flow.escrow


def test_replay_of_nothing_is_none() -> None:
    assert replay([]) is None


def test_replay_with_custom_timeouts_uses_them() -> None:
    flow = funded()
    short = Timeouts(payment=1, shipping=2, confirmation=3)
    escrow = replay(flow.events, short)
    assert escrow is not None
    assert escrow.deadline == flow.events[-1].occurred_at + 2


# -- found by mutation testing (make mutation) -------------------------------------


@pytest.mark.parametrize(
    "make", [created, awaiting, funded, shipped, disputed, released, refunded, cancelled]
)
def test_to_dict_is_every_field_under_its_own_name(make: Callable[[], Flow]) -> None:
    escrow = make().escrow
    assert escrow is not None
    as_dict = escrow.to_dict()
    assert list(as_dict) == [f.name for f in dataclasses.fields(Escrow)]
    assert Escrow(**{**as_dict, "state": EscrowState(as_dict["state"])}) == escrow


def test_a_created_escrow_carries_the_given_correlation_id() -> None:
    events = decide(
        None, CreateEscrow("e", BUYER, SELLER, AMOUNT), now=T0, ids=IdFactory(1), correlation_id="c"
    )
    assert [e.correlation_id for e in events] == ["c"]


def test_ids_say_what_they_identify_when_the_decider_makes_them() -> None:
    # Event and correlation ids travel side by side in every envelope and log line.
    flow = Flow()
    flow.do(RequestPayment(BUYER, "co-1"))
    assert len(flow.events) == 2
    for event in flow.events:
        assert event.event_id.startswith("evt_"), event.event_id
        assert event.correlation_id.startswith("cor_"), event.correlation_id


def test_a_command_the_decider_does_not_know_is_refused() -> None:
    flow = created()
    with pytest.raises(InvalidCommand, match="unknown command"):
        flow.decide_only("ship it")  # type: ignore[arg-type]


def test_a_payment_request_without_a_checkout_id_is_refused_and_says_why() -> None:
    with pytest.raises(InvalidCommand, match="^a payment request needs a checkout request id$"):
        created().decide_only(RequestPayment(BUYER, ""))


def test_shipping_records_the_tracking_reference() -> None:
    events = funded().decide_only(Ship(SELLER, "TRACK-9"))
    assert [(e.type, e.payload) for e in events] == [("escrow.shipped", {"tracking": "TRACK-9"})]


def test_a_created_event_without_a_description_replays_to_an_empty_one() -> None:
    event = Flow().events[0]
    payload = {k: v for k, v in event.payload.items() if k != "description"}
    escrow = evolve(None, msgspec.structs.replace(event, payload=payload))
    assert escrow.description == ""
