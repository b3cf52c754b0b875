"""``/metrics``: Prometheus text, built at scrape time.

M-Pesa callbacks (``workbench_mpesa_callbacks_total{outcome}``: applied,
unverified, contradicted, duplicate, rejected_<reason>), verification queries
and pushes are counted per process, like the session figures.

Stream figures are read from Redis on each scrape (they are shared by all
server processes); session figures are this process's own, so a scraper
should scrape every process (label them by instance).

With ``WORKBENCH_METRICS_TOKEN`` set, a scrape must carry
``Authorization: Bearer <that token>`` (:func:`scrape_allowed`); user tokens
do not open it. Unset, ``/metrics`` is open, as before.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any, Protocol

import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from workbench.domain.clock import Clock, now_ms
from workbench.domain.events import AGGREGATE_TYPES
from workbench.handlers import ALL_GROUPS
from workbench.http.health import read_supervision
from workbench.streams.connection import REDIS_DOWN, refused
from workbench.streams.groups import dead_letter_count, group_ages
from workbench.streams.replies import text

if TYPE_CHECKING:
    from workbench.delivery.hub import Hub
    from workbench.delivery.live import LiveReader
    from workbench.delivery.sessions import SessionStats
    from workbench.service import EscrowService
    from workbench.streams.keys import StreamNames


class _SupervisionSettings(Protocol):
    @property
    def supervision_file(self) -> str | None: ...


class MetricsSource(Protocol):
    """What a scrape reads from the app (:class:`workbench.http.state.App` is one).

    Read-only: a scrape never changes what it reads. Typed as a protocol so
    this module need not import the app that serves it.
    """

    @property
    def redis(self) -> redis.Redis: ...  # sync client: scrapes run in a thread
    @property
    def names(self) -> StreamNames: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def settings(self) -> _SupervisionSettings: ...
    @property
    def stats(self) -> SessionStats: ...
    @property
    def hub(self) -> Hub: ...
    @property
    def live(self) -> LiveReader: ...
    @property
    def service(self) -> EscrowService: ...  # its payment_stats
    @property
    def callbacks_posted(self) -> int: ...


class _Collector:
    def __init__(self, app: MetricsSource) -> None:
        self.app = app

    def collect(self) -> Any:
        app = self.app
        yield from _stream_metrics(app.redis, app.names, app.clock)
        yield from _supervision_metrics(app.settings.supervision_file)
        stats = app.stats
        sessions = GaugeMetricFamily("workbench_sse_sessions", "SSE sessions held now")
        sessions.add_metric([], app.hub.subscriptions())
        yield sessions
        for name, value, help_ in (
            ("sse_sessions_opened", stats.opened, "SSE sessions opened"),
            ("sse_replays", stats.resumed, "sessions that resumed from a Last-Event-ID"),
            ("sse_replayed_entries", stats.replayed_entries, "entries sent from the stream"),
            ("sse_live_sent", stats.live_sent, "entries sent from the live feed"),
            (
                "sse_live_written_at_once",
                stats.live_written_at_once,
                "live entries written by the live reader itself, not through a session's queue",
            ),
            ("sse_catch_ups", stats.catch_ups, "live gaps closed by reading the stream"),
            ("sse_resets", stats.resets, "sessions told their history is gone"),
            ("hub_slow_disconnects", app.hub.dropped_slow, "subscribers dropped as too slow"),
            (
                "hub_stalled_disconnects",
                app.hub.dropped_stalled,
                "subscribers dropped for not reading a whole heartbeat interval",
            ),
            ("live_messages", app.live.messages, "messages read by the live reader"),
            ("live_reconnects", app.live.reconnects, "live reader resubscriptions"),
            ("mpesa_sim_callbacks", app.callbacks_posted, "simulated callbacks delivered"),
        ):
            counter = CounterMetricFamily(f"workbench_{name}", help_)
            counter.add_metric([], value)
            yield counter
        payments = app.service.payment_stats
        for name, counts, help_ in (
            ("mpesa_callbacks", payments.callbacks, "M-Pesa callbacks by outcome"),
            ("mpesa_verifications", payments.verifications, "STK Push Queries by outcome"),
            ("mpesa_pushes", payments.pushes, "STK pushes by outcome"),
        ):
            counter = CounterMetricFamily(f"workbench_{name}", help_, labels=["outcome"])
            for outcome, value in sorted(counts.items()):
                counter.add_metric([outcome], value)
            yield counter


def _supervision_metrics(path: str | None) -> Any:
    """Restarts per supervised process, from serve's state file (readable with Redis down)."""
    state = read_supervision(path)
    if state is None:
        return
    restarts = CounterMetricFamily(
        "workbench_component_restarts", "restarts by serve's supervisor", labels=["component"]
    )
    running = GaugeMetricFamily(
        "workbench_component_running", "1 while serve has the process running", labels=["component"]
    )
    for name, child in sorted(state["components"].items()):
        restarts.add_metric([name], int(child.get("restarts", 0)))
        running.add_metric([name], 1 if child.get("state") == "running" else 0)
    yield restarts
    yield running


def _stream_metrics(client: redis.Redis, names: StreamNames, clock: Clock) -> Any:
    length = GaugeMetricFamily(
        "workbench_stream_length", "entries in the stream", labels=["stream"]
    )
    pending = GaugeMetricFamily(
        "workbench_group_pending", "delivered, not yet acked", labels=["stream", "group"]
    )
    lag = GaugeMetricFamily(
        "workbench_group_lag", "entries not yet delivered (Redis 7)", labels=["stream", "group"]
    )
    lag_s = GaugeMetricFamily(
        "workbench_group_lag_seconds",
        "age of the oldest entry not yet delivered to the group (0: none)",
        labels=["stream", "group"],
    )
    pending_age = GaugeMetricFamily(
        "workbench_group_oldest_pending_age_seconds",
        "age of the oldest delivered, unacked entry (0: none)",
        labels=["stream", "group"],
    )
    dead = GaugeMetricFamily("workbench_dead_letters", "dead-lettered entries", labels=["group"])
    up = GaugeMetricFamily("workbench_redis_up", "1 if Redis answered this scrape")
    try:
        for stream in names.streams(AGGREGATE_TYPES):  # every partition's
            length.add_metric([stream], client.xlen(stream))
            try:
                groups = client.xinfo_groups(stream)
            except redis.ResponseError:
                groups = []
            ages = group_ages(client, stream, groups, now_ms(clock))
            for g in groups:
                group = text(g["name"])
                pending.add_metric([stream, group], int(g["pending"]))
                if g.get("lag") is not None:
                    lag.add_metric([stream, group], int(g["lag"]))
                oldest, behind = ages[group]
                lag_s.add_metric([stream, group], behind)
                pending_age.add_metric([stream, group], oldest or 0.0)
        for group in ALL_GROUPS:
            dead.add_metric([group], dead_letter_count(client, names, group))
        up.add_metric([], 1)
    except Exception as exc:
        # A cluster failing over (CLUSTERDOWN) is down too, and so is a Redis refusing
        # (BUSY): not a failed scrape.
        if not (isinstance(exc, REDIS_DOWN) or refused(exc)):
            raise
        up.add_metric([], 0)
    yield from (length, pending, lag, lag_s, pending_age, dead, up)


def metrics_text(app: MetricsSource) -> bytes:
    """The Prometheus exposition of ``app``'s figures, read now."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(app))  # type: ignore[arg-type]
    return generate_latest(registry)


def scrape_allowed(authorization: str | None, token: str | None) -> bool:
    """Whether a scrape with this ``Authorization`` header may read ``/metrics``."""
    if not token:
        return True
    if authorization is None:
        return False
    scheme, _, presented = authorization.partition(" ")
    # Constant time, so the token cannot be guessed byte by byte from timings.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), token.encode()
    )
