"""Real processes for HTTP tests: API servers, the relay, the fan-out worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
from httpx_sse import EventSource, ServerSentEvent, connect_sse

from workbench.http.auth import issue_token
from workbench.ops.redis_server import free_port
from workbench.ops.waiting import wait_until
from workbench.payments.daraja import DarajaStub

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-0123456789abcdef0123456789abcdef"


@dataclass
class Deployment:
    """A running service: API processes plus background workers, all real processes."""

    redis_url: str
    database_url: str
    tmp: Path
    prefix: str = "wb"
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    # The API processes' M-Pesa (``--mpesa external``): a local Daraja over real HTTP.
    daraja: DarajaStub = field(default_factory=DarajaStub)

    @property
    def env(self) -> dict[str, str]:
        return dict(
            os.environ,
            REDIS_URL=self.redis_url,
            DATABASE_URL=self.database_url,
            WORKBENCH_SECRET=SECRET,
            WORKBENCH_PREFIX=self.prefix,
            # Heartbeats slower than the clients' read timeout, so a stalled
            # stream fails the test instead of idling forever.
            WORKBENCH_SSE_PING_S="60",
            # Unanswered STK queries are asked again soon, so tests need not wait.
            WORKBENCH_MPESA_RETRY_S="0.3",
            **self.daraja.env,
        )

    def _spawn(
        self, name: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [sys.executable, "-m", "workbench", *argv],
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.processes[name] = process
        return process

    def start_api(self, *, mpesa: str = "external", extra_env: dict[str, str] | None = None) -> str:
        """Start one API process; return its base URL once /healthz answers."""
        port = free_port()
        name = f"api-{len(self.ports)}"
        self._spawn(
            name,
            "serve", "--api-only", "--debug", "--port", str(port), "--mpesa", mpesa,
            "--prefix", self.prefix, "--data-dir", str(self.tmp / name),
            env=extra_env,
        )  # fmt: skip
        self.ports.append(port)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: self._healthy(url, name), timeout=30, what=f"{name} to answer /healthz")
        return url

    def _healthy(self, url: str, name: str) -> bool:
        process = self.processes[name]
        if process.poll() is not None:
            log = (self.tmp / f"{name}.log").read_text(errors="replace")
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log[-3000:]}")
        try:
            response = httpx.get(f"{url}/healthz", timeout=1)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["live_feed"]

    def start_relay(self) -> subprocess.Popen[bytes]:
        return self._spawn("relay", "relay", "--prefix", self.prefix)

    def start_worker(self, group: str, *args: str, name: str | None = None) -> Any:
        return self._spawn(
            name or group,
            "worker",
            group,
            "--prefix",
            self.prefix,
            "--block-ms",
            "100",
            "--dead-after",
            "1.0",
            *args,
        )

    def stop(self) -> None:
        self.daraja.close()
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def user_stream(self, user: str) -> list[tuple[str, str]]:
        """(entry id, event id) of every entry in the user's stream: the published truth."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            rows = client.xrange(f"{self.prefix}:user:{user}")
        finally:
            client.close()
        return [(i.decode(), f[b"event_id"].decode()) for i, f in rows]

    def wait_fanned_out(self, user: str, count: int, timeout: float = 60) -> list[tuple[str, str]]:
        """Wait until the user's stream holds ``count`` entries; return them."""
        return wait_until(
            lambda: len(s := self.user_stream(user)) == count and s,
            timeout=timeout,
            what=f"{count} entries in the stream of {user}",
        )

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")


def token(user: str, ttl_s: float = 3600) -> str:
    return issue_token(user, SECRET, ttl_s=ttl_s)


def auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


def read_events(
    base: str,
    user: str,
    *,
    last_event_id: str | None = None,
    stop_after: int | None = None,
    until_ready_and: int | None = None,
    timeout: float = 20.0,
) -> tuple[list[ServerSentEvent], bool]:
    """Open the user's SSE stream and read domain events.

    Stops after ``stop_after`` domain events (a client walking away mid-stream),
    or once ``ready`` was seen and ``until_ready_and`` events in total arrived.
    Returns (domain events, whether a ``reset`` was received).
    """
    headers = auth(user)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    got: list[ServerSentEvent] = []
    ready = False
    with (
        httpx.Client(timeout=httpx.Timeout(timeout, connect=5)) as client,
        connect_sse(client, "GET", f"{base}/users/{user}/events", headers=headers) as source,
    ):
        _check(source)
        for sse in source.iter_sse():
            if sse.event == "reset":
                return got, True
            if sse.event == "ready":
                ready = True
            elif sse.event and sse.event != "message":
                got.append(sse)
                if stop_after is not None and len(got) >= stop_after:
                    break
            if ready and until_ready_and is not None and len(got) >= until_ready_and:
                break
    return got, False


def _check(source: EventSource) -> None:
    response = source.response
    if response.status_code != 200:
        response.read()
        raise AssertionError(f"SSE answered {response.status_code}: {response.text}")


def gateway_callback(
    deployment: Deployment,
    checkout: str,
    code: int,
    *,
    amount: int = 1500,
    phone: str = "254700000000",
    receipt: str = "SAB12CD34E",
    settle: bool = True,
) -> httpx.Response:
    """What Daraja does when the buyer answers: settle the result, post the callback
    to the CallBackURL given with the push (only the gateway knows it)."""
    from workbench.payments.mpesa import stk_callback

    push = deployment.daraja.pushes[checkout]
    if settle:
        deployment.daraja.settle(checkout, code)
    body = stk_callback(checkout, code, amount=amount, receipt=receipt, phone=phone)
    return httpx.post(push.callback_url, json=body)
