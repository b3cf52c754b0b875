"""The restart decisions of ``serve``'s supervisor, with plain numbers for time."""

from __future__ import annotations

import pytest

from workbench.ops.supervision import GiveUp, Restart, RestartPolicy, Supervisor, describe_exit
from workbench.streams.consumer import ConsumerSettings

POLICY = RestartPolicy(
    initial_backoff_s=0.5, max_backoff_s=4.0, stable_after_s=30, max_restarts=5, window_s=60
)


def crash(sup: Supervisor, name: str, now: float) -> Restart | GiveUp:
    return sup.exited(name, now, -9)


def test_backoff_doubles_per_crash_in_a_row_up_to_the_cap() -> None:
    sup = Supervisor(["relay"], RestartPolicy(initial_backoff_s=0.5, max_backoff_s=4.0,
                                               max_restarts=100, window_s=60))  # fmt: skip
    now = 0.0
    sup.started("relay", now)
    delays = []
    for _ in range(6):
        now += 1.0
        decision = crash(sup, "relay", now)
        assert isinstance(decision, Restart)
        delays.append(decision.delay_s)
        assert decision.at == now + decision.delay_s
        now = decision.at
        sup.started("relay", now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert sup.children["relay"].restarts == 6


def test_a_stable_run_resets_the_backoff() -> None:
    sup = Supervisor(["ledger"], POLICY)
    sup.started("ledger", 0.0)
    assert crash(sup, "ledger", 1.0).delay_s == 0.5  # type: ignore[union-attr]
    sup.started("ledger", 1.5)
    assert crash(sup, "ledger", 2.0).delay_s == 1.0  # type: ignore[union-attr]
    sup.started("ledger", 3.0)
    # Ran 40 s (>= stable_after_s): this crash starts a new row.
    assert crash(sup, "ledger", 43.0).delay_s == 0.5  # type: ignore[union-attr]


def test_restart_is_due_only_after_the_backoff() -> None:
    sup = Supervisor(["relay", "timers"], POLICY)
    sup.started("relay", 0.0)
    sup.started("timers", 0.0)
    decision = crash(sup, "relay", 10.0)
    assert isinstance(decision, Restart)
    assert sup.due(10.4) == []
    assert sup.next_due() == 10.5
    assert sup.due(10.5) == ["relay"]
    sup.started("relay", 10.5, pid=123)
    assert sup.due(20.0) == []
    assert sup.next_due() is None
    assert sup.snapshot()["relay"] == {
        "state": "running", "pid": 123, "restarts": 1, "last_exit": -9,
        "started_at": 10.5, "restart_at": None,
    }  # fmt: skip


def test_crash_loop_gives_up_after_max_restarts_within_the_window() -> None:
    sup = Supervisor(["redis"], POLICY)
    now = 0.0
    sup.started("redis", now)
    for _ in range(5):
        now += 0.1
        decision = crash(sup, "redis", now)
        assert isinstance(decision, Restart)
        now = decision.at
        sup.started("redis", now)
    decision = crash(sup, "redis", now + 0.1)
    assert isinstance(decision, GiveUp)
    assert "redis" in decision.reason and "5 restarts in 60 s" in decision.reason
    assert sup.children["redis"].state == "failed"
    assert sup.due(1e9) == []
    assert sup.children["redis"].restarts == 5


def test_crashes_spread_wider_than_the_window_never_give_up() -> None:
    sup = Supervisor(["push"], POLICY)
    now = 0.0
    sup.started("push", now)
    for _ in range(20):
        now += 20.0  # 3 crashes per 60 s window, under the limit of 5
        decision = crash(sup, "push", now)
        assert isinstance(decision, Restart)
        now = decision.at
        sup.started("push", now)
    assert sup.children["push"].restarts == 20


def test_stopping_cancels_pending_restarts() -> None:
    sup = Supervisor(["relay"], POLICY)
    sup.started("relay", 0.0)
    crash(sup, "relay", 1.0)
    sup.stopping()
    assert sup.due(100.0) == []
    assert sup.children["relay"].state == "stopped"


def test_bad_policy_and_duplicate_names_are_refused() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(initial_backoff_s=0)
    with pytest.raises(ValueError):
        RestartPolicy(initial_backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError):
        Supervisor(["relay", "relay"])


def test_exit_descriptions() -> None:
    assert describe_exit(-9) == "signal 9"
    assert describe_exit(1) == "code 1"
    assert describe_exit(None) == "did not start"


def test_serves_defaults_outlast_two_poisons_that_kill_their_worker() -> None:
    """Two entries that kill the worker, in one backlog, take one death in their
    batch, then ``max_crashes`` each handled alone (see the consumer's "Poison that
    kills"); each restarted process dies at once. serve's default policy restarts it
    every time, so the next start dead-letters the second; a crash-loop limit under
    those deaths would stop serve first."""
    deaths = 1 + 2 * ConsumerSettings().max_crashes
    for policy, survives in [
        (RestartPolicy(), True),
        (RestartPolicy(max_restarts=deaths - 1), False),
    ]:
        sup = Supervisor(["ledger"], policy)
        now = 0.0
        sup.started("ledger", now)
        decisions = []
        for _ in range(deaths):
            now += 0.2  # start-up, the re-read, the poison: dead within a fraction of a second
            decisions.append(crash(sup, "ledger", now))
            if isinstance(decisions[-1], GiveUp):
                break
            now = decisions[-1].at
            sup.started("ledger", now)
        assert all(isinstance(d, Restart) for d in decisions) is survives, decisions
