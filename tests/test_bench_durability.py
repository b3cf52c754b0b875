"""``bench/durability.py --quick`` runs to the end and writes its record. A smoke
test: no timing assertions, and no claim that a kill lost anything (a natural
loss is rare; tests/test_durability.py forces losses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT


def test_durability_bench_quick_run(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = tmp_path / "durability.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "durability.py"), "--quick", "--out", str(out),
         "--dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kill -9 of redis-server" in result.stdout
    record = json.loads(out.read_text())
    assert {"commit", "date", "load_average_before", "load_average_after", "servers"} <= set(record)
    assert [c["cell"] for c in record["cells"]] == [
        "auto/everysec/repair",
        "auto/everysec/no repair",
        "valkey/everysec/waitaof",
    ]
    assert len(record["trials"]) == 3
    for t in record["trials"]:
        assert t["published"] > 0 and t["throughput_rows_per_s"] > 0
    # With repair on, whatever the kill lost was given back: nothing lost after.
    for t in record["trials"]:
        if "no repair" not in t["cell"]:
            assert t["lost_after"] == 0, t
    # Disk use is cleaned up: only the record is left in the directory given.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["durability.json"]
