"""A run or a sweep as one HTML page people open: no server, nothing fetched.

``workbench report DIR`` (and :func:`report`) writes ``DIR/report.html``: one
self-contained file, its CSS inline and its figures inline SVG
(:mod:`simulations.analysis.figures`), so it opens from disk, mails as an
attachment and stays readable offline. It refers to no URL at all.

A **run directory** (``manifest.json`` and the Parquet tables of
:mod:`simulations.analysis.tables`) gives a page with the checker's verdict and
tables (:mod:`simulations.analysis.checker`: groups, delivery counts, phones,
invariants, problems), the backlog per group over time with the faults marked,
latency ECDFs per group (handling) and per phone source (replay, live,
catch-up), replay sizes, reconnects and resets, the faults and recovery times,
and the manifest (scenario, seed, mode, parameters, wall time, versions).

A **sweep directory** (``results.parquet``: a row per run, the grid's
``section.key`` columns, the seed and the run's measures; ``summary.parquet``
when the sweep wrote one, else it is computed here with
:func:`~simulations.analysis.intervals.summarise_over`) gives a page with the
count of runs that passed, the summary over seeds per grid point, each main
measure against the grid's first key with 95% interval bars, every run's row,
and the run directories found under it (each holding a ``manifest.json``).

Anything else is a :class:`ReportError` saying what the directory is and what
was expected: a missing directory, a directory that is neither, a run whose
``manifest.json`` (written last) is missing because it never finished or is not
a JSON object of the manifest's shape, a sweep that has run directories but no
``results.parquet`` yet, or whose tables have no rows or text where numbers
belong, or an ``out`` that cannot be written. Every value shown is text to the
page (Jinja autoescape; matplotlib escapes the SVG's text): a scenario name or
fault detail of ``<script>`` is shown, never run.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from simulations.analysis import figures
from simulations.analysis.checker import CLIENT_FAILURES, GROUP_FAILURES, CheckReport
from simulations.analysis.intervals import summarise_over
from simulations.analysis.measures import MEASURES as RUN_MEASURES
from simulations.analysis.results import Run, load_run
from simulations.analysis.tables import COLUMNS
from simulations.analysis.timings import client_latency, handling_latency, recovery_times, replays

#: The file written in the directory when no ``out`` is given.
DEFAULT_NAME = "report.html"
#: Rows shown of a long table (the page says how many more there are).
ROW_LIMIT = 50
#: Columns of ``results.parquet`` whose nonzero values fail a run.
SWEEP_FAILURES = ("lost", "duplicated", "unseen", "unexpected", "client_lost",
                  "client_duplicated", "client_reordered")  # fmt: skip


class ReportError(Exception):
    """The directory cannot be reported on; the message says why."""


@dataclass
class Table:
    """A frame formatted for the page: text cells, and which cells are bad news."""

    title: str
    columns: list[str]
    rows: list[list[tuple[str, str]]]  # (text, css class) per cell
    more: int = 0  # rows not shown
    note: str = ""


@dataclass
class Section:
    """A part of the page: an anchor, a heading, prose, tables and figures in order."""

    anchor: str
    heading: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[figures.Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Page:
    """Everything the template shows; ``kind`` is "run" or "sweep"."""

    kind: str
    title: str
    ok: bool
    verdict: str
    facts: list[tuple[str, str]]
    sections: list[Section] = field(default_factory=list)


# -- entry points -------------------------------------------------------------------


def report(directory: str | Path, out: str | Path | None = None) -> Path:
    """Write the page of the run or sweep in ``directory`` to ``out`` (default
    ``directory/report.html``) and return its path. :class:`ReportError` when
    ``directory`` is neither a finished run nor a sweep."""
    directory = Path(directory)
    kind = kind_of(directory)
    page = run_page(_load(directory)) if kind == "run" else sweep_page(directory)
    target = Path(out) if out is not None else directory / DEFAULT_NAME
    if target.is_dir():
        raise ReportError(f"--out {target} is a directory; name the HTML file to write")
    if target.exists() and target.suffix.lower() not in (".html", ".htm"):
        raise ReportError(  # a run's manifest.json or table, say: never written over
            f"--out {target} exists and is not an HTML page; not written over"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(render(page), encoding="utf-8")
    except OSError as exc:
        raise ReportError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target


def kind_of(directory: Path) -> str:
    """ "run" or "sweep", from the files ``directory`` holds; else a ReportError."""
    if not directory.exists():
        if directory.is_symlink():
            raise ReportError(f"{directory} is a symlink to nothing (a loop, or a missing target)")
        raise ReportError(f"{directory} does not exist")
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory (a run or a sweep directory is)")
    if (directory / "manifest.json").is_file():
        return "run"
    if (directory / "results.parquet").is_file():
        return "sweep"
    if any((directory / f"{table}.parquet").exists() for table in COLUMNS):
        raise ReportError(
            f"{directory} is an unfinished run: it has tables but no manifest.json, which a "
            "run writes last (the run did not finish, or is still running)"
        )
    if runs := _run_dirs(directory):
        raise ReportError(
            f"{directory} holds {len(runs):,} run directories (e.g. "
            f"{runs[0].relative_to(directory)}) but no results.parquet: an unfinished sweep "
            "(it writes the table when every run is done), or not a sweep at all; "
            "report on one run's directory, or on the sweep's once it is done"
        )
    raise ReportError(
        f"{directory} is neither a run directory (manifest.json and Parquet tables) "
        "nor a sweep directory (results.parquet)"
    )


def render(page: Page) -> str:
    """The page as HTML text (autoescaped; only the figures' SVG goes in as it is)."""
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(page=page, Markup=Markup)


def _load(directory: Path) -> Run:
    try:
        run = load_run(directory)
        run.report  # noqa: B018 - check now, so a bad table is a ReportError here
    except FileNotFoundError as exc:  # "... lacks x.parquet"
        raise ReportError(str(exc)) from None
    except (OSError, ValueError) as exc:  # unreadable manifest or Parquet, bad ids
        raise ReportError(f"cannot read the run in {directory}: {exc}") from None
    except KeyError as exc:  # a table of another shape (another table's file, say)
        raise ReportError(f"cannot read the run in {directory}: a table lacks {exc}") from None
    return run


# -- a run ----------------------------------------------------------------------------


def run_page(run: Run) -> Page:
    """The page of one run: verdict, delivery, backlog, latencies, phones, faults, manifest."""
    m = run.manifest
    checked = run.report
    unfinished = "" if checked.finished else f" (UNFINISHED: {checked.unseen:,} events unseen)"
    title = f"{m.get('scenario', run.path.name)}, seed {m.get('seed', '?')}"
    return Page(
        kind="run",
        title=title,
        ok=checked.ok,
        verdict=("OK" if checked.ok else "NOT OK") + unfinished,
        facts=[
            ("scenario", str(m.get("scenario", "?"))),
            ("seed", str(m.get("seed", "?"))),
            ("mode", str(m.get("mode", "virtual"))),
            ("run time", _seconds(m.get("virtual_seconds"))),
            ("wall time", _seconds(m.get("wall_seconds"))),
            ("events", f"{len(run.published):,}"),
            ("faults", f"{len(run.faults):,}"),
        ],
        sections=[
            _delivery_section(checked),
            _backlog_section(run),
            _latency_section(run),
            _phones_section(run, checked),
            _faults_section(run),
            _manifest_section(run),
        ],
    )


def _drain_start(run: Run) -> float | None:
    duration = run.manifest.get("params", {}).get("run", {}).get("duration_s")
    return float(duration) if isinstance(duration, numbers.Real) else None


def _end(run: Run) -> float | None:
    """The run's last instant on its clock: its virtual seconds, else its last sample."""
    seconds = run.manifest.get("virtual_seconds")
    if isinstance(seconds, numbers.Real):
        return float(seconds)
    return float(run.samples["t"].max()) if len(run.samples) else None


def _delivery_section(checked: CheckReport) -> Section:
    clients = checked.clients
    failing = clients[clients[list(CLIENT_FAILURES)].to_numpy().any(axis=1)]
    totals = clients.drop(columns="phone").sum().to_frame().T
    totals.insert(0, "phones", len(clients))
    return Section(
        "delivery",
        "Verdict: delivery and invariants",
        "The checker's tables (as `workbench check` prints them). Per consumer group, each "
        "expected event is ok, lost, duplicated or unseen (its group had not drained at the "
        "end); recovered events are ok after a redelivery. Per phone, each entry of its user "
        "stream is ok, lost or duplicated, and deliveries may be reordered or unexpected. "
        "Cells that fail the run are red.",
        tables=[
            table(checked.groups, "consumer groups", failing=(*GROUP_FAILURES, "unseen"),
                  must_hold=("drained",)),
            table(checked.delivery_counts, "delivery counts (events per highest delivery count)"),
            table(checked.invariants, "invariants", must_hold=("ok",)),
            table(totals, "phones, in total", failing=CLIENT_FAILURES),
            table(failing, "phones with problems", failing=CLIENT_FAILURES,
                  empty="every phone got exactly its stream"),
            table(checked.problems, "problems", empty="none"),
        ],
    )  # fmt: skip


def _backlog_section(run: Run) -> Section:
    every = run.manifest.get("params", {}).get("run", {}).get("sample_every_s")
    section = Section(
        "backlog",
        "Backlog over time",
        "Sampled from Redis (XINFO GROUPS and the oldest pending entry)"
        + (f" every {_seconds(every)} of run time." if isinstance(every, numbers.Real) else "."),
    )
    if run.samples.empty:
        section.notes.append("no backlog samples in this run")
    else:
        section.figures.append(figures.backlog_figure(run.samples, run.faults, _drain_start(run)))
    return section


def _latency_section(run: Run) -> Section:
    section = Section(
        "latency",
        "Latencies",
        "Handling: from an event's commit to its group's first handling of it. Phones: from "
        "the commit to each delivery, by how it came (replayed on connecting, live, or a "
        "catch-up read).",
        tables=[
            table(run.metrics["handling"], "handling latency per group (s)"),
            table(run.metrics["clients"], "phone latency per source (s)"),
        ],
    )
    handling = handling_latency(run)
    if handling.empty:
        section.notes.append("no event was handled: no handling latencies")
    else:
        section.figures.append(
            figures.latency_figure(
                handling, "group", "handling-latency", "Handling latency per consumer group",
                "Empirical CDF of commit-to-first-handling per group: the fraction of events "
                "handled within x seconds.",
            )
        )  # fmt: skip
    phones = client_latency(run)
    if phones.empty:
        section.notes.append("no phone deliveries: no phone latencies")
    else:
        section.figures.append(
            figures.latency_figure(
                phones, "source", "phone-latency", "Phone latency per source",
                "Empirical CDF of commit-to-delivery for phones, by source: replayed after a "
                "reconnect, live, or read to catch up.",
            )
        )  # fmt: skip
    return section


def _phones_section(run: Run, checked: CheckReport) -> Section:
    clients = checked.clients
    connected = int((clients["connections"] > 0).sum())
    connections = int(clients["connections"].sum())
    sources = run.deliveries["source"].value_counts()
    counts = pd.DataFrame(
        {
            "phones": [len(clients)],
            "phones connected": [connected],
            "connections": [connections],
            "reconnects": [connections - connected],
            "snapshot resyncs (resets)": [int(clients["snapshots"].sum())],
            **{f"{source} deliveries": [int(n)] for source, n in sources.items()},
        }
    )
    section = Section(
        "phones",
        "Phones: reconnects, resets and replays",
        "Counted as the checker counts them: a connection is a (phone, connection) pair "
        "that delivered something; a reconnect is any but a phone's first; a reset is a "
        "snapshot row (the phone lost its Last-Event-ID, or it was no longer retained, and "
        "resynced from the snapshot).",
        tables=[table(counts, "connections"), table(run.metrics["replay_sizes"], "replay sizes")],
    )
    if run.deliveries.empty:
        section.notes.append("no phone deliveries in this run")
        return section
    section.figures.append(figures.replay_figure(replays(run)))
    section.figures.append(
        figures.connections_figure(run.deliveries, run.faults, _drain_start(run), _end(run))
    )
    return section


def _faults_section(run: Run) -> Section:
    faults = run.faults
    per_kind = faults.groupby("kind").size().rename("faults").reset_index()
    return Section(
        "faults",
        "Faults and recovery",
        "Every fault injected (the spans and lines on the time axes). Recovery: per consumer "
        "crash, the time until its group had nothing pending again (at the sampling's "
        "resolution).",
        tables=[
            table(per_kind, "faults per kind", empty="no faults in this run"),
            table(faults.sort_values("t_start"), "faults", empty="no faults in this run"),
            table(recovery_times(run), "recovery after consumer crashes", empty="no crashes"),
        ],
    )


def _manifest_section(run: Run) -> Section:
    m = run.manifest
    plain = {k: v for k, v in m.items() if not isinstance(v, dict | list)}
    plain["directory"] = str(run.path)
    tables = [_mapping_table("run", plain)]
    for name in ("versions", "relay", "rows"):
        if isinstance(m.get(name), dict):
            tables.append(_mapping_table(name, m[name]))
    gave_up = m.get("supervisor_gave_up")
    if gave_up and isinstance(gave_up, dict | list):  # a dict: what -> why
        as_mapping = gave_up if isinstance(gave_up, dict) else dict(enumerate(gave_up))
        tables.append(_mapping_table("supervisor gave up on", as_mapping))
    for section_name, values in m.get("params", {}).items():
        tables.append(_mapping_table(f"params: [{section_name}]", values))
    return Section(
        "manifest",
        "Manifest",
        "What ran: the scenario with every parameter (section by section, as --set names "
        "them), the seed, the mode, the machine's view (CPU, Redis), versions and row counts.",
        tables=tables,
    )


# -- a sweep --------------------------------------------------------------------------


def sweep_page(directory: Path) -> Page:
    """The page of a sweep: verdict count, summary over seeds, measures vs the grid."""
    results = _read_parquet(directory / "results.parquet")
    if results.empty:
        raise ReportError(f"{directory / 'results.parquet'} has no rows: a sweep with no runs")
    _check_numbers(directory / "results.parquet", results, RUN_MEASURES)
    keys = grid_keys(results)
    results = _hashable(results, keys)
    summary = _hashable(_summary(directory, results, keys), keys)
    runs = _run_table(directory, keys)
    scenario = str(runs["scenario"].iloc[0]) if len(runs) else directory.name
    passed = int(results["ok"].astype(bool).sum()) if "ok" in results else 0
    return Page(
        kind="sweep",
        title=f"sweep of {scenario}",
        ok=passed == len(results),
        verdict=f"{passed} of {len(results)} runs OK",
        facts=[
            ("scenario", scenario),
            ("grid", "; ".join(f"{k} = {', '.join(dict.fromkeys(map(_cell, results[k])))}"
                               for k in keys) or "none"),
            ("seeds", ", ".join(map(str, sorted(results["seed"].unique())))
             if "seed" in results else "?"),
            ("runs", f"{len(results):,}"),
            ("summary", "summary.parquet" if (directory / "summary.parquet").is_file()
             else "computed from results.parquet"),
        ],
        sections=[
            _summary_section(summary, keys),
            Section("runs", "Every run", "results.parquet, a row per run.",
                    tables=[table(results, "results", failing=SWEEP_FAILURES,
                                  must_hold=("ok",))]),
            Section("directories", "Run directories",
                    "The run directories under the sweep (each has its own tables; "
                    "`workbench report` on one gives its page).",
                    tables=[table(runs, "run directories", empty="none found")]),
        ],
    )  # fmt: skip


def _summary_section(summary: pd.DataFrame, keys: list[str]) -> Section:
    """The summary table, and each measure it has against the grid's first key."""
    measures = [
        m
        for m in figures.MEASURES
        if f"{m}_mean" in summary.columns and summary[f"{m}_mean"].notna().any()
    ]  # measures no run had (no crash: no recovery time) are left out
    section = Section(
        "summary",
        "Summary over seeds",
        "One row per grid point: n runs (seeds), how many passed the checker, and for each "
        "measure the mean with its 95% Student-t interval [low, high] over the seeds (a "
        "measure no run at a point had is left out of its mean). The figures draw the main "
        "measures against the grid's first key.",
        tables=[table(_intervals(summary, keys, measures), "summary")],
    )
    if keys:
        drawn = [m for m in figures.MAIN_MEASURES if m in measures]
        section.figures = [figures.measure_figure(summary, keys[0], m, keys[1:]) for m in drawn]
    return section


def grid_keys(results: pd.DataFrame) -> list[str]:
    """The grid's keys: the ``section.key`` columns, in the table's order."""
    return [str(c) for c in results.columns if "." in str(c)]


def _hashable(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``frame`` with list-valued grid columns (a profile: arrays once in Parquet) as
    text, so grid points group, compare and label like any value."""
    frame = frame.copy()
    for key in keys:
        if (
            key in frame
            and frame[key].map(lambda v: isinstance(v, list | tuple | np.ndarray)).any()
        ):
            frame[key] = frame[key].map(_cell)
    return frame


def _summary(directory: Path, results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``summary.parquet`` when the sweep wrote one, else computed over the seeds."""
    path = directory / "summary.parquet"
    if path.is_file():
        summary = _read_parquet(path)
        intervals = [f"{m}_{part}" for m in RUN_MEASURES for part in ("mean", "low", "high")]
        _check_numbers(path, summary, intervals)
        if missing := [k for k in keys if k not in summary.columns]:
            raise ReportError(
                f"{path} lacks the grid's columns {missing} (results.parquet has them)"
            )
    else:
        measures = [m for m in RUN_MEASURES if m in results.columns]  # as the sweep averages
        summary = summarise_over(results, keys, measures)
        if "ok" in results:
            grouped = results.groupby(keys, sort=True, dropna=False) if keys else None
            ok_runs = grouped["ok"].sum() if grouped is not None else results["ok"].sum()
            summary.insert(len(keys) + 1, "ok_runs", list(ok_runs) if keys else [int(ok_runs)])
    return summary.reset_index(drop=True)


def _intervals(summary: pd.DataFrame, keys: list[str], measures: list[str]) -> pd.DataFrame:
    """The summary with each measure as one "mean [low, high]" column."""
    out = summary[[*keys, *(c for c in ("n", "ok_runs") if c in summary)]].copy()
    for m in measures:
        out[m] = [
            _interval(mean, low, high)
            for mean, low, high in zip(
                summary[f"{m}_mean"], summary[f"{m}_low"], summary[f"{m}_high"], strict=True
            )
        ]
    return out


def _interval(mean: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return "-"
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"{_number(mean)} (no interval)"
    return f"{_number(mean)} [{_number(low)}, {_number(high)}]"


def _run_dirs(directory: Path) -> list[Path]:
    """Run directories under ``directory`` at any depth (a sweep nests them by grid
    point: ``k=v/seed-1``); each holds a manifest."""
    return sorted(p.parent for p in directory.rglob("manifest.json") if p.parent != directory)


def _run_table(directory: Path, keys: list[str]) -> pd.DataFrame:
    """One row per run directory under the sweep: its scenario, seed and grid values."""
    rows = []
    for run_dir in _run_dirs(directory):
        try:
            m = json.loads((run_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            continue  # a page about the sweep, not a check of every manifest
        if not isinstance(m, dict):
            continue
        row = {"directory": run_dir.relative_to(directory).as_posix(),
               "scenario": m.get("scenario"), "seed": m.get("seed")}  # fmt: skip
        params = m.get("params")
        for key in keys:
            section, _, name = key.partition(".")
            values = params.get(section) if isinstance(params, dict) else None
            row[key] = values.get(name) if isinstance(values, dict) else None
        row["wall_seconds"] = m.get("wall_seconds")
        row["report"] = "report.html" if (run_dir / DEFAULT_NAME).is_file() else ""
        rows.append(row)
    return pd.DataFrame(rows, columns=["directory", "scenario", "seed", *keys, "wall_seconds",
                                       "report"])  # fmt: skip


def _check_numbers(path: Path, frame: pd.DataFrame, columns: Iterable[str]) -> None:
    """A ReportError naming the first of ``columns`` in ``frame`` that is not numbers."""
    for column in columns:
        if column in frame.columns and not pd.api.types.is_numeric_dtype(frame[column]):
            raise ReportError(
                f"{path}: column {column!r} should hold numbers, not {frame[column].dtype}"
            )


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise ReportError(f"cannot read {path}: {exc}") from None


# -- tables ---------------------------------------------------------------------------


def table(
    frame: pd.DataFrame,
    title: str,
    *,
    failing: Iterable[str] = (),
    must_hold: Iterable[str] = (),
    empty: str = "",
    limit: int = ROW_LIMIT,
) -> Table:
    """``frame`` formatted for the page; a nonzero cell of a ``failing`` column and a
    false cell of a ``must_hold`` column are marked bad. At most ``limit`` rows."""
    failing, must_hold = set(failing), set(must_hold)
    columns = [str(c) for c in frame.columns]
    rows = []
    for values in frame.head(limit).itertuples(index=False):
        row = []
        for column, value in zip(columns, values, strict=True):
            bad = (column in failing and _truthy(value)) or (
                column in must_hold and not _truthy(value)
            )
            row.append((_cell(value), "bad" if bad else _align(value)))
        rows.append(row)
    note = empty if frame.empty else ""
    return Table(title, columns, rows, more=max(len(frame) - limit, 0), note=note)


def _mapping_table(title: str, mapping: dict[Any, Any]) -> Table:
    frame = pd.DataFrame(
        {"key": [str(k) for k in mapping], "value": [_cell(v) for v in mapping.values()]}
    )
    return table(frame, title, limit=len(frame))


def _truthy(value: Any) -> bool:
    try:
        return bool(value) and not pd.isna(value)
    except (TypeError, ValueError):
        return bool(value)


def _align(value: Any) -> str:
    """The cell's CSS class: numbers align right; long text may wrap (others do not)."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return "num"
    return "long" if isinstance(value, str) and len(value) > 60 else ""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return "-" if pd.isna(value) else _number(float(value))
    if isinstance(value, list | tuple | np.ndarray):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value) and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:.4g}"


def _seconds(value: Any) -> str:
    return f"{_number(float(value))} s" if isinstance(value, numbers.Real) else "-"


TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ page.title }}: {{ page.verdict }}</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f;
         margin: 0; background: #fafafa; }
  header { padding: 1.2em 2em; background: #fff; border-bottom: 1px solid #ddd; }
  header h1 { margin: 0 0 .3em; font-size: 1.5em; }
  .verdict { display: inline-block; padding: .2em .7em; border-radius: 4px; font-weight: 700;
             color: #fff; }
  .verdict.ok { background: #1a7f37; } .verdict.bad { background: #cf222e; }
  dl.facts { display: flex; flex-wrap: wrap; gap: .2em 1.6em; margin: .8em 0 0; }
  dl.facts div { display: flex; gap: .4em; } dl.facts dt { color: #666; } dl.facts dd { margin: 0; }
  nav { padding: .5em 2em; background: #f0f0f0; position: sticky; top: 0; }
  nav a { margin-right: 1.2em; color: #0550ae; text-decoration: none; }
  main { padding: 0 2em 3em; max-width: 1200px; }
  section { margin-top: 1.8em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; }
  h3 { font-size: 1em; margin: 1.2em 0 .3em; }
  table { border-collapse: collapse; background: #fff; font-size: 13px; }
  th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top;
           white-space: nowrap; }
  td.long { white-space: normal; min-width: 24em; }
  th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
  td.bad { background: #ffebe9; color: #a40e26; font-weight: 600; text-align: right; }
  .more, .note { color: #666; font-style: italic; margin: .3em 0; }
  figure { margin: 1.2em 0; background: #fff; border: 1px solid #e4e4e4; padding: .8em; }
  figure svg { max-width: 100%; height: auto; }
  figcaption { color: #444; font-size: 13px; } figcaption b { color: #1d1d1f; }
  .figures { display: flex; flex-wrap: wrap; gap: 0 1.2em; }
  .tables { display: flex; flex-wrap: wrap; gap: 0 2em; align-items: flex-start; }
  .tables > div { max-width: 100%; overflow-x: auto; }
</style>
</head>
<body>
<header>
  <h1>{{ page.title }}
    <span class="verdict {{ 'ok' if page.ok else 'bad' }}" id="verdict">{{ page.verdict }}</span>
  </h1>
  <dl class="facts">
  {%- for name, value in page.facts %}
    <div><dt>{{ name }}</dt><dd>{{ value }}</dd></div>
  {%- endfor %}
  </dl>
</header>
<nav>
{%- for section in page.sections %}
  <a href="#{{ section.anchor }}">{{ section.heading }}</a>
{%- endfor %}
</nav>
<main>
{%- for section in page.sections %}
<section id="{{ section.anchor }}">
  <h2>{{ section.heading }}</h2>
  {%- if section.text %}<p>{{ section.text }}</p>{% endif %}
  {%- for note in section.notes %}<p class="note">{{ note }}</p>{% endfor %}
  <div class="tables">
  {%- for t in section.tables %}
  <div>
    <h3>{{ t.title }}</h3>
    {%- if t.note %}<p class="note">{{ t.note }}</p>{% else %}
    <table>
      <thead><tr>{% for c in t.columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
      <tbody>
      {%- for row in t.rows %}
        <tr>{% for text, css in row -%}
          <td{% if css %} class="{{ css }}"{% endif %}>{{ text }}</td>
        {%- endfor %}</tr>
      {%- endfor %}
      </tbody>
    </table>
    {%- if t.more %}<p class="more">... and {{ "{:,}".format(t.more) }} more rows</p>{% endif %}
    {%- endif %}
  </div>
  {%- endfor %}
  </div>
  <div class="figures">
  {%- for figure in section.figures %}
  <figure id="figure-{{ figure.name }}">
    {{ Markup(figure.svg) }}
    <figcaption><b>{{ figure.title }}.</b> {{ figure.caption }}</figcaption>
  </figure>
  {%- endfor %}
  </div>
</section>
{%- endfor %}
</main>
</body>
</html>
"""


__all__ = [
    "DEFAULT_NAME",
    "Page",
    "ReportError",
    "Section",
    "Table",
    "grid_keys",
    "kind_of",
    "render",
    "report",
    "run_page",
    "sweep_page",
    "table",
]
