"""What a route may ask FastAPI for: the process's :class:`App`, the caller, their key.

Routes are plain functions over these dependencies, never closures over the
app, so any router can be built once at import and included in any app:

* ``State`` is the per-process :class:`~workbench.http.state.App`, put on
  ``app.state.wb`` by the lifespan and read by :func:`wb`;
* ``User`` is the verified user id of a signed bearer token, from the
  ``Authorization`` header or, for clients that cannot set headers (an
  ``EventSource``), the ``access_token`` query parameter; anything else is
  :class:`~workbench.http.errors.Unauthorized` (401);
* ``IdemKey`` is the raw ``Idempotency-Key`` header (at most 128 characters).

:func:`same_user` is the one rule for a user's own resources: a user reads
their own stream and escrows only.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request

from workbench.http import auth
from workbench.http.errors import Forbidden, Unauthorized
from workbench.http.state import App

# The dependencies are ``async def`` although they never await: FastAPI runs a
# plain ``def`` dependency in the threadpool, a thread hop (~0.1 ms of the event
# loop's time) per dependency per request for what takes microseconds.


async def wb(request: Request) -> App:
    """The :class:`App` of the process serving this request."""
    return request.app.state.wb  # type: ignore[no-any-return]


async def current_user(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    access_token: Annotated[
        str | None,
        Query(description="the bearer token, for clients that cannot set headers"),
    ] = None,
) -> str:
    """The user id the request's bearer token was issued to (401 when there is none)."""
    state: App = request.app.state.wb
    try:
        token = auth.bearer_token(authorization) or access_token
    except auth.TokenError as exc:
        raise Unauthorized(exc.reason) from None
    if not token:
        raise Unauthorized("missing bearer token (Authorization header or access_token)")
    try:
        return auth.verify_token(token, state.settings.secret, clock=state.clock)
    except auth.TokenError as exc:
        raise Unauthorized(exc.reason) from None


User = Annotated[str, Depends(current_user)]
IdemKey = Annotated[
    str | None,
    # Stored as "<user>:<key>" in a 200-char column: 64 + 1 + 128 fits.
    Header(alias="Idempotency-Key", max_length=128, description="retries with it are safe"),
]
State = Annotated[App, Depends(wb)]


def same_user(user: str, user_id: str) -> None:
    """Refuse (403) unless the caller is the user whose resources are asked for."""
    if user != user_id:
        raise Forbidden(f"{user!r} may not read the stream or escrows of {user_id!r}")
