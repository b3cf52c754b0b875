"""The escrow service over HTTP (FastAPI, served by uvicorn).

Commands are thin: authenticate, validate, call :class:`EscrowService`, map
its errors to status codes (illegal transition 409, not a party 403, unknown
escrow 404, bad body 422, too many creates naming the same user 429 with
``Retry-After``). A rejected request changes nothing, because the service
applies a command in one transaction or not at all.

Bodies are parsed strictly and validated with strict types (an amount is a
JSON integer, never ``true``, ``"100"`` or ``100.0``); body size, header size
and connection deadlines are enforced at the edge (:mod:`workbench.http.edge`).
``/metrics`` wants ``WORKBENCH_METRICS_TOKEN`` when that is set.

M-Pesa results come in at ``POST /mpesa/callback/{token}``, the per-push URL
the service gave the gateway (see :mod:`workbench.payments.mpesa`); a callback is only a
claim, recorded once the gateway's STK Push Query confirms it. A background
task runs the verification pass (:meth:`EscrowService.verify_payments`).

Phones read their events at ``GET /users/{id}/events`` (SSE, see
:mod:`workbench.delivery.sessions`) and the current state at ``GET /users/{id}/escrows``.
Each process runs one :class:`~workbench.delivery.live.LiveReader` and one
:class:`~workbench.delivery.hub.Hub`; settings come from the environment so
``uvicorn --workers N`` can build the same app in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import redis
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from workbench.delivery.hub import Hub
from workbench.delivery.live import LiveReader
from workbench.delivery.sessions import SessionStats, SseSession
from workbench.delivery.userstreams import UserStreamReader
from workbench.domain.clock import Clock, SystemClock, clock_from_env
from workbench.domain.escrow import DomainError
from workbench.domain.ids import IdFactory
from workbench.domain.streamid import MalformedStreamId, StreamId, parse
from workbench.http import auth, edge
from workbench.http.health import BEATING, DEFAULT_STALE_AFTER_S, assess, read_supervision
from workbench.http.metrics import metrics_text, scrape_allowed
from workbench.payments.daraja import DarajaClient, DarajaConfig
from workbench.payments.mpesa import (
    Delivery,
    GatewayBehaviour,
    GatewayUnavailable,
    QueryResult,
    SimulatedGateway,
    token_of,
)
from workbench.service import (
    CallbackOutcome,
    CommandResult,
    CreateLimit,
    EscrowService,
    PaymentSettings,
    RateLimited,
)
from workbench.store import Store, database_url, outbox
from workbench.streams.connection import async_client, connect
from workbench.streams.keys import StreamNames, UserStreamNames
from workbench.streams.replies import text

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
USER_ID = r"^[A-Za-z0-9_.:@-]{1,64}$"
_NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL

_STATUS = {
    "not_found": 404,
    "unknown_checkout": 404,
    "not_allowed": 403,
    "illegal_transition": 409,
    "idempotency_conflict": 409,
    "payment_in_progress": 409,
    "invalid_command": 422,
    "rate_limited": 429,
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Settings:
    """Everything the app needs; :meth:`from_env` reads ``WORKBENCH_*`` variables."""

    redis_url: str
    database_url: str
    secret: str
    prefix: str = "wb"
    mpesa: Literal["sim", "external"] = "sim"
    callback_url: str | None = None  # where the simulated gateway posts; None: in-process
    debug: bool = False  # enables /debug/* (tests drop sessions server-side)
    ping_s: float = 15.0
    retry_ms: int = 1000
    page_size: int = 500
    max_queue: int = 1000
    redis_pool: int = 16
    metrics_token: str | None = None  # when set, /metrics wants "Bearer <token>"
    create_limit: CreateLimit = field(default_factory=CreateLimit)
    limits: edge.EdgeLimits = field(default_factory=edge.EdgeLimits)
    supervision_file: str | None = None  # set by `serve` for the API processes it runs
    stale_after_s: float = DEFAULT_STALE_AFTER_S  # a heartbeat older than this: down
    gateway: GatewayBehaviour = field(
        default_factory=lambda: GatewayBehaviour(
            delay_min=1.0,
            delay_max=3.0,
            late_rate=0.0,
            query_delay_min=0.05,
            query_delay_max=0.3,
            query_unavailable_rate=0.05,
        )
    )
    callback_secret: str = ""  # "" = derived from ``secret``
    gateway_allow: tuple[Network, ...] = ()  # callback source addresses; () = any
    daraja: DarajaConfig | None = None
    verify_every_s: float = 1.0
    verify_after_s: float | None = None  # None: 5 s for the simulated gateway, 90 s for Daraja
    verify_retry_s: float = 5.0
    push_grace_s: float = 30.0

    def payments(self) -> PaymentSettings:
        # A dedicated key, or one derived from the token secret (never the secret itself).
        secret = (
            self.callback_secret
            or hmac.new(self.secret.encode(), b"mpesa-callback", hashlib.sha256).hexdigest()
        )
        verify_after = self.verify_after_s
        if verify_after is None:
            verify_after = self.gateway.delay_max + 2.0 if self.mpesa == "sim" else 90.0
        return PaymentSettings(
            callback_secret=secret,
            callback_base_url=self.callback_url or "http://localhost/mpesa/callback",
            push_grace_s=self.push_grace_s,
            verify_after_s=verify_after,
            retry_s=self.verify_retry_s,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        redis_url = env.get("REDIS_URL")
        if not redis_url:
            raise RuntimeError("REDIS_URL is not set (`workbench serve` sets it for you)")
        mpesa = env.get("WORKBENCH_MPESA", "sim")
        if mpesa not in ("sim", "external"):
            raise RuntimeError(f"WORKBENCH_MPESA must be 'sim' or 'external', not {mpesa!r}")
        return cls(
            redis_url=redis_url,
            database_url=env.get("DATABASE_URL") or database_url(),
            secret=auth.secret_from_env(env),
            prefix=env.get("WORKBENCH_PREFIX", "wb"),
            mpesa=mpesa,  # type: ignore[arg-type]
            callback_url=env.get("WORKBENCH_CALLBACK_URL") or None,
            debug=env.get("WORKBENCH_DEBUG", "") in ("1", "true", "yes"),
            ping_s=float(env.get("WORKBENCH_SSE_PING_S", "15")),
            retry_ms=_milliseconds(env, "WORKBENCH_SSE_RETRY_MS", 1000),
            metrics_token=env.get("WORKBENCH_METRICS_TOKEN") or None,
            create_limit=CreateLimit.from_env(env),
            limits=edge.EdgeLimits.from_env(env),
            supervision_file=env.get("WORKBENCH_SUPERVISION_FILE") or None,
            stale_after_s=float(env.get("WORKBENCH_STALE_AFTER_S", DEFAULT_STALE_AFTER_S)),
            callback_secret=env.get("WORKBENCH_CALLBACK_SECRET", ""),
            gateway_allow=_networks(env.get("WORKBENCH_MPESA_ALLOW", "")),
            daraja=DarajaConfig.from_env(env),
            verify_after_s=_seconds(env, "WORKBENCH_MPESA_VERIFY_AFTER_S", None),
            verify_retry_s=_seconds(env, "WORKBENCH_MPESA_RETRY_S", 5.0) or 5.0,
            push_grace_s=_seconds(env, "WORKBENCH_MPESA_PUSH_GRACE_S", 30.0) or 30.0,
        )


def _networks(text: str) -> tuple[Network, ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise RuntimeError(
                f"WORKBENCH_MPESA_ALLOW: {part!r} is not an address or CIDR"
            ) from None
    return tuple(out)


def _seconds(env: dict[str, str], name: str, default: float | None) -> float | None:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a number of seconds, not {text!r}") from None
    if not 0 < value < 1e6:
        raise RuntimeError(f"{name} must be positive, not {value}")
    return value


def _milliseconds(env: dict[str, str], name: str, default: int) -> int:
    text = env.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a whole number of milliseconds, not {text!r}") from None
    if value <= 0:
        raise RuntimeError(f"{name} must be positive, not {value}")
    return value


class UnconfiguredGateway:
    """``external`` without ``WORKBENCH_DARAJA_URL``: every push and query is refused."""

    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        raise GatewayUnavailable("no M-Pesa gateway configured (set WORKBENCH_DARAJA_URL)")

    def query(self, checkout_request_id: str) -> QueryResult:
        raise GatewayUnavailable("no M-Pesa gateway configured (set WORKBENCH_DARAJA_URL)")


class _LockedGateway:
    """The simulated gateway shared by request threads and the callback task.

    A query waits its simulated network delay outside the lock, so a slow
    answer does not hold up pushes.
    """

    def __init__(self, gateway: SimulatedGateway) -> None:
        self.gateway = gateway
        self.lock = threading.Lock()
        self.rng = random.Random()

    def stk_push(
        self, escrow_id: str, amount: int, phone: str, *, reference: str, callback_url: str
    ) -> str:
        with self.lock:
            return self.gateway.stk_push(
                escrow_id, amount, phone, reference=reference, callback_url=callback_url
            )

    def query(self, checkout_request_id: str) -> QueryResult:
        b = self.gateway.behaviour
        if b.query_delay_max > 0:
            time.sleep(self.rng.uniform(b.query_delay_min, b.query_delay_max))
        with self.lock:
            return self.gateway.query(checkout_request_id)

    def due(self) -> list[Delivery]:
        with self.lock:
            return self.gateway.due_deliveries()


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


class App:
    """The process-wide state behind the routes."""

    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.names = StreamNames(settings.prefix)
        self.user_names = UserStreamNames.of(self.names)
        self.store = Store(settings.database_url)
        self.store.create_schema()
        ids = IdFactory()
        self.sim: _LockedGateway | None = None
        gateway: Any
        self.daraja: DarajaClient | None = None
        if settings.mpesa == "sim":
            self.sim = _LockedGateway(SimulatedGateway(self.clock, settings.gateway))
            gateway = self.sim
        elif settings.daraja is not None:
            self.daraja = gateway = DarajaClient(settings.daraja)
        else:
            log.warning("WORKBENCH_MPESA=external without WORKBENCH_DARAJA_URL: funding is refused")
            gateway = UnconfiguredGateway()
        self.service = EscrowService(
            self.store,
            clock=self.clock,
            ids=ids,
            gateway=gateway,
            create_limit=settings.create_limit,
            payments=settings.payments(),
        )
        self.hub = Hub(max_queue=settings.max_queue)
        self.stats = SessionStats()
        self.redis = connect(settings.redis_url)  # sync: metrics
        self.aredis = async_client(settings.redis_url, max_connections=settings.redis_pool)
        self.reader = UserStreamReader(self.aredis, self.user_names)
        self.live = LiveReader(settings.redis_url, self.hub, self.user_names)
        self.callbacks_posted = 0

    async def run_callbacks(self) -> None:
        """The simulated M-Pesa: post due callbacks to their CallBackURL (or in-process)."""
        assert self.sim is not None
        async with httpx.AsyncClient(timeout=10) as http:
            while True:
                for delivery in self.sim.due():
                    try:
                        if self.settings.callback_url:
                            await http.post(delivery.url, json=delivery.body)
                        else:
                            await run_in_threadpool(
                                self.service.handle_callback, token_of(delivery.url), delivery.body
                            )
                        self.callbacks_posted += 1
                    except Exception as exc:  # noqa: BLE001 - a gateway just logs and moves on
                        log.warning("simulated callback failed: %s", exc)
                await asyncio.sleep(0.1)

    def service_outbox_backlog(self) -> tuple[int, float | None]:
        """(outbox rows not yet published, created_at of the oldest of them)."""
        with self.store.engine.connect() as conn:
            count, oldest = conn.execute(
                select(func.count(), func.min(outbox.c.created_at)).where(
                    outbox.c.published_at.is_(None)
                )
            ).one()
        return int(count), None if oldest is None else float(oldest)

    async def run_verification(self) -> None:
        """The reconciliation pass, every ``verify_every_s``: owed pushes, due queries."""
        while True:
            await asyncio.sleep(self.settings.verify_every_s)
            try:
                await run_in_threadpool(self.service.verify_payments)
            except Exception as exc:  # noqa: BLE001 - the next pass tries again
                log.warning("payment verification pass failed: %s", exc)

    async def close(self) -> None:
        self.hub.close_all("server shutting down")
        await self.aredis.aclose(close_connection_pool=True)  # the pool was passed in
        self.redis.close()
        if self.daraja is not None:
            self.daraja.close()
        self.store.close()


def _result(result: CommandResult, **extra: Any) -> dict[str, Any]:
    return {
        "escrow": result.escrow,
        "events": result.event_types,
        "replayed": result.replayed,
        **extra,
    }


def wb(request: Request) -> App:
    return request.app.state.wb  # type: ignore[no-any-return]


def current_user(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    access_token: Annotated[
        str | None,
        Query(description="the bearer token, for clients that cannot set headers"),
    ] = None,
) -> str:
    state = wb(request)
    try:
        token = auth.bearer_token(authorization) or access_token
    except auth.TokenError as exc:
        raise _Unauthorized(exc.reason) from None
    if not token:
        raise _Unauthorized("missing bearer token (Authorization header or access_token)")
    try:
        return auth.verify_token(token, state.settings.secret, clock=state.clock)
    except auth.TokenError as exc:
        raise _Unauthorized(exc.reason) from None


User = Annotated[str, Depends(current_user)]
IdemKey = Annotated[
    str | None,
    # Stored as "<user>:<key>" in a 200-char column: 64 + 1 + 128 fits.
    Header(alias="Idempotency-Key", max_length=128, description="retries with it are safe"),
]
State = Annotated[App, Depends(wb)]


def key(user: str, idempotency_key: str | None) -> str | None:
    # Keys are per user, so two users cannot collide on the same key.
    return f"{user}:{idempotency_key}" if idempotency_key else None


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = App(settings, clock)
        app.state.wb = state
        tasks = [asyncio.create_task(state.live.run(), name="live-reader")]
        if state.sim is not None:
            tasks.append(asyncio.create_task(state.run_callbacks(), name="mpesa-sim"))
        tasks.append(asyncio.create_task(state.run_verification(), name="mpesa-verify"))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state.close()

    app = FastAPI(
        title="Escrow workbench",
        version="0.1.0",
        description="M-Pesa escrow commands, callbacks and per-user event streams (SSE).",
        lifespan=lifespan,
    )
    app.router.route_class = edge.StrictJsonRoute  # before any route is added
    app.add_middleware(edge.BodyLimit, max_body_bytes=settings.limits.max_body_bytes)

    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        headers = None
        if isinstance(exc, RateLimited):
            headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse(
            {"error": exc.code, "detail": str(exc)},
            status_code=_STATUS.get(exc.code, 409),
            headers=headers,
        )

    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": "redis_unavailable", "detail": f"the event log is unreachable: {exc}"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(GatewayUnavailable)
    async def _gateway_down(request: Request, exc: GatewayUnavailable) -> JSONResponse:
        # Only fund reaches the gateway from a request: nothing was emitted, retry is safe.
        return JSONResponse(
            {"error": "gateway_unavailable", "detail": f"M-Pesa did not take the request: {exc}"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    app.add_exception_handler(redis.ConnectionError, _redis_down)
    app.add_exception_handler(redis.TimeoutError, _redis_down)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"error": "unauthorized", "detail": exc.reason},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(_Forbidden)
    async def _forbidden(request: Request, exc: _Forbidden) -> JSONResponse:
        return JSONResponse({"error": "forbidden", "detail": exc.reason}, status_code=403)

    # -- commands ----------------------------------------------------------------------

    @app.post("/escrows", status_code=201, tags=["commands"])
    def create_escrow(
        body: CreateEscrowBody, user: User, state: State, idem: IdemKey = None
    ) -> dict[str, Any]:
        """Open an escrow between a buyer and a seller; the caller must be one of them."""
        if user not in (body.buyer_id, body.seller_id):
            raise _Forbidden(f"{user!r} is neither the buyer nor the seller")
        result = state.service.create(
            body.buyer_id,
            body.seller_id,
            body.amount,
            body.description,
            idempotency_key=key(user, idem),
            actor=user,
        )
        return _result(result)

    @app.get("/escrows/{escrow_id}", tags=["queries"])
    def get_escrow(escrow_id: str, user: User, state: State) -> dict[str, Any]:
        escrow = state.service.get(escrow_id)
        if user not in (escrow.buyer_id, escrow.seller_id, "admin"):
            raise _Forbidden(f"{user!r} is not a party to {escrow_id}")
        return escrow.to_dict()

    @app.post("/escrows/{escrow_id}/fund", tags=["commands"])
    def fund(
        escrow_id: str,
        user: User,
        state: State,
        idem: IdemKey = None,
        body: FundBody | None = None,
    ) -> dict[str, Any]:
        """Start the M-Pesa STK push to the buyer's phone."""
        phone = (body or FundBody()).phone
        try:
            result = state.service.fund(escrow_id, user, phone, idempotency_key=key(user, idem))
        except GatewayUnavailable as exc:
            return JSONResponse(  # type: ignore[return-value]
                {
                    "error": "gateway_unavailable",
                    "detail": f"M-Pesa did not take the request: {exc}",
                },
                status_code=503,
                headers={"Retry-After": "5"},
            )
        checkout = (result.escrow or {}).get("checkout_request_id")
        return _result(result, checkout_request_id=checkout)

    @app.post("/escrows/{escrow_id}/ship", tags=["commands"])
    def ship(
        escrow_id: str,
        user: User,
        state: State,
        idem: IdemKey = None,
        body: ShipBody | None = None,
    ) -> dict[str, Any]:
        tracking = (body or ShipBody()).tracking
        return _result(
            state.service.ship(escrow_id, user, tracking, idempotency_key=key(user, idem))
        )

    @app.post("/escrows/{escrow_id}/confirm", tags=["commands"])
    def confirm(escrow_id: str, user: User, state: State, idem: IdemKey = None) -> dict[str, Any]:
        return _result(state.service.confirm(escrow_id, user, idempotency_key=key(user, idem)))

    @app.post("/escrows/{escrow_id}/dispute", tags=["commands"])
    def dispute(
        escrow_id: str,
        user: User,
        state: State,
        idem: IdemKey = None,
        body: ReasonBody | None = None,
    ) -> dict[str, Any]:
        reason = (body or ReasonBody()).reason
        return _result(
            state.service.dispute(escrow_id, user, reason, idempotency_key=key(user, idem))
        )

    @app.post("/escrows/{escrow_id}/resolve", tags=["commands"])
    def resolve(
        escrow_id: str,
        body: ResolveBody,
        user: User,
        state: State,
        idem: IdemKey = None,
    ) -> dict[str, Any]:
        """Resolve a dispute (the ``admin`` user only): refund the buyer or release."""
        return _result(
            state.service.resolve(
                escrow_id, user, body.outcome, body.note, idempotency_key=key(user, idem)
            )
        )

    @app.post("/escrows/{escrow_id}/cancel", tags=["commands"])
    def cancel(
        escrow_id: str,
        user: User,
        state: State,
        idem: IdemKey = None,
        body: ReasonBody | None = None,
    ) -> dict[str, Any]:
        reason = (body or ReasonBody()).reason
        return _result(
            state.service.cancel(escrow_id, user, reason, idempotency_key=key(user, idem))
        )

    # -- M-Pesa ------------------------------------------------------------------------

    @app.post("/mpesa/callback/{token}", tags=["mpesa"])
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
            outcome = state.service.reject_token()
            return _daraja(outcome.status, outcome.detail)
        try:
            body = await request.json()
        except ValueError:
            state.service.payment_stats.count("callbacks", "rejected_malformed")
            return _daraja(400, "body is not JSON")
        outcome: CallbackOutcome = await run_in_threadpool(
            state.service.handle_callback, token, body
        )
        return _daraja(outcome.status, outcome.detail)

    @app.post("/mpesa/callback", tags=["mpesa"], status_code=410)
    async def mpesa_callback_retired(state: State) -> JSONResponse:
        """Retired: callbacks go to the per-push URL ``/mpesa/callback/{token}``."""
        state.service.payment_stats.count("callbacks", "rejected_bad_token")
        return _daraja(410, "callbacks go to the per-checkout CallBackURL given with the push")

    # -- reading -----------------------------------------------------------------------

    @app.get("/users/{user_id}/escrows", tags=["queries"])
    async def user_escrows(user_id: str, user: User, state: State) -> dict[str, Any]:
        """The user's escrows, current as of ``as_of`` (a user-stream id).

        ``as_of`` is read before the escrows, so the escrows are at least as
        new as it: resuming the event stream from ``as_of`` can repeat an
        event the snapshot already reflects (apply by ``sequence``), never skip one.
        """
        _same_user(user, user_id)
        as_of = await state.reader.tail(user_id)
        escrows = await run_in_threadpool(state.service.escrows_of, user_id)
        return {"user_id": user_id, "as_of": str(as_of), "escrows": [e.to_dict() for e in escrows]}

    @app.get(
        "/users/{user_id}/events",
        tags=["queries"],
        response_class=Response,
        responses={200: {"content": {"text/event-stream": {}}}, 400: {}, 401: {}, 403: {}},
    )
    async def user_events(
        user_id: str,
        user: User,
        state: State,
        last_event_id_header: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
        last_event_id: Annotated[
            str | None, Query(description="for the first connect, when no header can be set")
        ] = None,
    ) -> Response:
        """Server-sent events: replay after Last-Event-ID, then live."""
        _same_user(user, user_id)
        raw = last_event_id_header if last_event_id_header is not None else last_event_id
        requested: StreamId | None = None
        if raw is not None and raw.strip() != "":
            try:
                requested = parse(raw.strip())
            except MalformedStreamId as exc:
                return JSONResponse(
                    {"error": "bad_last_event_id", "detail": str(exc)}, status_code=400
                )
        session = SseSession(
            user_id,
            requested,
            state.reader,
            state.hub,
            state.stats,
            page_size=state.settings.page_size,
            retry_ms=state.settings.retry_ms,
        )
        try:
            await session.open()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            return JSONResponse(
                {"error": "redis_unavailable", "detail": f"cannot read the event log: {exc}"},
                status_code=503,
                headers={"Retry-After": "2"},
            )
        return EventSourceResponse(
            session.messages(),
            background=BackgroundTask(session.close),
            ping=state.settings.ping_s,
            send_timeout=30,
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    # -- operations --------------------------------------------------------------------

    @app.get("/healthz", tags=["operations"])
    async def healthz(state: State) -> JSONResponse:
        """200 when every component is up; 503 naming those that are down (``down``)."""
        heartbeats: dict[str, dict[str, float]] | None = None
        last_publish: float | None = None
        try:
            pipe = state.aredis.pipeline(transaction=False)
            for name in BEATING:
                pipe.hgetall(state.names.heartbeats(name))
            pipe.get(state.names.last_publish())
            *beats, published = await pipe.execute()
            heartbeats = {
                name: {text(k): float(v) for k, v in raw.items()}
                for name, raw in zip(BEATING, beats, strict=True)
            }
            last_publish = float(published) if published is not None else None
            redis_ok = True
        except (redis.RedisError, OSError, ValueError):
            redis_ok = False
        supervision = read_supervision(state.settings.supervision_file)
        now = state.clock.now()
        down, components = assess(
            now=now,
            redis_ok=redis_ok,
            heartbeats=heartbeats,
            supervised=supervision["components"] if supervision else None,
            stale_after_s=state.settings.stale_after_s,
        )
        try:
            unpublished, oldest = await run_in_threadpool(state.service_outbox_backlog)
            outbox_state: dict[str, Any] = {
                "unpublished": unpublished,
                "oldest_unpublished_age_s": None if oldest is None else round(now - oldest, 3),
            }
        except Exception as exc:  # noqa: BLE001 - the store down is a finding, not a crash
            outbox_state = {"error": str(exc)}
            down.append("store")
        outbox_state["last_publish_age_s"] = (
            None if last_publish is None else round(now - last_publish, 3)
        )
        body = {
            "ok": not down,
            "down": down,
            "redis": redis_ok,
            "live_feed": state.live.connected.is_set(),
            "sessions": state.hub.subscriptions(),
            "components": components,
            "outbox": outbox_state,
        }
        return JSONResponse(body, status_code=503 if down else 200)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics(state: State, authorization: Annotated[str | None, Header()] = None) -> Response:
        """Prometheus text format; ``Bearer <WORKBENCH_METRICS_TOKEN>`` when that is set."""
        if not scrape_allowed(authorization, state.settings.metrics_token):
            raise _Unauthorized("/metrics needs 'Authorization: Bearer <metrics token>'")
        return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard")

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")

    if settings.debug:

        @app.post("/debug/users/{user_id}/drop", tags=["debug"])
        async def drop_sessions(user_id: str, state: State) -> dict[str, Any]:
            """Close this user's SSE sessions server-side (tests of reconnects)."""
            return {"dropped": state.hub.close_topic(user_id, "dropped by the server")}

    return app




class _Unauthorized(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class _Forbidden(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _same_user(user: str, user_id: str) -> None:
    if user != user_id:
        raise _Forbidden(f"{user!r} may not read the stream or escrows of {user_id!r}")


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


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory``): settings from the environment."""
    return create_app(Settings.from_env(), clock=clock_from_env())
