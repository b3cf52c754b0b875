"""Figures of a run and of a sweep, drawn by matplotlib as inline SVG text.

A :class:`Figure` is a name, a title, a caption and the SVG of the drawing,
ready to be pasted into an HTML page (:mod:`simulations.analysis.page`). The
drawings use matplotlib's object API, not pyplot: no backend is chosen and no
global state changes, so a notebook's own figures are left alone. What this
module guarantees of every figure it makes:

* every axes has an x and a y label with its unit (the ``*_AXIS`` constants
  and :data:`MEASURES` below, so a test can look for them in the page);
* text stays text (``svg.fonttype = "none"``): selectable, searchable, small;
* nothing refers outside the page: no XML prolog, DOCTYPE, namespace URLs or
  metadata; every id (groups, clip paths, markers) and reference to one is
  prefixed with the figure's name, so several figures share a page without
  clashing, and the hashed ones are salted with it, so the same run gives the
  same page;
* big series are reduced before drawing (at most :data:`MAX_POINTS` points a
  line: backlogs keep each bin's peak, ECDFs are drawn at evenly spaced
  quantiles), so an hour-long run draws in a second or two.

Times are the run's clock (virtual seconds in a SimPy run). Fault markers are
spans from ``t_start`` to ``t_end`` (a line when the fault has no duration),
one colour per kind, named in the legend.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure as Canvas
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

#: The most points a drawn line has; longer series are reduced first.
MAX_POINTS = 1500
#: The most faults drawn as markers on a time axis (the page's table lists them all).
MAX_FAULT_MARKERS = 300

TIME_AXIS = "run time (s)"
PENDING_AXIS = "pending (entries)"
LAG_AXIS = "lag (s)"
OLDEST_AXIS = "oldest pending age (s)"
LATENCY_AXIS = "latency (s)"
ECDF_AXIS = "fraction at or below (ECDF)"
REPLAY_AXIS = "entries replayed on connecting (entries)"
CONNECTIONS_AXIS = "connections (count)"
CUMULATIVE_AXIS = "cumulative count (reconnects, resyncs)"

#: Axis labels, with units, of a sweep's measures
#: (:data:`simulations.analysis.measures.MEASURES`).
MEASURES: dict[str, str] = {
    "events": "events published (events)",
    "faults": "faults injected (faults)",
    "lost": "events lost (events)",
    "duplicated": "events duplicated (events)",
    "unseen": "events unseen (events)",
    "unexpected": "events unexpected (events)",
    "client_lost": "phone entries lost (entries)",
    "client_duplicated": "phone entries duplicated (entries)",
    "client_reordered": "phone entries reordered (entries)",
    "handling_p50_s": "p50 handling latency, slowest group (s)",
    "handling_p99_s": "p99 handling latency, slowest group (s)",
    "phone_replay_p99_s": "p99 phone latency, replayed (s)",
    "phone_live_p99_s": "p99 phone latency, live (s)",
    "lag_max_s": "largest lag sampled (s)",
    "recovery_mean_s": "mean recovery after a consumer crash (s)",
    "recovery_max_s": "longest recovery after a consumer crash (s)",
}
#: The measures a sweep's page draws against the grid (when the sweep has them).
MAIN_MEASURES = (
    "lost", "duplicated", "unseen", "client_lost", "handling_p99_s", "phone_replay_p99_s",
    "phone_live_p99_s", "lag_max_s", "recovery_max_s", "events",
)  # fmt: skip

_STYLE = {
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
}


@dataclass(frozen=True)
class Figure:
    """One drawing for the page: ``svg`` is an ``<svg>`` element, nothing around it."""

    name: str
    title: str
    caption: str
    svg: str


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _styled(draw: Callable[_P, _R]) -> Callable[_P, _R]:
    """Draw (and render) under the page's style, whatever the caller's rcParams."""

    @functools.wraps(draw)
    def styled(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with matplotlib.rc_context(_STYLE):
            return draw(*args, **kwargs)

    return styled


# -- a run ------------------------------------------------------------------------


@_styled
def backlog_figure(
    samples: pd.DataFrame, faults: pd.DataFrame, drain_start: float | None
) -> Figure:
    """Pending entries, lag (s) and the oldest pending entry's age per group over time."""
    panels = (("pending", PENDING_AXIS), ("lag_s", LAG_AXIS), ("oldest_pending_age_s", OLDEST_AXIS))
    fig = Canvas(figsize=(9, 7.5))
    axes = fig.subplots(len(panels), 1, sharex=True)
    for ax, (column, label) in zip(axes, panels, strict=True):
        for group, rows in samples.groupby("group", sort=True):
            t, y = _peaks(rows["t"].to_numpy(float), rows[column].to_numpy(float))
            ax.plot(t, y, drawstyle="steps-post", linewidth=1.2, label=str(group))
        ax.set_ylabel(label)
    handles = _mark_faults(axes, faults, drain_start)
    axes[-1].set_xlabel(TIME_AXIS)
    group_handles, _ = axes[0].get_legend_handles_labels()
    axes[0].legend(handles=group_handles + handles, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _figure(
        fig,
        "backlog",
        "Backlog per consumer group over time",
        "Each group's pending entries (read, not acknowledged), its lag in seconds (how old "
        "the oldest entry it has not read is) and the age of its oldest pending entry, as the "
        "sampler read them from Redis. Shaded spans and lines are faults, by kind; the dashed "
        "line is where the load stops and the drain begins.",
    )


@_styled
def latency_figure(latencies: pd.DataFrame, by: str, name: str, title: str, caption: str) -> Figure:
    """ECDFs of ``latency_s``, one line per value of ``by``."""
    fig = Canvas(figsize=(9, 4))
    ax = fig.subplots()
    for key, rows in latencies.groupby(by, sort=True):
        x, y = _ecdf(rows["latency_s"].to_numpy(float))
        ax.plot(x, y, drawstyle="steps-post", linewidth=1.4, label=f"{key} (n={len(rows):,})")
    ax.set_xlabel(LATENCY_AXIS)
    ax.set_ylabel(ECDF_AXIS)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    return _figure(fig, name, title, caption)


@_styled
def replay_figure(replays: pd.DataFrame) -> Figure:
    """A histogram of how many entries each connection's replay carried."""
    fig = Canvas(figsize=(9, 3.5))
    ax = fig.subplots()
    sizes = replays["replayed"].to_numpy(int)
    top = int(sizes.max(initial=0))
    bins = np.arange(top + 2) - 0.5 if top < 60 else 60
    ax.hist(sizes, bins=bins, color="#4c72b0")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(REPLAY_AXIS)
    ax.set_ylabel(CONNECTIONS_AXIS)
    return _figure(
        fig,
        "replays",
        "Replay sizes",
        f"How many entries a phone's connection replayed after its Last-Event-ID "
        f"({len(sizes):,} connections; 0: nothing was missed while it was away).",
    )


@_styled
def connections_figure(
    deliveries: pd.DataFrame,
    faults: pd.DataFrame,
    drain_start: float | None,
    until: float | None = None,
) -> Figure:
    """Cumulative reconnects and snapshot resyncs (resets) over time, with the faults;
    the counts are drawn on to ``until`` (the run's end) when it is given."""
    fig = Canvas(figsize=(9, 3.5))
    ax = fig.subplots()
    starts = deliveries.groupby(["phone", "connection"])["t"].min().reset_index()
    starts = starts.sort_values(["phone", "t"], kind="stable")
    reconnects = starts.loc[starts["phone"].duplicated(), "t"]  # not a phone's first
    resyncs = deliveries.loc[deliveries["source"] == "snapshot", "t"]
    for label, times in (("reconnects", reconnects), ("snapshot resyncs (resets)", resyncs)):
        t = np.sort(times.to_numpy(float))
        counts = np.arange(len(t) + 1)
        if until is not None and until > t.max(initial=0.0):
            t, counts = np.r_[t, until], np.r_[counts, len(t)]
        ax.step(np.r_[0.0, t], counts, where="post", label=f"{label}: {len(times):,}")
    handles = _mark_faults([ax], faults, drain_start)
    ax.set_xlabel(TIME_AXIS)
    ax.set_ylabel(CUMULATIVE_AXIS)
    mine, _ = ax.get_legend_handles_labels()
    ax.legend(handles=mine + handles, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _figure(
        fig,
        "connections",
        "Reconnects and resets over time",
        "A reconnect is a phone's second or later connection (counted when it first delivers "
        "something); a resync is a phone fetching the snapshot because its Last-Event-ID was "
        "lost or no longer retained (the server's reset).",
    )


# -- a sweep ----------------------------------------------------------------------


@_styled
def measure_figure(
    summary: pd.DataFrame, key: str, measure: str, other_keys: Sequence[str]
) -> Figure:
    """``measure``'s mean over seeds against the grid's ``key``, with interval bars;
    one line per combination of the ``other_keys``."""
    fig = Canvas(figsize=(5.6, 3.4))
    ax = fig.subplots()
    positions, ticks = _grid_positions(summary[key])
    lines = summary.groupby(list(other_keys), sort=True) if other_keys else [((), summary)]
    for combo, rows in lines:
        combo = combo if isinstance(combo, tuple) else (combo,)
        label = ", ".join(f"{k}={v}" for k, v in zip(other_keys, combo, strict=True)) or None
        x = positions[rows.index.to_numpy()]
        order = np.argsort(x)
        mean = rows[f"{measure}_mean"].to_numpy(float)[order]
        low = rows[f"{measure}_low"].to_numpy(float)[order]
        high = rows[f"{measure}_high"].to_numpy(float)[order]
        bars = np.vstack([mean - low, high - mean])
        bars[~np.isfinite(bars)] = 0  # one seed: no interval to draw
        ax.errorbar(x[order], mean, yerr=bars, marker="o", capsize=4, label=label)
    if ticks is not None:
        ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(key_axis(key))
    ax.set_ylabel(MEASURES[measure])
    if other_keys:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _figure(
        fig,
        f"sweep-{measure}",
        f"{MEASURES[measure].split(' (')[0]} against {key}",
        "Mean over the seeds of each grid point, with its 95% Student-t interval "
        "(no bar: one seed, or all seeds equal).",
    )


def key_axis(key: str) -> str:
    """An axis label for a scenario key, with the unit its name implies."""
    section, _, name = key.partition(".")
    if name.endswith("_s"):
        unit = "s"
    elif name.endswith("_p"):
        unit = "probability"
    elif name.endswith("rate"):
        unit = "per s"
    elif name in {"count", "batch_size", "partitions", "cluster_masters", "max_restarts"}:
        unit = "count"
    else:
        unit = "scenario value"
    return f"{key} ({unit})"


def _grid_positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """x positions of grid values: the numbers themselves when the column is numeric,
    else each value's rank among the distinct values (and the values as tick labels)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.to_numpy(float), None
    text = values.astype(str)
    labels = sorted(set(text))
    return text.map(labels.index).to_numpy(float), labels


# -- drawing helpers --------------------------------------------------------------


def _mark_faults(axes: Sequence[Axes], faults: pd.DataFrame, drain_start: float | None) -> list:
    """Draw faults (spans, or lines when instant) and the drain's start on every axes;
    return legend handles naming each kind."""
    kinds = sorted(faults["kind"].dropna().astype(str).unique())
    colours = {kind: matplotlib.colormaps["Set2"](i % 8) for i, kind in enumerate(kinds)}
    shown = faults.sort_values("t_start").head(MAX_FAULT_MARKERS)
    for ax in axes:
        for fault in shown.itertuples():
            colour = colours[str(fault.kind)]
            end = fault.t_end
            if pd.notna(end) and end > fault.t_start:
                ax.axvspan(fault.t_start, end, color=colour, alpha=0.35, linewidth=0)
            else:
                ax.axvline(fault.t_start, color=colour, linewidth=1.2)
        if drain_start is not None:
            ax.axvline(drain_start, color="black", linestyle="--", linewidth=1)
    handles: list[Any] = [
        Patch(color=colours[kind], alpha=0.6, label=f"fault: {kind}") for kind in kinds
    ]
    if drain_start is not None:
        handles.append(Line2D([], [], color="black", linestyle="--", label="drain starts"))
    return handles


def _peaks(t: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: each bin of time keeps its first instant and its peak."""
    order = np.argsort(t, kind="stable")
    t, y = t[order], y[order]
    if len(t) <= MAX_POINTS:
        return t, y
    bins = np.linspace(t[0], t[-1], MAX_POINTS + 1)
    which = np.clip(np.searchsorted(bins, t, side="right") - 1, 0, MAX_POINTS - 1)
    starts = np.flatnonzero(np.r_[True, np.diff(which) != 0])
    return t[starts], np.maximum.reduceat(np.nan_to_num(y), starts)


def _ecdf(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The empirical CDF at most MAX_POINTS steps: all values, or evenly spaced quantiles."""
    values = np.sort(values[np.isfinite(values)])
    n = len(values)
    if n <= MAX_POINTS:
        return values, np.arange(1, n + 1) / n
    fractions = np.linspace(1 / n, 1, MAX_POINTS)
    return np.quantile(values, fractions, method="inverted_cdf"), fractions


_PROLOG = re.compile(r"^.*?(?=<svg)", re.DOTALL)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.DOTALL)
_NAMESPACES = re.compile(r'\s+xmlns(:\w+)?="[^"]*"')
_IDS = re.compile(r'(\bid="|href="#|url\(#)(?=[^"#)])')


def _figure(fig: Any, name: str, title: str, caption: str) -> Figure:
    """Render ``fig`` to bare SVG (see the module docstring) and close it."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name}):
        fig.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    svg = _NAMESPACES.sub("", _METADATA.sub("", _PROLOG.sub("", buffer.getvalue(), count=1)))
    # matplotlib numbers its groups "figure_1", "axes_1"... in every figure: prefix them
    # (and the references to them), so ids stay unique on a page of several figures.
    svg = _IDS.sub(lambda m: f"{m.group(1)}{name}-", svg)
    return Figure(name=name, title=title, caption=caption, svg=svg.strip())


__all__ = [
    "MAIN_MEASURES",
    "MEASURES",
    "Figure",
    "backlog_figure",
    "connections_figure",
    "key_axis",
    "latency_figure",
    "measure_figure",
    "replay_figure",
]
