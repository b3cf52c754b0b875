"""Every Redis key name the runtime uses, in one place.

All names live under one prefix (``wb`` by default) so several runs can share a
Redis. The aggregate streams carry the domain events (``wb:escrow``,
``wb:payment``, ``wb:payout``, ``wb:dispute``); each consumer group has a
dead-letter stream, a hash counting the deaths of its consumers on an entry
and a heartbeat hash; each user has a stream of their
events, with a dedupe marker per fanned-out event and one live channel; the
analytics scorer publishes to a risk stream with its own markers.

**Partitions** (:mod:`workbench.streams.partitions`). Without a
:class:`~workbench.streams.partitions.Partitioning` the log is one partition and
the names are the ones above. With one, the log is cut into ``P`` partitions
and every key a script, a MULTI or an XREADGROUP touches together carries its
partition's hash tag, so it lives in that partition's cluster slot:

* partition ``p`` of the log: ``wb:{<tag p>}:escrow`` (and ``:payment`` ...),
  its groups' dead letters ``wb:{<tag p>}:dead:<group>`` (a dead letter is
  written in one MULTI with the XACK of its source entry), their crash counts
  ``wb:{<tag p>}:crashes:<group>`` and the leases
  ``wb:{<tag p>}:lease:<holder>`` saying which consumer reads it;
* a user's keys live in the user's partition (a CRC32 of the user id, like an
  escrow's): ``wb:{<tag>}:user:<user id>``, the fan-out's dedupe marker of an
  event for that partition ``wb:{<tag>}:fanout:<event id>``, and the
  partition's live channel ``wb:{<tag>}:live`` (sharded Pub/Sub);
* the risk stream and its markers share partition 0's tag.

Heartbeat hashes and the relay's last-publish time are read alone, never in a
script with other keys, and stay untagged.
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.domain.events import AGGREGATE_TYPES
from workbench.streams.partitions import Partitioning, partitioning


@dataclass(frozen=True)
class _Partitioned:
    """A prefix and, optionally, the partitioning of every key under it."""

    prefix: str = "wb"
    partitioning: Partitioning | None = None

    @property
    def partitions(self) -> range:
        """Every partition's index (``range(1)`` when unpartitioned)."""
        return range(self.partitioning.count if self.partitioning else 1)

    @property
    def partitioned(self) -> bool:
        return self.partitioning is not None

    def base(self, partition: int = 0) -> str:
        """The prefix of every key of ``partition``: ``wb`` or ``wb:{<tag>}``."""
        if self.partitioning is None:
            if partition != 0:
                raise ValueError(f"partition {partition} of an unpartitioned log")
            return self.prefix
        return f"{self.prefix}:{{{self.partitioning.tags[partition]}}}"

    def partition_of(self, key_id: str) -> int:
        """The partition of an escrow (or of a user): stable across processes."""
        return self.partitioning.of(key_id) if self.partitioning else 0


@dataclass(frozen=True)
class StreamNames(_Partitioned):
    """Key names of the log under one prefix, so several runs can share a Redis."""

    def stream(self, aggregate_type: str, partition: int = 0) -> str:
        if aggregate_type not in AGGREGATE_TYPES:
            raise ValueError(
                f"unknown aggregate type {aggregate_type!r}; known: {', '.join(AGGREGATE_TYPES)}"
            )
        return f"{self.base(partition)}:{aggregate_type}"

    def streams(
        self,
        aggregate_types: tuple[str, ...] = AGGREGATE_TYPES,
        partitions: range | tuple[int, ...] | None = None,
    ) -> list[str]:
        """The streams of ``aggregate_types`` in ``partitions`` (default: every one),
        partition by partition."""
        chosen = self.partitions if partitions is None else partitions
        return [self.stream(a, p) for p in chosen for a in aggregate_types]

    def dead_letter(self, group: str, partition: int = 0) -> str:
        return f"{self.base(partition)}:dead:{group}"

    def dead_letters(self, group: str) -> list[str]:
        """The group's dead-letter stream of every partition."""
        return [self.dead_letter(group, p) for p in self.partitions]

    def crashes(self, group: str, partition: int = 0) -> str:
        """Hash of ``<stream> <entry id> -> times`` a consumer of ``group`` began to
        handle the entry alone and died before the handler returned."""
        return f"{self.base(partition)}:crashes:{group}"

    def lease(self, holder: str, partition: int = 0) -> str:
        """Who holds ``partition`` for ``holder`` (a consumer group, or ``relay``)."""
        return f"{self.base(partition)}:lease:{holder}"

    def heartbeats(self, group: str) -> str:
        """Hash of ``consumer -> time of its last beat``: a group's workers, or
        ``relay`` / ``timers`` (one field per process, named ``<role>-<pid>``)."""
        return f"{self.prefix}:heartbeats:{group}"

    def last_publish(self) -> str:
        """When the relay last published a batch (its clock's time)."""
        return f"{self.prefix}:relay:last_publish"

    def partition_count(self) -> str:
        """The partition count the log was made with (``0``: unpartitioned)."""
        return f"{self.prefix}:partitions"


def names_for(prefix: str = "wb", partitions: int = 0) -> StreamNames:
    """The log's names under ``prefix`` with ``partitions`` partitions (0: unpartitioned,
    today's single-partition key names)."""
    return StreamNames(prefix, partitioning(partitions))


@dataclass(frozen=True)
class UserStreamNames(_Partitioned):
    """Key names for user streams under a prefix (shared with :class:`StreamNames`)."""

    @classmethod
    def of(cls, names: StreamNames) -> UserStreamNames:
        return cls(names.prefix, names.partitioning)

    def stream(self, user_id: str) -> str:
        return f"{self.base(self.partition_of(user_id))}:user:{user_id}"

    def fanout_marker(self, event_id: str, partition: int = 0) -> str:
        """Set once ``event_id`` was appended to the streams of its users in ``partition``."""
        return f"{self.base(partition)}:fanout:{event_id}"

    def live_channel(self, partition: int = 0) -> str:
        """Where ``partition``'s users' live messages are published."""
        return f"{self.base(partition)}:live"

    @property
    def live_channels(self) -> list[str]:
        return [self.live_channel(p) for p in self.partitions]


@dataclass(frozen=True)
class RiskNames(_Partitioned):
    """Key names of the risk stream and its dedupe markers under a prefix (one slot)."""

    @classmethod
    def of(cls, names: StreamNames) -> RiskNames:
        return cls(names.prefix, names.partitioning)

    @property
    def stream(self) -> str:
        return f"{self.base()}:risk"

    def marker(self, group: str, event_id: str) -> str:
        return f"{self.base()}:scored:{group}:{event_id}"
