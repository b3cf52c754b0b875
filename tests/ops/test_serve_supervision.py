"""`workbench serve` supervises what it starts: real serve processes, real SIGKILLs, real HTTP.

Each child killed -9 while commands flow comes back by itself and ``/healthz``
names it while it is down; the run then ends with nothing lost or doubled.
serve SIGKILLed leaves no process behind; a second serve fails at once.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import func, select

from tests.http_support import ROOT, SECRET, auth
from workbench.domain import events as ev
from workbench.handlers import GROUPS, aggregate_types_of
from workbench.handlers.ledger import check_ledger
from workbench.ops.redis_server import free_port
from workbench.ops.waiting import WaitTimeout, wait_until
from workbench.store import Store, inbox, outbox


class Serve:
    """One `workbench serve` process with its own data dir and port."""

    def __init__(
        self, tmp: Path, *args: str, port: int | None = None, secret: str | None = SECRET,
        data: Path | None = None, log_name: str = "serve.log",
    ) -> None:  # fmt: skip
        self.port = port or free_port()
        self.data = data or tmp / "data"
        self.prefix = f"sup{uuid.uuid4().hex[:8]}"
        self.log_path = tmp / log_name
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("REDIS_URL", "DATABASE_URL", "WORKBENCH_SECRET")
        }
        if secret:
            env["WORKBENCH_SECRET"] = secret
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workbench", "serve", "--port", str(self.port),
                 "--prefix", self.prefix, "--data-dir", str(self.data), *args],
                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.base = f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> httpx.Response | None:
        assert self.process.poll() is None, self.log()
        try:
            return httpx.get(f"{self.base}/healthz", timeout=3)
        except httpx.HTTPError:
            return None

    def wait_healthy(self, timeout: float = 60) -> dict[str, Any]:
        def ok() -> dict[str, Any] | None:
            response = self.health()
            return response.json() if response is not None and response.status_code == 200 else None

        return wait_until(ok, timeout=timeout, what="serve's /healthz to answer 200")

    def components(self) -> dict[str, Any]:
        return json.loads((self.data / "supervision.json").read_text())["components"]

    def redis(self) -> redis.Redis:
        conf = (self.data / "redis" / "redis-auth.conf").read_text()
        password = re.search(r'requirepass "([^"]+)"', conf).group(1)  # type: ignore[union-attr]
        port = _redis_port(self)
        return redis.Redis(port=port, password=password, socket_timeout=5)

    def store(self) -> Store:
        return Store(f"sqlite:///{self.data / 'workbench.db'}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _redis_port(serve: Serve) -> int:
    pid = serve.components()["redis"]["pid"]
    # redis-server sets its process title to "<binary> 127.0.0.1:<port>".
    title = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    return int(re.search(r"127\.0\.0\.1:(\d+)", title).group(1))  # type: ignore[union-attr]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(root: int) -> set[int]:
    """Every live process below ``root`` (a /proc scan of parent pids)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {pid for pid in found if _alive(pid)}


class Load:
    """Buyers creating and funding escrows over HTTP until stopped, retrying through faults."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.stop = threading.Event()
        self.created = 0
        self.errors = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _call(self, method: str, path: str, user: str, **kwargs: Any) -> httpx.Response | None:
        key = uuid.uuid4().hex
        for _ in range(20):  # the same Idempotency-Key: a retry never doubles a command
            if self.stop.is_set():
                return None
            try:
                response = httpx.request(
                    method, f"{self.base}{path}", timeout=5,
                    headers={**auth(user), "Idempotency-Key": key}, **kwargs,
                )  # fmt: skip
                if response.status_code < 500:
                    return response
            except httpx.HTTPError:
                pass
            self.errors += 1
            self.stop.wait(0.2)
        return None

    def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            buyer, seller = f"buyer{i % 4}", f"seller{i % 3}"
            created = self._call(
                "POST", "/escrows", buyer,
                json={"buyer_id": buyer, "seller_id": seller, "amount": 100 + i},
            )  # fmt: skip
            if created is None or created.status_code != 201:
                continue
            self.created += 1
            self._call("POST", f"/escrows/{created.json()['escrow']['id']}/fund", buyer)
            self.stop.wait(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)


def _kill_and_see_it_come_back(serve: Serve, name: str, timeout: float = 30) -> None:
    before = serve.components()[name]
    os.kill(before["pid"], signal.SIGKILL)

    def named_down() -> dict[str, Any] | None:
        response = serve.health()
        if response is None or response.status_code != 503:
            return None
        body = response.json()
        return body if name in body["down"] else None

    body = wait_until(named_down, timeout=timeout, interval=0.02, what=f"/healthz to name {name}")
    assert body["components"][name]["up"] is False
    serve.wait_healthy(timeout)
    after = serve.components()[name]
    assert after["pid"] != before["pid"]
    assert after["restarts"] == before["restarts"] + 1
    assert after["state"] == "running"


def _nothing_lost_or_doubled(serve: Serve) -> None:
    """Ledger exact, every group's inbox complete, each user's stream = their events in order."""
    store = serve.store()
    client = serve.redis()
    try:

        def query(statement: Any) -> list[Any]:
            # A fresh connection each time: one held open would read one snapshot.
            with store.engine.connect() as conn:
                return list(conn.execute(statement).all())

        # Simulated callbacks keep coming 1-3 s after the last fund: wait until the
        # outbox has stopped growing for longer than that, and is all published.
        last: dict[str, Any] = {"rows": -1, "since": time.monotonic()}

        def settled() -> bool:
            rows = query(select(func.count(), func.count(outbox.c.published_at)))[0]
            if rows[0] != last["rows"]:
                last.update(rows=rows[0], since=time.monotonic())
            return rows[0] == rows[1] and time.monotonic() - last["since"] > 4.0

        wait_until(settled, timeout=45, what="the outbox to stop growing and be all published")
        rows = query(select(outbox.c.stream, outbox.c.data).order_by(outbox.c.seq))
        published = [(stream, ev.decode(data)) for stream, data in rows]
        assert len(published) > 20  # the load got through

        for group in GROUPS:
            wanted = {e.event_id for s, e in published if s in aggregate_types_of(group)}

            def handled(group: str = group) -> set[str]:
                return {row[0] for row in query(
                    select(inbox.c.event_id).where(inbox.c.group_name == group)
                )}  # fmt: skip

            try:
                wait_until(lambda g=group, w=wanted: handled(g) == w,  # type: ignore[misc]
                           timeout=45, what=f"the {group} inbox to hold every event")  # fmt: skip
            except WaitTimeout:
                pending = client.xpending(f"{serve.prefix}:escrow", group)
                assert handled(group) == wanted, (group, pending, serve.log()[-2000:])

        ledger = check_ledger(store)
        assert ledger.total == 0
        assert ledger.duplicate_postings == 0
        assert ledger.posted_events == ledger.expected_events > 0

        expected: dict[str, list[ev.Event]] = defaultdict(list)
        for _, event in published:
            for user in dict.fromkeys(event.user_ids):
                expected[user].append(event)

        def user_stream(user: str) -> list[str]:
            return [
                fields[b"event_id"].decode()
                for _, fields in client.xrange(f"{serve.prefix}:user:{user}")
            ]

        for user, events in expected.items():
            count = len(events)
            wait_until(lambda u=user, n=count: len(user_stream(u)) >= n,  # type: ignore[misc]
                       timeout=30, what=f"the stream of {user} to catch up")  # fmt: skip
            got = user_stream(user)
            assert len(got) == len(set(got)) == len(events), user  # nothing doubled or lost
            assert set(got) == {e.event_id for e in events}
            order = {e.event_id: (e.aggregate_id, e.sequence) for e in events}
            per_escrow: dict[str, list[int]] = defaultdict(list)
            for event_id in got:
                escrow, sequence = order[event_id]
                per_escrow[escrow].append(sequence)
            for escrow, sequences in per_escrow.items():
                assert sequences == sorted(sequences), (user, escrow)
    finally:
        client.close()
        store.close()


def _restarts_in_metrics(serve: Serve) -> dict[str, float]:
    text = httpx.get(f"{serve.base}/metrics", timeout=5).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(
            r'workbench_component_restarts_total\{component="([^"]+)"\} (\S+)', text
        )
    }


@pytest.mark.parametrize(
    "victims",
    [
        pytest.param(("redis", "relay", "timers", "api-0"), id="redis-relay-timers-api"),
        pytest.param(("ledger", "notifications", "push", "disputes", "fanout"), id="workers"),
    ],
)
def test_each_child_killed_comes_back_and_nothing_is_lost(tmp_path, victims) -> None:  # type: ignore[no-untyped-def]
    serve = Serve(tmp_path, "--workers", "2", "--restart-backoff", "1")
    try:
        first = serve.wait_healthy()
        assert first["down"] == []
        assert set(first["components"]) >= {"redis", "relay", "timers", *GROUPS, "api-1"}
        with Load(serve.base) as load:
            wait_until(lambda: load.created >= 5, timeout=30, what="the load to start")
            for name in victims:
                _kill_and_see_it_come_back(serve, name)
            made = load.created
            wait_until(lambda: load.created >= made + 5, timeout=30, what="commands after kills")
        _nothing_lost_or_doubled(serve)
        restarts = _restarts_in_metrics(serve)
        assert {name: restarts[name] for name in victims} == {name: 1.0 for name in victims}
        assert "restarted (pid" in serve.log()
    finally:
        serve.stop()
    assert serve.process.returncode == 0, serve.log()


def _token_claims(log: str) -> dict[str, Any]:
    token = re.search(r"access_token=([\w.-]+)", log).group(1)  # type: ignore[union-attr]
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def test_serve_sigkilled_leaves_no_process_and_a_new_serve_starts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # No secret, on loopback: allowed, with a loud warning and a short-lived token.
    serve = Serve(tmp_path, "--workers", "2", secret=None)
    try:
        serve.wait_healthy()
        log = serve.log()
        assert "WARNING: WORKBENCH_SECRET is not set" in log
        claims = _token_claims(log)
        assert claims["exp"] - claims["iat"] <= 3600
        created = httpx.post(
            f"{serve.base}/escrows",
            json={"buyer_id": "amina", "seller_id": "baraka", "amount": 700},
            headers=auth("amina") | {"Authorization": "Bearer " + _dev_token("amina")},
        )
        assert created.status_code == 201, created.text
        children = _descendants(serve.process.pid)
        names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children}
        assert any(b"redis-server" in argv for argv in names.values())
        assert sum(b"api-process" in argv for argv in names.values()) == 2
        assert len(children) >= 10  # redis, relay, timers, 5 workers, 2 API processes
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(10)
        wait_until(
            lambda: not [pid for pid in children if _alive(pid)],
            timeout=15,
            what="every child of the killed serve to die",
        )
        with pytest.raises(httpx.ConnectError):
            httpx.post(f"{serve.base}/escrows", json={}, timeout=2)
    finally:
        serve.stop()
    again = Serve(tmp_path, port=serve.port, data=serve.data, log_name="again.log", secret=None)
    try:
        again.wait_healthy()
        escrow_id = created.json()["escrow"]["id"]
        read = httpx.get(
            f"{again.base}/escrows/{escrow_id}",
            headers={"Authorization": "Bearer " + _dev_token("amina")},
        )
        assert read.status_code == 200, read.text  # same data dir: the store and Redis
    finally:
        again.stop()
    assert again.process.returncode == 0, again.log()


def _dev_token(user: str) -> str:
    from workbench.http.auth import issue_token, secret_from_env

    return issue_token(user, secret_from_env({}), ttl_s=600)


def test_a_second_serve_fails_at_once_with_a_clear_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    first = Serve(tmp_path)
    try:
        first.wait_healthy()
        pids_before = _descendants(first.process.pid)
        same_dir = Serve(tmp_path, data=first.data, log_name="same-dir.log")
        assert same_dir.process.wait(30) == 2, same_dir.log()
        assert "another workbench serve" in same_dir.log()
        assert str(first.process.pid) in same_dir.log()
        same_port = Serve(tmp_path, port=first.port, data=tmp_path / "other", log_name="port.log")
        assert same_port.process.wait(30) == 2, same_port.log()
        assert f"cannot listen on 127.0.0.1:{first.port}" in same_port.log()
        assert not (tmp_path / "other" / "redis").exists()  # refused before starting anything
        assert first.health() is not None and first.health().status_code == 200  # type: ignore[union-attr]
        assert _descendants(first.process.pid) == pids_before  # the first serve untouched
    finally:
        first.stop()


def test_a_reachable_host_without_a_secret_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    serve = Serve(tmp_path, "--host", "0.0.0.0", secret=None)
    assert serve.process.wait(30) == 2, serve.log()
    assert "WORKBENCH_SECRET is not set" in serve.log()
    assert "export WORKBENCH_SECRET=" in serve.log()
    assert "Traceback" not in serve.log()
    assert not serve.data.exists()  # nothing started, nothing written


def test_a_crash_looping_child_stops_serve_with_exit_1_naming_it(tmp_path) -> None:  # type: ignore[no-untyped-def]
    serve = Serve(tmp_path, "--restart-limit", "1", "--restart-backoff", "0.2")
    try:
        serve.wait_healthy()
        children = _descendants(serve.process.pid)
        _kill_and_see_it_come_back(serve, "relay")
        os.kill(serve.components()["relay"]["pid"], signal.SIGKILL)  # a 2nd crash within 60 s
        assert serve.process.wait(60) == 1, serve.log()
    finally:
        serve.stop()
    assert "giving up: relay exited (signal 9) after 1 restarts in 60 s" in serve.log()
    assert serve.components()["relay"]["state"] == "failed"
    wait_until(
        lambda: not [pid for pid in children if _alive(pid)],
        timeout=15,
        what="every child of serve to be stopped",
    )
