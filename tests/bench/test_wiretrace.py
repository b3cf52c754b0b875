"""``bench/wiretrace.py``: a run's Redis and SQLite traffic, recorded in one process
and replayed by plain code in another, ends where the run ended, and a replay that
met other errors than the run is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import hiredis
import pytest
import redis

from bench import wiretrace
from tests.support import ROOT
from workbench.ops.redis_server import RedisServer

# What a recorded process does: redis-py commands (one fails), a pipeline (one of its
# commands fails), SQLite transactions through the Store (one fails and rolls back),
# then a mark, and more of both that the replay must leave out.
_RECORDED = textwrap.dedent("""
    import sys
    from pathlib import Path

    import redis
    from bench import wiretrace
    from workbench.store import Store, inbox, insert_many

    trace = wiretrace.record()
    url, db, out = sys.argv[1:4]
    r = redis.Redis.from_url(url)
    r.set("k", "v")
    pipe = r.pipeline(transaction=False)
    pipe.xadd("s", {"a": "1"}, id="1-0").xadd("s", {"a": "2"}, id="2-0").incr("k")
    pipe.execute(raise_on_error=False)
    r.connection_pool.disconnect()  # dropped: the next command reconnects
    r.set("k2", "w")
    store = Store(f"sqlite:///{db}")
    store.create_schema()
    rows = [{"group_name": "g", "event_id": f"e{i}", "handled_at": float(i)} for i in range(3)]
    with store.begin() as conn:
        insert_many(conn, inbox, rows)
    try:
        with store.begin() as conn:  # the same keys again: fails, rolls back
            insert_many(conn, inbox, rows[:1])
    except Exception:
        pass
    with store.begin() as conn:  # reads only: BEGIN IMMEDIATE ... COMMIT in the run
        conn.exec_driver_sql("SELECT count(*) FROM inbox WHERE group_name = 'reads'").all()
    with store.read() as conn:  # the runtime's reads: a deferred BEGIN ... COMMIT
        conn.exec_driver_sql("SELECT count(*) FROM inbox WHERE group_name = 'snapshot'").all()
    import sqlite3
    plain = sqlite3.connect(db)  # the connection's own shortcut, past cursor()
    plain.execute("SELECT count(*) FROM inbox WHERE group_name = 'shortcut'").fetchall()
    plain.close()
    trace.mark()
    r.set("after", "1")
    with store.begin() as conn:
        insert_many(conn, inbox, [{"group_name": "g", "event_id": "late", "handled_at": 9.0}])
    trace.save(Path(out))
""")


def _address(server: RedisServer) -> str | tuple[str, int]:
    return str(server.socket_path) if server.socket_path else ("127.0.0.1", server.port)


def _rows(database: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(database) as db:
        return db.execute("SELECT * FROM inbox ORDER BY event_id").fetchall()


@pytest.fixture
def recorded(tmp_path: Path, redis_url: str, r: redis.Redis) -> tuple[Path, Path]:
    """A trace of :data:`_RECORDED` and the SQLite file it wrote; Redis flushed after."""
    trace, database = tmp_path / "run.trace", tmp_path / "run.db"
    done = subprocess.run(
        [sys.executable, "-c", _RECORDED, redis_url, str(database), str(trace)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert r.get("after") == b"1"  # the recorded process did run after the mark
    r.flushall()
    return trace, database


def test_a_replay_ends_where_the_run_ended_up_to_the_mark(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer, r: redis.Redis
) -> None:
    trace_path, database = recorded
    trace = wiretrace.Trace.load(trace_path)
    counts = trace.counts()
    assert counts["sql_commits"] >= 2 and counts["sql_statements"] >= 3
    assert trace.redis_errors >= 1 and trace.sql_errors == 1  # the incr, the duplicate key
    readings = iter([10.0, 10.25])  # redis-server's CPU, read right around the loop
    replayed = wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db",
                                redis_cpu=lambda: next(readings))  # fmt: skip
    assert replayed.round_trips == counts["round_trips"] and replayed.seconds > 0
    assert replayed.redis_cpu_s == 0.25 and next(readings, None) is None  # read twice
    assert replayed.cpu_s > 0  # the replaying process's own CPU over the loop
    # Redis: what came before the mark, nothing after it.
    assert r.get("k") == b"v" and r.get("k2") == b"w" and r.get("after") is None
    assert any(op[0] == "reconnect" for op in trace.ops)
    assert [entry_id for entry_id, _ in r.xrange("s")] == [b"1-0", b"2-0"]
    # SQLite: the committed rows, not the rolled-back or the late ones.
    replayed_rows = _rows(tmp_path / "replay.db")
    assert [row[1] for row in replayed_rows] == ["e0", "e1", "e2"]
    assert replayed_rows == [row for row in _rows(database) if row[1] != "late"]


def test_a_replay_is_leaner_than_the_run_and_as_durable(
    recorded: tuple[Path, Path],
    tmp_path: Path,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    sqls = [op[2] for op in trace.ops if op[0] == "sql"]
    assert any("'shortcut'" in sql for sql in sqls)  # Connection.execute was recorded
    [reads] = [i for i, op in enumerate(trace.ops) if op[0] == "sql" and "'reads'" in op[2]]
    assert trace.ops[reads - 1][2] == "BEGIN IMMEDIATE" and trace.ops[reads + 1][0] == "commit"
    [snapshot] = [i for i, op in enumerate(trace.ops) if op[0] == "sql" and "'snapshot'" in op[2]]
    assert trace.ops[snapshot - 1][2] == "BEGIN" and trace.ops[snapshot + 1][0] == "commit"
    lean, dropped = trace.lean()
    assert dropped >= 2 and len(lean.ops) == len(trace.ops) - 2 * dropped
    for read in ("'reads'", "'snapshot'"):
        [kept] = [i for i, op in enumerate(lean.ops) if op[0] == "sql" and read in op[2]]
        assert lean.ops[kept - 1][0] != "sql" or not lean.ops[kept - 1][2].startswith("BEGIN")
    # Transactions that write keep their BEGIN and COMMIT.
    assert lean.counts()["sql_commits"] >= 2
    executed: list[str] = []
    connect = sqlite3.connect

    def watched(*args: object, **kwargs: object) -> sqlite3.Connection:
        db = connect(*args, **kwargs)  # type: ignore[arg-type]
        db.set_trace_callback(executed.append)
        return db

    monkeypatch.setattr(sqlite3, "connect", watched)
    replayed = wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")
    monkeypatch.undo()
    assert replayed.lean_transactions == dropped
    begins = sum(op[0] == "sql" and op[2].startswith("BEGIN") for op in trace.ops)
    assert sum(sql.startswith("BEGIN") for sql in executed) == begins - dropped > 0
    assert any("'reads'" in sql for sql in executed)  # the SELECT itself still ran
    with sqlite3.connect(tmp_path / "replay.db") as db:  # the run's PRAGMAs replayed
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_replay_that_gets_another_reply_is_refused(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    # The second XADD's id 2-0 made 3-0: the same work to Redis, another reply.
    [pipeline] = [op for op in trace.ops if op[0] == "redis" and b"XADD" in op[2]]
    pipeline[2] = pipeline[2].replace(b"$3\r\n2-0\r\n", b"$3\r\n3-0\r\n")
    with pytest.raises(wiretrace.ReplayMismatch, match=r"send \d+ \(XADD\): another reply"):
        wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")


def test_a_replay_that_leaves_replies_unread_is_refused(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    last = [op for op in trace.ops if op[0] == "redis"][-1]  # SET k2: one reply
    last[4].clear()
    last[5].clear()  # as if the run had read none of it
    with pytest.raises(wiretrace.ReplayMismatch, match="replies the run did not read"):
        wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")


def test_a_dropped_connection_is_dropped_in_the_replay_too(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer, r: redis.Redis
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    [dropped] = [i for i, op in enumerate(trace.ops) if op[0] == "reconnect"]
    before = trace.ops[dropped - 1]
    assert before[0] == "redis" and b"XADD" in before[2]
    before[4].clear()
    before[5].clear()  # as if the run had read none of the pipeline's replies, then dropped
    # Its replies go with the old socket: SET k2 still gets its own OK.
    wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")
    assert r.get("k2") == b"w"


def test_a_replay_where_a_failed_statement_passes_is_refused(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    # Without the first insert, the duplicate one (which failed in the run) passes.
    first = next(op for op in trace.ops if op[0] == "sql" and op[2].startswith("INSERT"))
    trace.ops.remove(first)
    with pytest.raises(wiretrace.ReplayMismatch, match=r"statement \d+ \(INSERT.*passed"):
        wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")


def test_a_trace_of_two_databases_is_refused(tmp_path: Path) -> None:
    trace = wiretrace.Trace([["open", 0, "a.db"], ["open", 1, "b.db"]])
    with pytest.raises(ValueError, match="2 SQLite databases"):
        wiretrace.replay(trace, ("127.0.0.1", 1), tmp_path / "replay.db")


def test_a_trace_with_a_command_that_waits_is_refused(tmp_path: Path) -> None:
    blocking = hiredis.pack_command(("XREAD", "BLOCK", "0", "STREAMS", "s", "$"))
    names = wiretrace._names(blocking + hiredis.pack_command(("XADD", "s", "*", "a", "1")))
    assert names == [b"BLOCK", b"XADD"]
    trace = wiretrace.Trace([["redis", 0, blocking, names, [0], [False]]])
    with pytest.raises(ValueError, match="commands that wait"):
        wiretrace.replay(trace, ("127.0.0.1", 1), tmp_path / "replay.db")


def test_a_replay_that_meets_other_errors_is_refused(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    # Without the SET, the pipeline's INCR finds no "k" and succeeds: other work.
    [set_k] = [op for op in trace.ops if op[0] == "redis" and b"SET\r\n$1\r\nk\r\n" in op[2]]
    trace.ops.remove(set_k)
    with pytest.raises(wiretrace.ReplayMismatch, match="did other work"):
        wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")


def test_the_simulate_bench_counts_no_commit_for_a_read(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    """The bench's commits per event (and the bound it prices them in) are the floor's:
    the COMMIT of a transaction that only read (the two reads, an empty one) is not
    counted."""
    from bench import simulate

    trace = wiretrace.Trace.load(recorded[0])
    counts = simulate._save_and_count(trace, tmp_path / "saved.trace")
    _, read_only = trace.lean()
    assert read_only >= 2 and counts["sql_commits"] == trace.counts()["sql_commits"] - read_only
    assert counts["round_trips"] == trace.counts()["round_trips"] > 0
