"""Prometheus metrics of the pool's processes, one class per process kind.

Each object owns a registry of its own (never the process-global default), so any number of
gateways and workers can live in one process, as they do in tests and in ``listenerpool up``.
Label values come from small fixed sets (transport, state, reconnect reason, Redis operation);
no metric is labelled by session.

Hot paths count per batch: a worker adds a whole published batch at once and times it once; a
gateway bumps a pre-bound child counter per frame sent (one lock and one addition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from enum import StrEnum
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "GATEWAY_REDIS_OPERATIONS",
    "LISTENER_STATES",
    "WORKER_REDIS_OPERATIONS",
    "GatewayMetrics",
    "ReconnectReason",
    "Transport",
    "WorkerMetrics",
    "exposition",
]

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: States a running reader can be in; each gets a series (0 when none is in it).
LISTENER_STATES: Final = ("connecting", "listening", "backoff")
#: The ``operation`` label values of ``listenerpool_redis_errors``.
WORKER_REDIS_OPERATIONS: Final = ("adopt", "control", "dequeue", "reader", "reconcile", "renew")
GATEWAY_REDIS_OPERATIONS: Final = ("api", "pubsub")
# Publish latency runs from sub-millisecond to Redis stalls of seconds.
_LATENCY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class ReconnectReason(StrEnum):
    """Why a reader left its upstream connection and backs off before the next one."""

    IDLE_TIMEOUT = "idle_timeout"  # no bytes, heartbeats included, for LP_IDLE_TIMEOUT
    HTTP_STATUS = "http_status"  # 5xx, 408, 429
    CONNECT_ERROR = "connect_error"  # refused, reset, DNS, connect timeout, TLS
    PROTOCOL_ERROR = "protocol_error"  # not an event stream, oversized event, broken HTTP
    # (a chunked body cut short included)
    EOF = "eof"  # the upstream closed the stream
    REDIS_ERROR = "redis_error"  # Redis unreachable while reading or publishing
    # The lease's renewal not confirmed in time (a frozen or cut-off worker): no connection
    # is opened until one is, and the worker fences the reader meanwhile.
    LEASE_UNCONFIRMED = "lease_unconfirmed"


class Transport(StrEnum):
    WS = "ws"
    SSE = "sse"


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in the Prometheus text format (served with :data:`CONTENT_TYPE`)."""
    return generate_latest(registry)


class _ListenerStates(Collector):
    """``listenerpool_listeners{state}`` read at scrape time from the worker's readers."""

    def __init__(self, count: Callable[[], Mapping[str, int]]) -> None:
        self._count = count

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "listenerpool_listeners", "Readers held by this worker, by state.", labels=["state"]
        )
        counts = self._count()
        for state in LISTENER_STATES:
            family.add_metric([state], counts.get(state, 0))
        yield family


class WorkerMetrics:
    """Metrics of one worker. ``watch_listeners`` is called once by the worker it serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_published = Counter(
            "listenerpool_events_published",
            "Upstream events published (written to the history stream and the live channel).",
            registry=r,
        )
        self.publish_latency = Histogram(
            "listenerpool_publish_latency_seconds",
            "From upstream bytes received to the publish script's reply, per published batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.lease_renew_failures = Counter(
            "listenerpool_lease_renew_failures",
            "Lease renewal rounds that failed (Redis unreachable or too slow).",
            registry=r,
        )
        self.self_fences = Counter(
            "listenerpool_self_fences",
            "Readers stopped because no lease renewal was confirmed in time.",
            registry=r,
        )
        self.admission_holds = Counter(
            "listenerpool_admission_holds",
            "Times this worker stopped taking new sessions because a lease renewal round was "
            "still under way after a whole renewal interval.",
            registry=r,
        )
        self.failovers = Counter(
            "listenerpool_failovers",
            "Sessions this worker's reconciler re-claimed after their lease had lapsed.",
            registry=r,
        )
        self.upstream_reconnects = Counter(
            "listenerpool_upstream_reconnects",
            "Upstream connections left for a backoff and a new attempt, by reason.",
            labelnames=["reason"],
            registry=r,
        )
        self.reconnects = {
            reason: self.upstream_reconnects.labels(reason.value) for reason in ReconnectReason
        }
        self.backoff_seconds = Counter(
            "listenerpool_backoff_seconds",
            "Seconds of backoff delay chosen before reconnecting to upstreams.",
            registry=r,
        )
        self.redis_errors = Counter(
            "listenerpool_redis_errors",
            "Redis calls that failed, by operation.",
            labelnames=["operation"],
            registry=r,
        )
        self.redis_error = {op: self.redis_errors.labels(op) for op in WORKER_REDIS_OPERATIONS}

    def watch_listeners(self, count: Callable[[], Mapping[str, int]]) -> None:
        """Report ``count()`` (readers by state) as ``listenerpool_listeners`` at each scrape.
        ``count`` runs on the scraping thread, so it must only copy and count."""
        self.registry.register(_ListenerStates(count))


class GatewayMetrics:
    """Metrics of one gateway app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_delivered = Counter(
            "listenerpool_events_delivered",
            "Events sent to clients, by transport.",
            labelnames=["transport"],
            registry=r,
        )
        self.delivered = {t: self.events_delivered.labels(t.value) for t in Transport}
        self.clients_connected = Gauge(
            "listenerpool_clients_connected",
            "Clients following a session on this gateway, by transport.",
            labelnames=["transport"],
            registry=r,
        )
        self.clients = {t: self.clients_connected.labels(t.value) for t in Transport}
        self.slow_client_disconnects = Counter(
            "listenerpool_slow_client_disconnects",
            "Clients disconnected because their queue filled up, by transport.",
            labelnames=["transport"],
            registry=r,
        )
        self.slow_disconnects = {t: self.slow_client_disconnects.labels(t.value) for t in Transport}
        self.pubsub_resubscribes = Counter(
            "listenerpool_pubsub_resubscribes",
            "Times the pub/sub connection was re-established with sessions followed.",
            registry=r,
        )
        self.redis_errors = Counter(
            "listenerpool_redis_errors",
            "Redis calls that failed, by operation.",
            labelnames=["operation"],
            registry=r,
        )
        self.redis_error = {op: self.redis_errors.labels(op) for op in GATEWAY_REDIS_OPERATIONS}
