"""Statistics for the benches: interleaved rounds, per-round ratios, verdicts that hold.

A bench compares a thing measured (the runtime) with an anchor (the best plain
code for the same job) on a machine it shares with others. What this module
guarantees:

* **Interleaved rounds.** :func:`interleave` runs every measurement once per
  round, one after the other, and reverses the order every other round
  (A B, B A, A B, ...), so a neighbour's burst or a slow drift slows both sides
  of a comparison alike instead of one of them.
* **Enough work per measurement.** :func:`accumulate` repeats a step (whose
  own set-up is not timed) until its timed work adds up to ``min_seconds``:
  one measurement is never a 0.1 s window at the mercy of one scheduler tick.
* **Ratios per round.** A ratio is computed inside each round (``rate A /
  rate B`` of that round) and summarised by the median of those per-round
  ratios: never by dividing the median of A by the median of B, which mixes
  rounds taken under different loads.
* **Spread stated.** Every summary carries min–max of the per-round values and
  a seeded bootstrap confidence interval of their median (the same rounds and
  seed give the same interval, bit for bit).
* **Verdicts only when they hold.** Against a target, :func:`verdict` says
  ``MET`` only when the whole interval is at or above it, ``NOT MET`` only
  when the whole interval is below it, and ``INCONCLUSIVE`` otherwise (or with
  fewer than :data:`MIN_ROUNDS` rounds, when no spread is known). A verdict
  that a busier machine could flip is not given. A target is a floor unless
  ``at_most`` says it is a ceiling (memory per connection, a latency ratio):
  then ``MET`` needs the whole interval at or below it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MET, NOT_MET, INCONCLUSIVE = "MET", "NOT MET", "INCONCLUSIVE"
MIN_ROUNDS = 3  # below this a bootstrap interval says nothing about spread
CONFIDENCE = 0.95
RESAMPLES = 10_000
SEED = 12


@dataclass(frozen=True)
class Sample:
    """``items`` units of work done in ``seconds`` of timed work, in ``steps`` steps."""

    items: int
    seconds: float
    steps: int = 1

    @property
    def rate(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else math.inf

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "seconds": self.seconds, "steps": self.steps}


Step = Callable[[], tuple[int, float]]


def accumulate(step: Step, min_seconds: float, max_steps: int = 100_000) -> Sample:
    """Run ``step`` until its timed seconds add up to ``min_seconds``.

    ``step()`` does its own untimed set-up and returns (items, timed seconds).
    It runs at least once, whatever ``min_seconds`` is.
    """
    items, seconds, steps = 0, 0.0, 0
    while True:
        n, s = step()
        items, seconds, steps = items + n, seconds + s, steps + 1
        if seconds >= min_seconds or steps >= max_steps:
            return Sample(items, seconds, steps)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    """(what ``fn`` returned, its wall seconds on the monotonic performance clock)."""
    started = time.perf_counter()
    items = fn()
    return items, time.perf_counter() - started


Round = dict[str, Sample]


def interleave(
    measures: Mapping[str, Callable[[], Sample]],
    rounds: int,
    on_measured: Callable[[int, str, Sample], None] | None = None,
) -> tuple[list[Round], list[list[str]]]:
    """Run every measure once per round, the order reversed every other round.

    Return the rounds (name -> sample) and the order each round ran in.
    """
    if rounds < 1:
        raise ValueError("at least one round")
    names = list(measures)
    out: list[Round] = []
    orders: list[list[str]] = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        this: Round = {}
        for name in order:
            this[name] = measures[name]()
            if on_measured is not None:
                on_measured(r, name, this[name])
        out.append(this)
        orders.append(list(order))
    return out, orders


def per_round_ratios(rounds: Sequence[Mapping[str, Sample]], num: str, den: str) -> list[float]:
    """``rate(num) / rate(den)`` within each round, in round order."""
    return [r[num].rate / r[den].rate for r in rounds]


def per_round_rates(rounds: Sequence[Mapping[str, Sample]], name: str) -> list[float]:
    return [r[name].rate for r in rounds]


def bootstrap_median_interval(
    values: Sequence[float],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values``; reproducible by ``seed``."""
    if not values:
        raise ValueError("no values")
    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(data), size=(resamples, len(data)))
    medians = np.median(data[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(medians, [tail, 100 - tail])
    return float(lo), float(hi)


def verdict(
    interval: tuple[float, float], target: float | None, rounds: int, *, at_most: bool = False
) -> str | None:
    """``MET`` / ``NOT MET`` when the whole interval is on one side of ``target``.

    ``None`` without a target; ``INCONCLUSIVE`` when the interval straddles it
    or there are fewer than :data:`MIN_ROUNDS` rounds. ``target`` is a floor
    (at least), or with ``at_most`` a ceiling.
    """
    if target is None:
        return None
    lo, hi = interval
    if rounds < MIN_ROUNDS:
        return INCONCLUSIVE
    if at_most:
        if hi <= target:
            return MET
        if lo > target:
            return NOT_MET
        return INCONCLUSIVE
    if lo >= target:
        return MET
    if hi < target:
        return NOT_MET
    return INCONCLUSIVE


@dataclass
class Summary:
    """Per-round values of one figure, their median, spread, interval and verdict."""

    name: str
    what: str
    unit: str
    per_round: list[float]
    median: float
    min: float
    max: float
    interval: tuple[float, float]
    confidence: float
    target: float | None
    verdict: str | None
    numerator: str | None = None
    denominator: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    at_most: bool = False  # the target is a ceiling, not a floor

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["interval"] = list(self.interval)
        if not self.extra:
            out.pop("extra")
        if not self.at_most:
            out.pop("at_most")  # records of floors read as before
        return out


def summarise(
    name: str,
    values: Sequence[float],
    *,
    what: str = "",
    unit: str = "",
    target: float | None = None,
    seed: int = SEED,
    numerator: str | None = None,
    denominator: str | None = None,
    at_most: bool = False,
) -> Summary:
    """Median, min–max and bootstrap interval of per-round ``values``; the verdict
    against ``target``, a floor, or with ``at_most`` a ceiling."""
    values = [float(v) for v in values]
    interval = bootstrap_median_interval(values, seed=seed)
    return Summary(
        name=name,
        what=what,
        unit=unit,
        per_round=values,
        median=statistics.median(values),
        min=min(values),
        max=max(values),
        interval=interval,
        confidence=CONFIDENCE,
        target=target,
        verdict=verdict(interval, target, len(values), at_most=at_most),
        numerator=numerator,
        denominator=denominator,
        at_most=at_most,
    )


def ratio_summary(
    name: str,
    rounds: Sequence[Mapping[str, Sample]],
    numerator: str,
    denominator: str,
    *,
    what: str = "",
    target: float | None = None,
    seed: int = SEED,
) -> Summary:
    """The median of per-round ``rate(numerator) / rate(denominator)``, with its spread."""
    return summarise(
        name,
        per_round_ratios(rounds, numerator, denominator),
        what=what,
        unit="ratio",
        target=target,
        seed=seed,
        numerator=numerator,
        denominator=denominator,
    )


def rate_summary(
    name: str,
    rounds: Sequence[Mapping[str, Sample]],
    *,
    what: str = "",
    unit: str = "per second",
    target: float | None = None,
    seed: int = SEED,
) -> Summary:
    """The median of per-round rates of ``name``, with its spread."""
    return summarise(
        name, per_round_rates(rounds, name), what=what, unit=unit, target=target, seed=seed
    )


def consistent(summary: Mapping[str, Any]) -> bool:
    """Whether a recorded summary's verdict is the one its interval, target and rounds give."""
    lo, hi = summary["interval"]
    expected = verdict(
        (lo, hi),
        summary["target"],
        len(summary["per_round"]),
        at_most=summary.get("at_most", False),
    )
    return lo <= hi and summary["verdict"] == expected
