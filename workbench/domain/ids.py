"""Identifiers: unique, roughly ordered, and reproducible from a seed in simulations."""

from __future__ import annotations

import itertools
import random
import secrets


class IdFactory:
    """Makes ids like ``evt_<node><counter><random>`` (32 hex digits after the prefix).

    Ids from one factory sort in creation order (a counter after a per-factory
    node), so inserts into B-tree indexes (inbox, outbox) append instead of
    scattering; the random tail keeps two factories with the same node apart.
    With a ``seed`` the whole sequence is the same on every run, which keeps
    simulation tables identical for the same scenario and seed.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed) if seed is not None else None
        self._node = self._bits(32)
        self._counter = itertools.count(1)

    def _bits(self, n: int) -> int:
        return self._rng.getrandbits(n) if self._rng is not None else secrets.randbits(n)

    def new(self, prefix: str) -> str:
        return f"{prefix}_{self._node:08x}{next(self._counter):012x}{self._bits(48):012x}"
