"""The service over HTTP: commands, payment callbacks, SSE, health and metrics.

:mod:`.app` assembles the FastAPI app from the routers of :mod:`.routes`
(escrow commands, M-Pesa callbacks, a phone's escrows and events,
operations); every command takes the one path of :mod:`.commands`
(authenticate, validate, call the service, map the result), and
:mod:`.errors` maps every refusal to its status. Routes reach the
per-process :class:`~.state.App` through :mod:`.dependencies`;
:mod:`.settings` reads the environment. :mod:`.auth` says who is asking
(signed bearer tokens); :mod:`.edge` bounds what a connection and a body
may cost before we give up; :mod:`.health` and :mod:`.metrics` answer
``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.http.app import create_app
    from workbench.http.auth import issue_token
    from workbench.http.edge import EdgeLimits
    from workbench.http.settings import Settings
    from workbench.http.state import App

__all__ = [
    "App",
    "EdgeLimits",
    "Settings",
    "create_app",
    "issue_token",
]
__getattr__ = lazy(
    __name__,
    {
        "App": "state",
        "EdgeLimits": "edge",
        "Settings": "settings",
        "create_app": "app",
        "issue_token": "auth",
    },
)
