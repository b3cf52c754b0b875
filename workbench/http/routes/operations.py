"""Operations: ``/healthz``, ``/metrics``, the dashboard, and ``/debug/*``.

``/healthz`` answers 200 when every component is up and 503 naming those
that are down (``down``): Redis, the heartbeats of the background workers,
the processes ``serve`` supervises, and the store (with the outbox backlog,
which says whether events are reaching the log). ``/metrics`` is Prometheus
text (:mod:`workbench.http.metrics`), behind ``WORKBENCH_METRICS_TOKEN`` when
that is set. ``/`` and ``/dashboard`` serve the static dashboard.

:data:`debug_router` is included only with ``WORKBENCH_DEBUG``: it lets tests
drop a user's SSE sessions server-side to exercise reconnects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from workbench.http import edge
from workbench.http.dependencies import State
from workbench.http.errors import Unauthorized
from workbench.http.health import BEATING, assess, read_supervision
from workbench.http.metrics import metrics_text, scrape_allowed
from workbench.http.state import App
from workbench.streams.replies import text

STATIC = Path(__file__).parent.parent / "static"

router = APIRouter(route_class=edge.StrictJsonRoute)
debug_router = APIRouter(route_class=edge.StrictJsonRoute)


@router.get("/healthz", tags=["operations"])
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
    outbox_state = await _outbox_state(state, now, down)
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


async def _outbox_state(state: App, now: float, down: list[str]) -> dict[str, Any]:
    # The outbox backlog, or the store's error; a store that cannot answer is down.
    try:
        unpublished, oldest = await run_in_threadpool(state.service_outbox_backlog)
        return {
            "unpublished": unpublished,
            "oldest_unpublished_age_s": None if oldest is None else round(now - oldest, 3),
        }
    except Exception as exc:  # noqa: BLE001 - the store down is a finding, not a crash
        down.append("store")
        return {"error": str(exc)}


@router.get("/metrics", tags=["operations"], response_class=Response)
def metrics(state: State, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus text format; ``Bearer <WORKBENCH_METRICS_TOKEN>`` when that is set."""
    if not scrape_allowed(authorization, state.settings.metrics_token):
        raise Unauthorized("/metrics needs 'Authorization: Bearer <metrics token>'")
    return Response(metrics_text(state), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/", include_in_schema=False)
async def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard", include_in_schema=False)
async def dashboard() -> FileResponse:
    return FileResponse(STATIC / "dashboard.html", media_type="text/html")


@debug_router.post("/debug/users/{user_id}/drop", tags=["debug"])
async def drop_sessions(user_id: str, state: State) -> dict[str, Any]:
    """Close this user's SSE sessions server-side (tests of reconnects)."""
    return {"dropped": state.hub.close_topic(user_id, "dropped by the server")}
