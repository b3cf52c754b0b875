"""A consumer's handling log: one line per entry given to the handler.

Real-time simulations run workers as separate processes and SIGKILL them;
the checker still needs to know how often each event reached a handler and
with what delivery count. ``workbench sim-worker --record PATH`` appends a line
``<event_id> <delivery_count> <clock time>`` per entry *before* the handler
runs, one ``write(2)`` per batch on an ``O_APPEND`` file, so a kill loses at
most the line being written, never an earlier one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.streams.decisions import Delivery

# event id -> [handler calls, highest delivery count, first time, last time]
Handled = dict[str, list[float]]


class AppendLog:
    """Lines appended to a file with ``O_APPEND``: one ``write(2)`` per :meth:`append`,
    so a kill loses at most the line being written, never an earlier one.

    With ``buffer_bytes``, lines wait in memory until that many are held (counted
    in characters: the lines are ASCII), and at :meth:`flush` or :meth:`close`: for
    a process whose kill ends the run anyway (a virtual-time run), where a write
    per batch is a system call per batch.
    """

    def __init__(self, path: Path | str, *, buffer_bytes: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._limit = buffer_bytes
        self._held: list[str] = []
        self._held_bytes = 0

    def append(self, lines: str) -> None:
        if not self._limit:
            self._write(lines)
            return
        self._held.append(lines)
        self._held_bytes += len(lines)
        if self._held_bytes >= self._limit:
            self.flush()

    def flush(self) -> None:
        if self._held:
            self._write("".join(self._held))
            self._held.clear()
            self._held_bytes = 0

    def close(self) -> None:
        self.flush()
        os.close(self._fd)

    def _write(self, lines: str) -> None:
        data = memoryview(lines.encode())
        while data:  # a regular file takes it whole, short of a full disk
            data = data[os.write(self._fd, data) :]


class HandlingLog(AppendLog):
    """Appends handler calls of one consumer to a file (see the module doc)."""

    def __call__(self, batch: list[Delivery], now: float) -> None:
        lines = "".join(
            f"{d.event.event_id} {d.delivery_count} {now!r}\n" for d in batch if d.event is not None
        )
        if lines:
            self.append(lines)


def _records(path: Path) -> Iterator[tuple[str, int, float]]:
    """(event_id, delivery count, time) per complete line; a torn last line (the
    process was killed mid-write) and malformed lines are skipped."""
    with path.open("rb") as lines:
        for line in lines:
            if not line.endswith(b"\n"):
                return
            parts = line.split()
            if len(parts) != 3:
                continue
            try:
                yield parts[0].decode(), int(parts[1]), float(parts[2])
            except ValueError:
                continue


def read_handling_logs(paths: list[Path]) -> Handled:
    """Fold logs into ``{event_id: [calls, max delivery count, t_first, t_last]}``."""
    handled: Handled = {}
    for path in paths:
        for event_id, count, t in _records(path):
            row = handled.setdefault(event_id, [0, 0, t, t])
            row[0] += 1
            row[1] = max(row[1], count)
            row[2] = min(row[2], t)
            row[3] = max(row[3], t)
    return handled


class HandlingIndex:
    """Every group's handling logs in an indexed SQLite file, looked up a chunk of
    events at a time: a long run's logs never have to fit in memory."""

    def __init__(self, path: Path, logs: dict[str, list[Path]], batch: int = 10_000) -> None:
        self._db = sqlite3.connect(path)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE handling (grp TEXT, event_id TEXT, n INT, t REAL)")
        for group, paths in logs.items():
            rows: list[tuple[str, str, int, float]] = []
            for log in paths:
                for record in _records(log):
                    rows.append((group, *record))
                    if len(rows) >= batch:
                        self._db.executemany("INSERT INTO handling VALUES (?,?,?,?)", rows)
                        rows = []
            self._db.executemany("INSERT INTO handling VALUES (?,?,?,?)", rows)
        self._db.execute("CREATE INDEX handling_by_event ON handling (grp, event_id)")
        self._db.commit()

    def lookup(self, group: str, event_ids: list[str]) -> Handled:
        """``{event_id: [calls, max delivery count, t_first, t_last]}`` for ``event_ids``."""
        found: Handled = {}
        for start in range(0, len(event_ids), 500):  # SQLite's bound-variable limit
            ids = event_ids[start : start + 500]
            marks = ",".join("?" * len(ids))
            for event_id, calls, most, first, last in self._db.execute(
                "SELECT event_id, count(*), max(n), min(t), max(t) FROM handling "
                f"WHERE grp = ? AND event_id IN ({marks}) GROUP BY event_id",
                [group, *ids],
            ):
                found[event_id] = [calls, most, first, last]
        return found

    def totals(self, group: str, event_ids: list[str]) -> dict[str, int]:
        """The sum of the logged counts per event of ``event_ids`` (effect logs)."""
        found: dict[str, int] = {}
        for start in range(0, len(event_ids), 500):
            ids = event_ids[start : start + 500]
            marks = ",".join("?" * len(ids))
            found.update(
                self._db.execute(
                    "SELECT event_id, sum(n) FROM handling "
                    f"WHERE grp = ? AND event_id IN ({marks}) GROUP BY event_id",
                    [group, *ids],
                ).fetchall()
            )
        return found

    def close(self) -> None:
        self._db.close()
