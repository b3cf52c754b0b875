"""Latencies and backlogs from a run's tables (pure pandas, no Redis).

All times are the run's clock (virtual seconds in a SimPy run); latencies are
rounded to the microsecond:

* :func:`handling_latency`: per group and event, commit -> first handled;
* :func:`client_latency`: per phone delivery, commit -> delivered, by source
  (replayed on reconnect, or live);
* :func:`replays`: per phone connection, how many entries the replay carried;
  :func:`reconnect_replays`: the same for reconnections only (not first connections);
* :func:`backlog`: pending and lag per group over time (the ``samples`` table);
* :func:`summarise`: quantiles of the first three, one row per group or source.
"""

from __future__ import annotations

import pandas as pd

from simulations.analysis.tables import RunTables

QUANTILES = (0.5, 0.9, 0.99, 0.999)


def _to_microseconds(seconds: pd.Series) -> pd.Series:
    """Differences of two float clock readings, rounded to the microsecond: below it
    is the floats' noise (a live delivery at its commit's instant reads -1e-9 s), not
    a latency. ``+ 0.0`` turns the rounded ``-0.0`` into ``0.0``."""
    return seconds.round(6) + 0.0


def handling_latency(run: RunTables) -> pd.DataFrame:
    """group, event_id, type, latency_s (handled events only)."""
    handled = run.handled[run.handled.handler_calls > 0][["group", "event_id", "t_first"]]
    joined = handled.merge(
        run.published[["event_id", "type", "t_committed"]], on="event_id", how="inner"
    )
    joined["latency_s"] = _to_microseconds(joined.t_first - joined.t_committed)
    return joined[["group", "event_id", "type", "latency_s"]].reset_index(drop=True)


def client_latency(run: RunTables) -> pd.DataFrame:
    """phone, connection, source, event_id, latency_s for every delivery of an event."""
    deliveries = run.deliveries[run.deliveries.source != "snapshot"]
    joined = deliveries.merge(
        run.published[["event_id", "t_committed"]], on="event_id", how="inner"
    )
    joined["latency_s"] = _to_microseconds(joined.t - joined.t_committed)
    return joined[["phone", "connection", "source", "event_id", "latency_s"]].reset_index(drop=True)


def replays(run: RunTables) -> pd.DataFrame:
    """phone, connection, replayed (entries sent by the replay of that connection)."""
    d = run.deliveries
    connections = d[["phone", "connection"]].drop_duplicates()
    counts = d[d.source == "replay"].groupby(["phone", "connection"]).size().rename("replayed")
    out = connections.merge(counts.reset_index(), on=["phone", "connection"], how="left")
    out["replayed"] = out.replayed.fillna(0).astype(int)
    return out.reset_index(drop=True)


def reconnect_replays(run: RunTables) -> pd.DataFrame:
    """:func:`replays` of reconnections only: each phone's first connection resumes
    from where the phone started, not from a drop, so it says nothing about time away."""
    sizes = replays(run)
    first = sizes.groupby("phone").connection.transform("min")
    return sizes[sizes.connection > first].reset_index(drop=True)


def backlog(run: RunTables, column: str = "pending") -> pd.DataFrame:
    """t x group table of ``pending`` (or ``lag``, ``lag_s``, ``oldest_pending_age_s``)."""
    if run.samples.empty:
        return pd.DataFrame()
    return run.samples.pivot_table(index="t", columns="group", values=column, aggfunc="max")


def _quantiles(frame: pd.DataFrame, by: str, value: str) -> pd.DataFrame:
    if frame.empty:
        return pd.DataFrame(columns=[by, "count", "mean", *(f"p{q * 100:g}" for q in QUANTILES)])
    grouped = frame.groupby(by)[value]
    out = pd.DataFrame({"count": grouped.size(), "mean": grouped.mean()})
    for q in QUANTILES:
        out[f"p{q * 100:g}"] = grouped.quantile(q)
    out["max"] = grouped.max()
    return out.reset_index()


def summarise(run: RunTables) -> dict[str, pd.DataFrame]:
    """Quantiles per group (handling), per source (phones) and of replay sizes."""
    sizes = replays(run)
    sizes["all"] = "connections"
    return {
        "handling": _quantiles(handling_latency(run), "group", "latency_s"),
        "clients": _quantiles(client_latency(run), "source", "latency_s"),
        "replay_sizes": _quantiles(sizes, "all", "replayed"),
    }


def recovery_times(run: RunTables) -> pd.DataFrame:
    """Per consumer crash: how long until its group had nothing pending again.

    target, group, t_crash, t_restarted, t_recovered (the first backlog sample at
    or after the restart with ``pending == 0``; NaN if none), recovery_s
    (t_recovered - t_crash). Resolution: the ``samples`` interval.
    """
    crashes = run.faults[run.faults.kind == "consumer_crash"]
    rows = []
    for crash in crashes.itertuples():
        group = str(crash.target).rsplit("-", 1)[0]
        after = run.samples[(run.samples.group == group) & (run.samples.t >= crash.t_start)]
        if pd.notna(crash.t_end):
            after = after[after.t >= crash.t_end]
        clear = after[after.pending == 0]
        t_recovered = float(clear.t.iloc[0]) if len(clear) else float("nan")
        rows.append(
            {"target": crash.target, "group": group, "t_crash": crash.t_start,
             "t_restarted": crash.t_end, "t_recovered": t_recovered,
             "recovery_s": t_recovered - crash.t_start}
        )  # fmt: skip
    columns = ["target", "group", "t_crash", "t_restarted", "t_recovered", "recovery_s"]
    return pd.DataFrame(rows, columns=columns)


def littles_law(run: RunTables, group: str) -> dict[str, float]:
    """Little's law for one group, from two independent sources.

    From the event log: each event is *in the system* from its publish to the last
    time its group's handler had it (``t_published`` .. ``t_last``): λ is events
    per second over the run and W the mean time in the system, so λW is the mean
    number in the system. From Redis: L is the time-average of pending + lag as
    the sampler saw them (XINFO GROUPS every ``sample_every_s``). Returns
    ``{"lambda", "W", "lambda_W", "L", "ratio"}`` (ratio = L / λW).
    """
    handled = run.handled[(run.handled.group == group) & (run.handled.handler_calls > 0)]
    joined = handled.merge(run.published[["event_id", "t_published"]], on="event_id")
    samples = run.samples[run.samples.group == group].sort_values("t")
    span = float(samples.t.max() - samples.t.min()) if len(samples) > 1 else float("nan")
    in_window = joined[(joined.t_published >= samples.t.min()) & (joined.t_last <= samples.t.max())]
    lam = len(in_window) / span
    w = float((in_window.t_last - in_window.t_published).mean())
    occupancy = (samples.pending + samples.lag).to_numpy(dtype=float)
    dt = samples.t.diff().shift(-1).fillna(0).to_numpy(dtype=float)  # step function
    level = float((occupancy * dt).sum() / span)
    return {"lambda": lam, "W": w, "lambda_W": lam * w, "L": level,
            "ratio": level / (lam * w) if lam * w else float("nan")}  # fmt: skip
