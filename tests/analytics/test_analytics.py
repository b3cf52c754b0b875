"""The analytics pipeline end to end, against the real runtime.

Two simulated markets (seeds 1 and 2) run against the session's redis-server,
with 120 sellers of which about a fifth are fraudulent. Their streams stay in
Redis (``relay.retention_s`` of a day), so a real ``ConsumerWorker`` with the
``RiskScorer`` can consume them afterwards: in-process, and as worker
processes SIGKILLed at crash points.

* two paths, one answer: the features in the scorer's durable state equal the
  features computed from the run's tables;
* a SIGKILLed scorer (after the effect, mid-batch) neither loses nor doubles a
  fact or a ``risk.scored`` entry; nor does a publish that fails after commit;
* the model trained on seed 1 beats the base-rate classifier on seed 2.
"""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import redis
from sqlalchemy import func, select

from simulations.analysis.tables import RunTables
from simulations.analytics.frames import batch_features, facts_from_published
from simulations.analytics.online import (
    backlog,
    lag_summary,
    online_scores,
    read_risk_stream,
    scorer_lag,
    streaming_features,
)
from simulations.analytics.training import coefficients, evaluate, replay_scores, save, train
from simulations.drivers.virtual import simulate
from simulations.scenario import load as load_scenario
from workbench.analytics.model import RiskModel, load
from workbench.analytics.scorer import RiskScorer
from workbench.domain.clock import ManualClock
from workbench.domain.events import from_fields
from workbench.ops.redis_server import RedisServer
from workbench.ops.waiting import wait_until
from workbench.store import Store, analytics_facts, inbox, risk_scores
from workbench.streams.connection import connect
from workbench.streams.consumer import ConsumerSettings, ConsumerWorker
from workbench.streams.keys import RiskNames, StreamNames

ROOT = Path(__file__).resolve().parents[2]
MARKET = [
    "run.duration_s=300",
    "market.arrival_rate=2",
    "market.sellers=120",
    "market.honest_p=0.7",  # 70% honest, 10% slow, 20% fraudulent
    "market.slow_p=0.1",
    "phones.count=0",
    "consumers.only=ledger",  # the analytics need the streams, not the other groups
    "relay.retention_s=86400",  # keep the streams for the scorer that runs afterwards
]
_GROUPS = itertools.count(1)


class Run:
    def __init__(self, tables: RunTables, prefix: str) -> None:
        self.tables = tables
        self.names = StreamNames(prefix)
        self.epoch = float(tables.manifest["params"]["run"]["epoch"])
        self.end = self.epoch + float(tables.manifest["virtual_seconds"])
        self.events = len(facts_from_published(tables.published))


@pytest.fixture(scope="module")
def runs(redis_server: RedisServer) -> dict[int, Run]:
    if not redis_server.running:
        redis_server.restart()
    out = {}
    for seed in (1, 2):
        prefix = f"an{seed}-{uuid.uuid4().hex[:6]}"
        tables = simulate(
            load_scenario("baseline", MARKET), seed, redis_url=redis_server.url, prefix=prefix
        )
        out[seed] = Run(tables, prefix)
    return out


@pytest.fixture(scope="module")
def model(runs: dict[int, Run]) -> RiskModel:
    return train(runs[1].tables, clock=ManualClock(runs[1].end))


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = connect(redis_server.url)
    yield c
    c.close()


def _group() -> str:
    return f"analytics-{next(_GROUPS)}-{uuid.uuid4().hex[:4]}"


def _assert_features_equal(store: Store, group: str, run: Run) -> None:
    for role in ("seller", "buyer"):
        streamed = streaming_features(store, role, group=group, epoch=run.epoch)
        batch = batch_features(run.tables, role)
        assert len(streamed) == len(batch) > 0
        pd.testing.assert_frame_equal(streamed, batch, check_exact=False, rtol=1e-9, atol=1e-6)


def _count(store: Store, table, group: str) -> int:  # type: ignore[no-untyped-def]
    with store.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(table).where(table.c.group_name == group)
            ).scalar_one()
        )


def _assert_once_each(client: redis.Redis, risk: RiskNames, store: Store, group: str, run: Run):  # type: ignore[no-untyped-def]
    entries = read_risk_stream(client, risk)
    assert not entries["source_event_id"].duplicated().any(), "a risk.scored entry twice"
    expected = set(facts_from_published(run.tables.published)["event_id"])
    assert set(entries["source_event_id"]) == expected
    for table in (analytics_facts, risk_scores, inbox):
        assert _count(store, table, group) == run.events, table.name
    return entries


def test_streaming_features_equal_batch_features(
    runs: dict[int, Run], model: RiskModel, store: Store, client: redis.Redis
) -> None:
    """Two paths, one answer: the consumer's fold of the streams equals the tables'."""
    run = runs[1]
    group, risk = _group(), RiskNames(f"risk-{uuid.uuid4().hex[:6]}")
    scorer = RiskScorer(
        store, client, model, group=group, names=run.names, risk_names=risk,
        clock=ManualClock(run.end),  # scored "at the end of the run", on its timeline
        ids_on_clock=True,  # the run's entry ids are on that timeline too
    )  # fmt: skip
    worker = ConsumerWorker(
        client, scorer, consumer=f"{group}-1", names=run.names,
        settings=ConsumerSettings(batch_size=200), clock=ManualClock(run.end),
    )  # fmt: skip
    worker.drain()
    assert backlog(client, run.names, group) == (0, 0)
    assert scorer.scored == scorer.published == run.events
    _assert_features_equal(store, group, run)
    entries = _assert_once_each(client, risk, store, group, run)
    assert entries["model_version"].eq(model.version).all()
    assert entries["score"].between(0, 1).all()
    assert (entries["flagged"] == (entries["score"] >= model.threshold)).all()

    # The live scores give the same kind of evaluation as the offline replay.
    live = evaluate(model, run.tables, scores=online_scores(entries, run.epoch))
    assert live.summary["online"]["detected"] > 0

    lags = scorer_lag(client, run.names, risk)
    assert len(lags) == run.events
    assert (lags["lag_s"] >= 0).all() and lags["stream_lag_ms"].notna().all()
    summary = lag_summary(lags)
    assert summary["entries"] == run.events and summary["stream_lag_ms_p50"] >= 0


def test_a_publish_that_fails_after_commit_is_redone_once(
    runs: dict[int, Run], model: RiskModel, store: Store, client: redis.Redis
) -> None:
    """Commit, then Redis unreachable: the batch stays unacked; its redelivery finds
    the events in the inbox and publishes the stored scores, once."""
    run = runs[1]
    group, risk = _group(), RiskNames(f"risk-{uuid.uuid4().hex[:6]}")
    entries = client.xrange(run.names.stream("escrow"), count=300)
    events = [from_fields(fields) for _, fields in entries]
    dead = connect("redis://127.0.0.1:1", retry=None, socket_connect_timeout=0.2)
    down = RiskScorer(store, dead, model, group=group, names=run.names, risk_names=risk)
    with pytest.raises(redis.ConnectionError):
        down.handle(events)
    assert _count(store, risk_scores, group) == len(events)  # committed
    assert client.xlen(risk.stream) == 0  # but not published

    up = RiskScorer(store, client, model, group=group, names=run.names, risk_names=risk)
    up.handle(events)
    assert (up.scored, up.published, client.xlen(risk.stream)) == (0, len(events), len(events))
    up.handle(events[:50] + events[:50])  # and again, duplicated within the batch
    assert (up.published, up.duplicates, client.xlen(risk.stream)) == (
        len(events), 50, len(events),
    )  # fmt: skip
    stored = read_risk_stream(client, risk).set_index("source_event_id")["score"]
    with store.engine.connect() as conn:
        query = select(risk_scores.c.event_id, risk_scores.c.score).where(
            risk_scores.c.group_name == group
        )
        rows = {event_id: score for event_id, score in conn.execute(query)}
    assert stored.to_dict() == rows  # the stream says what the store holds


def _spawn(
    model_dir: Path, url: str, db: str, run: Run, group: str, risk: RiskNames, consumer: str,
    *args: str,
) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [
        sys.executable, "-m", "workbench", "sim-worker" if args else "worker", "analytics",
        "--model", str(model_dir),
        "--redis-url", url, "--database-url", db, "--prefix", run.names.prefix,
        "--risk-prefix", risk.prefix, "--group-name", group, "--consumer", consumer,
        "--batch-size", "50", "--block-ms", "100", "--dead-after", "1", *args,
    ]  # fmt: skip
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigkilled_scorer_neither_loses_nor_doubles(
    runs: dict[int, Run], model: RiskModel, redis_server: RedisServer, client: redis.Redis,
    tmp_path: Path,
) -> None:  # fmt: skip
    """Worker processes SIGKILLed after the effect of their first batch (effect
    committed and published, nothing acked) and mid-batch in the restarted
    consumer's first batch (half done); a second consumer claims what the dead
    one held and finishes."""
    run = runs[1]
    group, risk = _group(), RiskNames(f"risk-{uuid.uuid4().hex[:6]}")
    model_dir = save(model, tmp_path / "model")
    db = f"sqlite:///{tmp_path / 'analytics.db'}"
    Store(db).create_schema()
    spawn = lambda consumer, *a: _spawn(  # noqa: E731
        model_dir, redis_server.url, db, run, group, risk, consumer, *a
    )
    # First batches: a backlog published within a few milliseconds may be held back
    # into one batch (entries of one millisecond across full streams).
    for args in (("--crash-at", "after-effect", "--crash-batch", "1"),
                 ("--crash-at", "mid-batch", "--crash-batch", "1")):  # fmt: skip
        proc = spawn(f"{group}-a", *args)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, err.decode()
    pending, _ = backlog(client, run.names, group)
    assert pending > 0  # the dead consumer holds entries

    survivor = spawn(f"{group}-b")
    try:
        wait_until(
            lambda: backlog(client, run.names, group) == (0, 0),
            timeout=60,
            what="the analytics group to take and ack everything",
        )
        survivor.send_signal(signal.SIGTERM)
        _, err = survivor.communicate(timeout=30)
        assert survivor.returncode == 0, err.decode()
    finally:
        if survivor.poll() is None:
            survivor.kill()
    store = Store(db)
    try:
        _assert_features_equal(store, group, run)
        _assert_once_each(client, risk, store, group, run)
    finally:
        store.close()


def test_model_beats_the_base_rate_classifier_on_a_held_out_seed(
    runs: dict[int, Run], model: RiskModel
) -> None:
    """Trained on seed 1, evaluated on seed 2 at the end of the run and online."""
    result = evaluate(model, runs[2].tables)
    s = result.summary
    print(f"\nheld-out seed 2: {s['sellers']} sellers, {s['fraudulent']} fraudulent "
          f"(base rate {s['base_rate']:.3f}); threshold {s['threshold']:.3f}")  # fmt: skip
    print(f"ROC AUC {s['roc_auc']:.3f} vs base-rate 0.5: margin {s['margin_roc_auc']:+.3f}")
    print(f"average precision {s['average_precision']:.3f} vs {s['base_rate']:.3f}: "
          f"margin {s['margin_average_precision']:+.3f}")  # fmt: skip
    print(f"precision {s['precision']:.3f} vs {s['base_rate']:.3f}: "
          f"margin {s['margin_precision']:+.3f}; recall {s['recall']:.3f}")  # fmt: skip
    print("online:", json.dumps(s["online"], indent=None))
    assert s["fraudulent"] >= 10 and s["sellers"] - s["fraudulent"] >= 10
    assert s["margin_roc_auc"] >= 0.2
    assert s["margin_average_precision"] >= 0.2
    assert s["margin_precision"] > 0.1 and s["recall"] > 0.3
    detected = result.detection[result.detection["flagged"]]
    assert len(detected) >= s["fraudulent"] // 2
    assert (detected["escrows"] >= 1).all() and (detected["delay_s"] >= 0).all()
    assert (
        s["online"]["flag_rate_by_class"]["fraudulent"]
        > s["online"]["flag_rate_by_class"]["honest"]
    )


def test_model_artefacts_round_trip(runs: dict[int, Run], model: RiskModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = save(model, tmp_path / "m")
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["version"] == model.version and meta["features"] == list(model.features)
    assert meta["training"]["seed"] == 1 and meta["training"]["scenario"] == "baseline"
    assert meta["training"]["sellers_by_class"]["fraudulent"] > 0
    assert meta["created_at"] == runs[1].end  # from the injected clock
    assert {"scikit-learn", "numpy", "pandas", "joblib"} <= set(meta["versions"])
    again = load(path)
    assert (again.name, again.version, again.threshold) == (
        model.name, model.version, model.threshold,
    )  # fmt: skip
    scores = replay_scores(again, runs[2].tables)
    pd.testing.assert_series_equal(scores["score"], replay_scores(model, runs[2].tables)["score"])
    assert train(runs[1].tables).version == model.version  # same data, same model
    assert "missingindicator_mean_fulfilment_s" in coefficients(model).index
    (path / "model.joblib").write_bytes((path / "model.joblib").read_bytes() + b"x")
    with pytest.raises(ValueError, match="does not match"):
        load(path)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # Worker processes must read the URLs they are given, not the caller's.
    for name in ("REDIS_URL", "DATABASE_URL", "WORKBENCH_CLOCK_ORIGIN",
                 "WORKBENCH_CLOCK_EPOCH", "WORKBENCH_CLOCK_RATE"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
