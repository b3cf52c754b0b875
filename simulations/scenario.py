"""Scenarios: TOML files of parameters, with defaults and ``--set`` overrides.

A scenario is a name and one frozen dataclass per TOML section (:class:`RunParams`,
:class:`MarketParams`, ...). The dataclasses' defaults are the defaults; a scenario
file only lists what differs from them, and ``--set section.key=value`` overrides
a file. :func:`load` checks every value once, against the type of the field's
default, before any model sees it: an unknown section or key (a typo), a value of
the wrong type or a negative number, a string that is none of the values its key
takes (``consumers.restart``, ``redis.appendfsync``, the groups of ``consumers.only``),
a probability (every key ending in ``_p``) outside [0, 1], shares of one population
above 1 in all (seller and buyer classes), a size or interval that must be positive
at 0 (:data:`_POSITIVE`, each with the reason: a batch of 0 entries, a sampler that
never advances), a number beyond its bound, a lower bound above its upper bound
(``mpesa.query_delay_min_s``), a run with nothing to check (no load time, no
arrivals), or keys that do not go together (``redis.cluster_masters`` without
``redis.partitions``, or with ``redis.lose_last_writes``) is a :class:`ScenarioError`
naming ``section.key``, the value and what is allowed, never a silently ignored
setting, a hang or a crash halfway through a run. The checks are tables, not code
per key. After that the models and the drivers read typed attributes
(``scenario.market.arrival_rate``) and trust them.

Each field carries its meaning (``metadata["doc"]``): :func:`settings` lists every
key of a scenario with its value, default and meaning (``workbench scenarios show``).
:func:`warnings` says what a valid scenario asks for in vain: faults that cannot,
or most likely will not, fire within its load.

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

from workbench.domain.escrow import MAX_AMOUNT, MIN_AMOUNT
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
#: The most buyers, sellers or phones a scenario may have.
MAX_POPULATION = 1_000_000


def _param(default: Any, doc: str) -> Any:
    """A parameter: its default and what it means (``workbench scenarios show`` prints it)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class RunParams:
    """``[run]``: how long the load lasts, the drain after it, the sampling."""

    duration_s: float = _param(600.0, "virtual seconds of load: arrivals and faults")
    drain_s: float = _param(
        300.0, "virtual seconds after the load: faults healed, no new escrows, all settles"
    )
    sample_every_s: float = _param(5.0, "seconds between samples of each group's backlog")
    epoch: float = _param(1_800_000_000.0, "the virtual clock's start (Unix seconds)")


@dataclass(frozen=True)
class MarketParams:
    """``[market]``: who trades, how often, and how each escrow's life goes."""

    arrival_rate: float = _param(1.0, "new escrows per second (Poisson)")
    lifecycle: bool = _param(True, "false: an arrival only opens an escrow (queueing studies)")
    profile: tuple[float, ...] = _param(
        (), "24 hourly multipliers of arrival_rate over a day of day_s; []: flat"
    )
    day_s: float = _param(86400.0, "length of a day for the profile (shorter for short runs)")
    buyers: int = _param(200, "buyers in the market")
    sellers: int = _param(40, "sellers in the market")
    amount_min: int = _param(200, "smallest escrow amount (KES, uniform)")
    amount_max: int = _param(20_000, "largest escrow amount (KES, uniform)")
    fund_delay_mean_s: float = _param(20.0, "mean wait before the buyer pays (exponential)")
    ship_delay_mean_s: float = _param(
        60.0, "mean wait before an honest seller ships, once funded (exponential)"
    )
    confirm_delay_mean_s: float = _param(
        60.0, "mean wait before the buyer confirms or disputes, and the admin resolves"
    )
    cancel_p: float = _param(0.03, "chance the buyer cancels before paying")
    dispute_p: float = _param(0.05, "chance a regular buyer disputes instead of confirming")
    refund_p: float = _param(0.5, "chance a dispute is resolved by refund (else release)")
    honest_p: float = _param(
        0.85, "share of honest sellers (the rest: slow, exit scammers, then fraudulent)"
    )
    slow_p: float = _param(0.10, "share of slow sellers (ship slow_factor times later)")
    exit_scam_p: float = _param(
        0.0, "share of exit-scam sellers: ship like honest ones, then stop for good"
    )
    exit_after_escrows: int = _param(
        3, "an exit scammer ships this many of its funded escrows first"
    )
    slow_factor: float = _param(10.0, "how many times later a slow seller ships")
    disputer_p: float = _param(
        0.05, "share of disputer buyers (dispute disputer_factor times as often)"
    )
    abandoner_p: float = _param(0.05, "share of abandoner buyers (open escrows, never pay)")
    disputer_factor: float = _param(6.0, "how many times as often a disputer disputes")
    payment_timeout_s: float = _param(900.0, "an unpaid escrow expires after this long")
    shipping_timeout_s: float = _param(
        1800.0, "a funded, unshipped escrow expires (buyer refunded) after this long"
    )
    confirmation_timeout_s: float = _param(
        1800.0, "a shipped, unconfirmed escrow is released to the seller after this long"
    )


@dataclass(frozen=True)
class MpesaParams:
    """``[mpesa]``: the simulated Daraja: callback delays, failures, duplicates, queries."""

    delay_min_s: float = _param(2.0, "shortest delay of a payment callback (uniform)")
    delay_max_s: float = _param(30.0, "longest delay of a payment callback (uniform)")
    failure_p: float = _param(0.1, "chance a payment fails (the callback says so)")
    duplicate_p: float = _param(0.05, "chance a callback is sent twice")
    query_delay_min_s: float = _param(
        0.2, "shortest answer time of the STK Push Query confirming each callback"
    )
    query_delay_max_s: float = _param(2.0, "longest answer time of that query (uniform)")
    query_unavailable_p: float = _param(
        0.05, "chance a query gets no answer (the verification pass asks again)"
    )
    verify_after_s: float = _param(
        60.0, "ask about a checkout whose callback has not come after this long"
    )
    verify_retry_s: float = _param(5.0, "first retry of an unanswered query (doubling after each)")


@dataclass(frozen=True)
class PhonesParams:
    """``[phones]``: app users holding SSE connections that keep dropping."""

    count: int = _param(40, "users with the app open, taken from the buyers")
    connection_mean_s: float = _param(180.0, "mean life of a connection (exponential)")
    reconnect_mean_s: float = _param(
        5.0, "mean wait before reconnecting; also the wait when no server is up"
    )
    poll_every_s: float = _param(
        1.0, "real time: how often a phone looks at its connection (wall seconds)"
    )
    lose_id_p: float = _param(
        0.02, "chance per reconnect that the app lost its Last-Event-ID (reinstalled)"
    )


@dataclass(frozen=True)
class ConsumersParams:
    """``[consumers]``: the consumer groups' workers, their crashes and the fan-out's windows."""

    poll_every_s: float = _param(
        2.0, "consumers' poll interval (heartbeats, recovery of dead consumers' entries, retries)"
    )
    wake_on_publish: bool = _param(
        True, "wake consumers when the relay publishes; false: poll only (bigger batches)"
    )
    batch_size: int = _param(100, "entries per read (XREADGROUP COUNT)")
    mtbf_s: float = _param(
        0.0, "mean time between crashes, per group, at a random crash point; 0: never"
    )
    restart: str = _param(
        "supervisor",
        "after a crash: supervisor (serve restarts it after its backoff, same consumer name)"
        " or replacement (another consumer after mttr_s claims its entries)",
    )
    mttr_s: float = _param(10.0, "restart = replacement: seconds until the replacement starts")
    dead_after_s: float = _param(
        5.0, "a consumer without a heartbeat this long is dead: its entries are claimed"
    )
    ack_before_effect: bool = _param(
        False, "a deliberately broken runtime that acks before the effect (for the checker)"
    )
    service_rate: float = _param(
        0.0, "> 0: one entry at a time, exponential service at this rate (M/M/1 studies)"
    )
    only: str = _param("", "comma-separated groups to run; empty: all")
    # A marker must outlive any redelivery of its event (a crashed consumer's
    # entries are claimed after dead_after_s, or re-read after the supervisor's
    # backoff), or the event is appended twice. Short enough that Redis reaches its
    # steady size early.
    dedupe_ttl_s: int = _param(600, "fan-out: life of a dedupe marker, in the simulation's seconds")
    user_maxlen: int = _param(1000, "fan-out: entries a user stream keeps")
    user_max_age_s: float = _param(
        300.0, "fan-out: age (simulation's seconds) a user stream keeps entries; 0: no limit"
    )

    @property
    def only_groups(self) -> list[str]:
        """The groups ``only`` names, in its order; empty: every group runs."""
        return [g.strip() for g in self.only.split(",") if g.strip()]


@dataclass(frozen=True)
class RelayParams:
    """``[relay]``: the outbox relay's pace and the aggregate streams' retention."""

    every_s: float = _param(0.5, "the relay publishes at least this often")
    retention_s: float = _param(
        300.0, "acked entries stay in the aggregate streams this long (simulation's seconds)"
    )
    wake_on_commit: bool = _param(
        True, "wake the relay on each commit; false: publish every every_s only"
    )


@dataclass(frozen=True)
class ServersParams:
    """``[servers]``: the SSE/API server processes and their kills."""

    count: int = _param(2, "SSE/API server processes; phones are spread over them")
    mtbf_s: float = _param(
        0.0, "mean time between SIGKILLs, per server (back after serve's backoff); 0: never"
    )


@dataclass(frozen=True)
class AnalyticsParams:
    """``[analytics]``: the optional risk-scoring group."""

    model: str = _param(
        "",
        "a trained risk model's directory (simulations.analytics.save): runs the analytics"
        " group, scoring sellers online; empty: no analytics group",
    )


@dataclass(frozen=True)
class RealtimeParams:
    """``[realtime]``: pacing of ``--realtime`` runs against the served runtime."""

    factor: float = _param(1.0, "--realtime: wall seconds per virtual second (0.5: twice as fast)")
    sse_ping_s: float = _param(1.0, "--realtime: SSE servers' heartbeat (wall seconds)")


@dataclass(frozen=True)
class RedisParams:
    """``[redis]``: the redis-server's durability setting and its kills."""

    restart_every_s: float = _param(
        0.0,
        "kill -9 Redis this often and restart it from its AOF after serve's backoff"
        " (a cluster: fail a master over); 0: never",
    )
    # What serve ships: everysec. A kill while a background fsync is pending
    # loses acknowledged writes; the relay's repair puts the lost entries back.
    appendfsync: str = _param("everysec", "redis-server's appendfsync: always, everysec or no")
    # The loss an everysec kill can cause, forced so that every kill has one.
    lose_last_writes: int = _param(
        0, "writes (commands or MULTI/EXEC) cut off the AOF at each kill"
    )
    partitions: int = _param(
        0, "the log in this many partitions (serve --partitions); 0: unpartitioned"
    )
    # Runs on a cluster are not bit-identical: what a replica had received when
    # its master was killed is wall-clock timing.
    cluster_masters: int = _param(
        0,
        "N >= 1: a local Redis Cluster of N masters with a replica each (needs partitions);"
        " 0: one redis-server",
    )
    # Forced like lose_last_writes on one server: an asynchronous replica's loss.
    failover_unreplicated_s: float = _param(
        0.0,
        "cluster: before each failover the replica is cut off this many seconds of load,"
        " so the kill loses what was written meanwhile",
    )


@dataclass(frozen=True)
class SupervisorParams:
    """``[supervisor]``: serve's restart policy (:class:`workbench.ops.supervision.RestartPolicy`,
    same defaults): back after ``initial_backoff_s``, doubling per crash in a row up to
    ``max_backoff_s``; more than ``max_restarts`` within ``window_s``: given up."""

    initial_backoff_s: float = _param(0.5, "a crashed process is back after this long")
    max_backoff_s: float = _param(30.0, "the backoff doubles per crash in a row up to this")
    stable_after_s: float = _param(30.0, "up this long: the next crash starts the backoff over")
    max_restarts: int = _param(5, "more restarts than this within window_s: given up")
    window_s: float = _param(60.0, "the window max_restarts counts in")


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

#: Values that must be greater than 0 (not only non-negative), and why:
#: ``(section, key)`` -> the reason, said with the error.
_POSITIVE: dict[tuple[str, str], str] = {
    ("run", "duration_s"): "a run without load time has nothing to check",
    ("run", "sample_every_s"): "the backlog sampler waits this long between samples",
    ("market", "arrival_rate"): "a run without arrivals has nothing to check",
    ("market", "day_s"): "the profile's hour is the time modulo a day",
    ("market", "buyers"): "every escrow has a buyer",
    ("market", "sellers"): "every escrow has a seller",
    ("market", "payment_timeout_s"): "an escrow must be able to wait for its payment",
    ("market", "shipping_timeout_s"): "a funded escrow must be able to wait for shipping",
    ("market", "confirmation_timeout_s"): "a shipped escrow must be able to wait",
    ("mpesa", "verify_retry_s"): "an unanswered query is asked again after it",
    ("phones", "connection_mean_s"): "a connection must last a while",
    ("phones", "reconnect_mean_s"): "a phone waits this long before it tries again",
    ("phones", "poll_every_s"): "a phone looks at its connection this often",
    ("consumers", "poll_every_s"): "consumers wait this long between polls",
    ("consumers", "batch_size"): "a read takes this many entries",
    ("consumers", "dead_after_s"): "a consumer this long without a heartbeat is dead",
    ("consumers", "dedupe_ttl_s"): "a dedupe marker lives this long",
    ("consumers", "user_maxlen"): "a user stream keeps this many entries",
    ("relay", "every_s"): "the relay waits this long between passes",
    ("servers", "count"): "phones connect to the servers",
    ("realtime", "factor"): "wall seconds per virtual second",
    ("realtime", "sse_ping_s"): "servers send a heartbeat this often",
    ("supervisor", "initial_backoff_s"): "serve's restart policy waits this long",
    ("supervisor", "stable_after_s"): "serve's restart policy needs it",
    ("supervisor", "window_s"): "serve's restart policy counts restarts in it",
}
#: Every key ending in this is a probability (or a share): between 0 and 1.
_PROBABILITY_SUFFIX = "_p"
#: Shares of one population: ``(section, keys, what the rest is)``; their sum <= 1.
_SHARES = (
    ("market", ("honest_p", "slow_p", "exit_scam_p"), "seller classes: the rest are fraudulent"),
    ("market", ("disputer_p", "abandoner_p"), "buyer classes: the rest are regular"),
)
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
#: Values with a lower bound above 0: ``(section, key)`` -> the smallest allowed.
_MINIMA: dict[tuple[str, str], float] = {
    ("market", "amount_min"): MIN_AMOUNT,  # what the service accepts
}
#: Values with an upper bound: ``(section, key)`` -> the largest allowed.
_MAXIMA: dict[tuple[str, str], float] = {
    ("market", "amount_max"): MAX_AMOUNT,
    # Populations and sizes the world is built from before the first event: a count
    # beyond these would spend minutes or all memory before any progress is shown.
    ("market", "buyers"): MAX_POPULATION,
    ("market", "sellers"): MAX_POPULATION,
    ("phones", "count"): MAX_POPULATION,
    ("servers", "count"): 1_000,
    ("consumers", "batch_size"): 100_000,
    ("consumers", "user_maxlen"): 10_000_000,
    ("redis", "partitions"): MAX_PARTITIONS,
    ("redis", "cluster_masters"): MAX_CLUSTER_MASTERS,
}
#: Bounds of one range: ``(section, lower key, upper key)``; lower <= upper.
_RANGES = (
    ("market", "amount_min", "amount_max"),
    ("mpesa", "delay_min_s", "delay_max_s"),
    ("mpesa", "query_delay_min_s", "query_delay_max_s"),
    ("supervisor", "initial_backoff_s", "max_backoff_s"),
)


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
    _check_together(scenario)
    _check_cluster(path.stem, scenario.redis)
    return scenario


def _check_together(scenario: Scenario) -> None:
    """The checks of keys taken together: ranges, shares of one population, and a
    load that makes arrivals (a profile of zeros makes none)."""
    name = scenario.name
    for section, low, high in _RANGES:
        params = getattr(scenario, section)
        if getattr(params, low) > getattr(params, high):
            raise ScenarioError(
                f"{name}: {section}.{low} ({getattr(params, low)}) must not be greater"
                f" than {section}.{high} ({getattr(params, high)})"
            )
    for section, keys, rest in _SHARES:
        params = getattr(scenario, section)
        if (total := sum(getattr(params, key) for key in keys)) > 1 + 1e-9:  # float sums
            named = " + ".join(f"{section}.{key}" for key in keys)
            raise ScenarioError(f"{name}: {named} must be at most 1, not {total:g} ({rest})")
    if scenario.market.profile and not max(scenario.market.profile) > 0:
        raise ScenarioError(
            f"{name}: market.profile is all zeros: no arrivals, so the run has nothing to check"
        )


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
    if not path.is_file():
        raise ScenarioError(f"{path}: not a scenario file (a directory?)")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{path}: not a TOML file (not UTF-8: {exc.reason})") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot be read: {exc.strerror}") from None


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
    _check_bounds(where, (section, key), checked)


def _check_bounds(where: str, key: tuple[str, str], value: Any) -> None:
    """A :class:`ScenarioError` if the number ``value`` is outside what ``key`` allows
    (:data:`_POSITIVE`, a probability, :data:`_MINIMA`, :data:`_MAXIMA`)."""
    shown = f"{value:g}" if isinstance(value, float) else repr(value)
    if key in _POSITIVE and not value > 0:
        raise ScenarioError(f"{where} must be greater than 0, not {shown}: {_POSITIVE[key]}")
    if key[1].endswith(_PROBABILITY_SUFFIX) and not 0 <= value <= 1:
        raise ScenarioError(f"{where} is a probability: it must be between 0 and 1, not {shown}")
    if key in _MINIMA and value < _MINIMA[key]:
        raise ScenarioError(f"{where} must be at least {_MINIMA[key]:g}, not {shown}")
    if key in _MAXIMA and value > _MAXIMA[key]:
        most = _MAXIMA[key]
        limit = str(most) if isinstance(most, int) else f"{most:g}"
        raise ScenarioError(f"{where} must be at most {limit}, not {shown}")


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


#: A fault schedule this likely to inject nothing in a run is worth a warning.
_LIKELY_NONE = 0.5


def warnings(scenario: Scenario) -> list[str]:
    """What in ``scenario`` asks for faults that cannot (or are unlikely to) fire within
    its load (``run.duration_s``), one sentence each; empty when nothing does.

    Faults are injected during the load only: Redis every ``redis.restart_every_s``
    (the first at that time, so none if it is not shorter than the load); consumers
    and servers at exponential times of mean ``mtbf_s``, each group or server on
    its own, so none at all with probability ``exp(-n * duration / mtbf)``.
    """
    run_s, found = scenario.run.duration_s, []
    redis = scenario.redis
    if redis.restart_every_s and redis.restart_every_s >= run_s:
        what = "no master fails over" if redis.cluster_masters else "Redis is never restarted"
        found.append(
            f"redis.restart_every_s ({redis.restart_every_s:g} s) is not shorter than"
            f" run.duration_s ({run_s:g} s): {what}"
        )
    if redis.lose_last_writes and not redis.restart_every_s:
        found.append("redis.lose_last_writes has no effect: redis.restart_every_s is 0 (no kills)")
    groups = len(_groups_of(scenario))
    for key, mtbf, n, what in (
        ("consumers.mtbf_s", scenario.consumers.mtbf_s, groups, _count(groups, "group")),
        ("servers.mtbf_s", scenario.servers.mtbf_s, scenario.servers.count,
         _count(scenario.servers.count, "server")),
    ):  # fmt: skip
        if mtbf and (none := math.exp(-n * run_s / mtbf)) > _LIKELY_NONE:
            found.append(
                f"{key} ({mtbf:g} s) is far beyond run.duration_s ({run_s:g} s): with {what},"
                f" the run injects no such fault with probability {none:.0%}"
            )
    return found


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _groups_of(scenario: Scenario) -> list[str]:
    """The consumer groups a run of ``scenario`` runs (as the drivers choose them)."""
    groups = [*ALL_GROUPS, *(["analytics"] if scenario.analytics.model else [])]
    only = scenario.consumers.only_groups
    return [g for g in groups if not only or g in only]


@dataclass(frozen=True)
class Setting:
    """One key of a scenario as ``workbench scenarios show`` lists it."""

    key: str  # section.key
    value: Any  # as plain data (lists, not tuples)
    default: Any
    meaning: str

    @property
    def differs(self) -> bool:
        return self.value != self.default


def settings(scenario: Scenario) -> list[Setting]:
    """Every key of ``scenario``, section by section: its value, default and meaning."""
    return [
        Setting(f"{name}.{f.name}", scenario.params[name][f.name], DEFAULTS[name][f.name],
                f.metadata.get("doc", ""))
        for name, cls in SECTIONS.items()
        for f in fields(cls)
    ]  # fmt: skip


def description(name: str) -> str:
    """What the scenario ``name`` is for: the first comment line of its file ("" if none)."""
    for line in _path_of(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


#: The defaults as plain data, section by section (what an empty scenario file gives).
DEFAULTS: dict[str, dict[str, Any]] = Scenario("defaults").params
