"""The lab's commands, offered by ``workbench`` when the lab is installed.

``workbench.cli`` finds these through the ``workbench.commands`` entry points
and imports this module only when one of them is called: ``simulate``,
``check``, ``sweep``, ``run`` (the demo), ``scenarios`` (list, ``show``), and
the fault-injecting ``sim-worker`` and ``sim-relay`` that real-time runs and
the demo start in place of ``worker`` and ``relay``.

Bad input is exit 2 with a message naming what is wrong (``click.UsageError``),
checked before anything starts; ``simulate`` never writes over a run directory
that holds something without ``--force``, and Ctrl-C or SIGTERM stops it
cleanly (:mod:`simulations.drivers.interruption`, exit 130 or 143).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

# The lab extra, checked on import: without it `workbench` tells how to install it.
import numpy  # noqa: F401
import pandas  # noqa: F401
import simpy  # noqa: F401

from simulations.analysis.handling import HandlingLog
from simulations.faults import (
    CRASH_POINTS,
    RELAY_CRASH_POINTS,
    AckFirstWorker,
    CrashingRelay,
    CrashingWorker,
    sigkill_at,
    sigkill_when_signalled,
)
from workbench import paths
from workbench.cli import FiniteFloat, redis_option, setup_logging
from workbench.cli import relay as relay_command
from workbench.cli import worker as worker_command

if TYPE_CHECKING:
    from simulations.scenario import Scenario


@click.command()
@click.option(
    "--escrows", default=300, show_default=True, type=click.IntRange(1, 1_000_000),
    help="how many escrows to run",
)  # fmt: skip
@click.option("--seed", default=42, show_default=True, help="seed of the demo's randomness")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="where results are written [default: DATA/demo; DATA: WORKBENCH_DATA or the"
    " project's data/]",
)
@click.option(
    "--crash/--no-crash",
    default=True,
    show_default=True,
    help="SIGKILL the ledger worker mid-batch and recover",
)
@click.option(
    "--timeout", default=120.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
    help="seconds to wait for the groups to drain",
)  # fmt: skip
def run(escrows: int, seed: int, out: Path | None, crash: bool, timeout: float) -> None:
    """Run the end-to-end escrow demo against an embedded Redis."""
    from simulations.drivers.demo import DemoConfig, run_demo

    setup_logging(False)
    out = out or paths.data_dir() / "demo"
    summary = run_demo(
        DemoConfig(escrows=escrows, seed=seed, out=out, crash=crash, timeout=timeout)
    )
    if not summary["ok"]:
        raise SystemExit(1)


@click.command()
@click.argument("scenario")
@click.option("--seed", default=1, show_default=True, help="seed of every random choice")
@click.option(
    "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
    help="override a scenario parameter (repeatable), e.g. market.arrival_rate=5",
)  # fmt: skip
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path),
    help="run directory [default: DATA/runs/SCENARIO-SEED, with -realtime for --realtime]",
)  # fmt: skip
@click.option("--force", is_flag=True, help="overwrite the run directory if it holds a run")
@redis_option
@click.option("--no-check", is_flag=True, help="write the tables, skip the checker")
@click.option(
    "--realtime", is_flag=True,
    help="wall-clock time against the served runtime: real processes, HTTP, SSE",
)  # fmt: skip
@click.option(
    "--factor", type=FiniteFloat(min=0, min_open=True),
    help="--realtime: wall seconds per virtual second [default realtime.factor]",
)  # fmt: skip
@click.option(
    "--cpu", default="auto", show_default=True, metavar="auto|none|N",
    help="virtual time: run the simulator and its private redis-server on one CPU "
    "(they take turns; one CPU spares a cross-CPU wake-up per round trip)",
)  # fmt: skip
def simulate(
    scenario: str,
    seed: int,
    overrides: tuple[str, ...],
    out: Path | None,
    force: bool,
    redis_url: str | None,
    no_check: bool,
    realtime: bool,
    factor: float | None,
    cpu: str,
) -> None:
    """Run SCENARIO (a name in simulations/scenarios or a .toml path).

    Virtual time (the default): the real runtime's code runs at SimPy's
    instants against a private redis-server (or REDIS_URL) and a SQLite store.
    --realtime: the same models drive the served runtime in wall time (API/SSE
    servers, relay, workers as processes; SIGKILL as the crash). The run's
    tables go to the run directory, then the checker reports on them.

    Exits 0 when the checker finds the run ok, 1 when anything is lost,
    unexpected or an invariant fails, 2 for a bad setting (checked before
    anything starts) or a run directory that holds a run (without --force);
    Ctrl-C or SIGTERM stops the run and its processes, leaves the run
    directory marked unfinished and exits 130 or 143.
    """
    from simulations.scenario import warnings

    loaded = _checked_scenario(scenario, overrides, redis_url, realtime, factor, cpu)
    directory = out or paths.runs_dir() / f"{loaded.name}-{seed}{'-realtime' * realtime}"
    _refuse_to_overwrite(directory, force)
    for warning in warnings(loaded):
        click.echo(f"warning: {warning}", err=True)
    manifest = _simulate_until_done_or_stopped(
        loaded, seed, directory, redis_url=redis_url, realtime=realtime, factor=factor, cpu=cpu
    )
    rows = manifest["rows"]
    click.echo(
        f"{rows['published']} events, {rows['commands']} commands, "
        f"{rows['faults']} faults in {manifest['wall_seconds']:.1f} s; tables in {directory}/",
        err=True,
    )
    if not no_check:
        _check_and_exit(directory)


def _checked_scenario(
    name: str,
    overrides: tuple[str, ...],
    redis_url: str | None,
    realtime: bool,
    factor: float | None,
    cpu: str,
) -> Scenario:
    """The scenario with its overrides, and the options with it, checked: a
    ``click.UsageError`` (exit 2) naming what is wrong before anything starts."""
    from simulations.scenario import ScenarioError, load
    from workbench.ops import affinity

    if factor is not None and not realtime:
        raise click.UsageError("--factor only applies with --realtime")
    if cpu != "auto" and realtime:
        raise click.UsageError("--cpu only applies in virtual time (without --realtime)")
    try:
        loaded = load(name, overrides)
        affinity.resolve(cpu)
    except (ScenarioError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if loaded.redis.cluster_masters and (realtime or redis_url):
        raise click.UsageError(
            "redis.cluster_masters runs in virtual time on a cluster the run starts itself:"
            " not with --realtime, nor with --redis-url / REDIS_URL"
        )
    if loaded.analytics.model:
        _check_model(loaded.analytics.model)
    if redis_url:
        _check_reachable(redis_url)
    return loaded


def _check_model(directory: str) -> None:
    """A ``click.UsageError`` unless ``directory`` holds a saved risk model."""
    from workbench.analytics.model import METADATA_FILE

    if not (Path(directory) / METADATA_FILE).is_file():
        raise click.UsageError(
            f"analytics.model: {directory} is not a model directory (no {METADATA_FILE};"
            " a model saved by simulations.analytics.save)"
        )


def _check_reachable(url: str) -> None:
    """A ``click.UsageError`` unless the Redis at ``url`` answers PING."""
    import redis
    from redis.exceptions import RedisClusterException

    from workbench.streams.connection import connect

    try:
        client = connect(url)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, RedisClusterException, ValueError) as exc:
        raise click.UsageError(
            f"cannot reach Redis at --redis-url / REDIS_URL {url}: {exc}"
        ) from None


def _refuse_to_overwrite(directory: Path, force: bool) -> None:
    """A ``click.UsageError`` if ``directory`` is a file, or holds anything (a run,
    finished or not, or other files) and ``force`` is not given."""
    from simulations.analysis.tables import UNFINISHED

    if directory.exists() and not directory.is_dir():
        raise click.UsageError(f"{directory} is a file, not a run directory")
    if force or not directory.is_dir() or not any(directory.iterdir()):
        return
    run_files = ("manifest.json", UNFINISHED, "commands.parquet")
    what = "a run" if any((directory / f).exists() for f in run_files) else "other files"
    raise click.UsageError(f"{directory} exists and holds {what}; --force to overwrite")


def _simulate_until_done_or_stopped(
    scenario: Scenario,
    seed: int,
    directory: Path,
    *,
    redis_url: str | None,
    realtime: bool,
    factor: float | None,
    cpu: str,
) -> dict[str, Any]:
    """Run the simulation into ``directory`` with a progress bar; return its manifest.

    SIGINT or SIGTERM stops it (:mod:`simulations.drivers.interruption`): its
    processes stopped, its temporary directories removed, ``directory`` marked
    unfinished, then exit 130 or 143 with a line saying so.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from simulations.analysis.tables import mark_unfinished
    from simulations.drivers.interruption import Interrupted, checkpoint, interruptible

    if realtime:
        from simulations.drivers.realtime import simulate_realtime_to

        run: Any = functools.partial(simulate_realtime_to, factor=factor)
    else:
        from simulations.drivers.virtual import simulate_to

        run = functools.partial(simulate_to, cpu=cpu)
    mark_unfinished(directory)  # claimed: an earlier run's manifest is gone from here on
    unit = "virtual s" + (" (real time)" if realtime else "")
    reached = [0.0]  # virtual seconds, for the message if the run is stopped
    try:
        with (
            interruptible(),
            Progress(
                TextColumn(f"[bold]{scenario.name}[/] seed {seed}"), BarColumn(),
                TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit),
                TimeElapsedColumn(), transient=False,
            ) as bar,
        ):  # fmt: skip
            task = bar.add_task("simulate", total=1.0)

            def progress(t: float, total: float) -> None:
                checkpoint()  # a stop whose exception was lost on its way is raised here
                reached[0] = t
                bar.update(task, completed=t, total=total)

            manifest: dict[str, Any] = run(
                scenario, seed, directory, redis_url=redis_url, progress=progress
            )
            return manifest
    except Exception as exc:  # the traceback follows; the directory says what happened
        what = ": ".join([type(exc).__name__, *str(exc).splitlines()[:1]])
        mark_unfinished(directory, f"failed at {reached[0]:g} virtual s: {what}")
        raise
    except Interrupted as stop:
        mark_unfinished(directory, f"stopped by {stop.name} at {reached[0]:g} virtual s")
        click.echo(
            f"{stop}: stopped the run and its processes; {directory} is marked unfinished",
            err=True,
        )
        sys.exit(stop.exit_code)


@click.command()
@click.argument("scenario")
@click.option(
    "--grid", "grid_items", multiple=True, metavar="SECTION.KEY=V1,V2,...",
    help="values to sweep (repeatable; the grid is their product)",
)  # fmt: skip
@click.option("--seeds", default=3, show_default=True, help="seeds 1..N per grid point")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="fixed overrides for every run")  # fmt: skip
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help="local Dask workers, one run each at a time [default: CPUs]",
)
@click.option(
    "--scheduler", metavar="ADDRESS",
    help="run on this Dask scheduler (tcp://host:8786) instead of a local cluster",
)  # fmt: skip
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path),
    help="sweep directory [default: sweeps/SCENARIO in the data directory, WORKBENCH_DATA]",
)  # fmt: skip
@click.option("--force", is_flag=True, help="simulate every run again, even those already made")
def sweep(
    scenario: str,
    grid_items: tuple[str, ...],
    seeds: int,
    overrides: tuple[str, ...],
    workers: int | None,
    scheduler: str | None,
    out: Path | None,
    force: bool,
) -> None:
    """Run SCENARIO over a grid of values and seeds in parallel; one table out.

    Every run has its own private redis-server and a directory named by its
    values (``KEY=VALUE,.../seed-N``); runs already there (same parameters, seed
    and code) are reused unless --force. Writes results.parquet (a row per run)
    and summary.parquet (per grid point: each measure's mean and 95% interval
    over the seeds), prints the summary; exits 1 if any run failed the checker.
    """
    from rich import progress as rp

    from simulations.analysis.report import frame_table, wide_console
    from simulations.drivers.sweep import parse_grid
    from simulations.drivers.sweep import sweep as run_sweep
    from simulations.scenario import ScenarioError

    if scheduler and workers:
        raise click.UsageError("--workers is for the local cluster; --scheduler brings its own")
    columns = (
        rp.TextColumn("[bold]sweep[/]"), rp.BarColumn(), rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(), rp.TextColumn("eta"), rp.TimeRemainingColumn(),
    )  # fmt: skip
    with rp.Progress(*columns) as bar:
        task = bar.add_task("runs", total=None)
        try:
            result = run_sweep(
                scenario, parse_grid(grid_items), seeds, out=out, workers=workers,
                scheduler=scheduler, base_overrides=overrides, force=force,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )  # fmt: skip
        except ScenarioError as exc:
            raise click.UsageError(str(exc)) from None
    runs = result.runs
    title = f"{scenario}: mean [95% interval] over seeds, per grid point"
    wide_console().print(frame_table(result.table(), title))
    click.echo(
        f"{len(runs)} runs ({int(runs['cached'].sum())} already made, not simulated again); "
        f"per run: {result.directory / 'results.parquet'}, "
        f"summary: {result.directory / 'summary.parquet'}",
        err=True,
    )
    if not result.ok:
        failed = runs.loc[~runs["ok"], "run"]
        click.echo(f"failed the checker: {', '.join(failed)}", err=True)
        raise SystemExit(1)


def _check_and_exit(directory: Path) -> None:
    from simulations.analysis.checker import check_dir, print_report

    report = check_dir(directory)
    print_report(report)
    if not report.ok:
        raise SystemExit(1)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of tables")
def check(run_dir: Path, as_json: bool) -> None:
    """Check a simulation run in RUN_DIR: delivery per group and phone, money invariants.

    Exits 0 when the run is ok, 1 when something is lost, duplicated, unexpected,
    reordered or an invariant fails, and 2 when RUN_DIR cannot be checked.
    """
    from simulations.analysis.checker import check as check_run
    from simulations.analysis.checker import print_report
    from simulations.analysis.tables import RunTables

    def cannot(message: str) -> click.ClickException:
        error = click.ClickException(message)
        error.exit_code = 2
        return error

    try:
        run = RunTables.load(run_dir)
    except FileNotFoundError as exc:  # "... is not a run directory", "... lacks x.parquet"
        raise cannot(str(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable manifest or Parquet file
        raise cannot(f"cannot read the run in {run_dir}: {exc}") from None
    try:
        report = check_run(run)
    except ValueError as exc:  # unknown group, malformed entry id
        raise cannot(f"cannot check the run in {run_dir}: {exc}") from None
    except KeyError as exc:  # a table of another shape (another table's file, say)
        raise cannot(f"cannot check the run in {run_dir}: a table lacks {exc}") from None
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)
    if not report.ok:
        raise SystemExit(1)


@click.group(invoke_without_command=True)
@click.pass_context
def scenarios(ctx: click.Context) -> None:
    """List the scenarios: each name and what it is for.

    `workbench scenarios show NAME`: every key of one, its value, its default and
    what it means.
    """
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from simulations.scenario import available, description
    from workbench.ops.inspection import wide_console

    table = Table("scenario", "what it is", title="scenarios", title_justify="left")
    for name in available():
        table.add_row(name, description(name))
    wide_console().print(table)


@scenarios.command()
@click.argument("name")
def show(name: str) -> None:
    """Every key of scenario NAME (or a .toml path): section.key, its value, the default
    when it differs, and its meaning."""
    from rich.markup import escape
    from rich.table import Table

    from simulations.scenario import ScenarioError, description, load, settings
    from workbench.ops.inspection import wide_console

    try:
        loaded = load(name)
    except ScenarioError as exc:
        raise click.UsageError(str(exc)) from None
    table = Table(
        "key", "value", "default", "meaning",
        title=f"{loaded.name}: {description(name)}", title_justify="left",
    )  # fmt: skip
    for setting in settings(loaded):
        value = escape(_as_toml(setting.value))
        table.add_row(
            setting.key,
            f"[bold]{value}[/]" if setting.differs else value,
            escape(_as_toml(setting.default)) if setting.differs else "(same)",
            setting.meaning,
        )
    wide_console().print(table)


def _as_toml(value: Any) -> str:
    """A value as a scenario file (or ``--set``) writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_as_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else repr(value)


# -- fault-injecting runtime processes -----------------------------------------------


def _crash_options(points: tuple[str, ...]) -> Callable[[Any], Any]:
    """``--crash-at POINT --crash-batch K``: SIGKILL at a crash point of batch K."""

    def add(command: Any) -> Any:
        command = click.option(
            "--crash-batch", default=1, show_default=True, type=click.IntRange(min=1),
            help="...of this batch number (or the first later one that has the point)",
        )(command)  # fmt: skip
        return click.option(
            "--crash-at", type=click.Choice(points),
            help="fault injection: SIGKILL this process at this point",
        )(command)  # fmt: skip

    return add


@click.command(
    name="sim-worker", params=list(worker_command.params), hidden=True,
    help="`workbench worker` with the lab's fault injection and handling log.",
)  # fmt: skip
@_crash_options(CRASH_POINTS)
@click.option(
    "--crash-on-signal", is_flag=True,
    help="fault injection: SIGRTMIN+i arms a SIGKILL at crash point i (simulations)",
)  # fmt: skip
@click.option("--ack-before-effect", is_flag=True, help="the checker's broken runtime")
@click.option(
    "--record", type=click.Path(dir_okay=False, path_type=Path),
    help="append a line per entry handed to the handler (the handling log)",
)  # fmt: skip
def sim_worker(
    crash_at: str | None,
    crash_batch: int,
    crash_on_signal: bool,
    ack_before_effect: bool,
    record: Path | None,
    **options: Any,
) -> None:
    if crash_at and crash_on_signal:
        raise click.UsageError("--crash-at and --crash-on-signal exclude each other")
    hook = (
        sigkill_at(crash_at, crash_batch)
        if crash_at
        else sigkill_when_signalled()
        if crash_on_signal
        else None
    )
    make = functools.partial(
        AckFirstWorker if ack_before_effect else CrashingWorker,
        crash_hook=hook,
        observer=HandlingLog(record) if record else None,
    )
    assert worker_command.callback is not None
    worker_command.callback(**options, make_worker=make)


@click.command(
    name="sim-relay", params=list(relay_command.params), hidden=True,
    help="`workbench relay` with the lab's fault injection.",
)  # fmt: skip
@_crash_options(RELAY_CRASH_POINTS)
def sim_relay(crash_at: str | None, crash_batch: int, **options: Any) -> None:
    hook = sigkill_at(crash_at, crash_batch, RELAY_CRASH_POINTS) if crash_at else None
    assert relay_command.callback is not None
    relay_command.callback(**options, make_relay=functools.partial(CrashingRelay, crash_hook=hook))


# -- a page people open ---------------------------------------------------------------


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option(
    "--out", type=click.Path(dir_okay=False, path_type=Path),
    help="the HTML file to write [default DIRECTORY/report.html]",
)  # fmt: skip
def report(directory: Path, out: Path | None) -> None:
    """Write one self-contained HTML page of the run or sweep in DIRECTORY; print its path.

    A run's page: the checker's verdict and tables, backlog over time with the
    faults, latency ECDFs, replays, reconnects and resets, the manifest. A
    sweep's: runs OK, the summary over seeds, measures against the grid with
    95% intervals. No server, no external URL: CSS and SVG figures are inline.
    Exits 2 when DIRECTORY is neither a finished run nor a sweep.
    """
    from simulations.analysis.page import ReportError
    from simulations.analysis.page import report as write_page

    try:
        path = write_page(directory, out)
    except ReportError as exc:
        error = click.ClickException(str(exc))
        error.exit_code = 2
        raise error from None
    click.echo(path)
