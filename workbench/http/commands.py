"""The one path every escrow command takes: parse, authenticate, call, map.

A command route is a few lines because everything but its own arguments is
shared, in this order:

1. **parse**: FastAPI validates the body against the route's strict model
   (:mod:`workbench.http.routes.escrows`); a bad body is 422 before anything
   else runs;
2. **authenticate**: the :data:`Caller` dependency resolves the bearer token
   to a user (401 otherwise) and scopes the ``Idempotency-Key`` to them
   (``"<user>:<key>"``), so two users can never collide on one key;
3. **call**: :meth:`CommandCaller.run` calls the service once, as that user,
   with that key; a retry with the same key replays the stored response;
4. **map**: the :class:`~workbench.service.CommandResult` becomes the body
   ``{"escrow", "events", "replayed", ...}``; a
   :class:`~workbench.domain.escrow.DomainError` or an unavailable gateway
   propagates to the handlers of :mod:`workbench.http.errors`, the one table
   from refusal to status.

A refused command changed nothing (the service commits a command whole or
not at all), so every refusal is safe to retry.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends
from starlette.concurrency import run_in_threadpool

from workbench.http.dependencies import IdemKey, State, User
from workbench.http.state import App
from workbench.service import CommandResult, EscrowService

#: What a route asks of the service: given it, the acting user and the scoped key.
ServiceCall = Callable[[EscrowService, str, str | None], CommandResult]


def scoped_key(user: str, idempotency_key: str | None) -> str | None:
    """The stored idempotency key: per user, so two users cannot collide on one key.

    ``<user>:<key>``, where the user part cannot hold the separator: a user id with
    a ``:`` (or a ``\\``) stands as ``\\`` and a digest of it instead, which no plain
    id starts with. Otherwise user ``a:b`` with key ``x`` and user ``a`` with key
    ``b:x`` would share one stored key (and the second be refused, or answered
    with the first's response).
    """
    if not idempotency_key:
        return None
    if ":" in user or "\\" in user:
        user = "\\" + hashlib.sha256(user.encode()).hexdigest()[:40]
    return f"{user}:{idempotency_key}"


def command_response(result: CommandResult, **extra: Any) -> dict[str, Any]:
    """The body of an accepted (or replayed) command."""
    return {
        "escrow": result.escrow,
        "events": result.event_types,
        "replayed": result.replayed,
        **extra,
    }


@dataclass(frozen=True)
class CommandCaller:
    """An authenticated user about to issue one command, with their scoped key."""

    user: str
    app: App
    idempotency_key: str | None  # already scoped to ``user``; None without the header

    async def run(
        self,
        call: ServiceCall,
        extra: Callable[[CommandResult], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Call the service as this user with this key; the accepted command's body.

        The call (its SQL transaction) runs in the threadpool; the routes are
        ``async def``, so FastAPI validates and serializes their answer on the
        event loop instead of in a second thread hop per request. ``extra`` adds
        fields a command's caller needs beyond the escrow (fund: the checkout
        id). Refusals raise, and :mod:`workbench.http.errors` answers them.
        """
        result = await run_in_threadpool(call, self.app.service, self.user, self.idempotency_key)
        return command_response(result, **(extra(result) if extra else {}))


async def command_caller(user: User, state: State, idem: IdemKey = None) -> CommandCaller:
    """The dependency behind :data:`Caller`: authenticate, then scope the key."""
    return CommandCaller(user, state, scoped_key(user, idem))


Caller = Annotated[CommandCaller, Depends(command_caller)]
