"""What N machines would carry: the scale bench's figures projected, under stated assumptions.

``bench/scale.py`` measures, on one machine, how fast one process runs each
stage of the pipeline (the relay publishing the outbox, the ledger group's SQL
handler, the fan-out into user streams) on one redis-server and on a local
Redis Cluster, how much Redis CPU each entry costs the cluster's masters, and
how fast the SQL store committed. :func:`project` turns those figures into
what ``N`` machines would carry, in log entries per second, as the smallest of
three limits:

* **machines.** Each machine runs one process per stage for its share of the
  partitions. A process carries, on a cluster, its single-server rate times the
  measured cluster/single ratio, whatever share of partitions it holds. The
  load spreads evenly over the busy partitions (escrow ids hash evenly), so
  the machine holding the most partitions, ``ceil(partitions / N)``, fills up
  first: a stage carries ``rate * partitions / ceil(partitions / N)``. Past
  ``N = partitions`` machines add nothing. The slowest stage sets the limit.
* **Redis.** The cluster has ``max(measured masters, N)`` masters (one per
  machine, at least as many as measured). A master is single-threaded: at one
  full core it serves ``1 / (its CPU seconds per entry)`` entries per second,
  the per-master rate measured here. Partitions spread over the masters as
  evenly as they can, so the master with the most partitions fills up first.
* **the SQL store.** Every machine shares one store: its measured commit rate
  caps the total, whatever the number of machines.

Rates are converted to *log entries*: a stage that reads only some aggregate
types (the ledger: escrow and payment entries) handles ``share`` of an entry
per log entry, so it carries ``rate / share`` log entries per second; the
Redis cost per log entry is the sum over stages of ``cpu per entry * share``.

Pure: numbers in, numbers out. ``bench/report.py`` recomputes the projection
from a record's inputs and refuses a record whose rows they do not give.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

MACHINES: tuple[int, ...] = (1, 2, 4, 8)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline as measured by one process.

    ``single_rate``: its entries per second on one redis-server, unpartitioned;
    ``cluster_vs_single``: the median per-round ratio of its cluster rate to that;
    ``redis_cpu_per_entry``: the cluster masters' CPU seconds per entry it
    handled (summed over masters; ``None`` when not measured);
    ``share``: entries it handles per log entry (1 when it reads every stream).
    """

    name: str
    single_rate: float
    cluster_vs_single: float
    redis_cpu_per_entry: float | None
    share: float = 1.0

    @property
    def cluster_rate(self) -> float:
        """Its entries per second in one process on a cluster."""
        return self.single_rate * self.cluster_vs_single

    @property
    def log_rate(self) -> float:
        """Log entries per second it keeps up with in one process on a cluster."""
        return self.cluster_rate / self.share


@dataclass(frozen=True)
class Inputs:
    """The measured figures a projection starts from."""

    stages: tuple[Stage, ...]
    partitions: int  # busy partitions of the partitioned log
    masters_measured: int
    store_rate: float  # entries per second the store committed (the ledger's handler)
    store_share: float = 1.0  # store commits per log entry (the ledger's share)

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError("a projection needs at least one stage")
        if self.partitions < 1 or self.masters_measured < 1:
            raise ValueError("partitions and masters_measured must be at least 1")
        for stage in self.stages:
            if stage.single_rate <= 0 or stage.cluster_vs_single <= 0 or stage.share <= 0:
                raise ValueError(f"stage {stage.name}: rates, ratio and share must be positive")
        if self.store_rate <= 0 or self.store_share <= 0:
            raise ValueError("store_rate and store_share must be positive")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inputs:
        stages = tuple(Stage(**s) for s in data["stages"])
        return cls(**{**data, "stages": stages})


@dataclass(frozen=True)
class Row:
    """What ``machines`` machines would carry, in log entries per second."""

    machines: int
    partitions_per_machine: int  # the most any machine holds
    masters: int
    partitions_per_master: int  # the most any master holds
    machines_limit: float  # the slowest stage over every machine
    slowest_stage: str
    redis_limit: float | None  # None: the Redis cost was not measured
    store_limit: float
    projected: float
    bound_by: str  # "machines (<stage>)", "Redis" or "SQL store"
    per_stage: dict[str, float] = field(default_factory=dict)  # log entries/s per stage

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def busiest_share(partitions: int, holders: int) -> int:
    """Partitions held by the busiest of ``holders`` when dealt evenly (at least 1)."""
    if partitions < 1 or holders < 1:
        raise ValueError("partitions and holders must be at least 1")
    return math.ceil(partitions / holders)


def redis_cost_per_log_entry(stages: Iterable[Stage]) -> float | None:
    """Master CPU seconds one log entry costs across the stages; None if any is unknown."""
    total = 0.0
    for stage in stages:
        if stage.redis_cpu_per_entry is None or stage.redis_cpu_per_entry <= 0:
            return None
        total += stage.redis_cpu_per_entry * stage.share
    return total


def project_one(inputs: Inputs, machines: int) -> Row:
    """The projection for ``machines`` machines (see the module docstring)."""
    if machines < 1:
        raise ValueError("machines must be at least 1")
    p = inputs.partitions
    per_machine = busiest_share(p, machines)
    spread = p / per_machine  # how many machines' worth of load the busiest allows
    per_stage = {s.name: s.log_rate * spread for s in inputs.stages}
    slowest = min(per_stage, key=lambda name: per_stage[name])
    masters = max(inputs.masters_measured, machines)
    per_master = busiest_share(p, masters)
    cost = redis_cost_per_log_entry(inputs.stages)
    redis_limit = None if cost is None else (p / per_master) / cost
    store_limit = inputs.store_rate / inputs.store_share
    limits = {f"machines ({slowest})": per_stage[slowest], "SQL store": store_limit}
    if redis_limit is not None:
        limits["Redis"] = redis_limit
    bound = min(limits, key=lambda name: limits[name])
    return Row(
        machines=machines,
        partitions_per_machine=per_machine,
        masters=masters,
        partitions_per_master=per_master,
        machines_limit=per_stage[slowest],
        slowest_stage=slowest,
        redis_limit=redis_limit,
        store_limit=store_limit,
        projected=limits[bound],
        bound_by=bound,
        per_stage=per_stage,
    )


def project(inputs: Inputs, machines: Sequence[int] = MACHINES) -> list[Row]:
    """One row per machine count."""
    return [project_one(inputs, n) for n in machines]


def assumptions(inputs: Inputs) -> list[str]:
    """The assumptions of :func:`project`, with the figures of ``inputs`` in them."""
    stages = ", ".join(
        f"{s.name} {s.single_rate:,.0f}/s x {s.cluster_vs_single:.3g}"
        + (f" / share {s.share:.3g}" if s.share != 1 else "")
        for s in inputs.stages
    )
    cost = redis_cost_per_log_entry(inputs.stages)
    redis = (
        "the Redis limit is left out: the masters' CPU per entry was not measured"
        if cost is None
        else f"one log entry costs the masters {cost * 1e6:.3g} µs of CPU over all stages "
        f"(measured here), so a master at one full core serves {1 / cost:,.0f} log entries/s; "
        f"the cluster has max({inputs.masters_measured}, N) masters and the one holding the "
        "most partitions fills up first"
    )
    return [
        f"{inputs.partitions} busy partitions, the load even over them (escrow ids hash "
        "evenly); each machine runs one process per stage for its share of them, on cores "
        "of its own, and the machine holding the most partitions fills up first",
        "a process on a cluster carries its single-server rate times the measured "
        f"cluster/single ratio, whatever share of partitions it holds ({stages}); the "
        "slowest stage sets the machines' limit",
        redis,
        f"one SQL store for every machine: its measured commit rate "
        f"({inputs.store_rate:,.0f} entries/s through the ledger's handler"
        + (
            f", {inputs.store_share:.3g} ledger entries per log entry"
            if inputs.store_share != 1
            else ""
        )
        + ") caps the total; the relay's marks and the other SQL groups' commits are not "
        "counted against it",
        "the network between machines, Redis replication and failover, and the other "
        "consumer groups are not modelled",
    ]
