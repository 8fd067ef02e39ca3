"""Every Prometheus metric of a relay, in one explicit registry, and the one recorder.

Delivery outcomes are counted in one place: :meth:`Metrics.recorded`, called with each
:class:`~relay.plan.RecordPlan` once its transaction has committed (first pass, retry pass
and webhook lanes alike). What was sent but not recorded (the relay died, the database was
lost) is therefore never counted, and a message counts once per route however it got there.

Gauges that describe the database (pending messages and their age, dead letters, unowned
buckets, live relays) are not read per scrape: :mod:`relay.health` refreshes them every few
seconds from indexed queries, so any number of scrapers costs the database nothing more.
Several relays export the same values for those; dashboards take ``max by (...)``.
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from typing import Any

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


class Metrics:
    """The relay's metrics; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, relay_id: str, schema: str) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        # CONTRACT section 7.
        self.pending = Gauge(
            "outbox_pending_messages",
            "Committed outbox messages not yet delivered to every route",
            ["topic"],
            registry=registry,
        )
        self.oldest_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending message of the topic (the delivery lag); 0 when none",
            ["topic"],
            registry=registry,
        )
        self.delivered = Counter(
            "outbox_delivered_total",
            "Deliveries acknowledged by the sink and recorded, per outbox topic and route",
            ["topic", "route"],
            registry=registry,
        )
        self.failures = Counter(
            "outbox_delivery_failures_total",
            "Failed delivery attempts (each retried or dead-lettered attempt, and messages "
            "whose topic matches no route, as route 'no-route')",
            ["topic", "route"],
            registry=registry,
        )
        self.dead_letters = Gauge(
            "outbox_dead_letters",
            "Messages currently dead-lettered (not discarded), per topic and route",
            ["topic", "route"],
            registry=registry,
        )
        self.latency = Histogram(
            "outbox_delivery_latency_seconds",
            "Message creation (publish) to sink acknowledgement",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        # The relay's own workings.
        self.info = Gauge(
            "outbox_relay_info",
            "This relay process (always 1)",
            ["relay_id", "version", "schema"],
            registry=registry,
        )
        self.info.labels(relay_id, __version__, schema).set(1)
        self.errors = Counter(
            "outbox_delivery_errors_total",
            "Failed delivery attempts by route, sink kind and reason (HTTP status, timeout, "
            "Kafka error name, ...)",
            ["route", "sink", "reason"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "outbox_batch_size",
            "Messages claimed per batch (first pass, retry pass, webhook lane)",
            ["pass"],
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.claim_seconds = Histogram(
            "outbox_claim_duration_seconds",
            "Time to claim a batch",
            ["pass"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.record_seconds = Histogram(
            "outbox_record_duration_seconds",
            "Time to record a batch's outcomes and commit",
            ["pass"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.buckets_held = Gauge(
            "outbox_buckets_held", "Key buckets (of 256) this relay holds", registry=registry
        )
        self.buckets_unowned = Gauge(
            "outbox_buckets_unowned",
            "Key buckets without a live holder (their keys wait for a takeover)",
            registry=registry,
        )
        self.relays_live = Gauge(
            "outbox_relays_live", "Relays with a live lease in the database", registry=registry
        )
        self.route_disabled = Gauge(
            "outbox_route_disabled",
            "1 while the route is disabled (HTTP 410 or an operator)",
            ["route"],
            registry=registry,
        )
        self.route_paused = Gauge(
            "outbox_route_paused",
            "1 while the route waits out an unreachable sink (broker down, endpoint refusing)",
            ["route"],
            registry=registry,
        )
        self.database_up = Gauge(
            "outbox_database_up",
            "1 when the last database check succeeded",
            registry=registry,
        )
        self.ready = Gauge(
            "outbox_ready", "1 when /readyz answers 200 (database and sinks reachable)",
            registry=registry,
        )  # fmt: skip
        self.refreshed = Gauge(
            "outbox_gauges_refreshed_timestamp_seconds",
            "When the database-derived gauges were last refreshed (unix time)",
            registry=registry,
        )
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

    def recorded(self, plan: RecordPlan) -> None:
        """Count the outcomes of a committed record transaction."""
        now = time.time()
        delivered: Tally[tuple[str, str]] = Tally()
        failed: Tally[tuple[str, str]] = Tally()
        errors: Tally[tuple[str, str]] = Tally()
        latency: dict[str, Any] = {}  # route -> its histogram child, looked up once per plan
        for message, route, verdict in plan.outcomes:
            if isinstance(verdict, Delivered):
                delivered[(message.topic, route)] += 1
                self._topics_recorded.add(message.topic)
                child = latency.get(route) or latency.setdefault(route, self.latency.labels(route))
                child.observe(max(0.0, (verdict.acked_at or now) - message.created_at.timestamp()))
            elif route == NO_ROUTE:
                failed[(message.topic, route)] += 1
                errors[(route, "no route")] += 1
            elif isinstance(verdict, Pending | Dead) and verdict.status not in NOT_ATTEMPTED:
                failed[(message.topic, route)] += 1
                errors[(route, verdict.status or "error")] += 1
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
