"""Every Redis key name the runtime uses, in one place.

All names live under one prefix (``wb`` by default) so several runs can share a
Redis. The aggregate streams carry the domain events (``wb:escrow``,
``wb:payment``, ``wb:payout``, ``wb:dispute``); each consumer group has a
dead-letter stream and a heartbeat hash; each user has a stream of their
events, with a dedupe marker per fanned-out event and one live channel; the
analytics scorer publishes to a risk stream with its own markers.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.domain.events import AGGREGATE_TYPES


@dataclass(frozen=True)
class StreamNames:
    """Key names under one prefix, so several runs can share a Redis."""

    prefix: str = "wb"

    def stream(self, aggregate_type: str) -> str:
        if aggregate_type not in AGGREGATE_TYPES:
            raise ValueError(
                f"unknown aggregate type {aggregate_type!r}; known: {', '.join(AGGREGATE_TYPES)}"
            )
        return f"{self.prefix}:{aggregate_type}"

    def streams(self, aggregate_types: tuple[str, ...] = AGGREGATE_TYPES) -> list[str]:
        return [self.stream(a) for a in aggregate_types]

    def dead_letter(self, group: str) -> str:
        return f"{self.prefix}:dead:{group}"

    def heartbeats(self, group: str) -> str:
        """Hash of ``consumer -> time of its last beat``: a group's workers, or
        ``relay`` / ``timers`` (one field per process, named ``<role>-<pid>``)."""
        return f"{self.prefix}:heartbeats:{group}"

    def last_publish(self) -> str:
        """When the relay last published a batch (its clock's time)."""
        return f"{self.prefix}:relay:last_publish"


@dataclass(frozen=True)
class UserStreamNames:
    """Key names for user streams under a prefix (shared with :class:`StreamNames`)."""

    prefix: str = "wb"

    @classmethod
    def of(cls, names: StreamNames) -> UserStreamNames:
        return cls(names.prefix)

    def stream(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def fanout_marker(self, event_id: str) -> str:
        return f"{self.prefix}:fanout:{event_id}"

    @property
    def live_channel(self) -> str:
        return f"{self.prefix}:live"


@dataclass(frozen=True)
class RiskNames:
    """Key names of the risk stream and its dedupe markers under a prefix."""

    prefix: str = "wb"

    @classmethod
    def of(cls, names: StreamNames) -> RiskNames:
        return cls(names.prefix)

    @property
    def stream(self) -> str:
        return f"{self.prefix}:risk"

    def marker(self, group: str, event_id: str) -> str:
        return f"{self.prefix}:scored:{group}:{event_id}"
