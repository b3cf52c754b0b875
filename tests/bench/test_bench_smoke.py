"""``bench/throughput.py --quick`` runs to the end and writes a record whose verdicts hold.

A smoke test: no timing assertions, but the record must carry every round, an
interval for every figure, and only verdicts that its own intervals give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import stats
from tests.support import ROOT

RATIOS = {
    "parallel_vs_raw4",
    "noop_vs_raw1",
    "noop_vs_faststream_batch",
    "noop_vs_faststream_one",
    "ordered_raw1_vs_faststream_batch",
    "relay_vs_xadd",
    "relay_vs_plain",
    "plain_relay_vs_xadd",
    "noop_vs_raw1_decoded",
    "decoded_raw1_vs_raw1",
    "noop_vs_raw1_ordered",
    "ordered_raw1_vs_raw1",
    "parallel_vs_sql4",
    "sql4_vs_raw4",
    "parallel_vs_plain4",
    "plain4_vs_raw4",
}


def test_throughput_bench_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = tmp_path / "bench.json"
    committed = ROOT / "bench" / "records" / "throughput.json"  # a quick run leaves it alone
    before = committed.read_bytes() if committed.exists() else None
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record
    assert "ratio parallel_vs_raw4: median" in result.stdout
    assert committed.read_bytes() == before if before is not None else not committed.exists()

    p, e = record["parameters"], record["environment"]
    assert p["entries"] == 8 * p["escrows"] == 800 and p["rounds"] == 3
    assert len(e["commit"]) == 40 and e["redis_server"] and e["redis_py"] and e["python"]
    assert len(e["load_before"]) == len(e["load_after"]) == 3

    faststream = p["faststream"] is not None
    measured = {"commands", "relay", "relay_plain", "xadd", "parallel4", "raw4", "raw1", "noop"}
    measured |= {"raw1_decoded", "raw1_ordered", "sql4", "plain4"}
    if faststream:
        measured |= {"fs_batch", "fs_one"}
    else:  # the record says why the peer anchor is missing
        assert p["faststream_skipped"].startswith("skipped:") and record["notes"]
    assert len(record["rounds"]) == 3 and len(record["orders"]) == 3
    for rnd in record["rounds"]:
        assert set(rnd) == measured
        for sample in rnd.values():
            assert sample["items"] > 0 and sample["seconds"] > 0 and sample["steps"] >= 1
    assert record["orders"][1] == record["orders"][0][::-1]  # interleaved, order reversed
    # Every step did all its work: each entry once, in the parallel shapes once per group
    # that reads its stream (the FastStream one-by-one sample aside).
    per_step = {
        name: p["entries"]
        for name in (
            "relay",
            "relay_plain",
            "xadd",
            "raw1",
            "raw1_decoded",
            "raw1_ordered",
            "noop",
            "fs_batch",
        )
    }
    per_step |= dict.fromkeys(
        ("parallel4", "raw4", "sql4", "plain4"), sum(p["entries_per_group"].values())
    )
    assert per_step["raw4"] > p["entries"]  # the escrow stream is read by all four groups
    for name in measured - {"commands", "fs_one"}:
        for rnd in record["rounds"]:
            assert rnd[name]["items"] == rnd[name]["steps"] * per_step[name]

    expected = RATIOS if faststream else RATIOS - {n for n in RATIOS if "faststream" in n}
    assert set(record["ratios"]) == expected
    assert set(record["rates"]) == measured
    for summary in [*record["ratios"].values(), *record["rates"].values()]:
        assert len(summary["per_round"]) == 3
        lo, hi = summary["interval"]
        assert summary["min"] <= lo <= hi <= summary["max"]
        assert stats.consistent(summary), summary
    judged = record["ratios"]["parallel_vs_raw4"]
    # Issue 16's targets, each judged.
    targets = {name: s["target"] for name, s in record["ratios"].items() if s["target"]}
    assert targets == {"parallel_vs_raw4": 0.33, "noop_vs_raw1": 0.8, "relay_vs_xadd": 0.7} | (
        {"noop_vs_faststream_batch": 3.0} if faststream else {}
    )
    assert judged["target"] == 0.33 and judged["verdict"] in (
        stats.MET,
        stats.NOT_MET,
        stats.INCONCLUSIVE,
    )
    # Per-round ratios are each round's own rates divided.
    for i, rnd in enumerate(record["rounds"]):
        rate = {k: v["items"] / v["seconds"] for k, v in rnd.items()}
        assert judged["per_round"][i] == rate["parallel4"] / rate["raw4"]


def test_throughput_bench_rejects_bad_options() -> None:
    for flag, value, says in (("--target", "nosuch=1", "NAME=NUMBER"),
                              ("--target", "noop_vs_raw1=x", "not a number"),
                              ("--faststream", "/nonexistent/python", "no /nonexistent/python"),
                              ("--faststream", sys.executable, "does not import")):  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "throughput.py"), flag, value],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and says in result.stderr, result.stderr


def _entries(stream_ms: int, events: list[tuple[str, int]]) -> list[list[object]]:
    """Raw XREADGROUP entries ``[id, fields]`` of (escrow, sequence) events, one per ms."""
    import msgspec

    from bench.sse import bench_event
    from workbench.domain.events import encode

    out: list[list[object]] = []
    for k, (escrow, sequence) in enumerate(events):
        event = msgspec.structs.replace(
            bench_event(f"evt_{escrow}_{sequence}", ("u",), 0),
            aggregate_id=escrow,
            sequence=sequence,
        )
        out.append([f"{stream_ms + k}-0".encode(), [b"data", encode(event)]])
    return out


def test_the_plain_ordered_loop_holds_back_behind_a_full_read_and_sorts_by_escrow() -> None:
    from bench.throughput import BATCH, _ordered_acks, plain_ready

    # A full read of stream a (ids from ms 1000 on: its unread entries may come
    # from its last millisecond on) and a short read of stream b, partly later.
    full = _entries(1000, [(f"esc_{k:04d}", 1) for k in range(BATCH)])
    last = 1000 + BATCH - 1
    short = _entries(last - 2, [("esc_0003", 0), ("esc_x", 1), ("esc_z", 0), ("esc_y", 1)])
    held: dict[bytes, list[tuple[bytes, object]]] = {}
    ready = plain_ready([(b"a", full), (b"b", short)], held)
    assert len(ready) == BATCH - 1 + 2  # all of a but its last ms; b's two before it
    assert all(int(i.split(b"-")[0]) < last for _, i, _ in ready)
    keys = [(e.aggregate_id, e.sequence) for _, _, e in ready]
    assert keys == sorted(keys) and keys[3:5] == [("esc_0003", 0), ("esc_0003", 1)]
    assert {stream: len(items) for stream, items in held.items()} == {b"a": 1, b"b": 2}
    # The next read (nothing new) hands over what was held, each escrow in order.
    acks = _ordered_acks([], held, "g")
    assert held == {} and sorted(a[:3] for a in acks) == [("XACK", b"a", "g"), ("XACK", b"b", "g")]
    assert sum(len(a) - 3 for a in acks) == 3
    # No full read: nothing is held back.
    assert len(plain_ready([(b"b", short)], held)) == 4 and held == {}
    # Only the full stream would hold entries back: its unread entries come after
    # them, so all of it goes now (the runtime's rule, decisions.ready_to_handle).
    early = _entries(1000, [("esc_x", 1), ("esc_z", 0)])
    ready = plain_ready([(b"a", full), (b"b", early)], held)
    assert len(ready) == BATCH + 2 and held == {}


def test_the_plain_whole_job_handles_what_it_hands_over_in_order_before_acking_it() -> None:
    from bench.throughput import BATCH, _ordered_acks
    from workbench.domain.events import decode

    full = _entries(1000, [(f"esc_{k:04d}", 1) for k in range(BATCH)])
    last = 1000 + BATCH - 1
    short = _entries(last - 1, [("esc_0003", 0), ("esc_x", 1), ("esc_z", 0)])
    handled: list[list[tuple[str, int]]] = []

    def handle(events: list) -> None:  # type: ignore[type-arg]
        handled.append([(e.aggregate_id, e.sequence) for e in events])

    held: dict[bytes, list[tuple[bytes, object]]] = {}
    acks = _ordered_acks([(b"a", full), (b"b", short)], held, "g", handle)
    assert len(handled) == 1 and handled[0] == sorted(handled[0])
    # Handled is acked, and only that: a's last ms and b's from it on wait.
    assert len(handled[0]) == sum(len(a) - 3 for a in acks) == BATCH - 1 + 1
    key_of = {
        (stream, entry[0]): (e.aggregate_id, e.sequence)
        for stream, got in ((b"a", full), (b"b", short))
        for entry in got
        for e in [decode(entry[1][1])]
    }
    acked = sorted(key_of[(a[1], i)] for a in acks for i in a[3:])
    assert acked == sorted(handled[0])
    assert handled[0][3:5] == [("esc_0003", 0), ("esc_0003", 1)]
    # What was held is handled with the next read; a read with nothing ready calls nothing.
    acks = _ordered_acks([], held, "g", handle)
    assert handled[1] == [("esc_0499", 1), ("esc_x", 1), ("esc_z", 0)]
    assert sum(len(a) - 3 for a in acks) == 3
    assert _ordered_acks([], held, "g", handle) == [] and len(handled) == 2
