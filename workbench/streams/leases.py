"""Leases: which live member reads, or publishes, which partition of the log.

A partition (:mod:`workbench.streams.partitions`) must be read by one consumer
of a group at a time, or two consumers could hand one escrow's events to the
handler out of order; and published by one relay at a time, or two relays
could interleave an escrow's rows. The members of a role (a group's workers,
or the relays) already beat into the role's heartbeat hash. From the live
members it sees, each member computes the same *target* assignment
(:func:`assign`: partitions dealt round-robin over the members sorted by name,
so every member has ``P / members`` of them, give or take one), and then moves
towards it through one lease key per partition
(``wb:{<tag>}:lease:<role>``, :meth:`~workbench.streams.keys.StreamNames.lease`):

* it **takes** a target partition whose lease is free, expired, or its own
  (:data:`TAKE_LUA`: one atomic check-and-set, so two members never both
  succeed) and renews every lease it holds at each step;
* it **gives back** a held partition that is no longer its target, *after*
  finishing what it read from it (:data:`GIVE_LUA`: deletes the lease only if
  it is still its own), so its successor starts where it stopped;
* a member that dies simply stops renewing: once its leases expire the
  partitions' new targets take them.

A lease's value is ``<member> <expiry>``, the expiry on the *member's clock*
(not Redis' ``PX``), so in a simulation leases expire in simulation time like
every other decision. Within one lease time after a membership change a
partition can be nobody's (its old holder has not yet given it back, or died);
never two members'. The relay goes further and checks its lease inside the
script that publishes (:mod:`workbench.streams.relay`), so a relay that lost
its lease while paused cannot write.

The assignment is pure (:func:`assign`, :func:`live_members`); :class:`Leases`
is the thin Redis part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis

#: KEYS[1] the lease; ARGV: member, now, expiry. Takes or renews the lease when it
#: is free, expired or the member's own; returns 1 if the member holds it now.
TAKE_LUA = """
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, ' ', 1, true)
  local holder = string.sub(v, 1, sep - 1)
  if holder ~= ARGV[1] and tonumber(string.sub(v, sep + 1)) > tonumber(ARGV[2]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[3])
return 1
"""

#: KEYS[1] the lease; ARGV[1] member. Deletes the lease if it is still the member's.
GIVE_LUA = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def live_members(
    heartbeats: Mapping[str, float], *, me: str, now: float, dead_after_s: float
) -> list[str]:
    """Members whose last beat is at most ``dead_after_s`` old, and ``me`` always."""
    live = {name for name, at in heartbeats.items() if now - at <= dead_after_s}
    live.add(me)
    return sorted(live)


def assign(members: Iterable[str], count: int) -> dict[str, tuple[int, ...]]:
    """Deal partitions ``0..count-1`` round-robin over ``members`` sorted by name."""
    ordered = sorted(set(members))
    if not ordered:
        return {}
    dealt: dict[str, list[int]] = {m: [] for m in ordered}
    for p in range(count):
        dealt[ordered[p % len(ordered)]].append(p)
    return {m: tuple(ps) for m, ps in dealt.items()}


def lease_value(member: str, expiry: float) -> str:
    """What a lease key holds: ``<member> <expiry>`` (member names have no spaces)."""
    return f"{member} {expiry!r}"


@dataclass
class Leases:
    """The partitions one member holds for one role, kept through lease keys.

    ``keys[p]`` is partition ``p``'s lease key. :meth:`sync` takes and renews
    the target partitions and returns which are held; :meth:`give` gives some
    back. Lease keys of different partitions live in different cluster slots,
    so each is its own command (a pipeline on a single server).
    """

    client: redis.Redis
    keys: list[str]
    member: str
    ttl_s: float
    held: frozenset[int] = field(default=frozenset())

    def __post_init__(self) -> None:
        if " " in self.member:
            raise ValueError(f"a lease member's name has no spaces: {self.member!r}")
        self._take = self.client.register_script(TAKE_LUA)
        self._give = self.client.register_script(GIVE_LUA)

    def sync(self, targets: Iterable[int], now: float) -> frozenset[int]:
        """Take or renew each target partition's lease; return the ones now held.

        Held partitions that are no longer targets are kept (renewed) until
        :meth:`give` hands them back, so their reader can finish first.
        """
        wanted = sorted(set(targets) | self.held)
        expiry = repr(now + self.ttl_s)
        replies = [
            self._take(keys=[self.keys[p]], args=[self.member, repr(now), expiry]) for p in wanted
        ]
        self.held = frozenset(p for p, ok in zip(wanted, replies, strict=True) if int(ok))
        return self.held

    def give(self, partitions: Iterable[int]) -> None:
        """Give back the leases of ``partitions`` (those still this member's)."""
        for p in sorted(set(partitions) & self.held):
            self._give(keys=[self.keys[p]], args=[self.member])
        self.held = self.held - frozenset(partitions)

    def give_all(self) -> None:
        self.give(self.held)
