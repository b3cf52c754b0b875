"""Command handling: the escrow state machine applied to the SQL store.

Each command runs in one transaction: lock the escrow row, :func:`decide`,
store the new state, append the events to the outbox, remember the
idempotency key. A :class:`DomainError` rolls everything back, so a rejected
command changes nothing and emits nothing. Redis is not touched here at all:
commands keep working while Redis is down and the relay catches up later.

**Creates naming another user are limited** (:class:`CreateLimit`, when the
caller is known: ``create(..., actor=...)``, as the API does). Every escrow
lands in both parties' user streams, so without a limit one user could push
another's history out of their stream (``MAXLEN``). A creator may name the same
other user in at most ``count`` creates per sliding ``window_s``; the count is
read from ``escrow_creates`` in the create's own transaction (SQLite
serialises writers; PostgreSQL takes a transaction advisory lock per creator),
so it holds exactly across API processes and nodes and needs no Redis. A
refused create raises :class:`RateLimited` with the seconds until a slot frees.

Payments never trust a caller. ``fund`` commits a payment request (a row in
``payment_requests``) and sends the STK push after the commit, outside any
transaction, so a slow gateway holds no lock; a second transaction records the
gateway's CheckoutRequestID and emits ``payment.requested``. A push owed by a
process that died is sent by :meth:`EscrowService.verify_payments`.

A callback (:meth:`EscrowService.handle_callback`) must come to the URL made
for its payment (an HMAC token, :func:`workbench.payments.mpesa.callback_token`), name
that payment's checkout and, on success, the amount and phone requested;
even then it is only a claim: the result is recorded once the gateway's STK
Push Query confirms it, and the queried result is the one recorded. An
unanswered query changes nothing and is asked again later by
:meth:`EscrowService.verify_payments`, which also finds results whose
callback never came. A recorded result is final.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from sqlalchemy import Connection, bindparam, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

from workbench.domain import events as ev
from workbench.domain.clock import Clock, SystemClock
from workbench.domain.escrow import (
    MUTABLE_FIELDS,
    Cancel,
    Command,
    Confirm,
    CreateEscrow,
    DomainError,
    Escrow,
    EscrowState,
    Expire,
    OpenDispute,
    RecordPaymentResult,
    RequestPayment,
    ResolveDispute,
    Ship,
    Timeouts,
    decide,
    evolve,
)
from workbench.domain.ids import IdFactory
from workbench.payments.mpesa import (
    CallbackError,
    GatewayUnavailable,
    NotThisGateway,
    QueryResult,
    callback_token,
    parse_callback,
    reference_of,
)
from workbench.store import (
    Prepared,
    Store,
    binds,
    checkouts,
    commands,
    escrow_creates,
    escrows,
    outbox,
    payment_requests,
)
from workbench.streams.partitions import Partitioning

log = logging.getLogger(__name__)

_T = TypeVar("_T")
#: Attempts of a transaction that lost a race to a concurrent twin (see
#: ``EscrowService._in_transaction``): a twin commits once, so the second
#: attempt normally answers; the third covers a twin of a twin.
_ATTEMPTS = 3


class EscrowNotFound(DomainError):
    code = "not_found"


class UnknownCheckout(DomainError):
    """An M-Pesa callback for a checkout request this service never made."""

    code = "unknown_checkout"


class IdempotencyKeyReused(DomainError):
    """The same idempotency key was sent with a different command."""

    code = "idempotency_conflict"


class RateLimited(DomainError):
    """Too many recent creates naming the same other user; retry after ``retry_after_s``."""

    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class CreateLimit:
    """At most ``count`` creates naming the same other user per ``window_s``; 0: no limit.

    Each create puts at most two entries into the named user's stream without
    their doing anything (``escrow.created``, then ``escrow.cancelled`` or
    ``escrow.expired``), so the default lets one user add at most 40 entries a
    day to another's stream: 25 days of it to push out a default history of
    1000 entries, and 280 entries within the 7 days the fan-out remembers.
    """

    count: int = 20
    window_s: float = 24 * 3600.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CreateLimit:
        env = os.environ if environ is None else environ
        count_text = env.get("WORKBENCH_CREATE_LIMIT") or str(cls.count)
        window_text = env.get("WORKBENCH_CREATE_WINDOW_S") or str(cls.window_s)
        try:
            count = int(count_text)
        except ValueError:
            raise RuntimeError(
                f"WORKBENCH_CREATE_LIMIT must be a whole number, not {count_text!r}"
            ) from None
        try:
            window_s = float(window_text)
        except ValueError:
            window_s = math.nan
        if count < 0:
            raise RuntimeError(f"WORKBENCH_CREATE_LIMIT must be 0 (off) or more, not {count}")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise RuntimeError(
                f"WORKBENCH_CREATE_WINDOW_S must be a positive number of seconds, "
                f"not {window_text!r}"
            )
        return cls(count, window_s)


_COUNT_CREATES = Prepared(
    select(func.count(), func.min(escrow_creates.c.created_at)).where(
        escrow_creates.c.creator == bindparam("creator"),
        escrow_creates.c.named == bindparam("named"),
        escrow_creates.c.created_at > bindparam("since"),
    )
)
_INSERT_CREATE = Prepared(
    insert(escrow_creates).values(binds("escrow_id", "creator", "named", "created_at"))
)


class PaymentInProgress(DomainError):
    """An STK push for this escrow is being sent right now: retry shortly."""

    code = "payment_in_progress"


class PaymentGateway(Protocol):
    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        """Ask M-Pesa to prompt the buyer's phone; return the CheckoutRequestID.

        Raises :class:`~workbench.payments.mpesa.GatewayUnavailable` if it could not.
        """
        ...

    def query(self, checkout_request_id: str) -> QueryResult:
        """STK Push Query: the payment's result as the gateway knows it.

        Raises :class:`~workbench.payments.mpesa.GatewayUnavailable` if it cannot answer.
        """
        ...


@dataclass(frozen=True)
class PaymentSettings:
    """How payments are pushed, called back and verified. Times are in seconds."""

    callback_secret: str = "workbench-dev-callback-secret"
    callback_base_url: str = "http://localhost/mpesa/callback"
    push_grace_s: float = 30.0  # a push owed this long is sent by the verification pass
    verify_after_s: float = 90.0  # ask about a checkout whose callback has not come
    retry_s: float = 5.0  # first retry of an unanswered query; doubles up to retry_max_s
    retry_max_s: float = 300.0

    def callback_url(self, reference: str) -> str:
        token = callback_token(self.callback_secret, reference)
        return f"{self.callback_base_url.rstrip('/')}/{token}"


@dataclass(frozen=True)
class CallbackOutcome:
    """What :meth:`EscrowService.handle_callback` did with a callback.

    ``status`` is the HTTP status to answer with; ``outcome`` names it for logs
    and metrics (``applied``, ``duplicate``, ``unverified``, ``contradicted``,
    or the reason a callback was rejected).
    """

    status: int
    outcome: str
    detail: str
    result: CommandResult | None = None


class PaymentStats:
    """Counts of callback outcomes and verification results (for ``/metrics``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.callbacks: Counter[str] = Counter()
        self.verifications: Counter[str] = Counter()
        self.pushes: Counter[str] = Counter()

    def count(self, kind: str, outcome: str) -> None:
        with self._lock:
            getattr(self, kind)[outcome] += 1


@dataclass
class CommandResult:
    """What a command did: the escrow after it, and the events it emitted.

    ``replayed`` is true when an idempotency key matched an earlier command (or
    a callback was a duplicate): the stored outcome is returned, nothing changed.
    """

    escrow: dict[str, Any] | None
    events: list[ev.Event] = field(default_factory=list)
    replayed: bool = False

    @property
    def event_types(self) -> list[str]:
        return [e.type for e in self.events]

    def to_json(self) -> str:
        return json.dumps(
            {"escrow": self.escrow, "events": [ev.encode(e).decode() for e in self.events]}
        )

    @classmethod
    def from_json(cls, text: str, *, replayed: bool) -> CommandResult:
        data = json.loads(text)
        return cls(
            escrow=data["escrow"],
            events=[ev.decode(e) for e in data["events"]],
            replayed=replayed,
        )


# A command's statements, prepared once: they skip SQLAlchemy's per-execution work
# (workbench.store.Prepared; bench/throughput.py measures the command path).
_ESCROW_COLUMNS = tuple(c.name for c in escrows.c)
_SELECT_ESCROW = Prepared(select(escrows).where(escrows.c.id == bindparam("id")))
_LOCK_ESCROW = Prepared(select(escrows).where(escrows.c.id == bindparam("id")).with_for_update())
_INSERT_ESCROW = Prepared(insert(escrows).values(binds(*_ESCROW_COLUMNS)))
# Only what a transition may change: SQLite rewrites the index entries of every
# indexed column in the SET (the primary key's, the parties'), changed or not.
_UPDATE_ESCROW = Prepared(
    update(escrows)
    .where(escrows.c.id == bindparam("old_id"), escrows.c.version == bindparam("old_version"))
    .values(binds(*MUTABLE_FIELDS))
)
_INSERT_OUTBOX = Prepared(
    insert(outbox).values(binds("event_id", "stream", "type", "data", "created_at", "partition"))
)
_SELECT_COMMAND = Prepared(
    select(commands.c.fingerprint, commands.c.command, commands.c.response).where(
        commands.c.idempotency_key == bindparam("key")
    )
)
_INSERT_COMMAND = Prepared(insert(commands).values(binds(*(c.name for c in commands.c))))
_INSERT_CHECKOUT = Prepared(
    insert(checkouts).values(
        binds(
            "checkout_request_id",
            "escrow_id",
            "requested_at",
            "reference",
            "amount",
            "phone",
            "verify_due_at",
            "verify_attempts",
        )
    )
)
_CHECKOUT_COLUMNS = tuple(c.name for c in checkouts.c)
_SELECT_CHECKOUT = Prepared(
    select(checkouts).where(checkouts.c.checkout_request_id == bindparam("id"))
)
_REQUEST_COLUMNS = tuple(c.name for c in payment_requests.c)
_SELECT_REQUEST = Prepared(
    select(payment_requests).where(payment_requests.c.reference == bindparam("reference"))
)
_LOCK_REQUEST = Prepared(
    select(payment_requests)
    .where(payment_requests.c.reference == bindparam("reference"))
    .with_for_update()
)
_OPEN_REQUEST = Prepared(
    select(payment_requests.c.reference, payment_requests.c.push_due_at).where(
        payment_requests.c.escrow_id == bindparam("escrow_id"),
        payment_requests.c.state == "pushing",
    )
)
_INSERT_REQUEST = Prepared(
    insert(payment_requests).values(
        binds(
            "reference",
            "escrow_id",
            "actor",
            "amount",
            "phone",
            "requested_at",
            "state",
            "push_due_at",
        )
    )
)
_CLAIM_PUSH = Prepared(
    update(payment_requests)
    .where(
        payment_requests.c.reference == bindparam("reference"),
        payment_requests.c.state == "pushing",
        payment_requests.c.push_due_at == bindparam("old"),
    )
    .values(push_due_at=bindparam("due"))
)
_ABANDON_REQUEST = Prepared(
    update(payment_requests)
    .where(
        payment_requests.c.reference == bindparam("reference"),
        payment_requests.c.state == "pushing",
    )
    .values(state="abandoned", push_due_at=None)
)
_SET_REQUEST_CHECKOUT = Prepared(
    update(payment_requests)
    .where(payment_requests.c.reference == bindparam("reference"))
    .values(checkout_request_id=bindparam("checkout"), state=bindparam("state"), push_due_at=None)
)
_CLAIM_CALLBACK = Prepared(
    update(checkouts)
    .where(checkouts.c.checkout_request_id == bindparam("id"), checkouts.c.result_code.is_(None))
    .values(
        claimed_code=bindparam("code"),
        claimed_receipt=bindparam("receipt"),
        verify_due_at=bindparam("due"),
    )
)
_RETRY_VERIFY = Prepared(
    update(checkouts)
    .where(checkouts.c.checkout_request_id == bindparam("id"), checkouts.c.result_code.is_(None))
    .values(verify_due_at=bindparam("due"), verify_attempts=bindparam("attempts"))
)
_LOCK_CHECKOUT = Prepared(
    select(checkouts.c.escrow_id, checkouts.c.result_code)
    .where(checkouts.c.checkout_request_id == bindparam("id"))
    .with_for_update()
)
_SETTLE_CHECKOUT = Prepared(
    update(checkouts)
    .where(checkouts.c.checkout_request_id == bindparam("id"))
    .values(binds("result_code", "result_desc", "receipt", "settled_at"))
)


def _row_to_escrow(row: Any) -> Escrow:
    m = dict(zip(_ESCROW_COLUMNS, row, strict=True))  # a driver tuple or a Row
    return Escrow(
        id=m["id"],
        buyer_id=m["buyer_id"],
        seller_id=m["seller_id"],
        amount=int(m["amount"]),
        fee=int(m["fee"]),
        description=m["description"],
        state=EscrowState(m["state"]),
        version=m["version"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        deadline=m["deadline"],
        checkout_request_id=m["checkout_request_id"],
        mpesa_receipt=m["mpesa_receipt"],
        dispute_reason=m["dispute_reason"],
    )


def _fingerprint(escrow_id: str | None, command: Command) -> str:
    return hashlib.sha256(f"{escrow_id}|{command!r}".encode()).hexdigest()


class EscrowService:
    """The command side of the escrow runtime."""

    def __init__(
        self,
        store: Store,
        *,
        clock: Clock | None = None,
        ids: IdFactory | None = None,
        timeouts: Timeouts | None = None,
        gateway: PaymentGateway | None = None,
        create_limit: CreateLimit | None = None,
        payments: PaymentSettings | None = None,
        partitioning: Partitioning | None = None,
    ) -> None:
        self.store = store
        # Each outbox row carries its escrow's log partition, so partitioned relays
        # read only the partitions they hold (workbench.streams.relay); None: 0.
        self.partitioning = partitioning
        self.clock = clock or SystemClock()
        self.ids = ids or IdFactory()
        self.timeouts = timeouts or Timeouts()
        self.gateway = gateway
        self.create_limit = create_limit or CreateLimit(count=0)
        self.payments = payments or PaymentSettings()
        self.payment_stats = PaymentStats()

    # -- queries ---------------------------------------------------------------

    def get(self, escrow_id: str) -> Escrow:
        with self.store.read() as conn:
            escrow = self._load(conn, escrow_id, lock=False)
        if escrow is None:
            raise EscrowNotFound(f"no escrow {escrow_id!r}")
        return escrow

    def escrows_of(self, user_id: str) -> list[Escrow]:
        query = (
            select(escrows)
            .where((escrows.c.buyer_id == user_id) | (escrows.c.seller_id == user_id))
            .order_by(escrows.c.created_at, escrows.c.id)
        )
        with self.store.read() as conn:
            return [_row_to_escrow(row) for row in conn.execute(query)]

    # -- commands --------------------------------------------------------------

    def create(
        self,
        buyer_id: str,
        seller_id: str,
        amount: int,
        description: str = "",
        *,
        escrow_id: str | None = None,
        idempotency_key: str | None = None,
        actor: str | None = None,
    ) -> CommandResult:
        """Open an escrow. With ``actor`` (the caller), the create is counted and limited."""
        command = CreateEscrow(
            escrow_id=escrow_id or self.ids.new("esc"),
            buyer_id=buyer_id,
            seller_id=seller_id,
            amount=amount,
            description=description,
        )
        # A generated id is not part of the fingerprint, so a retry with the same key matches.
        fingerprint = _fingerprint(
            escrow_id, CreateEscrow(escrow_id or "", buyer_id, seller_id, amount, description)
        )
        on_create = None
        if actor is not None:
            named = seller_id if actor == buyer_id else buyer_id

            def on_create(conn: Connection, now: float) -> None:
                self._count_create(conn, command.escrow_id, actor, named, now)

        return self._execute(
            command.escrow_id, command, idempotency_key, fingerprint, on_create=on_create
        )

    def _count_create(
        self, conn: Connection, escrow_id: str, creator: str, named: str, now: float
    ) -> None:
        limit = self.create_limit
        if limit.count > 0 and named != creator:
            if conn.dialect.name == "postgresql":
                # Concurrent creates by one creator queue here, so the count is exact.
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:c))"), {"c": creator})
            recent, oldest = _COUNT_CREATES.first(
                conn, {"creator": creator, "named": named, "since": now - limit.window_s}
            )
            if recent >= limit.count:
                wait = max(1, math.ceil(oldest + limit.window_s - now))
                raise RateLimited(
                    f"{creator!r} created {recent} escrows naming {named!r} in the last "
                    f"{limit.window_s:g} s (limit {limit.count}); retry in {wait} s",
                    retry_after_s=wait,
                )
        _INSERT_CREATE.execute(
            conn, {"escrow_id": escrow_id, "creator": creator, "named": named, "created_at": now}
        )

    def fund(
        self, escrow_id: str, actor: str, phone: str = "", *, idempotency_key: str | None = None
    ) -> CommandResult:
        """Start the STK push; the gateway's CheckoutRequestID is recorded with the escrow.

        The request is committed first (escrow row locked, validated); the push
        runs after the commit, outside any transaction; a second transaction
        records the checkout and emits ``payment.requested``. If the gateway
        fails, the request is abandoned and :class:`GatewayUnavailable` raised
        (nothing was emitted: the buyer may fund again).
        """
        if self.gateway is None:
            raise RuntimeError("this EscrowService has no payment gateway")
        fingerprint = _fingerprint(escrow_id, RequestPayment(actor, "", phone))
        now = self.clock.now()
        with self.store.begin() as conn:
            if idempotency_key is not None:
                stored = _SELECT_COMMAND.first(conn, {"key": idempotency_key})
                if stored is not None:
                    if stored[0] != fingerprint:
                        raise IdempotencyKeyReused(
                            f"idempotency key {idempotency_key!r} was used for a different "
                            f"{stored[1]} command"
                        )
                    return CommandResult.from_json(stored[2], replayed=True)
            escrow = self._load(conn, escrow_id, lock=True)
            if escrow is None:
                raise EscrowNotFound(f"no escrow {escrow_id!r}")
            # Validate on a placeholder first so an illegal request never reaches M-Pesa.
            decide(escrow, RequestPayment(actor, "pending", phone), now=now, ids=IdFactory(0))
            open_request = _OPEN_REQUEST.first(conn, {"escrow_id": escrow_id})
            if open_request is not None and open_request[1] > now:
                raise PaymentInProgress(
                    f"an M-Pesa request for {escrow_id} is being sent; retry in a few seconds"
                )
            if open_request is not None:  # owed by a process that died: ours now
                reference = open_request[0]
                _CLAIM_PUSH.execute(
                    conn,
                    {
                        "reference": reference,
                        "due": now + self.payments.push_grace_s,
                        "old": open_request[1],
                    },
                )
            else:
                reference = self.ids.new("pay")
                _INSERT_REQUEST.execute(
                    conn,
                    {
                        "reference": reference,
                        "escrow_id": escrow_id,
                        "actor": actor,
                        "amount": escrow.amount,
                        "phone": phone,
                        "requested_at": now,
                        "state": "pushing",
                        "push_due_at": now + self.payments.push_grace_s,
                    },
                )
        try:
            checkout = self._push(reference, escrow_id, escrow.amount, phone)
        except GatewayUnavailable:
            self._abandon(reference)
            raise
        return self._record_push(
            reference, checkout, idempotency_key=idempotency_key, fingerprint=fingerprint
        )

    def _push(self, reference: str, escrow_id: str, amount: int, phone: str) -> str:
        assert self.gateway is not None
        try:
            checkout = self.gateway.stk_push(
                escrow_id,
                amount,
                phone,
                reference=reference,
                callback_url=self.payments.callback_url(reference),
            )
        except GatewayUnavailable as exc:
            self.payment_stats.count("pushes", "failed")
            log.warning("STK push for %s (%s) failed: %s", escrow_id, reference, exc)
            raise
        self.payment_stats.count("pushes", "sent")
        return checkout

    def _abandon(self, reference: str) -> None:
        with self.store.begin() as conn:
            _ABANDON_REQUEST.execute(conn, {"reference": reference})

    def _record_push(
        self,
        reference: str,
        checkout: str,
        *,
        idempotency_key: str | None = None,
        fingerprint: str = "",
    ) -> CommandResult:
        """Record the gateway's CheckoutRequestID for a request, and request the payment.

        Idempotent per reference. If the escrow moved on while the push was in
        flight (cancelled, say), the checkout is still recorded, so money that
        arrives for it is refunded; no ``payment.requested`` is emitted.
        """
        return self._in_transaction(
            lambda conn: self._record_push_in(
                conn, reference, checkout, idempotency_key=idempotency_key, fingerprint=fingerprint
            )
        )

    def _record_push_in(
        self,
        conn: Connection,
        reference: str,
        checkout: str,
        *,
        idempotency_key: str | None,
        fingerprint: str,
    ) -> CommandResult:
        request = _LOCK_REQUEST.first(conn, {"reference": reference})
        assert request is not None, reference
        r = dict(zip(_REQUEST_COLUMNS, request, strict=True))
        escrow = self._load(conn, r["escrow_id"], lock=True)
        assert escrow is not None
        if r["checkout_request_id"] not in (None, checkout):
            raise UnknownCheckout(
                f"payment {reference} already has checkout {r['checkout_request_id']}"
            )
        existing = _SELECT_CHECKOUT.first(conn, {"id": checkout})
        if existing is not None:
            # Recorded before: by this payment (a replay), or by another one, whose
            # checkout a callback at this payment's URL must not take over.
            if dict(zip(_CHECKOUT_COLUMNS, existing, strict=True))["reference"] != reference:
                raise UnknownCheckout(f"checkout {checkout} is another payment's")
            return CommandResult(escrow.to_dict(), [], True)
        now = self.clock.now()
        _SET_REQUEST_CHECKOUT.execute(
            conn,
            {
                "reference": reference,
                "checkout": checkout,
                "state": "requested" if r["state"] == "pushing" else r["state"],
            },
        )
        _INSERT_CHECKOUT.execute(
            conn,
            {
                "checkout_request_id": checkout,
                "escrow_id": r["escrow_id"],
                "requested_at": now,
                "reference": reference,
                "amount": r["amount"],
                "phone": r["phone"],
                "verify_due_at": now + self.payments.verify_after_s,
                "verify_attempts": 0,
            },
        )
        new_events: list[ev.Event] = []
        if r["state"] == "pushing":
            try:
                new_events = decide(
                    escrow,
                    RequestPayment(r["actor"], checkout, r["phone"]),
                    now=now,
                    ids=self.ids,
                )
            except DomainError as exc:  # moved on meanwhile: keep the checkout
                log.info("payment %s pushed after %s moved on: %s", reference, escrow.id, exc)
        new = self._apply(conn, escrow, new_events)
        result = CommandResult(new.to_dict() if new else None, new_events)
        if idempotency_key is not None:
            _store_response(conn, idempotency_key, "fund", r["escrow_id"], fingerprint, result, now)
        return result

    def ship(
        self, escrow_id: str, actor: str, tracking: str = "", *, idempotency_key: str | None = None
    ) -> CommandResult:
        return self._run(escrow_id, Ship(actor, tracking), idempotency_key)

    def confirm(
        self, escrow_id: str, actor: str, *, idempotency_key: str | None = None
    ) -> CommandResult:
        return self._run(escrow_id, Confirm(actor), idempotency_key)

    def dispute(
        self, escrow_id: str, actor: str, reason: str = "", *, idempotency_key: str | None = None
    ) -> CommandResult:
        return self._run(escrow_id, OpenDispute(actor, reason), idempotency_key)

    def resolve(
        self,
        escrow_id: str,
        actor: str,
        outcome: str,
        note: str = "",
        *,
        idempotency_key: str | None = None,
    ) -> CommandResult:
        return self._run(escrow_id, ResolveDispute(actor, outcome, note), idempotency_key)

    def cancel(
        self, escrow_id: str, actor: str, reason: str = "", *, idempotency_key: str | None = None
    ) -> CommandResult:
        return self._run(escrow_id, Cancel(actor, reason), idempotency_key)

    def expire(self, escrow_id: str) -> CommandResult:
        return self._run(escrow_id, Expire(), None)

    def expire_due(self, limit: int = 1000) -> int:
        """Run the timer over escrows whose deadline has passed; return events emitted."""
        now = self.clock.now()
        query = (
            select(escrows.c.id)
            .where(escrows.c.deadline.is_not(None), escrows.c.deadline <= now)
            .order_by(escrows.c.deadline)
            .limit(limit)
        )
        with self.store.read() as conn:
            due = list(conn.execute(query).scalars())
        return sum(len(self.expire(escrow_id).events) for escrow_id in due)

    def record_payment_result(self, result: RecordPaymentResult) -> CommandResult:
        """Record a *verified* payment result. The first result per checkout is final.

        Callers must have confirmed ``result`` with the gateway (see
        :meth:`handle_callback` and :meth:`verify_payments`); callbacks from
        the network never come here directly. Duplicates (same checkout id
        again) return ``replayed=True`` and change nothing; an unknown checkout
        raises :class:`UnknownCheckout`.
        """
        return self._in_transaction(lambda conn: self._record_payment_result_in(conn, result))

    def _record_payment_result_in(
        self, conn: Connection, result: RecordPaymentResult
    ) -> CommandResult:
        row = _LOCK_CHECKOUT.first(conn, {"id": result.checkout_request_id})
        if row is None:
            raise UnknownCheckout(f"no checkout request {result.checkout_request_id!r}")
        escrow_id, result_code = row
        if result_code is not None:
            escrow = self._load(conn, escrow_id, lock=False)
            return CommandResult(escrow.to_dict() if escrow else None, [], True)
        escrow = self._load(conn, escrow_id, lock=True)
        new_events = decide(escrow, result, now=self.clock.now(), ids=self.ids)
        _SETTLE_CHECKOUT.execute(
            conn,
            {
                "id": result.checkout_request_id,
                "result_code": result.result_code,
                "result_desc": result.result_desc,
                "receipt": result.receipt,
                "settled_at": self.clock.now(),
            },
        )
        new = self._apply(conn, escrow, new_events)
        return CommandResult(new.to_dict() if new else None, new_events)

    # -- callbacks and verification -------------------------------------------

    def handle_callback(self, token: str, body: Any) -> CallbackOutcome:
        """A callback that came to ``/mpesa/callback/{token}``: check it, then verify it.

        Rejected before any work: a token that is not ours (403), a body that is
        not a callback (400), a checkout that is not the token's (403), an amount
        or phone that differs from the request (400). Nothing is recorded until
        the gateway's STK Push Query confirms a final result; the queried result
        is the one recorded.
        """
        reference = reference_of(self.payments.callback_secret, token)
        if reference is None:
            return self.reject_token()
        try:
            claim = parse_callback(body)
        except CallbackError as exc:
            return self._reject(400, "malformed", f"not an STK callback: {exc}")
        with self.store.read() as conn:
            request = _SELECT_REQUEST.first(conn, {"reference": reference})
        if request is None:
            return self._reject(404, "unknown_payment", f"no payment {reference}")
        r = dict(zip(_REQUEST_COLUMNS, request, strict=True))
        checkout = claim.checkout_request_id
        if r["checkout_request_id"] is None:
            # Pushed, but the id was never stored (the pusher died or its answer
            # was lost): only the gateway knows this URL, so adopt its id, unless
            # it is another payment's (or another process recorded one meanwhile).
            try:
                self._record_push(reference, checkout)
            except UnknownCheckout as exc:
                return self._reject(403, "checkout_mismatch", str(exc))
        elif r["checkout_request_id"] != checkout:
            return self._reject(
                403, "checkout_mismatch", f"{checkout} is not the checkout of this callback URL"
            )
        if claim.result_code == 0:
            if claim.amount != r["amount"]:
                return self._reject(
                    400,
                    "amount_mismatch",
                    f"amount {claim.amount} was not requested ({r['amount']})",
                )
            if r["phone"] and claim.phone != r["phone"]:
                return self._reject(
                    400, "phone_mismatch", f"phone {claim.phone} was not the phone prompted"
                )
        with self.store.begin() as conn:
            # Due now: if this query goes unanswered, any process's next pass asks again.
            claimed = _CLAIM_CALLBACK.execute(
                conn,
                {
                    "id": checkout,
                    "code": claim.result_code,
                    "receipt": claim.receipt,
                    "due": self.clock.now(),
                },
            ).rowcount
        if not claimed:
            self.payment_stats.count("callbacks", "duplicate")
            return CallbackOutcome(200, "duplicate", "duplicate, already recorded")
        outcome, result = self.verify_payment(checkout)
        unverified = outcome in ("pending", "unavailable")
        self.payment_stats.count("callbacks", "unverified" if unverified else outcome)
        if outcome == "applied":
            return CallbackOutcome(200, outcome, "Accepted", result)
        if outcome == "duplicate":
            return CallbackOutcome(200, outcome, "duplicate, already recorded", result)
        if outcome == "contradicted":
            return CallbackOutcome(
                409, outcome, "the gateway reports a different result; the gateway's was recorded"
            )
        return CallbackOutcome(
            202, "unverified", f"received; not recorded until the gateway confirms it ({outcome})"
        )

    def genuine_callback_token(self, token: str) -> bool:
        """Whether ``token`` is a callback token this service made (no I/O)."""
        return reference_of(self.payments.callback_secret, token) is not None

    def reject_token(self) -> CallbackOutcome:
        return self._reject(403, "bad_token", "not a callback URL this service made")

    def _reject(self, status: int, reason: str, detail: str) -> CallbackOutcome:
        self.payment_stats.count("callbacks", f"rejected_{reason}")
        log.warning("M-Pesa callback rejected (%s): %s", reason, detail)
        return CallbackOutcome(status, f"rejected_{reason}", detail)

    def verify_payment(self, checkout: str) -> tuple[str, CommandResult | None]:
        """Ask the gateway about one unsettled checkout and record a final answer.

        Returns ``(outcome, result)``: ``applied`` (or ``contradicted``, when a
        trusted callback had claimed otherwise: the gateway's answer is
        recorded either way), ``pending`` / ``unavailable`` (nothing changed,
        asked again later), or ``duplicate`` (already settled).
        """
        assert self.gateway is not None
        with self.store.read() as conn:
            row = _SELECT_CHECKOUT.first(conn, {"id": checkout})
        if row is None:
            raise UnknownCheckout(f"no checkout request {checkout!r}")
        c = dict(zip(_CHECKOUT_COLUMNS, row, strict=True))
        if c["result_code"] is not None:
            return "duplicate", None
        try:
            answer = self.gateway.query(checkout)
        except NotThisGateway:
            self.payment_stats.count("verifications", "not_this_gateway")
            return "unavailable", None  # due as it was: another process's gateway answers
        except GatewayUnavailable as exc:
            log.info("STK query for %s unanswered: %s", checkout, exc)
            self._retry_later(checkout, c["verify_attempts"])
            self.payment_stats.count("verifications", "unavailable")
            return "unavailable", None
        if answer.pending:
            self._retry_later(checkout, c["verify_attempts"])
            self.payment_stats.count("verifications", "pending")
            return "pending", None
        code = answer.result_code
        assert code is not None
        contradicted = c["claimed_code"] is not None and c["claimed_code"] != code
        if contradicted:
            log.warning(
                "callback for %s claimed %s, the gateway says %s", checkout, c["claimed_code"], code
            )
        receipt = c["claimed_receipt"] if code == 0 and c["claimed_code"] == 0 else None
        result = self.record_payment_result(
            RecordPaymentResult(
                checkout_request_id=checkout,
                result_code=code,
                result_desc=answer.result_desc,
                receipt=receipt,
                amount=c["amount"],
            )
        )
        if result.replayed:
            return "duplicate", result
        outcome = "contradicted" if contradicted else "applied"
        self.payment_stats.count("verifications", outcome)
        return outcome, result

    def _retry_later(self, checkout: str, attempts: int) -> None:
        p = self.payments
        delay = min(p.retry_s * 2 ** min(attempts, 20), p.retry_max_s)
        with self.store.begin() as conn:
            _RETRY_VERIFY.execute(
                conn,
                {"id": checkout, "due": self.clock.now() + delay, "attempts": attempts + 1},
            )

    def verify_payments(self, limit: int = 100) -> Counter[str]:
        """The reconciliation pass: send owed pushes, verify checkouts that are due.

        A push is owed when the process that committed it died before sending
        it (or before recording the gateway's answer); it is sent again once its
        ``push_due_at`` has passed. A checkout is due when its callback has not
        come within ``verify_after_s`` or an earlier query went unanswered.
        Safe to run in several processes at once. Returns counts by outcome.
        """
        outcomes: Counter[str] = Counter()
        now = self.clock.now()
        owed = (
            select(payment_requests.c.reference, payment_requests.c.push_due_at)
            .where(payment_requests.c.state == "pushing", payment_requests.c.push_due_at <= now)
            .order_by(payment_requests.c.push_due_at)
            .limit(limit)
        )
        due = (
            select(checkouts.c.checkout_request_id)
            .where(checkouts.c.result_code.is_(None), checkouts.c.verify_due_at <= now)
            .order_by(checkouts.c.verify_due_at)
            .limit(limit)
        )
        with self.store.read() as conn:
            owed_rows = list(conn.execute(owed))
            due_ids = list(conn.execute(due).scalars())
        for reference, push_due_at in owed_rows:
            outcomes["push_" + self._resend(reference, push_due_at)] += 1
        for checkout in due_ids:
            outcomes[self.verify_payment(checkout)[0]] += 1
        return outcomes

    def _resend(self, reference: str, push_due_at: float) -> str:
        with self.store.begin() as conn:
            claimed = _CLAIM_PUSH.execute(
                conn,
                {
                    "reference": reference,
                    "due": self.clock.now() + self.payments.push_grace_s,
                    "old": push_due_at,
                },
            ).rowcount
            if not claimed:
                return "taken"  # another pass has it
            r = dict(
                zip(
                    _REQUEST_COLUMNS,
                    _SELECT_REQUEST.first(conn, {"reference": reference}),
                    strict=True,
                )
            )
            escrow = self._load(conn, r["escrow_id"], lock=False)
        if escrow is None or escrow.state is not EscrowState.CREATED:
            self._abandon(reference)  # the escrow moved on; nobody wants this prompt now
            return "abandoned"
        self.payment_stats.count("pushes", "resent")
        try:
            checkout = self._push(reference, r["escrow_id"], r["amount"], r["phone"])
        except GatewayUnavailable:
            return "failed"  # stays owed: the next pass after push_grace_s tries again
        self._record_push(reference, checkout)
        return "sent"

    # -- the transaction -------------------------------------------------------

    def _run(self, escrow_id: str, command: Command, key: str | None) -> CommandResult:
        return self._execute(escrow_id, command, key, _fingerprint(escrow_id, command))

    def _execute(
        self,
        escrow_id: str,
        command: Command,
        key: str | None,
        fingerprint: str,
        on_create: Callable[[Connection, float], None] | None = None,
    ) -> CommandResult:
        return self._in_transaction(
            lambda conn: self._execute_in(conn, escrow_id, command, key, fingerprint, on_create)
        )

    def _execute_in(
        self,
        conn: Connection,
        escrow_id: str,
        command: Command,
        key: str | None,
        fingerprint: str,
        on_create: Callable[[Connection, float], None] | None,
    ) -> CommandResult:
        if key is not None:
            stored = _SELECT_COMMAND.first(conn, {"key": key})
            if stored is not None:
                stored_fingerprint, stored_command, response = stored
                if stored_fingerprint != fingerprint:
                    raise IdempotencyKeyReused(
                        f"idempotency key {key!r} was used for a different {stored_command} command"
                    )
                return CommandResult.from_json(response, replayed=True)
        escrow = self._load(conn, escrow_id, lock=True)
        if isinstance(command, CreateEscrow) and escrow is not None:
            raise DomainError(f"escrow {escrow_id!r} already exists")
        if not isinstance(command, CreateEscrow) and escrow is None:
            raise EscrowNotFound(f"no escrow {escrow_id!r}")
        now = self.clock.now()
        new_events = decide(escrow, command, now=now, ids=self.ids)
        new = self._apply(conn, escrow, new_events)
        if on_create is not None:
            on_create(conn, now)
        result = CommandResult(new.to_dict() if new else None, new_events)
        if key is not None:
            _store_response(conn, key, command.name, escrow_id, fingerprint, result, now)
        return result

    def _in_transaction(self, body: Callable[[Connection], _T]) -> _T:
        """``body(conn)`` in one transaction, run afresh if a concurrent twin won a race.

        An ``IntegrityError`` means another transaction committed first a row
        this one meant to insert (the same idempotency key, the same new escrow
        id, the same checkout): the transaction is rolled back and ``body``
        runs again, now finding that row and answering from it. After
        :data:`_ATTEMPTS` attempts the error propagates.
        """
        for attempt in range(_ATTEMPTS):
            try:
                with self.store.begin() as conn:
                    return body(conn)
            except IntegrityError:
                if attempt == _ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    def _partition_of(self, escrow_id: str) -> int:
        return self.partitioning.of(escrow_id) if self.partitioning else 0

    def _load(self, conn: Connection, escrow_id: str, *, lock: bool) -> Escrow | None:
        if "\x00" in escrow_id:  # no id has one, and PostgreSQL's text cannot be asked for it
            return None
        row = (_LOCK_ESCROW if lock else _SELECT_ESCROW).first(conn, {"id": escrow_id})
        return _row_to_escrow(row) if row else None

    def _apply(
        self, conn: Connection, escrow: Escrow | None, new_events: list[ev.Event]
    ) -> Escrow | None:
        if not new_events:
            return escrow
        new = escrow
        for event in new_events:
            new = evolve(new, event, self.timeouts)
        assert new is not None
        values = new.to_dict()
        values["state"] = new.state.value
        if escrow is None:
            _INSERT_ESCROW.execute(conn, values)
        else:
            _UPDATE_ESCROW.execute(
                conn, {**values, "old_id": new.id, "old_version": escrow.version}
            )
        _INSERT_OUTBOX.executemany(
            conn,
            [
                {
                    "event_id": e.event_id,
                    "stream": e.aggregate_type,
                    "type": e.type,
                    "data": ev.encode(e),
                    "created_at": e.occurred_at,
                    "partition": self._partition_of(e.aggregate_id),
                }
                for e in new_events
            ],
        )
        return new


def _store_response(
    conn: Connection,
    key: str,
    command: str,
    escrow_id: str,
    fingerprint: str,
    result: CommandResult,
    now: float,
) -> None:
    """Keep a command's response under its idempotency key, in its own transaction."""
    _INSERT_COMMAND.execute(
        conn,
        {
            "idempotency_key": key,
            "command": command,
            "escrow_id": escrow_id,
            "fingerprint": fingerprint,
            "response": result.to_json(),
            "created_at": now,
        },
    )
