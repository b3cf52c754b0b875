"""Throughput of the escrow runtime against anchors of the same shape, in interleaved rounds.

Every figure is a rate measured in rounds; every comparison is the median of
per-round ratios with its spread (``bench/stats.py``), and a verdict is given
only where the whole bootstrap interval lies on one side of a target. The
measurements, each at least ``--min-seconds`` of timed work per round (a step
is repeated until it adds up; its set-up is not timed), order reversed every
other round:

* ``commands``  escrow lifecycles (create, fund, M-Pesa callback, ship,
  confirm) through :class:`EscrowService` into the SQL outbox.
* ``relay``  :meth:`OutboxRelay.drain` of the ``--escrows`` lifecycles' outbox
  rows (marked unpublished again and their streams deleted between steps).
  Anchor ``xadd``: the same entries XADDed to the same number of streams by
  hand-packed pipelines of 500 (prebuilt arguments, one socket write per
  pipeline, replies read raw): the relay minus SQL and redis-py's pipeline.
  Anchor ``relay_plain``: the relay's job as the plainest code that does it
  (read 500 unpublished rows on the DBAPI cursor, XADD them hand-packed, mark
  them with their ids in one UPDATE and commit; no loss check, no leases):
  ``plain_relay_vs_xadd`` is the floor the SQL sets on ``relay_vs_xadd``.
* ``parallel4``  the four SQL handler groups as four processes at once, as
  deployed (:class:`ConsumerWorker` + the real handlers, one SQLite store;
  groups, inbox and effects reset between steps). Anchor ``raw4``: four
  plain redis-py processes at once, each reading the streams of one handler
  group. Each parallel step runs from the moment the processes leave a
  barrier to the last one's end. Anchor ``sql4``: the same four handlers on
  their groups' events (decoded before the step) in batches of 500, no Redis:
  their SQL alone. Anchor ``plain4``: the whole job as the plainest code does
  it, four processes: the raw loop reading, decoding and ordering each batch
  (as ``raw1_ordered``: sorted by escrow, where the runtime keeps the read's
  interleaving across escrows), the real handler's ``handle`` on it, then the
  XACKs with the next read: ``plain4_vs_raw4`` is plain code's floor for
  ``parallel_vs_raw4``, reading, ordering and the SQL together (on a machine with
  fewer cores than processes their CPU adds up, where ``sql4_vs_raw4`` counts the
  SQL alone).
* ``noop``  :meth:`ConsumerWorker.drain` with a no-op handler over all streams
  in this process: the runtime loop's own cost. Anchor ``raw1``: one plain
  redis-py process on the same streams; ``raw1_decoded``: the same process
  decoding every envelope too, the least a loop that puts a batch back in
  escrow order (it spans streams) must do: ``decoded_raw1_vs_raw1`` is the
  floor decoding sets on ``noop_vs_raw1``; ``raw1_ordered``: the same process
  doing the whole of that job as plainly as it can be done (hold back what a
  full read may precede, sort the rest by escrow and sequence, ack it), the
  floor ``ordered_raw1_vs_raw1`` that per-escrow order sets.
* ``fs_batch`` and ``fs_one``  FastStream's Redis Streams subscriber (batch of
  500, and one message per call), one subscriber per stream, a no-op handler:
  the peer a Python user would pick. It runs in ``.venv-bench/`` (made by
  ``make bench`` from ``bench/requirements-faststream.txt``) as a child
  process; without it, these rounds are skipped and the record says why.

The raw consumers are the best plain redis-py loop we know for the job:
XREADGROUP COUNT 500 on every stream at once with redis-py's reply
conversion skipped (the command sent and its reply read raw on one
connection), and the XACK of each batch sent in one pipeline with the next
read. Every consume step reads the same entries (the real envelopes the
lifecycles made) through a fresh consumer group.

Ratios (names stable; targets in :data:`TARGETS` or ``--target``):
``parallel_vs_raw4``, ``noop_vs_raw1``, ``noop_vs_faststream_batch``,
``noop_vs_faststream_one``, ``ordered_raw1_vs_faststream_batch``, ``parallel_vs_sql4``,
``sql4_vs_raw4``, ``parallel_vs_plain4``, ``plain4_vs_raw4``,
``noop_vs_raw1_decoded``, ``decoded_raw1_vs_raw1``, ``noop_vs_raw1_ordered``,
``ordered_raw1_vs_raw1``,
``relay_vs_xadd``, ``relay_vs_plain``, ``plain_relay_vs_xadd``; rates of every measurement,
``commands`` among them.

A private redis-server (AOF off) is started unless ``REDIS_URL`` is set; on a
shared Redis every key lives under a per-run prefix and is deleted at the end.
The store is SQLite in a temporary directory; ``DATABASE_URL`` selects another
one, but the benchmark drops and recreates its tables, so it insists on
``--reset-store`` to say that is fine.

The record (``bench/records.py``) goes to ``bench/records/throughput.json``
(``--quick`` writes none unless ``--record`` is given); the last line of output
is the same record as one JSON object.

Usage::

    .venv/bin/python bench/throughput.py                 # 2000 escrows, 5 rounds
    .venv/bin/python bench/throughput.py --quick         # smoke run
    .venv/bin/python bench/throughput.py --repeat 9 --target noop_vs_raw1=0.5
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import redis
from rich.table import Table
from sqlalchemy import func, select, update

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import records, stats  # noqa: E402
from bench.stats import Sample  # noqa: E402
from simulations.analysis.report import wide_console  # noqa: E402
from workbench.domain.clock import ManualClock  # noqa: E402
from workbench.domain.events import AGGREGATE_TYPES, Event, entry_data  # noqa: E402
from workbench.domain.events import decode as decode_event  # noqa: E402
from workbench.domain.ids import IdFactory  # noqa: E402
from workbench.handlers import GROUPS, HANDLERS, make_handler  # noqa: E402
from workbench.ops.redis_server import attach_or_start  # noqa: E402
from workbench.payments.mpesa import GatewayBehaviour, SimulatedGateway, parse_callback  # noqa: E402
from workbench.service import EscrowService  # noqa: E402
from workbench.store import (  # noqa: E402
    Store,
    dispute_timeline,
    inbox,
    ledger_entries,
    notifications,
    outbox,
)
from workbench.streams.connection import connect, server_version  # noqa: E402
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker  # noqa: E402
from workbench.streams.keys import StreamNames  # noqa: E402
from workbench.streams.relay import OutboxRelay  # noqa: E402

BATCH = 500  # XADD pipeline size and XREADGROUP COUNT, as the runtime's default
STEP_ESCROWS = 50  # lifecycles per ``commands`` step
FASTSTREAM_PYTHON = ROOT / ".venv-bench" / "bin" / "python"

MEASURES: dict[str, str] = {
    "commands": "EscrowService commands (create, fund, callback, ship, confirm)",
    "relay": "OutboxRelay.drain: SQL read, XADD pipeline, mark published",
    "xadd": f"hand-packed XADD, pipelines of {BATCH}, replies read raw",
    "relay_plain": f"plain relay: read {BATCH} rows, hand-packed XADD, one UPDATE, commit",
    "parallel4": "four handler groups as four processes (ConsumerWorker + SQL handlers)",
    "raw4": "four raw redis-py processes, each on one handler group's streams",
    "sql4": "the four handlers' SQL alone, four processes (events decoded before)",
    "plain4": "four plain processes doing the whole job: raw read, decode, order, the "
    "handler's SQL, XACK with the next read",
    "raw1": f"one raw redis-py process: XREADGROUP COUNT {BATCH}, XACK pipelined with next read",
    "raw1_decoded": "the same raw process, each envelope also decoded (msgspec, validated)",
    "raw1_ordered": "the same raw process decoding, holding back behind full reads, "
    "sorting by escrow",
    "noop": "ConsumerWorker.drain, no-op handler, every stream",
    "fs_batch": f"FastStream subscriber, batch of {BATCH}, one per stream",
    "fs_one": "FastStream subscriber, one message per call, one per stream",
}
UNITS = {"commands": "commands/s"}
FASTSTREAM_MEASURES = ("fs_batch", "fs_one")

# name: (numerator, denominator, what)
RATIOS: dict[str, tuple[str, str, str]] = {
    "parallel_vs_raw4": (
        "parallel4",
        "raw4",
        "four handler groups in parallel / four raw processes",
    ),
    "parallel_vs_sql4": ("parallel4", "sql4", "four handler groups / their SQL alone"),
    "sql4_vs_raw4": (
        "sql4",
        "raw4",
        "floor: the handlers' SQL alone / four raw processes (the SQL's share)",
    ),
    "parallel_vs_plain4": (
        "parallel4",
        "plain4",
        "four handler groups / the same job as plain code (the runtime's share)",
    ),
    "plain4_vs_raw4": (
        "plain4",
        "raw4",
        "floor: the whole job as plain code / four raw processes (reading, order and SQL together)",
    ),
    "noop_vs_raw1": ("noop", "raw1", "runtime no-op loop / one raw process"),
    "noop_vs_raw1_decoded": (
        "noop",
        "raw1_decoded",
        "runtime no-op loop / one raw process that decodes",
    ),
    "decoded_raw1_vs_raw1": (
        "raw1_decoded",
        "raw1",
        "floor: a raw process that decodes / one that does not (decoding's share)",
    ),
    "noop_vs_raw1_ordered": (
        "noop",
        "raw1_ordered",
        "runtime no-op loop / one raw process that decodes and orders",
    ),
    "ordered_raw1_vs_raw1": (
        "raw1_ordered",
        "raw1",
        "floor: a raw process that decodes and orders / one that does not (per-escrow "
        "order's share)",
    ),
    "noop_vs_faststream_batch": ("noop", "fs_batch", "runtime no-op loop / FastStream batch"),
    "noop_vs_faststream_one": ("noop", "fs_one", "runtime no-op loop / FastStream one-by-one"),
    "ordered_raw1_vs_faststream_batch": (
        "raw1_ordered",
        "fs_batch",
        "floor: a raw process that decodes and orders / FastStream batch (the same job "
        "as plain code, against the peer)",
    ),
    "relay_vs_xadd": ("relay", "xadd", "relay / hand-packed XADD"),
    "relay_vs_plain": ("relay", "relay_plain", "relay / the same job as plain code"),
    "plain_relay_vs_xadd": (
        "relay_plain",
        "xadd",
        "floor: plain relay / hand-packed XADD (the SQL's share)",
    ),
}
# Issue 16's targets.
TARGETS: dict[str, float] = {
    "parallel_vs_raw4": 0.33,
    "noop_vs_raw1": 0.8,
    "noop_vs_faststream_batch": 3.0,
    "relay_vs_xadd": 0.7,
}


class NoopHandler:
    """A handler that does nothing: what is left is the runtime loop itself."""

    aggregate_types: tuple[str, ...] = AGGREGATE_TYPES

    def __init__(self, group: str) -> None:
        self.group = group

    def handle(self, events: list[Event]) -> None:
        pass


# -- environment ----------------------------------------------------------------------


@contextlib.contextmanager
def redis_for_bench() -> Iterator[tuple[str, str]]:
    """Yield (url, description): ``REDIS_URL`` or a private redis-server without AOF."""
    with attach_or_start(os.environ.get("REDIS_URL"), appendonly=False) as (url, server):
        yield url, "external (REDIS_URL)" if server is None else "private redis-server, AOF off"


@contextlib.contextmanager
def store_for_bench(reset_store: bool) -> Iterator[Store]:
    url = os.environ.get("DATABASE_URL")
    directory = None
    if url:
        if not reset_store:
            raise click.UsageError(
                "DATABASE_URL is set: the benchmark drops and recreates every table of that "
                "store. Pass --reset-store if that is fine, or unset DATABASE_URL for SQLite "
                "in a temporary directory."
            )
    else:
        directory = tempfile.mkdtemp(prefix="workbench-bench-")
        url = f"sqlite:///{Path(directory) / 'bench.db'}"
    store = Store(url)
    try:
        store.reset()
        yield store
    finally:
        store.close()
        if directory:
            shutil.rmtree(directory, ignore_errors=True)


# -- the work: escrow lifecycles -----------------------------------------------------------------


def produce(service: EscrowService, gateway: SimulatedGateway, clock: ManualClock, n: int) -> int:
    """Take ``n`` escrows from creation to release; return the commands run.

    The gateway never fails, duplicates or delays past ``delay_max``, so every
    escrow goes the same way: 5 commands, 8 events (one of them on ``payout``).
    """
    plan: list[tuple[str, str, str]] = []
    commands = 0
    for i in range(n):
        buyer, seller = f"buyer-{i % 97}", f"seller-{i % 23}"
        result = service.create(buyer, seller, 500 + (i % 50) * 100, f"order {i}")
        escrow_id = result.escrow["id"]  # type: ignore[index]
        service.fund(escrow_id, buyer, "254700000000")
        plan.append((escrow_id, buyer, seller))
        commands += 2
        clock.advance(0.01)
    clock.advance(gateway.behaviour.delay_max + 1)
    for body in gateway.due():
        service.record_payment_result(parse_callback(body))
        commands += 1
    for escrow_id, _, seller in plan:
        service.ship(escrow_id, seller, f"TRK{escrow_id[-6:]}")
        commands += 1
        clock.advance(0.01)
    for escrow_id, buyer, _ in plan:
        service.confirm(escrow_id, buyer)
        commands += 1
        clock.advance(0.01)
    if commands != 5 * n:
        raise RuntimeError(f"{commands} commands for {n} lifecycles, expected {5 * n}")
    return commands


def outbox_entries(store: Store) -> list[tuple[str, dict[str, bytes | str]]]:
    """(aggregate type, stream fields) of every outbox row, in publication order."""
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(outbox.c.stream, outbox.c.event_id, outbox.c.type, outbox.c.data).order_by(
                outbox.c.seq
            )
        ).all()
    return [(r.stream, {"event_id": r.event_id, "type": r.type, "data": r.data}) for r in rows]


def expected_entries(entries: list[tuple[str, Any]], aggregate_types: tuple[str, ...]) -> int:
    return sum(1 for aggregate, _ in entries if aggregate in aggregate_types)


# -- the anchors: plain redis-py at its best --------------------------------------------


def raw_consume(
    client: redis.Redis,
    streams: list[str],
    group: str,
    *,
    decode: bool = False,
    order: bool = False,
    handle: Callable[[list[Event]], None] | None = None,
) -> int:
    """Read ``streams`` to the end through ``group``; return the entries read and acked.

    XREADGROUP COUNT 500 on every stream at once, sent and read raw on one
    connection (no reply conversion: an entry is only its id here); the XACKs
    of a batch go in one write with the next read. With ``decode``, each
    entry's envelope is also decoded and validated (:func:`events.decode`),
    as anything that orders a batch by escrow must. With ``order`` (implies
    decoding), the plainest code that keeps per-escrow order across streams:
    entries behind a stream whose read came back full (from its last entry's
    millisecond on) wait for the next read, and what is handled is sorted by
    (escrow, sequence) first; an entry is acked once handled. With ``handle``
    (implies ordering), what is handed over is also handled: ``handle`` gets the
    batch's events in that order before their XACKs are sent.
    """
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        read = ("XREADGROUP", "GROUP", group, "raw", "COUNT", BATCH, "STREAMS", *streams)
        read += (">",) * len(streams)
        conn.send_command(*read)
        reply = conn.read_response()
        total = 0
        held: dict[bytes, list[tuple[bytes, Event]]] = {}
        while reply or held:
            batches = (reply.items() if isinstance(reply, dict) else reply) if reply else []
            if order or handle is not None:
                acks = _ordered_acks(batches, held, group, handle)
            else:
                if decode:
                    for _, got in batches:
                        for entry in got:
                            decode_event(entry_data(entry[1]))
                acks = [("XACK", s, group, *[entry[0] for entry in got]) for s, got in batches]
            total += sum(len(a) - 3 for a in acks)
            conn.send_packed_command(conn.pack_commands([*acks, read]))
            for _ in acks:
                conn.read_response()
            reply = conn.read_response()
        return total
    finally:
        pool.release(conn)


def _ordered_acks(
    batches: Any,
    held: dict[bytes, list[tuple[bytes, Event]]],
    group: str,
    handle: Callable[[list[Event]], None] | None = None,
) -> list[tuple[Any, ...]]:
    """``raw_consume(order=True)``'s step: the XACKs of what :func:`plain_ready`
    hands over now, handled first by ``handle`` (None: a no-op, as the runtime's
    no-op handler)."""
    ready = plain_ready(batches, held)
    if handle is not None and ready:
        handle([event for _, _, event in ready])
    by_stream: dict[bytes, list[bytes]] = {}
    for stream, entry_id, _ in ready:
        by_stream.setdefault(stream, []).append(entry_id)
    return [("XACK", s, group, *ids) for s, ids in by_stream.items()]


def plain_ready(
    batches: Any, held: dict[bytes, list[tuple[bytes, Event]]]
) -> list[tuple[bytes, bytes, Event]]:
    """The plain ordered loop's decision: decode a read's entries, hold back what a
    full read's unread entries may precede (each stream's entries from the
    earliest full stream's last millisecond on, kept in ``held`` for the next
    read), and return the rest as (stream, id, event) sorted by escrow and sequence."""
    full = {s: got[-1][0] for s, got in batches if len(got) >= BATCH}
    cutoff = min((int(i.partition(b"-")[0]) for i in full.values()), default=None)
    now: list[tuple[bytes, bytes, Event]] = []
    later: dict[bytes, list[tuple[bytes, Event]]] = {}
    streams = {s: [(e[0], decode_event(entry_data(e[1]))) for e in got] for s, got in batches}
    for stream in held.keys() - streams.keys():
        streams[stream] = []
    for stream, fresh in streams.items():
        items = held.pop(stream, []) + fresh
        split = len(items)
        if cutoff is not None:  # a full read's unread entries may precede these
            split = bisect_left(items, cutoff, key=lambda it: int(it[0].partition(b"-")[0]))
            if split < len(items):
                later[stream] = items[split:]
        now += [(stream, i, e) for i, e in items[:split]]
    if len(full) == 1 and later.keys() <= full.keys():
        # Only the one full stream holds entries back: its unread ones come after
        # them in the stream, and after everything else in hand.
        now += [(s, i, e) for s, items in later.items() for i, e in items]
        later = {}
    held.update(later)
    if len(streams) > 1:  # one stream is in each escrow's order already
        now.sort(key=lambda it: (it[2].aggregate_id, it[2].sequence))
    return now


def xadd_commands(names: StreamNames, entries: list[tuple[str, Any]]) -> list[list[tuple]]:
    """The XADD commands of ``entries``, built once, in pipelines of :data:`BATCH`."""
    commands = [
        ("XADD", names.stream(aggregate), "*", *[x for kv in fields.items() for x in kv])
        for aggregate, fields in entries
    ]
    return [commands[i : i + BATCH] for i in range(0, len(commands), BATCH)]


def hand_packed_xadd(client: redis.Redis, pipelines: list[list[tuple]]) -> int:
    """Send each pipeline packed in one write, then read its replies raw."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        sent = 0
        for commands in pipelines:
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands:
                conn.read_response()
            sent += len(commands)
        return sent
    finally:
        pool.release(conn)


def plain_relay(store: Store, client: redis.Redis, names: StreamNames, at: float) -> int:
    """Publish every unpublished outbox row as plain code would; return how many.

    Per batch: the oldest :data:`BATCH` rows read on the DBAPI cursor, their
    XADDs packed into one write and the ids read raw, then one ``UPDATE ...
    FROM VALUES`` marking each row with its id, committed.
    """
    raw = store.engine.raw_connection()
    mark = "?" if store.engine.dialect.paramstyle == "qmark" else "%s"
    stream_of = {aggregate: names.stream(aggregate) for aggregate in AGGREGATE_TYPES}
    pool = client.connection_pool
    conn = pool.get_connection()
    read = (
        "SELECT seq, event_id, stream, type, data FROM outbox "
        f"WHERE published_at IS NULL ORDER BY seq LIMIT {BATCH}"
    )
    try:
        cursor = raw.cursor()
        total = 0
        while rows := _fetch(cursor, read):
            conn.send_packed_command(
                conn.pack_commands(
                    [("XADD", stream_of[s], "*", "event_id", e, "type", t, "data", d)
                     for _, e, s, t, d in rows]
                )
            )  # fmt: skip
            ids = [conn.read_response().decode() for _ in rows]
            values = ",".join([f"({mark}, {mark})"] * len(rows))
            cursor.execute(
                f"WITH v(seq, sid) AS (VALUES {values}) UPDATE outbox SET published_at = "
                f"{mark}, stream_id = v.sid FROM v WHERE outbox.seq = v.seq",
                [x for row, sid in zip(rows, ids, strict=True) for x in (row[0], sid)] + [at],
            )
            raw.commit()
            total += len(rows)
        return total
    finally:
        pool.release(conn)
        raw.close()


def _fetch(cursor: Any, sql: str) -> list[Any]:
    cursor.execute(sql)  # DBAPI does not promise that execute returns the cursor
    return cursor.fetchall()  # type: ignore[no-any-return]


def create_groups(client: redis.Redis, streams: list[str], group: str) -> None:
    for stream in streams:
        client.xgroup_create(stream, group, id="0", mkstream=True)  # a stream may be empty


def destroy_groups(client: redis.Redis, streams: list[str], group: str) -> None:
    for stream in streams:
        client.xgroup_destroy(stream, group)


# -- crews: N processes that run one step at a time, together ---------------------------


def _crew_member(
    kind: str, index: int, url: str, store_url: str, prefix: str, barrier: Any, pipe: Any
) -> None:
    """One process of a crew: wait for a step, set up, meet the others, run, report."""
    names = StreamNames(prefix)
    group = GROUPS[index]
    client = connect(url)
    streams = names.streams(HANDLERS[group].aggregate_types)
    handler = make_handler(group, Store(store_url)) if kind != "raw" else None
    events = _group_events(client, streams) if kind == "sql" else []
    while True:
        step = pipe.recv()
        if step is None:
            return
        try:
            if kind == "sql":
                assert handler is not None
                barrier.wait(timeout=120)
                started = time.monotonic()
                for i in range(0, len(events), BATCH):
                    handler.handle(events[i : i + BATCH])
                ended = time.monotonic()
                pipe.send(("ok", group, len(events), started, ended))
            elif kind == "runtime":
                assert handler is not None
                worker = ConsumerWorker(client, handler, consumer=f"{group}-bench", names=names)
                worker.setup()
                barrier.wait(timeout=120)
                started = time.monotonic()
                worker.drain()
                ended = time.monotonic()
                worker.leave()
                handled, failed = worker.stats.handled, worker.stats.failed
                pipe.send(("ok", group, handled if not failed else -failed, started, ended))
            else:
                raw_group = f"{kind}-{step}-{index}"
                create_groups(client, streams, raw_group)
                barrier.wait(timeout=120)
                started = time.monotonic()
                handle = handler.handle if handler is not None else None  # plain: the SQL too
                read = raw_consume(client, streams, raw_group, handle=handle)
                ended = time.monotonic()
                destroy_groups(client, streams, raw_group)
                pipe.send(("ok", group, read, started, ended))
        except Exception:
            with contextlib.suppress(Exception):
                barrier.abort()
            pipe.send(("error", group, traceback.format_exc(), 0.0, 0.0))


def _group_events(client: redis.Redis, streams: list[str]) -> list[Event]:
    """Every event of ``streams``, decoded once, each stream in its order."""
    return [
        decode_event(entry_data(fields))
        for stream in streams
        for _, fields in client.xrange(stream)
    ]


class Crew:
    """Four processes, one per handler group: ``runtime`` ones (a worker and the real
    handler), ``raw`` ones (the plain loop), ``plain`` ones (the plain loop, ordering,
    with the real handler's ``handle``: the whole job as plain code) or ``sql`` ones
    (the real handler on the group's events, decoded before the step, in batches of
    :data:`BATCH`: its SQL alone)."""

    def __init__(self, kind: str, url: str, store: Store, names: StreamNames) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.kind = kind
        self.barrier = ctx.Barrier(len(GROUPS))
        self.pipes: list[Any] = []
        self.processes: list[Any] = []
        for index in range(len(GROUPS)):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_crew_member,
                args=(kind, index, url, store.url, names.prefix, self.barrier, theirs),
                daemon=True,
            )
            process.start()
            self.pipes.append(ours)
            self.processes.append(process)
        self.steps = 0

    def step(self, expected: dict[str, int]) -> tuple[int, float]:
        """All four at once from the barrier; (entries, first start to last end)."""
        self.steps += 1
        for pipe in self.pipes:
            pipe.send(self.steps)
        replies = []
        for pipe in self.pipes:
            if not pipe.poll(600):
                raise RuntimeError(f"{self.kind} crew: no reply within 600 s")
            replies.append(pipe.recv())
        for status, group, count, _, _ in replies:
            if status != "ok":
                raise RuntimeError(f"{self.kind} crew, {group}:\n{count}")
            if count != expected[group]:
                raise RuntimeError(
                    f"{self.kind} {group}: {count} entries, expected {expected[group]}"
                )
        started = min(r[3] for r in replies)
        return sum(r[2] for r in replies), max(r[4] for r in replies) - started

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(10)
            if process.is_alive():
                process.kill()


# -- FastStream, in its own environment -------------------------------------------------


class FastStream:
    """``bench/faststream_consume.py`` running in ``.venv-bench/``, one request at a time."""

    def __init__(self, python: Path) -> None:
        self.process = subprocess.Popen(
            [str(python), str(ROOT / "bench" / "faststream_consume.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.version = self.ask({"version": True})["faststream"]

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"FastStream child exited ({self.process.wait()})")
        return json.loads(line)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def faststream_or_reason(option: str | None) -> tuple[Path | None, str | None]:
    """The interpreter FastStream runs in, or why there is none.

    Without ``--faststream`` a missing ``.venv-bench`` skips the anchor (the record
    says so); an interpreter named on the command line must work.
    """
    if option == "none":
        return None, "skipped: --faststream none"
    python = Path(option) if option else FASTSTREAM_PYTHON
    problem = None
    if not python.exists():
        problem = f"no {python}"
    else:
        check = subprocess.run(
            [str(python), "-c", "import faststream.redis"], capture_output=True, text=True
        )
        if check.returncode != 0:
            problem = f"FastStream does not import in {python}: {check.stderr.strip()[-300:]}"
    if problem is None:
        return python, None
    if option:
        raise click.UsageError(f"--faststream {option}: {problem}")
    return None, (
        f"skipped: {problem} (`make bench` installs FastStream there from "
        "bench/requirements-faststream.txt)"
    )


# -- the run --------------------------------------------------------------------------


def reset_handler_groups(client: redis.Redis, store: Store, names: StreamNames) -> None:
    """Forget what the four handler groups did: their Redis groups, inbox and effects."""
    for group, handler_class in HANDLERS.items():
        for stream in names.streams(handler_class.aggregate_types):
            client.xgroup_destroy(stream, group)  # 0 when the group is not there
    with store.begin() as conn:
        for table in (inbox, ledger_entries, notifications, dispute_timeline):
            conn.execute(table.delete())


def inbox_counts(store: Store) -> dict[str, int]:
    with store.engine.connect() as conn:
        rows = conn.execute(
            select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name)
        ).all()
    return {group: int(count) for group, count in rows}


def run(
    escrows: int,
    sample: int,
    repeat: int,
    min_seconds: float,
    targets: dict[str, float],
    faststream_option: str | None,
    reset_store: bool,
) -> dict[str, Any]:
    console = wide_console()
    load_before = records.load_average()
    prefix = f"bench{os.getpid()}"
    names = StreamNames(prefix)
    relay_names = StreamNames(f"{prefix}-relay")
    xadd_names = StreamNames(f"{prefix}-xadd")
    plain_names = StreamNames(f"{prefix}-plain")
    faststream_python, faststream_reason = faststream_or_reason(faststream_option)
    notes: list[str] = []
    crews: list[Crew] = []
    peer: FastStream | None = None
    with redis_for_bench() as (url, redis_desc), store_for_bench(reset_store) as store:
        client = connect(url)
        try:
            version = ".".join(map(str, server_version(client)))
            env = records.environment(version, load_before)
            console.print(
                f"[bold]throughput[/]: {escrows} escrows, {repeat} round(s) of >= "
                f"{min_seconds:g} s per measurement; Redis {version}, {redis_desc}; "
                f"store {store.dialect}; {os.cpu_count()} CPUs; load {load_before}"
            )

            # The entries every consume step reads: the lifecycles' real envelopes.
            clock = ManualClock()
            gateway = SimulatedGateway(
                clock,
                GatewayBehaviour(failure_rate=0, duplicate_rate=0, late_rate=0, lost_rate=0),
                seed=1,
            )
            service = EscrowService(store, clock=clock, ids=IdFactory(1), gateway=gateway)
            produce(service, gateway, clock, escrows)
            entries = outbox_entries(store)
            with store.engine.connect() as conn:
                last_seq = conn.execute(select(func.max(outbox.c.seq))).scalar_one()
            published = OutboxRelay(store, client, names=names, batch_size=BATCH).drain()
            if published != len(entries):
                raise RuntimeError(f"relay published {published} of {len(entries)} outbox rows")
            n = len(entries)
            streams = names.streams()
            create_groups(client, streams, "exists")  # every stream exists, empty ones too
            destroy_groups(client, streams, "exists")
            per_group = {g: expected_entries(entries, HANDLERS[g].aggregate_types) for g in GROUPS}
            envelope = sum(len(k) + len(v) for _, f in entries for k, v in f.items()) / n
            console.print(
                f"{n} entries ({n / escrows:.1f} per lifecycle, {envelope:.0f} B of fields "
                "each) on the consume streams"
            )

            pipelines = xadd_commands(xadd_names, entries)
            steps = {"noop": 0, "raw1": 0}

            def step_commands() -> tuple[int, float]:
                done = stats.timed(lambda: produce(service, gateway, clock, STEP_ESCROWS))
                with store.begin() as conn:  # these rows are not the relay's to publish
                    conn.execute(
                        update(outbox)
                        .where(outbox.c.published_at.is_(None))
                        .values(published_at=clock.now())
                    )
                return done

            def unpublish(streams_of: StreamNames) -> None:
                """The lifecycles' rows unpublished again, the streams they went to gone."""
                client.delete(*streams_of.streams())
                with store.begin() as conn:
                    conn.execute(
                        update(outbox)
                        .where(outbox.c.seq <= last_seq)
                        .values(published_at=None, stream_id=None)
                    )

            def step_relay() -> tuple[int, float]:
                unpublish(relay_names)
                # A relay of its own per step: one that published to the deleted
                # streams would find them lost and repair first.
                relay = OutboxRelay(store, client, names=relay_names, batch_size=BATCH)
                count, seconds = stats.timed(relay.drain)
                if count != n:
                    raise RuntimeError(f"relay step published {count}, expected {n}")
                return count, seconds

            def step_relay_plain() -> tuple[int, float]:
                unpublish(plain_names)
                count, seconds = stats.timed(
                    lambda: plain_relay(store, client, plain_names, clock.now())
                )
                if count != n:
                    raise RuntimeError(f"plain relay published {count}, expected {n}")
                return count, seconds

            def step_xadd() -> tuple[int, float]:
                client.delete(*xadd_names.streams())
                return stats.timed(lambda: hand_packed_xadd(client, pipelines))

            def raw1_step(name: str, **how: bool) -> Callable[[], tuple[int, float]]:
                """A step of the one raw process (``how``: decode, order), own group."""

                def step() -> tuple[int, float]:
                    steps["raw1"] += 1
                    group = f"{name}-{steps['raw1']}"
                    create_groups(client, streams, group)
                    count, seconds = stats.timed(lambda: raw_consume(client, streams, group, **how))
                    destroy_groups(client, streams, group)
                    if count != n:
                        raise RuntimeError(f"{name} read {count}, expected {n}")
                    return count, seconds

                return step

            def step_noop() -> tuple[int, float]:
                steps["noop"] += 1
                group = f"noop-{steps['noop']}"
                worker = ConsumerWorker(
                    client,
                    NoopHandler(group),
                    consumer="noop-bench",
                    names=names,
                    settings=ConsumerSettings(),
                )
                worker.setup()
                _, seconds = stats.timed(worker.drain)
                handled = worker.stats.handled
                worker.leave()
                destroy_groups(client, streams, group)
                client.delete(names.heartbeats(group))
                if handled != n or worker.stats.acked != n:
                    raise RuntimeError(f"no-op loop handled {handled}, expected {n}")
                return handled, seconds

            runtime_crew = Crew("runtime", url, store, names)
            raw_crew = Crew("raw", url, store, names)
            sql_crew = Crew("sql", url, store, names)
            plain_crew = Crew("plain", url, store, names)
            crews += [runtime_crew, raw_crew, sql_crew, plain_crew]

            def handled_by(crew: Crew) -> tuple[int, float]:
                """A step of a crew that writes: from empty tables, every entry handled."""
                reset_handler_groups(client, store, names)
                done = crew.step(per_group)
                counts = inbox_counts(store)
                if counts != per_group:
                    raise RuntimeError(
                        f"{crew.kind}: inbox rows by group {counts}, expected {per_group}"
                    )
                return done

            def step_parallel4() -> tuple[int, float]:
                return handled_by(runtime_crew)

            def step_raw4() -> tuple[int, float]:
                return raw_crew.step(per_group)

            def step_sql4() -> tuple[int, float]:
                return handled_by(sql_crew)

            def step_plain4() -> tuple[int, float]:
                return handled_by(plain_crew)

            measures: dict[str, Callable[[], Sample]] = {}
            for name, step in (
                ("commands", step_commands),
                ("relay", step_relay),
                ("relay_plain", step_relay_plain),
                ("xadd", step_xadd),
                ("parallel4", step_parallel4),
                ("raw4", step_raw4),
                ("sql4", step_sql4),
                ("plain4", step_plain4),
                ("raw1", raw1_step("raw1")),
                ("raw1_decoded", raw1_step("raw1_decoded", decode=True)),
                ("raw1_ordered", raw1_step("raw1_ordered", order=True)),
                ("noop", step_noop),
            ):
                measures[name] = lambda step=step: stats.accumulate(step, min_seconds)

            faststream_version = None
            if faststream_python is not None:
                peer = FastStream(faststream_python)
                faststream_version = peer.version
                limit_one = min(sample, n)
                counter = {"step": 0}

                def step_faststream(batch: bool, limit: int) -> tuple[int, float]:
                    assert peer is not None
                    counter["step"] += 1
                    answer = peer.ask(
                        {"url": url, "streams": streams, "group": f"fs-{counter['step']}",
                         "batch": batch, "count": BATCH, "limit": limit}
                    )  # fmt: skip
                    if answer["items"] < limit:
                        raise RuntimeError(f"FastStream read {answer['items']} of {limit}")
                    return answer["items"], answer["seconds"]

                measures["fs_batch"] = lambda: stats.accumulate(
                    lambda: step_faststream(True, n), min_seconds
                )
                measures["fs_one"] = lambda: stats.accumulate(
                    lambda: step_faststream(False, limit_one), min_seconds
                )
            else:
                notes.append(f"FastStream anchor {faststream_reason}")
                console.print(f"[yellow]FastStream anchor {faststream_reason}[/]")

            def progress(r: int, name: str, s: Sample) -> None:
                print(
                    f"round {r + 1}/{repeat} {name}: {s.rate:,.0f}/s "
                    f"({s.items} in {s.seconds:.2f} s, {s.steps} steps)",
                    file=sys.stderr,
                )

            rounds, orders = stats.interleave(measures, repeat, progress)
        finally:
            for crew in crews:
                crew.close()
            if peer is not None:
                peer.close()
            with contextlib.suppress(redis.RedisError):
                for pattern in (f"{prefix}:*", f"{prefix}-*"):
                    keys = list(client.scan_iter(pattern, count=1000))
                    if keys:
                        client.delete(*keys)
            client.close()

    ratios = [
        stats.ratio_summary(name, rounds, num, den, what=what, target=targets.get(name))
        for name, (num, den, what) in RATIOS.items()
        if num in rounds[0] and den in rounds[0]
    ]
    rates = [
        stats.rate_summary(name, rounds, what=MEASURES[name], unit=UNITS.get(name, "entries/s"))
        for name in MEASURES
        if name in rounds[0]
    ]
    record = records.build(
        "throughput",
        env,
        parameters={
            "escrows": escrows,
            "entries": n,
            "entries_per_group": per_group,
            "envelope_bytes": round(envelope),
            "rounds": repeat,
            "min_seconds": min_seconds,
            "sample_one_by_one": min(sample, n),
            "batch": BATCH,
            "step_escrows": STEP_ESCROWS,
            "redis": redis_desc,
            "store": store.dialect,
            "faststream": faststream_version,
            "faststream_skipped": faststream_reason,
        },
        rounds=rounds,
        orders=orders,
        ratios=ratios,
        rates=rates,
        notes=notes,
    )
    print_report(console, record)
    return record


def fmt(value: float, unit: str) -> str:
    return f"{value:.3f}" if unit == "ratio" else f"{value:,.0f}"


def print_report(console: Any, record: dict[str, Any]) -> None:
    p = record["parameters"]
    table = Table(
        title=f"throughput: medians of {p['rounds']} interleaved rounds "
        f"(>= {p['min_seconds']:g} s of work each), 95% bootstrap interval",
        title_justify="left",
    )
    for column in ("figure", "what", "median", "min-max", "interval", "target", "verdict"):
        table.add_column(column, justify="left" if column in ("figure", "what") else "right")
    for section in ("ratios", "rates"):
        for name, s in record[section].items():
            lo, hi = s["interval"]
            table.add_row(
                name,
                s["what"],
                fmt(s["median"], s["unit"]),
                f"{fmt(s['min'], s['unit'])}-{fmt(s['max'], s['unit'])}",
                f"{fmt(lo, s['unit'])}-{fmt(hi, s['unit'])}",
                "" if s["target"] is None else f">= {s['target']:g}",
                s["verdict"] or "",
            )
    console.print(table)
    for note in record["notes"]:
        print(f"note: {note}")
    # Plain prints: unwrapped lines that scripts and the smoke test can find.
    for name, s in record["ratios"].items():
        lo, hi = s["interval"]
        judged = (
            "no target" if s["target"] is None else f"target >= {s['target']:g}: {s['verdict']}"
        )
        print(f"ratio {name}: median {s['median']:.3f}, interval {lo:.3f}-{hi:.3f}; {judged}")


def parse_targets(values: tuple[str, ...]) -> dict[str, float]:
    targets = dict(TARGETS)
    for value in values:
        name, sep, number = value.partition("=")
        if not sep or name not in RATIOS:
            raise click.UsageError(
                f"--target takes NAME=NUMBER with NAME one of {', '.join(RATIOS)}; got {value!r}"
            )
        try:
            targets[name] = float(number)
        except ValueError:
            raise click.UsageError(f"--target {name}: {number!r} is not a number") from None
    return targets


@click.command()
@click.option(
    "--escrows", default=2000, show_default=True, help="escrow lifecycles whose events are consumed"
)
@click.option(
    "--sample",
    default=2000,
    show_default=True,
    help="entries per step of FastStream's one-by-one subscriber",
)
@click.option("--repeat", default=5, show_default=True, help="interleaved rounds")
@click.option(
    "--min-seconds",
    default=1.0,
    show_default=True,
    help="timed work per measurement per round (steps are repeated until it adds up)",
)
@click.option("--target", "target_values", multiple=True, metavar="NAME=NUMBER",
              help="a target for a ratio (repeatable)")  # fmt: skip
@click.option(
    "--faststream",
    "faststream_option",
    metavar="PYTHON|none",
    help="the interpreter with FastStream installed [.venv-bench/bin/python]",
)
@click.option(
    "--quick",
    is_flag=True,
    help="a smoke run: 100 escrows, 3 rounds of >= 0.05 s, 200-entry sample, no record file",
)
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="where to write the record [bench/records/throughput.json; none with --quick]",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the record to this file",
)
@click.option(
    "--reset-store",
    is_flag=True,
    help="allow dropping and recreating the tables of DATABASE_URL",
)
def main(
    escrows: int,
    sample: int,
    repeat: int,
    min_seconds: float,
    target_values: tuple[str, ...],
    faststream_option: str | None,
    quick: bool,
    record_path: Path | None,
    json_path: Path | None,
    reset_store: bool,
) -> None:
    """Escrow runtime throughput against anchors of the same shape, in interleaved rounds."""
    if quick:
        escrows, sample, repeat = min(escrows, 100), min(sample, 200), 3
        min_seconds = min(min_seconds, 0.05)
    if escrows < 1 or sample < 1 or repeat < 1:
        raise click.UsageError("--escrows, --sample and --repeat must be at least 1")
    if not min_seconds >= 0:
        raise click.UsageError("--min-seconds must be 0 or more")
    targets = parse_targets(target_values)
    faststream_or_reason(faststream_option)  # a bad --faststream: exit 2 before any work
    record = run(escrows, sample, repeat, min_seconds, targets, faststream_option, reset_store)
    records.emit(
        record, (record_path, json_path), None if quick else records.RECORDS_DIR / "throughput.json"
    )


if __name__ == "__main__":
    main()
