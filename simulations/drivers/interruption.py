"""A run stopped by SIGINT (Ctrl-C) or SIGTERM: cleanly, within seconds, and said so.

Inside :func:`interruptible` the first SIGINT or SIGTERM raises :class:`Interrupted`
in the main thread, wherever the run is (a SimPy step, a Redis call, a wall-clock
sleep). It is a ``BaseException``, like ``KeyboardInterrupt``, so no ``except
Exception`` on its way swallows it: it unwinds the run, and every ``with`` and
``ExitStack`` the drivers opened does its part on the way out (the fleet of
served processes is stopped, the private redis-server stopped, the temporary
directories removed). The caller then says what happened and exits with
:attr:`Interrupted.exit_code` (128 + the signal: 130, 143), as a shell would.

Starting a child is :func:`held`: a signal during it is raised once the child is
known to whoever stops it (a ``Popen`` cut between its fork and its return would
leave a child that nobody stops, writing into a directory being removed).

An exception can also vanish, or change: code that is not safe against an
exception from anywhere may replace it with an error of its own (SQLAlchemy's
commit, cut short, fails an assertion in its ``finally``), which an ``except
Exception`` then takes for a failure of the run's (a consumer's handler failed)
and goes on. So the stop is also remembered: the run's progress reports call
:func:`checkpoint`, which raises it if it came; an error leaving the block after
it is raised as the stop (``from`` the error); and a block that ran to its end
with a stop that never surfaced raises it there.

The children do not see the terminal's Ctrl-C: redis-server and the served
processes run in sessions of their own (:mod:`workbench.ops.redis_server`,
:mod:`simulations.drivers.realtime`), so nothing dies under the simulator while
it is still using it, and they are stopped in order. A second signal while the
run unwinds exits at once (:func:`os._exit`): the children still die, by their
parent-death signal (:mod:`workbench.ops.children`), but temporary directories
may be left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The run was stopped by the signal ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)  # the only argument: SimPy re-raises it from its args
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process the signal ended: 128 + its number."""
        return 128 + self.signum

    def __str__(self) -> str:
        return f"interrupted by {self.name}"


#: How soon an :class:`Interrupted` that Python had to drop is raised again.
REDELIVER_S = 0.05


@dataclass
class _Stop:
    signum: int | None = None  # the signal that stops the run, once one came
    redelivering: bool = False  # its exception was dropped: raise it again (SIGALRM)
    held: int = 0  # inside held(): the signal waits for the end of the section
    waiting: bool = False  # a signal came while held


#: The stop of the innermost interruptible() block, if one is active.
_active: list[_Stop] = []


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A section a stop must not cut in two: a signal inside it raises
    :class:`Interrupted` at its end. For starting a child process: started and
    known to whoever stops it, or not started (a ``Popen`` interrupted between the
    fork and its return leaves a child nobody stops). Outside :func:`interruptible`,
    nothing is held."""
    if not _active:
        yield
        return
    stop = _active[-1]
    stop.held += 1
    try:
        yield
    finally:
        stop.held -= 1
        if stop.waiting and not stop.held:  # the stop asked for, whatever else happened
            stop.waiting = False
            assert stop.signum is not None
            raise Interrupted(stop.signum)


def checkpoint() -> None:
    """Raise the stop here if one came: the run is going on normally (call it where it
    reports progress), so the stop's exception was lost on its way. Outside
    :func:`interruptible`, or inside :func:`held` (which raises it at its end), nothing."""
    if not _active or _active[-1].signum is None or _active[-1].held:
        return
    _raise_now(_active[-1])


def _raise_now(stop: _Stop, instead_of: Exception | None = None) -> None:
    assert stop.signum is not None
    stop.redelivering = False  # no alarm raises it a second time
    signal.setitimer(signal.ITIMER_REAL, 0)
    raise Interrupted(stop.signum) from instead_of


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise :class:`Interrupted` (the first one)
    or exit at once (a second one, while the first unwinds the block). The earlier
    handlers are restored when the block ends. Main thread only (Python's rule).

    A handler's exception is dropped ("Exception ignored in ...") where Python runs
    code it cannot raise from: the after-fork callbacks of a ``subprocess.Popen``
    with a ``preexec_fn`` (which starts redis-server and the fleet, so a signal
    landing while one is forked is dropped), ``__del__`` methods, weakref callbacks.
    ``sys.unraisablehook`` sees it go; an alarm raises it again a moment later.
    """
    stop = _Stop()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.signum is not None and not stop.redelivering:
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting now\n".encode())
            os._exit(128 + stop.signum)
        stop.signum, stop.redelivering = stop.signum or signum, False
        if stop.held:
            stop.waiting = True  # raised at the end of the held section
            return
        raise Interrupted(stop.signum)

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        if stop.redelivering and stop.signum is not None:
            on_signal(stop.signum, frame)

    previous_hook = sys.unraisablehook

    def on_unraisable(info: Any) -> None:
        if isinstance(info.exc_value, Interrupted):
            stop.redelivering = True
            signal.setitimer(signal.ITIMER_REAL, REDELIVER_S)
            return
        previous_hook(info)

    previous = {signum: signal.signal(signum, on_signal) for signum in STOP_SIGNALS}
    previous[signal.SIGALRM] = signal.signal(signal.SIGALRM, on_alarm)
    sys.unraisablehook = on_unraisable
    _active.append(stop)
    try:
        try:
            yield
        except Exception as exc:
            if stop.signum is None:
                raise
            # Library code not safe against an exception from anywhere can put an
            # error of its own in the stop's place (SQLAlchemy's commit, cut short,
            # fails its ``finally: assert not self.is_active``): still the stop.
            _raise_now(stop, exc)
        if stop.signum is not None:  # it never surfaced: the block ran to its end
            _raise_now(stop)
    finally:
        _active.remove(stop)
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.unraisablehook = previous_hook
        for signum, old in previous.items():
            signal.signal(signum, old)
