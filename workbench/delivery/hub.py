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
import logging
from collections import deque
from collections.abc import Callable

log = logging.getLogger(__name__)


class SubscriptionClosed(Exception):
    """The subscription was closed; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Subscription:
    """One subscriber's view of a topic. Obtain with :meth:`Hub.subscribe`.

    Memory matters here: a server process holds one per SSE connection, tens of
    thousands of them. So no ``asyncio.Queue`` (a deque, two more deques of
    waiters and a lock-free counter each): a plain deque of messages and one
    future, made only while a getter waits on an empty queue and shared by
    every getter. ``__slots__`` leaves out the instance dict.
    """

    __slots__ = (
        "topic",
        "closed_reason",
        "on_close",
        "sink",
        "_hub",
        "_queue",
        "_wakeup",
        "_beat",
        "_share",
    )

    def __init__(self, hub: Hub, topic: str, share: int = 0) -> None:
        self.topic = topic
        self.closed_reason: str | None = None
        #: Called once by :meth:`close` (whoever closes it); the SSE response sets
        #: it while a write is blocked, so a slow or stalled client's write ends too.
        self.on_close: Callable[[], None] | None = None
        #: Set by a reader that can take a message at once: while its getter waits
        #: on an empty queue, a published message is offered to it first, and
        #: queued only if it returns False (see :meth:`_offer`).
        self.sink: Callable[[object], bool] | None = None
        self._hub = hub
        self._queue: deque[object] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._beat = False  # a heartbeat is queued and not yet taken
        self._share = share  # which share of the hub's heartbeat is this subscriber's

    async def get(self) -> object:
        """The next message; :class:`SubscriptionClosed` once closed, even if waiting."""
        while True:
            # Also covers a close() between this task being woken for a message and
            # resuming: once closed, the backlog is dropped, that message included.
            self._raise_if_closed()
            if self._queue:
                return self._take()
            if self._wakeup is None or self._wakeup.done():
                self._wakeup = asyncio.get_running_loop().create_future()
            wakeup = self._wakeup
            try:
                await wakeup
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # Another getter was cancelled, and the future it shared with it:
                # not this task's cancellation, so wait again on a fresh one.

    def get_nowait(self) -> object:
        """The next message if one is queued, else :class:`asyncio.QueueEmpty`."""
        self._raise_if_closed()
        if not self._queue:
            raise asyncio.QueueEmpty
        return self._take()

    def qsize(self) -> int:
        """Messages waiting to be read (0 once closed: the backlog is dropped)."""
        return 0 if self.closed_reason is not None else len(self._queue)

    def close(self, reason: str = "unsubscribed") -> None:
        """Stop delivery, drop the backlog and wake any waiting getter. Idempotent."""
        if self.closed_reason is not None:
            return
        self.closed_reason = reason
        self._hub._remove(self)
        self._queue.clear()
        self._wake()
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    def _take(self) -> object:
        message = self._queue.popleft()
        if message is self._hub.heartbeat_message:
            self._beat = False
        return message

    def _offer(self, message: object) -> bool:
        # The sink only while the getter is parked (so the queue is empty: a queued
        # message would have woken it): everything handed to the reader before has
        # been dealt with, so taking this one now keeps the order, and spares a
        # task switch per message.
        sink, wakeup = self.sink, self._wakeup
        if sink is not None and wakeup is not None and not wakeup.done():
            try:
                if sink(message):
                    return True
            except Exception:  # a broken reader must not break the publisher
                log.exception("the sink of %r failed; the message is queued instead", self)
        return self._enqueue(message)

    def _enqueue(self, message: object) -> bool:
        if len(self._queue) >= self._hub.max_queue:
            return False
        self._queue.append(message)
        self._wake()
        return True

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    def _raise_if_closed(self) -> None:
        if self.closed_reason is not None:
            raise SubscriptionClosed(self.closed_reason)

    def __repr__(self) -> str:
        state = "open" if self.closed_reason is None else f"closed: {self.closed_reason}"
        return f"<Subscription topic={self.topic!r} {state}>"


#: The default heartbeat, for a hub whose subscribers need no particular object.
_HEARTBEAT = object()


class Hub:
    """Topic -> local subscribers, each with a queue of at most ``max_queue`` messages.

    ``heartbeat_message`` is what :meth:`heartbeat` queues: one object for
    every subscriber (the SSE layer passes its pre-encoded comment).
    Subscribers are dealt into ``heartbeat_shares`` shares, in the order they
    subscribe, and :meth:`heartbeat` beats one share at a time.
    """

    def __init__(
        self, max_queue: int = 1000, heartbeat_message: object = None, heartbeat_shares: int = 1
    ) -> None:
        # A bound of 0 would mean "unbounded" to a queue, which would void the memory bound.
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if heartbeat_shares < 1:
            raise ValueError("heartbeat_shares must be at least 1")
        self.max_queue = max_queue
        self.heartbeat_shares = heartbeat_shares
        self._shares: list[set[Subscription]] = [set() for _ in range(heartbeat_shares)]
        self.heartbeat_message: object = (
            heartbeat_message if heartbeat_message is not None else _HEARTBEAT
        )
        self.dropped_slow = 0
        self.dropped_stalled = 0
        self._topics: dict[str, set[Subscription]] = {}
        self._subscribed = 0

    def subscribe(self, topic: str) -> Subscription:
        self._subscribed += 1
        subscription = Subscription(self, topic, self._subscribed % self.heartbeat_shares)
        self._topics.setdefault(topic, set()).add(subscription)
        self._shares[subscription._share].add(subscription)
        return subscription

    def publish(self, topic: str, message: object) -> int:
        """Queue ``message`` for the topic's subscribers; return how many got it."""
        # A copy: disconnecting a slow subscriber mutates the set.
        return self._deliver(tuple(self._topics.get(topic, ())), message)

    def broadcast(self, message: object) -> int:
        """Queue ``message`` for every subscriber of every topic."""
        everyone = tuple(s for subs in self._topics.values() for s in subs)
        return self._deliver(everyone, message)

    def heartbeat(self, share: int = 0) -> int:
        """Queue the heartbeat for one share of the subscribers; close those of
        it that never took their last one.

        Called by one shared ticker instead of a timer per connection. Every
        subscriber belongs to one of ``heartbeat_shares`` shares (by the order
        it subscribed in), and the ticker beats them one share at a time, so that a
        heartbeat interval's writes are spread over the interval: beating every
        session at once stalls the process for as long as all those writes take
        (in proportion to the sessions), which every live
        message waiting behind them would see as latency. A subscriber whose
        previous heartbeat is still queued has not read for a whole interval (its
        client is not reading, so its writes block): it is closed as stalled, and
        its ``on_close`` ends the blocked write. Returns how many got the heartbeat.
        """
        if not 0 <= share < self.heartbeat_shares:
            raise ValueError(f"share must be in [0, {self.heartbeat_shares}), not {share}")
        message = self.heartbeat_message
        delivered = 0
        for subscription in tuple(self._shares[share]):  # a copy: closing one changes the set
            if subscription._beat:
                self.dropped_stalled += 1
                subscription.close("stalled: no read for a whole heartbeat interval")
            elif subscription._enqueue(message):  # through the queue: its taking is the proof
                subscription._beat = True
                delivered += 1
            else:
                self.dropped_slow += 1
                subscription.close(f"slow consumer: {subscription.qsize()} messages queued")
        return delivered

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
        self._shares[subscription._share].discard(subscription)
        subs = self._topics.get(subscription.topic)
        if subs is None:
            return
        subs.discard(subscription)
        if not subs:
            del self._topics[subscription.topic]
