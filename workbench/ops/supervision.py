"""Restart decisions for the processes ``workbench serve`` runs: sans-IO.

:class:`Supervisor` decides, from events and times only (a child started, a
child exited, what time it is), which child to start when and when to give
up. It spawns nothing, sleeps nowhere and reads no clock, so its rules are
tested with plain numbers; the loop in :mod:`workbench.ops.serve` feeds it.

The rules it guarantees:

* A child that exits unasked is restarted after a backoff: ``initial_backoff_s``
  after its first crash, doubling with each further crash in a row, capped at
  ``max_backoff_s``. A run that lasted ``stable_after_s`` or longer ends the
  row: the next crash waits ``initial_backoff_s`` again.
* Crash loop: a child that would need its ``max_restarts + 1``-th restart
  within ``window_s`` seconds is *failed*: it is not restarted and
  :meth:`Supervisor.exited` returns a :class:`GiveUp` naming it (``serve``
  then stops everything and exits non-zero).
* Every restart is counted per child (:attr:`Child.restarts`), for ``/metrics``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Literal

State = Literal["starting", "running", "backoff", "failed", "stopped"]


@dataclass(frozen=True)
class RestartPolicy:
    """How eagerly a crashed child comes back, and when to stop trying."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < initial_backoff_s <= max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0 or self.stable_after_s <= 0:
            raise ValueError("max_restarts >= 0, window_s > 0 and stable_after_s > 0")


@dataclass(frozen=True)
class Restart:
    """Start ``name`` again at ``at`` (after ``delay_s``)."""

    name: str
    at: float
    delay_s: float
    restart_no: int


@dataclass(frozen=True)
class GiveUp:
    """``name`` crashed too often: ``reason`` says how often, in how long."""

    name: str
    reason: str


@dataclass
class Child:
    """What the supervisor knows about one child."""

    name: str
    state: State = "starting"
    started_at: float | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    last_exit: int | None = None
    restart_at: float | None = None
    pid: int | None = None
    restart_times: deque[float] = field(default_factory=deque)


class Supervisor:
    """Restart bookkeeping for a fixed set of named children."""

    def __init__(self, names: list[str] | tuple[str, ...], policy: RestartPolicy | None = None):
        if len(set(names)) != len(names):
            raise ValueError(f"child names must be unique: {names}")
        self.policy = policy or RestartPolicy()
        self.children = {name: Child(name) for name in names}

    def started(self, name: str, now: float, pid: int | None = None) -> None:
        """``name`` was (re)started at ``now``."""
        child = self.children[name]
        child.state = "running"
        child.started_at = now
        child.restart_at = None
        child.pid = pid

    def exited(self, name: str, now: float, returncode: int | None) -> Restart | GiveUp:
        """``name`` exited unasked at ``now``: when to restart it, or give up."""
        child = self.children[name]
        policy = self.policy
        child.last_exit = returncode
        child.pid = None
        ran_s = now - child.started_at if child.started_at is not None else 0.0
        child.crashes_in_a_row = 1 if ran_s >= policy.stable_after_s else child.crashes_in_a_row + 1
        window = child.restart_times
        while window and now - window[0] > policy.window_s:
            window.popleft()
        if len(window) >= policy.max_restarts:
            child.state = "failed"
            child.restart_at = None
            return GiveUp(
                name,
                f"{name} exited ({describe_exit(returncode)}) after {len(window)} restarts "
                f"in {policy.window_s:g} s; not restarting it again",
            )
        delay = min(
            policy.max_backoff_s, policy.initial_backoff_s * 2 ** (child.crashes_in_a_row - 1)
        )
        child.state = "backoff"
        child.restart_at = now + delay
        window.append(now)
        child.restarts += 1
        return Restart(name, child.restart_at, delay, child.restarts)

    def due(self, now: float) -> list[str]:
        """Children whose backoff is over: start them now (then call :meth:`started`)."""
        return [
            c.name
            for c in self.children.values()
            if c.state == "backoff" and c.restart_at is not None and c.restart_at <= now
        ]

    def next_due(self) -> float | None:
        """The earliest pending restart time, if any."""
        times = [c.restart_at for c in self.children.values() if c.restart_at is not None]
        return min(times) if times else None

    def stopping(self) -> None:
        """Serve is shutting down: nothing is restarted any more."""
        for child in self.children.values():
            if child.state != "failed":
                child.state = "stopped"
            child.restart_at = None

    def snapshot(self) -> dict[str, dict[str, object]]:
        """JSON-ready view of every child (the supervision state file)."""
        return {
            c.name: {
                "state": c.state,
                "pid": c.pid,
                "restarts": c.restarts,
                "last_exit": c.last_exit,
                "started_at": c.started_at,
                "restart_at": c.restart_at,
            }
            for c in self.children.values()
        }


def describe_exit(returncode: int | None) -> str:
    """``signal 9`` for a negative Popen return code, ``code N`` otherwise."""
    if returncode is None:
        return "did not start"
    if returncode < 0:
        return f"signal {-returncode}"
    return f"code {returncode}"
