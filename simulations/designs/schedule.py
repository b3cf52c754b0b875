"""The load and the fault schedule every design is driven with, fixed by a seed.

A :class:`Schedule` is plain data: which events happen when, which users each
concerns, when the fan-out step is down and when which phone is offline. Two
independent numpy streams (``SeedSequence(seed).spawn(2)``) draw the load and
the faults, so changing the fault parameters does not change the events.

**Load.** Poisson arrivals at ``rate`` events/s for ``duration_s`` seconds.
Each event concerns ``users_per_event`` distinct users (an escrow has a buyer
and a seller), drawn uniformly. There is one client (phone) per user. All
events are ``escrow.*`` events on the one ``escrow`` aggregate stream, so the
production order is a total order every design can be checked against.

**Fan-out downtime.** Every design has a fan-out step between the producer and
the phones: the process that takes an event concerning users A and B and
hands it to A's and B's delivery. From ``downtime_start_s`` it *crashes* at
the next event it reads (``crash_point``: ``"after-read"`` = before doing
anything with it, ``"after-effect"`` = after handing it on but before
acknowledging it), and it is back ``downtime_s`` after the window started,
as a process restarted under the same name would be. What the producer
publishes meanwhile is the question the seed's first claim answers.

**Disconnects.** ``n_disconnects`` distinct phones each go offline once for
``disconnect_s`` seconds, then reconnect, sending the id of the last event
they received where the design has such a thing (Last-Event-ID).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

CRASH_POINTS = ("after-read", "after-effect")


@dataclass(frozen=True)
class PlannedEvent:
    """Event number ``index`` is produced ``at_s`` seconds into the run, for ``users``."""

    index: int
    at_s: float
    users: tuple[str, ...]


@dataclass(frozen=True)
class Window:
    """A half-open interval of run time, in seconds since production started."""

    start_s: float
    end_s: float

    def contains(self, t: float) -> bool:
        return self.start_s <= t < self.end_s

    @property
    def length_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Disconnect:
    """``user``'s phone is offline during ``window``."""

    user: str
    window: Window


@dataclass(frozen=True)
class Schedule:
    """The same load and faults for every design; see the module docstring.

    The defaults take a few seconds per design. For the notebook scale up
    ``n_clients``, ``rate`` and ``duration_s``; every window is in seconds of
    the run and is checked to fit inside it.
    """

    seed: int = 3
    n_clients: int = 20
    rate: float = 50.0
    duration_s: float = 6.0
    users_per_event: int = 2
    downtime_start_s: float = 2.0
    downtime_s: float = 1.5
    crash_point: str = "after-effect"
    n_disconnects: int = 4
    disconnect_s: float = 1.0
    settle_s: float = 0.5
    drain_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.n_clients < 1 or self.rate <= 0 or self.duration_s <= 0:
            raise ValueError("n_clients, rate and duration_s must be positive")
        if not 1 <= self.users_per_event <= self.n_clients:
            raise ValueError("users_per_event must be between 1 and n_clients")
        if self.downtime_s < 0 or self.downtime_start_s < 0:
            raise ValueError("the downtime window must not be negative")
        if self.downtime_s and self.downtime_start_s + self.downtime_s > self.duration_s:
            raise ValueError("the downtime window must end before production does")
        if not 0 <= self.n_disconnects <= self.n_clients:
            raise ValueError("n_disconnects must be between 0 and n_clients")
        if self.n_disconnects and self.disconnect_s + 1.0 > self.duration_s:
            raise ValueError("disconnect_s must leave 0.5 s either side within duration_s")
        if self.crash_point not in CRASH_POINTS:
            raise ValueError(f"crash_point must be one of {CRASH_POINTS}, not {self.crash_point!r}")

    @property
    def users(self) -> list[str]:
        """One user (and one phone) per client: ``u000``, ``u001``, ..."""
        return [f"u{i:03d}" for i in range(self.n_clients)]

    @property
    def downtime(self) -> Window:
        """The planned fan-out downtime (the run records the actual one)."""
        return Window(self.downtime_start_s, self.downtime_start_s + self.downtime_s)

    @cached_property
    def events(self) -> tuple[PlannedEvent, ...]:
        """The events in production order (Poisson arrivals)."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(2)[0])
        expected = self.rate * self.duration_s
        gaps = rng.exponential(1.0 / self.rate, size=int(expected + 10 * np.sqrt(expected) + 20))
        times = np.cumsum(gaps)
        times = times[times < self.duration_s]
        users = self.users
        return tuple(
            PlannedEvent(
                index=i,
                at_s=float(t),
                users=tuple(
                    users[j]
                    for j in rng.choice(self.n_clients, self.users_per_event, replace=False)
                ),
            )
            for i, t in enumerate(times)
        )

    @cached_property
    def disconnects(self) -> tuple[Disconnect, ...]:
        """Who goes offline when, sorted by start."""
        if not self.n_disconnects:
            return ()
        rng = np.random.default_rng(np.random.SeedSequence(self.seed).spawn(2)[1])
        who = rng.choice(self.n_clients, self.n_disconnects, replace=False)
        starts = rng.uniform(0.5, self.duration_s - self.disconnect_s - 0.5, self.n_disconnects)
        users = self.users
        return tuple(
            sorted(
                (
                    Disconnect(users[int(c)], Window(float(s), float(s) + self.disconnect_s))
                    for c, s in zip(who, starts, strict=True)
                ),
                key=lambda d: d.window.start_s,
            )
        )

    def expected(self) -> dict[str, list[int]]:
        """Per user, the indexes of the events its phone should end up with, in order."""
        out: dict[str, list[int]] = {u: [] for u in self.users}
        for event in self.events:
            for user in event.users:
                out[user].append(event.index)
        return out
