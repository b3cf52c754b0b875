"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import ctypes
import functools
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
    """
    libc = _libc()

    def in_child() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum)
        for step in then:
            step()

    return in_child
