"""FastStream's Redis Streams subscriber, timed: the peer anchor of ``bench/throughput.py``.

Runs in ``.venv-bench/`` (FastStream is not a dependency of the runtime), as a
child of the throughput bench, and imports nothing of the workbench. It reads
one JSON request per line on stdin and answers one JSON line on stdout:

``{"url", "streams", "group", "batch", "count", "limit"}`` -> ``{"items", "seconds"}``

For each request it creates ``group`` at id 0 on every stream (not timed),
declares one subscriber per stream in a new :class:`RedisBroker` (``batch``:
``StreamSub(batch=True, max_records=count)``, else one message per call, with
FastStream's default acknowledgement: an XACK after each handler call), and
connects it (not timed). The clock runs from ``broker.start()`` until the
handlers have seen ``limit`` entries; the handlers do nothing else, as the
runtime's no-op handler does. Then the broker stops and the group is
destroyed. ``{"version": true}`` answers FastStream's version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from importlib import metadata
from typing import Any

from faststream.redis import RedisBroker, StreamSub
from redis.asyncio import Redis


async def consume(request: dict[str, Any]) -> dict[str, Any]:
    url, streams, group = request["url"], request["streams"], request["group"]
    limit, count, batch = int(request["limit"]), int(request["count"]), bool(request["batch"])
    admin = Redis.from_url(url)
    for stream in streams:
        await admin.xgroup_create(stream, group, id="0")
    broker = RedisBroker(url, logger=None, log_level=logging.CRITICAL)
    seen = 0
    done = asyncio.Event()

    def counted(n: int) -> None:
        nonlocal seen
        seen += n
        if seen >= limit:
            done.set()

    for stream in streams:
        if batch:
            sub = StreamSub(stream, group=group, consumer="fs", batch=True, max_records=count)

            @broker.subscriber(stream=sub)
            async def handle_batch(body: list[Any]) -> None:
                counted(len(body))

        else:
            sub = StreamSub(stream, group=group, consumer="fs")

            @broker.subscriber(stream=sub)
            async def handle_one(body: Any) -> None:
                counted(1)

    await broker.connect()
    started = time.perf_counter()
    await broker.start()
    await asyncio.wait_for(done.wait(), timeout=float(request.get("timeout", 600)))
    seconds = time.perf_counter() - started
    await broker.stop()
    for stream in streams:
        await admin.xgroup_destroy(stream, group)
    await admin.aclose()
    return {"items": seen, "seconds": seconds}


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("version"):
            answer: dict[str, Any] = {"faststream": metadata.version("faststream")}
        else:
            answer = asyncio.run(consume(request))
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
