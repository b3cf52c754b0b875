"""Scenarios: TOML files of parameters, with defaults and ``--set`` overrides.

A scenario is a name and one frozen dataclass per TOML section (:class:`RunParams`,
:class:`MarketParams`, ...). The dataclasses' defaults are the defaults; a scenario
file only lists what differs from them, and ``--set section.key=value`` overrides
a file. :func:`load` checks every value once, against the type of the field's
default, before any model sees it: an unknown section or key (a typo), a value of
the wrong type or a negative number, a string that is none of the values its key
takes (``consumers.restart``, ``redis.appendfsync``, the groups of ``consumers.only``)
or a lower bound above its upper bound (``mpesa.query_delay_min_s``), or keys that
do not go together (``redis.cluster_masters`` without ``redis.partitions``, or with
``redis.lose_last_writes``) is a :class:`ScenarioError` naming ``section.key``,
never a silently ignored setting or a crash halfway through a run. After that the
models and the drivers read typed attributes (``scenario.market.arrival_rate``) and
trust them.

:attr:`Scenario.params` is the same values as plain data, section by section in
the order below; it is what a run's manifest records, so it keeps the shape the
manifests have always had (lists, not tuples).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from workbench.handlers import ALL_GROUPS, OPTIONAL_GROUPS
from workbench.streams.partitions import MAX_PARTITIONS

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: How a crashed consumer comes back: restarted by serve's supervisor (same consumer
#: name, after its backoff) or replaced by another consumer after ``mttr_s``.
RESTART_MODES = ("supervisor", "replacement")
#: redis-server's ``appendfsync`` settings.
APPENDFSYNC_MODES = ("always", "everysec", "no")
#: The most masters of a simulation's local cluster (each with a replica: twice as
#: many redis-servers on this machine).
MAX_CLUSTER_MASTERS = 8


@dataclass(frozen=True)
class RunParams:
    """``[run]``: how long the load lasts, the drain after it, the sampling."""

    duration_s: float = 600.0  # virtual seconds of load
    drain_s: float = 300.0  # faults healed, no new escrows: everything should settle
    sample_every_s: float = 5.0
    epoch: float = 1_800_000_000.0  # the virtual clock's start (Unix seconds)


@dataclass(frozen=True)
class MarketParams:
    """``[market]``: who trades, how often, and how each escrow's life goes."""

    arrival_rate: float = 1.0  # new escrows per second (Poisson)
    lifecycle: bool = True  # false: an arrival only opens an escrow (queueing studies)
    profile: tuple[float, ...] = ()  # 24 hourly multipliers of arrival_rate; (): flat
    day_s: float = 86400.0  # length of a "day" for the profile (shorter days for short runs)
    buyers: int = 200
    sellers: int = 40
    amount_min: int = 200
    amount_max: int = 20_000
    fund_delay_mean_s: float = 20.0
    ship_delay_mean_s: float = 60.0
    confirm_delay_mean_s: float = 60.0
    cancel_p: float = 0.03
    dispute_p: float = 0.05
    refund_p: float = 0.5  # of disputes resolved by refund
    honest_p: float = 0.85  # seller classes: honest, slow (ships late), fraudulent (never)
    slow_p: float = 0.10
    slow_factor: float = 10.0
    disputer_p: float = 0.05  # buyer classes: regular, disputer (disputes often), abandoner
    abandoner_p: float = 0.05  # (opens escrows and never pays)
    disputer_factor: float = 6.0
    payment_timeout_s: float = 900.0
    shipping_timeout_s: float = 1800.0
    confirmation_timeout_s: float = 1800.0


@dataclass(frozen=True)
class MpesaParams:
    """``[mpesa]``: the simulated Daraja: callback delays, failures, duplicates, queries."""

    delay_min_s: float = 2.0
    delay_max_s: float = 30.0
    failure_p: float = 0.1
    duplicate_p: float = 0.05
    # STK Push Query: every callback is confirmed with one before it is recorded.
    query_delay_min_s: float = 0.2
    query_delay_max_s: float = 2.0
    query_unavailable_p: float = 0.05  # then asked again by the verification pass
    verify_after_s: float = 60.0  # ask about a checkout whose callback has not come
    verify_retry_s: float = 5.0


@dataclass(frozen=True)
class PhonesParams:
    """``[phones]``: app users holding SSE connections that keep dropping."""

    count: int = 40  # users with the app open, taken from the buyers
    connection_mean_s: float = 180.0  # "drops every few minutes"
    reconnect_mean_s: float = 5.0
    poll_every_s: float = 1.0  # real time: how often a phone looks at its connection
    lose_id_p: float = 0.02  # per reconnect: the app was reinstalled


@dataclass(frozen=True)
class ConsumersParams:
    """``[consumers]``: the consumer groups' workers, their crashes and the fan-out's windows."""

    # Consumers wake when the relay publishes; this poll is for heartbeats,
    # recovery of dead consumers' entries and retries.
    poll_every_s: float = 2.0
    wake_on_publish: bool = True  # false: poll every poll_every_s only (bigger batches)
    batch_size: int = 100
    mtbf_s: float = 0.0  # per group; 0: never crash
    # "supervisor": serve restarts the crashed worker after its backoff (the
    # supervisor section), same consumer name; "replacement": another consumer
    # starts after mttr_s and claims the dead one's entries (a lost machine).
    restart: str = "supervisor"
    mttr_s: float = 10.0  # restart = "replacement" only
    dead_after_s: float = 5.0
    ack_before_effect: bool = False  # a deliberately broken runtime, for the checker
    service_rate: float = 0.0  # > 0: one entry at a time, exponential service (M/M/1 studies)
    only: str = ""  # comma-separated groups to run; "": all
    # The fan-out: dedupe markers and user-stream history, in seconds of the
    # simulation's clock (entry ids are simulation time). A marker must outlive
    # any redelivery of its event (a crashed consumer's entries are claimed after
    # dead_after_s, or re-read after the supervisor's backoff), or the event is
    # appended twice. Short enough that Redis reaches its steady size early.
    dedupe_ttl_s: int = 600
    user_maxlen: int = 1000
    user_max_age_s: float = 300.0

    @property
    def only_groups(self) -> list[str]:
        """The groups ``only`` names, in its order; empty: every group runs."""
        return [g.strip() for g in self.only.split(",") if g.strip()]


@dataclass(frozen=True)
class RelayParams:
    """``[relay]``: the outbox relay's pace and the aggregate streams' retention."""

    every_s: float = 0.5
    # Acked entries stay in the aggregate streams this long, in seconds of the
    # simulation's clock (entry ids are simulation time); then trimmed.
    retention_s: float = 300.0
    wake_on_commit: bool = True  # false: publish every every_s only (bigger batches)


@dataclass(frozen=True)
class ServersParams:
    """``[servers]``: the SSE/API server processes and their kills."""

    count: int = 2  # SSE/API server processes; phones are spread over them
    mtbf_s: float = 0.0  # per server: SIGKILL with all its sessions; 0: never
    # back after serve's backoff (the supervisor section)


@dataclass(frozen=True)
class AnalyticsParams:
    """``[analytics]``: the optional risk-scoring group."""

    # A trained risk model's directory (simulations.analytics.save): runs the
    # "analytics" group, scoring sellers online; "": no analytics group.
    model: str = ""


@dataclass(frozen=True)
class RealtimeParams:
    """``[realtime]``: pacing of ``--realtime`` runs against the served runtime."""

    factor: float = 1.0  # --realtime: wall seconds per virtual second (0.5: twice as fast)
    sse_ping_s: float = 1.0  # server heartbeats (wall seconds)


@dataclass(frozen=True)
class RedisParams:
    """``[redis]``: the redis-server's durability setting and its kills."""

    # kill -9 + restart from the AOF, after serve's backoff (the supervisor
    # section); 0: never
    restart_every_s: float = 0.0
    # What serve ships: everysec. A kill while a background fsync is pending
    # loses acknowledged writes; the relay's repair puts the lost entries back.
    appendfsync: str = "everysec"
    # Writes (commands, or scripts' MULTI/EXEC) cut off the AOF at each kill:
    # the loss an everysec kill can cause, forced so that every kill has one.
    lose_last_writes: int = 0
    # The log in this many partitions (workbench.streams.partitions), as
    # `workbench serve --partitions` runs it; 0: unpartitioned, the default.
    partitions: int = 0
    # N >= 1: a local Redis Cluster of N masters with one replica each instead of
    # one redis-server (simulations.drivers.cluster); restart_every_s then fails a
    # master over. Needs partitions >= 1; 0: one redis-server, the default. Runs
    # on a cluster are not bit-identical: what a replica had received when its
    # master was killed is wall-clock timing.
    cluster_masters: int = 0
    # Cluster only: before each failover the master's replica is stopped and cut
    # off for this many virtual seconds of load, so the kill loses what was
    # written meanwhile: an asynchronous replica's loss, forced (like
    # lose_last_writes on one server). 0: the replica is as up to date as it gets.
    failover_unreplicated_s: float = 0.0


@dataclass(frozen=True)
class SupervisorParams:
    """``[supervisor]``: serve's restart policy (:class:`workbench.ops.supervision.RestartPolicy`,
    same defaults): back after ``initial_backoff_s``, doubling per crash in a row up to
    ``max_backoff_s``; more than ``max_restarts`` within ``window_s``: given up."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    stable_after_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 60.0


#: Every section: its TOML name and its dataclass, in the order manifests list them.
SECTIONS: dict[str, type[Any]] = {
    "run": RunParams,
    "market": MarketParams,
    "mpesa": MpesaParams,
    "phones": PhonesParams,
    "consumers": ConsumersParams,
    "relay": RelayParams,
    "servers": ServersParams,
    "analytics": AnalyticsParams,
    "realtime": RealtimeParams,
    "redis": RedisParams,
    "supervisor": SupervisorParams,
}

#: Values that must be greater than 0 (not only non-negative): ``section.key``.
_POSITIVE = (("servers", "count"), ("realtime", "factor"))
#: Strings that take one of a few values: ``(section, key)`` -> the values.
_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("consumers", "restart"): RESTART_MODES,
    ("redis", "appendfsync"): APPENDFSYNC_MODES,
}
#: Comma-separated strings whose every item takes one of a few values. ``only`` may
#: name the optional groups: they run when configured (analytics: a model).
_CHOICE_LISTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("consumers", "only"): (*ALL_GROUPS, *OPTIONAL_GROUPS),
}
#: Values with an upper bound: ``(section, key)`` -> the largest allowed.
_MAXIMA: dict[tuple[str, str], float] = {
    ("redis", "partitions"): MAX_PARTITIONS,
    ("redis", "cluster_masters"): MAX_CLUSTER_MASTERS,
}
#: Bounds of one range: ``(section, lower key, upper key)``; lower <= upper.
_RANGES = (("mpesa", "query_delay_min_s", "query_delay_max_s"),)


class ScenarioError(ValueError):
    """A scenario name, file or override is wrong; the message says what exists."""


@dataclass(frozen=True)
class Scenario:
    """A named, checked set of parameters: one frozen dataclass per section."""

    name: str
    run: RunParams = field(default_factory=RunParams)
    market: MarketParams = field(default_factory=MarketParams)
    mpesa: MpesaParams = field(default_factory=MpesaParams)
    phones: PhonesParams = field(default_factory=PhonesParams)
    consumers: ConsumersParams = field(default_factory=ConsumersParams)
    relay: RelayParams = field(default_factory=RelayParams)
    servers: ServersParams = field(default_factory=ServersParams)
    analytics: AnalyticsParams = field(default_factory=AnalyticsParams)
    realtime: RealtimeParams = field(default_factory=RealtimeParams)
    redis: RedisParams = field(default_factory=RedisParams)
    supervisor: SupervisorParams = field(default_factory=SupervisorParams)

    @property
    def params(self) -> dict[str, dict[str, Any]]:
        """Every section as plain data (lists, not tuples): what a manifest records."""
        return {name: _plain(getattr(self, name)) for name in SECTIONS}


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """A scenario by name (``simulations/scenarios/NAME.toml``) or path, with overrides.

    Each value is checked as it is read (the file's, then each ``--set`` in
    order, the last one winning), then the sections are built once.
    """
    path = _path_of(name_or_path)
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    for section, table in _read(path).items():
        if not isinstance(table, dict):
            raise ScenarioError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in table.items():
            _assign(values, section, key, value, source=str(path))
    for item in overrides:
        section, key, value = _override(item)
        _assign(values, section, key, value, source="--set")
    built = {section: cls(**values[section]) for section, cls in SECTIONS.items()}
    scenario = Scenario(path.stem, **built)
    for section, key in _POSITIVE:
        if not getattr(getattr(scenario, section), key) > 0:
            raise ScenarioError(f"{path.stem}: {section}.{key} must be greater than 0")
    for section, low, high in _RANGES:
        params = getattr(scenario, section)
        if getattr(params, low) > getattr(params, high):
            raise ScenarioError(
                f"{path.stem}: {section}.{low} ({getattr(params, low)}) must not be greater"
                f" than {section}.{high} ({getattr(params, high)})"
            )
    _check_cluster(path.stem, scenario.redis)
    return scenario


def _check_cluster(name: str, redis: RedisParams) -> None:
    """What a run on a cluster (``redis.cluster_masters >= 1``) cannot do."""
    if not redis.cluster_masters:
        if redis.failover_unreplicated_s:
            raise ScenarioError(
                f"{name}: redis.failover_unreplicated_s needs redis.cluster_masters >= 1"
                " (a failover is a cluster's); on one server use redis.lose_last_writes"
            )
        return
    if not redis.partitions:
        raise ScenarioError(
            f"{name}: redis.cluster_masters needs redis.partitions >= 1 (on a cluster every"
            " script touches one partition's slot), e.g. --set redis.partitions=16"
        )
    if redis.lose_last_writes:
        raise ScenarioError(
            f"{name}: redis.lose_last_writes is single-server only (it cuts one server's AOF);"
            " with redis.cluster_masters a failover loses what the replica had not received"
        )


def _path_of(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; available: {', '.join(available())}")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None


def _override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, the value as TOML, or the bare text)."""
    key, sep, raw = item.partition("=")
    if not sep or "." not in key:
        raise ScenarioError(f"--set takes section.key=value, not {item!r}")
    section, _, name = key.partition(".")
    return section, name, parse_value(raw)


def parse_value(raw: str) -> Any:
    """A ``--set`` (or ``--grid``) value: TOML (``30``, ``0.5``, ``true``, ``"a b"``,
    ``[1, 2]``), or else the bare text as a string (``replacement``)."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _plain(section: Any) -> dict[str, Any]:
    return {
        f.name: list(value) if isinstance(value := getattr(section, f.name), tuple) else value
        for f in fields(section)
    }


def _assign(
    values: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str
) -> None:
    """Check ``value`` for ``section.key`` against the field's default; keep it in ``values``."""
    if section not in SECTIONS:
        raise ScenarioError(
            f"{source}: unknown section {section!r}; sections: {', '.join(SECTIONS)}"
        )
    defaults = {f.name: f.default for f in fields(SECTIONS[section])}
    if key not in defaults:
        raise ScenarioError(
            f"{source}: unknown key {section}.{key}; keys of [{section}]: {', '.join(defaults)}"
        )
    where = f"{source}: {section}.{key}"
    values[section][key] = checked = _checked(where, defaults[key], value)
    _check_choice(where, (section, key), checked)
    if (section, key) in _MAXIMA and checked > _MAXIMA[section, key]:
        raise ScenarioError(f"{where} must be at most {_MAXIMA[section, key]:g}, not {checked}")


def _check_choice(where: str, key: tuple[str, str], value: Any) -> None:
    """A :class:`ScenarioError` if ``value`` is not one of what ``key`` takes (if it is
    one of :data:`_CHOICES` or :data:`_CHOICE_LISTS`), saying what it takes."""
    if key in _CHOICES and value not in _CHOICES[key]:
        allowed = ", ".join(_CHOICES[key])
        raise ScenarioError(f"{where} must be one of {allowed}, not {value!r}")
    if key in _CHOICE_LISTS:
        allowed = ", ".join(_CHOICE_LISTS[key])
        items = [item.strip() for item in value.split(",") if item.strip()]
        if unknown := [item for item in items if item not in _CHOICE_LISTS[key]]:
            raise ScenarioError(
                f"{where} must list only {allowed}, not {value!r} ({', '.join(unknown)} unknown)"
            )


def _checked(where: str, default: Any, value: Any) -> Any:
    """``value`` as the type of ``default``, or a :class:`ScenarioError` starting with ``where``.

    Lists are of finite numbers >= 0 (kept as a tuple of floats); a float field takes
    any finite number (as a float: never nan or inf), an int field a whole number;
    numbers are never negative.
    """
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < math.inf
            for v in value
        ):
            raise ScenarioError(f"{where} must be a list of finite numbers >= 0")
        if where.endswith(".profile") and value and len(value) != 24:
            raise ScenarioError(f"{where} needs 24 hourly values, not {len(value)}")
        return tuple(float(v) for v in value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"{where} must be true or false, not {value!r}")
        return value
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ScenarioError(f"{where} must be a string, not {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(f"{where} must be a number, not {value!r}")
    if not math.isfinite(value):  # nan runs nothing; inf never ends (a rate, a duration)
        raise ScenarioError(f"{where} must be a finite number, not {value!r}")
    if value < 0:
        raise ScenarioError(f"{where} must not be negative")
    if isinstance(default, int) and not isinstance(value, int):
        raise ScenarioError(f"{where} must be a whole number, not {value!r}")
    return float(value) if isinstance(default, float) else value


#: The defaults as plain data, section by section (what an empty scenario file gives).
DEFAULTS: dict[str, dict[str, Any]] = Scenario("defaults").params
