"""The service over HTTP: commands, payment callbacks, SSE, health and metrics.

:mod:`.app` builds the FastAPI app (every command the same path:
authenticate, validate, call the service, map the result); :mod:`.auth`
says who is asking (signed bearer tokens); :mod:`.edge` bounds what a
connection and a body may cost before we give up; :mod:`.health` and
:mod:`.metrics` answer ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from workbench._exports import lazy

if TYPE_CHECKING:
    from workbench.http.app import Settings, create_app
    from workbench.http.auth import issue_token
    from workbench.http.edge import EdgeLimits

__all__ = [
    "EdgeLimits",
    "Settings",
    "create_app",
    "issue_token",
]
__getattr__ = lazy(__name__, {
    "EdgeLimits": "edge",
    "Settings": "app",
    "create_app": "app",
    "issue_token": "auth",
})
