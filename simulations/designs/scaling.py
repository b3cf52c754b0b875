"""How many Redis connections each design holds as phones grow: the note's central claim.

The claims table (:mod:`simulations.designs.claims`) measures one number of
phones. Here the number of phones varies: for each seed and phone count, each
design runs a short :class:`~simulations.designs.schedule.Schedule` without
faults (every phone connects before production starts, so the peak is reached
without them; faults would only add reconnects) against the same Redis, and the
harness records the peak of the connections serving phones (roles ``client``,
``live``, ``pool``: :data:`~simulations.designs.base.CLIENT_ROLES`) and of all
the design's connections.

:func:`connection_slopes` then fits, per design and seed, how many connections
each additional phone costs (least squares over the phone counts): about 1 for a
design that gives every phone its own connection, about 0 for one that shares a
bounded set among all the phones of a process. Over seeds, those slopes are the
samples of :func:`~simulations.analysis.intervals.mean_ci`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from simulations.designs.base import Design
from simulations.designs.harness import default_designs, run_all
from simulations.designs.schedule import Schedule

SCALING_COLUMNS = ["design", "phones", "seed", "client_connections", "redis_connections",
                   "client_connection_bound", "lost"]  # fmt: skip


def scaling_schedule(
    seed: int, phones: int, *, rate: float = 20.0, duration_s: float = 1.0
) -> Schedule:
    """A short schedule without faults for ``phones`` phones."""
    return Schedule(
        seed=seed, n_clients=phones, rate=rate, duration_s=duration_s,
        downtime_s=0.0, n_disconnects=0, settle_s=0.2,
    )  # fmt: skip


def connection_scaling(
    phones: Sequence[int],
    seeds: Sequence[int],
    redis_url: str,
    *,
    designs: Callable[[], Sequence[Design]] = default_designs,
    rate: float = 20.0,
    duration_s: float = 1.0,
) -> pd.DataFrame:
    """One row per design, phone count and seed (:data:`SCALING_COLUMNS`): peak
    connections serving phones, peak connections of the design, the design's
    promised bound for the former, and deliveries lost (0 without faults)."""
    if not phones or not seeds:
        raise ValueError("connection_scaling needs at least one phone count and one seed")
    rows = []
    for seed in seeds:
        for n in phones:
            schedule = scaling_schedule(seed, n, rate=rate, duration_s=duration_s)
            for result in run_all(schedule, redis_url, designs()):
                m = result.metrics
                rows.append(
                    {"design": result.design, "phones": n, "seed": seed,
                     "client_connections": m["client_connections_peak"],
                     "redis_connections": m["redis_connections_peak"],
                     "client_connection_bound": m["client_connection_bound"], "lost": m["lost"]}
                )  # fmt: skip
    return pd.DataFrame(rows, columns=SCALING_COLUMNS)


def connection_slopes(scaling: pd.DataFrame, measure: str = "client_connections") -> pd.DataFrame:
    """Per design and seed, the least-squares slope of ``measure`` against the
    number of phones: connections per additional phone. Columns ``design, seed,
    slope``; a design measured at fewer than two phone counts has no slope."""
    rows = []
    for (design, seed), runs in scaling.groupby(["design", "seed"], sort=False):
        if runs["phones"].nunique() < 2:
            raise ValueError(f"{design}, seed {seed}: a slope needs two phone counts or more")
        slope = np.polyfit(runs["phones"].astype(float), runs[measure].astype(float), 1)[0]
        # Least squares leaves ~1e-17 on a flat line; + 0.0 turns -0.0 into 0.0.
        rows.append({"design": design, "seed": seed, "slope": round(float(slope), 9) + 0.0})
    return pd.DataFrame(rows, columns=["design", "seed", "slope"])


__all__ = ["SCALING_COLUMNS", "connection_scaling", "connection_slopes", "scaling_schedule"]
