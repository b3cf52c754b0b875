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
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from workbench import events as ev
from workbench.clock import ManualClock
from workbench.escrow import ADMIN, MAX_AMOUNT, MIN_AMOUNT, DomainError, EscrowState, replay
from workbench.handlers.ledger import LedgerHandler, balances, check_ledger
from workbench.ids import IdFactory
from workbench.mpesa import RESULT_CANCELLED_BY_USER, RESULT_OK, parse_callback, stk_callback
from workbench.service import CommandResult, EscrowService
from workbench.store import Store, commands, escrows, outbox

ACTORS = ("buyer", "seller", ADMIN, "stranger", "other-buyer")
KINDS = (
    "fund",
    "callback_ok",
    "callback_fail",
    "duplicate",
    "ship",
    "confirm",
    "dispute",
    "resolve",
    "cancel",
    "expire",
    "advance",
    "retry",
)
# Small steps, and steps past each timeout (payment 15 min, confirm 3 d, ship 7 d).
ADVANCES = (1.0, 60.0, 901.0, 3 * 86400 + 1.0, 7 * 86400 + 1.0)
OUTCOMES = ("refund", "release", "split")
HOLDING = (EscrowState.FUNDED, EscrowState.SHIPPED, EscrowState.DISPUTED)


class Gateway:
    """Daraja stand-in: records each STK push; callbacks are sent by the test."""

    def __init__(self) -> None:
        self.by_escrow: dict[str, list[str]] = defaultdict(list)
        self.count = 0

    def stk_push(self, escrow_id: str, amount: int, phone: str) -> str:
        self.count += 1
        checkout = f"ws_CO_{self.count:06d}"
        self.by_escrow[escrow_id].append(checkout)
        return checkout


def outbox_events(store: Store) -> list[ev.Event]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(outbox.c.data).order_by(outbox.c.seq)).scalars().all()
    return [ev.decode(bytes(data)) for data in rows]


def state_of(store: Store) -> tuple[list[Any], list[Any], list[Any]]:
    with store.engine.connect() as conn:
        return (
            conn.execute(select(escrows).order_by(escrows.c.id)).all(),
            conn.execute(select(outbox.c.event_id).order_by(outbox.c.seq)).scalars().all(),
            conn.execute(select(commands).order_by(commands.c.idempotency_key)).all(),
        )


step = st.tuples(
    st.sampled_from(KINDS),
    st.integers(0, 3),  # which escrow
    st.sampled_from(ACTORS),
    st.integers(0, 7),  # a choice: checkout, outcome, advance, key or not
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    amounts=st.lists(st.integers(MIN_AMOUNT, MAX_AMOUNT), min_size=1, max_size=4),
    steps=st.lists(step, min_size=1, max_size=40),
)
def test_random_command_sequences_keep_invariants(
    amounts: list[int], steps: list[tuple[str, int, str, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/x.db")
        try:
            store.reset()
            _run_example(store, amounts, steps)
        finally:
            store.close()


def _run_example(store: Store, amounts: list[int], steps: list[tuple[str, int, str, int]]) -> None:
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

    def actor(escrow_id: str, who: str) -> str:
        buyer, seller = parties[escrow_id]
        return {
            "buyer": buyer,
            "seller": seller,
            "other-buyer": "buyer-1" if buyer == "buyer-0" else "buyer-0",
        }.get(who, who)

    for n, (kind, index, who, choice) in enumerate(steps):
        e = ids[index % len(ids)]
        amount = amounts[index % len(ids)]
        key = f"key-{n}" if choice % 2 else None
        before = state_of(store)
        action: Callable[[], Any] | None = None
        expect_replay = False
        checkout = ""
        match kind:
            case "fund":
                action = lambda e=e, who=who, key=key: service.fund(  # noqa: E731
                    e, actor(e, who), idempotency_key=key
                )
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
                action = lambda body=body: service.record_payment_result(  # noqa: E731
                    parse_callback(body)
                )
            case "duplicate":
                if not delivered:
                    continue
                body = delivered[choice % len(delivered)]
                checkout = body["Body"]["stkCallback"]["CheckoutRequestID"]
                expect_replay = checkout in settled
                action = lambda body=body: service.record_payment_result(  # noqa: E731
                    parse_callback(body)
                )
            case "ship":
                action = lambda e=e, who=who, key=key: service.ship(  # noqa: E731
                    e, actor(e, who), "TRK", idempotency_key=key
                )
            case "confirm":
                action = lambda e=e, who=who, key=key: service.confirm(  # noqa: E731
                    e, actor(e, who), idempotency_key=key
                )
            case "dispute":
                action = lambda e=e, who=who, key=key: service.dispute(  # noqa: E731
                    e, actor(e, who), "broken", idempotency_key=key
                )
            case "resolve":
                outcome = OUTCOMES[choice % len(OUTCOMES)]
                action = lambda e=e, who=who, key=key, o=outcome: service.resolve(  # noqa: E731
                    e, actor(e, who), o, idempotency_key=key
                )
            case "cancel":
                action = lambda e=e, who=who, key=key: service.cancel(  # noqa: E731
                    e, actor(e, who), "changed mind", idempotency_key=key
                )
            case "expire":
                clock.advance(ADVANCES[choice % len(ADVANCES)])
                before = state_of(store)
                emitted = service.expire_due()
                after = state_of(store)
                assert len(after[1]) - len(before[1]) == emitted
                continue
            case "advance":
                clock.advance(ADVANCES[choice % len(ADVANCES)])
                continue
            case "retry":
                if not last_keyed:
                    continue
                result = last_keyed[-1]()
                assert result.replayed is True
                assert state_of(store) == before, "an idempotent retry changed the store"
                continue
        assert action is not None
        try:
            result = action()
        except DomainError:
            # (d) a rejected command emitted nothing and changed nothing.
            assert state_of(store) == before, f"rejected {kind} changed the store"
            continue
        after = state_of(store)
        new_ids = after[1][len(before[1]) :]
        assert after[1][: len(before[1])] == before[1]
        if expect_replay:
            assert result.replayed is True
            assert after == before, f"duplicate callback for {e} changed the store"
            continue
        assert result.replayed is False
        # An accepted command emitted exactly the events it returned.
        assert new_ids == [event.event_id for event in result.events]
        if kind in ("callback_ok", "callback_fail", "duplicate"):
            settled.add(checkout)  # the first accepted result for a checkout is final
        if key is not None:
            last_keyed.append(action)
        from hypothesis import event as _hev
        _hev(f"accepted {kind} -> {result.event_types}")

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
        from hypothesis import event as _hev
        _hev(f"final {escrow.state.value}")
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
