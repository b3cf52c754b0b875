"""The cache of finished runs: its key, and ``run_scenario`` reusing what exists."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import simulations
from simulations.drivers import cache
from simulations.scenario import DEFAULTS

TINY = ["run.duration_s=20", "run.drain_s=20", "market.arrival_rate=0.5", "phones.count=4"]


def test_a_run_key_is_the_same_for_the_same_run_and_differs_for_any_change() -> None:
    key = cache.run_key("baseline", DEFAULTS, 1, "virtual", "code-a")
    reordered = dict(reversed(list(copy.deepcopy(DEFAULTS).items())))
    assert cache.run_key("baseline", reordered, 1, "virtual", "code-a") == key
    changed = copy.deepcopy(DEFAULTS)
    changed["consumers"]["mtbf_s"] = 30.0
    others = [
        cache.run_key("baseline", changed, 1, "virtual", "code-a"),
        cache.run_key("baseline", DEFAULTS, 2, "virtual", "code-a"),
        cache.run_key("baseline", DEFAULTS, 1, "realtime", "code-a"),
        cache.run_key("baseline", DEFAULTS, 1, "virtual", "code-b"),
        cache.run_key("crashy-consumers", DEFAULTS, 1, "virtual", "code-a"),
    ]
    assert len({key, *others}) == 1 + len(others)


def test_the_code_version_changes_with_any_file_of_the_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    files = [("pkg/a.py", tmp_path / "a.py"), ("pkg/b.py", tmp_path / "b.py")]
    before = cache.code_hash(files)
    assert cache.code_hash(list(reversed(files))) == before
    (tmp_path / "b.py").write_text("y = 3\n")
    assert cache.code_hash(files) != before
    assert cache.code_hash(files[:1]) != cache.code_hash(files)  # a file removed
    # The real code: both packages, every module, hashed once per process.
    names = {name for name, _ in cache.code_files()}
    assert {"workbench/paths.py", "simulations/drivers/cache.py"} <= names
    assert cache.code_version() == cache.code_version()


def test_a_key_file_is_a_hit_only_beside_the_manifest_its_run_wrote(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        cache.remember(tmp_path, "k1", row={"seed": 1})  # not a finished run
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"seed": 1}')
    cache.remember(tmp_path, "k1", row={"seed": 1})
    assert cache.hit(tmp_path, "k1") and not cache.hit(tmp_path, "k2")
    assert cache.read(tmp_path)["row"] == {"seed": 1}  # type: ignore[index]
    manifest.unlink()
    assert not cache.hit(tmp_path, "k1")  # the manifest is gone: a run being rewritten
    manifest.write_text('{"seed": 2}')
    assert not cache.hit(tmp_path, "k1")  # another run's manifest beside the old key
    manifest.write_text('{"seed": 1}')
    assert cache.hit(tmp_path, "k1")
    cache.forget(tmp_path)
    assert not cache.hit(tmp_path, "k1") and cache.read(tmp_path) is None
    for junk in ("[1, 2]", '"k1"', "{not json"):  # a key file that is not ours: a miss
        (tmp_path / cache.KEY_FILE).write_text(junk)
        assert cache.read(tmp_path) is None and not cache.hit(tmp_path, "k1")


def test_a_run_simulated_over_a_cached_one_is_not_taken_for_it(tmp_path, simulations_made) -> None:  # type: ignore[no-untyped-def]
    """``workbench simulate --out DIR`` knows nothing of keys: the run it writes over a
    cached run's directory must not be returned as the cached run."""
    from simulations.drivers.virtual import simulate_to
    from simulations.scenario import load

    out = tmp_path / "run"
    simulations.run_scenario("baseline", 1, TINY, out=out)
    simulate_to(load("baseline", [*TINY, "market.arrival_rate=2"]), 1, out)  # as the CLI does
    assert len(simulations_made) == 2
    asked = simulations.run_scenario("baseline", 1, TINY, out=out)
    assert len(simulations_made) == 3  # simulated again, not the rate-2 run
    assert asked.manifest["params"]["market"]["arrival_rate"] == 0.5


@pytest.fixture
def simulations_made(monkeypatch):  # type: ignore[no-untyped-def]
    """The directories the real simulator wrote, in order (it still runs)."""
    from simulations.drivers import virtual

    made: list[Path] = []
    real = virtual.simulate_to

    def counting(scenario, seed, out, **kwargs):  # type: ignore[no-untyped-def]
        made.append(Path(out))
        return real(scenario, seed, out, **kwargs)

    monkeypatch.setattr(virtual, "simulate_to", counting)
    return made


def test_run_scenario_reuses_a_finished_run_and_simulates_what_differs(
    tmp_path, monkeypatch, simulations_made
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    first = simulations.run_scenario("baseline", 1, TINY, out=out)
    manifest = out / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert simulations_made == [out] and first.ok
    assert json.loads((out / cache.KEY_FILE).read_text())["seed"] == 1

    again = simulations.run_scenario("baseline", 1, TINY, out=out)
    assert simulations_made == [out]  # a hit: not simulated again
    assert manifest.stat().st_mtime_ns == stamp
    assert again.published.equals(first.published)

    simulations.run_scenario("baseline", 2, TINY, out=out)  # another seed: a miss
    assert len(simulations_made) == 2 and simulations.load_run(out).manifest["seed"] == 2
    simulations.run_scenario("baseline", 2, [*TINY, "phones.count=3"], out=out)  # a param
    assert len(simulations_made) == 3
    simulations.run_scenario("baseline", 2, [*TINY, "phones.count=3"], out=out)
    assert len(simulations_made) == 3

    monkeypatch.setattr(cache, "code_version", lambda: "edited-code")  # the code changed
    simulations.run_scenario("baseline", 2, [*TINY, "phones.count=3"], out=out)
    assert len(simulations_made) == 4
    simulations.run_scenario("baseline", 2, [*TINY, "phones.count=3"], out=out, force=True)
    assert len(simulations_made) == 5
    assert json.loads((out / cache.KEY_FILE).read_text())["code"] == "edited-code"


def test_an_interrupted_run_is_never_a_hit(tmp_path, monkeypatch, simulations_made) -> None:  # type: ignore[no-untyped-def]
    """The key is forgotten before a run starts and written only once it finished:
    a run that dies halfway leaves a directory that is simulated again."""
    from simulations.drivers import virtual

    out = tmp_path / "run"
    simulations.run_scenario("baseline", 1, TINY, out=out)
    counting = virtual.simulate_to

    def dies_halfway(scenario, seed, out, **kwargs):  # type: ignore[no-untyped-def]
        (Path(out) / "published.parquet").write_bytes(b"half a table")
        raise KeyboardInterrupt

    monkeypatch.setattr(virtual, "simulate_to", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        simulations.run_scenario("baseline", 1, TINY, out=out, force=True)
    assert not (out / cache.KEY_FILE).exists()
    monkeypatch.setattr(virtual, "simulate_to", counting)
    assert simulations.run_scenario("baseline", 1, TINY, out=out).ok  # simulated again
    assert simulations_made == [out, out]


def test_a_run_on_an_external_redis_is_not_a_private_servers_run(
    tmp_path, redis_url, simulations_made
) -> None:  # type: ignore[no-untyped-def]
    """Redis kills need a server of the run's own: on an external one there are none,
    so neither run may be returned for the other."""
    out, kills = tmp_path / "run", [*TINY, "redis.restart_every_s=10"]
    private = simulations.run_scenario("baseline", 1, kills, out=out)
    assert "redis_kill" in set(private.faults["kind"])
    external = simulations.run_scenario("baseline", 1, kills, out=out, redis_url=redis_url)
    assert len(simulations_made) == 2 and external.manifest["redis"] == "external"
    assert "redis_kill" not in set(external.faults["kind"])
    simulations.run_scenario("baseline", 1, kills, out=out, redis_url=redis_url)
    assert len(simulations_made) == 2  # the external run, made again: a hit
    again = simulations.run_scenario("baseline", 1, kills, out=out)
    assert len(simulations_made) == 3 and "redis_kill" in set(again.faults["kind"])


def test_workbench_simulate_writes_its_run_where_run_scenario_looks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Both default to the data directory's runs/, from whatever working directory."""
    import os
    import subprocess
    import sys

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    settings = [arg for item in TINY for arg in ("--set", item)]
    env = {**os.environ, "WORKBENCH_DATA": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-m", "workbench", "simulate", "baseline", *settings],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "runs" / "baseline-1" / "manifest.json").is_file()
    assert not (elsewhere / "data").exists()


def test_tables_saved_over_a_cached_run_are_not_taken_for_it(tmp_path, simulations_made) -> None:  # type: ignore[no-untyped-def]
    """The same manifest, other tables (an analyst's filtered copy saved in place)."""
    out = tmp_path / "run"
    run = simulations.run_scenario("baseline", 1, TINY, out=out)
    events = len(run.published)
    run.published = run.published.head(3)
    run.save(out)
    again = simulations.run_scenario("baseline", 1, TINY, out=out)
    assert len(simulations_made) == 2 and len(again.published) == events
