"""The live reader: one Redis connection per server process feeding the hub.

The fan-out script publishes every user-stream entry on one channel
(``wb:live``). This reader subscribes to it once and hands each message to the
local :class:`~workbench.delivery.hub.Hub` under the user's topic, so the number of
Redis connections does not grow with the number of SSE clients.

Redis Pub/Sub is fire-and-forget: while this connection is down, messages are
lost. So whenever the subscription is (re)established after the first time,
the reader broadcasts :class:`Resync` to every local session, and each session
catches up from its user stream (the source of truth) before going on. A
session also notices a single lost message by itself: the next one's ``prev``
is not its cursor (:mod:`workbench.delivery.handoff`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from workbench.delivery.hub import Hub
from workbench.delivery.userstreams import live_message
from workbench.streams.connection import outage_backoff
from workbench.streams.keys import UserStreamNames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resync:
    """Tell a session to re-read its user stream from its cursor."""

    reason: str


class LiveReader:
    """Subscribe to the live channel and publish each message to the hub."""

    def __init__(self, url: str, hub: Hub, names: UserStreamNames | None = None) -> None:
        self.url = url
        self.hub = hub
        self.names = names or UserStreamNames()
        self.connected = asyncio.Event()
        self.messages = 0
        self.reconnects = 0
        self.bad_messages = 0
        self._subscribed_before = False

    def _client(self) -> aioredis.Redis:
        # No automatic retries: redis-py would reconnect and resubscribe
        # silently, and we must know when messages may have been lost.
        return aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=2.0,
            socket_timeout=None,
            retry=Retry(NoBackoff(), 0),
        )

    async def run(self) -> None:
        """Read until cancelled, reconnecting with backoff."""
        backoff = outage_backoff()
        failures = 0
        while True:
            client = self._client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.names.live_channel())
                failures = 0
                await self._read(pubsub)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                failures += 1
                self.connected.clear()
                log.warning("live reader lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(backoff.compute(failures))
            finally:
                self.connected.clear()
                await _close_quietly(pubsub, client)

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind == "subscribe":
                self._on_subscribed()
            elif kind == "message":
                try:
                    user, entry = live_message(message["data"])
                except (ValueError, TypeError, KeyError) as exc:
                    # Not ours to fix; sessions still catch up by the prev chain.
                    self.bad_messages += 1
                    log.error("unreadable live message %r: %s", message["data"][:200], exc)
                    continue
                self.messages += 1
                self.hub.publish(user, entry)

    def _on_subscribed(self) -> None:
        if self._subscribed_before:
            self.reconnects += 1
        self._subscribed_before = True
        self.connected.set()
        # Also on the first subscription: sessions opened before it may have
        # missed entries appended in between.
        self.hub.broadcast(Resync("live feed (re)connected"))


async def _close_quietly(pubsub: aioredis.client.PubSub, client: aioredis.Redis) -> None:
    for closer in (pubsub.aclose, client.aclose):
        with contextlib.suppress(Exception):  # the connection is already broken
            await closer()
