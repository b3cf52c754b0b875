"""The escrow domain: an explicit state machine, with no I/O.

An escrow moves through these states::

    created --fund--> awaiting_payment --callback ok--> funded --ship--> shipped
       ^                   |                               |               |
       +---callback fail---+                      dispute / cancel    confirm / dispute
                                                           |               |
    disputed --resolve(refund|release)--> refunded | released  <-----------+

plus ``cancelled`` (before money arrived, or by refund before shipping) and
``expired`` (no payment in time, or not shipped in time). A shipped escrow that
the buyer neither confirms nor disputes in time is released automatically.

The core is two pure functions, in the "decider" style:

* :func:`decide` takes the current :class:`Escrow`, a command and the time, and
  returns the events the command causes, or raises a :class:`DomainError`
  (and then nothing is emitted);
* :func:`evolve` applies one event to an escrow.

So the state of an escrow is always ``fold(evolve, its events)``; the property
tests check exactly that, and the service layer only stores what these decide.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from workbench.domain.events import EVENT_TYPES, Event
from workbench.domain.ids import IdFactory

MIN_AMOUNT = 1
MAX_AMOUNT = 250_000  # KES: M-Pesa's limit for one transaction
FEE_BPS = 150  # platform fee, basis points of the amount, taken on release


class EscrowState(enum.StrEnum):
    CREATED = "created"
    AWAITING_PAYMENT = "awaiting_payment"
    FUNDED = "funded"
    SHIPPED = "shipped"
    DISPUTED = "disputed"
    RELEASED = "released"
    REFUNDED = "refunded"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def terminal(self) -> bool:
        return self in (
            EscrowState.RELEASED,
            EscrowState.REFUNDED,
            EscrowState.CANCELLED,
            EscrowState.EXPIRED,
        )


# -- errors ---------------------------------------------------------------------


class DomainError(Exception):
    """A command was rejected; nothing was emitted and nothing changed."""

    code = "domain_error"


class InvalidCommand(DomainError):
    """The command itself is malformed (bad amount, same buyer and seller...)."""

    code = "invalid_command"


class IllegalTransition(DomainError):
    """The command is not allowed in the escrow's current state."""

    code = "illegal_transition"

    def __init__(self, command: str, state: EscrowState, allowed: tuple[EscrowState, ...]):
        allowed_text = ", ".join(s.value for s in allowed) or "no state"
        super().__init__(
            f"cannot {command} an escrow that is {state.value} (allowed from: {allowed_text})"
        )
        self.command = command
        self.state = state


class NotAllowed(DomainError):
    """The actor may not do this to this escrow (e.g. the seller confirming)."""

    code = "not_allowed"


# -- timeouts -------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    """How long each waiting state lasts before :func:`expire` acts (seconds)."""

    payment: float = 15 * 60  # created/awaiting_payment -> expired
    shipping: float = 7 * 24 * 3600  # funded -> expired and refunded
    confirmation: float = 3 * 24 * 3600  # shipped -> released automatically


# -- the aggregate --------------------------------------------------------------


@dataclass(frozen=True)
class Escrow:
    id: str
    buyer_id: str
    seller_id: str
    amount: int
    fee: int
    description: str
    state: EscrowState
    version: int
    created_at: float
    updated_at: float
    deadline: float | None = None
    checkout_request_id: str | None = None
    mpesa_receipt: str | None = None
    dispute_reason: str | None = None

    @property
    def user_ids(self) -> tuple[str, str]:
        return (self.buyer_id, self.seller_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "buyer_id": self.buyer_id,
            "seller_id": self.seller_id,
            "amount": self.amount,
            "fee": self.fee,
            "description": self.description,
            "state": self.state.value,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "deadline": self.deadline,
            "checkout_request_id": self.checkout_request_id,
            "mpesa_receipt": self.mpesa_receipt,
            "dispute_reason": self.dispute_reason,
        }


# -- commands -------------------------------------------------------------------


@dataclass(frozen=True)
class CreateEscrow:
    escrow_id: str
    buyer_id: str
    seller_id: str
    amount: int
    description: str = ""
    name = "create"


@dataclass(frozen=True)
class RequestPayment:
    """Start an STK push to the buyer's phone; the gateway gave ``checkout_request_id``."""

    actor: str
    checkout_request_id: str
    phone: str = ""
    name = "fund"


@dataclass(frozen=True)
class RecordPaymentResult:
    """An M-Pesa STK callback, already parsed (see :mod:`workbench.payments.mpesa`)."""

    checkout_request_id: str
    result_code: int
    result_desc: str = ""
    receipt: str | None = None
    amount: int | None = None
    phone: str | None = None  # the callback's PhoneNumber, checked against the request
    name = "record payment for"


@dataclass(frozen=True)
class Ship:
    actor: str
    tracking: str = ""
    name = "ship"


@dataclass(frozen=True)
class Confirm:
    actor: str
    name = "confirm"


@dataclass(frozen=True)
class OpenDispute:
    actor: str
    reason: str = ""
    name = "dispute"


@dataclass(frozen=True)
class ResolveDispute:
    actor: str
    outcome: str  # "refund" or "release"
    note: str = ""
    name = "resolve"


@dataclass(frozen=True)
class Cancel:
    actor: str
    reason: str = ""
    name = "cancel"


@dataclass(frozen=True)
class Expire:
    """The timer: act on an escrow whose deadline has passed, else do nothing."""

    name = "expire"


Command = (
    CreateEscrow
    | RequestPayment
    | RecordPaymentResult
    | Ship
    | Confirm
    | OpenDispute
    | ResolveDispute
    | Cancel
    | Expire
)

ADMIN = "admin"  # the actor who resolves disputes


def fee_for(amount: int) -> int:
    return amount * FEE_BPS // 10_000


# -- decide ---------------------------------------------------------------------


@dataclass
class _Emitter:
    """Builds the events of one decision with consecutive sequence numbers."""

    escrow_id: str
    user_ids: tuple[str, ...]
    version: int
    now: float
    ids: IdFactory
    correlation_id: str
    causation_id: str | None
    events: list[Event] = field(default_factory=list)

    def emit(self, event_type: str, **payload: Any) -> None:
        self.version += 1
        self.events.append(
            Event(
                event_id=self.ids.new("evt"),
                type=event_type,
                aggregate_type=EVENT_TYPES[event_type],
                aggregate_id=self.escrow_id,
                sequence=self.version,
                user_ids=self.user_ids,
                occurred_at=self.now,
                correlation_id=self.correlation_id,
                causation_id=self.causation_id,
                payload=payload,
            )
        )


def _require(command: Command, escrow: Escrow, *allowed: EscrowState) -> None:
    if escrow.state not in allowed:
        raise IllegalTransition(command.name, escrow.state, allowed)


def _require_actor(command: Command, actor: str, *who: str) -> None:
    if actor not in who:
        raise NotAllowed(f"{actor!r} may not {command.name} this escrow")


def decide(
    escrow: Escrow | None,
    command: Command,
    *,
    now: float,
    ids: IdFactory,
    correlation_id: str | None = None,
    causation_id: str | None = None,
) -> list[Event]:
    """Return the events ``command`` causes on ``escrow`` at ``now``.

    Raises :class:`DomainError` (nothing emitted) when the command is invalid,
    not allowed for its actor, or illegal in the current state. ``Expire`` and
    a callback for an already-settled payment may legitimately return ``[]``.
    """
    if isinstance(command, CreateEscrow):
        return _decide_create(escrow, command, now, ids, correlation_id)
    if escrow is None:
        raise InvalidCommand(f"cannot {command.name} an escrow that does not exist")
    out = _Emitter(
        escrow.id,
        escrow.user_ids,
        escrow.version,
        now,
        ids,
        correlation_id or ids.new("cor"),
        causation_id,
    )
    S = EscrowState
    match command:
        case RequestPayment():
            _require_actor(command, command.actor, escrow.buyer_id)
            _require(command, escrow, S.CREATED)
            if not command.checkout_request_id:
                raise InvalidCommand("a payment request needs a checkout request id")
            out.emit(
                "payment.requested",
                checkout_request_id=command.checkout_request_id,
                amount=escrow.amount,
                phone=command.phone,
            )
        case RecordPaymentResult():
            _decide_payment_result(escrow, command, out)
        case Ship():
            _require_actor(command, command.actor, escrow.seller_id)
            _require(command, escrow, S.FUNDED)
            out.emit("escrow.shipped", tracking=command.tracking)
        case Confirm():
            _require_actor(command, command.actor, escrow.buyer_id)
            _require(command, escrow, S.SHIPPED)
            out.emit("escrow.confirmed")
            _release(escrow, out, reason="confirmed")
        case OpenDispute():
            _require_actor(command, command.actor, escrow.buyer_id, escrow.seller_id)
            _require(command, escrow, S.FUNDED, S.SHIPPED)
            out.emit("dispute.opened", opened_by=command.actor, reason=command.reason)
        case ResolveDispute():
            _require_actor(command, command.actor, ADMIN)
            if command.outcome not in ("refund", "release"):
                raise InvalidCommand(
                    f"outcome must be 'refund' or 'release', not {command.outcome!r}"
                )
            _require(command, escrow, S.DISPUTED)
            out.emit("dispute.resolved", outcome=command.outcome, note=command.note)
            if command.outcome == "release":
                _release(escrow, out, reason="dispute")
            else:
                _refund(escrow, out, reason="dispute")
        case Cancel():
            _require_actor(command, command.actor, escrow.buyer_id, escrow.seller_id)
            _require(command, escrow, S.CREATED, S.AWAITING_PAYMENT, S.FUNDED)
            out.emit("escrow.cancelled", cancelled_by=command.actor, reason=command.reason)
            if escrow.state is S.FUNDED:
                _refund(escrow, out, reason="cancelled")
        case Expire():
            _decide_expire(escrow, out)
        case _:  # pragma: no cover - the Command union is closed
            raise InvalidCommand(f"unknown command {command!r}")
    return out.events


def _decide_create(
    escrow: Escrow | None,
    command: CreateEscrow,
    now: float,
    ids: IdFactory,
    correlation_id: str | None,
) -> list[Event]:
    if escrow is not None:
        raise IllegalTransition("create", escrow.state, ())
    if not command.escrow_id:
        raise InvalidCommand("escrow id is required")
    if not command.buyer_id or not command.seller_id:
        raise InvalidCommand("buyer and seller are required")
    if command.buyer_id == command.seller_id:
        raise InvalidCommand("buyer and seller must be different users")
    if ADMIN in (command.buyer_id, command.seller_id):
        raise InvalidCommand(f"{ADMIN!r} cannot be a buyer or seller")
    if isinstance(command.amount, bool) or not isinstance(command.amount, int):
        raise InvalidCommand("amount must be a whole number of KES")
    if not MIN_AMOUNT <= command.amount <= MAX_AMOUNT:
        raise InvalidCommand(f"amount must be between {MIN_AMOUNT} and {MAX_AMOUNT} KES")
    out = _Emitter(
        command.escrow_id,
        (command.buyer_id, command.seller_id),
        0,
        now,
        ids,
        correlation_id or ids.new("cor"),
        None,
    )
    out.emit(
        "escrow.created",
        buyer_id=command.buyer_id,
        seller_id=command.seller_id,
        amount=command.amount,
        fee=fee_for(command.amount),
        description=command.description,
    )
    return out.events


def _decide_payment_result(escrow: Escrow, command: RecordPaymentResult, out: _Emitter) -> None:
    """Money can arrive late, twice, or for a superseded checkout: keep it balanced.

    The service layer makes the first result per checkout id final, so this sees
    each checkout's result once. A success that cannot fund the escrow (it is
    already funded, expired or cancelled) is recorded and refunded at once.
    """
    S = EscrowState
    ok = command.result_code == 0
    current = command.checkout_request_id == escrow.checkout_request_id
    if ok and command.amount is not None and command.amount != escrow.amount:
        raise InvalidCommand(
            f"callback amount {command.amount} does not match escrow amount {escrow.amount}"
        )
    if current and escrow.state is S.AWAITING_PAYMENT:
        if ok:
            out.emit(
                "payment.received",
                checkout_request_id=command.checkout_request_id,
                receipt=command.receipt,
                amount=escrow.amount,
            )
            out.emit("escrow.funded", amount=escrow.amount)
        else:
            out.emit(
                "payment.failed",
                checkout_request_id=command.checkout_request_id,
                result_code=command.result_code,
                result_desc=command.result_desc,
            )
        return
    if ok:
        # Paid, but the escrow cannot take the money: hold it and refund it.
        out.emit(
            "payment.received",
            checkout_request_id=command.checkout_request_id,
            receipt=command.receipt,
            amount=escrow.amount,
        )
        out.emit(
            "payment.refunded",
            checkout_request_id=command.checkout_request_id,
            amount=escrow.amount,
            reason=f"payment arrived while escrow was {escrow.state.value}",
        )
    # A failure for a checkout that is no longer current changes nothing.


def _release(escrow: Escrow, out: _Emitter, *, reason: str) -> None:
    out.emit(
        "escrow.released",
        amount=escrow.amount,
        fee=escrow.fee,
        seller_amount=escrow.amount - escrow.fee,
        reason=reason,
    )
    out.emit("payout.sent", to=escrow.seller_id, amount=escrow.amount - escrow.fee)


def _refund(escrow: Escrow, out: _Emitter, *, reason: str) -> None:
    out.emit("escrow.refunded", amount=escrow.amount, reason=reason)
    out.emit("payout.refunded", to=escrow.buyer_id, amount=escrow.amount)


def _decide_expire(escrow: Escrow, out: _Emitter) -> None:
    S = EscrowState
    if escrow.deadline is None or out.now < escrow.deadline:
        return
    if escrow.state in (S.CREATED, S.AWAITING_PAYMENT):
        out.emit("escrow.expired", reason="not paid in time")
    elif escrow.state is S.FUNDED:
        out.emit("escrow.expired", reason="not shipped in time")
        _refund(escrow, out, reason="not shipped in time")
    elif escrow.state is S.SHIPPED:
        _release(escrow, out, reason="auto-release: not confirmed in time")


# -- evolve ---------------------------------------------------------------------


def evolve(escrow: Escrow | None, event: Event, timeouts: Timeouts = Timeouts()) -> Escrow:
    """Apply one event. Pure; used to store state and to replay logs alike."""
    S = EscrowState
    p = event.payload
    t = event.occurred_at
    if event.type == "escrow.created":
        return Escrow(
            id=event.aggregate_id,
            buyer_id=p["buyer_id"],
            seller_id=p["seller_id"],
            amount=p["amount"],
            fee=p["fee"],
            description=p.get("description", ""),
            state=S.CREATED,
            version=event.sequence,
            created_at=t,
            updated_at=t,
            deadline=t + timeouts.payment,
        )
    if escrow is None:
        raise ValueError(f"{event.type} before escrow.created for {event.aggregate_id}")
    if event.sequence != escrow.version + 1:
        raise ValueError(
            f"event {event.event_id} has sequence {event.sequence}, "
            f"expected {escrow.version + 1} for escrow {escrow.id}"
        )
    changes: dict[str, Any] = {"version": event.sequence, "updated_at": t}
    match event.type:
        case "payment.requested":
            changes.update(state=S.AWAITING_PAYMENT, checkout_request_id=p["checkout_request_id"])
        case "payment.received":
            if escrow.state is S.AWAITING_PAYMENT:
                changes.update(mpesa_receipt=p.get("receipt"))
        case "payment.failed":
            changes.update(state=S.CREATED, checkout_request_id=None)
        case "escrow.funded":
            changes.update(state=S.FUNDED, deadline=t + timeouts.shipping)
        case "escrow.shipped":
            changes.update(state=S.SHIPPED, deadline=t + timeouts.confirmation)
        case "dispute.opened":
            changes.update(state=S.DISPUTED, deadline=None, dispute_reason=p.get("reason"))
        case "escrow.released":
            changes.update(state=S.RELEASED, deadline=None)
        case "escrow.refunded":
            changes.update(state=S.REFUNDED, deadline=None)
        case "escrow.cancelled":
            changes.update(state=S.CANCELLED, deadline=None)
        case "escrow.expired":
            changes.update(state=S.EXPIRED, deadline=None)
        case (
            "escrow.confirmed"
            | "payment.refunded"
            | "payout.sent"
            | "payout.refunded"
            | "dispute.resolved"
        ):
            pass
        case _:
            raise ValueError(f"evolve does not know event type {event.type!r}")
    return replace(escrow, **changes)


#: The fields :func:`evolve` may change after ``escrow.created``; the others (id,
#: parties, amount, fee, description, created_at) are fixed at creation. The
#: service's UPDATE writes only these: an indexed column in the SET costs its
#: index a delete and an insert even when the value stays the same.
MUTABLE_FIELDS = (
    "state",
    "version",
    "updated_at",
    "deadline",
    "checkout_request_id",
    "mpesa_receipt",
    "dispute_reason",
)


def replay(events: list[Event], timeouts: Timeouts = Timeouts()) -> Escrow | None:
    """The escrow that a sequence of its events describes."""
    escrow: Escrow | None = None
    for event in sorted(events, key=lambda e: e.sequence):
        escrow = evolve(escrow, event, timeouts)
    return escrow
