"""``workbench.inspect`` and ``workbench inspect`` on Redis 7 and on the bundled 6.2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import workbench
from simulations.analysis import inspection_frames
from tests.streams.test_consumer import _event
from tests.support import ROOT
from workbench.domain.events import to_fields
from workbench.ops.redis_server import RedisServer
from workbench.streams.groups import ensure_groups
from workbench.streams.keys import StreamNames

NAMES = StreamNames()


def _scene(client) -> None:  # type: ignore[no-untyped-def]
    stream = NAMES.stream("escrow")
    ensure_groups(client, NAMES.streams(), "ledger")
    for n in range(1, 6):
        client.xadd(stream, to_fields(_event("esc-1", n)))
    client.xreadgroup("ledger", "c1", {stream: ">"}, count=2)
    client.xadd(
        NAMES.dead_letter("ledger"),
        {"source_stream": stream, "source_id": "1-1", "deliveries": "5", "reason": "boom"},
    )


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_inspect_reports_pending_lag_and_dead_letters(tmp_path, binary) -> None:
    with RedisServer(tmp_path, binary=binary) as server:
        client = server.client()
        _scene(client)
        snapshot = workbench.inspect(client)
        result = inspection_frames(snapshot)
        streams = result.streams.set_index("stream")
        assert streams.loc["escrow", "length"] == 5
        assert streams.loc["payment", "length"] == 0
        row = result.groups.set_index(["stream", "group"]).loc[("escrow", "ledger")]
        assert row["pending"] == 2
        assert row["consumers"] == 1
        assert row["lag"] == 3
        assert row["oldest_pending_idle_ms"] >= 0
        assert row["dead_letters"] == 1
        if server.version[0] >= 7:
            assert row["lag_source"] == "xinfo" and row["lag_xinfo"] == 3
        else:
            # 6.2 has no lag in XINFO: NULL, not 0, and the computed value beside it.
            assert row["lag_source"] == "computed"
            assert result.groups["lag_xinfo"].isna().all()
        assert list(result.dead_letters["reason"]) == ["boom"]
        as_json = snapshot.to_dict()
        assert json.dumps(as_json)  # serialisable
        if server.version[0] < 7:
            assert as_json["groups"][0]["lag_xinfo"] is None


def test_lag_null_after_deletion_is_kept_apart_from_zero(r) -> None:
    _scene(r)
    stream = NAMES.stream("escrow")
    first = r.xrange(stream, count=1)[0][0]
    last = r.xrevrange(stream, count=1)[0][0]
    r.xdel(stream, last)  # a deletion past the group's position: Redis 7 cannot tell the lag
    row = (
        inspection_frames(workbench.inspect(r))
        .groups.set_index(["stream", "group"])
        .loc[("escrow", "ledger")]
    )
    assert first
    if row["lag_xinfo"] is not None and not _isna(row["lag_xinfo"]):
        pytest.skip("this Redis still computes lag after the deletion")
    assert row["lag_source"] == "computed"
    assert row["lag"] == 2


def _isna(value) -> bool:  # type: ignore[no-untyped-def]
    import pandas as pd

    return bool(pd.isna(value))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_inspect_prints_tables_and_json(r, redis_url) -> None:
    _scene(r)
    env = dict(os.environ, REDIS_URL=redis_url)
    table = _cli("inspect", env=env)
    assert table.returncode == 0, table.stderr
    assert "consumer groups" in table.stdout and "boom" in table.stdout
    data = json.loads(_cli("inspect", "--json", env=env).stdout)
    ledger = [g for g in data["groups"] if g["stream"] == "escrow"][0]
    assert ledger["pending"] == 2 and ledger["dead_letters"] == 1


def test_cli_inspect_without_redis_says_what_to_do() -> None:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    result = _cli("inspect", env=env)
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr


def test_cli_inspect_with_dead_redis_fails_clearly() -> None:
    env = dict(os.environ, REDIS_URL="redis://127.0.0.1:1/0")
    result = _cli("inspect", env=env)
    assert result.returncode == 1
    assert "cannot inspect Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_worker_rejects_unknown_group() -> None:
    result = _cli("worker", "accounting", env=dict(os.environ, REDIS_URL="redis://127.0.0.1:1"))
    assert result.returncode == 2
    assert "ledger" in result.stderr  # lists the groups that exist


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["analytics"], "--model is required for the analytics group"),
        (["ledger", "--model", "data/models/x"], "--model is required for the analytics group"),
        (["ledger", "--group-name", "g2"], "are for the analytics group"),
        (["analytics", "--model", "tests"], "is not a model directory"),
    ],
)
def test_cli_worker_checks_the_analytics_options(tmp_path, args: list[str], says: str) -> None:  # type: ignore[no-untyped-def]
    env = dict(
        os.environ, REDIS_URL="redis://127.0.0.1:1", DATABASE_URL=f"sqlite:///{tmp_path}/s.db"
    )
    result = _cli("worker", *args, env=env)
    assert result.returncode == 2, result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s.db").exists()  # refused before touching the store


def test_ages_are_seconds_of_the_runtime_clock(r) -> None:
    """Lag and the oldest pending entry in seconds, read from entry ids on the runtime's
    clock: a simulation's ids and clock give simulation seconds, whatever Redis' clock."""
    from prometheus_client import generate_latest
    from prometheus_client.core import CollectorRegistry

    from workbench.domain.clock import ManualClock
    from workbench.http.metrics import _stream_metrics

    stream = NAMES.stream("escrow")
    ensure_groups(r, NAMES.streams(), "ledger")
    for n, ms in enumerate((1_000_000, 1_004_000, 1_010_000), start=1):
        r.xadd(stream, to_fields(_event("esc-1", n)), id=f"{ms}-0")
    r.xreadgroup("ledger", "c1", {stream: ">"}, count=1)  # 1_000_000 pending; two undelivered
    clock = ManualClock(1_030.5)  # 1_030_500 ms
    row = inspection_frames(workbench.inspect(r, clock=clock)).groups.set_index(["stream", "group"])
    row = row.loc[("escrow", "ledger")]
    assert row["oldest_pending_age_s"] == 30.5
    assert row["lag_s"] == 26.5  # the oldest undelivered entry: 1_004_000
    assert row["lag"] == 2
    # Nothing pending, nothing behind: no age and zero lag.
    other = inspection_frames(workbench.inspect(r, clock=clock)).groups.set_index(
        ["stream", "group"]
    )
    assert other.loc[("payment", "ledger"), "lag_s"] == 0.0
    assert _isna(other.loc[("payment", "ledger"), "oldest_pending_age_s"])

    class Collector:
        def collect(self):  # type: ignore[no-untyped-def]
            return _stream_metrics(r, NAMES, clock)

    registry = CollectorRegistry()
    registry.register(Collector())
    text = generate_latest(registry).decode()
    assert 'workbench_group_lag_seconds{group="ledger",stream="wb:escrow"} 26.5' in text
    assert (
        'workbench_group_oldest_pending_age_seconds{group="ledger",stream="wb:escrow"} 30.5' in text
    )
