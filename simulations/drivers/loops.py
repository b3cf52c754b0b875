"""The real runtime, ticked by SimPy processes.

Each loop the runtime would run in its own process (relay, one consumer per
group, the fan-out worker, the expiry timer) becomes a SimPy process that calls
the same object at virtual instants: ``OutboxRelay.drain()``,
``ConsumerWorker.drain()``, ``EscrowService.expire_due()``. Redis errors are
handled as those loops handle them: the work stays where it is and the next
tick retries.

A consumer crash is the worker's own crash hook raising :class:`SimCrash` at
the chosen crash point: the worker object is dropped mid-batch exactly where a
SIGKILL would stop the process, and its pending entries stay in Redis under its
name. By default (``consumers.restart = "supervisor"``) the worker comes back
after serve's backoff under the same consumer name and re-reads its own pending
entries first; with ``"replacement"`` (a lost machine) another consumer of the
group starts after ``mttr_s`` and takes the dead one's entries over by the
runtime's own recovery (stale heartbeat, XCLAIM).
"""

from __future__ import annotations

import contextlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import simpy

from simulations.analysis.handling import AppendLog, HandlingLog
from simulations.faults import CRASH_POINTS, AckFirstWorker, CrashingWorker
from simulations.models.clock import SimClock
from simulations.models.supervision import SupervisedRestarts, policy_of
from simulations.scenario import ConsumersParams, Scenario
from workbench.delivery.entries import UserEntry
from workbench.delivery.userstreams import FanoutIncomplete, NotReplicated
from workbench.domain.clock import Clock, now_ms
from workbench.domain.events import Event
from workbench.domain.streamid import ZERO, parse
from workbench.handlers import ALL_GROUPS, aggregate_types_of, handler_for
from workbench.handlers.fanout import FanoutHandler
from workbench.service import EscrowService
from workbench.store import Store
from workbench.streams.connection import TRANSIENT, execute
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
from workbench.streams.keys import StreamNames, UserStreamNames
from workbench.streams.relay import OutboxRelay
from workbench.streams.replies import text

#: How many of the fan-out's latest entries are kept to judge a Redis loss by.
RECENT_ENTRIES = 100_000
#: The handling and effects logs of a virtual run wait in memory for this many bytes
#: before a write (a kill of the simulator ends the run: no line to keep safe).
LOG_BUFFER_BYTES = 1 << 16


def backlog(
    client: redis.Redis, names: StreamNames, group: str, now_ms: int = 0
) -> tuple[int, float, int, float]:
    """(pending, oldest pending age in s, lag, lag in s) of a group over its streams."""
    return backlogs(client, names, (group,), now_ms)[group]


def backlogs(
    client: redis.Redis, names: StreamNames, groups: tuple[str, ...], now_ms: int = 0
) -> dict[str, tuple[int, float, int, float]]:
    """:func:`backlog` of several groups in two round trips: XINFO GROUPS of every
    stream they read, then the oldest pending entry and the oldest undelivered entry
    where there are any.

    Ages are ``now_ms`` minus the entry id's time: with ids from the simulation's
    clock (the relay's ``ids_on_clock``) they are seconds of simulation time, so the
    tables do not depend on how fast the machine ran the model. (Redis' own idle
    times are wall-clock readings and would.) ``lag`` in seconds is the age of the
    oldest entry not yet delivered to the group: how far behind it is, in time.
    """
    streams = list(dict.fromkeys(s for g in groups for s in names.streams(aggregate_types_of(g))))
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_groups(stream)
    infos = dict(zip(streams, execute(client, pipe, raise_on_error=False), strict=True))
    pending = dict.fromkeys(groups, 0)
    lag = dict.fromkeys(groups, 0)
    heads: list[tuple[str, str, str]] = []  # (group, stream, "pending" | last-delivered id)
    for group in groups:
        for stream in names.streams(aggregate_types_of(group)):
            info = infos[stream]
            if isinstance(info, redis.ResponseError):  # no such stream yet
                continue
            if isinstance(info, Exception):
                raise info
            for g in info:
                if text(g["name"]) != group:
                    continue
                pending[group] += int(g["pending"])
                lag[group] += int(g.get("lag") or 0)
                if int(g["pending"]):
                    heads.append((group, stream, "pending"))
                if int(g.get("lag") or 0):
                    heads.append((group, stream, text(g["last-delivered-id"])))
    oldest = dict.fromkeys(groups, 0.0)
    behind = dict.fromkeys(groups, 0.0)
    if heads:
        pipe = client.pipeline(transaction=False)
        for group, stream, what in heads:
            if what == "pending":
                pipe.xpending_range(stream, group, "-", "+", 1)
            else:
                pipe.xrange(stream, f"({what}", "+", count=1)
        for (group, _, what), rows in zip(heads, execute(client, pipe), strict=True):
            if not rows:
                continue
            entry = rows[0]["message_id"] if what == "pending" else rows[0][0]
            age = max(0.0, (now_ms - parse(entry).ms) / 1000)
            into = oldest if what == "pending" else behind
            into[group] = max(into[group], age)
    return {g: (pending[g], oldest[g], lag[g], behind[g]) for g in groups}


def sample_backlog(
    env: simpy.Environment,
    client: redis.Redis,
    names: StreamNames,
    groups: tuple[str, ...],
    every: float,
    samples: list[dict[str, Any]],
    clock: Clock,
) -> Any:
    """A SimPy process: every ``every`` seconds, a backlog row per group, with ages
    on ``clock`` (the simulation's)."""
    while True:
        try:
            found = backlogs(client, names, groups, now_ms(clock))
        except TRANSIENT:
            found = {}
        for group, (pending, age, lag, lag_s) in found.items():
            samples.append(
                {"t": env.now, "group": group, "pending": pending,
                 "oldest_pending_age_s": age, "lag": lag, "lag_s": lag_s}
            )  # fmt: skip
        yield env.timeout(every)


def waiting(client: redis.Redis, names: StreamNames, group: str) -> bool:
    """Has the group entries not yet delivered to it, or pending?

    Compares ids rather than trusting XINFO's ``lag``, which is NULL after
    trimming and absent on Redis 6.2. Unknown while Redis is down: False.
    """
    for stream in names.streams(aggregate_types_of(group)):
        try:
            last = client.xinfo_stream(stream)["last-generated-id"]
            groups = client.xinfo_groups(stream)
        except redis.ResponseError:  # no such stream (yet)
            continue
        except TRANSIENT:
            return False
        for g in groups:
            if text(g["name"]) != group:
                continue
            if int(g["pending"]) or parse(g["last-delivered-id"]) < parse(last):
                return True
    return False


class SimCrash(Exception):
    """Raised by a crash hook: this consumer "process" dies here."""


class NotifyingFanout(FanoutHandler):
    """The fan-out handler, telling the simulation what it appended.

    ``notify`` gets, per user whose stream grew, the entries appended, in
    order: the live messages the SSE servers get (the script publishes exactly
    these). ``record`` gets a row per user entry made (the ``user_streams``
    table), and each event's entry count goes to ``effects_log``: the truth
    stays complete when user-stream history is trimmed later.
    """

    def __init__(
        self,
        client: redis.Redis,
        names: StreamNames,
        settings: ConsumersParams,
        notify: Callable[[dict[str, list[UserEntry]]], None],
        record: Callable[[dict[str, Any]], None],
        effects_log: Path,
        clock: SimClock,
        wait_replicas: int = 0,
    ) -> None:
        super().__init__(
            client, names, dedupe_ttl_s=settings.dedupe_ttl_s,
            user_maxlen=settings.user_maxlen, user_max_age_s=settings.user_max_age_s,
            clock=clock,  # entry ids, history window and dedupe lifetime on virtual time
            wait_replicas=wait_replicas,
        )  # fmt: skip
        self.notify, self.record, self.clock = notify, record, clock
        self._effects = AppendLog(effects_log, buffer_bytes=LOG_BUFFER_BYTES)

    def handle(self, events: list[Event]) -> None:
        try:
            appended = self.append(events)
        except (FanoutIncomplete, NotReplicated) as unfinished:
            self._record(events, unfinished.appended)  # they are in Redis: the truth
            raise
        self._record(events, appended)

    def _record(self, events: list[Event], appended: list[list[tuple[str, UserEntry]]]) -> None:
        lines = []
        live: dict[str, list[UserEntry]] = {}
        for event, entries in zip(events, appended, strict=True):
            for user, entry in entries:
                self.record({"user": user, "entry_id": str(entry.id), "event_id": event.event_id})
                live.setdefault(user, []).append(entry)
            if entries:
                lines.append(f"{event.event_id} {len(entries)} {self.clock.now()!r}\n")
        if lines:
            self._effects.append("".join(lines))
        self.notify(live)

    def unrecord(self, per_event: Counter[str]) -> None:
        """Take back entries Redis lost: negative counts in the effects log."""
        now = self.clock.now()
        lines = "".join(f"{event_id} {-n} {now!r}\n" for event_id, n in per_event.items())
        self._effects.append(lines)

    def close(self) -> None:
        self._effects.close()


class Doorbell:
    r"""A wake-up standing in for a blocking wait (the relay's idle ``BLOCK``): whoever
    has work for the sleeper rings; the sleeper waits on :attr:`event` or its poll
    timeout, whichever comes first, then :meth:`answer`\ s.

    A disabled bell never rings, so the sleeper only polls (bigger batches, more
    latency: ``relay.wake_on_commit = false``).
    """

    def __init__(self, env: simpy.Environment, enabled: bool = True) -> None:
        self.env, self.enabled = env, enabled
        self.event = env.event()

    def ring(self) -> None:
        if self.enabled and not self.event.triggered:
            self.event.succeed()

    def answer(self) -> None:
        """The sleeper woke: a rung bell is reset for the next wait."""
        if self.event.triggered:
            self.event = self.env.event()


def _ignore(_: Any) -> None:
    pass


@dataclass
class GroupSlot:
    """One consumer group's current consumer, and its crash plan."""

    name: str
    worker: ConsumerWorker | None = None
    generation: int = 0
    crash_at: str | None = None  # armed crash point
    log: HandlingLog | None = None  # what the current consumer's handler was given
    handler: Any = None
    given_up: dict[str, Any] | None = None  # the fault serve gave up after: down until heal()


class Runtime:
    """The runtime's loops as SimPy processes, over the real relay, workers and service.

    Everything it reports to is given at construction: ``outbox_bell`` (rung when
    commands commit outbox rows, it wakes the relay), ``on_fanout`` (the live
    messages of each fan-out batch, for the phones), ``on_user_entry`` and
    ``on_lost_entry`` (rows of the ``user_streams`` and ``lost_entries`` tables).
    """

    def __init__(
        self,
        env: simpy.Environment,
        clock: SimClock,
        service: EscrowService,
        store: Store,
        client: redis.Redis,
        names: StreamNames,
        scenario: Scenario,
        faults: list[dict[str, Any]],
        handling_dir: Path,
        *,
        outbox_bell: Doorbell,
        on_fanout: Callable[[dict[str, list[UserEntry]]], None] = _ignore,
        on_user_entry: Callable[[dict[str, Any]], None] = _ignore,
        on_lost_entry: Callable[[dict[str, Any]], None] = _ignore,
    ) -> None:
        self.env = env
        self.handling_dir = handling_dir
        self.clock = clock
        self.service = service
        self.store = store
        self.client = client
        self.names = names
        self.user_names = UserStreamNames.of(names)
        self.consumers = scenario.consumers
        # On a cluster the fan-out waits for each node's replica before it acks
        # (workbench.delivery.userstreams.NotReplicated), as serve runs it there.
        self.wait_replicas = 1 if scenario.redis.cluster_masters else 0
        self.relay_params = scenario.relay
        self.faults = faults
        self.relay = OutboxRelay(
            store, client, names=names, clock=clock, batch_size=500,
            retention_s=scenario.relay.retention_s, ids_on_clock=True,
        )  # fmt: skip
        # consumers.only and consumers.restart were checked by simulations.scenario.load.
        only = scenario.consumers.only_groups
        self.model: Any = None
        available = ALL_GROUPS
        if scenario.analytics.model:
            from workbench.analytics import load as load_model

            self.model = load_model(scenario.analytics.model)
            available = (*ALL_GROUPS, "analytics")
        self.groups = tuple(g for g in available if not only or g in only)
        self.slots = {group: GroupSlot(group) for group in self.groups}
        # serve's supervisor decides when a crashed process is back
        # (simulations.models.supervision).
        self.restarts = SupervisedRestarts(policy_of(scenario.supervisor))
        self.healed = False
        self.on_fanout = on_fanout
        self.on_user_entry = on_user_entry
        self.on_lost_entry = on_lost_entry
        # The fan-out's latest entries, to tell which a Redis loss took back (a loss
        # takes the newest writes; this holds far more than a kill can lose).
        self._recent_entries: deque[tuple[str, str, str]] = deque(maxlen=RECENT_ENTRIES)
        self.redis_errors: dict[str, int] = defaultdict(int)
        # Wake-ups standing in for XREADGROUP BLOCK and the relay's idle wait:
        # a command rings the relay's bell, a publish wakes the consumers.
        self._outbox = outbox_bell
        self._published = env.event()
        for slot in self.slots.values():
            self._start_worker(slot)

    # -- consumers ---------------------------------------------------------------------

    def _start_worker(self, slot: GroupSlot) -> None:
        c = self.consumers
        slot.generation += 1
        batch_size = 1 if c.service_rate > 0 else c.batch_size
        handler: Any = handler_for(
            slot.name,
            self.store,
            self.clock,
            fanout=lambda: NotifyingFanout(
                self.client,
                self.names,
                c,
                self.on_fanout,
                self._made_user_entry,
                self.handling_dir / f"effects-fanout-{slot.generation}.log",
                self.clock,
                wait_replicas=self.wait_replicas,
            ),
            analytics=self._risk_scorer,
        )
        cls = AckFirstWorker if c.ack_before_effect else CrashingWorker
        if slot.log is not None:
            slot.log.close()
        if isinstance(slot.handler, NotifyingFanout):
            slot.handler.close()
        slot.handler = handler
        # One handling log per consumer, as each worker process writes in real time.
        slot.log = HandlingLog(
            self.handling_dir / f"{slot.name}-{slot.generation}.log", buffer_bytes=LOG_BUFFER_BYTES
        )
        worker = cls(
            self.client,
            handler,
            # As serve does, a restarted worker keeps its consumer name and so re-reads
            # its own pending entries first; a replacement is another consumer, whose
            # predecessor's entries wait for the claim (heartbeat older than dead_after_s).
            consumer=f"{slot.name}-1"
            if c.restart == "supervisor"
            else f"{slot.name}-{slot.generation}",
            names=self.names,
            settings=ConsumerSettings(
                batch_size=batch_size,
                dead_after_s=c.dead_after_s,
                heartbeat_every_s=1.0,
                recover_every_s=2.0,
                retry_backoff_s=1.0,
                ids_on_clock=True,  # dead letters and the idle backstop on virtual time
            ),
            clock=self.clock,
            crash_hook=lambda point, _batch, slot=slot: self._maybe_crash(slot, point),
            observer=slot.log,
        )
        slot.worker = worker
        slot.crash_at = None
        with contextlib.suppress(*TRANSIENT):
            worker.setup()  # the group exists from now on, as a started process's would

    def _risk_scorer(self) -> Any:
        from workbench.analytics import RiskScorer

        return RiskScorer(
            self.store, self.client, self.model, names=self.names, clock=self.clock,
            ids_on_clock=True,
        )  # fmt: skip

    def _maybe_crash(self, slot: GroupSlot, point: str) -> None:
        if slot.crash_at == point:
            raise SimCrash(point)

    def nudge(self) -> None:
        """Outbox rows were committed: wake the relay now (unless the scenario trades
        that latency for batches: ``relay.wake_on_commit = false``)."""
        self._outbox.ring()

    def _wake_on_publish(self, every: float) -> Any:
        if not self.consumers.wake_on_publish:
            return self.env.timeout(every)  # batches: a poll every `every` seconds only
        return self.env.any_of([self.env.timeout(every), self._published])

    def consumer_loop(self, group: str, rng: np.random.Generator | None = None) -> Any:
        slot = self.slots[group]
        c = self.consumers
        every = c.poll_every_s
        while True:
            if c.service_rate > 0 and slot.worker is not None and self._waiting(group):
                # A single server: the head entry is in service for an exponential
                # time, then handled and acked (batch_size 1).
                assert rng is not None
                yield self.env.timeout(rng.exponential(1.0 / c.service_rate))
                polls = 1
            else:
                yield self._wake_on_publish(every)
                polls = 0 if c.service_rate > 0 else 50
            if slot.worker is None or not polls and c.service_rate > 0:
                continue
            try:
                # Poll until a poll comes back short of a full batch: nothing else
                # can arrive within this instant, so one more (empty) read is waste.
                for _ in range(polls):
                    if slot.worker.poll(block_ms=0) < slot.worker.settings.batch_size:
                        break
            except SimCrash as crash:
                self.faults.append(
                    {"t_start": self.env.now, "t_end": None, "kind": "consumer_crash",
                     "target": slot.worker.consumer, "detail": str(crash)}
                )  # fmt: skip
                slot.worker = None
                self.env.process(self._repair(slot))
            except TRANSIENT:
                self.redis_errors[group] += 1

    def _repair(self, slot: GroupSlot) -> Any:
        """Bring the group's consumer back: after serve's backoff (``restart =
        "supervisor"``), or a replacement consumer after ``mttr_s``."""
        fault = self.faults[-1]
        c = self.consumers
        if c.restart == "replacement":
            down_for: float | None = c.mttr_s
        else:
            down_for = self.restarts.down_for(slot.name, self.env.now)
        if down_for is None:  # serve gives up on a crash loop: down until heal()
            fault["detail"] += f"; {self.restarts.given_up[slot.name]}"
            slot.given_up = fault
            return
        yield self.env.timeout(down_for)
        self._start_worker(slot)
        self.restarts.started(slot.name, self.env.now)
        fault["t_end"] = self.env.now

    def _made_user_entry(self, row: dict[str, Any]) -> None:
        self._recent_entries.append((row["user"], row["entry_id"], row["event_id"]))
        self.on_user_entry(row)

    def redis_restarted(self) -> int:
        """Redis came back, maybe without its last writes: take the fan-out's entries it
        lost out of the truth; return how many.

        A loss takes a suffix of each user stream (the AOF keeps a prefix), so an entry
        made by the fan-out is lost when its id is past its stream's surviving last id.
        Each goes to ``lost_entries`` and its count comes off the fan-out's effects
        log (negative lines): the fan-out makes those entries again when the relay's
        repair republishes the events, and the run's truth must count them once.
        """
        recent = list(self._recent_entries)
        users = sorted({user for user, _, _ in recent})
        pipe = self.client.pipeline(transaction=False)
        for user in users:
            pipe.xrevrange(self.user_names.stream(user), count=1)
        last = {
            user: parse(tail[0][0]) if tail else ZERO
            for user, tail in zip(users, execute(self.client, pipe), strict=True)
        }
        lost = [entry for entry in recent if parse(entry[1]) > last[entry[0]]]
        if not lost:
            return 0
        gone = set(lost)
        self._recent_entries = deque((e for e in recent if e not in gone), maxlen=RECENT_ENTRIES)
        per_event = Counter(event_id for _, _, event_id in lost)
        handler = self.slots["fanout"].handler if "fanout" in self.slots else None
        if isinstance(handler, NotifyingFanout):
            handler.unrecord(per_event)
        for user, entry_id, event_id in lost:
            self.on_lost_entry(
                {"user": user, "entry_id": entry_id, "event_id": event_id, "t": self.env.now}
            )
        return len(lost)

    def crash_loop(self, group: str, rng: np.random.Generator) -> Any:
        """Arm a crash at a random crash point every MTBF (exponential) on average."""
        mtbf = self.consumers.mtbf_s
        if mtbf <= 0:
            return
        slot = self.slots[group]
        while not self.healed:
            yield self.env.timeout(rng.exponential(mtbf))
            if self.healed:
                return
            if slot.worker is not None:
                slot.crash_at = CRASH_POINTS[int(rng.integers(len(CRASH_POINTS)))]

    # -- relay and timers ----------------------------------------------------------------

    def relay_loop(self) -> Any:
        every = self.relay_params.every_s
        while True:
            yield self.env.any_of([self.env.timeout(every), self._outbox.event])
            self._outbox.answer()
            try:
                published = self.relay.drain()
            except TRANSIENT:
                self.redis_errors["relay"] += 1
                continue
            if published and not self._published.triggered:
                self._published.succeed()
                self._published = self.env.event()

    def _waiting(self, group: str) -> bool:
        return waiting(self.client, self.names, group)

    def timer_loop(self, every: float = 10.0) -> Any:
        while True:
            yield self.env.timeout(every)
            self.service.expire_due()
            # The payment reconciliation pass: re-ask unanswered queries, find lost callbacks.
            self.service.verify_payments()
            # What these committed goes out now, as a command's rows do (the relay's BLOCK).
            self.nudge()

    def finish(self) -> None:
        """At the end of the drain: publish what the last instant committed and
        let every consumer take it, so "unseen" means stuck, not "just missed"."""
        self.relay.drain()
        for slot in self.slots.values():
            if slot.worker is None:
                self._start_worker(slot)
            assert slot.worker is not None
            slot.worker.drain()

    def close(self) -> None:
        for slot in self.slots.values():
            if slot.log is not None:
                slot.log.close()
            if isinstance(slot.handler, NotifyingFanout):
                slot.handler.close()

    def heal(self) -> None:
        """Stop injecting faults and revive every dead consumer now (the drain phase).

        A consumer waiting out serve's backoff comes back by its own repair; one
        serve gave up on (a crash loop; serve itself would exit 1) is started here,
        as an operator would once the faults stop. Left down to :meth:`finish`, its
        pending entries would be re-read after the fan-out's dedupe markers of
        entries it had appended before its last crash may have expired
        (``consumers.dedupe_ttl_s``), and appended again.
        """
        self.healed = True
        for slot in self.slots.values():
            slot.crash_at = None
            if slot.worker is None and slot.given_up is not None:
                self._start_worker(slot)
                self.restarts.started(slot.name, self.env.now)
                slot.given_up["t_end"] = self.env.now
                slot.given_up = None

    # -- observation ---------------------------------------------------------------------

    def backlog(self, group: str) -> tuple[int, int, int]:
        return backlog(self.client, self.names, group)

    def sampler(self, every: float, samples: list[dict[str, Any]]) -> Any:
        return sample_backlog(
            self.env, self.client, self.names, self.groups, every, samples, self.clock
        )
