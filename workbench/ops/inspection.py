"""What the log looks like right now: lengths, groups, pending, lag, dead letters.

Ages are in seconds of the runtime's clock (``clock``): ``oldest_pending_age_s``
is how long ago the oldest entry a group has not acked was appended, and
``lag_s`` how long ago the oldest entry not yet delivered to it was, both read
from the entry ids. In production ids are Redis' clock and the runtime's is the
wall clock; in a simulation both are the simulation's, so operators and analysts
read the same units. (``oldest_pending_idle_ms`` is Redis' own idle time since the
last delivery, on Redis' clock.)

``inspect(client)`` returns rows of plain values (the lab's
``simulations.analysis.inspection_frames`` makes DataFrames of them); ``workbench
inspect`` prints them (``--json`` for machines). Lag comes from ``XINFO GROUPS``
where Redis has it (7.0+, and not after some deletions); otherwise it is computed by
counting the entries after the group's last-delivered id. ``lag_xinfo`` keeps what
Redis said, NULL included: NULL means "Redis cannot tell", never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from workbench.domain.clock import Clock, SystemClock, now_ms
from workbench.domain.events import AGGREGATE_TYPES
from workbench.handlers import GROUPS
from workbench.streams.connection import server_version
from workbench.streams.groups import dead_letter_count, group_ages
from workbench.streams.keys import StreamNames
from workbench.streams.replies import text

STREAM_COLUMNS = ["stream", "length", "first_id", "last_id", "groups"]
GROUP_COLUMNS = [
    "stream", "group", "consumers", "pending", "oldest_pending_idle_ms",
    "oldest_pending_age_s", "last_delivered_id", "lag", "lag_xinfo", "lag_source", "lag_s",
    "dead_letters",
]  # fmt: skip
CONSUMER_COLUMNS = ["stream", "group", "consumer", "pending", "idle_ms"]


DEAD_LETTER_COLUMNS = ["group", "id", "source_stream", "source_id", "deliveries", "reason"]

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Inspection:
    """One snapshot: rows of plain values (``None`` where Redis has no answer).

    ``simulations.analysis.inspection_frames`` turns it into pandas frames.
    """

    redis_version: str
    streams: Rows
    groups: Rows
    consumers: Rows
    dead_letters: Rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "redis_version": self.redis_version,
            "streams": self.streams,
            "groups": self.groups,
            "consumers": self.consumers,
            "dead_letters": self.dead_letters,
        }


def _records(rows: list[list[Any]], columns: list[str]) -> Rows:
    return [dict(zip(columns, row, strict=True)) for row in rows]


def _count_after(client: redis.Redis, stream: str, last_id: str, page: int = 10_000) -> int:
    count, start = 0, f"({last_id}"
    while True:
        entries = client.xrange(stream, min=start, max="+", count=page)
        count += len(entries)
        if len(entries) < page:
            return count
        start = f"({text(entries[-1][0])}"


def inspect(
    client: redis.Redis,
    names: StreamNames | None = None,
    dead_letter_groups: tuple[str, ...] = GROUPS,
    clock: Clock | None = None,
) -> Inspection:
    """Snapshot every aggregate stream, its groups and consumers, and the dead letters;
    ages on ``clock`` (the wall clock by default; a simulation's in a simulation).

    On a partitioned log (:mod:`workbench.streams.partitions`) every partition's
    stream is a row of its own, named ``<aggregate>:<partition>``; a group's dead
    letters are those of every partition (``names.dead_letters(group)``)."""
    names = names or StreamNames()
    now = now_ms(clock or SystemClock())
    version = ".".join(map(str, server_version(client)))
    dead_counts: dict[str, int] = {}
    stream_rows: list[list[Any]] = []
    group_rows: list[list[Any]] = []
    consumer_rows: list[list[Any]] = []
    for aggregate in AGGREGATE_TYPES:
        for partition in names.partitions:
            label = f"{aggregate}:{partition}" if names.partitioned else aggregate
            key = names.stream(aggregate, partition)
            if not client.exists(key):
                stream_rows.append([label, 0, None, None, 0])
                continue
            stream_rows.append(
                _stream_row(client, key, label, now, names, dead_counts, group_rows, consumer_rows)
            )
    return Inspection(
        redis_version=version,
        streams=_records(stream_rows, STREAM_COLUMNS),
        groups=_records(group_rows, GROUP_COLUMNS),
        consumers=_records(consumer_rows, CONSUMER_COLUMNS),
        dead_letters=_dead_letter_rows(client, names, dead_letter_groups),
    )


def _stream_row(
    client: redis.Redis,
    key: str,
    label: str,
    now: int,
    names: StreamNames,
    dead_counts: dict[str, int],
    group_rows: list[list[Any]],
    consumer_rows: list[list[Any]],
) -> list[Any]:
    """The row of one existing stream; appends its groups' and consumers' rows."""
    info = client.xinfo_stream(key)
    first = info.get("first-entry")
    last = info.get("last-entry")
    groups = client.xinfo_groups(key)
    ages = group_ages(client, key, groups, now)
    for g in groups:
        group = text(g["name"])
        if group not in dead_counts:
            dead_counts[group] = dead_letter_count(client, names, group)
        last_delivered = text(g["last-delivered-id"])
        oldest_idle = None
        if g["pending"]:
            oldest = client.xpending_range(key, group, "-", "+", 1)
            if oldest:
                oldest_idle = int(oldest[0]["time_since_delivered"])
        lag_xinfo = g.get("lag")
        if lag_xinfo is not None:
            lag, source = int(lag_xinfo), "xinfo"
        else:
            lag, source = _count_after(client, key, last_delivered), "computed"
        group_rows.append(
            [
                label, group, int(g["consumers"]), int(g["pending"]), oldest_idle,
                ages[group][0], last_delivered, lag, lag_xinfo, source, ages[group][1],
                dead_counts[group],
            ]
        )  # fmt: skip
        for c in client.xinfo_consumers(key, group):
            consumer_rows.append([label, group, text(c["name"]), int(c["pending"]), int(c["idle"])])
    return [
        label,
        int(info["length"]),
        text(first[0]) if first else None,
        text(last[0]) if last else None,
        len(groups),
    ]


def _dead_letter_rows(client: redis.Redis, names: StreamNames, groups: tuple[str, ...]) -> Rows:
    rows = []
    for group in groups:
        for key in names.dead_letters(group):
            for entry_id, fields in client.xrange(key):
                f = {text(k): text(v) for k, v in fields.items()}
                rows.append(
                    {
                        "group": group,
                        "id": text(entry_id),
                        "source_stream": f.get("source_stream"),
                        "source_id": f.get("source_id"),
                        "deliveries": int(f.get("deliveries", 0)),
                        "reason": f.get("reason"),
                    }
                )
    return rows


# -- terminal ----------------------------------------------------------------------


def _table(rows: Rows, columns: list[str], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        numeric = any(isinstance(r[column], int | float) for r in rows)
        table.add_column(column, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*("NULL" if row[c] is None else str(row[c]) for c in columns))
    return table


def wide_console() -> Console:
    """A console that does not squeeze tables to 80 columns when output is piped."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def print_inspection(result: Inspection, console: Console | None = None) -> None:
    """The snapshot as terminal tables (``workbench inspect``)."""
    console = console or wide_console()
    console.print(f"Redis {result.redis_version}")
    console.print(_table(result.streams, STREAM_COLUMNS, "streams"))
    console.print(_table(result.groups, GROUP_COLUMNS, "consumer groups"))
    if result.consumers:
        console.print(_table(result.consumers, CONSUMER_COLUMNS, "consumers"))
    if result.dead_letters:
        console.print(_table(result.dead_letters, DEAD_LETTER_COLUMNS, "dead letters"))
    else:
        console.print("dead letters: none")
