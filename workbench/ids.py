"""Identifiers: random by default, reproducible from a seed in simulations."""

from __future__ import annotations

import random
import uuid


class IdFactory:
    """Makes ids like ``evt_3f2a...``.

    With a ``seed`` the sequence of ids is the same on every run, which keeps
    simulation tables identical for the same scenario and seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed) if seed is not None else None

    def new(self, prefix: str) -> str:
        if self._rng is None:
            return f"{prefix}_{uuid.uuid4().hex}"
        return f"{prefix}_{self._rng.getrandbits(128):032x}"
