"""Handlers, one per consumer group. Plain objects: no Redis loop inside.

Three kinds of group, one registry. The SQL groups (:data:`HANDLERS`) need only
the store and are built here by :func:`make_handler`. ``fanout`` writes to
Redis (:class:`~workbench.handlers.fanout.FanoutHandler`) and ``analytics``
needs a trained model (:class:`~workbench.analytics.scorer.RiskScorer`): how
those are configured differs between a worker process and a simulation, so
:func:`handler_for`, the one place that says which handler serves a group,
takes them as factories from its caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from workbench.analytics.features import ANALYTICS_AGGREGATES
from workbench.domain.clock import Clock
from workbench.handlers.base import SqlHandler
from workbench.handlers.disputes import DisputeTimelineHandler
from workbench.handlers.fanout import FanoutHandler
from workbench.handlers.ledger import LedgerHandler
from workbench.handlers.notifications import NotificationHandler
from workbench.handlers.push import PushHandler
from workbench.store import Store

if TYPE_CHECKING:
    from workbench.streams.consumer import Handler

HANDLERS: dict[str, type[SqlHandler]] = {
    "ledger": LedgerHandler,
    "notifications": NotificationHandler,
    "push": PushHandler,
    "disputes": DisputeTimelineHandler,
}

GROUPS: tuple[str, ...] = tuple(HANDLERS)
# Every consumer group: the SQL handler groups plus the fan-out into user streams.
ALL_GROUPS: tuple[str, ...] = (*GROUPS, "fanout")
# Groups that run only when configured: the risk scorer needs a trained model.
OPTIONAL_GROUPS: tuple[str, ...] = ("analytics",)


def aggregate_types_of(group: str) -> tuple[str, ...]:
    """The aggregate types (streams) a consumer group reads."""
    if group == "fanout":
        return FanoutHandler.aggregate_types
    if group == "analytics":
        return ANALYTICS_AGGREGATES
    try:
        return tuple(HANDLERS[group].aggregate_types)
    except KeyError:
        known = ", ".join((*ALL_GROUPS, *OPTIONAL_GROUPS))
        raise ValueError(f"unknown consumer group {group!r}; known groups: {known}") from None


def make_handler(group: str, store: Store, clock: Clock | None = None) -> SqlHandler:
    """The handler of a SQL group (one of :data:`GROUPS`) on ``store``."""
    try:
        cls = HANDLERS[group]
    except KeyError:
        raise ValueError(f"unknown group {group!r}; known groups: {', '.join(GROUPS)}") from None
    return cls(store, clock)


def handler_for(
    group: str,
    store: Store,
    clock: Clock | None = None,
    *,
    fanout: Callable[[], Handler],
    analytics: Callable[[], Handler] | None = None,
) -> Handler:
    """The handler a consumer of ``group`` runs.

    ``fanout()`` builds the fan-out's handler and ``analytics()`` the risk
    scorer's, each called only for its own group; every other group gets its
    SQL handler (:func:`make_handler`, which raises ``ValueError`` for a group
    it does not know). Without ``analytics`` (no model) the analytics group is
    refused with ``ValueError``.
    """
    if group == "fanout":
        return fanout()
    if group == "analytics":
        if analytics is None:
            raise ValueError("the analytics group needs a risk model")
        return analytics()
    return make_handler(group, store, clock)


__all__ = [
    "ALL_GROUPS",
    "GROUPS",
    "HANDLERS",
    "DisputeTimelineHandler",
    "LedgerHandler",
    "NotificationHandler",
    "PushHandler",
    "SqlHandler",
    "aggregate_types_of",
    "handler_for",
    "make_handler",
]
