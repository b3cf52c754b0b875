"""Two ``workbench serve`` nodes on one Redis and one PostgreSQL, one SIGKILLed under load.

Each node is a whole ``serve`` (API, relay, every worker), as on two machines:
its own data directory and port, the shared Redis and database by URL, the log
in 8 partitions. The relays and each group's workers share the partitions
through leases. Commands go to both nodes until node A is SIGKILLed (its
children die with it); then to B only. Afterwards: every command's events were
published, every group handled every event exactly once (its inbox), each
phone's stream holds each of its events once, in escrow order, and a phone that
was reading from A resumes on B from its Last-Event-ID with nothing missing and
nothing twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from tests.conftest import PG_SKIP, PG_URL
from tests.http_support import ROOT, SECRET, auth, read_events
from workbench.handlers import GROUPS, aggregate_types_of
from workbench.ops.redis_server import free_port
from workbench.ops.waiting import wait_until
from workbench.store import Store, inbox, outbox
from workbench.streams.connection import connect
from workbench.streams.keys import names_for

pytestmark = [pytest.mark.postgres, pytest.mark.skipif(not PG_URL, reason=PG_SKIP)]

PARTITIONS = 8
USERS = [f"node-user-{n}" for n in range(6)]


def _events_per_group(store: Store) -> dict[str, Counter[str]]:
    """Published events by aggregate type (``"*"``), once the outbox is empty."""

    def published() -> Counter[str] | None:
        with store.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.stream, outbox.c.published_at)).all()
        if any(at is None for _, at in rows):
            return None
        return Counter(stream for stream, _ in rows)

    return {"*": wait_until(published, timeout=120, what="the outbox to be published")}


def _count(expected: dict[str, Counter[str]], group: str) -> int:
    return sum(expected["*"][a] for a in aggregate_types_of(group))


class Node:
    """One ``workbench serve`` process (and its children) on a port of its own."""

    def __init__(self, name: str, tmp: Path, redis_url: str, prefix: str) -> None:
        self.name, self.port = name, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = tmp / f"{name}.log"
        env = {**os.environ, "WORKBENCH_SECRET": SECRET, "WORKBENCH_STALE_AFTER_S": "30"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "workbench", "serve", "--port", str(self.port),
             "--redis-url", redis_url, "--database-url", str(PG_URL), "--prefix", prefix,
             "--partitions", str(PARTITIONS), "--mpesa", "external",
             "--data-dir", str(tmp / name)],
            env=env, cwd=ROOT, stdout=self.log.open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def up(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()
        try:
            return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


def _create_and_cancel(base: str, n: int) -> str:
    """One escrow's whole short life: created, then cancelled by its buyer."""
    buyer, seller = USERS[n % len(USERS)], USERS[(n + 1) % len(USERS)]
    created = httpx.post(
        f"{base}/escrows",
        json={"buyer_id": buyer, "seller_id": seller, "amount": 1000 + n},
        headers={**auth(buyer), "Idempotency-Key": f"create-{n}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    escrow_id: str = created.json()["escrow"]["id"]
    cancelled = httpx.post(
        f"{base}/escrows/{escrow_id}/cancel",
        headers={**auth(buyer), "Idempotency-Key": f"cancel-{n}"},
        timeout=10,
    )
    assert cancelled.status_code == 200, cancelled.text
    return escrow_id


class Load(threading.Thread):
    """Escrows created and cancelled on the live nodes, round robin, until stopped.

    A request to a node that was just killed fails: it is retried on the other
    (the same idempotency keys, so nothing is done twice)."""

    def __init__(self, nodes: list[Node]) -> None:
        super().__init__(daemon=True)
        self.nodes, self.done, self.stopping = nodes, 0, threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                for attempt in range(len(self.nodes) * 3):
                    node = self.nodes[(self.done + attempt) % len(self.nodes)]
                    try:
                        _create_and_cancel(node.base, self.done)
                        break
                    except httpx.HTTPError:
                        continue
                else:
                    raise AssertionError(f"no node took escrow {self.done}")
                self.done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def test_two_nodes_one_killed_under_load_lose_nothing_and_phones_resume(
    tmp_path: Path, redis_url: str
) -> None:
    Store(PG_URL).reset()
    prefix = f"nodes{uuid.uuid4().hex[:6]}"
    a = Node("a", tmp_path, redis_url, prefix)
    b = Node("b", tmp_path, redis_url, prefix)
    load = Load([a, b])
    try:
        wait_until(lambda: a.up() and b.up(), timeout=90, what="both nodes to answer")
        load.start()
        wait_until(lambda: load.done >= 30, timeout=120, what="30 escrows through both nodes")
        phone = USERS[0]
        before, reset = read_events(a.base, phone, last_event_id="0", stop_after=10)
        assert not reset and len(before) == 10
        os.kill(a.process.pid, signal.SIGKILL)  # the supervisor; its children die with it
        a.process.wait(10)
        load.nodes = [b]
        wait_until(lambda: load.done >= 60, timeout=120, what="30 more escrows through node B")
        load.stopping.set()
        load.join(60)
        assert load.error is None, load.error
        store = Store(PG_URL)
        expected = _events_per_group(store)
        assert sum(expected["*"].values()) == 2 * load.done  # created + cancelled, each once

        def handled() -> dict[str, int]:
            with store.engine.connect() as conn:
                return dict(
                    conn.execute(
                        select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name)
                    ).all()
                )

        # Inboxes are keyed by (group, event): a count equal to the events is each once.
        wait_until(
            lambda: all(handled().get(g, 0) == _count(expected, g) for g in GROUPS),
            timeout=120,
            what="node B to handle every event in every group",
        )
        # B takes over every partition A held once A's leases expire (a worker's after
        # dead_after_s): one holder per role, and it is alive.
        names = names_for(prefix, PARTITIONS)
        with connect(redis_url) as client:

            def holders(role: str) -> set[str]:
                return {
                    client.get(names.lease(role, p)).split()[0].decode() for p in names.partitions
                }

            for role in ("relay", *GROUPS, "fanout"):
                wait_until(
                    lambda role=role: len(holders(role)) == 1,
                    timeout=60,
                    what=f"node B to hold every partition of {role}",
                )
                alive = set(map(bytes.decode, client.hkeys(names.heartbeats(role))))
                assert holders(role) <= alive, (role, holders(role), alive)
        # The phone resumes on B from the last id A gave it: the rest, once, in order.
        mine = sum(1 for n in range(load.done) if phone in (USERS[n % 6], USERS[(n + 1) % 6]))
        whole, reset = read_events(
            b.base, phone, last_event_id="0", until_ready_and=2 * mine, timeout=60
        )
        assert not reset and len(whole) == 2 * mine
        rest, reset = read_events(
            b.base, phone, last_event_id=before[-1].id, until_ready_and=2 * mine - 10
        )
        assert not reset
        assert [e.id for e in before] + [e.id for e in rest] == [e.id for e in whole]
        assert len({e.data for e in whole}) == len(whole)  # no event twice
    finally:
        load.stopping.set()
        for node in (a, b):
            node.stop()
