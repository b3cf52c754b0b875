"""The event log on Redis Streams: appends on a clock, groups, retention, ages.

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
trimmed: :func:`ensure_groups` runs at setup.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from workbench.domain.streamid import parse
from workbench.streams.replies import id_tuple, text

#: A Lua function for scripts that append: ``next_id(key, now_ms)`` is ``*`` (Redis'
#: clock) when ``now_ms`` is '', else the next id after the stream's last entry on
#: that clock, as :func:`workbench.domain.streamid.next_id` gives it (simulations).
XADD_AT_LUA = """
local function next_id(key, now)
  local ms = tonumber(now)
  if not ms then return '*' end
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last == 0 then return string.format('%.0f-0', ms) end
  local dash = string.find(last[1][1], '-', 1, true)
  local lms = tonumber(string.sub(last[1][1], 1, dash - 1))
  if ms > lms then return string.format('%.0f-0', ms) end
  return string.format('%.0f-%.0f', lms, tonumber(string.sub(last[1][1], dash + 1)) + 1)
end
"""
_XADD_AT = XADD_AT_LUA + (
    "return redis.call('XADD', KEYS[1], next_id(KEYS[1], ARGV[1]), unpack(ARGV, 2))"
)


def xadd_at(pipe: Any, key: str, fields: dict[str, Any], now_ms: int | None) -> None:
    """Queue an XADD of ``fields`` to ``key``: id ``*``, or the next after its last entry
    at ``now_ms`` of a simulation's clock."""
    flat = [part for item in fields.items() for part in item]
    pipe.eval(_XADD_AT, 1, key, "" if now_ms is None else now_ms, *flat)


def ensure_groups(client: redis.Redis, streams: list[str], group: str) -> None:
    """Create ``group`` on each stream (from the start, creating the stream)."""
    for stream in streams:
        try:
            client.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise


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


def group_ages(
    client: redis.Redis, stream: str, groups: list[dict[Any, Any]], now: int
) -> dict[str, tuple[float | None, float]]:
    """Per group of ``stream`` (its ``XINFO GROUPS`` rows): the age in seconds at
    ``now`` (ms) of its oldest pending entry (None: nothing pending) and its lag in
    seconds (the age of the oldest entry not yet delivered to it; 0: none)."""
    pipe = client.pipeline(transaction=False)
    for g in groups:
        pipe.xpending_range(stream, text(g["name"]), "-", "+", 1)
        pipe.xrange(stream, f"({text(g['last-delivered-id'])}", "+", count=1)
    replies = pipe.execute() if groups else []
    ages: dict[str, tuple[float | None, float]] = {}
    for i, g in enumerate(groups):
        oldest, undelivered = replies[2 * i], replies[2 * i + 1]
        pending_age = _age_s(oldest[0]["message_id"], now) if oldest else None
        lag_s = _age_s(undelivered[0][0], now) if undelivered else 0.0
        ages[text(g["name"])] = (pending_age, lag_s)
    return ages


def _age_s(entry_id: Any, now: int) -> float:
    return max(0.0, (now - parse(text(entry_id)).ms) / 1000)
