"""The system of record: escrow state, the outbox, the inbox and the ledger in SQL.

Redis carries events but money does not live there. A command changes the
escrow row and appends its events to ``outbox`` in one transaction; the relay
(:mod:`workbench.streams.relay`) publishes outbox rows to the streams. Handlers record
``(group, event_id)`` in ``inbox`` in the same transaction as their effect, so
a redelivered or republished event has no second effect.

SQLite (a file, WAL mode) is the default; ``DATABASE_URL`` selects PostgreSQL
(``postgresql+psycopg://...``). Writes go through :meth:`Store.begin` (on SQLite
BEGIN IMMEDIATE: writers queue for the one write lock), reads through
:meth:`Store.read` (on SQLite a WAL snapshot: no lock, no queue). Both stores
are driven through SQLAlchemy Core; the statements on the hot paths are
:class:`Prepared` (compiled once, run on the driver's cursor), which makes a
command several times cheaper.
"""

from __future__ import annotations

import contextlib
import operator
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql import Executable

from workbench.paths import data_dir

metadata = MetaData()

_Serial = BigInteger().with_variant(Integer, "sqlite")

escrows = Table(
    "escrows",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("buyer_id", String(64), nullable=False),
    Column("seller_id", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("fee", BigInteger, nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("state", String(32), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("deadline", Float),
    Column("checkout_request_id", String(64)),
    Column("mpesa_receipt", String(64)),
    Column("dispute_reason", Text),
    Index("ix_escrows_buyer", "buyer_id"),
    Index("ix_escrows_seller", "seller_id"),
    Index("ix_escrows_deadline", "deadline"),
)

# One row per STK push. The first callback result for a checkout is final.
checkouts = Table(
    "checkouts",
    metadata,
    Column("checkout_request_id", String(64), primary_key=True),
    Column("escrow_id", String(64), nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("result_code", Integer),
    Column("result_desc", Text),
    Column("receipt", String(64)),
    Column("settled_at", Float),
    # What was requested, so a callback's amount and phone can be checked.
    Column("reference", String(64)),
    Column("amount", BigInteger),
    Column("phone", String(16)),
    # Verification: when to ask the gateway next, and what a trusted callback claimed.
    Column("verify_due_at", Float),
    Column("verify_attempts", Integer, nullable=False, default=0),
    Column("claimed_code", Integer),
    Column("claimed_receipt", String(64)),
    Index("ix_checkouts_verify", "verify_due_at"),
)

# An STK push we owe: committed with the escrow row locked, sent after the commit.
# ``push_due_at`` is set while the push is owed (the reconciliation pass sends it
# when it is due: the process that should have sent it died or the gateway failed).
payment_requests = Table(
    "payment_requests",
    metadata,
    Column("reference", String(64), primary_key=True),
    Column("escrow_id", String(64), nullable=False),
    Column("actor", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("phone", String(16), nullable=False),
    Column("requested_at", Float, nullable=False),
    Column("state", String(16), nullable=False),  # pushing | requested | abandoned
    Column("push_due_at", Float),
    Column("checkout_request_id", String(64), unique=True),
    Index("ix_payment_requests_escrow", "escrow_id", "state"),
    Index("ix_payment_requests_due", "push_due_at"),
)

# Idempotency keys: a retried command returns the stored response, changes nothing.
commands = Table(
    "commands",
    metadata,
    Column("idempotency_key", String(200), primary_key=True),
    Column("command", String(32), nullable=False),
    Column("escrow_id", String(64)),
    Column("fingerprint", String(64), nullable=False),
    Column("response", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# Who created each escrow and whom it named, for the per-user create limit
# (EscrowService.create with an actor); written in the create's transaction.
escrow_creates = Table(
    "escrow_creates",
    metadata,
    Column("escrow_id", String(64), primary_key=True),
    Column("creator", String(64), nullable=False),
    Column("named", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_escrow_creates_pair", "creator", "named", "created_at"),
)

_UNPUBLISHED = text("published_at IS NULL")

outbox = Table(
    "outbox",
    metadata,
    Column("seq", _Serial, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("stream", String(32), nullable=False),
    Column("type", String(64), nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("published_at", Float),
    # The id the relay's XADD gave the row: the repair re-adds a row Redis lost
    # under this id (workbench.streams.relay). NULL until published.
    Column("stream_id", String(48)),
    # The log partition of the row's escrow (workbench.streams.partitions), written
    # by the service; 0 when the service is unpartitioned. NULL: written before the
    # column existed (a partitioned relay fills it in from the event before use).
    Column("partition", Integer),
    # The relay's read: unpublished rows by seq (partitioned: of the partitions it
    # holds). Partial: a row leaves these indexes when it is published, so they hold
    # the backlog, not the whole history, and marking a row published writes no
    # new index entry.
    Index("ix_outbox_pending", "seq", sqlite_where=_UNPUBLISHED, postgresql_where=_UNPUBLISHED),
    Index(
        "ix_outbox_partition_pending",
        "partition",
        "seq",
        sqlite_where=_UNPUBLISHED,
        postgresql_where=_UNPUBLISHED,
    ),
)

inbox = Table(
    "inbox",
    metadata,
    Column("group_name", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("handled_at", Float, nullable=False),
    PrimaryKeyConstraint("group_name", "event_id"),
    sqlite_with_rowid=False,  # one B-tree (the key) instead of rowid table + index
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("posting_id", String(80), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("escrow_id", String(64), nullable=False),
    Column("account", String(100), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("at", Float, nullable=False),
    Index("ix_ledger_account", "account"),  # balances, by account
    UniqueConstraint("posting_id", "account", name="uq_ledger_posting_account"),
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", _Serial, primary_key=True, autoincrement=True),
    Column("event_id", String(64), nullable=False),
    Column("user_id", String(64), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("body", Text, nullable=False),
    Column("at", Float, nullable=False),
    UniqueConstraint("event_id", "user_id", "channel", name="uq_notification"),
)

dispute_timeline = Table(
    "dispute_timeline",
    metadata,
    Column("escrow_id", String(64), nullable=False),
    Column("sequence", Integer, nullable=False),
    Column("event_id", String(64), nullable=False, unique=True),
    Column("type", String(64), nullable=False),
    Column("at", Float, nullable=False),
    Column("detail", Text, nullable=False),
    PrimaryKeyConstraint("escrow_id", "sequence"),
)


#: Indexes of earlier schemas that :meth:`Store.create_schema` drops: the outbox's
#: full indexes on ``published_at`` (replaced by partial ones), and two that no
#: query read, whose entry for each new row was a page written at a random place
#: (a user's notifications, an escrow's ledger lines).
_DROPPED_INDEXES = (
    "ix_outbox_unpublished",
    "ix_outbox_partition_unpublished",
    "ix_notifications_user",
    "ix_ledger_escrow",
)


#: PostgreSQL: the advisory lock :meth:`Store.create_schema` holds (any fixed bigint).
SCHEMA_LOCK_KEY = 0x776F726B62656E63  # "workbenc"

#: PostgreSQL: whether the index of that name is valid (None: there is none).
_INDEX_VALID = text(
    "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
    "WHERE c.relname = :name AND pg_table_is_visible(c.oid)"
)


def database_url(default_path: str | os.PathLike[str] | None = None) -> str:
    """``DATABASE_URL`` if set, else a SQLite file (``workbench.db`` in the data
    directory, :func:`workbench.paths.data_dir`)."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    path = Path(default_path) if default_path else data_dir() / "workbench.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" hook issue BEGIN IMMEDIATE itself: writers then
    # queue on the lock (busy_timeout) instead of failing on upgrade.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes
    cur.execute("PRAGMA busy_timeout=60000")
    # Checkpoint every ~40 MB of WAL instead of every 4 MB: the checkpoint runs
    # inside whichever commit crosses the threshold and fsyncs the database file.
    cur.execute("PRAGMA wal_autocheckpoint=10000")
    cur.close()


#: The execution option that marks a connection of :meth:`Store.read`: its
#: transactions begin deferred.
_READER = "workbench_reader"

#: Forks between the process that imported this module and this one: a store made
#: before a fork finds another count in the child. Read on every use of a
#: connection, where ``os.getpid()`` would be a system call each time.
_FORKS = [0]


def _count_fork() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_count_fork)


def _sqlite_begin(conn: Connection) -> None:
    # Straight to the driver: exec_driver_sql's overhead would cost more than the
    # rest of a small transaction (bench/throughput.py measures the command path).
    # A reader's BEGIN is deferred: it takes a WAL snapshot, never the write lock.
    deferred = conn.get_execution_options().get(_READER)
    _driver_execute(conn, "BEGIN" if deferred else "BEGIN IMMEDIATE", ())


def _driver_execute(conn: Connection, sql: str, params: Any, *, many: bool = False) -> Any:
    """Run ``sql`` on ``conn``'s DBAPI cursor (``executemany`` with ``many``);
    driver errors become SQLAlchemy's."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    dbapi = conn.dialect.loaded_dbapi
    try:
        (cursor.executemany if many else cursor.execute)(sql, params)
    except dbapi.Error as exc:
        raise DBAPIError.instance(sql, params[:1] if many else params, exc, dbapi.Error) from exc
    return cursor


def binds(*names: str) -> dict[str, Any]:
    """``{name: bindparam(name)}``: the VALUES/SET of a prepared INSERT or UPDATE."""
    return {name: bindparam(name) for name in names}


class Prepared:
    """A Core statement compiled once per dialect and run on the DBAPI cursor.

    For the hot paths (a command's few statements, the relay, the handlers' inbox):
    SQLAlchemy's work per execution (cache key, parameter and result processing)
    costs several times what SQLite takes for a primary-key lookup
    (bench/throughput.py measures the paths that use this). Parameters go by bind
    name and must need no type processing (str, int, float, bytes, None); rows come
    back as plain tuples in the statement's column order. Driver errors are raised
    as SQLAlchemy's (``IntegrityError``, ``OperationalError``), so callers catch one
    family. Runs inside whatever transaction ``conn`` is in.
    """

    def __init__(self, statement: Executable) -> None:
        self.statement = statement
        self._by_dialect: dict[str, tuple[str, Callable[[Mapping[str, Any]], Any]]] = {}

    def _compiled(self, dialect: Dialect) -> tuple[str, Callable[[Mapping[str, Any]], Any]]:
        found = self._by_dialect.get(dialect.name)
        if found is None:
            compiled = self.statement.compile(dialect=dialect)
            defaults = dict(compiled.params)  # values fixed in the statement (LIMIT n)
            names = tuple(compiled.positiontup or ())
            if compiled.positional and not names:

                def bind(params: Mapping[str, Any]) -> Any:
                    return ()

            elif compiled.positional:
                order = operator.itemgetter(*names)

                def bind(params: Mapping[str, Any]) -> Any:
                    values = order({**defaults, **params})
                    return (values,) if len(names) == 1 else values

            else:

                def bind(params: Mapping[str, Any]) -> Any:
                    return {**defaults, **params}

            found = self._by_dialect[dialect.name] = (compiled.string, bind)
        return found

    def execute(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """Execute once; return the DBAPI cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        sql, bind = self._compiled(conn.dialect)
        return _driver_execute(conn, sql, bind(params or {}))

    def first(self, conn: Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first row as a tuple, or None."""
        return self.execute(conn, params).fetchone()

    def executemany(self, conn: Connection, rows: list[Mapping[str, Any]]) -> None:
        if not rows:
            return
        sql, bind = self._compiled(conn.dialect)
        _driver_execute(conn, sql, [bind(row) for row in rows], many=True)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and serialised write transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # No cap on the pool: every thread keeps its own connection for its
        # transactions (Store.begin), so a capped pool (5 + 10 overflow) ran out
        # once 15 threads (an API process's request threads) had run one, and
        # every other checkout then waited 30 s and failed.
        engine = create_engine(url, connect_args={"timeout": 60}, pool_size=0)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    return create_engine(url, pool_pre_ping=True)


def _alive(thread: weakref.ref[threading.Thread]) -> bool:
    found = thread()
    return found is not None and found.is_alive()


class Store:
    """The SQL store: an engine plus the schema."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or database_url()
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        self._local = threading.local()
        # Every thread's connections (begin, read), with the thread they belong to.
        self._held: list[tuple[weakref.ref[threading.Thread], Connection]] = []
        self._held_lock = threading.Lock()
        self._forks = _FORKS[0]

    def create_schema(self) -> None:
        """Create what is missing: tables, the outbox's newer columns and indexes.

        Safe to run from several processes at once: on SQLite each step takes the
        write lock; on PostgreSQL the whole of it runs under a session advisory
        lock (checking that a table or index is missing and creating it are two
        statements, so two processes could otherwise both try to create it).
        """
        with self._schema_lock():
            metadata.create_all(self.engine)
            self._migrate()

    @contextmanager
    def _schema_lock(self) -> Iterator[None]:
        if self.dialect != "postgresql":
            yield
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:  # a process that dies releases it with its connection
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})

    def _migrate(self) -> None:
        """What create_all leaves out on a database made by an earlier schema (it
        skips existing tables): the outbox's newer columns (nullable, added in
        place) and indexes, and the indexes it no longer has, dropped."""
        from sqlalchemy import inspect

        have = {c["name"] for c in inspect(self.engine).get_columns("outbox")}
        added = {"stream_id": "VARCHAR(48)", '"partition"': "INTEGER"}
        with self.engine.begin() as conn:
            for column, kind in added.items():
                if column.strip('"') not in have:
                    conn.exec_driver_sql(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
        # create_all makes a table's indexes only with the table: add the new ones,
        # and drop those of earlier schemas.
        if self.dialect == "postgresql":
            self._migrate_indexes_concurrently()
            return
        for index in outbox.indexes:  # SQLite: each under the write lock, in turn
            index.create(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            for name in _DROPPED_INDEXES:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {name}")

    def _migrate_indexes_concurrently(self) -> None:
        """PostgreSQL: build the outbox's new indexes and drop the old ones
        ``CONCURRENTLY``, a statement at a time outside any transaction, so that
        indexing a long outbox never holds up the commands and relays writing to
        it, and no two tables' locks are ever held together. A build that was
        interrupted leaves an invalid index behind: it is dropped and built again."""
        dialect = self.engine.dialect
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for index in outbox.indexes:
                valid = conn.execute(_INDEX_VALID, {"name": index.name}).scalar()
                if valid is True:
                    continue
                if valid is False:
                    conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {index.name}")
                ddl = str(CreateIndex(index).compile(dialect=dialect))
                conn.exec_driver_sql(
                    ddl.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY IF NOT EXISTS", 1)
                )
            for name in _DROPPED_INDEXES:
                conn.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")

    def drop_schema(self) -> None:
        metadata.drop_all(self.engine)

    def reset(self) -> None:
        """Drop and recreate every table (tests, fresh demo runs)."""
        self.drop_schema()
        self.create_schema()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: commits on success, rolls back on any exception.

        On SQLite each thread keeps one connection for its transactions:
        checking a connection out of the pool and back costs more than the rest
        of a small transaction. (SQLite serialises writers anyway, so
        a second connection per thread would buy nothing.)
        """
        if self.dialect != "sqlite":
            with self.engine.begin() as conn:
                yield conn
            return
        with self._thread_connection("writer").begin() as transaction:
            yield transaction.connection

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read: what the last commits left, without taking the write lock.

        On SQLite each thread keeps a second connection for reads, whose
        transactions begin deferred: a read takes a WAL snapshot, so it neither
        queues behind a writer nor holds one up, in this process or another
        (:meth:`begin`'s BEGIN IMMEDIATE would make every read wait for every
        writer). The statements of one read see one snapshot, and a read nested
        in a read on the same thread joins it. Only reads belong here: a write
        would have to upgrade the snapshot and could fail busy.

        On PostgreSQL a pooled connection, as ``engine.connect()`` gives (read
        committed: each statement sees the latest commits).

        On both, a read never sees the uncommitted writes of a :meth:`begin`
        open on its thread, and never waits for them. A read holds its snapshot
        until it ends (on SQLite the WAL cannot be checkpointed past it
        meanwhile): keep it short, never across a network call or a ``yield``.
        Execution options set on the connection would stay with the thread's
        reader: set none.
        """
        if self.dialect != "sqlite":
            with self.engine.connect() as conn:
                yield conn
            return
        conn = self._thread_connection("reader")
        local = self._local
        if getattr(local, "reading", False):  # nested: join the outer read's snapshot
            yield conn
            return
        if conn.in_transaction():  # left open by a use after its read ended: not a read
            conn.rollback()
        local.reading = True
        try:
            with conn.begin():
                yield conn
        finally:
            local.reading = False

    def _thread_connection(self, role: str) -> Connection:
        """This thread's connection for ``role`` ("writer": :meth:`begin`,
        "reader": :meth:`read`)."""
        if self._forks != _FORKS[0]:
            self._forked()
        conn: Connection | None = getattr(self._local, role, None)
        if conn is None or conn.closed or conn.invalidated:
            self._give_back_finished()
            conn = self.engine.connect()
            if role == "reader":
                conn.execution_options(**{_READER: True})
            setattr(self._local, role, conn)
            with self._held_lock:
                self._held.append((weakref.ref(threading.current_thread()), conn))
        return conn

    def _give_back_finished(self) -> None:
        """Close the connections of threads that have ended (an API process's worker
        threads come and go): back to the pool, for the next thread to take."""
        alive: list[tuple[weakref.ref[threading.Thread], Connection]] = []
        finished: list[tuple[weakref.ref[threading.Thread], Connection]] = []
        with self._held_lock:
            for thread, conn in self._held:
                (alive if _alive(thread) else finished).append((thread, conn))
            self._held = alive
        for _, conn in finished:
            with contextlib.suppress(Exception):  # already gone
                conn.close()

    def _forked(self) -> None:
        """In a forked child: the parent's connections, held or pooled, stay the
        parent's (sharing a SQLite connection across a fork corrupts it)."""
        self.engine.dispose(close=False)
        self._held, self._held_lock = [], threading.Lock()
        self._local = threading.local()
        self._forks = _FORKS[0]

    def close(self) -> None:
        with self._held_lock:
            held, self._held = self._held, []
        for _, conn in held:
            with contextlib.suppress(Exception):  # another thread's, or already gone
                conn.close()
        self._local = threading.local()
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"<Store {make_url(self.url).render_as_string(hide_password=True)}>"


#: SQLite's INSERT text per (table, columns): the head up to VALUES, and one row's
#: placeholders.
_INSERTS: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {}
#: Rows per multi-row INSERT, and bound parameters per statement at most (the
#: connection's own limit is asked too: 32766 by default since SQLite 3.32, 999
#: before).
_ROWS_PER_INSERT = 500
_PARAMS_PER_INSERT = 30_000


def insert_many(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """``INSERT`` many rows, as few multi-row statements as SQLite allows.

    ``conn.execute(insert(table), rows)`` runs SQLAlchemy's parameter processing
    for every row; the columns here need no type processing, so the driver can
    take the values as they are. On SQLite one ``INSERT ... VALUES (...), (...)``
    per up to :data:`_ROWS_PER_INSERT` rows: a statement per row (executemany)
    costs a quarter more (bench/throughput.py's ``parallel4`` runs the handlers
    through here). Every row has the first row's keys. A constraint violation
    fails the statement as a whole, as executemany failed the call.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        # PostgreSQL: SQLAlchemy's "insertmanyvalues" sends multi-row VALUES
        # batches, far faster than the driver's executemany.
        conn.execute(insert(table), rows)
        return
    columns = tuple(rows[0])
    found = _INSERTS.get((table.name, columns))
    if found is None:
        one = insert(table).values(binds(*columns)).compile(dialect=conn.dialect)
        assert tuple(one.positiontup or ()) == columns  # placeholders in column order
        head, _, values = one.string.rpartition(" VALUES ")
        found = _INSERTS[(table.name, columns)] = (f"{head} VALUES ", values)
    head, placeholders = found
    raw = conn.connection.dbapi_connection
    params_max = min(_PARAMS_PER_INSERT, raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))  # type: ignore[union-attr]
    per = max(1, min(_ROWS_PER_INSERT, params_max // len(columns)))
    values_of = operator.itemgetter(*columns)
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        if len(columns) == 1:
            params = [values_of(row) for row in chunk]
        else:
            params = [value for row in chunk for value in values_of(row)]
        _driver_execute(conn, head + ",".join([placeholders] * len(chunk)), params)


def mark_published(conn: Connection, at: float, marks: list[tuple[int, str]]) -> None:
    """Mark outbox rows published at ``at``, each ``(seq, stream_id)`` with its id.

    One ``UPDATE ... FROM`` a ``VALUES`` list per chunk instead of a statement per
    row: the relay marks a whole batch at once, and SQLite takes about a third
    less for it (PostgreSQL one round trip instead of one per row). A row already
    published (by a relay that took the partition over) keeps its id.
    """
    if not marks:
        return
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    per = _ROWS_PER_INSERT
    if conn.dialect.name == "sqlite":
        if sqlite3.sqlite_version_info < (3, 33):  # no UPDATE ... FROM before 3.33
            sql = (
                "UPDATE outbox SET published_at = ?, stream_id = ? "
                "WHERE seq = ? AND published_at IS NULL"
            )
            _driver_execute(conn, sql, [(at, sid, seq) for seq, sid in marks], many=True)
            return
        raw = conn.connection.dbapi_connection
        limit = raw.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)  # type: ignore[union-attr]
        per = max(1, min(per, (min(_PARAMS_PER_INSERT, limit) - 1) // 2))
    for start in range(0, len(marks), per):
        chunk = marks[start : start + per]
        values = ",".join([f"({mark}, {mark})"] * len(chunk))
        sql = (
            f"WITH v(seq, sid) AS (VALUES {values}) "
            f"UPDATE outbox SET published_at = {mark}, stream_id = v.sid FROM v "
            "WHERE outbox.seq = v.seq AND outbox.published_at IS NULL"
        )
        _driver_execute(conn, sql, [x for pair in chunk for x in pair] + [at])


def claim_inbox(conn: Connection, group: str, event_ids: list[str], now: float) -> set[str]:
    """Record ``event_ids`` as handled by ``group``; return those that were new.

    Must run in the transaction that applies their effects. The usual batch
    holds no event seen before, so it is inserted in one go inside a savepoint;
    only if that hits the primary key (a redelivery, a republished event, or
    a concurrent consumer that committed the same id first) do we look up
    which ids are already there and insert the rest.
    """
    if not event_ids:
        return set()
    unique_ids = list(dict.fromkeys(event_ids))
    # The savepoint by hand: SQLAlchemy's begin_nested() costs more than the insert.
    _driver_execute(conn, "SAVEPOINT claim_inbox", ())
    try:
        insert_many(conn, inbox, _inbox_rows(group, unique_ids, now))
        _driver_execute(conn, "RELEASE SAVEPOINT claim_inbox", ())
        return set(unique_ids)
    except IntegrityError:
        _driver_execute(conn, "ROLLBACK TO SAVEPOINT claim_inbox", ())
        _driver_execute(conn, "RELEASE SAVEPOINT claim_inbox", ())
    seen = set(
        conn.execute(
            select(inbox.c.event_id).where(
                inbox.c.group_name == group, inbox.c.event_id.in_(unique_ids)
            )
        ).scalars()
    )
    new = [event_id for event_id in unique_ids if event_id not in seen]
    insert_many(conn, inbox, _inbox_rows(group, new, now))
    return set(new)


def _inbox_rows(group: str, event_ids: list[str], now: float) -> list[dict[str, Any]]:
    return [{"group_name": group, "event_id": e, "handled_at": now} for e in event_ids]


# -- analytics (workbench.analytics) ------------------------------------------------

# The analytics group's durable feature state: one row per event it has folded
# (an event-sourced projection: features are a function of this set, so order
# and redelivery do not matter), keyed by group so two analytics groups (say, two
# model versions side by side) can share a store.
analytics_facts = Table(
    "analytics_facts",
    metadata,
    Column("group_name", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("type", String(64), nullable=False),
    Column("escrow_id", String(64), nullable=False),
    Column("buyer_id", String(64), nullable=False),
    Column("seller_id", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("at", Float, nullable=False),  # the event's occurred_at
    PrimaryKeyConstraint("group_name", "event_id"),
    Index("ix_analytics_facts_seller", "group_name", "seller_id"),
    Index("ix_analytics_facts_buyer", "group_name", "buyer_id"),
)

# One risk score per source event, written in the transaction that folds the
# event: the risk stream entry is published from this row, so a batch redelivered
# after a crash republishes the same score (and the Lua dedupe drops it).
risk_scores = Table(
    "risk_scores",
    metadata,
    Column("group_name", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),  # the source event
    Column("event_type", String(64), nullable=False),
    Column("seller_id", String(64), nullable=False),
    Column("score", Float, nullable=False),
    Column("model", String(100), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("event_at", Float, nullable=False),
    Column("scored_at", Float, nullable=False),
    PrimaryKeyConstraint("group_name", "event_id"),
    Index("ix_risk_scores_seller", "group_name", "seller_id"),
)
