"""``workbench run`` (``make demo``): the end-to-end escrow demo against an embedded Redis.

A few hundred escrows go through every lifecycle path (release on confirm,
auto-release, dispute with refund or release, cancel before and after
funding, expiry, failed and retried payments, late and duplicated M-Pesa
callbacks). Four consumer groups run as real worker processes; the ledger
worker SIGKILLs itself in the middle of a batch and a second ledger worker
claims what it left pending. The run ends when every group has handled every
event; a summary table is printed and the tables are written under ``out``.

Domain time is a :class:`ManualClock` moved in phases (so payment and
confirmation timeouts pass in seconds); the workers run on the wall clock.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from rich.progress import Progress
from sqlalchemy import func, select

from simulations.analysis.report import frame_table, inspection_frames, wide_console
from workbench import paths
from workbench.domain.clock import ManualClock
from workbench.domain.escrow import ADMIN, DomainError, Timeouts
from workbench.domain.events import AGGREGATE_TYPES
from workbench.domain.ids import IdFactory
from workbench.handlers import GROUPS, aggregate_types_of
from workbench.handlers.ledger import check_ledger
from workbench.ops.inspection import inspect
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.payments.mpesa import GatewayBehaviour, SimulatedGateway, token_of
from workbench.service import EscrowService
from workbench.store import Store, escrows, inbox, ledger_entries, outbox
from workbench.streams.connection import connect
from workbench.streams.groups import ensure_groups
from workbench.streams.keys import StreamNames
from workbench.streams.relay import OutboxRelay

# Lifecycle paths and their shares of the demo's escrows.
PATHS: dict[str, float] = {
    "release": 0.50,
    "auto_release": 0.06,
    "dispute_refund": 0.08,
    "dispute_release": 0.06,
    "cancel_unfunded": 0.08,
    "cancel_funded": 0.07,
    "expire_unpaid": 0.05,
    "expire_unshipped": 0.10,
}
# Late payments are the gateway's doing: a callback that arrives after the
# payment timeout finds the escrow expired and is refunded (late_rate below).


@dataclass
class DemoConfig:
    escrows: int = 300
    seed: int = 42
    out: Path = field(default_factory=lambda: paths.data_dir() / "demo")
    crash: bool = True
    timeout: float = 120.0
    batch_size: int = 50
    prefix: str = "wb"
    timeouts: Timeouts = field(default_factory=Timeouts)


def _spawn_worker(
    group: str, consumer: str, env: dict[str, str], cfg: DemoConfig, logs: Path, crash: bool = False
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "workbench", "sim-worker" if crash else "worker", group,
        "--consumer", consumer, "--prefix", cfg.prefix,
        "--batch-size", str(cfg.batch_size), "--block-ms", "200",
        "--dead-after", "1.0", "--retry-backoff", "0.2",
    ]  # fmt: skip
    if crash:
        argv += ["--crash-at", "mid-batch", "--crash-batch", "3"]
    log = open(logs / f"{consumer}.log", "wb")  # noqa: SIM115 - the child owns it
    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)


class _Market:
    """Drives the escrows through their paths, in phases of domain time."""

    def __init__(
        self,
        service: EscrowService,
        gateway: SimulatedGateway,
        clock: ManualClock,
        rng: random.Random,
        count: int,
    ) -> None:
        self.service, self.gateway, self.clock, self.rng = service, gateway, clock, rng
        names, weights = zip(*PATHS.items(), strict=True)
        self.plan: list[tuple[str, str, str, str]] = []  # (escrow, path, buyer, seller)
        self.paths = [rng.choices(names, weights)[0] for _ in range(count)]
        self.rejected = 0
        self.callbacks = Counter[str]()

    def _try(self, action: Any, *args: Any, **kwargs: Any) -> None:
        try:
            action(*args, **kwargs)
        except DomainError:
            self.rejected += 1  # e.g. confirming an escrow whose payment failed

    def deliver_callbacks(self) -> None:
        # Each callback goes to its push's URL and is confirmed with the gateway's query.
        for delivery in self.gateway.due_deliveries():
            outcome = self.service.handle_callback(token_of(delivery.url), delivery.body)
            self.callbacks[outcome.outcome] += 1
        # The verification pass: anything a callback could not settle.
        self.callbacks.update(f"verified_{k}" for k in self.service.verify_payments().elements())

    def phases(self) -> list[tuple[str, Any]]:
        return [
            ("create & fund", self._create_and_fund),
            ("callbacks, retry failed payments", self._settle_payments),
            ("ship, cancel, dispute", self._ship),
            ("confirm, resolve", self._confirm),
            ("timeouts & late callbacks", self._timeouts),
        ]

    def _state(self, escrow_id: str) -> str:
        return self.service.get(escrow_id).state.value

    def _create_and_fund(self) -> None:
        s = self.service
        for i, path in enumerate(self.paths):
            buyer, seller = f"buyer-{i % 97}", f"seller-{i % 23}"
            amount = self.rng.choice([150, 500, 1200, 2500, 8000, 15000, 49000])
            result = s.create(buyer, seller, amount, f"order {i}", idempotency_key=f"create-{i}")
            escrow_id = result.escrow["id"]  # type: ignore[index]
            # A retried create with the same key changes nothing.
            assert s.create(
                buyer, seller, amount, f"order {i}", idempotency_key=f"create-{i}"
            ).replayed
            self.plan.append((escrow_id, path, buyer, seller))
            if path == "cancel_unfunded":
                s.cancel(escrow_id, buyer, "changed my mind")
            elif path != "expire_unpaid":
                s.fund(escrow_id, buyer, "254700000000")
            self.clock.advance(0.5)

    def _settle_payments(self) -> None:
        self.clock.advance(self.gateway.behaviour.delay_max * 2 + 1)
        self.deliver_callbacks()
        for escrow_id, path, buyer, _ in self.plan:
            if self._state(escrow_id) == "created" and path not in (
                "cancel_unfunded",
                "expire_unpaid",
            ):
                self._try(self.service.fund, escrow_id, buyer, "254700000000")
        self.clock.advance(self.gateway.behaviour.delay_max * 2 + 1)
        self.deliver_callbacks()

    def _ship(self) -> None:
        for escrow_id, path, buyer, seller in self.plan:
            if self._state(escrow_id) != "funded":
                continue
            if path == "cancel_funded":
                self._try(self.service.cancel, escrow_id, buyer, "found it cheaper")
            elif path in ("dispute_refund",):
                self._try(self.service.dispute, escrow_id, buyer, "seller unresponsive")
            elif path != "expire_unshipped":
                self._try(self.service.ship, escrow_id, seller, f"TRK{escrow_id[-6:]}")
            self.clock.advance(0.1)

    def _confirm(self) -> None:
        for escrow_id, path, buyer, _ in self.plan:
            state = self._state(escrow_id)
            if path == "release" and state == "shipped":
                self._try(
                    self.service.confirm, escrow_id, buyer, idempotency_key=f"confirm-{escrow_id}"
                )
                self._try(
                    self.service.confirm,
                    escrow_id,
                    buyer,  # a retried tap
                    idempotency_key=f"confirm-{escrow_id}",
                )
            elif path == "dispute_release" and state == "shipped":
                self._try(self.service.dispute, escrow_id, buyer, "item damaged")
                self._try(self.service.resolve, escrow_id, ADMIN, "release", "damage was minor")
            elif path == "dispute_refund" and state == "disputed":
                self._try(self.service.resolve, escrow_id, ADMIN, "refund", "never shipped")
            self.clock.advance(0.1)

    def _timeouts(self) -> None:
        t = self.service.timeouts
        self.clock.advance(max(t.payment, t.shipping, t.confirmation) + 1)
        self.service.expire_due()
        # Callbacks held back as "late" arrive now, after their escrows expired.
        self.clock.advance(self.gateway.behaviour.late_delay + 1)
        self.deliver_callbacks()
        self.service.expire_due()


def _group_counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute(
            select(inbox.c.group_name, func.count()).group_by(inbox.c.group_name)
        ).all()
    return {g: int(n) for g, n in rows}


def _expected_per_group(store: Store) -> dict[str, int]:
    with store.read() as conn:
        per_stream = dict(
            conn.execute(
                select(outbox.c.stream, func.count(func.distinct(outbox.c.event_id))).group_by(
                    outbox.c.stream
                )
            ).all()
        )
    return {
        group: sum(int(per_stream.get(a, 0)) for a in aggregate_types_of(group)) for group in GROUPS
    }


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    console = wide_console()
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    started = time.monotonic()
    external = os.environ.get("REDIS_URL")
    server = None
    if not external:
        server = RedisServer(out / "redis", appendonly=True).start()
    url = external or server.url  # type: ignore[union-attr]
    names = StreamNames(cfg.prefix)
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        client = connect(url)
        for key in client.scan_iter(f"{cfg.prefix}:*"):
            client.delete(key)
        store = Store(os.environ.get("DATABASE_URL") or f"sqlite:///{out / 'workbench.db'}")
        store.reset()
        for group in GROUPS:
            ensure_groups(client, names.streams(aggregate_types_of(group)), group)
        where = "external" if server is None else ".".join(map(str, server.version))
        console.print(
            f"[bold]escrow demo[/]: {cfg.escrows} escrows, seed {cfg.seed}, "
            f"Redis {where} at {url}, store {store}"
        )
        env = dict(os.environ, REDIS_URL=url, DATABASE_URL=store.url)
        for group in GROUPS:
            crash = cfg.crash and group == "ledger"
            workers[f"{group}-1"] = _spawn_worker(group, f"{group}-1", env, cfg, logs, crash)

        relay = OutboxRelay(store, client, names=names, batch_size=200)
        relay_thread = threading.Thread(target=relay.run, name="relay", daemon=True)
        relay_thread.start()

        clock = ManualClock()
        rng = random.Random(cfg.seed)
        gateway = SimulatedGateway(
            clock,
            GatewayBehaviour(failure_rate=0.12, duplicate_rate=0.15, late_rate=0.05),
            seed=cfg.seed,
        )
        service = EscrowService(
            store, clock=clock, ids=IdFactory(cfg.seed), timeouts=cfg.timeouts, gateway=gateway
        )
        market = _Market(service, gateway, clock, rng, cfg.escrows)

        with Progress(console=console, transient=False) as progress:
            task = progress.add_task("phases", total=len(market.phases()))
            for name, phase in market.phases():
                progress.update(task, description=name)
                phase()
                progress.advance(task)

        crash_report: dict[str, Any] = {"injected": False}
        if cfg.crash:
            crash_report = _recover_crashed_ledger(client, names, workers, env, cfg, logs)

        expected = _expected_per_group(store)

        def drained() -> bool:
            if relay.backlog():
                return False
            counts = _group_counts(store)
            return all(counts.get(g, 0) >= expected[g] for g in GROUPS) and all(
                int(row["pending"]) == 0 for row in inspect(client, names).groups
            )

        wait_until(
            drained, timeout=cfg.timeout, interval=0.05, what="every group to handle every event"
        )
        relay.stop()
        relay_thread.join(10)
        exit_codes = _stop_workers(workers)
        inspection = inspection_frames(inspect(client, names))
        summary = _summarise(
            cfg,
            store,
            inspection,
            expected,
            market,
            crash_report,
            exit_codes,
            time.monotonic() - started,
            relay,
        )
        _write_tables(out, store, inspection, summary)
        _print_summary(console, summary, inspection)
        return summary
    finally:
        for process in workers.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        if server is not None:
            server.close()


def _recover_crashed_ledger(
    client: Any,
    names: StreamNames,
    workers: dict[str, subprocess.Popen[bytes]],
    env: dict[str, str],
    cfg: DemoConfig,
    logs: Path,
) -> dict[str, Any]:
    crashed = workers["ledger-1"]
    try:
        code = wait_until(
            lambda: crashed.poll() is not None and [crashed.returncode],
            timeout=cfg.timeout,
            what="the ledger worker to crash",
        )[0]
    except TimeoutError:
        return {"injected": False, "note": "too few batches for the crash point"}
    pending = 0
    for stream in names.streams(aggregate_types_of("ledger")):
        for c in client.xinfo_consumers(stream, "ledger"):
            if c["name"] in (b"ledger-1", "ledger-1"):
                pending += int(c["pending"])
    workers["ledger-2"] = _spawn_worker("ledger", "ledger-2", env, cfg, logs)
    return {
        "injected": True,
        "point": "mid-batch of batch 3",
        "exit_code": code,
        "pending_at_crash": pending,
        "recovered_by": "ledger-2",
    }


def _stop_workers(workers: dict[str, subprocess.Popen[bytes]]) -> dict[str, int | None]:
    for process in workers.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for name, process in workers.items():
        try:
            codes[name] = process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            codes[name] = None
    return codes


def _summarise(
    cfg: DemoConfig,
    store: Store,
    inspection: Any,
    expected: dict[str, int],
    market: _Market,
    crash: dict[str, Any],
    exit_codes: dict[str, int | None],
    wall: float,
    relay: OutboxRelay,
) -> dict[str, Any]:
    handled = _group_counts(store)
    groups_df = inspection.groups
    rows = []
    for group in GROUPS:
        g = groups_df[groups_df["group"] == group]
        rows.append(
            {
                "group": group,
                "streams": ",".join(aggregate_types_of(group)),
                "events": expected[group],
                "handled": handled.get(group, 0),
                "pending": int(g["pending"].sum()),
                "lag": int(g["lag"].sum()),
                "dead_lettered": int(g["dead_letters"].max()) if len(g) else 0,
            }
        )
    ledger = check_ledger(store)
    with store.read() as conn:
        states = dict(
            conn.execute(select(escrows.c.state, func.count()).group_by(escrows.c.state)).all()
        )
        published = int(conn.execute(select(func.count()).select_from(outbox)).scalar_one())
    stream_entries = int(inspection.streams["length"].sum())
    clean_exits = all(
        code == 0
        for name, code in exit_codes.items()
        if name != "ledger-1" or not crash["injected"]
    )
    groups_ok = all(
        r["handled"] == r["events"] and r["pending"] == 0 and r["lag"] == 0 for r in rows
    )
    ok = (
        groups_ok
        and ledger.ok
        and clean_exits
        and (not cfg.crash or (crash["injected"] and crash["exit_code"] == -signal.SIGKILL))
    )
    return {
        "ok": ok,
        "config": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in asdict(cfg).items()
            if k != "timeouts"
        },
        "wall_seconds": round(wall, 2),
        "events_published": published,
        "stream_entries": stream_entries,
        "relay": asdict(relay.stats),
        "groups": rows,
        "escrow_states": {k: int(v) for k, v in sorted(states.items())},
        "paths": dict(Counter(market.paths)),
        "callbacks": dict(market.callbacks),
        "rejected_commands": market.rejected,
        "ledger": {
            **asdict(ledger),
            "balanced": ledger.balanced,
            "conserved": ledger.conserved,
            "matches_outbox": ledger.matches_outbox,
            "ok": ledger.ok,
        },
        "crash": crash,
        "worker_exit_codes": exit_codes,
        "aggregate_types": list(AGGREGATE_TYPES),
    }


def _write_tables(out: Path, store: Store, inspection: Any, summary: dict[str, Any]) -> None:
    with store.engine.connect() as conn:
        for name, table in (
            ("events", outbox),
            ("escrows", escrows),
            ("ledger", ledger_entries),
            ("inbox", inbox),
        ):
            frame = pd.read_sql(select(table), conn)
            if "data" in frame:
                frame["data"] = frame["data"].map(bytes.decode)
            frame.to_parquet(out / f"{name}.parquet", index=False)
    inspection.groups.to_parquet(out / "groups.parquet", index=False)
    inspection.streams.to_parquet(out / "streams.parquet", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))


def _print_summary(console: Any, summary: dict[str, Any], inspection: Any) -> None:
    console.print(frame_table(pd.DataFrame(summary["groups"]), "consumer groups"))
    ledger = summary["ledger"]
    console.print(
        f"events published: {summary['events_published']} (stream entries "
        f"{summary['stream_entries']}); callbacks {summary['callbacks']}"
    )
    console.print(f"escrow states: {summary['escrow_states']}")
    crash = summary["crash"]
    if crash.get("injected"):
        console.print(
            f"crash: ledger-1 SIGKILLed at {crash['point']} (exit {crash['exit_code']}) with "
            f"{crash['pending_at_crash']} entries pending; recovered by {crash['recovered_by']}"
        )
    console.print(
        f"ledger: {'OK' if ledger['ok'] else 'FAILED'} — funded {ledger['funded']} = held "
        f"{ledger['held']} + released {ledger['released']} + refunded {ledger['refunded']}; "
        f"sum of entries {ledger['total']}; {ledger['posted_events']}/"
        f"{ledger['expected_events']} money events posted once"
    )
    verdict = "[green]OK[/]" if summary["ok"] else "[red]FAILED[/]"
    console.print(
        f"{verdict} in {summary['wall_seconds']} s; tables in {summary['config']['out']}/"
    )
