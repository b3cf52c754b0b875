"""The runtime's clock in virtual time."""

from __future__ import annotations

import simpy


class SimClock:
    """``now()`` = the scenario's epoch + the SimPy environment's time.

    Handed to the runtime wherever it takes a :class:`workbench.domain.clock.Clock`,
    so expiry, heartbeats and claim decisions run on virtual time.
    """

    def __init__(self, env: simpy.Environment, epoch: float) -> None:
        self.env = env
        self.epoch = epoch

    def now(self) -> float:
        return self.epoch + float(self.env.now)
