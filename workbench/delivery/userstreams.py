"""Per-user streams: where a phone's events wait for it.

The fan-out worker appends every event to the stream of each user it
concerns (``wb:user:<user id>``) with one Lua script per event, which also

* dedupes by event id (``wb:fanout:<event id>``, kept as long as user-stream
  history): a worker killed between its appends and its XACK gets the batch
  again and appends nothing twice, because the script is atomic and the
  second run finds the marker;
* records in each entry ``prev``, the id of the entry before it, so readers
  can prove a page or a live message follows on without a gap
  (:mod:`workbench.delivery.handoff`);
* returns the entries it appended (id and ``prev``; none for a duplicate), so
  a caller can keep its own record of every entry ever made (simulations do,
  for the checker, and hand them to phones as their live messages);
* publishes one live message per user entry on a single channel
  (``wb:live``). Each server process reads that channel over one connection
  and fans out locally, so Redis connections stay O(1) per process.

**Partitions** (:class:`~workbench.streams.keys.UserStreamNames` with a
:class:`~workbench.streams.partitions.Partitioning`). A user's stream lives in
the user's partition (``wb:{<tag>}:user:<id>``), and a script may only touch
keys of one cluster slot. So an event runs the script once *per partition of
its users*, each with that partition's marker ``wb:{<tag>}:fanout:<event id>``
and the streams of the event's users there, and publishes with ``SPUBLISH`` on
that partition's live channel ``wb:{<tag>}:live`` (sharded Pub/Sub: the
channel belongs to the slot, and a script may publish on a channel of its own
slot). Each partition's run is atomic and deduplicated on its own: a
redelivered event appends nothing twice anywhere, and a partition whose run
failed (its node was down, a failover, a restarted node that forgot the
script) runs again in full on redelivery while the others find their markers.
Every run of a batch goes in one pipeline (on ``redis.cluster.RedisCluster`` a
``ClusterPipeline``, which routes each ``EVALSHA`` by its keys to the node of
the partition's slot). If any run failed, :meth:`UserStreams.append_entries`
raises :class:`FanoutIncomplete` after the others completed, so the consumer
does not ack the aggregate entry (it acks after ``handle`` returns) and the
group redelivers it.

**When Redis loses writes** (see :mod:`workbench.streams.relay`): what survives a
restart from a shortened AOF is a prefix of the history, so a user stream and
the dedupe markers of the events it lost regress together. When the fan-out
group gets those events again (the relay puts lost aggregate entries back, the
group's regressed position redelivers them), their markers are gone and they
are appended again, with new ids after the last surviving entry and ``prev``
naming it; events whose entries survived keep their markers and are not
appended twice. A phone whose Last-Event-ID was lost can never see such an
entry as "next" (its ``prev`` is not the lost id): it gets ``reset``.

**Retention.** ``XADD ... MAXLEN ~ user_maxlen`` (default 1000 entries per
user) and, with ``max_age_s`` set, ``XTRIM MINID`` to that many seconds of
stream-id time: Redis' clock, or a simulation's when ids come from it
(history by size and by age, like Centrifugo's history size and
TTL). ``~`` trims whole internal nodes (100 entries), so a stream can hold
somewhat more than ``maxlen``; the age trim is exact, because a phone's stream
is usually smaller than one node and ``~`` would never trim it.
The entry just appended is never trimmed, so the ``prev`` chain survives. A
client whose Last-Event-ID fell out of the window gets ``event: reset`` and
resyncs from the snapshot; it is never silently skipped ahead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import msgspec
import redis
import redis.asyncio as aioredis
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from workbench.delivery.entries import UserEntry
from workbench.delivery.wire import encode_entry
from workbench.domain.clock import Clock, now_ms
from workbench.domain.events import Event
from workbench.domain.streamid import MAX_ID, ZERO, StreamId, parse
from workbench.streams.connection import execute, is_cluster, queue_script
from workbench.streams.keys import UserStreamNames

DEFAULT_USER_MAXLEN = 1000
DEFAULT_DEDUPE_TTL_S = 7 * 24 * 3600
#: WAIT's timeout (ms) when the fan-out waits for replicas: a synced replica answers
#: within a round trip; a longer wait means it is behind or gone.
DEFAULT_WAIT_TIMEOUT_MS = 1000

# KEYS[1] dedupe marker; KEYS[2..] user streams (all of one partition).
# ARGV: event_id, type, data, maxlen, dedupe ttl, live channel, max age s,
#       now ms ('': Redis' clock and ids), publish command (PUBLISH or SPUBLISH),
#       user ids...
# With a clock of our own (simulations) entry ids, the age window and the marker's
# lifetime all run on it: the marker holds its expiry in that clock's ms, and EX is
# only its garbage collection.
_FANOUT_LUA = """
-- A duplicate still writes (the marker's own TTL again), so that a WAIT after it,
-- perhaps on another connection than the first run's, covers that first run too.
local function duplicate()
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return {}
end
local now_ms = tonumber(ARGV[8])
if now_ms then
  local seen = redis.call('GET', KEYS[1])
  if seen and tonumber(seen) and tonumber(seen) > now_ms then return duplicate() end
  redis.call('SET', KEYS[1], string.format('%.0f', now_ms + tonumber(ARGV[5]) * 1000),
    'EX', ARGV[5])
elseif not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[5]) then
  return duplicate()
end
local ids = {}
local min_id = nil
if tonumber(ARGV[7]) > 0 then
  local ms = now_ms
  if not ms then
    local now = redis.call('TIME')
    ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  end
  min_id = string.format('%.0f-0', ms - math.floor(tonumber(ARGV[7]) * 1000))
end
for i = 2, #KEYS do
  local last = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
  local prev = '0-0'
  if #last > 0 then prev = last[1][1] end
  local id = '*'
  if now_ms then
    local dash = string.find(prev, '-', 1, true)
    local pms = tonumber(string.sub(prev, 1, dash - 1))
    if now_ms > pms then
      id = string.format('%.0f-0', now_ms)
    else
      id = string.format('%.0f-%.0f', pms, tonumber(string.sub(prev, dash + 1)) + 1)
    end
  end
  id = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[4], id,
    'event_id', ARGV[1], 'type', ARGV[2], 'prev', prev, 'data', ARGV[3])
  if min_id then redis.call('XTRIM', KEYS[i], 'MINID', min_id) end
  redis.call(ARGV[9], ARGV[6],
    cjson.encode({ARGV[8 + i], id, prev, ARGV[1], ARGV[2], ARGV[3]}))
  ids[#ids + 1] = id
  ids[#ids + 1] = prev
end
return ids
"""


class FanoutIncomplete(Exception):
    """Some partition's run of the fan-out script failed; the others completed.

    ``appended`` is what :meth:`UserStreams.append_entries` would have returned,
    without the failed runs' entries; ``errors`` are their exceptions. Raised so
    the consumer does not ack: on redelivery the failed runs run again and the
    completed ones find their markers.
    """

    def __init__(
        self, appended: list[list[tuple[str, UserEntry]]], errors: list[Exception]
    ) -> None:
        super().__init__(f"{len(errors)} fan-out script run(s) failed; first: {errors[0]!r}")
        self.appended = appended
        self.errors = errors


class NotReplicated(redis.TimeoutError):
    """``WAIT`` timed out: a node has the batch's entries but not yet its replicas.

    On a cluster the aggregate entry is acked on its own partition's node while
    the user-stream entries live on others: if a master failed over before its
    replica had them, they would be lost and never redelivered. So with
    ``wait_replicas`` the batch is acked only once every node it wrote to says
    its replicas have it; otherwise this is raised (a Redis outage to the
    consumer: the entries stay pending and come back, where the markers dedupe
    what survived and what a failover lost is appended again). ``appended`` is
    what the batch appended, as :meth:`UserStreams.append_entries` returns it.
    """

    def __init__(self, appended: list[list[tuple[str, UserEntry]]], nodes: list[str]) -> None:
        super().__init__(f"WAIT: replicas of {', '.join(nodes)} did not confirm the fan-out")
        self.appended = appended
        self.nodes = nodes


@dataclass(frozen=True)
class _Run:
    """One run of the script: an event's users of one partition."""

    event: int  # index in the batch
    partition: int
    users: list[str]


class UserStreams:
    """Append side (sync, used by the fan-out worker).

    ``client`` is a ``redis.Redis`` or, for a partitioned log on Redis Cluster,
    a ``redis.cluster.RedisCluster``; the key names come from ``names``.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        names: UserStreamNames | None = None,
        *,
        maxlen: int = DEFAULT_USER_MAXLEN,
        dedupe_ttl_s: int = DEFAULT_DEDUPE_TTL_S,
        max_age_s: float = 0.0,
        clock: Clock | None = None,
        wait_replicas: int = 0,
        wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS,
    ) -> None:
        if maxlen < 1:
            raise ValueError("user stream maxlen must be at least 1")
        if wait_replicas < 0 or wait_timeout_ms < 1:
            raise ValueError("wait_replicas must be >= 0 and wait_timeout_ms >= 1")
        if max_age_s < 0:
            raise ValueError("user stream max age must not be negative (0: no limit)")
        self.client = client
        self.names = names or UserStreamNames()
        self.maxlen = maxlen
        self.dedupe_ttl_s = dedupe_ttl_s
        self.max_age_s = max_age_s
        # None: Redis' clock and ids (production); a simulation's clock: ids, the age
        # window and dedupe lifetimes on simulation time (workbench.domain.streamid.next_id).
        self.clock = clock
        self._sha = hashlib.sha1(_FANOUT_LUA.encode()).hexdigest()
        # Sharded Pub/Sub when partitioned: a channel per slot, publishable from
        # a script of that slot (plain PUBLISH would reach every cluster node).
        self._publish = "SPUBLISH" if self.names.partitioned else "PUBLISH"
        # Replicas that must have a batch before it is acked (NotReplicated); 0: none.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._unreplicated: list[str] = []  # nodes whose WAIT fell short in this batch

    def append(self, events: list[tuple[Event, bytes]]) -> list[int]:
        """Append each (event, encoded envelope) to its users' streams, atomically per
        event and partition; return per event the number of entries appended (0: a
        duplicate)."""
        return [len(entries) for entries in self.append_entries(events)]

    def append_entries(
        self, events: list[tuple[Event, bytes]]
    ) -> list[list[tuple[str, UserEntry]]]:
        """:meth:`append`, returning per event the (user, entry) pairs appended, in the
        order of the event's users: each entry as a reader of the user's stream (or its
        live message) has it. :class:`FanoutIncomplete` if a partition's run failed."""
        if not events:
            return []
        self._unreplicated = []
        runs = [
            _Run(i, partition, users)
            for i, (event, _) in enumerate(events)
            for partition, users in _by_partition(self.names, _users(event)).items()
        ]
        replies = self._run_all(events, runs)
        made: list[dict[str, UserEntry]] = [{} for _ in events]
        errors = []
        for run, reply in zip(runs, replies, strict=True):
            if isinstance(reply, Exception):
                errors.append(reply)
                continue
            event, data = events[run.event]
            for user, id_, prev in zip(run.users, reply[0::2], reply[1::2], strict=False):
                made[run.event][user] = UserEntry(
                    parse(id_), parse(prev), event.event_id, event.type, data.decode()
                )
        out = [
            [(u, entries[u]) for u in _users(event) if u in entries]
            for (event, _), entries in zip(events, made, strict=True)
        ]
        if errors:
            raise FanoutIncomplete(out, errors)
        if self._unreplicated:
            raise NotReplicated(out, self._unreplicated)
        return out

    def _run_all(self, events: list[tuple[Event, bytes]], runs: list[_Run]) -> list[Any]:
        """Every run's reply (or its exception), in one pipeline; runs a node
        answered NOSCRIPT to (a restarted node, a promoted replica) once more."""
        replies = self._pipeline(events, runs)
        again = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if again:
            # SCRIPT LOAD reaches every primary of a cluster. A run that said
            # NOSCRIPT did nothing; the others are not repeated.
            self._sha = self.client.script_load(_FANOUT_LUA)
            retried = self._pipeline(events, [runs[i] for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        return replies

    def _pipeline(self, events: list[tuple[Event, bytes]], runs: list[_Run]) -> list[Any]:
        # EVALSHA directly: redis-py's Script in a pipeline asks SCRIPT EXISTS on
        # every execute, an extra round trip per batch (queue_script: why not evalsha).
        pipe = self.client.pipeline(transaction=False)
        now = "" if self.clock is None else now_ms(self.clock)
        for run in runs:
            event, data = events[run.event]
            keys = [self.names.fanout_marker(event.event_id, run.partition)] + [
                self.names.stream(u) for u in run.users
            ]
            queue_script(
                pipe,
                self.client,
                self._sha,
                keys,
                event.event_id,
                event.type,
                data,
                self.maxlen,
                self.dedupe_ttl_s,
                self.names.live_channel(run.partition),
                self.max_age_s,
                now,
                self._publish,
                *run.users,
            )
        waits = self._queue_waits(pipe, runs, events)
        replies = list(execute(self.client, pipe, raise_on_error=False))
        scripts, confirmed = replies[: len(runs)], replies[len(runs) :]
        for node, count in zip(waits, confirmed, strict=True):
            short = isinstance(count, Exception) or int(count) < self.wait_replicas
            if short and node not in self._unreplicated:  # a NOSCRIPT rerun waits again
                self._unreplicated.append(node)
        return scripts

    def _queue_waits(
        self, pipe: Any, runs: list[_Run], events: list[tuple[Event, bytes]]
    ) -> list[str]:
        """Queue ``WAIT`` on every node the runs write to (after their scripts, on the
        same connection); return the nodes' names, in the order of the replies."""
        if not self.wait_replicas or not runs:
            return []
        if not is_cluster(self.client):
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
            return ["redis"]
        nodes = {}
        for run in runs:
            key = self.names.fanout_marker(events[run.event][0].event_id, run.partition)
            node = self.client.get_node_from_key(key)
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(
                "WAIT", self.wait_replicas, self.wait_timeout_ms, target_nodes=node
            )
        return list(nodes)


def _by_partition(names: UserStreamNames, users: list[str]) -> dict[int, list[str]]:
    """The users of each partition, in their order, partitions in order of first user."""
    groups: dict[int, list[str]] = {}
    for user in users:
        groups.setdefault(names.partition_of(user), []).append(user)
    return groups


def _users(event: Event) -> list[str]:
    return list(dict.fromkeys(event.user_ids))


# -- reading (async, used by the HTTP server) ---------------------------------------


class Page(Sequence[UserEntry]):
    """A page of a user stream as Redis sent it: rows ``(id, {field: value})`` kept raw.

    Still a sequence of :class:`UserEntry` (an entry is made when asked for), so
    the handoff checks a page as it does a list: ``page[0].prev``,
    ``page[-1].id``, ``len(page)``. A server replaying it asks for :meth:`frames`
    only, which writes the SSE frames from the raw bytes: no entry, no parsed id
    per row (what a page's entries cost the replay otherwise; bench/sse.py
    measures it). The frames are byte for byte those of
    :func:`workbench.delivery.wire.encode_page` over the entries (a test holds
    them together).
    """

    __slots__ = ("rows",)

    def __init__(self, rows: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, index: int) -> UserEntry: ...
    @overload
    def __getitem__(self, index: slice) -> list[UserEntry]: ...
    def __getitem__(self, index: int | slice) -> UserEntry | list[UserEntry]:
        if isinstance(index, slice):
            return [entry_from_fields(i, f) for i, f in self.rows[index]]
        return entry_from_fields(*self.rows[index])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Page({len(self.rows)} entries)"

    def frames(self) -> bytes:
        """The page as one SSE body chunk: ``id``, ``event``, ``data`` per entry."""
        parts: list[bytes] = []
        for entry_id, fields in self.rows:
            type_, data = fields[b"type"], fields[b"data"]
            if b"\n" in data or b"\r" in data or b"\n" in type_ or b"\r" in type_:
                parts.append(encode_entry(entry_from_fields(entry_id, fields)))
                continue
            parts += (b"id: ", entry_id, b"\r\nevent: ", type_, b"\r\ndata: ", data, b"\r\n\r\n")
        return b"".join(parts)


def entry_from_fields(entry_id: bytes | str, fields: dict[bytes, bytes]) -> UserEntry:
    return UserEntry(
        id=parse(entry_id),
        prev=parse(fields[b"prev"]),
        event_id=fields[b"event_id"].decode(),
        type=fields[b"type"].decode(),
        data=fields[b"data"].decode(),
    )


#: The live message as the fan-out script encodes it: six strings, checked as decoded
#: (msgspec: every live message of a server process goes through here).
_LIVE_MESSAGE = msgspec.json.Decoder(tuple[str, str, str, str, str, str])


def live_message(raw: bytes | str, make: type[UserEntry] = UserEntry) -> tuple[str, UserEntry]:
    """Decode a message of the live channel: (user id, entry), the entry made by ``make``
    (a subclass, such as the live reader's entry that carries its encoded frame).
    :class:`ValueError` names what is wrong with one that is not six strings."""
    try:
        user, entry_id, prev, event_id, type_, data = _LIVE_MESSAGE.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a live message: {exc}") from None
    return user, make(parse(entry_id), parse(prev), event_id, type_, data)


# KEYS[1] a user stream; ARGV: the page's start ("(cursor"), the cursor, count, end.
_FIRST_PAGE_LUA = """
local page = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[4], 'COUNT', ARGV[3])
local itself = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2], 'COUNT', 1)
return {page, #itself}
"""


class UserStreamReader:
    """Read side: tail, existence and pages after a cursor (async; ``client`` may be
    a ``redis.asyncio.RedisCluster`` on a partitioned log)."""

    def __init__(
        self, client: aioredis.Redis | aioredis.RedisCluster, names: UserStreamNames | None = None
    ) -> None:
        self.client = client
        self.names = names or UserStreamNames()

    async def tail(self, user_id: str) -> StreamId:
        """The id of the user's newest entry (``0-0`` if none)."""
        last = await self.client.xrevrange(self.names.stream(user_id), "+", "-", count=1)
        return parse(last[0][0]) if last else ZERO

    async def page_after(self, user_id: str, cursor: StreamId, count: int) -> list[UserEntry]:
        """Up to ``count`` entries strictly after ``cursor``."""
        start, end = _after(cursor)
        rows = await self.client.xrange(self.names.stream(user_id), start, end, count=count)
        return [entry_from_fields(entry_id, fields) for entry_id, fields in rows]

    async def first_page_and_exists(
        self, user_id: str, cursor: StreamId, count: int
    ) -> tuple[Page, bool]:
        """The first page after ``cursor`` and whether ``cursor`` is an entry, read together."""
        key = self.names.stream(user_id)
        if isinstance(self.client, aioredis.RedisCluster):
            # redis-py's asyncio cluster runs a MULTI's commands on event loops of
            # their own (in threads), which breaks its connections; one script
            # of one key reads both as atomically.
            start, end = _after(cursor)
            reply = await self.client.eval(_FIRST_PAGE_LUA, 1, key, start, str(cursor), count, end)
            rows, itself = reply
            return Page([(i, dict(zip(f[::2], f[1::2], strict=True))) for i, f in rows]), bool(
                itself
            )
        pipe = self.client.pipeline(transaction=True)
        queue_first_page(pipe, key, cursor, count)
        return first_page_from(await pipe.execute())


def queue_first_page(pipe: Any, key: str, cursor: StreamId, count: int) -> None:
    """Queue a session's first read on a pipeline (sync or asyncio): the page
    after ``cursor`` and ``cursor`` itself; :func:`first_page_from` reads the replies."""
    start, end = _after(cursor)
    pipe.xrange(key, start, end, count=count)
    pipe.xrange(key, str(cursor), str(cursor), count=1)


def _after(cursor: StreamId) -> tuple[str, str]:
    """XRANGE's start and end for the entries strictly after ``cursor``. Nothing
    follows the largest id, and Redis refuses an exclusive range from it (a client
    may send it as Last-Event-ID): a range that ends before it starts, read empty."""
    if cursor == MAX_ID:
        return str(cursor), "-"
    return f"({cursor}", "+"


def first_page_from(replies: list[Any]) -> tuple[Page, bool]:
    """(the first page, whether the cursor is an entry) from :func:`queue_first_page`'s replies."""
    rows, itself = replies
    return Page(rows), bool(itself)
