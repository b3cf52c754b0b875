"""The simulated M-Pesa posts the callbacks due at once concurrently, within a bound.

Posting them one by one made each wait for the previous one's STK Push Query
(0.05-0.3 s of simulated delay), which capped payments at a few per second
per API process (found by ``bench/capacity.py``).
"""

from __future__ import annotations

import asyncio

from workbench.http.state import deliver_all
from workbench.payments.mpesa import Delivery


def _deliveries(n: int) -> list[Delivery]:
    return [Delivery(url=f"http://gw/mpesa/callback/t{i}", body={"i": i}) for i in range(n)]


def test_every_due_callback_is_in_flight_at_once() -> None:
    """Each post returns only once all of them have started: one-by-one posting would
    never finish (the deadline fails the test)."""
    deliveries = _deliveries(8)
    started: list[int] = []
    everyone = asyncio.Event()

    async def post(delivery: Delivery) -> None:
        started.append(delivery.body["i"])
        if len(started) == len(deliveries):
            everyone.set()
        await everyone.wait()

    async def main() -> None:
        async with asyncio.timeout(10):
            await deliver_all(deliveries, post, limit=8)

    asyncio.run(main())
    assert sorted(started) == list(range(8))


def test_no_more_than_the_limit_at_once_and_every_one_posted() -> None:
    deliveries = _deliveries(20)
    in_flight, most, posted = 0, 0, []

    async def post(delivery: Delivery) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0)  # let the others start if the gate allows them
        await asyncio.sleep(0)
        posted.append(delivery.body["i"])
        in_flight -= 1

    asyncio.run(deliver_all(deliveries, post, limit=3))
    assert most == 3
    assert sorted(posted) == list(range(20))
