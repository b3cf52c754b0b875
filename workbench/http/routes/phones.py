"""What a phone reads: its escrows now, and its events from a point on (SSE).

``GET /users/{id}/escrows`` is a snapshot stamped ``as_of`` (a user-stream
id); ``GET /users/{id}/events`` streams that user's events after
``Last-Event-ID`` (the header, or the ``last_event_id`` query parameter for
a first connect), replaying from Redis and then going live (see
:mod:`workbench.delivery.sessions`). Together they let a phone rebuild its
state without a gap: load the snapshot, then stream from its ``as_of``.

A user reads only their own escrows and stream (403 otherwise). With Redis
unreachable when a stream opens, the answer is 503 with ``Retry-After``,
never a stream that silently stays empty.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from workbench.delivery.sessions import SseSession
from workbench.domain.streamid import MalformedStreamId, StreamId, parse
from workbench.http import edge
from workbench.http.dependencies import State, User, same_user
from workbench.http.errors import redis_unavailable
from workbench.http.sse import SseResponse

router = APIRouter(route_class=edge.StrictJsonRoute)


@router.get("/users/{user_id}/escrows", tags=["queries"])
async def user_escrows(user_id: str, user: User, state: State) -> dict[str, Any]:
    """The user's escrows, current as of ``as_of`` (a user-stream id).

    ``as_of`` is read before the escrows, so the escrows are at least as
    new as it: resuming the event stream from ``as_of`` can repeat an
    event the snapshot already reflects (apply by ``sequence``), never skip one.
    """
    same_user(user, user_id)
    as_of = await state.reader.tail(user_id)
    escrows = await run_in_threadpool(state.service.escrows_of, user_id)
    return {"user_id": user_id, "as_of": str(as_of), "escrows": [e.to_dict() for e in escrows]}


@router.get(
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
    same_user(user, user_id)
    raw = last_event_id_header if last_event_id_header is not None else last_event_id
    requested: StreamId | None = None
    if raw is not None and raw.strip() != "":
        try:
            requested = parse(raw.strip())
        except MalformedStreamId as exc:
            return JSONResponse({"error": "bad_last_event_id", "detail": str(exc)}, status_code=400)
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
        return redis_unavailable(f"cannot read the event log: {exc}")
    # See workbench.http.sse for what it saves per connection over sse_starlette's.
    return SseResponse(session)
