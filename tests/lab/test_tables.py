"""Run directories: tables written as the run goes, the manifest last."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from simulations.analysis.tables import (
    COLUMNS,
    UNFINISHED,
    RunTables,
    RunWriter,
    UnfinishedRun,
    mark_unfinished,
)


def test_rows_are_flushed_in_row_groups_and_read_back_in_order(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, rows_per_group=100)
    rows = [
        {"t": i * 0.5, "command": "create", "escrow_id": f"esc-{i}", "actor": "buyer-1",
         "ok": i % 7 != 0, "error": None if i % 7 else "illegal_transition"}
        for i in range(1050)
    ]  # fmt: skip
    writer["commands"].extend(rows)
    # Flushed as it went: all but the last partial group is on disk already.
    assert writer["commands"].written == 1000
    manifest = writer.close({"scenario": "test"})
    assert manifest["rows"]["commands"] == 1050 and manifest["rows"]["ledger"] == 0
    assert pq.ParquetFile(tmp_path / "commands.parquet").num_row_groups == 11
    assert pq.read_table(tmp_path / "commands.parquet").to_pylist() == rows
    run = RunTables.load(tmp_path)
    assert len(run.commands) == 1050 and run.commands["ok"].dtype == bool
    assert list(run.ledger.columns) == COLUMNS["ledger"]  # empty tables keep their columns


def test_an_unfinished_run_is_refused(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer["samples"].append({"t": 1.0, "group": "ledger", "pending": 0,
                              "oldest_pending_age_s": 0.0, "lag": 0, "lag_s": 0.0})  # fmt: skip
    # Marked from its start: a run being written, or one whose simulator was stopped.
    with pytest.raises(UnfinishedRun, match=r"holds an unfinished run \(being written\)"):
        RunTables.load(tmp_path)
    mark_unfinished(tmp_path, "stopped by SIGINT at 12 virtual s")
    with pytest.raises(UnfinishedRun, match="stopped by SIGINT at 12 virtual s"):
        RunTables.load(tmp_path)
    (tmp_path / UNFINISHED).unlink()  # no marker, no manifest: not a run directory
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        RunTables.load(tmp_path)


def test_a_run_written_again_is_unfinished_until_its_manifest(tmp_path: Path) -> None:
    RunWriter(tmp_path).close({"scenario": "first"})
    assert RunTables.load(tmp_path).manifest["scenario"] == "first"
    again = RunWriter(tmp_path)  # the earlier run's manifest no longer vouches for it
    with pytest.raises(UnfinishedRun):
        RunTables.load(tmp_path)
    again.close({"scenario": "second"})
    assert RunTables.load(tmp_path).manifest["scenario"] == "second"
    assert not (tmp_path / UNFINISHED).exists()


def test_a_row_of_the_wrong_shape_is_a_clear_error(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path)
    writer["faults"].append({"t_start": "soon", "t_end": None, "kind": "x", "target": "y",
                             "detail": ""})  # fmt: skip
    with pytest.raises((TypeError, ValueError)):
        writer["faults"].flush()
