"""What ``/healthz`` says about each component, and why.

:func:`assess` is pure: given whether Redis answered, the heartbeats read from
Redis and (under ``workbench serve``) the supervisor's state file, it names
every component that is down. The rules:

* **redis** is down when it does not answer PING, or when serve supervises it
  and has not (yet) restarted it.
* A component **serve supervises** (its name is in the state file) is up only
  when the supervisor has it running *and* it beat since the supervisor
  (re)started it (``started_at``, wall time like the beats), within
  ``stale_after_s`` — so a killed worker is down from the moment serve sees
  it exit until its replacement has beaten (whatever its consumer name). API processes do not
  beat: they are up while the supervisor has them running.
* A component **not supervised here** (``--api-only``: another serve or an
  operator runs it) is reported from its heartbeats if any exist (``up`` is
  whether the freshest beat is recent), but does not make this server
  unhealthy: it cannot know whether that component is meant to run.
* While Redis is down the heartbeats cannot be read: supervised components are
  then judged by the supervisor alone.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from workbench.handlers import ALL_GROUPS
from workbench.ops.supervision import describe_exit

#: Components that beat in ``<prefix>:heartbeats:<name>`` (field ``<name>-<pid>``).
BEATING: tuple[str, ...] = ("relay", "timers", *ALL_GROUPS)
#: A beat older than this means the process is stuck or gone.
DEFAULT_STALE_AFTER_S = 5.0


def read_supervision(path: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """The supervisor's state file (``None`` when there is none or it is unreadable)."""
    if not path:
        return None
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(Path(path).read_text())
        if isinstance(state, dict) and isinstance(state.get("components"), dict):
            return state
    return None


def assess(
    *,
    now: float,
    redis_ok: bool,
    heartbeats: dict[str, dict[str, float]] | None,
    supervised: dict[str, dict[str, Any]] | None,
    stale_after_s: float = DEFAULT_STALE_AFTER_S,
) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``(names of components down, per-component detail)``.

    ``heartbeats`` maps a component to ``{process name: time of last beat}``
    (``None``: Redis could not be read). ``supervised`` is the state file's
    ``components`` (``None``: nothing is supervised by this server's serve).
    """
    supervised = supervised or {}
    down: list[str] = []
    report: dict[str, dict[str, Any]] = {}

    def verdict(name: str, up: bool | None, detail: str, **extra: Any) -> None:
        entry: dict[str, Any] = {"up": up, "detail": detail, **extra}
        if name in supervised:
            entry["supervised"] = True
            entry["restarts"] = supervised[name].get("restarts", 0)
            entry["state"] = supervised[name].get("state")
            entry["pid"] = supervised[name].get("pid")
        report[name] = entry
        if up is False and (name in supervised or name == "redis"):
            down.append(name)

    redis_up = redis_ok
    redis_detail = "answers PING"
    sup = supervised.get("redis")
    if sup is not None and sup.get("state") != "running":
        redis_up, redis_detail = False, _not_running(str(sup.get("state")), sup)
    elif not redis_ok:
        why = "not supervised here" if sup is None else "serve has it running"
        redis_detail = f"does not answer PING ({why})"
    verdict("redis", redis_up, redis_detail)
    names = [*BEATING, *(n for n in supervised if n not in BEATING and n != "redis")]
    for name in names:
        state = supervised.get(name)
        beats = None if heartbeats is None else heartbeats.get(name, {})
        if state is not None and state.get("state") != "running":
            verdict(name, False, _not_running(str(state.get("state")), state))
        elif name not in BEATING:  # an API process: no heartbeat, the supervisor knows
            if state is not None:
                verdict(name, True, "running")
        elif beats is None:
            if state is not None:
                verdict(name, None, "unknown: Redis down, heartbeats unreadable")
        elif state is not None:
            since = float(state.get("started_at") or 0.0)
            mine = [t for t in beats.values() if t >= since]  # beats of the current process
            if not mine:
                verdict(name, False, f"starting: no heartbeat yet from pid {state.get('pid')}")
            else:
                age = max(0.0, now - max(mine))
                fresh = age <= stale_after_s
                verdict(name, fresh, "beating" if fresh else f"no heartbeat for {age:.1f} s",
                        heartbeat_age_s=round(age, 3))  # fmt: skip
        elif beats:
            age = max(0.0, now - max(beats.values()))
            fresh = age <= stale_after_s
            said = "beating" if fresh else f"no heartbeat for {age:.1f} s"
            verdict(name, fresh, f"{said} (not supervised here)", heartbeat_age_s=round(age, 3))
    return down, report


def _not_running(state: str, detail: dict[str, Any]) -> str:
    if state == "running":
        return "running"
    last = detail.get("last_exit")
    exited = f"exited ({describe_exit(last)})" if "last_exit" in detail else "exited"
    if state == "backoff":
        return f"{exited}, restarting"
    if state == "failed":
        return f"{exited}, crash loop: serve gave up on it"
    return f"{state}"
