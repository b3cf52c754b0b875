"""What /healthz concludes from heartbeats and the supervisor's state (pure rules)."""

from __future__ import annotations

from workbench.http.health import BEATING, assess

NOW = 1_000.0


def _running(pid: int, restarts: int = 0, started_at: float = NOW - 60) -> dict[str, object]:
    return {"state": "running", "pid": pid, "restarts": restarts, "last_exit": None,
            "started_at": started_at}  # fmt: skip


def _all_beating() -> dict[str, dict[str, float]]:
    return {name: {f"{name}-{100 + i}": NOW - 0.5} for i, name in enumerate(BEATING)}


def _all_supervised() -> dict[str, dict[str, object]]:
    state = {name: _running(100 + i) for i, name in enumerate(BEATING)}
    return {"redis": _running(99), **state, "api-0": _running(98)}


def test_everything_beating_under_its_supervisor_is_up() -> None:
    down, report = assess(
        now=NOW, redis_ok=True, heartbeats=_all_beating(), supervised=_all_supervised()
    )
    assert down == []
    assert {name for name, entry in report.items() if entry["up"]} == {
        "redis", "api-0", *BEATING,
    }  # fmt: skip


def test_a_restarted_worker_is_down_until_it_beats_again() -> None:
    supervised = _all_supervised()
    # Restarted 0.2 s ago; the last beat (0.5 s ago) was its killed predecessor's.
    supervised["ledger"] = _running(555, restarts=1, started_at=NOW - 0.2)
    down, report = assess(now=NOW, redis_ok=True, heartbeats=_all_beating(), supervised=supervised)
    assert down == ["ledger"]
    assert report["ledger"]["detail"] == "starting: no heartbeat yet from pid 555"
    assert report["ledger"]["restarts"] == 1


def test_a_stale_heartbeat_or_a_child_in_backoff_is_down() -> None:
    heartbeats = _all_beating()
    heartbeats["relay"] = {"relay-100": NOW - 9.0}
    supervised = _all_supervised()
    supervised["push"] = {"state": "backoff", "pid": None, "restarts": 1, "last_exit": -9}
    supervised["api-0"] = {"state": "failed", "pid": None, "restarts": 5, "last_exit": 1}
    down, report = assess(now=NOW, redis_ok=True, heartbeats=heartbeats, supervised=supervised)
    assert sorted(down) == ["api-0", "push", "relay"]
    assert report["relay"]["detail"] == "no heartbeat for 9.0 s"
    assert report["push"]["detail"] == "exited (signal 9), restarting"
    assert "serve gave up" in report["api-0"]["detail"]


def test_redis_down_is_named_and_heartbeats_are_unknown() -> None:
    supervised = _all_supervised()
    supervised["redis"] = {"state": "backoff", "pid": None, "restarts": 1, "last_exit": -9}
    down, report = assess(now=NOW, redis_ok=True, heartbeats=None, supervised=supervised)
    assert down == ["redis"]  # even if a PING got through to the dying server
    assert report["ledger"]["up"] is None
    down, _ = assess(now=NOW, redis_ok=False, heartbeats=None, supervised=None)
    assert down == ["redis"]


def test_api_only_reports_heartbeats_without_failing_on_them() -> None:
    heartbeats = {name: {} for name in BEATING}
    heartbeats["relay"] = {"relay-1": NOW - 60.0}
    heartbeats["ledger"] = {"ledger-1": NOW - 60.0, "ledger-2": NOW - 1.0}
    down, report = assess(now=NOW, redis_ok=True, heartbeats=heartbeats, supervised=None)
    assert down == []
    assert report["relay"]["up"] is False
    assert report["relay"]["detail"] == "no heartbeat for 60.0 s (not supervised here)"
    assert report["ledger"]["up"] is True  # the freshest of its consumers
    assert "timers" not in report  # never seen: not reported
