"""The handling log real-time workers write for the checker."""

from __future__ import annotations

from pathlib import Path

from simulations.analysis.handling import read_handling_logs


def test_logs_fold_into_calls_and_highest_delivery_count(tmp_path: Path) -> None:
    a, b = tmp_path / "a.log", tmp_path / "b.log"
    a.write_text("evt-1 1 10.0\nevt-2 1 10.5\n")
    b.write_text("evt-1 2 14.0\n")
    handled = read_handling_logs([a, b])
    assert handled == {"evt-1": [2, 2, 10.0, 14.0], "evt-2": [1, 1, 10.5, 10.5]}


def test_a_line_torn_by_sigkill_is_skipped(tmp_path: Path) -> None:
    log = tmp_path / "a.log"
    log.write_text("evt-1 1 10.0\nevt-2 1 10.")  # killed in the middle of a write
    assert read_handling_logs([log]) == {"evt-1": [1, 1, 10.0, 10.0]}
