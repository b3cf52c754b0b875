"""``bench/throughput.py --quick`` runs to the end. A smoke test: no timing assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support import ROOT


def test_throughput_bench_quick_run(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ratio runtime/raw:" in result.stdout
    summary = json.loads(out.read_text())
    assert summary["events"] == 8 * summary["escrows"]
    assert set(summary["ratios"]) >= {"noop_vs_raw", "handlers_vs_raw"}
