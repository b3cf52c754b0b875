"""The escrow service over HTTP (FastAPI, served by uvicorn): the app, assembled.

:func:`create_app` holds no route bodies: it builds the app around one
per-process :class:`~workbench.http.state.App` (made in the lifespan, with its
background tasks) and includes the routers of :mod:`workbench.http.routes`:

* escrow commands and ``GET /escrows/{id}`` (:mod:`.routes.escrows`), every
  command through the one command path of :mod:`workbench.http.commands`;
* M-Pesa callbacks at the per-push URL (:mod:`.routes.mpesa`);
* a phone's escrows and its SSE event stream (:mod:`.routes.phones`);
* ``/healthz``, ``/metrics``, the dashboard and, with ``debug``, ``/debug/*``
  (:mod:`.routes.operations`).

Refusals are answered by the handlers of :mod:`workbench.http.errors`; body
size, header size and connection deadlines are enforced at the edge
(:mod:`workbench.http.edge`), and every route parses JSON strictly. Settings
come from the environment (:class:`~workbench.http.settings.Settings`), so
``uvicorn --workers N --factory workbench.http.app:app_from_env`` builds the
same app in every process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from workbench.domain.clock import Clock, clock_from_env
from workbench.http import edge, errors
from workbench.http.routes import escrows, mpesa, operations, phones
from workbench.http.settings import Settings
from workbench.http.sse import Ticker
from workbench.http.state import App

__all__ = ["App", "Settings", "app_from_env", "create_app"]


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    """The FastAPI app for ``settings`` (default: from the environment)."""
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = App(settings, clock)
        app.state.wb = state
        tasks = [asyncio.create_task(state.live.run(), name="live-reader")]
        # One heartbeat and shutdown ticker for every SSE session of this process.
        ticker = Ticker(state.hub, settings.ping_s)
        tasks.append(asyncio.create_task(ticker.run(), name="sse-ticker"))
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
    # Routes added to the app itself (none today) parse JSON strictly too.
    app.router.route_class = edge.StrictJsonRoute
    app.add_middleware(edge.BodyLimit, max_body_bytes=settings.limits.max_body_bytes)
    errors.install(app)
    # In this order: it is the order of the published OpenAPI paths.
    app.include_router(escrows.router)
    app.include_router(mpesa.router)
    app.include_router(phones.router)
    app.include_router(operations.router)
    if settings.debug:
        app.include_router(operations.debug_router)
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory (``--factory``): settings from the environment."""
    return create_app(Settings.from_env(), clock=clock_from_env())
