"""Fault injection: consumers and relays that die where the lab tells them to.

The runtime has no crash hooks. It has seams: :class:`ConsumerWorker` handles
a batch in ``_handle_in_order`` and acks it in ``_ack_handled``;
:class:`OutboxRelay` calls ``_published`` between a batch's XADDs and its mark
in SQL. The classes here override those seams to call a *crash hook* at the
named points (``after-read``, ``mid-batch``, ``after-effect``; the relay's
``after-xadd``). A hook kills the process (:func:`sigkill_at`,
:func:`sigkill_when_signalled`: real processes in real-time runs and the
demo) or raises (a SimPy run drops the worker object where it stands).

:class:`AckFirstWorker` is the deliberately broken runtime: it acks before
the effect, so the checker can be shown to catch lost events.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from workbench.streams.consumer import ConsumerWorker
from workbench.streams.decisions import Delivery
from workbench.streams.relay import OutboxRelay

log = logging.getLogger(__name__)

#: Where a consumer can be made to die, in the order a batch reaches them.
CRASH_POINTS = ("after-read", "mid-batch", "after-effect")
#: Where the relay can be made to die.
RELAY_CRASH_POINTS = ("after-xadd",)

CrashHook = Callable[[str, int], None]


class CrashingWorker(ConsumerWorker):
    """A consumer that calls ``crash_hook(point, batch_no)`` at each crash point;
    batches of two or more are handled in two halves with ``mid-batch`` between."""

    def __init__(self, *args: Any, crash_hook: CrashHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_hook = crash_hook

    def _crash(self, point: str) -> None:
        if self.crash_hook is not None:
            self.crash_hook(point, self.stats.batches)

    def _process(self, deliveries: list[Delivery]) -> None:
        if self.crash_hook is not None:
            self.crash_hook("after-read", self.stats.batches + 1)
        super()._process(deliveries)

    def _handle_in_order(self, good: list[Delivery], failed: list[Delivery]) -> list[Delivery]:
        if self.crash_hook is None or len(good) < 2:
            return self._handle(good, failed)
        half = len(good) // 2
        done = self._handle(good[:half], failed)
        self._crash("mid-batch")
        return done + self._handle(good[half:], failed)

    def _ack_handled(self, deliveries: list[Delivery]) -> None:
        self._crash("after-effect")
        super()._ack_handled(deliveries)


class AckFirstWorker(CrashingWorker):
    """Deliberately broken: acks a batch as soon as it is read, before the effect.

    Exists so the checker can be shown to catch a real bug (events lost after a
    crash); used only when a scenario sets ``consumers.ack_before_effect`` (and by
    ``workbench sim-worker --ack-before-effect`` for real-time runs).
    """

    def _process(self, deliveries: list[Delivery]) -> None:
        self._ack(deliveries)
        super()._process(deliveries)


class CrashingRelay(OutboxRelay):
    """A relay that calls ``crash_hook("after-xadd", batch_no)`` between XADD and mark."""

    def __init__(self, *args: Any, crash_hook: CrashHook | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.crash_hook = crash_hook

    def _published(self, batch_no: int) -> None:
        if self.crash_hook is not None:
            self.crash_hook("after-xadd", batch_no)


def sigkill_at(
    point: str, batch: int, points: tuple[str, ...] = CRASH_POINTS
) -> Callable[[str, int], None]:
    """A crash hook that SIGKILLs this process at ``point`` of batch ``batch`` or later.

    "Or later": ``mid-batch`` exists only in batches of two or more entries, and
    under load a worker can read single entries; the crash then comes at the
    first batch from ``batch`` on that has the point, instead of never.
    """
    if point not in points:
        raise ValueError(f"crash point must be one of {', '.join(points)}, not {point!r}")

    def hook(at: str, batch_no: int) -> None:
        if at == point and batch_no >= batch:
            log.warning("crash injection: SIGKILL at %s of batch %d", at, batch_no)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def crash_signal(point: str) -> int:
    """The real-time signal that arms ``point`` in a worker run with
    ``--crash-on-signal`` (SIGRTMIN + the point's index in CRASH_POINTS)."""
    return signal.SIGRTMIN + CRASH_POINTS.index(point)


def sigkill_when_signalled() -> Callable[[str, int], None]:
    """A crash hook armed from outside: :func:`crash_signal` of a point makes this
    process SIGKILL itself when it next reaches that point (a simulator choosing
    *where* a worker dies, not only when)."""
    armed: set[str] = set()
    for point in CRASH_POINTS:
        signal.signal(crash_signal(point), lambda *_, point=point: armed.add(point))

    def hook(at: str, batch_no: int) -> None:
        if at in armed:
            log.warning("crash injection: SIGKILL at %s of batch %d", at, batch_no)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
