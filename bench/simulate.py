"""Virtual-time speed and memory of the baseline simulation (issue #4).

**Speed.** :func:`simulations.drivers.virtual.simulate` on the baseline scenario with 1000
phones (``market.buyers`` raised to match: phones are taken from the buyers),
timed on the wall clock from the start of the run to the end of its virtual time
(the floor replays the same span): reading the tables back afterwards and the
bench's own memory samples (an INFO each) are not counted. *Runtime events*, read
from the run's tables, are the runtime's units of work; their sum per wall second
is the speed: commands (every service call, M-Pesa callbacks and rejected ones included: each
is a SQL transaction) + relayed (outbox rows published to the aggregate
streams) + handler calls (deliveries to a handler summed over all consumer
groups, fanout included, redeliveries counted) + user entries (appended by the
fan-out to per-user streams) + phone deliveries (entries phones received).
Beside it the same SimPy model (Market, MpesaGateway, Phone timing, same
parameters and seed) runs without the runtime: a dict-backed stand-in service,
phones that keep their connection/reconnect/poll draws but read nothing. The
runtime's share of the wall time is ``1 - model / total``. The machine is
shared and noisy (the same run varies from one run to the next), so the speed run is done
``--repeat`` times (3) in fresh processes and the median reported, with all.

**Load.** The speed above is the baseline's own load (1 escrow/s): few events
per virtual second, each carried through every group alone. ``--rates`` runs
the same scenario at other arrival rates (``--rate-duration`` of load, the
scenario's drain), each once with the default wake-ups (a commit wakes the
relay, a publish every consumer: batches of what one instant made) and once
batched (``relay.wake_on_commit=false``, ``consumers.wake_on_publish=false``:
a poll every ``every_s``/``poll_every_s``), so the table shows how speed
grows with load and with batching.

**Floor.** The anchor is the best plain code for the same shape: the speed run's
own traffic with nothing else around it. One more run of the speed run's scenario
(the same events: the run is deterministic), made before the rounds, records every
Redis send and SQLite statement it makes (:mod:`bench.wiretrace`; a hooked run,
never a timed one), up to the end of the run (reading the tables back is left out,
and so are the bench's own INFO samples). In every round, right after that round's
runs, a fresh process replays it by plain code: the same bytes on raw sockets, one
per connection the run used, the replies read with hiredis, the same statements with
the same parameters on plain :mod:`sqlite3` connections, against a redis-server
started and placed as the runs' are. Its wall seconds for the run's events are the
floor's events per second, taken under the same load as the round's speed run.
Beside it, a looser bound from unit costs: the recorded round trips and commits
times one redis-py PING on one connection and a SQLite transaction of one prepared
insert, timed in the round too (what the floor was before the replay: it leaves out
what the server and the database do for a real command).

**Targets (issue #16).** Two, each stated in the record with its per-round
values, min–max, bootstrap interval and a verdict that only an interval wholly
on one side of the target gives (:mod:`bench.stats`):

* ``speed_vs_floor`` (a ratio): the baseline's speed with wake-ups (the speed
  run) over the floor's events per second, target :data:`FLOOR_TARGET`: how
  close the runtime gets to its own Redis and SQL traffic replayed by plain code;
* ``batched_at_<rate>`` (a rate): runtime events per wall second of the scenario
  at ``--target-rate`` escrows/s (10) batched, target :data:`TARGET`. That run
  is made once per round, beside the speed run, and is also the load sweep's
  batched run at that rate (the median round's).

The floor's own events per second per round (``floor``, no target) goes in the
record too, so the README's block of targets and floors lists it; so does the
batched run's own floor (``floor_batched_at_<rate>``): that run's traffic (batches,
another shape) recorded once and replayed in every round the same way, the most
the batched target could reach with nothing but its Redis and SQL work.

**Memory.** ``simulate`` for ``--base-duration`` and ``--multiplier`` times it
of virtual load (same phones, drain unchanged), each in a child process with a
redis-server of its own (AOF on, as ``simulate`` starts one). Where the tree
has ``simulate_to`` the child calls that, so reading the tables back to count
them is not part of the peak. Figures: the child's peak RSS (``ru_maxrss``)
and its RSS when the virtual run ends (before the end-of-run tables are
collected), redis-server's peak RSS (``VmHWM``) and ``INFO memory``; an Nx/1x
ratio below 1.5 reads "flat". A second table shows what is held at the end:
the run's tables and its Redis keys by kind. A third looks inside the long
run, sampled every ``run.sample_every_s`` virtual s (one INFO each): the most
each size reached in the first half against the second half, so memory that
levels off (bounded by users, not by run length) is told from memory that
keeps growing. The speed run is the 1x run when the durations match.

Usage::

    .venv/bin/python bench/simulate.py           # 1000 phones, 600 s load; memory 1x, 10x
    .venv/bin/python bench/simulate.py --quick   # smoke run (100 phones, 60 s load, 3x)
    .venv/bin/python bench/simulate.py --rates ''  # no load sweep

Progress goes to stderr; the last line of output is one JSON object with every figure.
The speed runs are also summarised as rounds (``bench/stats.py``): the median
runtime events per wall second with its min–max and bootstrap interval, and a
verdict against the target only where the whole interval is on one side of it.
A record of the run goes to ``bench/records/simulate.json`` (``--quick`` writes
none unless ``--record`` is given), for ``bench/report.py``.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import numpy as np
import simpy
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(ROOT))

from bench import records, stats, wiretrace  # noqa: E402
from bench.cpu import redis_cpu_s  # noqa: E402
from simulations.analysis.report import wide_console  # noqa: E402
from simulations.models.gateway import MpesaGateway  # noqa: E402
from simulations.models.market import Market  # noqa: E402
from simulations.models.phones import Phone, ServerFaults, ServerPool  # noqa: E402
from simulations.models.supervision import SupervisedRestarts, policy_of  # noqa: E402
from simulations.scenario import Scenario, ScenarioError, load  # noqa: E402
from workbench.domain.escrow import DomainError, EscrowState  # noqa: E402
from workbench.ops import affinity  # noqa: E402
from workbench.payments.mpesa import GatewayUnavailable  # noqa: E402
from workbench.service import CommandResult  # noqa: E402
from workbench.streams.keys import UserStreamNames  # noqa: E402

TARGET = 20_000  # runtime events per wall-clock second
FLOOR_TARGET = 0.5  # the baseline's speed over the floor's events per second
TARGET_RATE = 10.0  # escrows/s of the batched run judged against TARGET
FLAT = 1.5  # Nx/1x ratio below which memory counts as flat
MIB = 1024 * 1024
S = EscrowState

# -- the model without the runtime --------------------------------------------------------


class ModelService:
    """Stands in for EscrowService: escrow states in a dict, deadlines applied lazily."""

    def __init__(self, env: simpy.Environment, m: dict[str, Any], mpesa: dict[str, Any]) -> None:
        self.env, self.ids, self.commands = env, count(1), 0
        self.verify_after_s, self.retry_s = mpesa["verify_after_s"], mpesa["verify_retry_s"]
        self.unsettled: dict[str, list[float]] = {}
        pay, ship, confirm = (m[f"{k}_timeout_s"] for k in ("payment", "shipping", "confirmation"))
        self.timeouts = {S.CREATED: pay, S.AWAITING_PAYMENT: pay, S.FUNDED: ship,
                         S.SHIPPED: confirm}  # fmt: skip
        self.rows: dict[str, list[Any]] = {}  # id -> [state, deadline, amount, checkout]
        self.checkouts: dict[str, str] = {}
        self.gateway: MpesaGateway | None = None

    def record(self, *_: Any) -> None:
        self.commands += 1

    def _row(self, escrow_id: str, *allowed: EscrowState) -> list[Any]:
        row = self.rows[escrow_id]
        if row[1] is not None and self.env.now >= row[1]:  # the expiry timer, lazily
            paid = {S.FUNDED: S.REFUNDED, S.SHIPPED: S.RELEASED}
            row[:2] = [paid.get(row[0], S.EXPIRED), None]
        if allowed and row[0] not in allowed:
            raise DomainError(f"escrow {escrow_id} is {row[0].value}")
        return row

    def _set(self, row: list[Any], state: EscrowState) -> CommandResult:
        row[0] = state
        row[1] = self.env.now + self.timeouts[state] if state in self.timeouts else None
        return CommandResult({"state": state.value})

    def create(self, buyer: str, seller: str, amount: int) -> CommandResult:
        escrow_id = f"esc-{next(self.ids)}"
        self.rows[escrow_id] = row = [S.CREATED, None, amount, None]
        self._set(row, S.CREATED)
        return CommandResult({"id": escrow_id, "buyer_id": buyer, "seller_id": seller})

    def fund(self, escrow_id: str, actor: str, phone: str) -> CommandResult:
        row = self._row(escrow_id, S.CREATED)
        assert self.gateway is not None
        row[3] = self.gateway.stk_push(escrow_id, row[2], phone)
        self.checkouts[row[3]] = escrow_id
        self.unsettled[row[3]] = [self.env.now + self.verify_after_s, 0]  # [due, attempts]
        return self._set(row, S.AWAITING_PAYMENT)

    # Payments as EscrowService verifies them: a callback is handled after the
    # query's latency and recorded only when the STK Push Query answers; an
    # unanswered query is asked again by the timer (every 10 s) after a backoff.
    # Same query draws in the same order, so the market sees the same states.

    def callback(self, url: str, body: dict[str, Any]) -> None:
        self.env.process(self._handle_callback(body["Body"]["stkCallback"]["CheckoutRequestID"]))

    def _handle_callback(self, checkout: str) -> Any:
        assert self.gateway is not None
        yield self.env.timeout(self.gateway.query_latency())
        self.commands += 1
        if checkout in self.unsettled:
            self._verify(checkout)

    def _verify(self, checkout: str) -> None:
        assert self.gateway is not None
        try:
            answer = self.gateway.query(checkout)
        except GatewayUnavailable:
            answer = None
        if answer is None or answer.pending:
            attempts = self.unsettled[checkout][1]
            delay = min(self.retry_s * 2 ** min(attempts, 20), 300.0)
            self.unsettled[checkout] = [self.env.now + delay, attempts + 1]
            return
        del self.unsettled[checkout]
        row = self._row(self.checkouts.pop(checkout))
        if row[3] == checkout and row[0] is S.AWAITING_PAYMENT:
            self._set(row, S.FUNDED if answer.result_code == 0 else S.CREATED)

    def timer(self, every: float = 10.0) -> Any:
        while True:
            yield self.env.timeout(every)
            due = sorted((d, c) for c, (d, _) in self.unsettled.items() if d <= self.env.now)
            for _, checkout in due[:100]:
                self._verify(checkout)

    def get(self, escrow_id: str) -> SimpleNamespace:
        return SimpleNamespace(state=self._row(escrow_id)[0])

    def ship(self, escrow_id: str, actor: str) -> CommandResult:
        return self._set(self._row(escrow_id, S.FUNDED), S.SHIPPED)

    def confirm(self, escrow_id: str, actor: str) -> CommandResult:
        return self._set(self._row(escrow_id, S.SHIPPED), S.RELEASED)

    def dispute(self, escrow_id: str, actor: str, reason: str) -> CommandResult:
        return self._set(self._row(escrow_id, S.FUNDED, S.SHIPPED), S.DISPUTED)

    def resolve(self, escrow_id: str, actor: str, outcome: str) -> CommandResult:
        return self._set(self._row(escrow_id, S.DISPUTED), S.REFUNDED if outcome == "refund"
                         else S.RELEASED)  # fmt: skip

    def cancel(self, escrow_id: str, actor: str) -> CommandResult:
        return self._set(self._row(escrow_id, S.CREATED, S.AWAITING_PAYMENT, S.FUNDED), S.CANCELLED)


class ModelPhone(Phone):
    """A Phone with the same connection, reconnect and server timing that reads nothing."""

    connects = 0

    def _connect(self) -> Any:
        self.connects += 1
        return None


def model_only(scenario: Scenario, seed: int) -> dict[str, Any]:
    """The SimPy model of ``simulate`` minus the runtime: same seeds, same draws."""
    started = time.perf_counter()
    params, run_p, servers = scenario.params, scenario.params["run"], scenario.servers
    env = simpy.Environment()
    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(8)]
    service = ModelService(env, params["market"], params["mpesa"])
    service.gateway = MpesaGateway(
        env, rngs[0], scenario.mpesa, service.callback, query_rng=rngs[6]
    )
    env.process(service.timer())
    market = Market(env, rngs[1], scenario.market, service, service.record,  # type: ignore[arg-type]
                    until=run_p["duration_s"])  # fmt: skip
    env.process(market.run())
    names, buyers, pool = UserStreamNames("sim"), market.buyers, ServerPool(servers.count)
    for i in range(min(scenario.phones.count, len(buyers))):
        rng = np.random.default_rng(rngs[3].integers(2**63))
        phone = ModelPhone(env, rng, scenario.phones, buyers[i], None, names, [], pool=pool)  # type: ignore[arg-type]
        env.process(phone.run())
    restarts = SupervisedRestarts(policy_of(scenario.supervisor))  # serve's, as the runs
    server_faults = ServerFaults(env, rngs[5], servers, pool, [], run_p["duration_s"], restarts)
    for server in range(servers.count):
        env.process(server_faults.run(server))
    env.run(until=run_p["duration_s"] + run_p["drain_s"])
    connects = sum(p.connects for p in pool.phones)
    return {"wall_s": time.perf_counter() - started, "commands": service.commands,
            "escrows": market.opened, "phone_connects": connects}  # fmt: skip


# -- one simulate() run in a child process ------------------------------------------------


def _proc(pid: int | None, field: str) -> int:
    """A ``/proc/<pid>/status`` size field (VmRSS, VmHWM) in bytes; 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _redis_keys(client: Any, prefix: str = "sim") -> dict[str, list[int]]:
    """Keys under ``prefix`` by kind: [entries (streams) or keys (others), bytes]."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
        pipe.type(key)
    found = pipe.execute()
    pipe = client.pipeline(transaction=False)
    for key, kind in zip(keys, found[1::2], strict=True):
        (pipe.xlen if kind == b"stream" else pipe.exists)(key)
    out: dict[str, list[int]] = {}
    for key, size, n in zip(keys, found[0::2], pipe.execute(), strict=True):
        parts = key.decode().split(":")
        row = out.setdefault(f"{parts[0]}:{parts[1]}" + (":*" if len(parts) > 2 else ""), [0, 0])
        row[0] += n
        row[1] += size or 0
    return out


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``simulate`` once against a redis-server of our own; return every figure."""
    import simulations.drivers.virtual as sim
    from simulations.analysis.tables import RunTables
    from workbench.ops.redis_server import KILLABLE, paired

    scenario, label = load(spec["scenario"], spec["overrides"]), spec["label"]
    rss_before, samples = _proc(os.getpid(), "VmRSS"), []
    # The floor's run records what it sends (hooked: never a timed run).
    wire = wiretrace.record() if spec.get("trace") else None
    # The run ends where reading the tables back begins: not the run's work, neither
    # timed nor replayed; nor are the bench's own samples (``progress``).
    span = {"run_end": 0.0, "samples_s": 0.0, "samples_cpu_s": 0.0, "cpu_end": 0.0,
            "redis_cpu_end": 0.0}  # fmt: skip
    collect = getattr(sim, "_collect", None)
    if collect is not None:

        def collect_after_the_run(*args: Any) -> Any:
            span["run_end"], span["cpu_end"] = time.perf_counter(), time.process_time()
            if wire is not None:
                wire.mark()
            span["redis_cpu_end"] = redis_cpu_s(probe)  # past the mark: not replayed
            return collect(*args)

        sim._collect = collect_after_the_run  # type: ignore[attr-defined]
    cpu = affinity.resolve(spec.get("cpu", "auto"))  # as `workbench simulate` places them
    with (
        tempfile.TemporaryDirectory(prefix="bench-sim-") as directory,
        paired(None, directory, cpu, **KILLABLE) as (_, server),
    ):
        assert server is not None
        probe = server.client()
        redis_cpu_started = redis_cpu_s(probe)
        if wire is not None:
            wire.start()  # the server's own start (a PING, a handshake) is not the run's
        started, cpu_started = time.perf_counter(), time.process_time()

        def progress(t: float, total: float) -> None:
            # (t, wall s, simulator RSS, redis RSS, redis used_memory): one INFO per
            # sample (every run.sample_every_s virtual s), nothing in between.
            entered, cpu_entered = time.perf_counter(), time.process_time()
            if wire is None:
                used = int(probe.info("memory")["used_memory"])
            else:  # the probe's INFO is the bench's, not the run's: left out
                before = len(wire.ops)
                used = int(probe.info("memory")["used_memory"])
                del wire.ops[before:]
            samples.append((t, time.perf_counter() - started, _proc(os.getpid(), "VmRSS"),
                          _proc(server.pid, "VmRSS"), used))  # fmt: skip
            if len(samples) % 20 == 0 or t >= total:
                _, wall, rss, redis_rss, _ = samples[-1]
                print(f"  [{label}] {t:,.0f}/{total:,.0f} virtual s, {wall:,.1f} s wall, RSS "
                      f"{rss / MIB:,.0f} MiB, redis {redis_rss / MIB:,.0f} MiB",
                      file=sys.stderr, flush=True)  # fmt: skip
            span["samples_s"] += time.perf_counter() - entered
            span["samples_cpu_s"] += time.process_time() - cpu_entered

        run_dir, tables = Path(directory) / "run", None
        if hasattr(sim, "simulate_to"):  # writes the tables as it goes, returns none of them
            sim.simulate_to(
                scenario, spec["seed"], run_dir, redis_url=server.url, progress=progress
            )
        else:  # an older tree: simulate() keeps the tables in memory and returns them
            tables = sim.simulate(scenario, spec["seed"], redis_url=server.url, progress=progress)
        ended = time.perf_counter()
        run_end = span["run_end"] or ended  # an older tree: to the end, tables and all
        wall = run_end - started - span["samples_s"]
        sim_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        client = server.client()
        info, keys = client.info("memory"), _redis_keys(client)
        redis_version = str(client.info("server")["redis_version"])
        redis_hwm = _proc(server.pid, "VmHWM")
        client.close()
        probe.close()
        tables = tables or RunTables.load(run_dir)  # to count, after the peak was taken
    events = {
        "commands": len(tables.commands),
        "relayed": int(tables.published["t_published"].notna().sum()),
        "handler_calls": int(tables.handled["handler_calls"].sum()),
        "user_entries": len(tables.user_streams),
        "phone_deliveries": int((tables.deliveries["source"] != "snapshot").sum()),
    }
    run_p = scenario.run
    return {
        "label": label, "cpu": cpu, "load_s": run_p.duration_s, "redis_version": redis_version,
        "virtual_s": run_p.duration_s + run_p.drain_s, "escrows": len(tables.escrows),
        "events": events, "total_events": sum(events.values()), "wall_s": wall,
        "collect_s": ended - run_end, "samples_s": span["samples_s"],
        # CPU seconds over the run's span: this process (the bench's samples left
        # out) and redis-server (INFO's used_cpu_*, the samples' INFO included)
        "sim_cpu_s": span["cpu_end"] - cpu_started - span["samples_cpu_s"]
        if span["run_end"] else None,
        "redis_cpu_s": span["redis_cpu_end"] - redis_cpu_started if span["run_end"] else None,
        "span": "run" if span["run_end"] else "run and tables read back (an older tree)",
        "loop_wall_s": samples[-1][1], "sim_rss_before": rss_before,
        "sim_rss_run_end": samples[-1][2],
        "sim_rss_peak": sim_peak,
        "redis_rss_peak": redis_hwm, "redis_used_memory": int(info["used_memory"]),
        "redis_used_memory_peak": int(info["used_memory_peak"]), "redis_keys": keys,
        "tables": {name: [len(df), int(df.memory_usage(deep=True).sum())]
                   for name in tables.table_names() if len(df := getattr(tables, name))},
        "rss_trace": [(round(t), round(w, 1), r, rr, u) for t, w, r, rr, u in samples[9::20]],
        "trace": [(t, r, rr, u) for t, _, r, rr, u in samples],
        "counts": wire and _save_and_count(wire, Path(spec["trace"])),
    }  # fmt: skip


def _save_and_count(wire: wiretrace.Trace, path: Path) -> dict[str, int]:
    """Save the trace; count what was kept (up to the run's end) as the floor replays
    it: a transaction that only read, without its BEGIN and its end (it commits
    nothing, so it is not counted as a commit)."""
    wire.save(path)
    lean, _ = wiretrace.Trace.load(path).lean()
    return lean.counts()


def replay_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Replay the trace at ``spec["replay"]`` against a redis-server of our own, placed
    and configured as the runs' are, and a new SQLite file: the floor's wall seconds."""
    from workbench.ops.redis_server import KILLABLE, paired

    trace = wiretrace.Trace.load(Path(spec["replay"]))
    cpu = affinity.resolve(spec.get("cpu", "auto"))
    with (
        tempfile.TemporaryDirectory(prefix="bench-floor-") as directory,
        paired(None, directory, cpu, **KILLABLE) as (_, server),
    ):
        assert server is not None
        address = server.socket_path or ("127.0.0.1", server.port)
        probe = server.client()
        done = wiretrace.replay(trace, str(address) if server.socket_path else address,
                                Path(directory) / "replay.db",
                                redis_cpu=lambda: redis_cpu_s(probe))  # fmt: skip
        probe.close()
    return {"seconds": done.seconds, "round_trips": done.round_trips,
            "sql_statements": done.sql_statements, "lean_transactions": done.lean_transactions,
            "cpu": cpu, "sim_cpu_s": done.cpu_s, "redis_cpu_s": done.redis_cpu_s}  # fmt: skip


def call_costs(n: int = 5000, cpu: int | None = None) -> dict[str, float]:
    """Microseconds per Redis call (redis-py through the pool, on one connection,
    and the same command written and read on the socket by hand) and per SQLite
    transaction of one prepared insert, as a handler's is: the floor's units,
    placed as the runs are (``cpu``, a unix socket)."""
    from sqlalchemy import insert

    from workbench.ops.redis_server import paired
    from workbench.store import Prepared, Store, binds, inbox

    def per_call(fn: Any) -> float:
        started = time.perf_counter()
        for i in range(n):
            fn(i)
        return (time.perf_counter() - started) / n * 1e6

    with tempfile.TemporaryDirectory(prefix="bench-floor-") as directory:
        with paired(None, directory, cpu) as (_, server):
            assert server is not None
            pooled, single = server.client(), server.client(single_connection_client=True)
            single.ping()
            conn = single.connection
            assert conn is not None

            def raw(_: int) -> None:
                conn.send_command("PING")
                conn.read_response()

            costs = {"redis_pooled_us": per_call(lambda _: pooled.ping()),
                     "redis_single_us": per_call(lambda _: single.ping()),
                     "redis_raw_us": per_call(raw)}  # fmt: skip
            pooled.close()
            single.close()
        store = Store(f"sqlite:///{directory}/floor.db")
        store.create_schema()
        claim = Prepared(insert(inbox).values(binds("group_name", "event_id", "handled_at")))

        def transaction(i: int) -> None:
            with store.begin() as c:
                claim.execute(c, {"group_name": "g", "event_id": f"e{i}", "handled_at": 0.0})

        costs["sqlite_txn_us"] = per_call(transaction)
        store.close()
    return costs


def floor_us(counts: dict[str, int], events: int, costs: dict[str, float]) -> float:
    """Microseconds per runtime event spent in round trips (each timed as one call on
    one connection) and SQL commits (each a one-insert transaction) alone."""
    trips, commits = counts["round_trips"] / events, counts["sql_commits"] / events
    return trips * costs["redis_single_us"] + commits * costs["sqlite_txn_us"]


def cpu_split(runs: list[dict[str, Any]], replays: list[dict[str, Any]],
              events: int) -> dict[str, Any] | None:  # fmt: skip
    """Each round's CPU seconds over the timed span, the speed run's and its floor's
    (``runs`` and ``replays`` in round order): the simulator's process and
    redis-server's. Pinned, the two share one CPU, so their sum is about the wall
    time and the split says whose work the gap is (None for runs of a tree that did
    not measure it). The speed run's redis-server seconds include the bench's
    memory samples (an INFO each), which its wall and process seconds leave out."""
    sides = {"speed": [(r, r["wall_s"]) for r in runs],
             "floor": [(r, r["seconds"]) for r in replays]}  # fmt: skip
    if any(r.get("sim_cpu_s") is None for side in sides.values() for r, _ in side):
        return None
    return {"events": events, **{
        name: [{"wall_s": round(wall, 4), "sim_cpu_s": round(r["sim_cpu_s"], 4),
                "redis_cpu_s": round(r["redis_cpu_s"], 4)} for r, wall in side]
        for name, side in sides.items()}}  # fmt: skip


def _cpu_line(split: dict[str, Any]) -> str:
    """Per runtime event, median of the rounds: the simulator's CPU and redis-server's,
    in the speed run and in its floor; and the simulator's beyond the floor's."""
    events = split["events"]

    def us(side: str, key: str) -> float:
        return float(np.median([r[key] for r in split[side]])) / events * 1e6

    sim, sim_floor = us("speed", "sim_cpu_s"), us("floor", "sim_cpu_s")
    redis_run, redis_floor = us("speed", "redis_cpu_s"), us("floor", "redis_cpu_s")
    wall = us("speed", "wall_s")
    return (f"simulator process {sim:.0f} / {sim_floor:.0f} µs, redis-server {redis_run:.0f} / "
            f"{redis_floor:.0f} µs; the simulator's CPU beyond its floor's, {sim - sim_floor:.0f} "
            f"µs per event, is {(sim - sim_floor) / wall:.0%} of the speed run's wall time "
            f"({wall:.0f} µs per event)")  # fmt: skip


def _median_costs(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.median([c[k] for c in rounds])) for k in rounds[0]}


def _print_costs(costs: dict[str, float], placement: str) -> None:
    print(f"per call ({placement}): redis-py through the pool {costs['redis_pooled_us']:.1f} us, "
          f"on one connection {costs['redis_single_us']:.1f} us, by hand on the socket "
          f"{costs['redis_raw_us']:.1f} us; a SQLite transaction of one prepared insert "
          f"{costs['sqlite_txn_us']:.1f} us")  # fmt: skip


def print_floor(
    run: dict[str, Any],
    costs: dict[str, float],
    os_costs: dict[str, float] | None,
    replays: list[dict[str, Any]],
) -> None:
    counts, events = run["counts"], run["total_events"]
    trips, commits = counts["round_trips"] / events, counts["sql_commits"] / events
    bound = floor_us(counts, events, costs)
    where = "placed as the runs" if os_costs is not None else "CPUs left to the OS"
    _print_costs(costs, f"{where}, median of the rounds")
    if os_costs is not None:
        _print_costs(os_costs, "CPUs left to the OS, for comparison")
    print(f"recorded run ({events:,} runtime events): {counts['round_trips']:,} Redis round "
          f"trips ({trips:.2f} per event), {counts['sql_statements']:,} SQL statements, "
          f"{counts['sql_commits']:,} commits ({commits:.2f} per event)")  # fmt: skip
    print(f"bound from the unit costs alone: {bound:.0f} us per runtime event")
    print(
        f"the replay runs {replays[0]['lean_transactions']:,} transactions that only read as their "
        "SELECTs alone (the runtime takes the write lock for them: plain code would not)"
    )
    replayed = float(np.median([r["seconds"] for r in replays]))
    print(
        f"floor, that traffic replayed by plain code (median of {len(replays)}): "
        f"{replayed:,.2f} s = {replayed / events * 1e6:.0f} us per runtime event -> at most "
        f"{events / replayed:,.0f} events per wall s before any other work"
    )


BATCHED = ["relay.wake_on_commit=false", "consumers.wake_on_publish=false"]


def print_load(console: Any, rows: list[dict[str, Any]]) -> None:
    table = Table(title="speed by arrival rate (runtime events per wall s)", title_justify="left")
    for name in ("escrows/s", "escrows", "runtime events", "wake-ups: wall s", "events/s",
                 "batched: wall s", "events/s ", "target"):  # fmt: skip
        table.add_column(name, justify="right")
    for row in rows:
        woken, batched = row["woken"], row["batched"]
        best = max(
            woken["total_events"] / woken["wall_s"], batched["total_events"] / batched["wall_s"]
        )
        table.add_row(
            f"{row['rate']:g}", f"{woken['escrows']:,}", f"{woken['total_events']:,}",
            f"{woken['wall_s']:,.1f}", f"{woken['total_events'] / woken['wall_s']:,.0f}",
            f"{batched['wall_s']:,.1f}", f"{batched['total_events'] / batched['wall_s']:,.0f}",
            f"{best / TARGET:.2f}",
        )  # fmt: skip
    console.print(table)


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """``child(spec)`` in a fresh interpreter, so peak RSS is this run's alone."""
    argv = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- report -------------------------------------------------------------------------------


def print_speed(console: Any, run: dict[str, Any], model: dict[str, Any], phones: int,
                judged: stats.Summary) -> None:  # fmt: skip
    wall, total, virtual = (run[k] for k in ("wall_s", "total_events", "virtual_s"))
    print(f"speed: {phones} phones, {run['load_s']:,.0f} s load + {virtual - run['load_s']:,.0f} s "
          f"drain = {virtual:,.0f} virtual s, {run['escrows']:,} escrows; the run took "
          f"{wall:,.1f} s wall ({virtual / wall:,.1f} virtual s per wall s), not counting the "
          f"bench's memory samples ({run['samples_s']:,.2f} s) and reading the tables back "
          f"({run['collect_s']:,.1f} s)")  # fmt: skip
    print("runtime events = commands + relayed + handler calls (all groups) + user entries "
          "+ phone deliveries")  # fmt: skip
    table = Table(title="runtime events", title_justify="left")
    for name in ("what", "events", "per wall s"):
        table.add_column(name, justify="left" if name == "what" else "right")
    for key, n in [*run["events"].items(), ("total", total)]:
        table.add_row(key.replace("_", " "), f"{n:,}", f"{n / wall:,.0f}")
    console.print(table)
    rate, share = total / wall, 1 - model["wall_s"] / wall
    lo, hi = judged.interval
    print(f"runtime events per wall second: {rate:,.0f}; median of {len(judged.per_round)} "
          f"run(s) {judged.median:,.0f}, interval {lo:,.0f}-{hi:,.0f} "
          "(judged as speed / floor, below)")  # fmt: skip
    print(f"model only (stand-in service, phones that read nothing): {model['wall_s']:,.2f} s "
          f"wall, {model['commands']:,} commands and {model['escrows']:,} escrows "
          f"(runtime run: {run['events']['commands']:,}, {run['escrows']:,}); "
          f"{model['phone_connects']:,} phone connections (each a replay read in the runtime "
          "run)")  # fmt: skip
    print(f"runtime share of wall time: 1 - {model['wall_s']:,.2f}/{wall:,.1f} = {share:.1%}")


MEMORY_ROWS = (  # label, key, unit, judged flat/grows
    ("virtual load s", "load_s", 1, False), ("escrows", "escrows", 1, False),
    ("runtime events", "total_events", 1, False), ("wall s", "wall_s", 1, False),
    ("sim RSS before simulate() MiB", "sim_rss_before", MIB, False),
    ("sim RSS at end of virtual run MiB", "sim_rss_run_end", MIB, False),
    ("sim peak RSS MiB", "sim_rss_peak", MIB, True),
    ("sim peak RSS - before MiB", "sim_rss_growth", MIB, True),
    ("redis peak RSS (VmHWM) MiB", "redis_rss_peak", MIB, True),
    ("redis used_memory MiB", "redis_used_memory", MIB, True),
    ("redis used_memory_peak MiB", "redis_used_memory_peak", MIB, False),
)  # fmt: skip


def print_memory(console: Any, small: dict[str, Any], big: dict[str, Any], n: float) -> None:
    for run in (small, big):
        run["sim_rss_growth"] = run["sim_rss_peak"] - run["sim_rss_before"]
    table = Table(title=f"memory: {n:g}x vs 1x virtual load", title_justify="left")
    for name in ("", "1x", f"{n:g}x", f"{n:g}x/1x", f"flat if < {FLAT}"):
        table.add_column(name, justify="right" if name else "left")
    verdicts = {}
    for label, key, unit, judged in MEMORY_ROWS:
        a, b = small[key] / unit, big[key] / unit
        ratio = b / a if a else float("inf")
        verdict = ("flat" if ratio < FLAT else "grows") if judged else ""
        if judged:
            verdicts[label.removesuffix(" MiB")] = verdict
        table.add_row(label, f"{a:,.1f}", f"{b:,.1f}", f"{ratio:.2f}", verdict)
    console.print(table)
    held = Table(title="size at the end: table rows (MiB as DataFrames), Redis entries or keys "
                 "(MiB by MEMORY USAGE)", title_justify="left")  # fmt: skip
    for name in ("", "1x", "MiB", f"{n:g}x", "MiB", "MiB ratio"):
        held.add_column(name, justify="right" if name else "left")
    for where, key in (("table", "tables"), ("redis", "redis_keys")):
        for name, (count_b, size_b) in sorted(big[key].items(), key=lambda kv: -kv[1][1]):
            count_a, size_a = small[key].get(name, (0, 0))
            ratio = f"{size_b / size_a:.1f}" if size_a else "-"
            held.add_row(f"{where} {name}", f"{count_a:,}", f"{size_a / MIB:,.2f}",
                         f"{count_b:,}", f"{size_b / MIB:,.2f}", ratio)  # fmt: skip
    console.print(held)
    print_within(console, big, n, verdicts)
    print("memory over run length: " + "; ".join(f"{k} {v}" for k, v in verdicts.items()))


def print_within(console: Any, big: dict[str, Any], n: float, verdicts: dict[str, str]) -> None:
    """Inside the long run: the most each size reached in its first half against the
    most in its second half. Memory that grows with run length keeps growing in
    the second half; memory bounded by the population (a stream and a history
    window per user) levels off once every user has had an event."""
    trace = big["trace"]
    half = trace[-1][0] / 2
    first = [row for row in trace if row[0] <= half]
    second = [row for row in trace if row[0] > half]
    table = Table(title=f"inside the {n:g}x run: first half vs second half (virtual time)",
                  title_justify="left")  # fmt: skip
    for name in ("", "max, first half", "max, second half", "at the end", "second/first",
                 f"flat if < {FLAT}"):  # fmt: skip
        table.add_column(name, justify="right" if name else "left")
    for column, label in ((1, "sim RSS MiB"), (2, "redis RSS MiB"), (3, "redis used_memory MiB")):
        a = max(row[column] for row in first) / MIB
        b = max(row[column] for row in second) / MIB
        ratio = b / a if a else float("inf")
        verdict = "flat" if ratio < FLAT else "grows"
        verdicts[f"{label.removesuffix(' MiB')} over the {n:g}x run"] = verdict
        table.add_row(label, f"{a:,.1f}", f"{b:,.1f}", f"{trace[-1][column] / MIB:,.1f}",
                      f"{ratio:.2f}", verdict)  # fmt: skip
    console.print(table)
    step = max(1, len(trace) // 10)
    for column, label in ((1, "sim RSS"), (3, "redis used_memory")):
        points = ", ".join(f"{row[0]:,.0f}: {row[column] / MIB:,.1f}" for row in trace[::step])
        print(f"{label} during the {n:g}x run (virtual s: MiB): {points}")


@click.command()
@click.option("--scenario", default="baseline", show_default=True)
@click.option("--seed", default=1, show_default=True)
@click.option("--phones", default=1000, show_default=True, help="phones.count (and min buyers)")
@click.option("--duration", type=float, help="speed: virtual load s [scenario's run.duration_s]")
@click.option("--base-duration", type=float, help="memory: 1x virtual load s [the scenario's]")
@click.option("--multiplier", default=10.0, show_default=True, help="memory: the long run's N")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE")
@click.option(
    "--rates",
    metavar="R1,R2,...",
    help="also run the scenario at these arrival rates (escrows/s), with wake-ups and batched "
    "[1,10,50; --quick: 5; '' for none]",
)
@click.option(
    "--rate-duration", default=120.0, show_default=True, help="--rates: virtual load s of each run"
)
@click.option(
    "--repeat",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="speed runs (the median is reported)",
)
@click.option(
    "--cpu", default="auto", show_default=True, metavar="auto|none|N",
    help="as `workbench simulate --cpu`; unless none, the speed runs are repeated "
    "with none beside them",
)  # fmt: skip
@click.option(
    "--target-rate", type=float, metavar="R",
    help=f"the batched run judged against {TARGET:,} events/s, once per round, at R "
    f"escrows/s for --rate-duration [{TARGET_RATE:g}; --quick: 5]",
)  # fmt: skip
@click.option("--quick", is_flag=True, help="smoke run: 100 phones, 60 s load, 30 s drain, 3x")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--record",
    "record_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="where to write the record [bench/records/simulate.json; none with --quick]",
)
@click.option("--child", "child_spec", hidden=True)
def main(scenario: str, seed: int, phones: int, duration: float | None,
         base_duration: float | None, multiplier: float, overrides: tuple[str, ...],
         rates: str | None, rate_duration: float, repeat: int, cpu: str,
         target_rate: float | None, quick: bool, json_path: Path | None,
         record_path: Path | None, child_spec: str | None) -> None:  # fmt: skip
    """Virtual-time speed of the baseline simulation, the runtime's share, and memory."""
    if child_spec:
        spec_of_child = json.loads(child_spec)
        run = replay_child if "replay" in spec_of_child else child
        print(json.dumps(run(spec_of_child)))
        return
    sets = list(overrides)
    if quick:
        phones, duration, base_duration, multiplier = min(phones, 100), 60.0, 60.0, 3.0
        sets.insert(0, "run.drain_s=30")
        rates, rate_duration = "5" if rates is None else rates, min(rate_duration, 30.0)
        repeat = 1
        target_rate = 5.0 if target_rate is None else target_rate
    rates = "1,10,50" if rates is None else rates
    target_rate = TARGET_RATE if target_rate is None else target_rate
    try:
        loaded = load(scenario, sets)
    except ScenarioError as exc:
        raise click.UsageError(str(exc)) from None
    if phones < 1 or multiplier <= 0:
        raise click.UsageError("--phones must be at least 1 and --multiplier positive")
    try:
        placed = affinity.resolve(cpu)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        arrival_rates = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        raise click.UsageError(
            f"--rates takes numbers separated by commas, not {rates!r}"
        ) from None
    if any(r <= 0 for r in arrival_rates) or target_rate <= 0:
        raise click.UsageError(
            "--rates and --target-rate must be positive (escrows per virtual second)"
        )
    duration = duration or loaded.run.duration_s
    base_duration = base_duration or loaded.run.duration_s
    buyers = max(phones, loaded.market.buyers)

    def spec(load_s: float, label: str, more: list[str] | None = None) -> dict[str, Any]:
        extra = [f"phones.count={phones}", f"market.buyers={buyers}", f"run.duration_s={load_s}"]
        overrides = sets + extra + (more or [])
        return {"scenario": scenario, "seed": seed, "overrides": overrides, "label": label,
                "cpu": "none" if placed is None else placed}  # fmt: skip

    def events_per_s(run: dict[str, Any]) -> float:
        return run["total_events"] / run["wall_s"]

    console = wide_console()
    # The machine is shared and noisy: the speed run is repeated and the median kept;
    # runs with the CPU left to the OS alternate with them, for a fair comparison.
    compare = placed is not None
    runs, unplaced = [], []
    load_before = records.load_average()
    rounds: list[stats.Round] = []
    # Each round: the speed run (and left to the OS), the batched run at the target
    # rate, then the floor's unit costs, all under that round's load.
    batched_key = f"batched_at_{target_rate:g}"
    batched_more = [f"market.arrival_rate={target_rate}", *BATCHED]
    batched_runs: list[dict[str, Any]] = []
    round_costs: list[dict[str, float]] = []
    cost_calls = 500 if quick else 5000
    # The floor: the speed run's own traffic, recorded once (a hooked run, not timed)
    # and replayed by plain code in every round, under that round's load.
    # The batched run's floor the same way: its traffic is of another shape (batches).
    traced_dir = tempfile.TemporaryDirectory(prefix="bench-trace-")
    trace_path = Path(traced_dir.name) / "speed.trace"
    batched_trace = Path(traced_dir.name) / "batched.trace"
    recorded = spawn({**spec(duration, "recording the floor's trace"), "trace": str(trace_path)})
    batched_recorded = spawn({**spec(rate_duration, "recording the batched run's trace",
                                     batched_more), "trace": str(batched_trace)})  # fmt: skip
    batched_floor_key = f"floor_{batched_key}"
    replays: list[dict[str, Any]] = []
    batched_replays: list[dict[str, Any]] = []
    for i in range(repeat):
        runs.append(spawn(spec(duration, f"speed {i + 1}/{repeat}")))
        rounds.append({"speed": stats.Sample(runs[-1]["total_events"], runs[-1]["wall_s"])})
        if compare:
            unplaced.append(spawn({**spec(duration, f"speed, cpu none {i + 1}/{repeat}"),
                                   "cpu": "none"}))  # fmt: skip
            rounds[-1]["speed_os_placed"] = stats.Sample(
                unplaced[-1]["total_events"], unplaced[-1]["wall_s"]
            )
        label = f"{target_rate:g}/s batched {i + 1}/{repeat}"
        batched_runs.append(spawn(spec(rate_duration, label, batched_more)))
        rounds[-1][batched_key] = stats.Sample(
            batched_runs[-1]["total_events"], batched_runs[-1]["wall_s"]
        )
        round_costs.append(call_costs(cost_calls, placed))
        replays.append(spawn({"replay": str(trace_path), "label": f"floor {i + 1}/{repeat}",
                              "cpu": "none" if placed is None else placed}))  # fmt: skip
        for run, of in ((runs[-1], recorded), (batched_runs[-1], batched_recorded)):
            if run["total_events"] != of["total_events"]:  # the floor replays another run
                raise click.ClickException(
                    f"{run['label']}: {run['total_events']:,} runtime events, its recorded run "
                    f"{of['total_events']:,}: the scenario is not deterministic"
                )
        rounds[-1]["floor"] = stats.Sample(recorded["total_events"], replays[-1]["seconds"])
        batched_replays.append(spawn({"replay": str(batched_trace), "label": "batched floor",
                                      "cpu": "none" if placed is None else placed}))  # fmt: skip
        rounds[-1][batched_floor_key] = stats.Sample(
            batched_recorded["total_events"], batched_replays[-1]["seconds"]
        )
    traced_dir.cleanup()
    # No target of its own: issue 16 replaced issue 4's 20,000/s for this run by its
    # ratio to the floor (speed_vs_floor) and kept 20,000/s for the batched run.
    judged = stats.rate_summary("speed", rounds, what="runtime events per wall second",
                                unit="events/s")  # fmt: skip
    batched_judged = stats.rate_summary(
        batched_key, rounds, unit="events/s", target=TARGET,
        what=f"runtime events per wall second, batched, {target_rate:g} escrows/s",
    )  # fmt: skip
    split = cpu_split(runs, replays, recorded["total_events"])  # in round order: paired
    batched_runs.sort(key=events_per_s)
    runs.sort(key=events_per_s)
    unplaced.sort(key=events_per_s)
    speed = runs[len(runs) // 2]
    rates_seen = [events_per_s(r) for r in runs]
    model = model_only(load(scenario, spec(duration, "")["overrides"]), seed)
    print_speed(console, speed, model, phones, judged)
    if repeat > 1:
        seen = ", ".join(f"{r:,.0f}" for r in rates_seen)
        print(f"speed runs ({repeat}, the median shown above): {seen} runtime events per wall s")
    placement = None
    if compare:
        other = unplaced[len(unplaced) // 2]
        placement = {"cpu": placed, "one_cpu": round(events_per_s(speed), 1),
                     "os_placed": round(events_per_s(other), 1),
                     "os_placed_runs": [round(events_per_s(r), 1) for r in unplaced]}  # fmt: skip
        seen = ", ".join(f"{events_per_s(r):,.0f}" for r in unplaced)
        print(f"CPU placement, median of {repeat} each: simulator and redis-server on CPU "
              f"{placed}: {events_per_s(speed):,.0f} events/s; left to the OS ({seen}): "
              f"{events_per_s(other):,.0f} events/s; one CPU / OS = "
              f"{events_per_s(speed) / events_per_s(other):.2f}x")  # fmt: skip
    small = speed if base_duration == duration else spawn(spec(base_duration, "memory 1x"))
    big = spawn(spec(base_duration * multiplier, f"memory {multiplier:g}x"))
    print_memory(console, small, big, multiplier)
    by_rate = []
    for rate in arrival_rates:
        more = [f"market.arrival_rate={rate}"]
        woken = spawn(spec(rate_duration, f"{rate:g}/s", more))
        if rate == target_rate:  # made in the rounds already: the median one
            batched = batched_runs[len(batched_runs) // 2]
        else:
            batched = spawn(spec(rate_duration, f"{rate:g}/s batched", more + BATCHED))
        by_rate.append({"rate": rate, "woken": woken, "batched": batched})
    if by_rate:
        print_load(console, by_rate)
    # Where the baseline's floor is: its own traffic replayed (timed in the rounds), and
    # beside it a looser bound, its round trips and commits at the unit costs.
    costs = _median_costs(round_costs)
    os_costs = None if placed is None else call_costs(cost_calls, None)
    print_floor(recorded, costs, os_costs, replays)
    if split is not None:
        print(f"where the time goes, {_cpu_line(split)}")
    vs_floor = stats.ratio_summary(
        "speed_vs_floor", rounds, "speed", "floor", target=FLOOR_TARGET,
        what="the baseline's runtime events per wall s (wake-ups) / the floor's events per s "
        "(its own Redis and SQL traffic replayed by plain code, this round)",
    )  # fmt: skip
    floor_judged = stats.rate_summary(
        "floor", rounds, unit="events/s",
        what="floor: runtime events per s of the baseline's own Redis sends and SQL "
        "statements replayed by plain code, before any other work",
    )  # fmt: skip
    batched_floor = stats.rate_summary(
        batched_floor_key, rounds, unit="events/s",
        what=f"floor: runtime events per s of the batched run at {target_rate:g} escrows/s, "
        "its own Redis sends and SQL statements replayed by plain code",
    )  # fmt: skip
    print(f"floor of the batched run at {target_rate:g} escrows/s (its own traffic replayed): "
          f"{batched_floor.median:,.0f} events per wall s (interval "
          f"{batched_floor.interval[0]:,.0f}–{batched_floor.interval[1]:,.0f})")  # fmt: skip
    print_targets(vs_floor, batched_judged)
    rate = events_per_s(speed)
    for run in (speed, small, big):
        run.pop("trace", None)  # every sample: printed above, too long for the JSON line
    summary = {"bench": "simulate", "scenario": scenario, "seed": seed, "phones": phones,
               "events_per_s": round(rate, 1),
               "interval": [round(x, 1) for x in judged.interval],
               "runtime_share": round(1 - model["wall_s"] / speed["wall_s"], 4),
               "events_per_s_runs": [round(r, 1) for r in rates_seen], "placement": placement,
               "targets": {s.name: _target_figures(s) for s in (vs_floor, batched_judged)},
               "floor": {"counts": recorded["counts"], "events": recorded["total_events"],
                         "replay_s": [round(r["seconds"], 4) for r in replays],
                         "lean_transactions": replays[0]["lean_transactions"],
                         "batched": {"counts": batched_recorded["counts"],
                                     "events": batched_recorded["total_events"],
                                     "replay_s": [round(r["seconds"], 4)
                                                  for r in batched_replays]},
                         **{k: round(v, 2) for k, v in costs.items()},
                         "rounds": [{k: round(v, 2) for k, v in c.items()} for c in round_costs],
                         "os_placed": os_costs and {k: round(v, 2) for k, v in os_costs.items()}},
               "cpu": split,
               "speed": speed, "model_only": model,
               "memory": {"1x": small, f"{multiplier:g}x": big},
               "by_rate": [{"rate": r["rate"], **{k: {f: r[k][f] for f in ("escrows", "events",
                            "total_events", "wall_s")} for k in ("woken", "batched")}}
                           for r in by_rate]}  # fmt: skip
    if record_path is None and not quick:
        record_path = records.RECORDS_DIR / "simulate.json"
    if record_path is not None:
        record = record_of(summary, rounds, [judged, batched_judged, floor_judged, batched_floor],
                           [vs_floor],
                           load_before,
                           multiplier,
                           {"scenario": scenario, "seed": seed, "phones": phones,
                            "duration": duration, "repeat": repeat, "cpu": cpu,
                            "overrides": sets, "rates": arrival_rates,
                            "target_rate": target_rate})  # fmt: skip
        records.write(record, record_path)
    line = json.dumps(summary, sort_keys=True)
    if json_path is not None:
        json_path.write_text(line + "\n")
    print(line)


def _target_figures(s: stats.Summary) -> dict[str, Any]:
    digits = 3 if s.unit == "ratio" else 1
    return {"what": s.what, "median": round(s.median, digits), "target": s.target,
            "interval": [round(x, digits) for x in s.interval], "verdict": s.verdict,
            "per_round": [round(x, digits) for x in s.per_round]}  # fmt: skip


def _target_line(s: stats.Summary) -> str:
    """``median (interval lo–hi, n rounds) against >= target: VERDICT``."""
    fmt = "{:.2f}" if s.unit == "ratio" else "{:,.0f}"
    lo, hi = s.interval
    median, lo, hi, target = (fmt.format(x) for x in (s.median, lo, hi, s.target))
    return (f"{median} (interval {lo}–{hi}, {len(s.per_round)} round(s)) "
            f"against ≥ {target}: {s.verdict}")  # fmt: skip


def print_targets(vs_floor: stats.Summary, batched: stats.Summary) -> None:
    print(f"target: speed / floor (baseline, wake-ups): {_target_line(vs_floor)}")
    print(f"target: {batched.what}: {_target_line(batched)}")


def _reach(floor_interval: tuple[float, float]) -> str:
    """Whether the batched target is within what its floor's interval allows."""
    low, high = floor_interval
    verdict = (
        "out of reach on this machine"
        if high < TARGET
        else "within reach"
        if low >= TARGET
        else "the floor's interval straddles it"
    )
    return (f"{TARGET:,} events/s needed; its own traffic replayed allows at most "
            f"{high:,.0f} events/s ({verdict})")  # fmt: skip


def record_of(summary: dict[str, Any], rounds: list[stats.Round], rates: list[stats.Summary],
              targets: list[stats.Summary], load_before: list[float], multiplier: float,
              parameters: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The bench record: each round's runs (speed, batched at the target rate) and
    floor, the two targets (a ratio and a rate, each with its interval and verdict),
    the headline figures of the rest."""
    ratios = list(targets)
    if "speed_os_placed" in rounds[0]:
        ratios.append(stats.ratio_summary("one_cpu_vs_os_placed", rounds, "speed",
                                          "speed_os_placed",
                                          what="pinned to one CPU / left to the OS"))  # fmt: skip
    small, big = summary["memory"]["1x"], summary["memory"][f"{multiplier:g}x"]
    floor = summary["floor"]
    trips = floor["counts"]["round_trips"] / floor["events"]
    commits = floor["counts"]["sql_commits"] / floor["events"]
    per_event = floor_us(floor["counts"], floor["events"], floor)
    replayed = float(np.median(floor["replay_s"])) / floor["events"] * 1e6
    batched_rate = floor["batched"]["events"] / float(np.median(floor["batched"]["replay_s"]))
    headline = [
        *[[f"target: {s.what}", _target_line(s)] for s in targets],
        *[[f"target: {s.what}", _target_line(s)] for s in rates
          if s.name != "speed" and s.target is not None],
        ["runtime share of wall time (median speed run)", f"{summary['runtime_share']:.1%}"],
        [f"simulator peak RSS, 1x / {multiplier:g}x virtual load",
         f"{small['sim_rss_peak'] / MIB:,.0f} / {big['sim_rss_peak'] / MIB:,.0f} MiB"],
        [f"redis used_memory, 1x / {multiplier:g}x virtual load",
         f"{small['redis_used_memory'] / MIB:,.1f} / {big['redis_used_memory'] / MIB:,.1f} MiB"],
        ["Redis round trips / SQL commits per runtime event (recorded run; reads commit nothing)",
         f"{trips:.2f} / {commits:.2f}"],
        ["floor: the run's own Redis and SQL traffic replayed by plain code (median round)",
         f"{replayed:.0f} µs per event: at most {1e6 / replayed:,.0f} events/s"],
        ["floor of the batched run at the target rate: its own traffic replayed (median "
         "round)", f"{batched_rate:,.0f} events/s"],
        *[[f"{s.name.removeprefix('floor_')}'s target against its floor",
           _reach(s.interval)] for s in rates if s.name.startswith("floor_batched_at")],
        ["a looser bound: round trips and commits alone at the unit costs (PING, one-row "
         "transaction; median of the rounds)",
         f"{per_event:.0f} µs per event: at most {1e6 / per_event:,.0f} events/s"],
        *([["where the time goes: CPU per runtime event, the speed run / its floor (median "
            "of the rounds)", _cpu_line(summary["cpu"])]] if summary.get("cpu") else []),
        *[[f"runtime events per wall s at {row['rate']:g} escrows/s: woken / batched",
           " / ".join(f"{row[k]['total_events'] / row[k]['wall_s']:,.0f}"
                      for k in ("woken", "batched"))]
          for row in summary["by_rate"]],
    ]  # fmt: skip
    order = list(rounds[0])
    return records.build(
        "simulate",
        records.environment(summary["speed"].get("redis_version"), load_before),
        parameters=parameters,
        rounds=rounds,
        orders=[order] * len(rounds),
        ratios=ratios,
        rates=rates,
        figures={"headline": headline, "summary": summary},
        notes=["a round: the speed run (and, where pinned, the same left to the OS), the "
               "batched run at the target rate, each a fresh process, then the unit costs "
               "timed and the floor replayed (a fresh process); the floor replays the traffic "
               "of one recorded run of the speed run's scenario, made before the rounds"],
    )  # fmt: skip


if __name__ == "__main__":
    main()
