"""The app's routes, one router per concern; :func:`workbench.http.app.create_app` includes them.

* :mod:`.escrows`: the escrow commands (one shared path, see
  :mod:`workbench.http.commands`) and ``GET /escrows/{id}``;
* :mod:`.mpesa`: the gateway's callbacks;
* :mod:`.phones`: a user's escrows and their event stream (SSE);
* :mod:`.operations`: health, metrics, the dashboard, and the debug routes.

Every router is built with :class:`~workbench.http.edge.StrictJsonRoute` (strict
JSON bodies) and reaches the process's state through the ``State`` dependency
(:mod:`workbench.http.dependencies`), never through a closure, so routers are
module-level values and the app only assembles them.
"""
