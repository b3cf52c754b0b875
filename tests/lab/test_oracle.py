"""The model against theory: an M/M/1 queue through the real runtime.

Each arrival opens an escrow (one event); one consumer group serves one entry
at a time with exponential service. Time in system W = handled - committed.
Over seeded replications the mean W must match 1/(mu - lambda) within a 95%
confidence interval, and Little's law L = lambda W must hold with L measured
independently of W: the time-average of the pending + lag counts that the
simulator's sampler read from Redis (``XINFO GROUPS``/``XPENDING``), against
lambda W from the event log.
"""

from __future__ import annotations

import numpy as np
import pytest

from simulations.analysis.timings import littles_law
from simulations.drivers.virtual import simulate
from simulations.scenario import load

SEEDS = (1, 2, 3, 4, 5, 6)
T_975_DF5 = 2.571  # Student's t, 97.5% quantile, 5 degrees of freedom


@pytest.mark.slow
def test_single_consumer_queue_matches_mm1(redis_server) -> None:  # type: ignore[no-untyped-def]
    # Redis sampled every virtual second: the L side of Little's law.
    scenario = load("mm1", ["run.sample_every_s=1"])
    lam = scenario.market.arrival_rate
    mu = scenario.consumers.service_rate
    horizon = scenario.run.duration_s
    means, littles = [], []
    for seed in SEEDS:
        tables = simulate(scenario, seed, redis_url=redis_server.url, prefix=f"mm1-{seed}")
        handled = tables.handled[tables.handled.group == "disputes"]
        joined = handled.merge(tables.published[["event_id", "t_committed"]], on="event_id")
        assert len(joined) == len(tables.published) > 0.8 * lam * horizon
        # Steady state: skip the first tenth (warm-up), keep arrivals within the load phase.
        window = joined[(joined.t_committed > horizon / 10) & (joined.t_committed < horizon)]
        sojourn = window.t_first - window.t_committed
        assert (sojourn >= 0).all()
        means.append(sojourn.mean())
        law = littles_law(tables, "disputes")
        assert len(tables.samples[tables.samples.group == "disputes"]) > 0.9 * horizon
        littles.append((law["L"], law["lambda_W"]))
    mean = float(np.mean(means))
    half = T_975_DF5 * np.std(means, ddof=1) / np.sqrt(len(means))
    w_theory = 1 / (mu - lam)
    assert abs(mean - w_theory) <= half + 0.05 * w_theory, (means, w_theory, half)
    for l_measured, l_little in littles:  # Redis' counts against the event log, per path
        assert l_measured == pytest.approx(l_little, rel=0.05), littles
    l_theory = (lam / mu) / (1 - lam / mu)
    assert float(np.mean([lm for lm, _ in littles])) == pytest.approx(l_theory, rel=0.25)
