"""Appends whose entry ids follow a clock of ours: ``*`` in production, simulation time in the lab.

Redis gives an appended entry the id ``<now ms>-<seq>`` on *its* clock. A
simulation runs on virtual time, so every id it causes must be on that clock
too (one clock: the same run gives the same tables at any machine speed).
:data:`XADD_AT_LUA` is the Lua function the runtime's append scripts share:
``next_id(key, now_ms)`` is ``*`` when ``now_ms`` is empty, else the next id
after the stream's last entry at ``now_ms``, as
:func:`workbench.domain.streamid.next_id` computes it.
"""

from __future__ import annotations

from typing import Any

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
