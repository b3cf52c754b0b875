"""CPU affinity for a process and the redis-server it talks to.

A virtual-time simulation is a strict ping-pong with its Redis: the simulator
sends a command and waits, Redis answers and waits. When the two sit on
different CPUs every round trip wakes a sleeping CPU, and on a VM that wake-up
(an inter-processor interrupt) can cost more than the command: on the
development VM a redis-py call took about 22 us on one CPU and 75-90 us across
two. Kept on one CPU, the hand-off is a plain context switch.
``bench/simulate.py`` measures both side by side. Parallel runs (a sweep) each
take their own CPU.

Linux only; elsewhere, or with a single allowed CPU, pinning is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

Choice = int | str | None  # a CPU number, "auto", or None/"none" (leave it to the OS)


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (empty where the OS cannot say)."""
    if not hasattr(os, "sched_getaffinity"):
        return set()
    return set(os.sched_getaffinity(0))


def current_cpu() -> int | None:
    """The CPU this process ran on last (``/proc/self/stat`` field 39), if known."""
    try:
        with open("/proc/self/stat") as f:
            # The command name (field 2) may hold spaces: count from after it.
            return int(f.read().rsplit(")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def resolve(choice: Choice) -> int | None:
    """Turn ``--cpu`` into a CPU number or None (no pinning).

    ``"auto"``: the CPU the scheduler has this process on now (so parallel runs
    spread as the OS spread them), if more than one CPU is allowed. A number
    must be one of the allowed CPUs; anything else is a ``ValueError`` naming them.
    """
    cpus = allowed_cpus()
    if choice is None or choice == "none":
        return None
    if choice == "auto":
        cpu = current_cpu()
        return cpu if len(cpus) > 1 and cpu in cpus else None
    try:
        cpu = int(choice)
    except (TypeError, ValueError):
        raise ValueError(f"cpu must be auto, none or a CPU number, not {choice!r}") from None
    if cpus and cpu not in cpus:
        allowed = ", ".join(map(str, sorted(cpus)))
        raise ValueError(f"CPU {cpu} is not one this process may use (allowed: {allowed})")
    return cpu


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """Run the block on ``cpu`` only (this thread), then restore the old set."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
