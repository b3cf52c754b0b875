"""The pubsub hub: fan-out by topic, bounded queues, and disconnecting slow consumers."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import Coroutine
from typing import Any

import pytest

from workbench.delivery.hub import Hub, Subscription, SubscriptionClosed

# Only a guard against a hang turning into a 300 s pytest-timeout: nothing here
# waits for time to pass, so a correct hub finishes in microseconds.
HANG = 5.0


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, HANG))


def drain(subscription: Subscription) -> list[object]:
    messages = []
    while True:
        try:
            messages.append(subscription.get_nowait())
        except asyncio.QueueEmpty:
            return messages


async def waiting_get(subscription: Subscription) -> asyncio.Task[object]:
    """A task that is blocked in ``subscription.get()`` when this returns."""
    started = asyncio.Event()

    async def get() -> object:
        started.set()
        return await subscription.get()

    task = asyncio.create_task(get())
    # set() does not suspend, so by the time we resume, the task has run on
    # into get() and is parked on the empty queue.
    await started.wait()
    assert not task.done()
    return task


# -- delivery -----------------------------------------------------------------------


def test_fan_out_to_every_subscriber_of_a_topic() -> None:
    async def main() -> None:
        hub = Hub()
        subs = [hub.subscribe("user-1") for _ in range(3)]
        assert hub.publish("user-1", "hello") == 3
        assert [await s.get() for s in subs] == ["hello"] * 3

    run(main())


def test_topics_are_isolated() -> None:
    hub = Hub()
    mine, theirs = hub.subscribe("user-1"), hub.subscribe("user-2")
    assert hub.publish("user-1", "for user-1") == 1
    assert hub.publish("nobody", "for no one") == 0
    assert drain(mine) == ["for user-1"]
    assert theirs.qsize() == 0
    with pytest.raises(asyncio.QueueEmpty):
        theirs.get_nowait()


def test_order_is_preserved() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("user-1")
        for i in range(500):
            hub.publish("user-1", i)
        assert sub.qsize() == 500
        assert [await sub.get() for _ in range(500)] == list(range(500))

    run(main())


def test_a_waiting_get_receives_a_later_publish() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("user-1")
        task = await waiting_get(sub)
        hub.publish("user-1", "wake up")
        assert await task == "wake up"

    run(main())


def test_broadcast_reaches_every_topic() -> None:
    hub = Hub()
    subs = [hub.subscribe("user-1"), hub.subscribe("user-2"), hub.subscribe("user-2")]
    assert hub.broadcast("resync") == 3
    assert [drain(s) for s in subs] == [["resync"]] * 3
    assert Hub().broadcast("resync") == 0


# -- closing ------------------------------------------------------------------------


def test_unsubscribe_stops_delivery_and_removes_the_empty_topic() -> None:
    hub = Hub()
    leaving, staying = hub.subscribe("user-1"), hub.subscribe("user-1")
    hub.publish("user-1", "before")
    leaving.close()
    assert leaving.closed_reason == "unsubscribed"
    assert hub.publish("user-1", "after") == 1
    assert drain(staying) == ["before", "after"]
    # The backlog went with the subscription.
    assert leaving.qsize() == 0
    with pytest.raises(SubscriptionClosed) as info:
        leaving.get_nowait()
    assert info.value.reason == "unsubscribed"

    assert hub.topics() == 1
    staying.close()
    assert (hub.topics(), hub.subscriptions()) == (0, 0)
    assert hub.publish("user-1", "to no one") == 0


def test_close_is_idempotent_and_keeps_the_first_reason() -> None:
    hub = Hub()
    sub = hub.subscribe("user-1")
    other = hub.subscribe("user-1")
    sub.close("logged out")
    sub.close("something else")
    assert sub.closed_reason == "logged out"
    # A second close does not disturb the topic's remaining subscriber.
    assert hub.subscriptions() == 1
    assert hub.publish("user-1", "still here") == 1
    assert drain(other) == ["still here"]


def test_close_wakes_a_waiting_get() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("user-1")
        first, second = await waiting_get(sub), await waiting_get(sub)
        sub.close("logged out")
        for task in (first, second):
            with pytest.raises(SubscriptionClosed) as info:
                await task
            assert info.value.reason == "logged out"
        with pytest.raises(SubscriptionClosed):
            await sub.get()

    run(main())


def test_a_message_handed_over_but_not_yet_read_is_dropped_by_close() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("user-1")
        task = await waiting_get(sub)
        hub.publish("user-1", "in flight")  # the getter is woken but has not run yet
        sub.close("logged out")
        with pytest.raises(SubscriptionClosed):
            await task

    run(main())


def test_get_on_a_closed_subscription_raises_even_with_a_backlog() -> None:
    async def main() -> None:
        hub = Hub()
        sub = hub.subscribe("user-1")
        hub.publish("user-1", "unread")
        sub.close()
        with pytest.raises(SubscriptionClosed):
            await sub.get()

    run(main())


def test_close_all() -> None:
    async def main() -> None:
        hub = Hub()
        subs = [hub.subscribe("user-1"), hub.subscribe("user-2"), hub.subscribe("user-2")]
        waiting = await waiting_get(subs[0])
        hub.close_all("shutting down")
        assert [s.closed_reason for s in subs] == ["shutting down"] * 3
        with pytest.raises(SubscriptionClosed, match="shutting down"):
            await waiting
        assert (hub.topics(), hub.subscriptions()) == (0, 0)
        # The hub itself carries on.
        fresh = hub.subscribe("user-1")
        assert hub.publish("user-1", "hello") == 1
        assert await fresh.get() == "hello"

    run(main())


# -- slow consumers and the memory bound --------------------------------------------


def test_a_slow_subscriber_is_disconnected_and_a_fast_one_gets_everything() -> None:
    hub = Hub(max_queue=10)
    slow, fast = hub.subscribe("user-1"), hub.subscribe("user-1")
    received, delivered = [], []
    for i in range(25):
        delivered.append(hub.publish("user-1", i))
        received.extend(drain(fast))

    assert received == list(range(25))
    # Both get the first 10; the 11th finds slow's queue full and disconnects it.
    assert delivered == [2] * 10 + [1] * 15
    assert slow.closed_reason == "slow consumer: 10 messages queued"
    assert hub.dropped_slow == 1
    assert hub.subscriptions() == 1
    with pytest.raises(SubscriptionClosed, match="slow consumer"):
        slow.get_nowait()


def test_broadcast_disconnects_slow_subscribers_too() -> None:
    hub = Hub(max_queue=2)
    slow, fast = hub.subscribe("user-1"), hub.subscribe("user-2")
    for _ in range(2):
        hub.broadcast("tick")
    drain(fast)
    assert hub.broadcast("tick") == 1
    assert slow.closed_reason == "slow consumer: 2 messages queued"
    assert hub.dropped_slow == 1
    assert drain(fast) == ["tick"]


def test_a_queue_of_one_still_delivers_when_read_between_publishes() -> None:
    async def main() -> None:
        hub = Hub(max_queue=1)
        sub = hub.subscribe("user-1")
        for i in range(100):
            assert hub.publish("user-1", i) == 1
            assert await sub.get() == i
        assert hub.dropped_slow == 0

    run(main())


def test_max_queue_must_bound_the_queue() -> None:
    # asyncio.Queue(maxsize=0) would be unbounded.
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_queue"):
            Hub(max_queue=bad)


def test_memory_is_bounded_for_a_subscriber_that_never_reads() -> None:
    hub = Hub(max_queue=100)
    never_reads = hub.subscribe("user-1")
    tracemalloc.start()
    try:
        baseline, _ = tracemalloc.get_traced_memory()
        queued = 0
        for i in range(100_000):
            # 1 KiB each: about 100 MiB if the hub kept them all.
            queued += hub.publish("user-1", i.to_bytes(4, "big") * 256)
            assert never_reads.qsize() <= 100
        retained, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert queued == 100
    assert never_reads.closed_reason == "slow consumer: 100 messages queued"
    assert retained - baseline < 1_000_000


def test_a_slow_subscriber_that_resubscribes_is_bounded_again() -> None:
    hub = Hub(max_queue=5)
    sub = hub.subscribe("user-1")
    for _ in range(3):
        for i in range(20):
            hub.publish("user-1", i)
        assert sub.closed_reason is not None
        # The client reconnects (and would resume from its Last-Event-ID).
        sub = hub.subscribe("user-1")
    assert hub.dropped_slow == 3
    assert hub.subscriptions() == 1


# -- counts -------------------------------------------------------------------------


def test_counts() -> None:
    hub = Hub()
    assert (hub.topics(), hub.subscriptions(), hub.dropped_slow) == (0, 0, 0)
    a = hub.subscribe("user-1")
    b = hub.subscribe("user-1")
    c = hub.subscribe("user-2")
    assert (hub.topics(), hub.subscriptions()) == (2, 3)
    a.close()
    assert (hub.topics(), hub.subscriptions()) == (2, 2)
    c.close()
    assert (hub.topics(), hub.subscriptions()) == (1, 1)
    b.close()
    assert (hub.topics(), hub.subscriptions()) == (0, 0)


def test_close_topic_closes_only_that_topic() -> None:
    async def scenario() -> None:
        hub = Hub(max_queue=10)
        a1, a2, b = hub.subscribe("a"), hub.subscribe("a"), hub.subscribe("b")
        assert hub.close_topic("a", "dropped by the server") == 2
        assert a1.closed_reason == a2.closed_reason == "dropped by the server"
        assert b.closed_reason is None
        assert hub.publish("b", 1) == 1
        assert hub.close_topic("nobody", "x") == 0

    asyncio.run(scenario())


# -- the heartbeat, one share at a time -----------------------------------------------------


def test_each_heartbeat_share_reaches_its_subscribers_and_all_shares_reach_everyone() -> None:
    hub = Hub(heartbeat_shares=3)
    subs = [hub.subscribe(f"u{i % 4}") for i in range(10)]  # several per topic, too
    got: dict[int, list[int]] = {}
    for share in range(3):
        got[share] = []
        delivered = hub.heartbeat(share)
        got[share] = [i for i, s in enumerate(subs) if drain(s) == [hub.heartbeat_message]]
        assert delivered == len(got[share])
    # Dealt in subscription order (the first subscriber is the hub's first, in
    # share 1), each share beat only its third, and together they beat everyone once.
    assert got == {0: [2, 5, 8], 1: [0, 3, 6, 9], 2: [1, 4, 7]}
    assert hub.dropped_stalled == 0


def test_a_subscriber_is_stalled_only_when_its_own_share_comes_round_again() -> None:
    hub = Hub(heartbeat_shares=2)
    a, b = hub.subscribe("a"), hub.subscribe("b")  # shares 1 and 0
    assert hub.heartbeat(1) == 1 and a.qsize() == 1 and b.qsize() == 0
    assert hub.heartbeat(0) == 1 and b.qsize() == 1
    # Neither read; the next round of share 1 closes a, and leaves b alone.
    hub.heartbeat(1)
    assert a.closed_reason is not None and "stalled" in a.closed_reason
    assert b.closed_reason is None and hub.dropped_stalled == 1
    # A closed subscriber has left its share too.
    assert hub.heartbeat(1) == 0


@pytest.mark.parametrize("share", [-1, 3])
def test_a_share_outside_the_hubs_shares_is_refused(share: int) -> None:
    hub = Hub(heartbeat_shares=3)
    hub.subscribe("a")
    with pytest.raises(ValueError, match="share must be in"):
        hub.heartbeat(share)


def test_a_hub_needs_at_least_one_heartbeat_share() -> None:
    with pytest.raises(ValueError, match="heartbeat_shares"):
        Hub(heartbeat_shares=0)


# -- the sink: a reader that takes a message at once -----------------------------------------


def test_the_sink_takes_messages_only_while_the_getter_waits_and_the_rest_keep_order() -> None:
    async def scenario() -> None:
        hub = Hub()
        sub = hub.subscribe("a")
        taken: list[object] = []
        sub.sink = lambda m: m != "refused" and not taken.append(m)
        hub.publish("a", "early")  # no getter waits yet: queued
        assert taken == [] and await sub.get() == "early"
        getter = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)  # the getter parks on the empty queue
        hub.publish("a", "now")  # taken by the sink, the getter sleeps on
        assert taken == ["now"] and not getter.done()
        hub.publish("a", "refused")  # the sink says no: queued, and the getter woken
        hub.publish("a", "after")  # behind it in the queue, not overtaking it
        assert taken == ["now"]
        assert await getter == "refused" and drain(sub) == ["after"]

    run(scenario())


def test_the_heartbeat_never_goes_to_the_sink() -> None:
    """Its taking from the queue is what proves the reader alive."""

    async def scenario() -> None:
        hub = Hub()
        sub = hub.subscribe("a")
        taken: list[object] = []
        sub.sink = lambda m: not taken.append(m)
        getter = asyncio.ensure_future(sub.get())
        await asyncio.sleep(0)
        assert hub.heartbeat() == 1
        assert taken == [] and await getter is hub.heartbeat_message

    run(scenario())


def test_a_sink_that_raises_leaves_the_message_queued_and_the_publisher_whole() -> None:
    async def scenario() -> None:
        hub = Hub()
        broken, fine = hub.subscribe("a"), hub.subscribe("a")

        def explode(message: object) -> bool:
            raise RuntimeError("the connection's handle is closed")

        broken.sink = explode
        getter = asyncio.ensure_future(broken.get())
        await asyncio.sleep(0)
        assert hub.publish("a", "m") == 2  # both got it: the exception stopped nothing
        assert await getter == "m" and drain(fine) == ["m"]

    run(scenario())
