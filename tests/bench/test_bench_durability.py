"""``bench/durability.py --quick`` runs to the end and writes its record through
``bench/records.py``. A smoke test: no timing assertions, and no claim that a kill
lost anything (a natural loss is rare; tests/streams/test_durability.py forces losses).
What it does claim: every cell ran its kill, every cell with repair on ends with
every published event handled and every published row in its stream, the costs
are per-round ratios of the interleaved rounds, and the README renders it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench import records, report
from tests.support import ROOT

QUICK_CELLS = [
    "auto/everysec/repair",
    "auto/everysec/no repair",
    "valkey/everysec/repair",
    "valkey/everysec/waitaof",
]


def test_durability_bench_quick_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = tmp_path / "durability.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "durability.py"), "--quick", "--out", str(out),
         "--dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kill -9 of redis-server" in result.stdout
    record = records.read(out)
    assert record["bench"] == "durability" and record["schema"] == records.SCHEMA
    e = record["environment"]
    assert len(e["commit"]) == 40 and e["date"] and len(e["load_before"]) == 3
    assert len(e["load_after"]) == 3 and "redis-server" in e["redis_server"]
    assert "valkey-server" in record["figures"]["servers"]["valkey"]
    assert record["parameters"]["cells"] == QUICK_CELLS and record["parameters"]["trials"] == 1

    # One round: every cell once, each with its relay drain timed.
    assert record["orders"] == [QUICK_CELLS]
    assert [sorted(r) for r in record["rounds"]] == [sorted(QUICK_CELLS)]
    for s in record["rounds"][0].values():  # backlogs of 1000 rows until 0.05 s of work
        assert s["items"] == 1000 * s["steps"] and s["seconds"] >= 0.05, s
    assert [c["cell"] for c in record["figures"]["cells"]] == QUICK_CELLS
    assert all(c["trials"] == 1 for c in record["figures"]["cells"])
    trials = record["figures"]["trials"]
    assert [t["cell"] for t in trials] == QUICK_CELLS
    for t in trials:
        assert t["published"] > 0 and t["throughput_rows_per_s"] > 0, t
        assert t["dd_exit"] == 0, t  # the busy-disk window ran

    # With repair on, whatever the kill lost was given back: every published event
    # handled by the group, every published row back in its stream, recovered in time.
    for t in trials:
        if "no repair" not in t["cell"]:
            assert t["lost_after"] == 0 and t["missing_entries_after"] == 0, t
            assert t["recovered_s"] is not None, t

    # WAITAOF's cost against the same server without it, as a per-round ratio.
    ratio = record["ratios"]["relay rate valkey/everysec/waitaof / valkey/everysec/repair"]
    drained = record["rounds"][0]
    rate = {name: s["items"] / s["seconds"] for name, s in drained.items()}
    assert ratio["per_round"] == [rate["valkey/everysec/waitaof"] / rate["valkey/everysec/repair"]]
    assert ratio["verdict"] is None  # a cost, not a target

    block = report.render(json.loads(out.read_text()))
    assert "| valkey | everysec | on | on | 1 | " in block and "1 interleaved round " in block

    # Disk use is cleaned up: only the record is left in the directory given.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durability.json"]
