"""Escrow commands and the one escrow query: ``/escrows`` and ``/escrows/{id}/...``.

Each command route only says what is particular to it (its body, its
service method, what it adds to the answer) and hands the rest to the shared
command path (:mod:`workbench.http.commands`): authenticate, scope the
idempotency key, call the service, map the result or the refusal.

Bodies are validated with strict types (an amount is a JSON integer, never
``true``, ``"100"`` or ``100.0``) after strict JSON parsing
(:class:`~workbench.http.edge.StrictJsonRoute`); the body models carry no
docstrings on purpose, since a docstring would change the published schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from workbench.http import edge
from workbench.http.commands import Caller
from workbench.http.dependencies import State, User
from workbench.http.errors import Forbidden
from workbench.service import CommandResult

USER_ID = r"^[A-Za-z0-9_.:@-]{1,64}$"
_NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL

router = APIRouter(route_class=edge.StrictJsonRoute)

# -- request bodies ---------------------------------------------------------------------

UserId = Annotated[str, Field(pattern=USER_ID, description="a user id: letters, digits, _.:@-")]


# Strict: an amount is a JSON integer (not true, "100" or 100.0), a text is a string.
_STRICT = ConfigDict(strict=True)


class CreateEscrowBody(BaseModel):
    model_config = _STRICT

    buyer_id: UserId
    seller_id: UserId
    amount: int = Field(gt=0, le=10_000_000, description="KES, whole shillings")
    description: str = Field(default="", max_length=500, pattern=_NO_NUL)


class FundBody(BaseModel):
    model_config = _STRICT

    phone: str = Field(default="254700000000", pattern=r"^2547\d{8}$")


class ShipBody(BaseModel):
    model_config = _STRICT

    tracking: str = Field(default="", max_length=100, pattern=_NO_NUL)


class ReasonBody(BaseModel):
    model_config = _STRICT

    reason: str = Field(default="", max_length=500, pattern=_NO_NUL)


class ResolveBody(BaseModel):
    model_config = _STRICT

    outcome: Literal["refund", "release"]
    note: str = Field(default="", max_length=500, pattern=_NO_NUL)


# -- routes -----------------------------------------------------------------------------
# Route names and docstrings are part of the published OpenAPI (operation ids,
# descriptions): keep them as they are.


@router.post("/escrows", status_code=201, tags=["commands"])
async def create_escrow(body: CreateEscrowBody, caller: Caller) -> dict[str, Any]:
    """Open an escrow between a buyer and a seller; the caller must be one of them."""
    if caller.user not in (body.buyer_id, body.seller_id):
        raise Forbidden(f"{caller.user!r} is neither the buyer nor the seller")
    return await caller.run(
        lambda service, actor, key: service.create(
            body.buyer_id,
            body.seller_id,
            body.amount,
            body.description,
            idempotency_key=key,
            actor=actor,
        )
    )


@router.get("/escrows/{escrow_id}", tags=["queries"])
async def get_escrow(escrow_id: str, user: User, state: State) -> dict[str, Any]:
    escrow = await run_in_threadpool(state.service.get, escrow_id)
    if user not in (escrow.buyer_id, escrow.seller_id, "admin"):
        raise Forbidden(f"{user!r} is not a party to {escrow_id}")
    return escrow.to_dict()


def _checkout(result: CommandResult) -> dict[str, Any]:
    # The id the phone's STK prompt belongs to, for clients that track the push.
    return {"checkout_request_id": (result.escrow or {}).get("checkout_request_id")}


@router.post("/escrows/{escrow_id}/fund", tags=["commands"])
async def fund(escrow_id: str, caller: Caller, body: FundBody | None = None) -> dict[str, Any]:
    """Start the M-Pesa STK push to the buyer's phone."""
    phone = (body or FundBody()).phone
    return await caller.run(
        lambda service, actor, key: service.fund(escrow_id, actor, phone, idempotency_key=key),
        extra=_checkout,
    )


@router.post("/escrows/{escrow_id}/ship", tags=["commands"])
async def ship(escrow_id: str, caller: Caller, body: ShipBody | None = None) -> dict[str, Any]:
    tracking = (body or ShipBody()).tracking
    return await caller.run(
        lambda service, actor, key: service.ship(escrow_id, actor, tracking, idempotency_key=key)
    )


@router.post("/escrows/{escrow_id}/confirm", tags=["commands"])
async def confirm(escrow_id: str, caller: Caller) -> dict[str, Any]:
    return await caller.run(
        lambda service, actor, key: service.confirm(escrow_id, actor, idempotency_key=key)
    )


@router.post("/escrows/{escrow_id}/dispute", tags=["commands"])
async def dispute(escrow_id: str, caller: Caller, body: ReasonBody | None = None) -> dict[str, Any]:
    reason = (body or ReasonBody()).reason
    return await caller.run(
        lambda service, actor, key: service.dispute(escrow_id, actor, reason, idempotency_key=key)
    )


@router.post("/escrows/{escrow_id}/resolve", tags=["commands"])
async def resolve(escrow_id: str, body: ResolveBody, caller: Caller) -> dict[str, Any]:
    """Resolve a dispute (the ``admin`` user only): refund the buyer or release."""
    return await caller.run(
        lambda service, actor, key: service.resolve(
            escrow_id, actor, body.outcome, body.note, idempotency_key=key
        )
    )


@router.post("/escrows/{escrow_id}/cancel", tags=["commands"])
async def cancel(escrow_id: str, caller: Caller, body: ReasonBody | None = None) -> dict[str, Any]:
    reason = (body or ReasonBody()).reason
    return await caller.run(
        lambda service, actor, key: service.cancel(escrow_id, actor, reason, idempotency_key=key)
    )
