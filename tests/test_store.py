"""The inbox: which event ids are new to a group, inside the effect's transaction."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    bindparam,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.exc import IntegrityError

from tests.support import ROOT
from workbench import store as store_module
from workbench.store import (
    Prepared,
    Store,
    claim_inbox,
    inbox,
    insert_many,
    mark_published,
    notifications,
    outbox,
)


def _count(store: Store, group: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(
            select(func.count()).select_from(inbox).where(inbox.c.group_name == group)
        ).scalar_one()


def test_new_ids_are_all_claimed(store: Store) -> None:
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e1", "e2", "e3"], 1.0) == {"e1", "e2", "e3"}
    assert _count(store, "ledger") == 3


def test_seen_ids_are_not_claimed_again_and_new_ones_in_the_batch_are(store: Store) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1", "e2"], 1.0)
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e2", "e3", "e1", "e4"], 2.0) == {"e3", "e4"}
    assert _count(store, "ledger") == 4


def test_a_duplicate_inside_one_batch_counts_once(store: Store) -> None:
    with store.begin() as conn:
        assert claim_inbox(conn, "ledger", ["e1", "e1", "e2"], 1.0) == {"e1", "e2"}
    assert _count(store, "ledger") == 2


def test_groups_have_separate_inboxes(store: Store) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        assert claim_inbox(conn, "push", ["e1"], 1.0) == {"e1"}


def test_a_conflict_keeps_the_rest_of_the_transaction(store: Store) -> None:
    """The fast path's failed insert rolls back to its savepoint, not the transaction."""
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        assert claim_inbox(conn, "ledger", ["e1", "e2"], 1.0) == {"e2"}
    assert _count(store, "ledger") == 2


def test_a_rolled_back_transaction_claims_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1"], 1.0)
        raise RuntimeError("the effect failed")
    assert _count(store, "ledger") == 0


# -- Prepared: statements run on the driver's cursor ---------------------------------


def test_insert_many_writes_every_row_across_multi_row_statements(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def row(i: int) -> dict[str, object]:
        return {"event_id": f"e{i}", "user_id": f"u{i % 7}", "channel": "sms",
                "body": f"text {i}", "at": float(i)}  # fmt: skip

    # 1201 rows: two full statements of 500 and one of 201.
    with store.begin() as conn:
        insert_many(conn, notifications, [row(i) for i in range(1201)])
    # Few parameters per statement allowed: 2 rows of 5 columns per statement.
    monkeypatch.setattr(store_module, "_PARAMS_PER_INSERT", 12)
    with store.begin() as conn:
        insert_many(conn, notifications, [row(i) for i in range(1201, 1206)])
    monkeypatch.undo()
    # The connection's own limit (an SQLite older than 3.32 allows 999): 3 rows.
    with store.begin() as conn:
        if conn.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            before = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 15)
        try:
            insert_many(conn, notifications, [row(i) for i in range(1206, 1213)])
        finally:
            if conn.dialect.name == "sqlite":
                raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)
    with store.engine.connect() as conn:
        got = conn.execute(
            select(notifications.c.event_id, notifications.c.user_id, notifications.c.at)
        ).all()
    assert sorted(got, key=lambda r: r.at) == [
        (f"e{i}", f"u{i % 7}", float(i)) for i in range(1213)
    ]


def test_mark_published_marks_each_row_with_its_id_and_keeps_an_earlier_mark(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    def row(i: int) -> dict[str, object]:
        return {"event_id": f"e{i}", "stream": "escrow", "type": "T", "data": b"x",
                "created_at": 0.0, "partition": 0}  # fmt: skip

    with store.begin() as conn:
        conn.execute(insert(outbox), [row(i) for i in range(1203)])
        seqs = [s for (s,) in conn.execute(select(outbox.c.seq).order_by(outbox.c.seq))]
    first, rest = seqs[:2], seqs[2:]
    with store.begin() as conn:  # two rows another relay marked first
        mark_published(conn, 1.0, [(s, f"1-{s}") for s in first])
    # 1203 rows: three statements (500, 500, 203); the first two rows keep their marks.
    with store.begin() as conn:
        mark_published(conn, 2.0, [(s, f"2-{s}") for s in seqs])
    # The connection's own parameter limit (6: two rows and the time per statement).
    with store.begin() as conn:
        conn.execute(outbox.update().where(outbox.c.seq.in_(rest[-10:])).values(published_at=None))
        if conn.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            before = raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 6)
        try:
            mark_published(conn, 3.0, [(s, f"3-{s}") for s in rest[-10:]])
        finally:
            if conn.dialect.name == "sqlite":
                raw.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, before)
    with store.engine.connect() as conn:
        got = dict(
            (
                (s, (at, sid))
                for s, at, sid in conn.execute(
                    select(outbox.c.seq, outbox.c.published_at, outbox.c.stream_id)
                )
            )
        )
    want = {s: (1.0, f"1-{s}") for s in first}
    want |= {s: (2.0, f"2-{s}") for s in rest[:-10]}
    want |= {s: (3.0, f"3-{s}") for s in rest[-10:]}
    assert got == want


def test_insert_many_fails_whole_on_a_constraint_and_the_caller_can_roll_back(
    store: Store,
) -> None:
    rows = [{"group_name": "g", "event_id": e, "handled_at": 1.0} for e in ("a", "b", "a")]
    with pytest.raises(IntegrityError), store.begin() as conn:
        insert_many(conn, inbox, rows)
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(inbox)).scalar_one() == 0


def test_prepared_runs_in_the_callers_transaction_and_rolls_back_with_it(store: Store) -> None:
    insert_event = Prepared(
        insert(inbox).values(
            group_name=bindparam("g"), event_id=bindparam("e"), handled_at=bindparam("t")
        )
    )
    with pytest.raises(RuntimeError), store.begin() as conn:
        insert_event.execute(conn, {"g": "ledger", "e": "e1", "t": 1.0})
        raise RuntimeError("the command failed after its insert")
    assert _count(store, "ledger") == 0
    with store.begin() as conn:
        insert_event.executemany(conn, [{"g": "ledger", "e": f"e{i}", "t": 1.0} for i in range(3)])
    assert _count(store, "ledger") == 3


def test_prepared_raises_sqlalchemys_integrity_error(store: Store) -> None:
    """Callers (command retries, the inbox) catch one family of errors, whatever the driver."""
    insert_event = Prepared(
        insert(inbox).values(group_name="ledger", event_id=bindparam("e"), handled_at=1.0)
    )
    with store.begin() as conn:
        insert_event.execute(conn, {"e": "e1"})
    with pytest.raises(IntegrityError), store.begin() as conn:
        insert_event.execute(conn, {"e": "e1"})
    with pytest.raises(IntegrityError), store.begin() as conn:
        insert_event.executemany(conn, [{"e": "e2"}, {"e": "e1"}])
    assert _count(store, "ledger") == 1  # the failed batch left nothing behind


def test_prepared_reads_plain_rows_with_fixed_and_passed_parameters(store: Store) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "ledger", ["e1", "e2", "e3"], 1.0)
    first_two = Prepared(
        select(inbox.c.event_id)
        .where(inbox.c.group_name == bindparam("g"))
        .order_by(inbox.c.event_id)
        .limit(2)  # a value fixed in the statement
    )
    count_all = Prepared(select(func.count()).select_from(inbox))  # no parameters at all
    with store.engine.connect() as conn:
        assert first_two.execute(conn, {"g": "ledger"}).fetchall() == [("e1",), ("e2",)]
        assert first_two.first(conn, {"g": "push"}) is None
        assert count_all.first(conn) == (3,)


def test_each_thread_gets_its_own_transaction_connection(store: Store) -> None:
    seen: list[object] = []

    def work() -> None:
        with store.begin() as conn:
            seen.append(conn)
            claim_inbox(conn, "push", [f"t{len(seen)}"], 1.0)

    for _ in range(2):
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    work()
    work()
    assert _count(store, "push") == 4
    if store.dialect == "sqlite":  # one connection per thread, kept between transactions
        assert seen[2] is seen[3] and len({id(c) for c in seen}) == 3


def test_threads_holding_their_connections_do_not_starve_the_pool(store: Store) -> None:
    """More threads than SQLAlchemy's default pool (5 + 10) each keep their transaction
    connection (SQLite), as an API process's request threads do; a plain checkout
    still gets a connection at once (it waited 30 s and failed when the pool was capped)."""
    for i in range(20):
        thread = threading.Thread(target=lambda i=i: claim_inbox_once(store, f"p{i}"), daemon=True)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), f"thread {i} got no connection: the pool is exhausted"
    got = threading.Event()

    def checkout() -> None:
        with store.engine.connect() as conn:
            conn.execute(select(1))
        got.set()

    threading.Thread(target=checkout, daemon=True).start()
    assert got.wait(timeout=10), "no connection for a new checkout: the pool is exhausted"
    assert _count(store, "push") == 20


def claim_inbox_once(store: Store, event_id: str) -> None:
    with store.begin() as conn:
        claim_inbox(conn, "push", [event_id], 1.0)


def test_an_outbox_made_before_its_newer_columns_gets_them_and_their_index(store: Store) -> None:
    old = MetaData()
    Table(
        "outbox",
        old,
        Column("seq", Integer, primary_key=True, autoincrement=True),
        Column("event_id", String(64), nullable=False, unique=True),
        Column("stream", String(32), nullable=False),
        Column("type", String(64), nullable=False),
        Column("data", LargeBinary, nullable=False),
        Column("created_at", Float, nullable=False),
        Column("published_at", Float),
        Index("ix_outbox_unpublished", "published_at", "seq"),
    )
    outbox.drop(store.engine)
    old.create_all(store.engine)
    with store.engine.begin() as conn:
        conn.execute(
            insert(old.tables["outbox"]),
            {"event_id": "e1", "stream": "escrow", "type": "t", "data": b"{}", "created_at": 1.0},
        )
    store.create_schema()
    found = inspect(store.engine)
    assert {"stream_id", "partition"} <= {c["name"] for c in found.get_columns("outbox")}
    indexes = {i["name"] for i in found.get_indexes("outbox")}
    assert {"ix_outbox_pending", "ix_outbox_partition_pending"} <= indexes
    assert "ix_outbox_unpublished" not in indexes  # replaced by the partial one
    with store.engine.connect() as conn:  # the old row is kept, its new columns NULL
        assert conn.execute(select(outbox.c.event_id, outbox.c.partition)).all() == [("e1", None)]
    store.create_schema()  # and again: nothing left to add


def test_indexes_of_earlier_schemas_are_dropped_and_the_rows_kept(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX ix_notifications_user ON notifications (user_id)")
        conn.exec_driver_sql("CREATE INDEX ix_ledger_escrow ON ledger_entries (escrow_id)")
        conn.execute(
            insert(notifications),
            {"event_id": "e1", "user_id": "u1", "channel": "sms", "body": "b", "at": 1.0},
        )

    def names(table: str) -> set[str]:
        return {i["name"] for i in inspect(store.engine).get_indexes(table)}

    assert "ix_notifications_user" in names("notifications")
    store.create_schema()
    assert "ix_notifications_user" not in names("notifications")
    assert "ix_ledger_escrow" not in names("ledger_entries")
    assert "ix_ledger_account" in names("ledger_entries")
    with store.engine.connect() as conn:
        assert conn.execute(select(notifications.c.user_id)).scalars().all() == ["u1"]


def _outbox_rows(store: Store, *, published: int, waiting: int) -> None:
    """``published`` rows marked published (seq 1 on), then ``waiting`` unpublished ones."""
    rows = [
        {"event_id": f"e{i}", "stream": "escrow", "type": "t", "data": b"{}",
         "created_at": 1.0, "partition": i % 4}
        for i in range(published + waiting)
    ]  # fmt: skip
    with store.begin() as conn:
        conn.execute(insert(outbox), rows)
        mark_published(conn, 2.0, [(seq, f"{seq}-0") for seq in range(1, published + 1)])


@pytest.mark.parametrize("store", ["sqlite"], indirect=True)
def test_the_pending_indexes_hold_the_backlog_only_and_serve_the_relays_read(
    store: Store,
) -> None:
    from workbench.streams.keys import StreamNames
    from workbench.streams.relay import OutboxRelay

    _outbox_rows(store, published=190, waiting=10)
    raw = sqlite3.connect(store.engine.url.database)
    # Planned as a running store plans it: without ANALYZE's statistics.
    relay = OutboxRelay(store, None, names=StreamNames("t"))  # type: ignore[arg-type]
    for partitions in (0, 2):
        sql, bind = relay._query(partitions)._compiled(store.engine.dialect)
        params = bind({f"p{i}": i for i in range(partitions)})
        plan = " ".join(row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + sql, params))
        # Through a pending index (a plain "SCAN outbox" would read every row).
        assert "USING INDEX ix_outbox_p" in plan, plan
    raw.execute("ANALYZE")  # sqlite_stat1: each index's entry count, first
    entries = dict(raw.execute("SELECT idx, stat FROM sqlite_stat1 WHERE tbl = 'outbox'"))
    assert entries["ix_outbox_pending"].split()[0] == "10"
    assert entries["ix_outbox_partition_pending"].split()[0] == "10"
    raw.close()


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgresql_create_schema_waits_for_another_process_creating_it(store: Store) -> None:
    # Another process in the middle of create_schema holds the advisory lock.
    with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
        other.execute(select(func.pg_advisory_lock(store_module.SCHEMA_LOCK_KEY)))
        done = threading.Event()

        def create() -> None:
            store.create_schema()
            done.set()

        worker = threading.Thread(target=create, daemon=True)
        worker.start()
        assert not done.wait(timeout=1.0), "create_schema went ahead under another's lock"
        other.execute(select(func.pg_advisory_unlock(store_module.SCHEMA_LOCK_KEY)))
        assert done.wait(timeout=30), "create_schema did not go on once the lock was free"
    worker.join(timeout=5)


@pytest.mark.parametrize("store", ["postgres"], indirect=True)
def test_postgresql_pending_indexes_are_partial_and_an_interrupted_build_is_redone(
    store: Store,
) -> None:
    def pending() -> dict[str, tuple[bool, str]]:
        with store.engine.connect() as conn:
            rows = conn.exec_driver_sql(
                "SELECT c.relname, i.indisvalid, pg_get_expr(i.indpred, i.indrelid) "
                "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "WHERE c.relname LIKE 'ix_outbox_%%pending'"
            ).all()
        return {name: (valid, predicate) for name, valid, predicate in rows}

    assert pending() == {
        "ix_outbox_pending": (True, "(published_at IS NULL)"),
        "ix_outbox_partition_pending": (True, "(published_at IS NULL)"),
    }
    # What a CREATE INDEX CONCURRENTLY cut short leaves: an index marked invalid,
    # which PostgreSQL keeps up to date but never reads.
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE pg_index SET indisvalid = false "
            "WHERE indexrelid = 'ix_outbox_pending'::regclass"
        )
    assert pending()["ix_outbox_pending"][0] is False
    store.create_schema()
    assert pending()["ix_outbox_pending"] == (True, "(published_at IS NULL)")


# -- reads ------------------------------------------------------------------------------


def _inbox_ids(conn) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(conn.execute(select(inbox.c.event_id)).scalars())


def _in_thread(work, timeout: float = 10.0) -> list[object]:  # type: ignore[no-untyped-def]
    """Run ``work`` on another thread; its result, or a failure if it is still
    running after ``timeout`` (the busy timeout is 60 s: a read that queued behind
    the write lock would still be waiting)."""
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(work()), daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"still waiting after {timeout} s (for the write lock?)"
    assert len(out) == 1, "the work failed"
    return out


#: SQLite's locking and its connections per thread: the store fixture's SQLite case only.
sqlite_only = pytest.mark.parametrize("store", ["sqlite"], indirect=True)


def _sqlite_file(store: Store) -> str:
    assert store.dialect == "sqlite"
    return store.engine.url.database or ""


@sqlite_only
def test_a_read_goes_on_while_another_connection_holds_the_write_lock(store: Store) -> None:
    """Another connection (another process, say) in BEGIN IMMEDIATE with a row not yet
    committed: a read neither waits for it nor sees its row."""
    claim_inbox_once(store, "committed")
    writer = sqlite3.connect(_sqlite_file(store), isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO inbox VALUES ('push', 'uncommitted', 1.0)")

        def read() -> list[str]:
            with store.read() as conn:
                return _inbox_ids(conn)

        assert _in_thread(read) == [["committed"]]
        writer.execute("COMMIT")
        with store.read() as conn:
            assert _inbox_ids(conn) == ["committed", "uncommitted"]
    finally:
        writer.close()


def test_a_read_does_not_wait_for_nor_see_a_write_open_on_its_own_thread(store: Store) -> None:
    claim_inbox_once(store, "committed")

    def write_then_read() -> list[str]:
        with store.begin() as conn:
            claim_inbox(conn, "push", ["open"], 1.0)
            with store.read() as reader:
                return _inbox_ids(reader)

    assert _in_thread(write_then_read) == [["committed"]]
    with store.read() as conn:
        assert _inbox_ids(conn) == ["committed", "open"]


@sqlite_only
def test_the_statements_of_one_read_see_one_snapshot(store: Store) -> None:
    """A commit between two statements of one read (and of a read nested in it) is
    not seen by it; the next read sees it."""
    _sqlite_file(store)
    claim_inbox_once(store, "before")
    with store.read() as conn:
        first = _inbox_ids(conn)
        _in_thread(lambda: claim_inbox_once(store, "between"))
        with store.read() as nested:
            assert nested is conn
            assert _inbox_ids(nested) == first == ["before"]
        assert _inbox_ids(conn) == ["before"]
    with store.read() as conn:
        assert _inbox_ids(conn) == ["before", "between"]


@sqlite_only
def test_a_forked_child_reads_on_a_connection_of_its_own(store: Store) -> None:
    """Neither the parent's reader nor a connection idle in the parent's pool goes to
    a child (sharing one SQLite connection across a fork corrupts it)."""
    _sqlite_file(store)
    claim_inbox_once(store, "parent")
    with store.read() as conn:
        reader = conn.connection.dbapi_connection
    with store.engine.connect() as conn:
        pooled = conn.connection.dbapi_connection  # back in the pool, idle, after this
    parents = (reader, pooled)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only on a connection of its own that reads the row
        code = 1
        try:
            with store.read() as conn:
                own = conn.connection.dbapi_connection not in parents
                code = 0 if own and _inbox_ids(conn) == ["parent"] else 3
        finally:
            os._exit(code)
    assert _exit_code(pid, timeout=30) == 0
    with store.read() as conn:
        assert conn.connection.dbapi_connection is reader


def _exit_code(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"the child did not exit within {timeout} s")


@sqlite_only
def test_threads_that_end_give_their_connections_back(store: Store) -> None:
    """Request threads come and go (anyio retires idle ones): 20 of them one after
    another, each reading and writing once, leave the connections of the last one
    at most, not one per thread that ever ran."""
    _sqlite_file(store)
    readers: list[object] = []

    def read_and_write(i: int) -> None:
        with store.read() as conn:
            readers.append(conn)
            _inbox_ids(conn)
        claim_inbox_once(store, f"t{i}")

    for i in range(20):
        _in_thread(lambda i=i: read_and_write(i))
    assert len(readers) == 20 and all(r.closed for r in readers[:-1])  # type: ignore[attr-defined]
    assert store.engine.pool.checkedout() <= 2  # type: ignore[attr-defined]
    with store.read() as conn:
        assert len(_inbox_ids(conn)) == 20


@sqlite_only
def test_a_read_after_its_connection_was_used_outside_a_read_takes_a_fresh_snapshot(
    store: Store,
) -> None:
    """A reader used after its read ended begins a transaction by itself (SQLAlchemy's
    autobegin); the next read does not join that stale snapshot."""
    _sqlite_file(store)
    claim_inbox_once(store, "before")
    with store.read() as conn:
        pass
    _inbox_ids(conn)  # after the block: an open transaction no read owns
    _in_thread(lambda: claim_inbox_once(store, "after"))
    with store.read() as again:
        assert _inbox_ids(again) == ["after", "before"]


_HOLDS_A_READ = """
import sys
from sqlalchemy import select
from workbench.store import Store, inbox

store = Store(sys.argv[1])
with store.read() as conn:
    conn.execute(select(inbox.c.event_id)).all()  # the snapshot is taken
    print("reading", flush=True)
    sys.stdin.read()  # held open until the process is killed
"""


@sqlite_only
def test_a_process_killed_mid_read_leaves_writers_and_checkpoints_free(store: Store) -> None:
    """SIGKILL while a read holds its snapshot: the OS drops its locks with the
    process, so a write commits, a TRUNCATE checkpoint runs the whole WAL into the
    database, and a new read sees the write."""
    claim_inbox_once(store, "before")
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_A_READ, str(store.engine.url)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "reading\n"
        child.kill()
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    _in_thread(lambda: claim_inbox_once(store, "after"))
    raw = sqlite3.connect(_sqlite_file(store), isolation_level=None)
    try:
        busy, _, _ = raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # no reader left pinning the WAL
    finally:
        raw.close()
    with store.read() as conn:
        assert _inbox_ids(conn) == ["after", "before"]
