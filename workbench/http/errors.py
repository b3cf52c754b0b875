"""How a refusal looks on the wire: one JSON shape, one status per reason.

Every refusal the app makes is ``{"error": <code>, "detail": <text>}`` with a
status that says what the client can do about it:

* a :class:`~workbench.domain.escrow.DomainError` (the service said no) gets
  the status of its ``code`` (:data:`STATUS`: unknown escrow 404, not a party
  403, illegal transition 409, bad command 422, too many creates 429 with
  ``Retry-After``); a code not in the table is a conflict (409);
* :class:`Unauthorized` (no or bad token) is 401 with ``WWW-Authenticate``;
  :class:`Forbidden` (a valid user asking for what is not theirs) is 403;
* Redis unreachable, or up but refusing for a while (a script past its time
  limit, a cluster failing over), is 503 ``Retry-After: 2``; the M-Pesa gateway refusing a
  push is 503 ``Retry-After: 5`` (nothing was emitted, a retry is safe).

A refused command changed nothing: the service applies a command in one
transaction or not at all. :func:`install` registers the handlers on an app.
"""

from __future__ import annotations

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from workbench.domain.escrow import DomainError
from workbench.payments.mpesa import GatewayUnavailable
from workbench.service import RateLimited
from workbench.streams.connection import transient

STATUS = {
    "not_found": 404,
    "unknown_checkout": 404,
    "not_allowed": 403,
    "illegal_transition": 409,
    "idempotency_conflict": 409,
    "payment_in_progress": 409,
    "invalid_command": 422,
    "rate_limited": 429,
}


class Unauthorized(Exception):
    """No bearer token, or one that does not verify: answered 401."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Forbidden(Exception):
    """A known user asking for another's escrow or stream: answered 403."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def domain_error(exc: DomainError) -> JSONResponse:
    """The service's refusal, with the status its code maps to."""
    headers = None
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return JSONResponse(
        {"error": exc.code, "detail": str(exc)},
        status_code=STATUS.get(exc.code, 409),
        headers=headers,
    )


def redis_unavailable(detail: str) -> JSONResponse:
    """503: the event log cannot be reached; the client should retry shortly."""
    return JSONResponse(
        {"error": "redis_unavailable", "detail": detail},
        status_code=503,
        headers={"Retry-After": "2"},
    )


def install(app: FastAPI) -> None:
    """Register the handlers that turn the exceptions above into their responses."""

    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        return domain_error(exc)

    @app.exception_handler(GatewayUnavailable)
    async def _gateway_down(request: Request, exc: GatewayUnavailable) -> JSONResponse:
        # Only fund reaches the gateway from a request: nothing was emitted, retry is safe.
        return JSONResponse(
            {"error": "gateway_unavailable", "detail": f"M-Pesa did not take the request: {exc}"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        return redis_unavailable(f"the event log is unreachable: {exc}")

    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)

    @app.exception_handler(redis.ResponseError)
    async def _redis_refusing(request: Request, exc: redis.ResponseError) -> JSONResponse:
        # Up but refusing for a while (BUSY: a script past its time limit; MISCONF
        # refuses even a new connection's PING), or a cluster failing over.
        if not transient(exc):
            raise exc  # a bug: the server error middleware makes it a 500
        return redis_unavailable(f"the event log refuses requests for now: {exc}")

    @app.exception_handler(Unauthorized)
    async def _unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"error": "unauthorized", "detail": exc.reason},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return JSONResponse({"error": "forbidden", "detail": exc.reason}, status_code=403)
