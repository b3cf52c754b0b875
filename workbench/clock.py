"""Injectable clocks.

Runtime decisions that depend on time (expiry, claim idle, heartbeats) read a
``Clock`` instead of calling ``time.time()``, so the same code runs on the wall
clock, under a SimPy environment's virtual time, and in tests that move time
by hand.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch (or since the simulation's epoch)."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to: for tests and simulations."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._now += seconds
        return self._now

    def set(self, instant: float) -> None:
        if instant < self._now:
            raise ValueError("a clock does not go backwards")
        self._now = instant


def now_ms(clock: Clock) -> int:
    return int(clock.now() * 1000)
