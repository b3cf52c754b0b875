"""Design 1: broker fan-out only (Redis Pub/Sub, no log).

The shape of the two-layer design with every log taken out, so the two
differ only in that:

* the **producer** PUBLISHes each event on its aggregate topic
  (``<prefix>:ps:escrow``) instead of XADDing it to the aggregate stream;
* the **bridge** (the fan-out step) SUBSCRIBEs to the topic and PUBLISHes each
  event on the channel of every user it concerns (``<prefix>:ps:user:<id>``),
  one pipeline per event, from a second connection (a subscribed connection
  cannot publish);
* each **phone** holds its own SUBSCRIBE connection on its user channel.

Pub/Sub keeps nothing: what is published while the bridge is down has no
subscriber and is gone (PUBLISH answers 0; we count those as
``published_unheard``, the one trace an operator could have), and what is
published on a user channel while that phone is offline is gone too. A
reconnecting phone has nothing to send and nothing to be sent: it resumes
from whatever is published next.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from simulations.designs.base import Client, Design, Inbox, RunContext, close_quietly, stop_task
from workbench.domain import events as ev


async def _subscribed(ctx: RunContext, role: str, channel: str) -> tuple[aioredis.Redis, object]:
    """A connection subscribed to ``channel``, returned once Redis confirmed it."""
    conn = ctx.connect(role)
    pubsub = conn.pubsub()
    await pubsub.subscribe(channel)
    while True:
        message = await pubsub.get_message(timeout=None)
        if message is not None and message["type"] == "subscribe":
            return conn, pubsub


class _Bridge:
    """The fan-out step: topic -> user channels. Crashes at its next message once armed."""

    def __init__(self, ctx: RunContext, topic: str, channel_of: dict[str, str]) -> None:
        self.ctx = ctx
        self.topic = topic
        self.channel_of = channel_of
        self.armed = False
        self.forwarded = 0
        self.dropped_in_crash = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.armed = False
        self._sub, self._pubsub = await _subscribed(self.ctx, "bridge", self.topic)
        self._pub = self.ctx.connect("bridge")
        await self._pub.ping()  # connect now, not at the first event
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                message = await self._pubsub.get_message(timeout=None)  # type: ignore[attr-defined]
                if message is None or message["type"] != "message":
                    continue
                event = ev.decode(message["data"])
                if self.armed and self.ctx.schedule.crash_point == "after-read":
                    self.dropped_in_crash += 1
                    return  # died holding it: nobody will ever publish it
                pipe = self._pub.pipeline(transaction=False)
                for user in dict.fromkeys(event.user_ids):
                    pipe.publish(self.channel_of[user], message["data"])
                await pipe.execute()
                self.forwarded += 1
                if self.armed:
                    return  # after-effect: died after handing it on
        finally:
            await close_quietly(self._pubsub.aclose, self._sub.aclose, self._pub.aclose)  # type: ignore[attr-defined]

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def stop(self) -> None:
        await stop_task(self._task)  # its finally closes the connections
        self._task = None


class _Subscriber(Client):
    """A phone with its own SUBSCRIBE connection on its user channel."""

    def __init__(self, ctx: RunContext, inbox: Inbox, channel: str) -> None:
        super().__init__(ctx, inbox)
        self.channel = channel
        self._task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        self._conn, self._pubsub = await _subscribed(self.ctx, "client", self.channel)
        self.inbox.connects += 1
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self._pubsub.get_message(timeout=None)  # type: ignore[attr-defined]
            if message is not None and message["type"] == "message":
                self.inbox.take(message["data"])

    async def disconnect(self) -> None:
        if self._task is None:
            return
        await stop_task(self._task)
        self._task = None
        await close_quietly(self._pubsub.aclose, self._conn.aclose)  # type: ignore[attr-defined]


class PubSubOnly(Design):
    """Producer -> topic -> bridge -> one channel per user -> one subscriber per phone."""

    name = "pubsub_only"

    async def start(self, ctx: RunContext) -> None:
        await super().start(ctx)
        self.topic = f"{ctx.prefix}:ps:escrow"
        self.channel_of = {u: f"{ctx.prefix}:ps:user:{u}" for u in ctx.schedule.users}
        self.published_unheard = 0
        self._producer = ctx.connect("producer")
        await self._producer.ping()
        self._bridge = _Bridge(ctx, self.topic, self.channel_of)
        await self._bridge.start()

    async def publish(self, event: ev.Event) -> None:
        receivers = await self._producer.publish(self.topic, ev.encode(event))
        if receivers == 0:
            self.published_unheard += 1

    def client(self, inbox: Inbox) -> Client:
        assert self.ctx is not None
        return _Subscriber(self.ctx, inbox, self.channel_of[inbox.user])

    async def worker_down(self) -> None:
        self._bridge.armed = True

    async def worker_up(self) -> None:
        await self._bridge.restart()

    def extra(self) -> dict[str, float]:
        return {
            "published_unheard": float(self.published_unheard),
            "dropped_in_crash": float(self._bridge.dropped_in_crash),
        }

    async def stop(self) -> None:
        await self._bridge.stop()
        await close_quietly(self._producer.aclose)
