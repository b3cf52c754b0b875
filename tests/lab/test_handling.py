"""The handling log real-time workers write for the checker."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from simulations.analysis.handling import HandlingLog, read_handling_logs


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


def _batch(*event_ids: str) -> list:
    return [SimpleNamespace(event=SimpleNamespace(event_id=e), delivery_count=1) for e in event_ids]


def test_each_batch_is_on_disk_when_the_call_returns(tmp_path: Path) -> None:
    """A real-time worker's log: a SIGKILL right after a batch loses none of it."""
    log = HandlingLog(tmp_path / "w.log")
    log(_batch("evt-1", "evt-2"), 1.0)
    assert read_handling_logs([log.path]) == {
        "evt-1": [1, 1, 1.0, 1.0], "evt-2": [1, 1, 1.0, 1.0]
    }  # fmt: skip
    log.close()


def test_a_buffered_log_writes_when_full_and_at_close(tmp_path: Path) -> None:
    """A virtual run's log waits in memory for ``buffer_bytes``, then writes all it
    holds, in order; close writes the rest."""
    log = HandlingLog(tmp_path / "v.log", buffer_bytes=40)
    log(_batch("evt-1"), 1.0)  # 13 bytes: held
    assert log.path.read_text() == ""
    log(_batch("evt-2", "evt-3"), 2.0)  # 39 held: still below the limit
    assert log.path.read_text() == ""
    log(_batch("evt-4"), 3.0)  # 52: written, all of it
    assert log.path.read_text().splitlines() == [
        "evt-1 1 1.0", "evt-2 1 2.0", "evt-3 1 2.0", "evt-4 1 3.0"
    ]  # fmt: skip
    log(_batch("evt-5"), 4.0)
    log.close()
    assert log.path.read_text().splitlines() == [
        "evt-1 1 1.0", "evt-2 1 2.0", "evt-3 1 2.0", "evt-4 1 3.0", "evt-5 1 4.0"
    ]  # fmt: skip
