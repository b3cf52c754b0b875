"""``bench/scale.py --quick`` runs the three layouts to the end and writes a record of
the right shape: every measurement in every round, each step's full work, ratios
that are each round's own rates divided, and a projection its inputs give.

A smoke test: no timing assertions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import projection, report, stats
from tests.support import ROOT

LAYOUT_MEASURES = {
    "single": {"relay", "ledger", "fanout"},
    "partitioned": {"relay", "relays_2", "ledger", "ledger_2", "fanout"},
    "cluster": {"relay", "relays_2", "ledger", "ledger_2", "fanout"},
}
MEASURED = {f"{layout}:{m}" for layout, ms in LAYOUT_MEASURES.items() for m in ms}


def test_scale_bench_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = tmp_path / "scale.json"
    committed = ROOT / "bench" / "records" / "scale.json"  # a quick run leaves it alone
    before = committed.read_bytes() if committed.exists() else None
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert json.loads(result.stdout.strip().splitlines()[-1]) == record
    assert (committed.read_bytes() == before) if before is not None else not committed.exists()

    p, e, f = record["parameters"], record["environment"], record["figures"]
    assert record["bench"] == "scale" and p["rounds"] == 3 and p["partitions"] == 16
    assert p["entries"] == 8 * p["escrows"] == 800 and 0 < p["entries_ledger"] < p["entries"]
    assert len(e["commit"]) == 40 and e["redis_server"] and len(e["load_after"]) == 3
    assert f["layouts"] == {
        "single": {"partitions": 0, "redis_nodes": 1, "partitions_busy": 1},
        "partitioned": {"partitions": 16, "redis_nodes": 1, "partitions_busy": 16},
        "cluster": {"partitions": 16, "redis_nodes": 3, "partitions_busy": 16},
    }

    # Every measurement in every round, the order reversed every other round; each
    # step did all its work (the ledger reads escrow and payment entries only).
    assert len(record["rounds"]) == len(record["orders"]) == 3
    assert record["orders"][1] == record["orders"][0][::-1]
    for rnd in record["rounds"]:
        assert set(rnd) == MEASURED
        for name, sample in rnd.items():
            per_step = p["entries_ledger"] if ":ledger" in name else p["entries"]
            assert sample["items"] == sample["steps"] * per_step and sample["seconds"] > 0

    assert set(record["rates"]) == MEASURED
    stages = ("relay", "ledger", "fanout")
    expected_ratios = {f"{o}_vs_single:{s}" for o in ("partitioned", "cluster") for s in stages}
    for layout in ("partitioned", "cluster"):
        expected_ratios |= {f"{layout}:relays_2_vs_relay", f"{layout}:ledger_2_vs_ledger"}
    assert set(record["ratios"]) == expected_ratios
    for summary in [*record["ratios"].values(), *record["rates"].values()]:
        lo, hi = summary["interval"]
        assert len(summary["per_round"]) == 3 and summary["min"] <= lo <= hi <= summary["max"]
        assert stats.consistent(summary) and summary["verdict"] is None
    cluster_relay = record["ratios"]["cluster_vs_single:relay"]
    for i, rnd in enumerate(record["rounds"]):
        rate = {k: v["items"] / v["seconds"] for k, v in rnd.items()}
        assert cluster_relay["per_round"][i] == rate["cluster:relay"] / rate["single:relay"]

    # Per measurement: the rate per busy partition and the Redis CPU each round cost.
    for name in MEASURED:
        m = f["measures"][name]
        layout = name.split(":")[0]
        assert m["partitions_busy"] == f["layouts"][layout]["partitions_busy"]
        assert m["rate_per_partition"] == record["rates"][name]["median"] / m["partitions_busy"]
        assert len(m["redis_cpu_s"]) == 3 and all(c >= 0 for c in m["redis_cpu_s"])

    # The projection: its inputs are this run's figures, its rows what they give.
    proj = f["projection"]
    inputs = projection.Inputs.from_dict(proj["inputs"])
    assert [s.name for s in inputs.stages] == list(stages)
    assert inputs.stages[0].single_rate == record["rates"]["single:relay"]["median"]
    assert (
        inputs.stages[2].cluster_vs_single == record["ratios"]["cluster_vs_single:fanout"]["median"]
    )
    assert inputs.partitions == 16 and inputs.masters_measured == 3
    assert inputs.store_share == p["entries_ledger"] / p["entries"]
    assert [r["machines"] for r in proj["rows"]] == [1, 2, 4, 8]
    assert proj["rows"] == [r.to_dict() for r in projection.project(inputs)]
    block = report.render(record)
    assert "| `cluster:fanout` |" in block and "Assumptions:" in block


def test_scale_bench_rejects_bad_options() -> None:
    for flag, value, says in (("--partitions", "1", "--partitions must be between"),
                              ("--masters", "0", "--masters must be at least 1"),
                              ("--repeat", "0", "must be at least 1")):  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "scale.py"), flag, value],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2 and says in result.stderr, result.stderr
