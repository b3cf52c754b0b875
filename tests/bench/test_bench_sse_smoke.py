"""``bench/sse.py --quick`` runs to the end. A smoke test: no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import stats
from tests.support import ROOT


def test_sse_bench_quick_run(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out, record_path = tmp_path / "sse.json", tmp_path / "record.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sse.py"),
            "--quick",
            "--json",
            str(out),
            "--record",
            str(record_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads(out.read_text())
    assert last == summary
    assert summary["bench"] == "sse" and summary["quick"] is True
    assert set(summary) >= {"replay", "connections", "latency", "ratios"}
    assert set(summary["replay"]) >= {"entries", "sse_per_second", "raw_per_second"}
    assert set(summary["connections"]) >= {
        "target",
        "established",
        "failures",
        "all_received",
        "server_rss_before_kib",
        "server_rss_connected_kib",
        "server_kib_per_connection",
        "server_redis_conns_before",
        "server_redis_conns_after",
    }
    latency = summary["latency"]
    assert set(latency) >= {
        "sse",
        "plain",
        "anchor",
        "ratio_sse_vs_anchor",
        "ratio_plain_vs_anchor",
    }
    for side in ("sse", "plain", "anchor"):
        assert set(latency[side]) >= {"p50_ms", "p99_ms", "p99_9_ms"}, side
    # What the figures rest on, not only that the keys exist.
    connections = summary["connections"]
    assert connections["established"] == connections["target"] > 0
    assert connections["clients_exact"] == connections["established"]  # each got exactly its own
    assert connections["all_received"] is True
    assert summary["replay"]["entries"] > 0
    # Every side delivered every event it sent, to clients all connected.
    assert latency["connected"] == latency["plain_connected"] == latency["clients"] > 0
    for side in ("sse", "plain", "anchor"):
        assert latency[f"{side}_received"] == latency[f"{side}_expected"] > 0, side
    assert latency["per_round"][0]["order"] == ["sse", "plain", "anchor"]
    # The record: the replay rounds, their per-round ratio with its interval, the headline.
    record = json.loads(record_path.read_text())
    assert record["bench"] == "sse" and record["figures"]["summary"] == summary
    [rnd] = record["rounds"]  # --quick: one replay round
    assert rnd["replay_sse"]["items"] == rnd["replay_xrange"]["items"] == 1000
    ratio = record["ratios"]["replay_sse_vs_xrange"]
    sse_rate = rnd["replay_sse"]["items"] / rnd["replay_sse"]["seconds"]
    raw_rate = rnd["replay_xrange"]["items"] / rnd["replay_xrange"]["seconds"]
    assert ratio["per_round"] == [sse_rate / raw_rate] and stats.consistent(ratio)
    # The latency target and its floor, each per round with its interval.
    bounds = record["bounds"]
    target, floor = (
        bounds["latency_p99_sse_vs_xreadgroup"],
        bounds["latency_p99_plain_vs_xreadgroup"],
    )
    assert target["target"] == 1.3 and floor["target"] is None
    assert floor["what"].startswith("floor") and stats.consistent(floor)
    assert floor["per_round"] == [latency["per_round"][0]["ratio_plain_vs_anchor"]["p99_ms"]]
    assert len(record["environment"]["load_after"]) == 3 and record["environment"]["commit"]
    assert record["figures"]["headline"][0][1] == f"{connections['target']:,} of " + (
        f"{connections['target']:,}"
    )
