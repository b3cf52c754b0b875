"""A run's Redis and SQLite traffic, recorded and then replayed by plain code.

The floor of a simulation's speed is what its own round trips and commits cost
with nothing else around them. Timing a PING and a one-row transaction and
multiplying by their counts gives a lower bound, but not the same work: an
XREADGROUP that returns entries, a pipeline of XADDs or a handler's transaction
of several statements costs the server and the database more than those. So
the anchor here is the best plain code for the very same shape: the bytes the
run sent to Redis and the statements it ran on SQLite, replayed in the same
order, on the same number of connections, in one process, by a loop that does
nothing else.

**Recording** (:func:`record`, in the process to be recorded, before it opens
any connection) hooks redis-py's :class:`~redis.connection.AbstractConnection`
(every packed send, each reply read after it, every disconnect) and
:func:`sqlite3.connect` (a connection and cursor subclass that note every
``execute``, ``executemany``, ``commit`` and ``rollback`` with its parameters).
The hooks cost the recorded run time, so a recorded run is never a timed one.
:meth:`Trace.mark` takes the length so far, so what comes after a point (reading
the tables back) can be left out of the replay.

**Leaner than the run.** The plain code does not open a transaction to read:
a transaction of SELECTs alone (the runtime's reads, ``Store.read``, begin a
deferred one, so that their statements see one snapshot; a write transaction
begins with ``BEGIN IMMEDIATE``) is replayed as its SELECTs, without its BEGIN
and its end.

**Replaying** (:func:`replay`) sends each recorded send on a raw socket of its
own connection and reads as many replies with hiredis, and runs each statement
on a plain :mod:`sqlite3` connection with the recorded parameters, fetching its
rows. Only that loop is timed. Then it checks that it did the run's work: every
reply the same as the run's (a digest of each, error replies as errors; replies
that tell the time or the server's state, such as INFO or XPENDING's idle
times, are left out) and every statement failing where the run's failed. A
replay that did other work raises :class:`ReplayMismatch` naming the first
difference. A trace with a command that waits (BLOCK, WAIT) is refused: its
replay would time the wait; so is one that used more than one SQLite database
(the replay has one file).
"""

from __future__ import annotations

import gc
import itertools
import pickle
import socket
import sqlite3
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hiredis

__all__ = ["ReplayMismatch", "Replayed", "Trace", "record", "replay"]

#: Operations, in the order the run made them (``n`` numbers the connection):
#: ``["redis", n, payload, names, digests, errors]`` (a send; the commands' names;
#: per reply read, its digest or None; per reply, whether it was an error),
#: ``["sql", n, sql, params, many, failed]``, ``["commit", n, failed]``,
#: ``["rollback", n]``, ``["reconnect", n]`` (redis-py dropped that connection),
#: ``["open", n, database]`` (a SQLite connection opened).
Op = list[Any]

#: Commands whose replies tell the time, the server's state or a connection's own
#: identity: not compared.
_UNCOMPARED = frozenset({
    b"INFO", b"TIME", b"XINFO", b"XPENDING", b"CLIENT", b"MEMORY", b"OBJECT", b"HELLO",
    b"PING", b"DBSIZE", b"CONFIG", b"SCAN", b"LASTSAVE", b"ROLE",
})  # fmt: skip
#: Commands that may wait for the server's clock or for others: refused.
_WAITING = frozenset({b"WAIT", b"WAITAOF", b"BLPOP", b"BRPOP", b"BLMOVE", b"BZPOPMIN",
                      b"BZPOPMAX", b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE"})  # fmt: skip


class ReplayMismatch(RuntimeError):
    """The replay did other work than the recorded run (another reply or failure)."""


@dataclass
class Trace:
    """What a run sent, in order, and what came back."""

    ops: list[Op] = field(default_factory=list)
    _started: int = 0
    _marked: int | None = None

    def start(self) -> None:
        """Replay from here: what was recorded before (a server's start) is left out."""
        self._started = len(self.ops)

    def mark(self) -> None:
        """Keep what was recorded up to now; later operations are not replayed."""
        self._marked = len(self.ops)

    def save(self, path: Path) -> None:
        kept = self.ops[self._started : self._marked if self._marked is not None else None]
        with path.open("wb") as out:
            pickle.dump(kept, out, pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: Path) -> Trace:
        with path.open("rb") as src:
            return cls(pickle.load(src))  # noqa: S301 - our own file

    @property
    def redis_errors(self) -> int:
        return sum(sum(op[5]) for op in self.ops if op[0] == "redis")

    @property
    def sql_errors(self) -> int:
        return sum(bool(op[-1]) for op in self.ops if op[0] in ("sql", "commit"))

    def counts(self) -> dict[str, int]:
        """Round trips (sends), replies, SQL statements and commits."""
        redis_ops = [op for op in self.ops if op[0] == "redis"]
        return {
            "round_trips": len(redis_ops),
            "replies": sum(len(op[4]) for op in redis_ops),
            "sql_statements": sum(op[0] == "sql" for op in self.ops),
            "sql_commits": sum(op[0] == "commit" for op in self.ops),
        }

    def lean(self) -> tuple[Trace, int]:
        """This trace without the BEGIN and end of transactions that only read;
        and how many such transactions there were."""
        drop: set[int] = set()
        open_at: dict[int, int] = {}  # connection -> index of its BEGIN
        reads_only: dict[int, bool] = {}
        for i, op in enumerate(self.ops):
            kind, conn = op[0], op[1]
            if kind == "sql" and _is_begin(op[2]):
                open_at[conn], reads_only[conn] = i, True
            elif kind == "sql" and conn in open_at:
                reads_only[conn] = reads_only[conn] and _is_read(op[2]) and not op[5]
            elif kind in ("commit", "rollback") and conn in open_at:
                begin = open_at.pop(conn)
                if reads_only.pop(conn) and not (kind == "commit" and op[2]):
                    drop.update((begin, i))
        kept = [op for i, op in enumerate(self.ops) if i not in drop]
        return Trace(kept), len(drop) // 2


def _is_begin(sql: str) -> bool:
    return sql.lstrip()[:5].upper() == "BEGIN"


def _is_read(sql: str) -> bool:
    return sql.lstrip()[:6].upper() == "SELECT"


def record() -> Trace:
    """Hook redis-py and sqlite3 in this process; every later send and statement
    goes into the returned trace. For a process that exits after the run."""
    import redis.connection
    import redis.exceptions

    trace = Trace()
    ops, numbers = trace.ops, itertools.count()
    abstract = redis.connection.AbstractConnection
    send, read = abstract.send_packed_command, abstract.read_response
    disconnect = abstract.disconnect

    def number(conn: Any) -> int:
        n = conn.__dict__.get("_wiretrace_number")
        if n is None:
            n = conn._wiretrace_number = next(numbers)
        return n  # type: ignore[no-any-return]

    def recorded_send(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        # After the send: a first send connects, and the handshake's own sends
        # (and their replies) go in before it, as they went on the wire.
        result = send(self, command, *args, **kwargs)
        payload = command if isinstance(command, bytes | str) else b"".join(command)
        data = payload.encode() if isinstance(payload, str) else payload
        op = ["redis", number(self), data, _names(data), [], []]
        ops.append(op)
        self._wiretrace_last = op
        return result

    def recorded_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        op = self.__dict__.get("_wiretrace_last")
        try:
            reply = read(self, *args, **kwargs)
        except redis.exceptions.ResponseError:
            if op is not None:
                op[4].append(None)
                op[5].append(True)
            raise
        if op is not None:
            op[4].append(_digest(reply))
            op[5].append(False)
        return reply

    def recorded_disconnect(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._sock is not None and "_wiretrace_number" in self.__dict__:
            ops.append(["reconnect", number(self)])
        self.__dict__.pop("_wiretrace_last", None)
        return disconnect(self, *args, **kwargs)

    abstract.send_packed_command = recorded_send  # type: ignore[method-assign]
    abstract.read_response = recorded_read  # type: ignore[method-assign]
    abstract.disconnect = recorded_disconnect  # type: ignore[method-assign]

    class Cursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:  # type: ignore[override]
            op = ["sql", self.connection.number, sql, parameters, False, False]  # type: ignore[attr-defined]
            ops.append(op)
            with _failing(op):
                return super().execute(sql, parameters)

        def executemany(self, sql: str, seq: Iterable[Any], /) -> Any:  # type: ignore[override]
            rows = list(seq)
            op = ["sql", self.connection.number, sql, rows, True, False]  # type: ignore[attr-defined]
            ops.append(op)
            with _failing(op):
                return super().executemany(sql, rows)

    class Connection(sqlite3.Connection):
        def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
            super().__init__(database, *args, **kwargs)
            self.number = next(numbers)
            ops.append(["open", self.number, str(database)])

        def cursor(self, factory: Any = Cursor) -> Any:  # type: ignore[override]
            return super().cursor(factory)

        # The shortcuts make their cursor in C, past cursor(): through it here.
        def execute(self, sql: str, parameters: Any = (), /) -> Any:  # type: ignore[override]
            return self.cursor().execute(sql, parameters)

        def executemany(self, sql: str, seq: Iterable[Any], /) -> Any:  # type: ignore[override]
            return self.cursor().executemany(sql, seq)

        def executescript(self, script: str, /) -> Any:  # type: ignore[override]
            raise NotImplementedError("wiretrace does not record executescript")

        def commit(self) -> None:
            op = ["commit", self.number, False]
            ops.append(op)
            with _failing(op):
                super().commit()

        def rollback(self) -> None:
            ops.append(["rollback", self.number])
            super().rollback()

    connect = sqlite3.connect

    def recorded_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        if "factory" in kwargs:
            raise TypeError("wiretrace records only connections made with its own factory")
        return connect(*args, factory=Connection, **kwargs)

    sqlite3.connect = sqlite3.dbapi2.connect = recorded_connect  # type: ignore[assignment]
    return trace


@contextmanager
def _failing(op: Op) -> Iterator[None]:
    """Note on ``op`` (its last item) that its statement failed."""
    try:
        yield
    except sqlite3.Error:
        op[-1] = True
        raise


def _names(payload: bytes) -> list[bytes]:
    """The command names in a packed send (a pipeline has several), upper case; a
    read with BLOCK is named ``BLOCK``, to be refused."""
    reader, names = hiredis.Reader(), []
    reader.feed(payload)
    while (command := reader.gets()) is not False:
        name = command[0].upper()
        if name in (b"XREAD", b"XREADGROUP") and any(a.upper() == b"BLOCK" for a in command):
            name = b"BLOCK"
        names.append(name)
    return names


def _digest(reply: Any) -> int | None:
    """A checksum of a reply as hiredis parsed it; None for an error reply."""
    if isinstance(reply, Exception):
        return None
    return zlib.crc32(repr(_plain(reply)).encode())


def _plain(reply: Any) -> Any:
    if isinstance(reply, Exception):
        return ("error",)
    if isinstance(reply, list | tuple):
        return [_plain(item) for item in reply]
    if isinstance(reply, dict):
        return [[_plain(k), _plain(v)] for k, v in reply.items()]
    if isinstance(reply, str):
        return reply.encode()
    return reply


@dataclass(frozen=True)
class Replayed:
    """A replay's wall seconds (the operations alone, connections open), what it
    did, how many read-only transactions it ran without their BEGIN and end, and
    the CPU seconds (user and system) the replaying process spent in those wall
    seconds, and redis-server's over them (when asked: ``replay(redis_cpu=...)``)."""

    seconds: float
    round_trips: int
    sql_statements: int
    lean_transactions: int
    cpu_s: float = 0.0
    redis_cpu_s: float | None = None


def replay(
    trace: Trace,
    redis_address: str | tuple[str, int],
    database: Path,
    *,
    redis_cpu: Callable[[], float] | None = None,
) -> Replayed:
    """Replay ``trace`` (made lean, :meth:`Trace.lean`) against the Redis at
    ``redis_address`` (a unix socket path or host and port; empty, as the run found
    it) and a new SQLite file ``database``. ``redis_cpu`` (redis-server's CPU
    seconds so far, asked on a connection of its own) is read right before and
    after the timed loop."""
    waiting = {n for op in trace.ops if op[0] == "redis" for n in op[3]} & (_WAITING | {b"BLOCK"})
    if waiting:
        raise ValueError(f"the trace has commands that wait ({sorted(waiting)}): not replayed")
    files = {op[2] for op in trace.ops if op[0] == "open"}
    if len(files) > 1:  # all are replayed on one file
        raise ValueError(f"the trace used {len(files)} SQLite databases: one is replayed")
    plan, lean_transactions = trace.lean()
    numbers = {op[1] for op in plan.ops if op[0] == "redis"}
    sockets = {n: _open(redis_address) for n in numbers}
    readers = {n: hiredis.Reader() for n in numbers}
    dbs: dict[int, sqlite3.Connection] = {}
    for op in plan.ops:
        if op[0] in ("sql", "commit", "rollback") and op[1] not in dbs:
            dbs[op[1]] = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    replies: list[list[Any]] = []
    failed: list[bool] = []
    gc.collect()
    gc.freeze()  # the trace is the replay's input, not work: out of the collector's sight
    try:
        redis_started = redis_cpu() if redis_cpu is not None else 0.0
        started, cpu_started = time.perf_counter(), time.process_time()
        for op in plan.ops:
            kind, conn = op[0], op[1]
            if kind == "redis":
                replies.append(_round_trip(sockets[conn], readers[conn], op[2], len(op[4])))
            elif kind == "sql":
                try:
                    if op[4]:
                        dbs[conn].executemany(op[2], op[3])
                    else:
                        dbs[conn].execute(op[2], op[3]).fetchall()
                    failed.append(False)
                except sqlite3.Error:
                    failed.append(True)
            elif kind == "commit":
                try:
                    dbs[conn].commit()
                    failed.append(False)
                except sqlite3.Error:
                    failed.append(True)
            elif kind == "rollback":
                dbs[conn].rollback()
            elif kind == "open":
                pass  # opened before the loop
            elif conn in sockets:  # reconnect: what was unread is gone with the old socket
                sockets[conn].close()
                sockets[conn], readers[conn] = _open(redis_address), hiredis.Reader()
        seconds = time.perf_counter() - started
        cpu_s = time.process_time() - cpu_started
        redis_cpu_s = redis_cpu() - redis_started if redis_cpu is not None else None
        _drained(sockets, readers)
    finally:
        gc.unfreeze()
        for sock in sockets.values():
            sock.close()
        for db in dbs.values():
            db.close()
    _compare(plan, replies, failed)
    counts = plan.counts()
    return Replayed(
        seconds,
        counts["round_trips"],
        counts["sql_statements"],
        lean_transactions,
        cpu_s,
        redis_cpu_s,
    )


def _open(address: str | tuple[str, int]) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(address)
    return sock


def _round_trip(sock: socket.socket, reader: Any, payload: bytes, count: int) -> list[Any]:
    """Send ``payload``, read ``count`` replies (as hiredis parses them)."""
    sock.sendall(payload)
    got: list[Any] = []
    while len(got) < count:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection during the replay")
            reader.feed(data)
            continue
        got.append(reply)
    return got


def _drained(sockets: dict[int, socket.socket], readers: dict[int, Any]) -> None:
    """Nothing left unread: a send answered with more replies than the run read would
    have shifted every later reply on its connection. A PING on each connection: the
    first reply after the loop must be its PONG."""
    for n, sock in sockets.items():
        [first] = _round_trip(sock, readers[n], hiredis.pack_command(("PING",)), 1)
        if first != b"PONG":
            raise ReplayMismatch(f"connection {n} has replies the run did not read")


def _compare(plan: Trace, replies: list[list[Any]], failed: list[bool]) -> None:
    redis_ops = [op for op in plan.ops if op[0] == "redis"]
    for i, (op, got) in enumerate(zip(redis_ops, replies, strict=True)):
        names = op[3] if len(op[3]) == len(got) else [b"?"] * len(got)
        for name, want, reply in zip(names, op[4], got, strict=True):
            if (want is None) != isinstance(reply, hiredis.ReplyError):
                raise ReplayMismatch(f"send {i} ({name.decode()}): an error reply in one of "
                                     f"the run and the replay, not the other ({reply!r:.80}): "
                                     "it did other work")  # fmt: skip
            if name not in _UNCOMPARED and want is not None and _digest(reply) != want:
                raise ReplayMismatch(f"send {i} ({name.decode()}): another reply than the "
                                     f"run's ({reply!r:.80}): it did other work")  # fmt: skip
    sql_ops = [op for op in plan.ops if op[0] in ("sql", "commit")]
    for i, (op, did_fail) in enumerate(zip(sql_ops, failed, strict=True)):
        if bool(op[-1]) != did_fail:
            what = op[2][:60] if op[0] == "sql" else "COMMIT"
            raise ReplayMismatch(f"statement {i} ({what}): {'failed' if did_fail else 'passed'} "
                                 f"in the replay, not in the run: it did other work")  # fmt: skip
