"""Redis faults in the middle of a run: kill -9 with AOF, and an outage of seconds.

The relay and one worker per group run their real loops in threads against
a private redis-server that the test kills and restarts. Commands go on
through the outage; afterwards every group has handled every event once.
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from tests.support import make_service, run_lifecycles
from workbench.domain.clock import ManualClock
from workbench.handlers import GROUPS, HANDLERS, make_handler
from workbench.handlers.ledger import check_ledger
from workbench.ops.redis_server import KILLABLE, RedisServer
from workbench.ops.waiting import wait_until
from workbench.store import Store, inbox, outbox
from workbench.streams.connection import connect
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
from workbench.streams.relay import OutboxRelay


def _handled(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name))
        return {g: int(n) for g, n in rows}


def _expected(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        per_stream = dict(
            conn.execute(
                select(outbox.c.stream, func.count(func.distinct(outbox.c.event_id))).group_by(
                    outbox.c.stream
                )
            ).all()
        )
    return {
        g: sum(int(per_stream.get(a, 0)) for a in h.aggregate_types) for g, h in HANDLERS.items()
    }


class _Runtime:
    """Relay plus one worker per group, each in a thread running its real loop."""

    def __init__(self, store: Store, url: str) -> None:
        settings = ConsumerSettings(block_ms=100, retry_backoff_s=0.1, recover_every_s=0.5)
        self.relay = OutboxRelay(store, connect(url), batch_size=50)
        self.workers = [
            ConsumerWorker(
                connect(url), make_handler(g, store), consumer=f"{g}-1", settings=settings
            )
            for g in GROUPS
        ]
        self.threads = [threading.Thread(target=self.relay.run, daemon=True)] + [
            threading.Thread(target=w.run, daemon=True) for w in self.workers
        ]

    def __enter__(self) -> _Runtime:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay.stop()
        for w in self.workers:
            w.stop()
        for t in self.threads:
            t.join(15)
            assert not t.is_alive(), "a loop did not stop"


@pytest.mark.parametrize("fault", ["kill-9-restart", "down-for-seconds"])
def test_redis_fault_mid_run_loses_nothing(store, tmp_path, fault) -> None:
    server = RedisServer(tmp_path / "redis", **KILLABLE).start()  # type: ignore[arg-type]
    clock = ManualClock()
    service, gateway = make_service(store, clock, duplicate_rate=0.2)
    try:
        with _Runtime(store, server.url) as runtime:
            run_lifecycles(service, gateway, clock, 25, prefix="before")
            wait_until(
                lambda: _handled(store).get("ledger", 0) > 0,
                timeout=30,
                what="the ledger to start handling",
            )
            if fault == "kill-9-restart":
                server.kill()
            else:
                server.stop()
            # Commands keep succeeding while Redis is gone: they only touch SQL.
            run_lifecycles(service, gateway, clock, 25, prefix="during")
            wait_until(
                lambda: (
                    runtime.relay.stats.redis_errors > 0
                    and all(w.stats.redis_errors > 0 for w in runtime.workers)
                ),
                timeout=30,
                what="every loop to notice Redis is down",
            )
            assert runtime.relay.backlog() > 0
            server.start()
            run_lifecycles(service, gateway, clock, 25, prefix="after")
            expected = _expected(store)
            wait_until(
                lambda: _handled(store) == expected and not runtime.relay.backlog(),
                timeout=60,
                what="every group to catch up",
            )
        client = connect(server.url)
        for w in runtime.workers:
            for stream in w.streams:
                assert client.xpending(stream, w.group)["pending"] == 0
        check = check_ledger(store)
        assert check.ok, check
    finally:
        server.close()


def test_redis_restarted_without_persistence_recreates_groups(store, tmp_path) -> None:
    """Not a durability claim: with no AOF the streams are gone, but loops recover."""
    server = RedisServer(tmp_path / "redis", appendonly=False).start()
    clock = ManualClock()
    service, gateway = make_service(store, clock)
    try:
        with _Runtime(store, server.url):
            run_lifecycles(service, gateway, clock, 5, prefix="before")
            expected = _expected(store)
            wait_until(lambda: _handled(store) == expected, timeout=30, what="first catch-up")
            server.kill()
            server.start()  # empty: no streams, no groups
            run_lifecycles(service, gateway, clock, 5, prefix="after")
            expected = _expected(store)
            wait_until(
                lambda: _handled(store) == expected,
                timeout=60,
                what="the loops to recreate their groups and catch up",
            )
    finally:
        server.close()
