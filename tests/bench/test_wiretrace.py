"""``bench/wiretrace.py``: a run's Redis and SQLite traffic, recorded in one process
and replayed by plain code in another, ends where the run ended, and a replay that
met other errors than the run is refused."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

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
    replayed = wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")
    assert replayed.round_trips == counts["round_trips"] and replayed.seconds > 0
    # Redis: what came before the mark, nothing after it.
    assert r.get("k") == b"v" and r.get("after") is None
    assert [entry_id for entry_id, _ in r.xrange("s")] == [b"1-0", b"2-0"]
    # SQLite: the committed rows, not the rolled-back or the late ones.
    replayed_rows = _rows(tmp_path / "replay.db")
    assert [row[1] for row in replayed_rows] == ["e0", "e1", "e2"]
    assert replayed_rows == [row for row in _rows(database) if row[1] != "late"]


def test_a_replay_that_meets_other_errors_is_refused(
    recorded: tuple[Path, Path], tmp_path: Path, redis_server: RedisServer
) -> None:
    trace = wiretrace.Trace.load(recorded[0])
    # Without the SET, the pipeline's INCR finds no "k" and succeeds: other work.
    [set_k] = [op for op in trace.ops if op[0] == "redis" and b"SET\r\n$1\r\nk\r\n" in op[2]]
    trace.ops.remove(set_k)
    with pytest.raises(wiretrace.ReplayMismatch, match="did other work"):
        wiretrace.replay(trace, _address(redis_server), tmp_path / "replay.db")
