"""Every Prometheus metric of a relay, in one explicit registry, and the one recorder.

Delivery outcomes are counted in one place: :meth:`Metrics.recorded`, called with each
:class:`~relay.plan.RecordPlan` once its transaction has committed (first pass, retry pass
and webhook lanes alike). What was sent but not recorded (the relay died, the database was
lost) is therefore never counted, and a message counts once per route however it got there.

Gauges that describe the database (pending messages and their age, dead letters, unowned
buckets, live relays) are not read per scrape: :mod:`relay.health` refreshes them every few
seconds from indexed queries, so any number of scrapers costs the database nothing more.
Several relays export the same values for those; dashboards take ``max by (...)``.

Each metric is declared once, as a :class:`MetricSpec` in :data:`METRICS`: the recorder
builds its collectors from that table and ``python -m relay.docgen`` writes
``docs/metrics.md`` from it.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import __version__
from .plan import NO_ROUTE, NOT_ATTEMPTED, Dead, Pending, RecordPlan
from .sinks.base import Delivered

# Message creation to acknowledgement: milliseconds when all is well, hours when an endpoint
# was down and the backoff schedule ran (up to its 10 h cap, and retries after that).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0, 6 * 3600.0, 24 * 3600.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000)
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Pass = str  # "first", "retry" (the claim loop) or "lane" (a webhook route's own loop)
Kind = Literal["counter", "gauge", "histogram"]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric: what Prometheus shows of it, and whether CONTRACT section 7 names it."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    contract: bool = False


PENDING = MetricSpec(
    "outbox_pending_messages",
    "gauge",
    "Committed outbox messages not yet delivered to every route",
    ("topic",),
    contract=True,
)
OLDEST_AGE = MetricSpec(
    "outbox_oldest_pending_age_seconds",
    "gauge",
    "Age of the oldest pending message of the topic (the delivery lag); 0 when none",
    ("topic",),
    contract=True,
)
DELIVERED = MetricSpec(
    "outbox_delivered_total",
    "counter",
    "Deliveries acknowledged by the sink and recorded, per outbox topic and route",
    ("topic", "route"),
    contract=True,
)
FAILURES = MetricSpec(
    "outbox_delivery_failures_total",
    "counter",
    "Failed delivery attempts (each retried or dead-lettered attempt, and messages "
    "whose topic matches no route, as route 'no-route')",
    ("topic", "route"),
    contract=True,
)
DEAD_LETTERS = MetricSpec(
    "outbox_dead_letters",
    "gauge",
    "Messages currently dead-lettered (not discarded), per topic and route",
    ("topic", "route"),
    contract=True,
)
LATENCY = MetricSpec(
    "outbox_delivery_latency_seconds",
    "histogram",
    "Message creation (publish) to sink acknowledgement",
    ("route",),
    buckets=LATENCY_BUCKETS,
    contract=True,
)
INFO = MetricSpec(
    "outbox_relay_info", "gauge", "This relay process (always 1)", ("relay_id", "version", "schema")
)
ERRORS = MetricSpec(
    "outbox_delivery_errors_total",
    "counter",
    "Failed delivery attempts by route, sink kind and reason (HTTP status, timeout, "
    "Kafka error name, ...)",
    ("route", "sink", "reason"),
)
BATCH_SIZE = MetricSpec(
    "outbox_batch_size",
    "histogram",
    "Messages claimed per batch (first pass, retry pass, webhook lane)",
    ("pass",),
    buckets=BATCH_BUCKETS,
)
CLAIM_SECONDS = MetricSpec(
    "outbox_claim_duration_seconds",
    "histogram",
    "Time to claim a batch",
    ("pass",),
    buckets=DURATION_BUCKETS,
)
RECORD_SECONDS = MetricSpec(
    "outbox_record_duration_seconds",
    "histogram",
    "Time to record a batch's outcomes and commit",
    ("pass",),
    buckets=DURATION_BUCKETS,
)
BUCKETS_HELD = MetricSpec("outbox_buckets_held", "gauge", "Key buckets (of 256) this relay holds")
BUCKETS_UNOWNED = MetricSpec(
    "outbox_buckets_unowned",
    "gauge",
    "Key buckets without a live holder (their keys wait for a takeover)",
)
RELAYS_LIVE = MetricSpec("outbox_relays_live", "gauge", "Relays with a live lease in the database")
ROUTE_DISABLED = MetricSpec(
    "outbox_route_disabled",
    "gauge",
    "1 while the route is disabled (HTTP 410 or an operator)",
    ("route",),
)
ROUTE_PAUSED = MetricSpec(
    "outbox_route_paused",
    "gauge",
    "1 while the route waits out an unreachable sink (broker down, endpoint refusing)",
    ("route",),
)
LANE_FAILURES = MetricSpec(
    "outbox_lane_failures_total",
    "counter",
    "Unexpected errors in a webhook route's lane, each logged with its cause: in one "
    "message's attempt (retried like any failure) or in the lane itself (restarted)",
    ("route", "where"),
)
DATABASE_UP = MetricSpec("outbox_database_up", "gauge", "1 when the last database check succeeded")
READY = MetricSpec(
    "outbox_ready", "gauge", "1 when /readyz answers 200 (database and sinks reachable)"
)
REFRESHED = MetricSpec(
    "outbox_gauges_refreshed_timestamp_seconds",
    "gauge",
    "When the database-derived gauges were last refreshed (unix time)",
)

METRICS: tuple[MetricSpec, ...] = (
    PENDING, OLDEST_AGE, DELIVERED, FAILURES, DEAD_LETTERS, LATENCY,
    INFO, ERRORS, BATCH_SIZE, CLAIM_SECONDS, RECORD_SECONDS,
    BUCKETS_HELD, BUCKETS_UNOWNED, RELAYS_LIVE, ROUTE_DISABLED, ROUTE_PAUSED, LANE_FAILURES,
    DATABASE_UP, READY, REFRESHED,
)  # fmt: skip


def _gauge(spec: MetricSpec, registry: CollectorRegistry) -> Gauge:
    return Gauge(spec.name, spec.help, spec.labels, registry=registry)


def _counter(spec: MetricSpec, registry: CollectorRegistry) -> Counter:
    return Counter(spec.name, spec.help, spec.labels, registry=registry)


def _histogram(spec: MetricSpec, registry: CollectorRegistry) -> Histogram:
    return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets, registry=registry)


def observe_all(histogram: Any, amounts: list[float]) -> None:
    """``histogram.observe(a)`` for every ``a`` of ``amounts`` (a labelled child), with each
    bucket counted once: a record of 1,000 deliveries would otherwise take 1,000 locked
    updates of the sum and of a bucket. Falls back to one observe() per amount should
    prometheus_client's histogram ever lay out its buckets differently."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for amount in amounts:
            histogram.observe(amount)
        return
    # observe() counts an amount in the first bucket whose upper bound is >= it (+Inf last).
    for index, n in Tally(bisect_left(bounds, amount) for amount in amounts).items():
        buckets[index].inc(n)
    total.inc(sum(amounts))


class Metrics:
    """The relay's metrics; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, relay_id: str, schema: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # CONTRACT section 7.
        self.pending = _gauge(PENDING, registry)
        self.oldest_age = _gauge(OLDEST_AGE, registry)
        self.delivered = _counter(DELIVERED, registry)
        self.failures = _counter(FAILURES, registry)
        self.dead_letters = _gauge(DEAD_LETTERS, registry)
        self.latency = _histogram(LATENCY, registry)
        # The relay's own workings.
        self.info = _gauge(INFO, registry)
        self.info.labels(relay_id, __version__, schema).set(1)
        self.errors = _counter(ERRORS, registry)
        self.batch_size = _histogram(BATCH_SIZE, registry)
        self.claim_seconds = _histogram(CLAIM_SECONDS, registry)
        self.record_seconds = _histogram(RECORD_SECONDS, registry)
        self.buckets_held = _gauge(BUCKETS_HELD, registry)
        self.buckets_unowned = _gauge(BUCKETS_UNOWNED, registry)
        self.relays_live = _gauge(RELAYS_LIVE, registry)
        self.route_disabled = _gauge(ROUTE_DISABLED, registry)
        self.route_paused = _gauge(ROUTE_PAUSED, registry)
        self.lane_failures = _counter(LANE_FAILURES, registry)
        self.database_up = _gauge(DATABASE_UP, registry)
        self.ready = _gauge(READY, registry)
        self.refreshed = _gauge(REFRESHED, registry)
        self._sink_of: dict[str, str] = {}
        self._topics: set[str] = set()
        # Topics delivered here: a topic drained between two refreshes still reads 0 then.
        self._topics_recorded: set[str] = set()
        self._dead_keys: set[tuple[str, str]] = set()

    def add_routes(self, sinks: Mapping[str, str]) -> None:
        """Route name -> sink kind; every route's series exist from the start (at 0)."""
        self._sink_of.update(sinks)
        for route in sinks:
            self.route_disabled.labels(route).set(0)
            self.route_paused.labels(route).set(0)
            self.latency.labels(route)
            if sinks[route] == "webhook":  # only webhook routes have lanes
                for where in ("attempt", "lane"):
                    self.lane_failures.labels(route, where)

    def recorded(self, plan: RecordPlan) -> None:
        """Count the outcomes of a committed record transaction."""
        now = time.time()
        delivered: Tally[tuple[str, str]] = Tally()
        failed: Tally[tuple[str, str]] = Tally()
        errors: Tally[tuple[str, str]] = Tally()
        latencies: dict[str, list[float]] = {}  # route -> delivery latencies, observed at once
        for message, route, verdict in plan.outcomes:
            if isinstance(verdict, Delivered):
                delivered[(message.topic, route)] += 1
                seconds = (verdict.acked_at or now) - message.created_at.timestamp()
                found = latencies.get(route)
                if found is None:
                    found = latencies[route] = []
                found.append(seconds if seconds > 0.0 else 0.0)
            elif route == NO_ROUTE:
                failed[(message.topic, route)] += 1
                errors[(route, "no route")] += 1
            elif isinstance(verdict, Pending | Dead) and verdict.status not in NOT_ATTEMPTED:
                failed[(message.topic, route)] += 1
                errors[(route, verdict.status or "error")] += 1
        for route, seconds_each in latencies.items():
            observe_all(self.latency.labels(route), seconds_each)
        self._topics_recorded.update(topic for topic, _ in delivered)
        for (topic, route), n in delivered.items():
            self.delivered.labels(topic, route).inc(n)
        for (topic, route), n in failed.items():
            self.failures.labels(topic, route).inc(n)
        for (route, reason), n in errors.items():
            self.errors.labels(route, self._sink_of.get(route, "none"), reason).inc(n)

    def claimed(self, pass_: Pass, size: int, seconds: float) -> None:
        self.claim_seconds.labels(pass_).observe(seconds)
        if size:
            self.batch_size.labels(pass_).observe(size)

    def record_took(self, pass_: Pass, seconds: float) -> None:
        self.record_seconds.labels(pass_).observe(seconds)

    def set_topics(self, rows: Iterable[tuple[str, int, float | None]]) -> None:
        """Pending count and oldest age per topic, as the database says now. Topics pending
        before, or delivered since the last refresh, that have nothing pending read 0."""
        seen = set()
        for topic, count, age in rows:
            seen.add(topic)
            self.pending.labels(topic).set(count)
            self.oldest_age.labels(topic).set(age or 0.0)
        self._topics |= self._topics_recorded
        self._topics_recorded.clear()
        for topic in self._topics - seen:
            self.pending.labels(topic).set(0)
            self.oldest_age.labels(topic).set(0)
        self._topics |= seen

    def set_dead_letters(self, rows: Iterable[tuple[str, str, int]]) -> None:
        seen = set()
        for topic, route, count in rows:
            seen.add((topic, route))
            self.dead_letters.labels(topic, route).set(count)
        for topic, route in self._dead_keys - seen:
            self.dead_letters.labels(topic, route).set(0)
        self._dead_keys |= seen
