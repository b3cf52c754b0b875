"""Handlers, one per consumer group. Plain objects: no Redis loop inside."""

from __future__ import annotations

from workbench.clock import Clock
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


def make_handler(group: str, store: Store, clock: Clock | None = None) -> SqlHandler:
    try:
        cls = HANDLERS[group]
    except KeyError:
        raise ValueError(f"unknown group {group!r}; known groups: {', '.join(GROUPS)}") from None
    return cls(store, clock)


__all__ = [
    "GROUPS",
    "HANDLERS",
    "DisputeTimelineHandler",
    "LedgerHandler",
    "NotificationHandler",
    "PushHandler",
    "SqlHandler",
    "make_handler",
]
