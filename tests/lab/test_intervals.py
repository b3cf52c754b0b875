"""Intervals over seeds: the Student-t interval, against known values."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from simulations.analysis.intervals import mean_ci, summarise_over


def test_mean_ci_matches_the_student_t_interval() -> None:
    interval = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sd sqrt(2.5), t(0.975, 4) = 2.776445
    half = 2.776445105 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == pytest.approx(3.0)
    assert interval.low == pytest.approx(3.0 - half, rel=1e-6)
    assert interval.high == pytest.approx(3.0 + half, rel=1e-6)
    assert interval.n == 5
    assert interval.above(1.0) and not interval.above(2.0)
    assert interval.below(5.0) and not interval.below(4.0)


def test_a_higher_level_is_wider_and_nans_are_dropped() -> None:
    narrow = mean_ci([1.0, 2.0, 4.0, math.nan], level=0.8)
    wide = mean_ci([1.0, 2.0, 4.0], level=0.99)
    assert narrow.n == 3
    assert wide.high - wide.low > narrow.high - narrow.low > 0


def test_edge_cases() -> None:
    one = mean_ci([7.0])
    assert (one.mean, one.low, one.high) == (7.0, -math.inf, math.inf)
    same = mean_ci([2.0, 2.0, 2.0])
    assert (same.low, same.high) == (2.0, 2.0)
    with pytest.raises(ValueError, match="no samples"):
        mean_ci([math.nan])
    with pytest.raises(ValueError, match="level"):
        mean_ci([1.0, 2.0], level=1.0)


def test_summarise_over_gives_one_row_per_grid_point() -> None:
    runs = pd.DataFrame({
        "rate": [1.0, 1.0, 1.0, 2.0, 2.0, 2.0],
        "seed": [1, 2, 3, 1, 2, 3],
        "lost": [0, 0, 0, 1, 2, 3],
    })  # fmt: skip
    summary = summarise_over(runs, ["rate"], ["lost"])
    assert list(summary["rate"]) == [1.0, 2.0]
    assert list(summary["n"]) == [3, 3]
    assert list(summary["lost_mean"]) == [0.0, 2.0]
    assert summary.loc[0, "lost_low"] == summary.loc[0, "lost_high"] == 0.0
    assert summary.loc[1, "lost_low"] < 2.0 < summary.loc[1, "lost_high"]
