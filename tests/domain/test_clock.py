"""Clocks: the scaled clock every real-time process shares, configured from the environment."""

from __future__ import annotations

import time

import pytest

from workbench.domain.clock import ScaledClock, SystemClock, clock_env, clock_from_env


def test_scaled_clock_maps_wall_time_onto_the_timeline() -> None:
    origin = time.time() - 10.0  # the timeline began ten wall seconds ago
    clock = ScaledClock(origin, epoch=1_800_000_000.0, rate=2.0)
    assert 1_800_000_000.0 + 19.0 < clock.now() < 1_800_000_000.0 + 22.0


def test_clock_from_env_round_trips_and_defaults_to_the_wall_clock() -> None:
    env = clock_env(123.5, 1_800_000_000.0, 0.25)
    clock = clock_from_env(env)
    assert isinstance(clock, ScaledClock)
    assert (clock.origin, clock.epoch, clock.rate) == (123.5, 1_800_000_000.0, 0.25)
    assert isinstance(clock_from_env({}), SystemClock)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORKBENCH_CLOCK_RATE": "2"}, "all of"),
        ({**clock_env(1.0, 2.0, 3.0), "WORKBENCH_CLOCK_RATE": "fast"}, "must be numbers"),
        (clock_env(1.0, 2.0, 0.0), "rate must be positive"),
    ],
)
def test_a_bad_clock_environment_is_a_clear_error(env: dict[str, str], message: str) -> None:
    with pytest.raises((RuntimeError, ValueError), match=message):
        clock_from_env(env)
