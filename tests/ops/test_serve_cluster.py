"""``workbench serve`` on a real Redis Cluster, through HTTP and SSE, with a master failover.

One ``serve`` (API, relay, timers, every worker; SQLite) runs against a local
cluster of 3 masters with a replica each, by a ``redis+cluster://`` URL, with
the log in 16 partitions. Escrows are driven by the test (``--mpesa external``:
created, then cancelled by the buyer, a whole short life), and phones read
their users' events over SSE, users chosen so that their partitions live on
every master.

* Replay, then live: phones connected from ``Last-Event-ID: 0`` get what was
  there, then ``ready``, then every new event live, each once, in order.
* A failover under load: the replica of the master that owns some phones'
  partitions (and some escrows') is stopped for a moment while the master
  takes a large write, so the master acknowledges entries its replica never
  receives; then the master is SIGKILLed and the replica takes over without
  them. The relay finds the streams behind what the outbox says it published
  and puts the lost rows back with their original ids, the groups re-read, and
  the fan-out (``serve`` sets ``WORKBENCH_WAIT_REPLICAS=1`` on a cluster whose
  every master has a replica: a batch is acked once the replicas of the nodes it
  wrote to have it) had not acked what the replica
  lacked, so it appends that again. Afterwards: every outbox row is
  published, every group handled every event of its aggregate types exactly
  once (its inbox), every stream holds exactly its published rows, every
  phone's history from 0 holds each of its events once in escrow order, and
  every phone that stayed connected either continued gaplessly or was told
  ``reset`` (it then starts over from 0): its view ends equal to the history.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from httpx_sse import ServerSentEvent, connect_sse
from redis.exceptions import RedisClusterException, RedisError
from sqlalchemy import func, select

from tests.http_support import ROOT, SECRET, auth, read_events
from workbench.handlers import ALL_GROUPS, GROUPS, aggregate_types_of
from workbench.ops.inspection import inspect
from workbench.ops.redis_cluster import LocalCluster
from workbench.ops.redis_server import RedisServer, free_port
from workbench.ops.serve import fanout_wait_replicas
from workbench.ops.waiting import WaitTimeout, wait_until
from workbench.store import Store, inbox, outbox
from workbench.streams.keys import StreamNames, names_for
from workbench.streams.partitions import slot_of

PARTITIONS = 16
PHONES_PER_MASTER = 2


@dataclass
class Served:
    """The cluster, the ``serve`` process on it, and how to reach both."""

    cluster: LocalCluster
    process: subprocess.Popen[bytes]
    base: str
    url: str  # redis+cluster://
    prefix: str
    names: StreamNames
    store: Store
    tmp: Path  # serve.log, and serve's data dir serve/ with a log per child

    def healthy(self) -> bool:
        assert self.process.poll() is None, self.log("serve")
        try:
            return httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self, name: str) -> str:
        path = self.tmp / ("serve.log" if name == "serve" else f"serve/{name}.log")
        return path.read_text(errors="replace") if path.exists() else ""

    def owners(self) -> dict[int, int]:
        """The port of the master serving each partition now."""
        tags = self.names.partitioning.tags  # type: ignore[union-attr]
        with self.cluster.client() as client:
            nodes = client.nodes_manager
            return {p: int(nodes.get_node_from_slot(slot_of(t)).port) for p, t in enumerate(tags)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("serve-cluster")
    with LocalCluster(tmp / "cluster", masters=3, replicas=1) as cluster:
        url = cluster.url.replace("redis://", "redis+cluster://")
        prefix = f"sc{uuid.uuid4().hex[:6]}"
        port = free_port()
        env = {
            **os.environ,
            "WORKBENCH_SECRET": SECRET,
            "WORKBENCH_SSE_PING_S": "1",
            # Six users create escrows naming each other over and over: no per-pair limit.
            "WORKBENCH_CREATE_LIMIT": "0",
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "workbench", "serve", "--port", str(port),
             "--redis-url", url, "--prefix", prefix, "--partitions", str(PARTITIONS),
             "--mpesa", "external", "--data-dir", str(tmp / "serve")],
            env=env, cwd=ROOT, stdout=(tmp / "serve.log").open("wb"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        database = f"sqlite:///{tmp / 'serve' / 'workbench.db'}"
        s = Served(
            cluster, process, f"http://127.0.0.1:{port}", url, prefix,
            names_for(prefix, PARTITIONS), Store(database), tmp,
        )  # fmt: skip
        try:
            wait_until(s.healthy, timeout=60, what="serve on the cluster to answer /healthz")
            yield s
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            code = process.wait(60)
            s.store.close()
        # A clean stop, the API's cluster clients closed included.
        assert code == 0, s.log("serve")[-3000:]
        assert "shutdown failed" not in s.log("api-0"), s.log("api-0")[-3000:]


def _phone_users(served: Served, label: str) -> list[str]:
    """``PHONES_PER_MASTER`` users on each master (their partitions' owners)."""
    by_master: dict[int, list[str]] = {}
    owners = served.owners()
    for n in range(1000):
        user = f"{label}-{n}"
        mine = by_master.setdefault(owners[served.names.partition_of(user)], [])
        if len(mine) < PHONES_PER_MASTER:
            mine.append(user)
        if len(by_master) == 3 and all(len(u) == PHONES_PER_MASTER for u in by_master.values()):
            break
    return [user for users in by_master.values() for user in users]


class Phone(threading.Thread):
    """A phone on SSE, as ``EventSource`` behaves: from ``Last-Event-ID: 0``, then on
    every disconnect again from the last id it got; after a ``reset`` it starts over
    from 0 (the history is retained), dropping what it had."""

    def __init__(self, base: str, user: str) -> None:
        super().__init__(daemon=True, name=f"phone-{user}")
        self.base, self.user = base, user
        self.events: list[ServerSentEvent] = []  # since the last reset
        self.last_id = "0"
        self.ready = threading.Event()
        self.replayed = 0  # events before the first ``ready``
        self.resets = self.connections = self.refused = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(httpx.HTTPError):  # a cut read: reconnect, as EventSource
                self._connection()
            self.stopping.wait(0.2)

    def _connection(self) -> None:
        headers = {**auth(self.user), "Last-Event-ID": self.last_id}
        with (
            httpx.Client(timeout=httpx.Timeout(10, connect=5)) as client,
            connect_sse(
                client, "GET", f"{self.base}/users/{self.user}/events", headers=headers
            ) as source,
        ):
            if source.response.status_code != 200:
                self.refused += 1  # 503 while its partition fails over
                return
            self.connections += 1
            for sse in source.iter_sse():
                if self.stopping.is_set():
                    return
                if sse.event == "reset":
                    self.resets += 1
                    self.events.clear()
                    self.last_id = "0"
                    return
                if sse.event == "ready":
                    if not self.ready.is_set():
                        self.replayed = len(self.events)
                        self.ready.set()
                    self.last_id = sse.id
                elif sse.event and sse.event != "message":
                    self.events.append(sse)
                    self.last_id = sse.id


def _create_and_cancel(base: str, users: list[str], n: int, tag: str) -> str:
    """One escrow's whole short life: created, then cancelled by its buyer."""
    buyer, seller = users[n % len(users)], users[(n + 1) % len(users)]
    created = httpx.post(
        f"{base}/escrows",
        json={"buyer_id": buyer, "seller_id": seller, "amount": 1000 + n},
        headers={**auth(buyer), "Idempotency-Key": f"{tag}-create-{n}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    escrow_id: str = created.json()["escrow"]["id"]
    cancelled = httpx.post(
        f"{base}/escrows/{escrow_id}/cancel",
        headers={**auth(buyer), "Idempotency-Key": f"{tag}-cancel-{n}"},
        timeout=10,
    )
    assert cancelled.status_code == 200, cancelled.text
    return escrow_id


class Load(threading.Thread):
    """Escrows created and cancelled between ``users``, one after another, until stopped."""

    def __init__(self, base: str, users: list[str], tag: str) -> None:
        super().__init__(daemon=True)
        self.base, self.users, self.tag = base, users, tag
        self.escrows: list[str] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                n = len(self.escrows)
                self.escrows.append(_create_and_cancel(self.base, self.users, n, self.tag))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def wait_for(self, count: int, timeout: float = 60) -> None:
        def enough() -> bool:
            assert self.error is None, self.error
            return len(self.escrows) >= count

        wait_until(enough, timeout=timeout, what=f"{count} escrows created and cancelled")

    def stop(self) -> None:
        self.stopping.set()
        self.join(30)
        assert self.error is None, self.error


class Prober(threading.Thread):
    """Asks ``/healthz`` and ``/metrics`` every 0.1 s until stopped; keeps every status."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.statuses: dict[str, Counter[int]] = {"healthz": Counter(), "metrics": Counter()}
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self.stopping.wait(0.1):
                for path, seen in self.statuses.items():
                    with contextlib.suppress(httpx.HTTPError):
                        seen[http.get(f"{self.base}/{path}").status_code] += 1

    def stop(self) -> dict[str, Counter[int]]:
        self.stopping.set()
        self.join(30)
        return self.statuses


# -- what the store says happened -------------------------------------------------------


def _published_rows(store: Store) -> list[dict[str, object]]:
    """Every outbox row's event, once every row is published."""

    def published() -> list[dict[str, object]] | None:
        with store.engine.connect() as conn:
            rows = conn.execute(
                select(outbox.c.published_at, outbox.c.partition, outbox.c.stream, outbox.c.data)
            ).all()
        if any(at is None for at, *_ in rows):
            return None
        return [{"partition": p, "stream": s, **json.loads(d)} for _, p, s, d in rows]

    return wait_until(published, timeout=60, what="every outbox row to be published")


def _events_of(rows: list[dict[str, object]], user: str) -> list[dict[str, object]]:
    return [row for row in rows if user in row["user_ids"]]  # type: ignore[operator]


def _assert_history(served: Served, phone: Phone, expected: list[dict[str, object]]) -> None:
    """The user's stream from 0 holds each of its events once, each escrow's in
    sequence order, and the phone's own view ended equal to it."""
    with contextlib.suppress(WaitTimeout):  # the assertions below say what is missing
        wait_until(
            lambda: len(phone.events) >= len(expected),
            timeout=30,
            what=f"{phone.user}'s phone to hold its {len(expected)} events",
        )
    history, reset = read_events(served.base, phone.user, last_event_id="0", until_ready_and=0)
    assert not reset
    envelopes = [json.loads(e.data) for e in history]
    held = Counter(str(e["event_id"]) for e in envelopes)
    owed = Counter(str(e["event_id"]) for e in expected)
    assert held == owed, (
        f"{phone.user} (partition {served.names.partition_of(phone.user)}): missing "
        f"{[(e['type'], e['partition']) for e in expected if e['event_id'] in owed - held]}, "
        f"twice {list(held - owed)}"
    )
    by_escrow: dict[str, list[int]] = {}
    for e in envelopes:
        by_escrow.setdefault(e["aggregate_id"], []).append(e["sequence"])
    assert all(seqs == sorted(seqs) for seqs in by_escrow.values()), by_escrow
    ids = [e.id for e in history]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # Never a silent gap nor an event twice: what the phone holds is the history.
    assert [(e.id, e.data) for e in phone.events] == [(e.id, e.data) for e in history], (
        f"{phone.user}: resets={phone.resets} connections={phone.connections}"
    )


def _phones(served: Served, users: list[str]) -> list[Phone]:
    phones = [Phone(served.base, user) for user in users]
    for phone in phones:
        phone.start()
    for phone in phones:
        wait_until(phone.ready.is_set, timeout=30, what=f"{phone.user}'s replay to end")
    return phones


def test_phones_on_every_master_get_the_replay_then_live_events_in_order_once(
    served: Served,
) -> None:
    users = _phone_users(served, "live")
    owners = served.owners()
    assert len({owners[served.names.partition_of(u)] for u in users}) == 3
    load = Load(served.base, users, "live")
    load.start()
    load.wait_for(12)
    load.stop()
    phones = _phones(served, users)  # replay from 0 of the first escrows ...
    try:
        load = Load(served.base, users, "live-more")
        load.start()
        load.wait_for(12)  # ... then these, live
        load.stop()
        rows = _published_rows(served.store)
        for phone in phones:
            expected = _events_of(rows, phone.user)
            _assert_history(served, phone, expected)
            assert 0 < phone.replayed < len(expected)  # some replayed, the rest live
            assert phone.resets == 0 and phone.connections == 1
    finally:
        for phone in phones:
            phone.stopping.set()


# -- the failover ---------------------------------------------------------------------------


def _replica_of(cluster: LocalCluster, master: RedisServer) -> RedisServer:
    with master.client() as direct:
        info = direct.info("replication")
    port = int(info["slave0"]["port"])
    return next(n for n in cluster.nodes if n.port == port)


def _published_in(store: Store, partitions: set[int], after_seq: int) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).where(
                    outbox.c.seq > after_seq,
                    outbox.c.partition.in_(partitions),
                    outbox.c.published_at.is_not(None),
                )
            ).scalar_one()
        )


def _last_seq(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.max(outbox.c.seq))).scalar_one() or 0)


#: What the fan-out worker logs when the replicas of a node it wrote to did not
#: confirm a batch (``NotReplicated``): the batch stays unacked and comes back.
_NOT_REPLICATED = "did not confirm the fan-out"


def _ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _lose_the_tail_and_kill(
    served: Served, master: RedisServer, partitions: set[int], phones: list[Phone]
) -> list[Phone]:
    """SIGKILL ``master`` while its replica lacks what it acknowledged last; return
    the ``phones`` (of users on ``master``) that were sent an entry the replica
    never got.

    The replica is stopped (SIGSTOP) and the master takes a write larger than
    the loopback socket buffers can hold (48 MB), so everything after it (the
    relay's XADDs, the groups' positions and acks, the fan-out's user entries
    and markers, the leases) waits in the master's output buffer for the
    replica. Once the relay has published a few rows of ``partitions``
    (acknowledged: marked published in the outbox), some phone has been sent a
    live entry of the master written after the stall, and the fan-out has seen
    its ``WAIT`` on the master time out (so it holds that batch unacked), the
    master is killed and the replica resumed: it takes over without any of that.
    """
    replica = _replica_of(served.cluster, master)
    tag = served.names.partitioning.tags[min(partitions)]  # type: ignore[union-attr]
    assert replica.pid is not None
    mark = _last_seq(served.store)
    os.kill(replica.pid, signal.SIGSTOP)
    try:
        with master.client() as direct:
            direct.set(f"ballast:{{{tag}}}", b"x" * (48 << 20))
            seconds, micros = direct.time()  # entry ids after this ms: the master's alone
        since = int(seconds) * 1000 + int(micros) // 1000 + 1

        def doomed_phones() -> list[Phone]:
            return [p for p in phones if any(_ms(e.id) >= since for e in list(p.events))]

        wait_until(
            lambda: (
                _published_in(served.store, partitions, mark) >= 4
                and doomed_phones()
                and _NOT_REPLICATED in served.log("fanout")
            ),
            timeout=15,
            what="rows, phone entries and an unconfirmed fan-out on the doomed master",
        )
        served.cluster.kill(master)
        return doomed_phones()
    finally:
        os.kill(replica.pid, signal.SIGCONT)


def _without(served: Served, port: int) -> bool:
    """Whether no partition is served by ``port`` any more (its replica took over)."""
    try:
        return port not in served.owners().values()
    except (RedisError, RedisClusterException):  # the cluster is failing over
        return False


def _group_counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        query = select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name)
        return dict(conn.execute(query).all())  # type: ignore[arg-type]


def test_a_master_killed_under_load_loses_nothing_and_phones_continue_or_reset(
    served: Served,
) -> None:
    users = _phone_users(served, "failover")
    names = served.names
    owners = served.owners()
    doomed_port = owners[names.partition_of(users[0])]
    doomed = next(node for node in served.cluster.nodes if node.port == doomed_port)
    partitions = {p for p, port in owners.items() if port == doomed_port}
    phones = _phones(served, users)
    load = Load(served.base, users, "failover")
    load.start()
    prober = Prober(served.base)
    try:
        load.wait_for(20)
        prober.start()
        on_doomed = [p for p in phones if served.names.partition_of(p.user) in partitions]
        cut = _lose_the_tail_and_kill(served, doomed, partitions, on_doomed)
        wait_until(
            lambda: _without(served, doomed_port),
            timeout=30,
            what="the replica to take over the killed master's slots",
        )
        load.wait_for(len(load.escrows) + 20)
    finally:
        load.stop()
        statuses = prober.stop()
    # Through the failover: /healthz said 200 or 503 (never failed), /metrics answered.
    assert set(statuses["healthz"]) <= {200, 503} and statuses["healthz"][503], statuses
    assert set(statuses["metrics"]) == {200}, statuses
    rows = _published_rows(served.store)
    assert len(rows) == 2 * _escrow_count(served.store)  # created and cancelled, each once
    per_type = Counter(str(row["stream"]) for row in rows)
    wait_until(
        lambda: all(
            _group_counts(served.store).get(g, 0) == sum(per_type[a] for a in aggregate_types_of(g))
            for g in GROUPS
        ),
        timeout=60,
        what="every group to handle every event once",
    )
    # Each partition stream holds exactly its published rows: nothing lost, nothing twice.
    with served.cluster.client() as client:
        seen = inspect(client, names, dead_letter_groups=ALL_GROUPS)
    assert not seen.dead_letters  # no event was given up on, the fan-out's included
    held = {str(r["stream"]): r["length"] for r in seen.streams if r["length"]}
    assert held == dict(Counter(f"{row['stream']}:{row['partition']}" for row in rows))
    for phone in phones:
        _assert_history(served, phone, _events_of(rows, phone.user))
    # A phone sent an entry that was lost resumed from a lost id: it was told so.
    assert cut and all(phone.resets >= 1 for phone in cut)
    # The relay found streams behind the outbox and put the lost rows back (the
    # fan-out's batches the replica lacked were not acked: they came back).
    assert "Redis lost acknowledged entries" in served.log("relay"), served.log("relay")[-3000:]
    wait_until(served.healthy, timeout=30, what="/healthz to answer 200 again")
    assert httpx.get(f"{served.base}/metrics", timeout=10).status_code == 200
    cli = subprocess.run(
        [sys.executable, "-m", "workbench", "inspect", "--json", "--prefix", served.prefix,
         "--partitions", str(PARTITIONS), "--redis-url", served.url],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert sum(s["length"] for s in json.loads(cli.stdout)["streams"]) == len(rows)
    for phone in phones:
        phone.stopping.set()


def _escrow_count(store: Store) -> int:
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.type == "escrow.created")
            ).scalar_one()
        )


def test_serve_makes_the_fan_out_wait_for_replicas_only_where_every_master_has_one(
    redis_cluster: LocalCluster,
) -> None:
    url = redis_cluster.url.replace("redis://", "redis+cluster://")
    wait, warning = fanout_wait_replicas(url, {})  # the session's cluster has no replicas
    assert wait == "0" and warning and "3 cluster master(s) have no replica" in warning
    assert fanout_wait_replicas(url, {"WORKBENCH_WAIT_REPLICAS": "1"}) == (None, None)
    assert fanout_wait_replicas("redis://127.0.0.1:1", {}) == (None, None)
