"""What one API process is configured with: :class:`Settings`, from ``WORKBENCH_*``.

Every ``uvicorn --workers N`` process builds the same app, so settings come
from the environment (:meth:`Settings.from_env`) and are checked there: a
malformed value stops the process at start with the variable's name, never
later at the first request that needs it. The callback key is never the
token secret itself (:meth:`Settings.payments` derives one when none is set).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Literal

from workbench.http import auth, edge
from workbench.http.health import DEFAULT_STALE_AFTER_S
from workbench.payments.daraja import DarajaConfig
from workbench.payments.mpesa import GatewayBehaviour
from workbench.service import CreateLimit, PaymentSettings
from workbench.store import database_url

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass
class Settings:
    """Everything the app needs; :meth:`from_env` reads ``WORKBENCH_*`` variables."""

    redis_url: str
    database_url: str
    secret: str
    prefix: str = "wb"
    partitions: int = 0  # of the log; 0: unpartitioned (workbench.streams.keys)
    mpesa: Literal["sim", "external"] = "sim"
    callback_url: str | None = None  # where the simulated gateway posts; None: in-process
    debug: bool = False  # enables /debug/* (tests drop sessions server-side)
    ping_s: float = 15.0
    retry_ms: int = 1000
    page_size: int = 500
    max_queue: int = 1000
    redis_pool: int = 16
    metrics_token: str | None = None  # when set, /metrics wants "Bearer <token>"
    create_limit: CreateLimit = field(default_factory=CreateLimit)
    limits: edge.EdgeLimits = field(default_factory=edge.EdgeLimits)
    supervision_file: str | None = None  # set by `serve` for the API processes it runs
    stale_after_s: float = DEFAULT_STALE_AFTER_S  # a heartbeat older than this: down
    gateway: GatewayBehaviour = field(
        default_factory=lambda: GatewayBehaviour(
            delay_min=1.0,
            delay_max=3.0,
            late_rate=0.0,
            query_delay_min=0.05,
            query_delay_max=0.3,
            query_unavailable_rate=0.05,
        )
    )
    callback_secret: str = ""  # "" = derived from ``secret``
    gateway_allow: tuple[Network, ...] = ()  # callback source addresses; () = any
    daraja: DarajaConfig | None = None
    verify_every_s: float = 1.0
    verify_after_s: float | None = None  # None: 5 s for the simulated gateway, 90 s for Daraja
    verify_retry_s: float = 5.0
    push_grace_s: float = 30.0

    def payments(self) -> PaymentSettings:
        # A dedicated key, or one derived from the token secret (never the secret itself).
        secret = (
            self.callback_secret
            or hmac.new(self.secret.encode(), b"mpesa-callback", hashlib.sha256).hexdigest()
        )
        verify_after = self.verify_after_s
        if verify_after is None:
            verify_after = self.gateway.delay_max + 2.0 if self.mpesa == "sim" else 90.0
        return PaymentSettings(
            callback_secret=secret,
            callback_base_url=self.callback_url or "http://localhost/mpesa/callback",
            push_grace_s=self.push_grace_s,
            verify_after_s=verify_after,
            retry_s=self.verify_retry_s,
        )

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        redis_url = env.get("REDIS_URL")
        if not redis_url:
            raise RuntimeError("REDIS_URL is not set (`workbench serve` sets it for you)")
        mpesa = env.get("WORKBENCH_MPESA", "sim")
        if mpesa not in ("sim", "external"):
            raise RuntimeError(f"WORKBENCH_MPESA must be 'sim' or 'external', not {mpesa!r}")
        return cls(
            redis_url=redis_url,
            database_url=env.get("DATABASE_URL") or database_url(),
            secret=auth.secret_from_env(env),
            prefix=env.get("WORKBENCH_PREFIX", "wb"),
            partitions=_partitions(env),
            mpesa=mpesa,  # type: ignore[arg-type]
            callback_url=env.get("WORKBENCH_CALLBACK_URL") or None,
            debug=env.get("WORKBENCH_DEBUG", "") in ("1", "true", "yes"),
            ping_s=float(env.get("WORKBENCH_SSE_PING_S", "15")),
            retry_ms=_milliseconds(env, "WORKBENCH_SSE_RETRY_MS", 1000),
            metrics_token=env.get("WORKBENCH_METRICS_TOKEN") or None,
            create_limit=CreateLimit.from_env(env),
            limits=edge.EdgeLimits.from_env(env),
            supervision_file=env.get("WORKBENCH_SUPERVISION_FILE") or None,
            stale_after_s=float(env.get("WORKBENCH_STALE_AFTER_S", DEFAULT_STALE_AFTER_S)),
            callback_secret=env.get("WORKBENCH_CALLBACK_SECRET", ""),
            gateway_allow=_networks(env.get("WORKBENCH_MPESA_ALLOW", "")),
            daraja=DarajaConfig.from_env(env),
            verify_after_s=_seconds(env, "WORKBENCH_MPESA_VERIFY_AFTER_S", None),
            verify_retry_s=_seconds(env, "WORKBENCH_MPESA_RETRY_S", 5.0) or 5.0,
            push_grace_s=_seconds(env, "WORKBENCH_MPESA_PUSH_GRACE_S", 30.0) or 30.0,
        )


def _partitions(env: dict[str, str]) -> int:
    from workbench.streams.partitions import MAX_PARTITIONS

    text = env.get("WORKBENCH_PARTITIONS", "") or "0"
    if not text.isdigit() or int(text) > MAX_PARTITIONS:
        raise RuntimeError(
            f"WORKBENCH_PARTITIONS must be a whole number from 0 (unpartitioned) to "
            f"{MAX_PARTITIONS}, not {text!r}"
        )
    return int(text)


def _networks(text: str) -> tuple[Network, ...]:
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise RuntimeError(
                f"WORKBENCH_MPESA_ALLOW: {part!r} is not an address or CIDR"
            ) from None
    return tuple(out)


def _seconds(env: dict[str, str], name: str, default: float | None) -> float | None:
    text = env.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a number of seconds, not {text!r}") from None
    if not 0 < value < 1e6:
        raise RuntimeError(f"{name} must be positive, not {value}")
    return value


def _milliseconds(env: dict[str, str], name: str, default: int) -> int:
    text = env.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        raise RuntimeError(f"{name} must be a whole number of milliseconds, not {text!r}") from None
    if value <= 0:
        raise RuntimeError(f"{name} must be positive, not {value}")
    return value
