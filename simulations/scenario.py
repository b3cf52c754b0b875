"""Scenarios: TOML files of parameters, with defaults and ``--set`` overrides.

A scenario file only lists what differs from the defaults below; every key it
names must exist, so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCENARIO_DIR = Path(__file__).parent / "scenarios"

DEFAULTS: dict[str, dict[str, Any]] = {
    "run": {
        "duration_s": 600.0,  # virtual seconds of load
        "drain_s": 300.0,  # faults healed, no new escrows: everything should settle
        "sample_every_s": 5.0,
        "epoch": 1_800_000_000.0,  # the virtual clock's start (Unix seconds)
    },
    "market": {
        "arrival_rate": 1.0,  # new escrows per second (Poisson)
        "lifecycle": True,  # false: an arrival only opens an escrow (queueing studies)
        "profile": [],  # 24 hourly multipliers of arrival_rate (time of day); []: flat
        "day_s": 86400.0,  # length of a "day" for the profile (shorter days for short runs)
        "buyers": 200,
        "sellers": 40,
        "amount_min": 200,
        "amount_max": 20_000,
        "fund_delay_mean_s": 20.0,
        "ship_delay_mean_s": 60.0,
        "confirm_delay_mean_s": 60.0,
        "cancel_p": 0.03,
        "dispute_p": 0.05,
        "refund_p": 0.5,  # of disputes resolved by refund
        "honest_p": 0.85,  # seller classes: honest, slow (ships late), fraudulent (never)
        "slow_p": 0.10,
        "slow_factor": 10.0,
        "disputer_p": 0.05,  # buyer classes: regular, disputer (disputes often), abandoner
        "abandoner_p": 0.05,  # (opens escrows and never pays)
        "disputer_factor": 6.0,
        "payment_timeout_s": 900.0,
        "shipping_timeout_s": 1800.0,
        "confirmation_timeout_s": 1800.0,
    },
    "mpesa": {
        "delay_min_s": 2.0,
        "delay_max_s": 30.0,
        "failure_p": 0.1,
        "duplicate_p": 0.05,
        # STK Push Query: every callback is confirmed with one before it is recorded.
        "query_delay_min_s": 0.2,
        "query_delay_max_s": 2.0,
        "query_unavailable_p": 0.05,  # then asked again by the verification pass
        "verify_after_s": 60.0,  # ask about a checkout whose callback has not come
        "verify_retry_s": 5.0,
    },
    "phones": {
        "count": 40,  # users with the app open, taken from the buyers
        "connection_mean_s": 180.0,  # "drops every few minutes"
        "reconnect_mean_s": 5.0,
        "poll_every_s": 1.0,  # real time: how often a phone looks at its connection
        "lose_id_p": 0.02,  # per reconnect: the app was reinstalled
    },
    "consumers": {
        # Consumers wake when the relay publishes; this poll is for heartbeats,
        # recovery of dead consumers' entries and retries.
        "poll_every_s": 2.0,
        "wake_on_publish": True,  # false: poll every poll_every_s only (bigger batches)
        "batch_size": 100,
        "mtbf_s": 0.0,  # per group; 0: never crash
        # "supervisor": serve restarts the crashed worker after its backoff (the
        # supervisor section), same consumer name; "replacement": another consumer
        # starts after mttr_s and claims the dead one's entries (a lost machine).
        "restart": "supervisor",
        "mttr_s": 10.0,  # restart = "replacement" only
        "dead_after_s": 5.0,
        "ack_before_effect": False,  # a deliberately broken runtime, for the checker
        "service_rate": 0.0,  # > 0: one entry at a time, exponential service (M/M/1 studies)
        "only": "",  # comma-separated groups to run; "": all
        # The fan-out: dedupe markers and user-stream history, in seconds of the
        # simulation's clock (entry ids are simulation time). A marker must outlive
        # any redelivery of its event (a crashed consumer's entries are claimed after
        # dead_after_s, or re-read after the supervisor's backoff), or the event is
        # appended twice. Short enough that Redis reaches its steady size early.
        "dedupe_ttl_s": 600,
        "user_maxlen": 1000,
        "user_max_age_s": 300.0,
    },
    "relay": {
        "every_s": 0.5,
        # Acked entries stay in the aggregate streams this long, in seconds of the
        # simulation's clock (entry ids are simulation time); then trimmed.
        "retention_s": 300.0,
        "wake_on_commit": True,  # false: publish every every_s only (bigger batches)
    },
    "servers": {
        "count": 2,  # SSE/API server processes; phones are spread over them
        "mtbf_s": 0.0,  # per server: SIGKILL with all its sessions; 0: never
        # back after serve's backoff (the supervisor section)
    },
    "analytics": {
        # A trained risk model's directory (workbench.analytics.save): runs the
        # "analytics" group, scoring sellers online; "": no analytics group.
        "model": "",
    },
    "realtime": {
        "factor": 1.0,  # --realtime: wall seconds per virtual second (0.5: twice as fast)
        "sse_ping_s": 1.0,  # server heartbeats (wall seconds)
    },
    "redis": {
        # kill -9 + restart from the AOF, after serve's backoff (the supervisor
        # section); 0: never
        "restart_every_s": 0.0,
        # What serve ships: everysec. A kill while a background fsync is pending
        # loses acknowledged writes; the relay's repair puts the lost entries back.
        "appendfsync": "everysec",
        # Writes (commands, or scripts' MULTI/EXEC) cut off the AOF at each kill:
        # the loss an everysec kill can cause, forced so that every kill has one.
        "lose_last_writes": 0,
    },
    "supervisor": {
        # serve's restart policy (workbench.ops.supervision.RestartPolicy, same defaults):
        # back after initial_backoff_s, doubling per crash in a row up to
        # max_backoff_s; more than max_restarts within window_s: given up.
        "initial_backoff_s": 0.5,
        "max_backoff_s": 30.0,
        "stable_after_s": 30.0,
        "max_restarts": 5,
        "window_s": 60.0,
    },
}


class ScenarioError(ValueError):
    """A scenario name, file or override is wrong; the message says what exists."""


@dataclass(frozen=True)
class Scenario:
    name: str
    params: dict[str, dict[str, Any]]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.params[section]


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def load(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Scenario:
    """A scenario by name (``simulations/scenarios/NAME.toml``) or path, with overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; available: {', '.join(available())}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    params = copy.deepcopy(DEFAULTS)
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ScenarioError(f"{path}: top-level key {section!r} must be a [section]")
        for key, value in values.items():
            _assign(params, section, key, value, source=str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ScenarioError(f"--set takes section.key=value, not {item!r}")
        section, _, name = key.partition(".")
        _assign(params, section, name, _parse(raw), source="--set")
    for section, key in (("servers", "count"), ("realtime", "factor")):
        if not params[section][key] > 0:
            raise ScenarioError(f"{path.stem}: {section}.{key} must be greater than 0")
    return Scenario(path.stem, params)


def _parse(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # a bare string


def _assign(
    params: dict[str, dict[str, Any]], section: str, key: str, value: Any, source: str
) -> None:
    if section not in params:
        raise ScenarioError(f"{source}: unknown section {section!r}; sections: {', '.join(params)}")
    if key not in params[section]:
        raise ScenarioError(
            f"{source}: unknown key {section}.{key}; keys of [{section}]: "
            f"{', '.join(params[section])}"
        )
    default = params[section][key]
    if isinstance(default, list):
        if not isinstance(value, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in value
        ):
            raise ScenarioError(f"{source}: {section}.{key} must be a list of numbers >= 0")
        if key == "profile" and value and len(value) != 24:
            raise ScenarioError(
                f"{source}: {section}.profile needs 24 hourly values, not {len(value)}"
            )
        value = [float(v) for v in value]
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"{source}: {section}.{key} must be true or false, not {value!r}")
    elif isinstance(default, int | float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{source}: {section}.{key} must be a number, not {value!r}")
        if value < 0:
            raise ScenarioError(f"{source}: {section}.{key} must not be negative")
        value = type(default)(value) if isinstance(default, float) else value
    params[section][key] = value
