"""A stop request that a signal handler may raise safely.

The long-running loops (`workbench worker`, `relay`, `timers`) stop on SIGTERM
by finishing what they hold and returning. A ``threading.Event`` cannot carry
that request: ``Event.set()`` takes the event's lock, and a signal handler runs
in the main thread between two bytecodes, possibly while that same thread holds
the lock inside ``Event.wait()`` (it re-takes it when a timed wait ends). The
handler then waits for itself forever. CI saw it once as a `workbench timers`
that ignored SIGTERM.

:class:`StopRequest` takes no lock in :meth:`StopRequest.set`: it stores a flag
and writes one byte to a non-blocking pipe; :meth:`StopRequest.wait` sleeps in
``select`` on the pipe's read end. Both are safe from any thread and from a
signal handler. The pipe is made on the first :meth:`wait`, so objects that are
never waited on (the simulator's workers) hold no file descriptors.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import weakref

__all__ = ["StopRequest"]


class StopRequest:
    """Set once, seen by every waiter; :meth:`set` is async-signal-safe."""

    def __init__(self) -> None:
        self._requested = False
        self._pipe: tuple[int, int] | None = None
        self._pipe_made = threading.Lock()  # never taken by set()

    def set(self) -> None:
        """Request the stop; wakes every :meth:`wait`. Safe in a signal handler."""
        self._requested = True
        pipe = self._pipe
        if pipe is not None:
            # A full pipe is already readable; a closed one has no waiter left.
            with contextlib.suppress(OSError):
                os.write(pipe[1], b"x")

    def is_set(self) -> bool:
        return self._requested

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until :meth:`set` or ``timeout`` seconds; return whether it is set."""
        if self._requested:
            return True
        read_end = self._read_end()
        if self._requested:  # set() before the pipe existed wrote nothing
            return True
        if timeout is None or timeout > 0:
            select.select([read_end], [], [], timeout)
        return self._requested

    def on_signals(self, *signums: signal.Signals) -> None:
        """Install handlers so that each of ``signums`` (default SIGTERM, SIGINT) sets this."""
        for signum in signums or (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.set())

    def _read_end(self) -> int:
        if self._pipe is None:
            with self._pipe_made:
                if self._pipe is None:
                    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
                    weakref.finalize(self, _close, read_end, write_end)
                    self._pipe = (read_end, write_end)
        return self._pipe[0]


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)
