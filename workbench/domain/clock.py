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


def simulated(clock: Clock) -> Clock | None:
    """``clock`` when it is a simulation's (a :class:`ScaledClock` from the environment),
    else None: the clock that stream ids, retention windows and dedupe lifetimes
    follow in a process a real-time simulation started (production keeps Redis')."""
    return clock if isinstance(clock, ScaledClock) else None


class ScaledClock:
    """Wall time mapped onto a simulation's timeline: ``rate`` virtual seconds per
    wall second, virtual ``epoch`` at wall instant ``origin``.

    Real-time simulations hand the same three numbers to every process they
    start (see :func:`clock_env`), so a server's expiry timers, a worker's
    heartbeats and the simulator's SimPy clock all agree on what time it is.
    """

    def __init__(self, origin: float, epoch: float, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"a clock's rate must be positive, not {rate}")
        self.origin, self.epoch, self.rate = origin, epoch, rate

    def now(self) -> float:
        return self.epoch + (time.time() - self.origin) * self.rate


_ENV = ("WORKBENCH_CLOCK_ORIGIN", "WORKBENCH_CLOCK_EPOCH", "WORKBENCH_CLOCK_RATE")


def clock_env(origin: float, epoch: float, rate: float) -> dict[str, str]:
    """The environment variables that make :func:`clock_from_env` a :class:`ScaledClock`."""
    return dict(zip(_ENV, (repr(origin), repr(epoch), repr(rate)), strict=True))


def clock_from_env(environ: dict[str, str] | None = None) -> Clock:
    """A :class:`ScaledClock` when ``WORKBENCH_CLOCK_*`` are set, else the wall clock."""
    import os

    env = os.environ if environ is None else environ
    values = [env.get(name) for name in _ENV]
    if not any(values):
        return SystemClock()
    if not all(values):
        raise RuntimeError(f"set all of {', '.join(_ENV)} or none of them")
    try:
        origin, epoch, rate = (float(v) for v in values)  # type: ignore[arg-type]
    except ValueError:
        raise RuntimeError(f"{', '.join(_ENV)} must be numbers, not {values}") from None
    return ScaledClock(origin, epoch, rate)
