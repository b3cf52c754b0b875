"""The in-process pubsub hub: fan messages out to local subscribers by topic.

A topic (here, a user id) has a set of :class:`Subscription`\\ s; each owns a
bounded queue. :meth:`Hub.publish` never blocks and never awaits: it queues the
message for every subscriber of the topic, and a subscriber whose queue is
already full is disconnected (its backlog dropped) rather than slowing the
publisher or growing without bound. A disconnected client reconnects and
resumes from its ``Last-Event-ID``, so nothing is lost that it cannot re-read.

Memory is therefore bounded by ``max_queue`` messages per subscriber. The hub
is not thread-safe: call it from the event loop's thread.
"""

from __future__ import annotations

import asyncio

# Queued by close() so that a getter already waiting on the queue wakes up.
_CLOSED = object()


class SubscriptionClosed(Exception):
    """The subscription was closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One subscriber's view of a topic. Obtain with :meth:`Hub.subscribe`."""

    def __init__(self, hub: Hub, topic: str, max_queue: int) -> None:
        self.topic = topic
        self.closed_reason: str | None = None
        self._hub = hub
        self._queue: asyncio.Queue[object] = asyncio.Queue(maxsize=max_queue)

    async def get(self) -> object:
        """The next message; :class:`SubscriptionClosed` once closed, even if waiting."""
        self._raise_if_closed()
        message = await self._queue.get()
        if message is _CLOSED:
            # Put it back so any other task waiting on this subscription wakes too.
            self._queue.put_nowait(_CLOSED)
        # Also covers a close() between this task being handed a message and
        # resuming: once closed, the backlog is dropped, that message included.
        self._raise_if_closed()
        return message

    def get_nowait(self) -> object:
        """The next message if one is queued, else :class:`asyncio.QueueEmpty`."""
        self._raise_if_closed()
        return self._queue.get_nowait()

    def qsize(self) -> int:
        """Messages waiting to be read (0 once closed: the backlog is dropped)."""
        return 0 if self.closed_reason is not None else self._queue.qsize()

    def close(self, reason: str = "unsubscribed") -> None:
        """Stop delivery, drop the backlog and wake any waiting getter. Idempotent."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._hub._remove(self)
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(_CLOSED)

    def _offer(self, message: object) -> bool:
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def _raise_if_closed(self) -> None:
        if self.closed_reason is not None:
            raise SubscriptionClosed(self.closed_reason)

    def __repr__(self) -> str:
        state = "open" if self.closed_reason is None else f"closed: {self.closed_reason}"
        return f"<Subscription topic={self.topic!r} {state}>"


class Hub:
    """Topic -> local subscribers, each with a queue of at most ``max_queue`` messages."""

    def __init__(self, max_queue: int = 1000) -> None:
        # asyncio.Queue(maxsize=0) is unbounded, which would void the memory bound.
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.max_queue = max_queue
        self.dropped_slow = 0
        self._topics: dict[str, set[Subscription]] = {}

    def subscribe(self, topic: str) -> Subscription:
        subscription = Subscription(self, topic, self.max_queue)
        self._topics.setdefault(topic, set()).add(subscription)
        return subscription

    def publish(self, topic: str, message: object) -> int:
        """Queue ``message`` for the topic's subscribers; return how many got it."""
        # A copy: disconnecting a slow subscriber mutates the set.
        return self._deliver(tuple(self._topics.get(topic, ())), message)

    def broadcast(self, message: object) -> int:
        """Queue ``message`` for every subscriber of every topic."""
        everyone = tuple(s for subs in self._topics.values() for s in subs)
        return self._deliver(everyone, message)

    def topics(self) -> int:
        """Topics with at least one subscriber."""
        return len(self._topics)

    def subscriptions(self) -> int:
        # list() copies in one step: /metrics calls this from a worker thread
        # while the event loop adds and removes topics.
        return sum(len(subs) for subs in list(self._topics.values()))

    def close_topic(self, topic: str, reason: str) -> int:
        """Close every subscription of one topic; return how many."""
        subscriptions = list(self._topics.get(topic, ()))
        for subscription in subscriptions:
            subscription.close(reason)
        return len(subscriptions)

    def close_all(self, reason: str) -> None:
        """Close every subscription. The hub stays usable for new subscribers."""
        for subscription in [s for subs in self._topics.values() for s in subs]:
            subscription.close(reason)

    def _deliver(self, subscriptions: tuple[Subscription, ...], message: object) -> int:
        delivered = 0
        for subscription in subscriptions:
            if subscription._offer(message):
                delivered += 1
            else:
                self.dropped_slow += 1
                subscription.close(f"slow consumer: {subscription.qsize()} messages queued")
        return delivered

    def _remove(self, subscription: Subscription) -> None:
        subs = self._topics.get(subscription.topic)
        if subs is None:
            return
        subs.discard(subscription)
        if not subs:
            del self._topics[subscription.topic]
