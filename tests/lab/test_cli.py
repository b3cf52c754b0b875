"""The lab's commands behave: bad settings are exit-2 messages before anything starts,
faults that cannot fire are warned about, Ctrl-C and SIGTERM stop a run cleanly, run
directories are never overwritten silently, and ``workbench scenarios`` lists and shows.

Every command runs as a real ``workbench`` process, with its temporary directories
(``TMPDIR``) and its data directory (``WORKBENCH_DATA``) under the test's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import simulations
from simulations.analysis.tables import UNFINISHED, RunTables, UnfinishedRun
from simulations.drivers.interruption import Interrupted, checkpoint, held, interruptible
from simulations.scenario import DEFAULTS, available, description, load
from tests.support import ROOT
from workbench.ops.waiting import wait_until

TINY = ["--set", "run.duration_s=20", "--set", "run.drain_s=20", "--set", "phones.count=2",
        "--set", "market.arrival_rate=0.5"]  # fmt: skip


def _env(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return dict(
        os.environ, TMPDIR=str(tmp_path / "tmp"), WORKBENCH_DATA=str(tmp_path / "data"),
        PYTHONFAULTHANDLER="1",  # a crash prints its traceback (to stderr, shown on failure)
    )  # fmt: skip


def _workbench(
    tmp_path: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args], cwd=ROOT, env=_env(tmp_path),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- 1. every invalid setting: exit 2, key, value and what is allowed, nothing started


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("consumers.only=nosuchgroup", "consumers.only must list only ledger, notifications"),
        ("consumers.batch_size=0", "consumers.batch_size must be greater than 0, not 0"),
        ("run.sample_every_s=0", "run.sample_every_s must be greater than 0, not 0"),
        ("mpesa.failure_p=1.5", "mpesa.failure_p is a probability: it must be between 0 and 1,"
                                " not 1.5"),
        ("market.honest_p=2", "market.honest_p is a probability: it must be between 0 and 1,"
                              " not 2"),
        ("run.duration_s=0", "run.duration_s must be greater than 0, not 0: a run without load"
                             " time has nothing to check"),
        ("market.arrival_rate=0", "market.arrival_rate must be greater than 0, not 0: a run"
                                  " without arrivals has nothing to check"),
    ],
)  # fmt: skip
def test_an_invalid_setting_is_exit_2_before_anything_starts(
    tmp_path: Path, setting: str, message: str
) -> None:
    out = tmp_path / "run"
    result = _workbench(tmp_path, "simulate", "baseline", "--set", setting, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert f"Error: --set: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and not list((tmp_path / "tmp").iterdir())  # nothing started


def test_an_unreachable_redis_url_is_exit_2_before_anything_starts(tmp_path: Path) -> None:
    out = tmp_path / "run"
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    result = _workbench(tmp_path, "simulate", "baseline", "--redis-url", url, "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert f"cannot reach Redis at --redis-url / REDIS_URL {url}: " in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# -- 2. faults that cannot fire within the run: a warning before it


def test_faults_that_cannot_fire_are_warned_about_before_the_run(tmp_path: Path) -> None:
    result = _workbench(
        tmp_path, "simulate", "redis-restart", *TINY, "--set", "run.duration_s=60", "--no-check"
    )
    assert result.returncode == 0, result.stderr
    warning = (
        "warning: redis.restart_every_s (120 s) is not shorter than run.duration_s (60 s):"
        " Redis is never restarted"
    )
    assert warning in result.stderr
    assert result.stderr.index(warning) < result.stderr.index(" events, ")  # before the run
    assert "0 faults" in result.stderr
    quiet = _workbench(tmp_path, "simulate", "baseline", *TINY, "--no-check")
    assert quiet.returncode == 0 and "warning" not in quiet.stderr


# -- 3. Ctrl-C and SIGTERM: children stopped, temporary directories gone, run unfinished


def _children(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` now: pid -> command line."""
    found: dict[int, str] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue  # the task exited meanwhile
        for kid in kids:
            try:
                found[kid] = (Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ")
                              .decode())  # fmt: skip
            except OSError:
                continue
            found.update(_children(kid))
    return found


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _wait_or_dump(process: subprocess.Popen[str], timeout: float) -> str:
    """Wait for ``process``, reading its stderr meanwhile (a full pipe would block its
    writes); return that. If it still runs after ``timeout``, fail with where every
    thread of it is (SIGABRT: its faulthandler prints them) and what it wrote."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER=1: tracebacks to stderr
        stderr = process.communicate(timeout=30)[1]
        pytest.fail(f"still running {timeout:g} s after the signal; its stderr:\n{stderr}")


@pytest.mark.parametrize(
    ("mode", "signum", "code"),
    [
        ("virtual", signal.SIGINT, 130),
        ("virtual", signal.SIGTERM, 143),
        ("realtime", signal.SIGINT, 130),
        ("realtime", signal.SIGTERM, 143),
    ],
)
def test_a_signal_stops_the_run_cleanly(tmp_path: Path, mode: str, signum: int, code: int) -> None:
    out = tmp_path / "run"
    realtime = mode == "realtime"
    args = ["--set", "run.duration_s=3600", "--set", "phones.count=3", "--no-check",
            "--out", str(out), *(["--realtime"] if realtime else [])]  # fmt: skip
    simulator = subprocess.Popen(
        [sys.executable, "-m", "workbench", "simulate", "baseline", *args],
        cwd=ROOT, env=_env(tmp_path), start_new_session=True,  # its own terminal, as it were
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:

        def started() -> dict[int, str]:
            kids = _children(simulator.pid)
            commands = " ".join(kids.values())
            needed = ["redis-server 127.0.0.1:"]  # the server (not its --version probe)
            needed += ["sim-worker", "serve --api-only"] if realtime else []
            return kids if all(n in commands for n in needed) else {}

        kids = wait_until(started, timeout=120, interval=0.05, what="the run's processes")
        assert (out / UNFINISHED).exists()  # claimed from the start
        stopping = time.monotonic()
        os.killpg(simulator.pid, signum)  # as the terminal's Ctrl-C does: the whole group
        stderr = _wait_or_dump(simulator, timeout=20)
        stopped_in = time.monotonic() - stopping
    finally:
        if simulator.poll() is None:
            os.killpg(simulator.pid, signal.SIGKILL)
            simulator.wait()
    assert simulator.returncode == code, stderr
    assert stopped_in < 10
    name = signal.Signals(signum).name
    assert f"interrupted by {name}: stopped the run" in stderr
    wait_until(lambda: all(_gone(pid) for pid in kids), timeout=5, what="no child left")
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("workbench")]
    assert (out / UNFINISHED).read_text().startswith(f"stopped by {name} at ")
    check = _workbench(tmp_path, "check", str(out))
    assert check.returncode == 2 and "holds an unfinished run (stopped by" in check.stderr
    with pytest.raises(UnfinishedRun, match="unfinished run"):
        simulations.load_run(out)


def test_an_interrupt_that_python_had_to_drop_is_raised_again() -> None:
    class DropsIt:  # like an after-fork callback: Python cannot raise from it
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the handler runs in here: "ignored"

    before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job
    started = time.monotonic()
    with pytest.raises(Interrupted) as info, interruptible():
        DropsIt()
        time.sleep(10)  # the alarm raises it again in here
    assert info.value.exit_code == 130 and time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGINT) is before  # restored


def _swallowed(signum: int) -> None:
    """A signal whose exception vanishes without a word, as in C code that clears
    errors instead of reporting them (``sys.unraisablehook`` never sees it)."""
    with contextlib.suppress(Interrupted):
        signal.raise_signal(signum)


def test_a_stop_whose_exception_vanished_is_raised_at_the_next_checkpoint() -> None:
    went_on = []
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible():
        _swallowed(signal.SIGTERM)
        went_on.append("to the checkpoint")
        checkpoint()
        went_on.append("past it")  # never reached
    assert went_on == ["to the checkpoint"]
    with pytest.raises(Interrupted, match="SIGINT"), interruptible():
        _swallowed(signal.SIGINT)  # and no checkpoint after it: the block's end raises it
    with interruptible(), held():
        checkpoint()  # no stop: nothing
    with pytest.raises(Interrupted, match="SIGINT"), interruptible(), held():
        signal.raise_signal(signal.SIGINT)
        checkpoint()  # inside held(): its end raises it, not the checkpoint
        went_on.append("to the end of held()")
    assert went_on[-1] == "to the end of held()"


def test_a_stop_replaced_by_a_librarys_own_error_is_still_the_stop() -> None:
    def commit() -> None:  # as SQLAlchemy's Transaction.commit
        active = True
        try:
            signal.raise_signal(signal.SIGTERM)  # the stop lands in here
            active = False
        finally:
            assert not active  # its own check puts an AssertionError in the stop's place

    with pytest.raises(Interrupted, match="SIGTERM") as info, interruptible():
        commit()
    assert isinstance(info.value.__cause__, AssertionError)
    with pytest.raises(RuntimeError), interruptible():
        raise RuntimeError("no stop: the error itself")


def test_the_simulators_progress_reports_raise_a_stop_whose_exception_vanished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from simulations.cli import _simulate_until_done_or_stopped
    from simulations.drivers import virtual

    reports = []

    def run(scenario, seed, directory, *, redis_url, progress):  # type: ignore[no-untyped-def]
        _swallowed(signal.SIGTERM)
        for t in range(1, 4):
            progress(float(t), 3.0)
            reports.append(t)
        return {"finished": True}

    monkeypatch.setattr(virtual, "simulate_to", lambda *a, cpu, **kw: run(*a, **kw))
    with pytest.raises(SystemExit) as exit_:
        _simulate_until_done_or_stopped(
            load("baseline"), 1, tmp_path / "run", redis_url=None, realtime=False, factor=None,
            cpu="auto",
        )  # fmt: skip
    assert exit_.value.code == 143 and not reports  # stopped at the first report
    assert (tmp_path / "run" / UNFINISHED).read_text().startswith("stopped by SIGTERM at 0 ")


def test_a_signal_while_a_child_starts_is_raised_once_it_has_started() -> None:
    done = []
    with pytest.raises(Interrupted, match="SIGTERM"), interruptible():
        with held():
            signal.raise_signal(signal.SIGTERM)
            done.append("started")  # not cut in two
        done.append("after")  # never reached
    assert done == ["started"]
    # Also when the section fails meanwhile (a child that saw the signal too): the stop wins.
    with pytest.raises(Interrupted), interruptible(), held():
        signal.raise_signal(signal.SIGINT)
        raise RuntimeError("the child could not start")


# -- 4. run directories: named by mode, never overwritten silently


def test_a_run_directory_is_not_overwritten_without_force(tmp_path: Path) -> None:
    runs = tmp_path / "data" / "runs"
    first = _workbench(tmp_path, "simulate", "baseline", *TINY, "--no-check")
    assert first.returncode == 0, first.stderr
    manifest = (runs / "baseline-1" / "manifest.json").read_text()
    written = (runs / "baseline-1" / "manifest.json").stat().st_mtime_ns
    again = _workbench(tmp_path, "simulate", "baseline", *TINY, "--no-check")
    assert again.returncode == 2
    assert f"{runs / 'baseline-1'} exists and holds a run; --force to overwrite" in again.stderr
    assert (runs / "baseline-1" / "manifest.json").read_text() == manifest  # untouched
    forced = _workbench(tmp_path, "simulate", "baseline", *TINY, "--no-check", "--force")
    assert forced.returncode == 0, forced.stderr
    assert (runs / "baseline-1" / "manifest.json").stat().st_mtime_ns > written  # rewritten
    assert RunTables.load(runs / "baseline-1").manifest["seed"] == 1
    # Real time has a directory of its own, and the same refusal (before anything starts).
    (runs / "baseline-1-realtime").mkdir()
    (runs / "baseline-1-realtime" / "manifest.json").write_text("{}")
    realtime = _workbench(tmp_path, "simulate", "baseline", "--realtime", *TINY)
    assert realtime.returncode == 2
    assert f"{runs / 'baseline-1-realtime'} exists and holds a run" in realtime.stderr


def test_the_demo_writes_under_the_data_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations.drivers.demo import DemoConfig

    monkeypatch.setenv("WORKBENCH_DATA", "/somewhere/else")
    assert DemoConfig().out == Path("/somewhere/else/demo")


# -- 5. workbench scenarios: the list, and every key of one


def test_scenarios_lists_each_with_its_description(tmp_path: Path) -> None:
    result = _workbench(tmp_path, "scenarios")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in available():
        assert any(name in line and description(name) in line for line in lines), name
    assert description("redis-restart").startswith("Redis is killed with SIGKILL")


def test_scenarios_show_prints_every_key_its_value_default_and_meaning(tmp_path: Path) -> None:
    result = _workbench(tmp_path, "scenarios", "show", "redis-restart")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
            if line.count("│") == 5 and line.split("│")[1].strip()}  # fmt: skip
    assert set(rows) == {f"{s}.{k}" for s, keys in DEFAULTS.items() for k in keys}
    cells = [c.strip() for c in rows["redis.restart_every_s"].split("│")[2:4]]
    assert cells == ["120.0", "0.0"]  # differs: the default shown beside it
    assert [c.strip() for c in rows["run.duration_s"].split("│")[2:4]] == ["600.0", "(same)"]
    assert "serve's backoff" in result.stdout  # meanings, wrapped or not
    unknown = _workbench(tmp_path, "scenarios", "show", "nosuch")
    assert unknown.returncode == 2
    assert "no scenario 'nosuch'; available: baseline, cluster-failover" in unknown.stderr
