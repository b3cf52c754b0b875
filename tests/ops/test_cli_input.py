"""Bad input to every command: exit 2 with a message naming what is wrong, never a
traceback or a hang, and nothing started.

Each case runs the real ``workbench`` (a fresh process, as a user would) with one
bad option or file; the options are checked before any Redis, database or run
directory is touched, so each exits within a second or two. A case that started
something long would hit the timeout and fail.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NO_REDIS = "redis://127.0.0.1:1"  # nothing listens on port 1


def _workbench(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    (tmp_path / "data").mkdir(exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "workbench", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=60, env={**os.environ, "WORKBENCH_DATA": str(tmp_path / "data"), **(env or {})},
    )  # fmt: skip
    return done.returncode, done.stderr


# (arguments, what the message must name); {tmp} is the test's directory.
BAD_OPTIONS: dict[str, tuple[list[str], str]] = {
    "factor-nan": (["simulate", "baseline", "--realtime", "--factor", "nan"], "--factor"),
    "factor-inf": (["simulate", "baseline", "--realtime", "--factor", "inf"], "--factor"),
    "restart-backoff-nan": (["serve", "--restart-backoff", "nan"], "--restart-backoff"),
    "worker-batch-size-0": (["worker", "ledger", "--batch-size", "0"], "--batch-size"),
    "worker-block-ms-negative": (["worker", "ledger", "--block-ms", "-1"], "--block-ms"),
    "worker-block-ms-0": (["worker", "ledger", "--block-ms", "0"], "--block-ms"),
    "worker-dead-after-nan": (["worker", "ledger", "--dead-after", "nan"], "--dead-after"),
    "worker-retry-backoff-inf": (["worker", "ledger", "--retry-backoff", "inf"], "--retry-backoff"),
    "worker-claim-idle-negative": (
        ["worker", "ledger", "--claim-idle-ms", "-1"], "--claim-idle-ms",
    ),
    "fanout-user-maxlen-0": (["worker", "fanout", "--user-maxlen", "0"], "--user-maxlen"),
    "serve-user-maxlen-0": (["serve", "--user-maxlen", "0"], "--user-maxlen"),
    "timers-every-0": (["timers", "--every", "0"], "--every"),
    "timers-every-nan": (["timers", "--every", "nan"], "--every"),
    "token-ttl-nan": (["token", "alice", "--ttl", "nan"], "--ttl"),
    "run-escrows-negative": (["run", "--escrows", "-1"], "--escrows"),
    "run-timeout-nan": (["run", "--timeout", "nan"], "--timeout"),
    "run-out-is-a-file": (["run", "--out", "{tmp}/a-file"], "--out"),
    "worker-redis-url-not-redis": (["worker", "ledger", "--redis-url", "foo"], "REDIS_URL 'foo'"),
    "relay-redis-url-not-redis": (["relay", "--redis-url", "foo"], "REDIS_URL 'foo'"),
    "inspect-redis-url-not-redis": (["inspect", "--redis-url", "foo"], "REDIS_URL 'foo'"),
    "worker-unreachable-redis": (
        ["worker", "ledger", "--redis-url", NO_REDIS, "--database-url", "sqlite:///{tmp}/db"],
        "cannot reach Redis",
    ),
    "worker-database-url-garbage": (
        ["worker", "ledger", "--redis-url", NO_REDIS, "--database-url", "garbage"],
        "DATABASE_URL 'garbage'",
    ),
    "relay-database-url-garbage": (
        ["relay", "--redis-url", NO_REDIS, "--database-url", "garbage"], "DATABASE_URL 'garbage'",
    ),
    "timers-database-url-unknown-driver": (
        ["timers", "--database-url", "nosuchdb://x"], "DATABASE_URL 'nosuchdb://x'",
    ),
    "serve-database-url-garbage": (
        ["serve", "--port", "{port}", "--redis-url", NO_REDIS, "--database-url", "garbage",
         "--data-dir", "{tmp}/serve"],
        "DATABASE_URL 'garbage'",
    ),
    "serve-unreachable-cluster": (
        ["serve", "--port", "{port}", "--partitions", "4", "--redis-url", "redis+cluster://127.0.0.1:1",
         "--data-dir", "{tmp}/serve"],
        "cannot reach the Redis Cluster",
    ),
    "serve-data-dir-under-a-file": (
        ["serve", "--port", "{port}", "--data-dir", "{tmp}/a-file/serve"],
        "cannot use the data dir",
    ),
    "scenario-is-a-directory": (["simulate", "{tmp}/dir.toml"], "not a scenario file"),
    "scenario-not-utf8-show": (["scenarios", "show", "{tmp}/bin.toml"], "not UTF-8"),
    "scenario-not-utf8-sweep": (
        ["sweep", "{tmp}/bin.toml", "--grid", "market.buyers=5"], "not UTF-8",
    ),
    "scenario-population-huge": (
        ["simulate", "baseline", "--set", "market.buyers=99999999999999999999999"],
        "market.buyers must be at most",
    ),
    "scenario-model-missing": (
        ["simulate", "baseline", "--set", "analytics.model={tmp}/no-model"],
        "is not a model directory",
    ),
}  # fmt: skip


@pytest.mark.parametrize(("args", "names"), BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_input_is_exit_2_naming_it(tmp_path: Path, args: list[str], names: str) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    (tmp_path / "dir.toml").mkdir()
    (tmp_path / "bin.toml").write_bytes(b"\xff\xfe[run]\n")
    with socket.socket() as probe:  # a port free now, for serve to bind
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    args = [arg.replace("{tmp}", str(tmp_path)).replace("{port}", port) for arg in args]
    code, stderr = _workbench(tmp_path, *args)
    assert code == 2, stderr
    assert names in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not (tmp_path / "data" / "runs").exists()  # no run was started


def test_a_table_of_another_shape_is_exit_2_for_check_and_report(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, stderr = _workbench(tmp_path, "simulate", "baseline", "--set", "run.duration_s=5",
                              "--set", "phones.count=5", "--set", "market.buyers=5",
                              "--out", str(run))  # fmt: skip
    assert code == 0, stderr
    # Another table's file under the published table's name.
    (run / "published.parquet").write_bytes((run / "escrows.parquet").read_bytes())
    for command in ("check", "report"):
        code, stderr = _workbench(tmp_path, command, str(run))
        assert code == 2, (command, stderr)
        assert "a table lacks" in stderr and "Traceback" not in stderr, (command, stderr)
