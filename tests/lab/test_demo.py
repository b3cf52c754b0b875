"""``make run``'s job, end to end, with both redis-server binaries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from tests.support import ROOT


@pytest.mark.parametrize("binary", ["auto", "bundled"])
def test_demo_runs_every_path_crashes_a_worker_and_balances(tmp_path, binary) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["WORKBENCH_REDIS_SERVER"] = binary
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "run", "--escrows", "80", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ledger: OK" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"]
    assert summary["crash"]["injected"] and summary["crash"]["exit_code"] == -9
    assert summary["crash"]["pending_at_crash"] > 0
    for group in summary["groups"]:
        assert group["handled"] == group["events"] > 0
        assert group["pending"] == 0 and group["lag"] == 0 and group["dead_lettered"] == 0
    states = summary["escrow_states"]
    assert {"released", "refunded", "cancelled", "expired"} <= set(states)
    assert summary["callbacks"].get("duplicate", 0) > 0
    events = pd.read_parquet(out / "events.parquet")
    assert len(events) == summary["events_published"]
    assert set(events["type"]) >= {
        "escrow.created",
        "escrow.funded",
        "escrow.released",
        "dispute.opened",
        "payment.failed",
        "escrow.expired",
    }
    assert (out / "ledger.parquet").exists() and (out / "groups.parquet").exists()
