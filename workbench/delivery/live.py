"""The live reader: one Redis connection per node feeding the server process's hub.

The fan-out script publishes every user-stream entry on a live channel:
unpartitioned, one channel (``wb:live``, plain Pub/Sub); partitioned, one per
partition (``wb:{<tag>}:live``, sharded Pub/Sub, served by the node that owns
the partition's slot). This reader subscribes once to every channel, over one
connection per node that serves some (one connection on a single
redis-server, :mod:`workbench.delivery.livenodes` makes the plan), and hands
each message to the local :class:`~workbench.delivery.hub.Hub` under the user's
topic, so the number of Redis connections does not grow with the number of
SSE clients.

Redis Pub/Sub is fire-and-forget: while a connection is down, its messages are
lost. So the connections are one unit: when any of them breaks (a connection
error or reset, a killed node, a ``sunsubscribe`` the server pushes when a
failover or a migration takes a channel's slot away from its node), the
reader closes them all, makes the plan again (the slots may have moved) and
resubscribes everything; once every channel is subscribed again it
broadcasts :class:`Resync` to every local session, and each session catches up
from its user stream (the source of truth) before going on. (Also after the
first subscription: a session opened before it may have missed entries.) A
session also notices a single lost message by itself: the next one's ``prev``
is not its cursor (:mod:`workbench.delivery.handoff`).

redis-py subscribes (it tracks the confirmations); from then on the reader
reads each connection's socket itself into redis-py's hiredis parser and
delivers every whole reply (``_pump``), because ``get_message`` per reply
costs more than all the rest of a live message's way to the phone. A watchdog
per connection keeps the liveness rule: quiet ``LIVENESS_S``, pinged; silent
twice as long, dead (every connection re-planned, a Resync follows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

try:  # what redis-py's hiredis reader answers when no whole reply is buffered
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
except ImportError:  # another redis-py: _raw_feed says no, get_message reads
    _NOT_ENOUGH_DATA = None

from workbench.delivery.hub import Hub
from workbench.delivery.livenodes import LiveNodes, LiveSource, Node
from workbench.delivery.userstreams import live_message
from workbench.delivery.wire import LiveEntry
from workbench.streams.connection import outage_backoff, redacted
from workbench.streams.keys import UserStreamNames

log = logging.getLogger(__name__)
#: Seconds of silence after which a live connection is pinged; twice that without an
#: answer, it is taken for dead and every connection is re-planned (a Resync follows).
LIVENESS_S = 5.0
_READ_SIZE = 65536  # bytes per socket read, as redis-py's own


class FeedLost(Exception):
    """The server dropped a subscription (its slot moved), or a connection ended."""


@dataclass(frozen=True)
class Resync:
    """Tell a session to re-read its user stream from its cursor."""

    reason: str


class LiveReader:
    """Subscribe to every live channel and publish each message to the hub.

    ``source`` is where Redis is: a URL, a sync or asyncio client (a
    ``RedisCluster`` too), or node addresses; see
    :meth:`~workbench.delivery.livenodes.LiveNodes.of`.
    """

    def __init__(
        self,
        source: LiveSource | LiveNodes,
        hub: Hub,
        names: UserStreamNames | None = None,
        *,
        liveness_s: float = LIVENESS_S,
    ) -> None:
        self.nodes = LiveNodes.of(source)
        # A connection silent this long is pinged; silent twice as long, it is dead
        # (a lost machine sends no reset, and a new master never had our subscription).
        self.liveness_s = liveness_s
        self.hub = hub
        self.names = names or UserStreamNames()
        self.connected = asyncio.Event()
        self.messages = 0
        self.reconnects = 0
        self.bad_messages = 0
        #: Messages read by :meth:`_pump` (of ``messages``), not through ``get_message``.
        self.drained = 0
        #: Redis connections open now: at most one per node serving a channel.
        self.connections = 0
        self._subscribed_before = False
        self._failures = 0

    @property
    def url(self) -> str | None:
        return self.nodes.url

    @property
    def _where(self) -> str:
        """The server for a message that gets logged: its URL without the password."""
        return redacted(self.url or "")

    async def run(self) -> None:
        """Read until cancelled, reconnecting everything with backoff."""
        backoff = outage_backoff()
        while True:
            try:
                await self._read_all(await self._plan())
            except (RedisError, OSError, FeedLost) as exc:
                self._failures += 1
                log.warning("live reader lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(backoff.compute(self._failures))
            except Exception:
                # A bug, not an outage; but a dead reader would leave every
                # phone of this process on heartbeats alone: start over (a
                # Resync follows), loudly.
                self._failures += 1
                log.exception("live reader failed; reconnecting")
                await asyncio.sleep(backoff.compute(self._failures))
            finally:
                self.connected.clear()

    async def _plan(self) -> dict[Node | None, list[str]]:
        if not self.names.partitioned:
            # One plain channel: a cluster forwards PUBLISH to every node, so any
            # one will do; after a failure, the next one known.
            candidates = self.nodes.candidates
            return {candidates[self._failures % len(candidates)]: [self.names.live_channel()]}
        return await self.nodes.plan(self.names.live_channels)

    async def _read_all(self, plan: dict[Node | None, list[str]]) -> None:
        """Subscribe every group of channels on a connection of its own; read them
        all until one fails (raised), then close every connection."""
        opened: list[tuple[aioredis.client.PubSub, aioredis.Redis]] = []
        tasks: list[asyncio.Task[None]] = []
        waiting = set(plan)  # the groups not yet fully subscribed
        try:
            for node, channels in plan.items():
                client = self.nodes.connect(node)
                pubsub = client.pubsub()
                opened.append((pubsub, client))
                self.connections += 1
                await self._subscribe(pubsub, channels)
                _skip_push_logging(pubsub)
                link = _Link(asyncio.get_running_loop().time())
                tasks.append(asyncio.create_task(self._read(pubsub, node, channels, waiting, link)))
                tasks.append(asyncio.create_task(self._watch(pubsub, node, link)))
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the first failure
            raise FeedLost("every live connection ended")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pubsub, client in opened:
                await _close_quietly(pubsub, client)
                self.connections -= 1

    async def _subscribe(self, pubsub: aioredis.client.PubSub, channels: list[str]) -> None:
        if not self.names.partitioned:
            await pubsub.subscribe(*channels)
            return
        for channel in channels:  # one per command: a cluster refuses several slots at once
            await pubsub.ssubscribe(channel)

    async def _read(
        self,
        pubsub: aioredis.client.PubSub,
        node: Node | None,
        channels: list[str],
        waiting: set[Node | None],
        link: _Link,
    ) -> None:
        """Read one connection: redis-py's ``get_message`` until every channel is
        confirmed, then (with hiredis) :meth:`_pump`."""
        confirmed = 0
        clock = asyncio.get_running_loop().time
        while True:
            message = await pubsub.get_message(timeout=self.liveness_s)
            if message is None:
                if clock() - link.heard >= 2 * self.liveness_s:
                    raise FeedLost(
                        f"{node or self._where} did not answer a ping within {self.liveness_s:g} s"
                    )
                await pubsub.ping()  # its pong, or any message, proves the link alive
                continue
            link.heard = clock()
            kind = message["type"]
            if kind in ("message", "smessage"):
                self._deliver(message["data"])
            elif kind in ("subscribe", "ssubscribe"):
                confirmed += 1
                if confirmed == len(channels):
                    waiting.discard(node)
                    if not waiting:
                        self._on_subscribed()
            elif kind in ("unsubscribe", "sunsubscribe"):
                # Never asked for: the server took the channel's slot away from this node.
                raise FeedLost(
                    f"{node or self._where} dropped {message['channel']!r} "
                    "(its slot moved: a failover or a migration)"
                )
            if confirmed == len(channels):
                feed = _raw_feed(pubsub)
                if feed is not None:
                    await self._pump(*feed, node, link)

    async def _pump(
        self, stream: asyncio.StreamReader, reader: Any, node: Node | None, link: _Link
    ) -> None:
        """Read the subscribed connection's socket straight into its hiredis reader.

        Once every channel is subscribed, redis-py has nothing left to track on
        the connection, and its ``get_message`` costs more per socket read (a
        timeout, a retry wrapper, a dict per reply) than everything else a live
        message goes through. So the bytes are read here, fed to the parser redis-py
        made (it may hold the start of a reply), and every whole reply is
        delivered (:meth:`_deliver_buffered`). Liveness is :meth:`_watch`'s:
        this loop only stamps when it last heard from the server.
        """
        clock = asyncio.get_running_loop().time
        link.pumping = True
        self._deliver_buffered(reader, node)  # what the last get_message read left
        while True:
            data = await stream.read(_READ_SIZE)
            if not data:
                raise FeedLost(f"{node or self._where} closed the connection")
            link.heard = clock()
            reader.feed(data)
            self._deliver_buffered(reader, node)

    def _deliver_buffered(self, reader: Any, node: Node | None) -> None:
        """Deliver every whole reply the hiredis reader holds: RESP2 arrays and RESP3
        pushes alike (``[kind, channel, data]``); a pong needs nothing."""
        # Also False, hiredis' own "not enough data": no pub/sub reply is False, and a
        # reader made without redis-py's marker must not spin the loop forever.
        while (reply := reader.gets()) is not _NOT_ENOUGH_DATA and reply is not False:
            if isinstance(reply, list) and reply:
                kind = reply[0]
                if isinstance(kind, str):  # a client with decode_responses
                    kind = kind.encode()
                if kind in (b"message", b"smessage") and len(reply) == 3:
                    self.drained += 1
                    self._deliver(reply[2])
                elif kind in (b"unsubscribe", b"sunsubscribe"):
                    raise FeedLost(
                        f"{node or self._where} dropped {reply[1]!r} "
                        "(its slot moved: a failover or a migration)"
                    )
            elif isinstance(reply, Exception):  # an error reply: the link is not sane
                raise FeedLost(f"{node or self._where} answered {reply!r}")

    async def _watch(self, pubsub: aioredis.client.PubSub, node: Node | None, link: _Link) -> None:
        """While :meth:`_pump` reads: a connection silent ``liveness_s`` is pinged,
        and one silent twice as long is taken for dead (raised: everything is
        re-planned). Checked every half ``liveness_s``, not per read."""
        clock = asyncio.get_running_loop().time
        while True:
            await asyncio.sleep(self.liveness_s / 2)
            if not link.pumping:
                continue  # get_message's timeout watches the connection until then
            silent = clock() - link.heard
            if silent >= 2 * self.liveness_s:
                raise FeedLost(
                    f"{node or self._where} did not answer a ping within {self.liveness_s:g} s"
                )
            if silent >= self.liveness_s:
                await pubsub.ping()

    def _deliver(self, data: bytes) -> None:
        try:
            user, entry = live_message(data, LiveEntry)
        except (ValueError, TypeError, KeyError) as exc:
            # Not ours to fix; sessions still catch up by the prev chain.
            self.bad_messages += 1
            log.error("unreadable live message %r: %s", data[:200], exc)
            return
        self.messages += 1
        # A LiveEntry, encoded once here: every session of the user writes these bytes.
        self.hub.publish(user, entry)

    def _on_subscribed(self) -> None:
        if self._subscribed_before:
            self.reconnects += 1
        self._subscribed_before = True
        self._failures = 0
        self.connected.set()
        # Also on the first subscription: sessions opened before it may have
        # missed entries appended in between.
        self.hub.broadcast(Resync("live feed (re)connected"))


@dataclass
class _Link:
    """When one connection was last heard from, and whether :meth:`LiveReader._pump`
    reads it (then :meth:`LiveReader._watch` judges its liveness)."""

    heard: float
    pumping: bool = False


def _raw_feed(pubsub: aioredis.client.PubSub) -> tuple[asyncio.StreamReader, Any] | None:
    """The connection's stream and the hiredis reader redis-py parses it with; None
    without hiredis (or a redis-py laid out otherwise): ``get_message`` goes on."""
    parser = getattr(pubsub.connection, "_parser", None)
    stream, reader = getattr(parser, "_stream", None), getattr(parser, "_reader", None)
    if _NOT_ENOUGH_DATA is None or not isinstance(stream, asyncio.StreamReader):
        return None
    if not (hasattr(reader, "feed") and hasattr(reader, "gets")):
        return None
    return stream, reader


async def _pass_through(response: object) -> object:
    return response


def _skip_push_logging(pubsub: aioredis.client.PubSub) -> None:
    """Hand pushed messages straight back, as redis-py's handler does after logging them.

    With hiredis, redis-py's handler for every pushed message looks its logger
    up and formats the whole message for a debug line, whether or not debug is
    on: about a tenth of this reader's CPU per message. A redis-py without that
    attribute is left alone.
    """
    parser = getattr(pubsub.connection, "_parser", None)
    if parser is not None and hasattr(parser, "pubsub_push_handler_func"):
        parser.pubsub_push_handler_func = _pass_through


async def _close_quietly(pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
    for closer in (pubsub.aclose, client.aclose):
        with contextlib.suppress(Exception):  # the connection is already broken
            await closer()
