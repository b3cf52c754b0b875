"""Property test: random command sequences through EscrowService keep every invariant.

Each example gets a fresh SQLite store, creates a few escrows, then applies a
random sequence of fund / callback ok / callback fail / duplicate callback /
ship / confirm / dispute / resolve / cancel / expire (with clock advances) /
idempotent retry, with random actors, wrong ones included. Afterwards:

(a) money is conserved: the ledger built from the whole outbox is balanced,
    funded = held + released + refunded, and each escrow holds its amount
    exactly while it is funded, shipped or disputed, and nothing otherwise;
(b) every escrow row equals ``replay`` of its events in the outbox;
(c) each escrow's sequences in the outbox are 1..n, in outbox order;
(d) a rejected command emitted nothing and changed nothing (checked after
    every step), and an accepted one emitted exactly what it returned.
"""

from __future__ import annotations

import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from workbench.domain import events as ev
from workbench.domain.clock import ManualClock
from workbench.domain.escrow import ADMIN, MAX_AMOUNT, MIN_AMOUNT, DomainError, EscrowState, replay
from workbench.domain.ids import IdFactory
from workbench.handlers.ledger import LedgerHandler, balances, check_ledger
from workbench.payments.mpesa import (
    RESULT_CANCELLED_BY_USER,
    RESULT_OK,
    parse_callback,
    stk_callback,
)
from workbench.service import CommandResult, EscrowService
from workbench.store import Store, checkouts, commands, escrows, outbox

# "right" is whoever may issue the command; the others are often wrong. Kinds and
# actors repeat to weight the draw towards progress through the lifecycle.
ACTORS = ("right",) * 6 + ("buyer", "seller", ADMIN, "stranger", "other-buyer")
KINDS = (
    ("fund",) * 3
    + ("callback_ok",) * 4
    + ("callback_fail", "duplicate", "duplicate")
    + ("ship",) * 3
    + ("confirm",) * 2
    + ("dispute", "resolve", "resolve", "cancel", "expire", "expire", "advance", "advance")
    + ("retry",)
    + ("next",) * 16
)
# "next" takes the escrow one step along its lifecycle; the choice picks a branch.
NEXT = {
    EscrowState.CREATED: ("fund",) * 4,
    EscrowState.AWAITING_PAYMENT: ("callback_ok", "callback_ok", "callback_fail", "cancel"),
    EscrowState.FUNDED: ("ship", "ship", "dispute", "cancel"),
    EscrowState.SHIPPED: ("confirm", "confirm", "dispute", "expire"),
    EscrowState.DISPUTED: ("resolve",) * 4,
}
RIGHT_ACTOR = {
    "fund": "buyer",
    "ship": "seller",
    "confirm": "buyer",
    "dispute": "buyer",
    "resolve": ADMIN,
    "cancel": "seller",
}
# Small steps, and steps past each timeout (payment 15 min, confirm 3 d, ship 7 d).
ADVANCES = (1.0, 60.0, 901.0, 3 * 86400 + 1.0, 7 * 86400 + 1.0)
OUTCOMES = ("refund", "release", "split")
HOLDING = (EscrowState.FUNDED, EscrowState.SHIPPED, EscrowState.DISPUTED)


class Gateway:
    """Daraja stand-in: records each STK push; callbacks are sent by the test."""

    def __init__(self) -> None:
        self.by_escrow: dict[str, list[str]] = defaultdict(list)
        self.count = 0

    def stk_push(
        self,
        escrow_id: str,
        amount: int,
        phone: str,
        *,
        reference: str = "",
        callback_url: str = "",
    ) -> str:
        self.count += 1
        checkout = f"ws_CO_{self.count:06d}"
        self.by_escrow[escrow_id].append(checkout)
        return checkout


def outbox_events(store: Store) -> list[ev.Event]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.data).order_by(outbox.c.seq)).scalars().all()
    return [ev.decode(bytes(data)) for data in rows]


class Snapshot(NamedTuple):
    """What a command may change: escrow rows, checkouts, outbox and idempotency keys."""

    escrows: list[Any]
    checkouts: list[Any]
    outbox_count: int
    outbox_last: int | None
    commands: int


def snapshot(store: Store) -> Snapshot:
    with store.engine.connect() as conn:
        count, last = conn.execute(select(func.count(), func.max(outbox.c.seq))).one()
        return Snapshot(
            conn.execute(select(escrows).order_by(escrows.c.id)).all(),
            conn.execute(select(checkouts).order_by(checkouts.c.checkout_request_id)).all(),
            count,
            last,
            conn.execute(select(func.count()).select_from(commands)).scalar_one(),
        )


def event_ids_after(store: Store, seq: int | None) -> list[str]:
    query = select(outbox.c.event_id).order_by(outbox.c.seq)
    if seq is not None:
        query = query.where(outbox.c.seq > seq)
    with store.engine.connect() as conn:
        return list(conn.execute(query).scalars())


step = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 3),  # which escrow
    st.sampled_from(ACTORS),
    st.integers(0, 7),  # a choice: branch, checkout, outcome, advance, wrong amount
    st.booleans(),  # with an idempotency key?
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    amounts=st.lists(st.integers(MIN_AMOUNT, MAX_AMOUNT), min_size=1, max_size=4),
    steps=st.lists(step, min_size=10, max_size=60),
)
def _property(amounts: list[int], steps: list[tuple[str, int, str, int, bool]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/x.db")
        try:
            store.reset()
            _run_example(store, amounts, steps)
            REACHED.update({e.type for e in outbox_events(store)})
        finally:
            store.close()


#: Per event type, how many examples emitted it (the property's reach).
REACHED: Counter[str] = Counter()


def test_random_command_sequences_keep_invariants() -> None:
    REACHED.clear()
    _property()
    # The examples must reach every end of the lifecycle, the rare ones included:
    # a property that never resolves a dispute cannot find a bug in resolving one.
    ends = ("escrow.released", "escrow.confirmed", "dispute.resolved", "escrow.refunded",
            "escrow.cancelled", "escrow.expired", "payment.refunded", "payment.failed")  # fmt: skip
    for end in ends:
        assert REACHED[end] >= 5, (end, sorted(REACHED.items()))


def _run_example(
    store: Store, amounts: list[int], steps: list[tuple[str, int, str, int, bool]]
) -> None:
    clock = ManualClock()
    gateway = Gateway()
    service = EscrowService(store, clock=clock, ids=IdFactory(3), gateway=gateway)

    ids = [f"esc-{i}" for i in range(len(amounts))]
    # Buyers are shared between escrows, so account balances aggregate.
    parties = {e: (f"buyer-{i % 2}", f"seller-{i}") for i, e in enumerate(ids)}
    for e, amount in zip(ids, amounts, strict=True):
        service.create(*parties[e], amount, escrow_id=e)

    delivered: list[dict[str, Any]] = []
    settled: set[str] = set()
    last_keyed: list[Callable[[], CommandResult]] = []

    def actor(escrow_id: str, who: str, kind: str) -> str:
        buyer, seller = parties[escrow_id]
        if who == "right":
            who = RIGHT_ACTOR[kind]
        return {
            "buyer": buyer,
            "seller": seller,
            "other-buyer": "buyer-1" if buyer == "buyer-0" else "buyer-0",
        }.get(who, who)

    for n, (kind, index, who, choice, keyed) in enumerate(steps):
        e = ids[index % len(ids)]
        amount = amounts[index % len(ids)]
        key = f"key-{n}" if keyed else None
        if kind == "next":
            state = service.get(e).state
            if state.terminal:
                # Money may still arrive: a late callback on an unsettled checkout, or a repeat.
                kind = "callback_ok" if choice % 2 else "duplicate"
            else:
                kind = NEXT[state][choice % 4]
                who = "right"
                # The newest checkout for a callback; refund or release, never "split".
                choice = 0 if kind.startswith("callback") else choice // 4 * 4
        before = snapshot(store)
        action: Callable[[], Any] | None = None
        expect_replay = False
        checkout = ""
        who_id = actor(e, who, kind) if kind in RIGHT_ACTOR else ""
        match kind:
            case "fund":
                action = partial(service.fund, e, who_id, idempotency_key=key)
            case "callback_ok" | "callback_fail":
                tried = gateway.by_escrow[e]
                if not tried:
                    continue
                checkout = tried[-1 - choice % len(tried)]  # usually the newest
                code = RESULT_OK if kind == "callback_ok" else RESULT_CANCELLED_BY_USER
                paid = amount + 1 if choice == 7 else amount  # sometimes a wrong amount
                body = stk_callback(checkout, code, amount=paid, receipt=f"R{n:04d}")
                expect_replay = checkout in settled
                delivered.append(body)
                action = partial(service.record_payment_result, parse_callback(body))
            case "duplicate":
                if not delivered:
                    continue
                body = delivered[choice % len(delivered)]
                checkout = body["Body"]["stkCallback"]["CheckoutRequestID"]
                expect_replay = checkout in settled
                action = partial(service.record_payment_result, parse_callback(body))
            case "ship":
                action = partial(service.ship, e, who_id, "TRK", idempotency_key=key)
            case "confirm":
                action = partial(service.confirm, e, who_id, idempotency_key=key)
            case "dispute":
                action = partial(service.dispute, e, who_id, "broken", idempotency_key=key)
            case "resolve":
                outcome = OUTCOMES[choice % len(OUTCOMES)]
                action = partial(service.resolve, e, who_id, outcome, idempotency_key=key)
            case "cancel":
                action = partial(service.cancel, e, who_id, "changed mind", idempotency_key=key)
            case "expire":
                clock.advance(ADVANCES[choice % len(ADVANCES)])
                last = snapshot(store).outbox_last
                emitted = service.expire_due()
                assert len(event_ids_after(store, last)) == emitted
                continue
            case "advance":
                clock.advance(ADVANCES[choice % len(ADVANCES)])
                continue
            case "retry":
                if not last_keyed:
                    continue
                result = last_keyed[-1]()
                assert result.replayed is True
                assert snapshot(store) == before, "an idempotent retry changed the store"
                continue
        assert action is not None
        try:
            result = action()
        except DomainError:
            # (d) a rejected command emitted nothing and changed nothing.
            assert snapshot(store) == before, f"rejected {kind} changed the store"
            continue
        after = snapshot(store)
        new_ids = event_ids_after(store, before.outbox_last)
        assert after.outbox_count == before.outbox_count + len(new_ids)
        if expect_replay:
            assert result.replayed is True
            assert after == before, f"duplicate callback for {e} changed the store"
            continue
        assert result.replayed is False
        # An accepted command emitted exactly the events it returned.
        assert new_ids == [event.event_id for event in result.events]
        if kind in ("callback_ok", "callback_fail", "duplicate"):
            settled.add(checkout)  # the first accepted result for a checkout is final
            # Money that arrives is always recorded: it funds the escrow or goes back.
            if parse_callback(body).result_code == RESULT_OK:
                assert result.event_types[0] == "payment.received"
                assert result.event_types[1] in ("escrow.funded", "payment.refunded")
                assert result.events[0].payload["amount"] == amount
            else:
                assert result.event_types in ([], ["payment.failed"])
        if key is not None:
            last_keyed.append(action)

    _check_invariants(store, service, clock, ids, amounts, parties)


def _check_invariants(
    store: Store,
    service: EscrowService,
    clock: ManualClock,
    ids: list[str],
    amounts: list[int],
    parties: dict[str, tuple[str, str]],
) -> None:
    events = outbox_events(store)
    assert len({e.event_id for e in events}) == len(events)

    # (c) per-escrow sequences are 1..n without gaps, in outbox order.
    by_escrow: dict[str, list[ev.Event]] = defaultdict(list)
    for event in events:
        by_escrow[event.aggregate_id].append(event)
    assert set(by_escrow) == set(ids)
    for escrow_id, log in by_escrow.items():
        assert [e.sequence for e in log] == list(range(1, len(log) + 1)), escrow_id

    # (b) every escrow row is the fold of its events.
    for escrow_id in ids:
        stored = service.get(escrow_id)
        assert replay(by_escrow[escrow_id]) == stored
        assert stored.version == len(by_escrow[escrow_id])

    # (a) money is conserved and sits where the states say it is.
    LedgerHandler(store, clock).handle(events)
    check = check_ledger(store)
    assert check.ok, check
    money = balances(store)
    held = 0
    buyer_paid: dict[str, int] = defaultdict(int)
    for escrow_id, amount in zip(ids, amounts, strict=True):
        escrow = service.get(escrow_id)
        expected = amount if escrow.state in HOLDING else 0
        held += expected
        assert money.get(f"hold:{escrow_id}", 0) == expected, (escrow_id, escrow.state)
        if escrow.state in HOLDING or escrow.state is EscrowState.RELEASED:
            buyer_paid[parties[escrow_id][0]] += amount
        funded_events = [e for e in by_escrow[escrow_id] if e.type == "escrow.funded"]
        assert len(funded_events) <= 1
    assert check.held == held
    for buyer in {b for b, _ in parties.values()}:
        assert money.get(f"buyer:{buyer}", 0) == -buyer_paid[buyer], buyer
    # Posting the whole log again changes nothing.
    LedgerHandler(store, clock).handle(events)
    assert balances(store) == money
