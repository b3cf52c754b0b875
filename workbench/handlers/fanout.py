"""Fan-out: copy each event into the stream of every user it concerns.

Unlike the SQL handlers its effect lives in Redis: the append and its dedupe
are one Lua script per event (:class:`workbench.delivery.userstreams.UserStreams`), so
a redelivered batch appends nothing twice and the consumer runtime can ack
after ``handle`` returns, as for every other group.

On a partitioned log the script runs once per partition of an event's users,
each run deduplicated on its own; if one failed, ``handle`` raises
(:class:`~workbench.delivery.userstreams.FanoutIncomplete`) after the others
completed, so the batch is not acked and its redelivery completes only what
is missing. On a cluster with replicas, ``wait_replicas`` makes it wait until
the replicas of every node written to have the batch before ``handle``
returns (:class:`~workbench.delivery.userstreams.NotReplicated` otherwise):
the aggregate entry's ack lives on another node than the user streams, and a
failover must not lose entries whose source was acked.
"""

from __future__ import annotations

import redis
from redis.cluster import RedisCluster

from workbench.delivery.entries import UserEntry
from workbench.delivery.userstreams import (
    DEFAULT_DEDUPE_TTL_S,
    DEFAULT_USER_MAXLEN,
    DEFAULT_WAIT_TIMEOUT_MS,
    FanoutIncomplete,
    NotReplicated,
    UserStreams,
)
from workbench.domain import events as ev
from workbench.domain.clock import Clock
from workbench.streams.connection import transient
from workbench.streams.keys import StreamNames, UserStreamNames


class FanoutHandler:
    group = "fanout"
    aggregate_types = ev.AGGREGATE_TYPES

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        names: StreamNames | None = None,
        *,
        user_maxlen: int = DEFAULT_USER_MAXLEN,
        dedupe_ttl_s: int = DEFAULT_DEDUPE_TTL_S,
        user_max_age_s: float = 0.0,
        clock: Clock | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        self.user_streams = UserStreams(
            client,
            UserStreamNames.of(names or StreamNames()),
            maxlen=user_maxlen,
            dedupe_ttl_s=dedupe_ttl_s,
            max_age_s=user_max_age_s,
            clock=clock,  # a simulation's: entry ids and windows on its time
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )
        self.appended = 0
        self.duplicates = 0

    def handle(self, events: list[ev.Event]) -> None:
        """:meth:`append`; if every failed run failed because Redis was down (a node
        unreachable, a cluster failing over), raise that error instead of
        :class:`FanoutIncomplete`: the consumer then retries the batch after its
        pause, as for a failed read, instead of counting a failure against each
        event (which would dead-letter them after ``max_deliveries``)."""
        try:
            self.append(events)
        except FanoutIncomplete as incomplete:
            if all(transient(e) for e in incomplete.errors):
                raise incomplete.errors[0] from incomplete
            raise

    def append(self, events: list[ev.Event]) -> list[list[tuple[str, UserEntry]]]:
        """Fan ``events`` out; return per event the (user, entry) pairs appended
        (none for an event already fanned out). :class:`FanoutIncomplete` if some
        partition's run failed, :class:`NotReplicated` if replicas did not confirm
        (what was appended is counted, and on the exception as ``appended``)."""
        try:
            appended = self.user_streams.append_entries([(e, ev.encode(e)) for e in events])
        except (FanoutIncomplete, NotReplicated) as incomplete:
            self.appended += sum(map(len, incomplete.appended))
            raise
        self.appended += sum(map(len, appended))
        self.duplicates += sum(1 for entries in appended if not entries)
        return appended
