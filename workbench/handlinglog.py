"""A consumer's handling log: one line per entry given to the handler.

Real-time simulations run workers as separate processes and SIGKILL them;
the checker still needs to know how often each event reached a handler and
with what delivery count. ``workbench worker --record PATH`` appends a line
``<event_id> <delivery_count> <clock time>`` per entry *before* the handler
runs, one ``write(2)`` per batch on an ``O_APPEND`` file, so a kill loses at
most the line being written, never an earlier one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from workbench.consumer import Delivery

# event id -> [handler calls, highest delivery count, first time, last time]
Handled = dict[str, list[float]]


class HandlingLog:
    """Appends handler calls of one consumer to a file (see the module doc)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def __call__(self, batch: list[Delivery], now: float) -> None:
        lines = "".join(
            f"{d.event.event_id} {d.delivery_count} {now!r}\n" for d in batch if d.event is not None
        )
        if lines:
            os.write(self._fd, lines.encode())

    def close(self) -> None:
        os.close(self._fd)


def read_handling_logs(paths: list[Path], into: Handled | None = None) -> Handled:
    """Fold logs into ``{event_id: [calls, max delivery count, t_first, t_last]}``.

    A torn last line (the process was killed mid-write) is skipped.
    """
    handled: Handled = {} if into is None else into
    for path in paths:
        for line in path.read_text().split("\n")[:-1]:  # the last is "" or torn
            parts = line.split(" ")
            if len(parts) != 3:
                continue
            try:
                count, t = int(parts[1]), float(parts[2])
            except ValueError:
                continue
            row = handled.setdefault(parts[0], [0, 0, t, t])
            row[0] += 1
            row[1] = max(row[1], count)
            row[2] = min(row[2], t)
            row[3] = max(row[3], t)
    return handled
