"""Phones: app users whose SSE connection keeps dropping.

Each phone is a SimPy process over one user's stream. A connection resumes
from the Last-Event-ID the phone kept, using the runtime's own handoff logic
(:class:`workbench.delivery.handoff.ReplaySession`, :func:`resume_point_known`) over
real XRANGE reads; while connected it gets the entries the fan-out worker
appends to its stream as their live messages (:meth:`Phone.notify`: what the
script publishes and an SSE server passes on), each judged by the session's
``take_live`` exactly as the server does: sent, skipped, or a catch-up read
from the stream when one is missing. A connection lasts
an exponential time ("drops every few minutes"), the phone waits a jittered
reconnect delay, and now and then loses its Last-Event-ID (reinstall): it then
fetches the snapshot and resumes from its ``as_of``. A position that is no
longer retained gets the same treatment (the ``reset`` event).

Phones are spread over the SSE server processes of a :class:`ServerPool`.
When a server dies (:class:`ServerFaults`) every session on it ends at that
instant; its phones reconnect, after their usual delay, to a server that is up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import redis
import simpy

from simulations.models.supervision import SupervisedRestarts
from simulations.scenario import PhonesParams, ServersParams
from workbench.delivery.entries import UserEntry
from workbench.delivery.handoff import (
    HistoryLost,
    Live,
    ReplaySession,
    resume_point_known,
)
from workbench.delivery.userstreams import entry_from_fields, first_page_from, queue_first_page
from workbench.domain.streamid import ZERO, StreamId
from workbench.streams.connection import TRANSIENT, execute
from workbench.streams.keys import UserStreamNames

PAGE = 500


class ServerPool:
    """Which SSE server processes are up, and which phone is on which."""

    def __init__(self, count: int) -> None:
        self.up = [True] * count
        self.phones: list[Phone] = []

    def choose(self, rng: np.random.Generator) -> int | None:
        live = [i for i, up in enumerate(self.up) if up]
        return live[int(rng.integers(len(live)))] if live else None

    def kill(self, server: int) -> int:
        """The server dies with its sessions; return how many were open."""
        self.up[server] = False
        dropped = 0
        for phone in self.phones:
            if phone.server == server and phone.connected:
                phone.dropped = True
                phone.notify()
                dropped += 1
        return dropped


class ServerFaults:
    """SIGKILL an SSE server now and then (per server MTBF, exponential); it comes
    back when serve's supervisor restarts it (``restarts``: its backoff, or never
    after a crash loop). ``kill``/``restart`` do the real thing in real time."""

    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: ServersParams,
        pool: ServerPool,
        faults: list[dict[str, Any]],
        until: float,
        restarts: SupervisedRestarts,
    ) -> None:
        self.env, self.rng, self.p, self.pool = env, rng, params, pool
        self.faults, self.until, self.restarts = faults, until, restarts

    def kill(self, server: int) -> None:  # overridden where a process dies for real
        pass

    def restart(self, server: int) -> None:
        pass

    def run(self, server: int) -> Any:
        if self.p.mtbf_s <= 0:
            return
        while True:
            yield self.env.timeout(self.rng.exponential(self.p.mtbf_s))
            if self.env.now >= self.until:
                return
            self.kill(server)
            sessions = self.pool.kill(server)
            fault = {"t_start": self.env.now, "t_end": None, "kind": "server_kill",
                     "target": f"sse-server-{server}",
                     "detail": f"SIGKILL with {sessions} sessions"}  # fmt: skip
            self.faults.append(fault)
            name = f"sse-server-{server}"
            down_for = self.restarts.down_for(name, self.env.now)
            if down_for is None:  # serve gave up on it: it stays down
                fault["detail"] += f"; {self.restarts.given_up[name]}"
                return
            yield self.env.timeout(down_for)
            self.restart(server)
            self.restarts.started(name, self.env.now)
            self.pool.up[server] = True
            fault["t_end"] = self.env.now


class Phone:
    def __init__(
        self,
        env: simpy.Environment,
        rng: np.random.Generator,
        params: PhonesParams,
        user: str,
        client: redis.Redis,
        names: UserStreamNames,
        deliveries: list[dict[str, Any]],
        pool: ServerPool | None = None,
    ) -> None:
        """A phone of ``user``; with a ``pool`` it takes a seat there (its sessions end
        when their server dies), without one it is always on server 0's side."""
        self.env = env
        self.rng = rng
        self.p = params
        self.user = user
        self.client = client
        self.key = names.stream(user)
        self.deliveries = deliveries
        self.cursor: StreamId | None = ZERO  # Last-Event-ID; None once lost
        self.connection = 0
        self.stop = False
        self.pool = pool
        self.server: int | None = None
        self.connected = False
        self.dropped = False  # the server died under this connection
        self._news = env.event()
        self._live: list[UserEntry] = []  # live messages not yet taken
        if pool is not None:
            pool.phones.append(self)

    def _record(self, source: str, entry_id: str, event_id: str) -> None:
        self.deliveries.append(
            {"phone": self.user, "connection": self.connection, "source": source,
             "entry_id": entry_id, "event_id": event_id, "t": self.env.now}
        )  # fmt: skip

    def _page_after(self, cursor: StreamId) -> list[Any]:
        rows = self.client.xrange(self.key, f"({cursor}", "+", count=PAGE)
        return [entry_from_fields(i, f) for i, f in rows]

    def _snapshot(self) -> StreamId:
        last = self.client.xrevrange(self.key, "+", "-", count=1)
        as_of = StreamId(*map(int, last[0][0].decode().split("-"))) if last else ZERO
        self._record("snapshot", str(as_of), "")
        return as_of

    def _deliver(self, session: ReplaySession, source: str, page: list[Any] | None = None) -> None:
        while True:
            if page is None:
                page = self._page_after(session.cursor)
            for entry in session.take_page(page):
                self._record(source, str(entry.id), entry.event_id)
            self.cursor = session.cursor  # what the app stores as Last-Event-ID
            if len(page) < PAGE:
                return
            page = None

    def _connect(self) -> ReplaySession:
        if self.cursor is None:
            self.cursor = self._snapshot()
        # The server's first read: the page after the cursor and whether the cursor
        # is still an entry (which matters when nothing follows it), in one round trip.
        # (No MULTI, unlike the server: one thread drives every part of a virtual run.)
        pipe = self.client.pipeline(transaction=False)
        queue_first_page(pipe, self.key, self.cursor, PAGE)
        first, exists = first_page_from(execute(self.client, pipe))
        page: list[Any] | None = first
        if not resume_point_known(self.cursor, page or [], exists):
            self.cursor = self._snapshot()  # the server's `event: reset`
            page = None
        session = ReplaySession(self.cursor)
        self._deliver(session, "replay", page)
        return session

    def notify(self, entries: Sequence[UserEntry] = ()) -> None:
        """Live messages for this user (or, with none, the server died): wake up.

        A phone that is not connected has no session to get them: it finds the
        entries in its stream when it next connects.
        """
        if self.connected:
            self._live.extend(entries)
            if not self._news.triggered:
                self._news.succeed()

    def _take_live(self, session: ReplaySession) -> None:
        live, self._live = self._live, []
        for entry in live:
            verdict = session.take_live(entry)
            if verdict is Live.SEND:
                self._record("live", str(entry.id), entry.event_id)
                self.cursor = session.cursor
            elif verdict is Live.CATCH_UP:  # one is missing: read the stream instead
                self._deliver(session, "live")

    def _connected_until(self, ends: float) -> Any:
        self._live = []  # messages of an earlier connection went nowhere
        session = self._connect()
        end = self.env.timeout(max(0.0, ends - self.env.now))
        while not self.stop:
            self._news = self.env.event()
            yield end | self._news
            if self.dropped or self.env.now >= ends:
                return
            self._take_live(session)

    def _pick_server(self) -> Any:
        """Wait until some server is up and take one (the load balancer's choice)."""
        if self.pool is None:
            return
        while (server := self.pool.choose(self.rng)) is None:
            yield self.env.timeout(self.p.reconnect_mean_s)
        self.server = server

    def run(self) -> Any:
        p, rng = self.p, self.rng
        while not self.stop:
            yield from self._pick_server()
            self.connection += 1
            self.connected, self.dropped = True, False
            try:
                yield from self._connected_until(
                    self.env.now + rng.exponential(p.connection_mean_s)
                )
            except HistoryLost:
                self.cursor = None  # `event: reset`: resync from the snapshot next time
            except TRANSIENT:
                pass  # Redis is down: the connection breaks; the phone retries later
            self.connected = False
            if self.stop:
                return
            yield self.env.timeout(rng.exponential(p.reconnect_mean_s))
            if rng.random() < p.lose_id_p:
                self.cursor = None

    def final_drain(self) -> None:
        """After the run: connect once more and take everything still waiting."""
        self.connection += 1
        self._connect()
