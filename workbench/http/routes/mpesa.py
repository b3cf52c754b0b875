"""M-Pesa callbacks: ``POST /mpesa/callback/{token}``, the per-push URL.

The service gave the gateway this URL with one STK push (see
:mod:`workbench.payments.mpesa`). A callback is only a claim: it is refused
unless it comes from an allowed address (``WORKBENCH_MPESA_ALLOW``), carries
this push's token and names the checkout, amount and phone that were
requested, and it is recorded only once the gateway's STK Push Query confirms
a final result (202 until then). Duplicates are accepted and change nothing.

Answers are in Daraja's acknowledgement shape (``ResultCode``, ``ResultDesc``),
not the app's error shape: the gateway is the client here. The retired
``POST /mpesa/callback`` (no token) answers 410.
"""

from __future__ import annotations

import ipaddress
import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from workbench.http import edge
from workbench.http.dependencies import State
from workbench.http.settings import Network
from workbench.service import CallbackOutcome

log = logging.getLogger(__name__)

router = APIRouter(route_class=edge.StrictJsonRoute)


@router.post("/mpesa/callback/{token}", tags=["mpesa"])
async def mpesa_callback(token: str, request: Request, state: State) -> JSONResponse:
    """Daraja STK callback, at the URL made for one push.

    A claim, not a fact: rejected unless the token is this push's and the
    checkout, amount and phone are what was requested; recorded only when
    the gateway's STK Push Query confirms a final result (202 until then).
    Duplicates are accepted and change nothing.
    """
    if state.settings.gateway_allow and not _allowed(request, state.settings.gateway_allow):
        state.service.payment_stats.count("callbacks", "rejected_source")
        host = request.client.host if request.client else "?"
        log.warning("M-Pesa callback from %s refused: not in WORKBENCH_MPESA_ALLOW", host)
        return _daraja(403, "callbacks are accepted from the gateway's addresses only")
    if not state.service.genuine_callback_token(token):
        # Before reading the body: a forger's request costs us one HMAC.
        refused = state.service.reject_token()
        return _daraja(refused.status, refused.detail)
    try:
        body = await request.json()
    except ValueError:
        state.service.payment_stats.count("callbacks", "rejected_malformed")
        return _daraja(400, "body is not JSON")
    outcome: CallbackOutcome = await run_in_threadpool(state.service.handle_callback, token, body)
    return _daraja(outcome.status, outcome.detail)


@router.post("/mpesa/callback", tags=["mpesa"], status_code=410)
async def mpesa_callback_retired(state: State) -> JSONResponse:
    """Retired: callbacks go to the per-push URL ``/mpesa/callback/{token}``."""
    state.service.payment_stats.count("callbacks", "rejected_bad_token")
    return _daraja(410, "callbacks go to the per-checkout CallBackURL given with the push")


def _daraja(status: int, description: str) -> JSONResponse:
    # Daraja's acknowledgement shape: ResultCode 0 accepted, anything else rejected.
    return JSONResponse(
        {"ResultCode": 0 if status in (200, 202) else 1, "ResultDesc": description},
        status_code=status,
    )


def _allowed(request: Request, networks: tuple[Network, ...]) -> bool:
    if request.client is None:
        return False
    try:
        address = ipaddress.ip_address(request.client.host)
    except ValueError:
        return False
    return any(address in network for network in networks)
