"""Handlers, one per consumer group. Plain objects: no Redis loop inside."""

from __future__ import annotations

from workbench.domain.clock import Clock
from workbench.domain.events import AGGREGATE_TYPES
from workbench.handlers.base import SqlHandler
from workbench.handlers.disputes import DisputeTimelineHandler
from workbench.handlers.ledger import LedgerHandler
from workbench.handlers.notifications import NotificationHandler
from workbench.handlers.push import PushHandler
from workbench.store import Store

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
        return AGGREGATE_TYPES  # FanoutHandler.aggregate_types, without importing it
    if group == "analytics":
        return ("escrow", "payment", "dispute")  # workbench.analytics.ANALYTICS_AGGREGATES
    try:
        return tuple(HANDLERS[group].aggregate_types)
    except KeyError:
        known = ", ".join((*ALL_GROUPS, *OPTIONAL_GROUPS))
        raise ValueError(f"unknown consumer group {group!r}; known groups: {known}") from None


def make_handler(group: str, store: Store, clock: Clock | None = None) -> SqlHandler:
    try:
        cls = HANDLERS[group]
    except KeyError:
        raise ValueError(f"unknown group {group!r}; known groups: {', '.join(GROUPS)}") from None
    return cls(store, clock)


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
    "make_handler",
]
