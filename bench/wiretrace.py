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
(every packed send, and how many replies were read after it) and
:func:`sqlite3.connect` (a connection and cursor subclass that note every
``execute``, ``executemany``, ``commit`` and ``rollback`` with its parameters).
The hooks cost the recorded run time, so a recorded run is never a timed one.
:meth:`Trace.mark` takes the length so far, so what comes after a point (reading
the tables back) can be left out of the replay.

**Replaying** (:func:`replay`) sends each recorded send on a raw socket of its
own connection and reads as many replies with hiredis, and runs each statement
on a plain :mod:`sqlite3` connection with the recorded parameters, fetching its
rows. Redis and SQLite end where the run left them: the replay counts the error
replies and failed statements it meets, and they must match what the run met,
or the replay did other work and :class:`ReplayMismatch` says so.
"""

from __future__ import annotations

import pickle
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ReplayMismatch", "Replayed", "Trace", "record", "replay"]

#: An operation: ["redis", conn, payload, replies, errors] | ("sql", conn, sql, params, many)
#: | ("commit", conn) | ("rollback", conn). ``conn`` numbers the connection.
Op = tuple[Any, ...]


class ReplayMismatch(RuntimeError):
    """The replay met a different number of errors than the recorded run."""


@dataclass
class Trace:
    """What a run sent, in order, and the errors it met doing it."""

    ops: list[Op] = field(default_factory=list)
    sql_errors: int = 0
    _marked: tuple[int, int] | None = None

    @property
    def redis_errors(self) -> int:
        """Error replies, each noted on the send it answered."""
        return sum(op[4] for op in self.ops if op[0] == "redis")

    def mark(self) -> None:
        """Keep what was recorded up to now; later operations are not replayed."""
        self._marked = (len(self.ops), self.sql_errors)

    def save(self, path: Path) -> None:
        ops, sql_errors = self._marked or (len(self.ops), self.sql_errors)
        with path.open("wb") as out:
            pickle.dump((self.ops[:ops], sql_errors), out, pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path: Path) -> Trace:
        with path.open("rb") as src:
            ops, sql_errors = pickle.load(src)  # noqa: S301 - our own file
        return cls(ops, sql_errors)

    def counts(self) -> dict[str, int]:
        """Round trips (sends), replies, SQL statements and commits."""
        redis_ops = [op for op in self.ops if op[0] == "redis"]
        return {
            "round_trips": len(redis_ops),
            "replies": sum(op[3] for op in redis_ops),
            "sql_statements": sum(op[0] == "sql" for op in self.ops),
            "sql_commits": sum(op[0] == "commit" for op in self.ops),
        }


def record() -> Trace:
    """Hook redis-py and sqlite3 in this process; every later send and statement
    goes into the returned trace. For a process that exits after the run."""
    import redis.connection
    import redis.exceptions

    trace = Trace()
    ops, last_send, numbers = trace.ops, {}, {}

    def number(conn: object) -> int:
        return numbers.setdefault(id(conn), len(numbers))

    send = redis.connection.AbstractConnection.send_packed_command
    read = redis.connection.AbstractConnection.read_response

    def recorded_send(self: Any, command: Any, *args: Any, **kwargs: Any) -> Any:
        # After the send: a first send connects, and the handshake's own sends
        # (and their replies) go in before it, as they went on the wire.
        result = send(self, command, *args, **kwargs)
        payload = command if isinstance(command, bytes | str) else b"".join(command)
        data = payload.encode() if isinstance(payload, str) else payload
        op = ["redis", number(self), data, 0, 0]
        ops.append(op)
        last_send[id(self)] = op
        return result

    def recorded_read(self: Any, *args: Any, **kwargs: Any) -> Any:
        op = last_send.get(id(self))
        try:
            reply = read(self, *args, **kwargs)
        except redis.exceptions.ResponseError:
            if op is not None:
                op[3] += 1
                op[4] += 1
            raise
        if op is not None:
            op[3] += 1
        return reply

    redis.connection.AbstractConnection.send_packed_command = recorded_send  # type: ignore[method-assign]
    redis.connection.AbstractConnection.read_response = recorded_read  # type: ignore[method-assign]

    class Cursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:  # type: ignore[override]
            ops.append(("sql", self.connection.number, sql, parameters, False))  # type: ignore[attr-defined]
            with _counting_sql_errors(trace):
                return super().execute(sql, parameters)

        def executemany(self, sql: str, seq: Iterable[Any], /) -> Any:  # type: ignore[override]
            rows = list(seq)
            ops.append(("sql", self.connection.number, sql, rows, True))  # type: ignore[attr-defined]
            with _counting_sql_errors(trace):
                return super().executemany(sql, rows)

    class Connection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.number = number(self)

        def cursor(self, factory: Any = Cursor) -> Any:  # type: ignore[override]
            return super().cursor(factory)

        def commit(self) -> None:
            ops.append(("commit", self.number))
            with _counting_sql_errors(trace):
                super().commit()

        def rollback(self) -> None:
            ops.append(("rollback", self.number))
            super().rollback()

    connect = sqlite3.connect

    def recorded_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        return connect(*args, factory=Connection, **kwargs)

    sqlite3.connect = sqlite3.dbapi2.connect = recorded_connect  # type: ignore[assignment]
    return trace


@contextmanager
def _counting_sql_errors(trace: Trace) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error:
        trace.sql_errors += 1
        raise


@dataclass(frozen=True)
class Replayed:
    """A replay's wall seconds (the operations alone, connections open) and counts."""

    seconds: float
    round_trips: int
    sql_statements: int


def replay(trace: Trace, redis_address: str | tuple[str, int], database: Path) -> Replayed:
    """Replay ``trace`` against the Redis at ``redis_address`` (a unix socket path or
    host and port; empty, as the run found it) and a new SQLite file ``database``."""
    import hiredis

    numbers = {op[1] for op in trace.ops if op[0] == "redis"}
    sockets = {n: _open(redis_address) for n in numbers}
    readers = {n: hiredis.Reader() for n in numbers}
    dbs: dict[int, sqlite3.Connection] = {}
    for op in trace.ops:
        if op[0] != "redis" and op[1] not in dbs:
            dbs[op[1]] = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    redis_errors = sql_errors = 0
    try:
        started = time.perf_counter()
        for op in trace.ops:
            kind, conn = op[0], op[1]
            if kind == "redis":
                redis_errors += _round_trip(sockets[conn], readers[conn], op[2], op[3])
            elif kind == "sql":
                try:
                    if op[4]:
                        dbs[conn].executemany(op[2], op[3])
                    else:
                        dbs[conn].execute(op[2], op[3]).fetchall()
                except sqlite3.Error:
                    sql_errors += 1
            elif kind == "commit":
                dbs[conn].commit()
            else:
                dbs[conn].rollback()
        seconds = time.perf_counter() - started
    finally:
        for sock in sockets.values():
            sock.close()
        for db in dbs.values():
            db.close()
    if (redis_errors, sql_errors) != (trace.redis_errors, trace.sql_errors):
        raise ReplayMismatch(
            f"the replay met {redis_errors} Redis error replies and {sql_errors} failed "
            f"statements, the run {trace.redis_errors} and {trace.sql_errors}: it did other work"
        )
    counts = trace.counts()
    return Replayed(seconds, counts["round_trips"], counts["sql_statements"])


def _open(address: str | tuple[str, int]) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(address)
    return sock


def _round_trip(sock: socket.socket, reader: Any, payload: bytes, replies: int) -> int:
    """Send ``payload``, read ``replies`` replies; return how many were errors."""
    import hiredis

    sock.sendall(payload)
    errors = 0
    while replies:
        reply = reader.gets()
        if reply is False:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("Redis closed the connection during the replay")
            reader.feed(data)
            continue
        errors += isinstance(reply, hiredis.ReplyError)
        replies -= 1
    return errors
