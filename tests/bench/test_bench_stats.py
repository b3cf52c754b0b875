"""The benches' statistics on synthetic rounds: verdicts only where the interval allows."""

from __future__ import annotations

import statistics

import pytest

from bench import records, stats
from bench.stats import INCONCLUSIVE, MET, NOT_MET, Sample


def rounds_of(pairs: list[tuple[float, float]]) -> list[dict[str, Sample]]:
    """Rounds in which ``a`` and ``b`` ran at the given rates (1 s of work each)."""
    return [{"a": Sample(round(a), 1.0), "b": Sample(round(b), 1.0)} for a, b in pairs]


def test_interval_straddling_the_target_gives_inconclusive() -> None:
    # Per-round ratios 0.20, 0.24, 0.26, 0.30, 0.22: the median interval spans 0.25.
    rounds = rounds_of([(200, 1000), (240, 1000), (260, 1000), (300, 1000), (220, 1000)])
    s = stats.ratio_summary("a_vs_b", rounds, "a", "b", target=0.25)
    lo, hi = s.interval
    assert lo < 0.25 <= hi
    assert s.verdict == INCONCLUSIVE
    assert stats.consistent(s.to_dict())


def test_clear_intervals_give_met_and_not_met() -> None:
    above = rounds_of([(300, 1000), (310, 1000), (320, 1000), (305, 1000), (315, 1000)])
    below = rounds_of([(100, 1000), (110, 1000), (120, 1000), (105, 1000), (115, 1000)])
    met = stats.ratio_summary("r", above, "a", "b", target=0.25)
    not_met = stats.ratio_summary("r", below, "a", "b", target=0.25)
    assert met.interval[0] >= 0.25 and met.verdict == MET
    assert not_met.interval[1] < 0.25 and not_met.verdict == NOT_MET
    assert stats.consistent(met.to_dict()) and stats.consistent(not_met.to_dict())


def test_no_target_no_verdict_and_too_few_rounds_inconclusive() -> None:
    rounds = rounds_of([(300, 1000), (310, 1000), (320, 1000)])
    assert stats.ratio_summary("r", rounds, "a", "b").verdict is None
    # Two rounds far above the target: no spread is known, so no verdict.
    two = stats.ratio_summary("r", rounds[:2], "a", "b", target=0.01)
    assert two.interval[0] > 0.01 and two.verdict == INCONCLUSIVE


def test_verdict_boundaries() -> None:
    assert stats.verdict((0.25, 0.3), 0.25, 5) == MET  # at the target counts as met
    assert stats.verdict((0.2, 0.2499), 0.25, 5) == NOT_MET
    assert stats.verdict((0.2, 0.25), 0.25, 5) == INCONCLUSIVE


def test_ratios_are_per_round_not_ratios_of_medians() -> None:
    # The load changes from round to round (both sides slow down alike), and in four
    # rounds of five a is 2x b; the medians of the two columns come from different
    # rounds, and dividing them says 3x.
    rates = [(2000, 1000), (200, 100), (1000, 500), (400, 200), (900, 300)]
    rounds = [{"a": Sample(a, 1.0), "b": Sample(b, 1.0)} for a, b in rates]
    s = stats.ratio_summary("a_vs_b", rounds, "a", "b", target=1.5)
    assert s.per_round == [2.0, 2.0, 2.0, 2.0, 3.0]
    assert s.median == 2.0 and s.verdict == MET
    ratio_of_medians = statistics.median(r["a"].rate for r in rounds) / statistics.median(
        r["b"].rate for r in rounds
    )
    assert ratio_of_medians == 3.0  # what dividing medians would have reported


def test_median_of_ratios_differs_from_ratio_of_medians() -> None:
    # Rates a: 100, 300, 200; b: 100, 100, 400 -> per-round ratios 1, 3, 0.5 (median 1),
    # while median(a) / median(b) = 200 / 100 = 2.
    rounds = [
        {"a": Sample(100, 1.0), "b": Sample(100, 1.0)},
        {"a": Sample(300, 1.0), "b": Sample(100, 1.0)},
        {"a": Sample(200, 1.0), "b": Sample(400, 1.0)},
    ]
    s = stats.ratio_summary("a_vs_b", rounds, "a", "b")
    assert s.per_round == [1.0, 3.0, 0.5]
    assert s.median == 1.0
    ratio_of_medians = statistics.median([100, 300, 200]) / statistics.median([100, 100, 400])
    assert ratio_of_medians == 2.0


def test_bootstrap_is_reproducible_and_seeded() -> None:
    values = [0.31, 0.27, 0.35, 0.29, 0.4, 0.22, 0.33]
    first = stats.bootstrap_median_interval(values, seed=7)
    assert first == stats.bootstrap_median_interval(values, seed=7)
    # The seed is used: with few resamples the interval's ends move with it.
    few = {stats.bootstrap_median_interval(values, resamples=20, seed=s) for s in range(20)}
    assert len(few) > 1
    assert stats.bootstrap_median_interval(values, resamples=20, seed=3) == (
        stats.bootstrap_median_interval(values, resamples=20, seed=3)
    )
    lo, hi = first
    assert min(values) <= lo < statistics.median(values) < hi <= max(values)


def test_accumulate_repeats_a_step_until_enough_timed_work() -> None:
    calls = []

    def step() -> tuple[int, float]:
        calls.append(1)
        return 10, 0.3  # untimed set-up is the step's own business

    sample = stats.accumulate(step, min_seconds=1.0)
    assert (sample.items, sample.steps, len(calls)) == (40, 4, 4)
    assert sample.seconds == pytest.approx(1.2)
    once = stats.accumulate(step, min_seconds=0.0)
    assert (once.items, once.steps) == (10, 1)


def test_interleave_alternates_the_order() -> None:
    ran: list[str] = []

    def measure(name: str):  # type: ignore[no-untyped-def]
        def run() -> Sample:
            ran.append(name)
            return Sample(1, 1.0)

        return run

    rounds, orders = stats.interleave({"a": measure("a"), "b": measure("b")}, rounds=3)
    assert ran == ["a", "b", "b", "a", "a", "b"]
    assert orders == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert [sorted(r) for r in rounds] == [["a", "b"]] * 3


def test_consistent_catches_a_verdict_its_interval_does_not_give() -> None:
    rounds = rounds_of([(200, 1000), (240, 1000), (260, 1000), (300, 1000), (220, 1000)])
    recorded = stats.ratio_summary("r", rounds, "a", "b", target=0.25).to_dict()
    assert stats.consistent(recorded)
    assert not stats.consistent({**recorded, "verdict": MET})
    assert not stats.consistent({**recorded, "verdict": None})


def test_record_carries_environment_rounds_and_summaries(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rounds = rounds_of([(300, 1000), (310, 1000), (320, 1000)])
    env = records.environment("7.0.15", records.load_average())
    record = records.build(
        "demo",
        env,
        parameters={"x": 1},
        rounds=rounds,
        orders=[["a", "b"], ["b", "a"], ["a", "b"]],
        ratios=[stats.ratio_summary("a_vs_b", rounds, "a", "b", target=0.25)],
        rates=[stats.rate_summary("a", rounds)],
    )
    path = records.write(record, tmp_path / "demo.json")
    back = records.read(path)
    assert back["rounds"][2] == {
        "a": {"items": 320, "seconds": 1.0, "steps": 1},
        "b": {"items": 1000, "seconds": 1.0, "steps": 1},
    }
    assert back["ratios"]["a_vs_b"]["verdict"] == MET
    assert back["rates"]["a"]["per_round"] == [300.0, 310.0, 320.0]
    e = back["environment"]
    assert len(e["commit"]) == 40 and isinstance(e["dirty"], bool)
    assert len(e["load_before"]) == len(e["load_after"]) == 3
    assert e["redis_server"] == "7.0.15" and e["redis_py"] and e["python"]
    assert records.read_all(tmp_path) == {"demo": back}


def test_a_ceiling_is_met_only_when_the_whole_interval_is_at_or_below_it() -> None:
    assert stats.verdict((20.0, 32.0), 32.0, 5, at_most=True) == MET  # at the ceiling: met
    assert stats.verdict((32.01, 40.0), 32.0, 5, at_most=True) == NOT_MET
    assert stats.verdict((30.0, 33.0), 32.0, 5, at_most=True) == INCONCLUSIVE
    assert stats.verdict((1.0, 2.0), 32.0, 2, at_most=True) == INCONCLUSIVE  # too few rounds
    low = stats.summarise(
        "kib", [29.0, 30.0, 31.0, 30.5, 29.5], unit="KiB", target=32.0, at_most=True
    )
    high = stats.summarise("kib", [29.0, 30.0, 31.0, 30.5, 29.5], unit="KiB", target=32.0)
    assert low.verdict == MET and high.verdict == NOT_MET  # the same values, floor vs ceiling
    assert low.to_dict()["at_most"] is True and "at_most" not in high.to_dict()
    assert stats.consistent(low.to_dict()) and stats.consistent(high.to_dict())
    forged = {**low.to_dict(), "at_most": False}  # a ceiling read as a floor
    assert not stats.consistent(forged)
