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

import pyarrow as pa
import pyarrow.csv as pacsv

if TYPE_CHECKING:
    from workbench.consumer import Delivery

# event id -> [handler calls, highest delivery count, first time, last time]
Handled = dict[str, list[float]]
_TYPES = {"event_id": pa.string(), "count": pa.int64(), "t": pa.float64()}


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


def aggregate_handling_logs(paths: list[Path]) -> pa.Table:
    """Fold logs into one row per event: ``event_id, handler_calls,
    max_delivery_count, t_first, t_last`` (an Arrow table: compact for long runs).

    A torn last line (the process was killed mid-write) is skipped.
    """
    parts = []
    for path in paths:
        data = path.read_bytes()
        data = data[: data.rfind(b"\n") + 1]  # drop a torn last line
        if data:
            parts.append(
                pacsv.read_csv(
                    pa.py_buffer(data),
                    read_options=pacsv.ReadOptions(column_names=["event_id", "count", "t"]),
                    parse_options=pacsv.ParseOptions(delimiter=" "),
                    convert_options=pacsv.ConvertOptions(column_types=_TYPES),
                )
            )
    if not parts:
        return pa.table(
            {"event_id": pa.array([], pa.string()), "handler_calls": pa.array([], pa.int64()),
             "max_delivery_count": pa.array([], pa.int64()),
             "t_first": pa.array([], pa.float64()), "t_last": pa.array([], pa.float64())}
        )  # fmt: skip
    rows = pa.concat_tables(parts)
    grouped = rows.group_by("event_id", use_threads=False).aggregate(
        [("count", "count"), ("count", "max"), ("t", "min"), ("t", "max")]
    )
    return grouped.rename_columns(
        {"count_count": "handler_calls", "count_max": "max_delivery_count",
         "t_min": "t_first", "t_max": "t_last"}
    ).select(["event_id", "handler_calls", "max_delivery_count", "t_first", "t_last"])  # fmt: skip


def read_handling_logs(paths: list[Path]) -> Handled:
    """:func:`aggregate_handling_logs` as ``{event_id: [calls, max count, t_first, t_last]}``."""
    table = aggregate_handling_logs(paths)
    return {
        row["event_id"]: [row["handler_calls"], row["max_delivery_count"], row["t_first"],
                          row["t_last"]]
        for row in table.to_pylist()
    }  # fmt: skip
