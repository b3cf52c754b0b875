"""StopRequest: a stop that signal handlers may raise while the main thread waits on it."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

import pytest

from tests.support import ROOT
from workbench.ops.shutdown import StopRequest


def test_wait_times_out_unset_and_returns_at_once_when_set() -> None:
    stop = StopRequest()
    assert stop.wait(0.01) is False
    assert stop.wait(0) is False
    stop.set()
    assert stop.is_set()
    assert stop.wait(3600) is True


def test_set_from_another_thread_wakes_a_waiter() -> None:
    stop = StopRequest()
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(stop.wait(60)))
    waiter.start()
    stop.set()
    waiter.join(timeout=30)
    assert not waiter.is_alive() and results == [True]


def test_set_before_the_first_wait_needs_no_pipe() -> None:
    stop = StopRequest()
    stop.set()
    assert stop._pipe is None
    assert stop.wait(3600) is True


# The main thread spins on wait(0), so it holds whatever a wait holds most of the time.
# With threading.Event in place of StopRequest this hangs in about two runs of three
# (Event.set in the handler waits for the lock its own thread holds).
_SPIN_UNTIL_SIGTERM = """
from workbench.ops.shutdown import StopRequest
stop = StopRequest()
stop.on_signals()
print("ready", flush=True)
while not stop.wait(0):
    pass
print("stopped", flush=True)
"""


@pytest.mark.parametrize("attempt", range(8))
def test_sigterm_stops_a_loop_spinning_on_wait(attempt: int) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _SPIN_UNTIL_SIGTERM], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0
    assert output == "stopped\n"
