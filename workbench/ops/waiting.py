"""Waiting on conditions with a deadline, instead of sleeping and hoping."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(TimeoutError):
    """A condition did not become true before its deadline."""


def wait_until(
    condition: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll ``condition`` until it returns a truthy value; return that value.

    Raises :class:`WaitTimeout` naming ``what`` when ``timeout`` seconds pass.
    The interval grows to at most 0.2 s so a long wait does not spin.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)
