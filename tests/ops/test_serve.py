"""`workbench serve` as a user runs it: embedded Redis, background workers, two API processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import httpx

from tests.http_support import ROOT, SECRET, auth, read_events
from workbench.ops.redis_server import free_port
from workbench.ops.waiting import wait_until
from workbench.streams.connection import connect


def _processes_mentioning(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_serve_runs_everything_and_stops_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    prefix = f"srv{uuid.uuid4().hex[:8]}"  # marks every child's command line
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env["WORKBENCH_SECRET"] = SECRET
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [sys.executable, "-m", "workbench", "serve", "--port", str(port), "--workers", "2",
         "--prefix", prefix, "--data-dir", str(tmp_path / "data")],
        env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(up, timeout=60, what="workbench serve to answer")
        created = httpx.post(
            f"{base}/escrows",
            json={"buyer_id": "amina", "seller_id": "baraka", "amount": 2500},
            headers=auth("amina"),
        )
        assert created.status_code == 201, created.text
        escrow_id = created.json()["escrow"]["id"]
        # The simulated M-Pesa posts its callback to the server by itself; like the
        # real one it sometimes fails the payment (10%): then the buyer pays again.
        state = "created"
        attempts = 0
        while state != "funded" and attempts < 8:
            attempts += 1
            funded = httpx.post(f"{base}/escrows/{escrow_id}/fund", headers=auth("amina"))
            assert funded.status_code == 200, funded.text
            state = wait_until(
                lambda: (
                    s
                    if (
                        s := httpx.get(f"{base}/escrows/{escrow_id}", headers=auth("amina")).json()[
                            "state"
                        ]
                    )
                    != "awaiting_payment"
                    else None
                ),
                timeout=30,
                what="the simulated callback",
            )
        assert state == "funded"
        expected = 2 + 2 * attempts  # created, then per attempt requested + received/failed
        got, reset = read_events(base, "amina", last_event_id="0", until_ready_and=expected)
        assert not reset
        types = [e.event for e in got]
        assert types[0] == "escrow.created"
        assert types.count("payment.requested") == attempts
        assert types.count("payment.failed") == attempts - 1
        assert types[-2:] == ["payment.received", "escrow.funded"]
        assert len(_processes_mentioning(prefix)) >= 6  # relay + five workers (+ serve)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
    assert serve.returncode == 0, (tmp_path / "serve.log").read_text()
    wait_until(
        lambda: not _processes_mentioning(prefix),
        timeout=30,
        what="every child of serve to exit",
    )
    assert (tmp_path / "data" / "workbench.db").exists()
    assert (tmp_path / "data" / "relay.log").exists()


def test_an_out_of_range_partition_count_is_an_exit_2_naming_the_option() -> None:
    for command in (["relay"], ["worker", "ledger"], ["inspect"], ["serve"]):
        done = subprocess.run(
            [sys.executable, "-m", "workbench", *command, "--partitions", "5000"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
            env={**os.environ, "REDIS_URL": "redis://127.0.0.1:1"},
        )  # fmt: skip
        assert done.returncode == 2, (command, done.stderr)
        assert "--partitions" in done.stderr and "5000" in done.stderr, done.stderr


def test_a_worker_or_relay_with_another_partition_count_than_the_log_exits_2(
    redis_url: str, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    prefix = f"cnt{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'db'}"}
    connect(redis_url).set(f"{prefix}:partitions", "16")
    for command in (["relay"], ["worker", "ledger"]):
        done = subprocess.run(
            [sys.executable, "-m", "workbench", *command, "--prefix", prefix, "--partitions", "8"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=env,
        )  # fmt: skip
        assert done.returncode == 2, (command, done.stderr)
        assert "has 16 partitions" in done.stderr and "started with 8" in done.stderr
        assert "Traceback" not in done.stderr


def test_an_unreachable_cluster_is_an_exit_2_message_not_a_traceback() -> None:
    for command in (["relay"], ["worker", "ledger"], ["timers"]):
        done = subprocess.run(
            [sys.executable, "-m", "workbench", *command, "--partitions", "4",
             "--redis-url", "redis+cluster://127.0.0.1:1"],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 2, (command, done.stderr)
        assert "cannot reach the Redis Cluster at redis+cluster://127.0.0.1:1" in done.stderr
        assert "Traceback" not in done.stderr
