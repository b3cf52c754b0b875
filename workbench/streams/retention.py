"""Retention: streams trimmed behind every consumer group, and never ahead of one.

One stream per aggregate type (``wb:escrow``, ``wb:payment``, ``wb:payout``,
``wb:dispute``); one dead-letter stream per consumer group (``wb:dead:ledger``).

**Retention.** Streams are trimmed with ``XTRIM MINID ~`` to the oldest of:
the first entry some group has not yet acknowledged (its oldest pending entry,
or the entry after its last-delivered id), and the retention window
(``retention_s``, default 24 h, measured in stream-id time, i.e. Redis's clock).
So trimming never removes an entry a group still has to handle; a lagging
group makes the stream keep more, which :func:`trim` reports as
``held_by_groups``. ``~`` only drops whole internal nodes, so it can trim less
than asked, never more. Groups must exist before entries they should see are
trimmed: :func:`workbench.streams.groups.ensure_groups` runs at setup.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from workbench.streams.replies import id_tuple


def _next_id(entry_id: bytes | str) -> tuple[int, int]:
    ms, seq = id_tuple(entry_id)
    return ms, seq + 1


@dataclass(frozen=True)
class TrimResult:
    stream: str
    min_id: str
    trimmed: int
    held_by_groups: bool


def trim(
    client: redis.Redis,
    stream: str,
    *,
    retention_s: float = 24 * 3600,
    now_ms: int | None = None,
) -> TrimResult:
    """Trim ``stream`` to the retention window without passing any group's unacked entries.

    The window ends at ``now_ms``: Redis' own clock when None (entry ids are Redis
    time), the simulation's when ids come from it.
    """
    if now_ms is None:
        seconds, micros = client.time()
        now_ms = int(seconds) * 1000 + int(micros) // 1000
    window_start = (now_ms - int(retention_s * 1000), 0)
    safe = window_start
    held = False
    try:
        groups = client.xinfo_groups(stream)
        last_generated = id_tuple(client.xinfo_stream(stream)["last-generated-id"])
    except redis.ResponseError:
        groups, last_generated = [], (0, 0)  # no such stream
    for group in groups:
        delivered = id_tuple(group["last-delivered-id"])
        oldest_unacked = _next_id(group["last-delivered-id"])
        if group["pending"]:
            summary = client.xpending(stream, group["name"])
            if summary["min"] is not None:
                oldest_unacked = min(oldest_unacked, id_tuple(summary["min"]))
        elif delivered >= last_generated:
            continue  # caught up: this group holds nothing back
        if oldest_unacked < safe:
            safe = oldest_unacked
            held = True
    min_id = f"{safe[0]}-{safe[1]}"
    trimmed = int(client.xtrim(stream, minid=min_id, approximate=True)) if safe > (0, 0) else 0
    return TrimResult(stream, min_id, trimmed, held)
