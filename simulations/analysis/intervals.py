"""Confidence intervals over replications: what a figure over seeds may claim.

A simulation run is one sample. Over several seeds, a measure's mean comes with
a Student-t interval, :func:`mean_ci`; a claim is asserted only when the whole
interval is on its side of the target (:func:`Interval.above`,
:func:`Interval.below`). :func:`summarise_over` reduces a table of runs (one row
per run, the grid's columns plus measures) to one row per grid point: for each
measure ``m`` the columns ``m_mean``, ``m_low``, ``m_high`` and ``n``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
from scipy import stats


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval, from ``n`` samples."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def above(self, target: float) -> bool:
        """The whole interval is above ``target``."""
        return self.low > target

    def below(self, target: float) -> bool:
        """The whole interval is below ``target``."""
        return self.high < target

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def mean_ci(values: Iterable[float], level: float = 0.95) -> Interval:
    """The mean of ``values`` (NaNs dropped) with its Student-t ``level`` interval.

    One sample has an unbounded interval (``-inf``, ``inf``); identical samples a
    zero-width one. No samples is a :class:`ValueError`.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), not {level}")
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        raise ValueError("no samples to average")
    n = len(xs)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, 1, level)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, level)


def summarise_over(
    runs: pd.DataFrame, by: Sequence[str], measures: Sequence[str], level: float = 0.95
) -> pd.DataFrame:
    """One row per value of ``by`` (the grid point): ``n`` and, per measure,
    ``<m>_mean``, ``<m>_low``, ``<m>_high`` over the rows (the seeds)."""
    rows = []
    groups = runs.groupby(list(by), sort=True, dropna=False) if by else [((), runs)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, object] = dict(zip(by, key, strict=True))
        row["n"] = len(group)
        for measure in measures:
            column = group[measure].dropna()
            if column.empty:
                row |= {f"{measure}_mean": math.nan, f"{measure}_low": math.nan,
                        f"{measure}_high": math.nan}  # fmt: skip
                continue
            interval = mean_ci(column, level)
            row |= {f"{measure}_mean": interval.mean, f"{measure}_low": interval.low,
                    f"{measure}_high": interval.high}  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["Interval", "mean_ci", "summarise_over"]
