"""``bench/sse.py --quick`` runs to the end. A smoke test: no timing assertions."""

from __future__ import annotations

import itertools
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
    # The cores each side kept busy while sending, in the record's headline.
    busy = latency["sse_cpu_cores_busy"]
    [cores] = [row[1] for row in record["figures"]["headline"] if row[0].startswith("cores busy")]
    assert cores.startswith(f"{busy['server']:.2f} / {busy['client']:.2f} / ")


def test_six_rounds_run_every_pair_of_sides_in_each_order_equally_often() -> None:
    from bench.sse import LATENCY_SIDES, side_order

    orders = [side_order(r) for r in range(6)]
    assert sorted(orders) == sorted(itertools.permutations(LATENCY_SIDES))  # all six
    for a, b in itertools.permutations(LATENCY_SIDES, 2):
        first = sum(1 for order in orders if order.index(a) < order.index(b))
        assert first == 3, (a, b, first)


def test_the_plain_forwarder_forwards_a_users_messages_and_dies_on_one_it_cannot_read(
    redis_url: str,
) -> None:
    import socket

    import redis

    from bench import plain_forwarder
    from workbench.ops.waiting import wait_until

    process, port = plain_forwarder.start(redis_url, "pf-test:live")
    client = redis.Redis.from_url(redis_url)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as phone:
            phone.sendall(b"GET /users/u1/events HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b"event: ready" not in got:
                got += phone.recv(65536)
            message = '["u1", "7-1", "7-0", "e1", "escrow.funded", "{\\"a\\":1}"]'
            client.publish("pf-test:live", '["u2", "8-1", "8-0", "e2", "t", "{}"]')  # not u1's
            client.publish("pf-test:live", message)
            while b'data: {"a":1}\r\n\r\n' not in got:
                got += phone.recv(65536)
            assert b"id: 7-1\r\nevent: escrow.funded\r\n" in got and b"8-1" not in got
        assert process.is_alive()
        client.publish("pf-test:live", "not a live message")
        wait_until(lambda: not process.is_alive(), timeout=10, what="the forwarder to die")
        assert process.exitcode == 1  # loudly: bench/sse.py then fails the run
    finally:
        process.kill()
        process.join()
        client.close()
