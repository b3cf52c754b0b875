"""What a run measures: from receipts, samples and counters to one results row.

**Measurements** (all per run; "delivery" = one event reaching one phone):

* ``expected``: deliveries the schedule asks for (each event x its users);
  ``delivered``: receipts, duplicates included; ``lost``: expected deliveries
  never received, split by the production time of the event into
  ``lost_in_downtime`` (inside the actual fan-out downtime),
  ``lost_in_disconnect`` (inside that phone's actual offline window, from its
  disconnect to its reconnect being ready) and ``lost_other``;
  ``duplicated``: receipts of an event the phone already had;
  ``out_of_order``: first receipts of an event older than one already
  received (production order is the truth); ``unexpected``: events for
  someone else.
* ``replayed``: deliveries made by the replay that follows a reconnect.
* Latency: receipt time minus the envelope's ``occurred_at``, both read from
  the injected ``clock``. ``latency_*`` over all deliveries; ``live_latency_*``
  over deliveries of events produced while nothing was down for that phone.
* ``redis_connections_peak``: peak ``connected_clients`` minus the baseline;
  ``client_connections_peak``: peak of the connections serving phones
  (roles ``client``, ``live``, ``pool``; see :mod:`simulations.designs.base`).
* ``redis_commands``: ``total_commands_processed`` delta over production and
  drain, minus the harness's own commands (INFO, CLIENT LIST, XINFO);
  Lua-internal calls count (Redis 7 counts them). ``commands_per_s`` divides by
  that window, ``commands_per_event`` by the events produced.
  ``redis_cpu_ms_per_event``: Redis' user+sys CPU over the window, per event.
  ``commands_used``: distinct command names the design issued, connection
  handshakes (HELLO, CLIENT SETNAME, PING) aside.
* Operability: ``backlog_visible`` (Redis answered the probe with numbers),
  ``peak_backlog_in_downtime`` / ``peak_pending_in_downtime`` (lag + pending,
  and pending alone, sampled during the downtime), ``user_stream_entries``
  (XLEN of the phones' streams), ``redis_keys`` (keys the design leaves).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from simulations.designs.base import CLIENT_ROLES, Design, Inbox, Receipt
from simulations.designs.schedule import Schedule, Window

# The harness's own commands, taken out of the counts.
HARNESS_COMMANDS = ("info", "client|list", "xinfo|groups")
# Every connection says these once; not part of how a design moves events.
HANDSHAKE = ("hello", "client|setname", "client|setinfo", "ping", "select")


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampler reading; ``t_s`` is seconds since production started."""

    t_s: float
    connected_clients: int
    roles: dict[str, int]
    backlog: int | None
    pending: int | None


@dataclass
class DesignResult:
    """The measurements of one design under one schedule (see the module docstring)."""

    design: str
    schedule: Schedule
    metrics: dict[str, Any]
    downtime: Window | None
    receipts: dict[str, list[Receipt]]
    offline: dict[str, list[Window]]
    produced_at_s: list[float]
    samples: list[Sample]
    commands_by_name: dict[str, int]
    roles_peak: dict[str, int] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The results-table row: ``design`` then every metric."""
        return {"design": self.design, **self.metrics}


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def score(
    design: Design,
    schedule: Schedule,
    inboxes: dict[str, Inbox],
    produced_at: list[float],
    downtime: Window | None,
    samples: list[Sample],
    *,
    baseline: int,
    before: dict[str, float],
    after: dict[str, float],
    window_s: float,
    depth: int | None,
    redis_keys: int,
    drained: bool,
) -> DesignResult:
    """Turn what one run recorded into its :class:`DesignResult` (see the module docstring)."""
    expected = schedule.expected()
    down = downtime or Window(math.inf, math.inf)
    lost = {"downtime": 0, "disconnect": 0, "other": 0}
    counts = {"delivered": 0, "duplicated": 0, "out_of_order": 0, "unexpected": 0, "replayed": 0}
    latencies: list[float] = []
    live: list[float] = []
    for user, inbox in inboxes.items():
        wanted = set(expected[user])
        seen: set[int] = set()
        newest = -1
        for r in inbox.receipts:
            counts["delivered"] += 1
            counts["replayed"] += r.replayed
            if r.index in seen:
                counts["duplicated"] += 1
                continue
            seen.add(r.index)
            counts["unexpected"] += r.index not in wanted
            counts["out_of_order"] += r.index < newest
            newest = max(newest, r.index)
            ms = (r.received_at - r.occurred_at) * 1000.0
            latencies.append(ms)
            t = produced_at[r.index]
            quiet = not down.contains(t) and not any(w.contains(t) for w in inbox.offline)
            if quiet and not r.replayed:
                live.append(ms)
        for index in wanted - seen:
            t = produced_at[index]
            if down.contains(t):
                lost["downtime"] += 1
            elif any(w.contains(t) for w in inbox.offline):
                lost["disconnect"] += 1
            else:
                lost["other"] += 1

    produced = len(schedule.events)
    in_down = [s for s in samples if down.contains(s.t_s)]
    backlogs = [s.backlog for s in in_down if s.backlog is not None]
    pendings = [s.pending for s in in_down if s.pending is not None]
    roles_peak: dict[str, int] = {}
    for s in samples:
        for role, n in s.roles.items():
            roles_peak[role] = max(roles_peak.get(role, 0), n)
    harness = sum(after.get(c, 0.0) - before.get(c, 0.0) for c in HARNESS_COMMANDS)
    commands = after["total"] - before["total"] - harness
    by_name = {
        name: int(after[name] - before.get(name, 0.0))
        for name in after
        if name not in ("total", "cpu", *HARNESS_COMMANDS)
        and after[name] - before.get(name, 0.0) > 0
    }
    metrics: dict[str, Any] = {
        "clients": schedule.n_clients,
        "events_produced": produced,
        "events_in_downtime": sum(down.contains(t) for t in produced_at),
        "downtime_s": downtime.length_s if downtime else 0.0,
        "expected": sum(len(v) for v in expected.values()),
        **counts,
        "lost": sum(lost.values()),
        "lost_in_downtime": lost["downtime"],
        "lost_in_disconnect": lost["disconnect"],
        "lost_other": lost["other"],
        "resets": sum(i.resets for i in inboxes.values()),
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p99_ms": _percentile(latencies, 99),
        "live_latency_p50_ms": _percentile(live, 50),
        "live_latency_p99_ms": _percentile(live, 99),
        "redis_connections_peak": max((s.connected_clients for s in samples), default=baseline)
        - baseline,
        "client_connections_peak": max(
            (sum(s.roles.get(r, 0) for r in CLIENT_ROLES) for s in samples), default=0
        ),
        "redis_commands": int(commands),
        "commands_per_s": commands / window_s,
        "commands_per_event": commands / max(produced, 1),
        "redis_cpu_ms_per_event": (after["cpu"] - before["cpu"]) * 1000.0 / max(produced, 1),
        "commands_used": len(set(by_name) - set(HANDSHAKE)),
        "redis_keys": redis_keys,
        "backlog_visible": any(s.backlog is not None for s in samples),
        "peak_backlog_in_downtime": float(max(backlogs)) if backlogs else math.nan,
        "peak_pending_in_downtime": float(max(pendings)) if pendings else math.nan,
        "user_stream_entries": float(depth) if depth is not None else math.nan,
        # What the design promises for phone-serving connections: one per phone
        # unless it says otherwise (the two-layer design: 1 + its pool).
        "client_connection_bound": float(schedule.n_clients),
        "redelivered": math.nan,
        "duplicates_suppressed": math.nan,
        "published_unheard": math.nan,
        **design.extra(),
        "drained": drained,
        "window_s": window_s,
    }
    return DesignResult(
        design=design.name,
        schedule=schedule,
        metrics=metrics,
        downtime=downtime,
        receipts={u: list(i.receipts) for u, i in inboxes.items()},
        offline={u: list(i.offline) for u, i in inboxes.items()},
        produced_at_s=produced_at,
        samples=samples,
        commands_by_name=by_name,
        roles_peak=roles_peak,
    )
