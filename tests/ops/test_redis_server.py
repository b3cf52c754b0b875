"""The embedded redis-server: every binary (PATH, Valkey, Redis 6.2), fault
injection, no orphans."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from workbench.ops import affinity
from workbench.ops.redis_server import (
    KILLABLE,
    RedisServer,
    RedisServerError,
    find_binary,
    redis_url,
)
from workbench.ops.waiting import wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("binary", ["auto", "bundled", "valkey"])
def test_starts_answers_and_stops(tmp_path, binary) -> None:
    server = RedisServer(tmp_path, binary=binary)
    with server:
        assert server.client().ping()
        pid = server.pid
        assert pid is not None
    assert not server.running
    wait_until(lambda: not _alive(pid), timeout=30, what="redis-server to exit")


def test_bundled_binary_is_redis_6_2(tmp_path) -> None:
    with RedisServer(tmp_path, binary="bundled") as server:
        assert server.version[:2] == (6, 2)
        assert server.client().info("server")["redis_version"].startswith("6.2")


def test_valkey_binary_speaks_redis_7_2_and_has_waitaof(tmp_path) -> None:
    with RedisServer(tmp_path, binary="valkey", appendonly=True) as server:
        assert server.version[0] >= 8
        client = server.client()
        assert client.info("server")["redis_version"] >= "7.2"
        client.xadd("s", {"f": "v"})
        assert client.execute_command("WAITAOF", 1, 0, 2000)[0] == 1


def test_without_a_usable_path_server_the_fallback_is_valkey(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    assert "valkey" in find_binary("auto")
    with pytest.raises(RedisServerError, match="PATH"):
        find_binary("path")


def _dirty_the_disk(path, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
    # Another writer keeping the disk busy makes redis-server's background fsync
    # slow, the window in which `everysec` replies before writing the AOF.
    with open(path, "wb") as f:
        while not stop.is_set():
            f.seek(0)
            for _ in range(8):
                f.write(b"y" * (1 << 20))
            os.fsync(f.fileno())


@pytest.mark.parametrize("attempt", range(4))
def test_sigkill_loses_no_acknowledged_write_under_the_kill_safe_policy(tmp_path, attempt) -> None:
    # As a simulation runs it: one CPU for both, unix socket, one write per round trip.
    cpu = max(affinity.allowed_cpus())
    stop = threading.Event()
    writer = threading.Thread(target=_dirty_the_disk, args=(tmp_path / "big", stop))
    writer.start()
    try:
        with (
            affinity.pinned(cpu),
            RedisServer(
                tmp_path / "redis", **KILLABLE,  # type: ignore[arg-type]
                cpu=cpu, unix_socket=True,
            ) as server,
        ):  # fmt: skip
            client = server.client()
            ids = [client.xadd("s", {"n": n, "pad": "x" * 100}) for n in range(15_000)]
            server.kill()
            assert not server.running
            server.restart()
            assert client.xlen("s") == len(ids)
            assert [i for i, _ in client.xrange("s", count=10, min=ids[-10])] == ids[-10:]
    finally:
        stop.set()
        writer.join()


def test_kill_without_aof_loses_the_data(tmp_path) -> None:
    with RedisServer(tmp_path, appendonly=False) as server:
        client = server.client()
        client.xadd("s", {"n": 1})
        server.kill()
        server.restart()
        assert client.xlen("s") == 0


def test_no_orphan_when_the_owner_is_sigkilled(tmp_path) -> None:
    code = (
        "import sys, time\n"
        "from workbench.ops.redis_server import RedisServer\n"
        f"s = RedisServer({str(tmp_path)!r}).start()\n"
        "print(s.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(owner.stdout.readline())  # type: ignore[union-attr]
    assert _alive(pid)
    owner.send_signal(signal.SIGKILL)
    owner.wait(10)
    wait_until(lambda: not _alive(pid), timeout=30, what="redis-server to die with its owner")


_MUTE_SERVER = """#!{python}
import socket, sys
if "--version" in sys.argv:
    print("Redis server v=7.0.0 sha=0 malloc=libc bits=64 build=0")
    sys.exit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])
listener = socket.create_server(("127.0.0.1", port))
held = []
while True:  # takes every connection, answers none: a server whose disk stalled
    held.append(listener.accept()[0])
"""


def test_a_server_that_takes_connections_but_never_answers_fails_its_start_in_time(
    tmp_path,
) -> None:
    """The start's PING probe tries once per PING: with redis-py's retries one probe
    of such a server lasted about 11 s, past a 2 s deadline (and a Ctrl-C held during
    the start waited as long). The process is killed: no orphan."""
    fake = tmp_path / "mute-redis-server"
    fake.write_text(_MUTE_SERVER.format(python=sys.executable))
    fake.chmod(0o755)
    server = RedisServer(tmp_path / "data", binary=str(fake), start_timeout=2)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="redis-server to answer PING"):
        server.start()
    assert time.monotonic() - started < 5
    assert not server.running


def test_bad_options_and_binaries_fail_clearly(tmp_path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(tmp_path, appendfsync="sometimes")
    with pytest.raises(RedisServerError, match="not an executable"):
        find_binary(str(tmp_path / "nope"))


def test_redis_url_prefers_an_external_server(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with redis_url(tmp_path) as url:
        assert url == "redis://127.0.0.1:1/0"
    monkeypatch.delenv("REDIS_URL")
    with redis_url(tmp_path / "own") as url:
        assert url.startswith("redis://127.0.0.1:")


def test_unix_socket_url_answers_and_survives_a_restart(tmp_path) -> None:
    with RedisServer(tmp_path, unix_socket=True, appendonly=True) as server:
        assert server.url.startswith("unix://") and server.socket_path is not None
        client = server.client()
        client.set("k", "v")
        server.restart()
        assert server.client().get("k") == b"v"
        assert redis.Redis(port=server.port).ping()  # TCP still listens, for tools


def test_unix_socket_falls_back_to_tcp_when_the_path_is_too_long(tmp_path) -> None:
    deep = tmp_path / ("d" * 120)
    with RedisServer(deep, unix_socket=True) as server:
        assert server.socket_path is None and server.url.startswith("redis://127.0.0.1:")
        assert server.client().ping()


@pytest.mark.parametrize("unix_socket", [False, True])
def test_password_is_required_kept_across_restarts_and_not_on_the_command_line(
    tmp_path, unix_socket
) -> None:  # type: ignore[no-untyped-def]
    password = "s3cret-" + os.urandom(8).hex()
    server = RedisServer(tmp_path / "r", password=password, unix_socket=unix_socket, **KILLABLE)
    with server:
        assert server.client().set("k", "v")
        stranger = redis.Redis(port=server.port, socket_timeout=2)
        with pytest.raises(redis.AuthenticationError):
            stranger.ping()
        stranger.close()
        with open(f"/proc/{server.pid}/cmdline", "rb") as f:
            assert password.encode() not in f.read()
        conf = tmp_path / "r" / "redis-auth.conf"
        assert conf.stat().st_mode & 0o777 == 0o600
        server.kill()
        assert not server.running
        server.start()
        assert server.client().get("k") == b"v"  # same dir and AOF, same password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, socket_timeout=2).ping()


def test_a_password_that_does_not_fit_a_url_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="password"):
        RedisServer(tmp_path, password='a"b c')
