"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def signal_on_parent_death(signum: int, *then: Callable[[], None]) -> Callable[[], None]:
    """A ``preexec_fn``: the kernel sends the child ``signum`` when its parent dies.

    libc is loaded here, in the parent: the function runs between fork and exec,
    where loading a library could deadlock on a lock another thread of the
    parent held at the fork. ``then`` run after it, also in the child.

    A parent that died between the fork and the ``prctl`` sent nothing: the
    child sees it has been re-parented and sends itself ``signum`` instead.
    The signal comes when the parent *thread* that forked exits, so spawn
    long-lived children from a thread that lives as long as the process.
    """
    libc = _libc()
    parent = os.getpid()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum)
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)
        for step in then:
            step()

    return in_child
