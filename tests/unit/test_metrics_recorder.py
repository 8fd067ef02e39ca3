"""The one recorder: which verdicts count as deliveries, failures and errors, and how many."""

from __future__ import annotations

import datetime as dt
import uuid

from relay.metrics import Metrics
from relay.plan import NO_ROUTE, PAUSED, Dead, Pending, parked, plan_first_pass, plan_retry_pass
from relay.sinks.base import SHUTDOWN, Delivered, Outbound

NOW = dt.datetime.now(dt.UTC)


def message(seq: int, topic: str = "orders", age: float = 2.0) -> Outbound:
    return Outbound(
        seq=seq,
        id=uuid.uuid4(),
        topic=topic,
        key=None,
        payload=b"{}",
        content_type="application/json",
        headers=(),
        idempotency_key=None,
        created_at=NOW - dt.timedelta(seconds=age),
        attempts=0,
    )


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_first_pass_outcomes_are_counted_per_topic_and_route() -> None:
    metrics = Metrics("r", "outbox")
    metrics.add_routes({"kafka": "kafka", "hook": "webhook"})
    messages = [message(1), message(2), message(3, topic="misc")]
    verdicts = {
        (1, "kafka"): Delivered(0, 10, acked_at=NOW.timestamp()),
        (1, "hook"): parked(),  # queued for the lane: not an attempt
        (2, "kafka"): Pending(1, 0.5, "HTTP 503: down", status="_MSG_TIMED_OUT"),
        (2, "hook"): Dead(1, "HTTP 400", "bad", status="HTTP 400"),
    }
    routes_of = {1: ["kafka", "hook"], 2: ["kafka", "hook"], 3: []}
    metrics.recorded(plan_first_pass(messages, verdicts, routes_of))

    assert sample(metrics, "outbox_delivered_total", topic="orders", route="kafka") == 1
    assert sample(metrics, "outbox_delivered_total", topic="orders", route="hook") is None
    assert sample(metrics, "outbox_delivery_failures_total", topic="orders", route="kafka") == 1
    assert sample(metrics, "outbox_delivery_failures_total", topic="orders", route="hook") == 1
    assert sample(metrics, "outbox_delivery_failures_total", topic="misc", route=NO_ROUTE) == 1
    errors = "outbox_delivery_errors_total"
    assert sample(metrics, errors, route="kafka", sink="kafka", reason="_MSG_TIMED_OUT") == 1
    assert sample(metrics, errors, route="hook", sink="webhook", reason="HTTP 400") == 1
    assert sample(metrics, errors, route=NO_ROUTE, sink="none", reason="no route") == 1
    latency = "outbox_delivery_latency_seconds"
    assert sample(metrics, f"{latency}_count", route="kafka") == 1
    observed = sample(metrics, f"{latency}_sum", route="kafka")
    assert observed is not None and abs(observed - 2.0) < 0.01, "created 2 s before the ack"
    assert sample(metrics, f"{latency}_bucket", route="kafka", le="1.0") == 0
    assert sample(metrics, f"{latency}_bucket", route="kafka", le="2.5") == 1
    assert sample(metrics, f"{latency}_count", route="hook") == 0, "series exists from start"


def test_attempts_not_made_are_not_failures() -> None:
    metrics = Metrics("r", "outbox")
    metrics.add_routes({"hook": "webhook"})
    claimed = [(message(n), "hook") for n in range(5)]
    verdicts = [
        Pending(0, 1.0, "route paused: endpoint unavailable", unavailable=True, status=PAUSED),
        Pending(0, 0.0, None),  # held behind an earlier message of its key
        Pending(0, 0.0, "held", unavailable=True, status="held"),
        Dead(0, "route disabled", "410", status="disabled"),
        Pending(0, 0.0, "shutdown: relay stopped", unavailable=True, status=SHUTDOWN),
    ]
    metrics.recorded(plan_retry_pass(claimed, verdicts))

    assert sample(metrics, "outbox_delivery_failures_total", topic="orders", route="hook") is None
    assert sample(metrics, "outbox_delivered_total", topic="orders", route="hook") is None


def test_retry_pass_deliveries_and_exhausted_retries() -> None:
    metrics = Metrics("r", "outbox")
    metrics.add_routes({"hook": "webhook"})
    claimed = [(message(n, age=7200), "hook") for n in range(3)]
    verdicts = [
        Delivered(),
        Delivered(),
        Dead(12, "max attempts reached (timeout)", "timeout", status="timeout"),
    ]
    metrics.recorded(plan_retry_pass(claimed, verdicts))

    assert sample(metrics, "outbox_delivered_total", topic="orders", route="hook") == 2
    assert sample(metrics, "outbox_delivery_failures_total", topic="orders", route="hook") == 1
    errors = "outbox_delivery_errors_total"
    assert sample(metrics, errors, route="hook", sink="webhook", reason="timeout") == 1
    latency = "outbox_delivery_latency_seconds_bucket"
    assert sample(metrics, latency, route="hook", le="3600.0") == 0
    assert sample(metrics, latency, route="hook", le="21600.0") == 2, "two hours after publish"


def test_gauges_of_topics_that_drained_read_zero() -> None:
    metrics = Metrics("r", "outbox")
    metrics.set_topics([("a", 5, 12.5), ("b", 1, 0.2)])
    metrics.set_dead_letters([("a", "hook", 2)])
    metrics.set_topics([("b", 3, 1.5)])
    metrics.set_dead_letters([])

    assert sample(metrics, "outbox_pending_messages", topic="a") == 0
    assert sample(metrics, "outbox_oldest_pending_age_seconds", topic="a") == 0
    assert sample(metrics, "outbox_pending_messages", topic="b") == 3
    assert sample(metrics, "outbox_oldest_pending_age_seconds", topic="b") == 1.5
    assert sample(metrics, "outbox_dead_letters", topic="a", route="hook") == 0


def test_relay_info_names_the_relay() -> None:
    metrics = Metrics("host:1:abc", "tenant_a")
    from relay import __version__

    assert (
        sample(
            metrics,
            "outbox_relay_info",
            relay_id="host:1:abc",
            version=__version__,
            schema="tenant_a",
        )
        == 1
    )


def test_a_topic_delivered_between_two_refreshes_reads_zero_pending() -> None:
    metrics = Metrics("r", "outbox")
    metrics.add_routes({"kafka": "kafka"})
    metrics.set_topics([])
    plan = plan_first_pass([message(1, topic="quick")], {(1, "kafka"): Delivered()}, {1: ["kafka"]})
    metrics.recorded(plan)
    assert sample(metrics, "outbox_pending_messages", topic="quick") is None

    metrics.set_topics([])

    assert sample(metrics, "outbox_pending_messages", topic="quick") == 0
    assert sample(metrics, "outbox_oldest_pending_age_seconds", topic="quick") == 0


def test_observing_many_latencies_at_once_equals_observing_each() -> None:
    """observe_all, which a record uses for its deliveries, leaves the histogram exactly as
    one observe() per amount would: every bucket boundary, zero, and beyond the last bound."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from relay.metrics import observe_all

    amounts = [0.0, 0.001, 0.005, 0.0051, 0.1, 0.25, 1.0, 2.5, 7.0, 10.0, 60.0, 3600.0] * 3
    exposed = []
    for one_by_one in (True, False):
        registry = CollectorRegistry()
        histogram = Histogram("lag_seconds", "lag", ["route"], registry=registry)
        child = histogram.labels("r")
        if one_by_one:
            for amount in amounts:
                child.observe(amount)
        else:
            observe_all(child, amounts)
        exposed.append(
            [line for line in generate_latest(registry).splitlines() if b"_created" not in line]
        )
    assert exposed[0] == exposed[1]
    assert b'lag_seconds_bucket{le="+Inf",route="r"} 36.0' in exposed[1]


def test_the_relay_collects_young_objects_less_often_but_never_more_often() -> None:
    import gc

    from relay.app import GC_YOUNG_THRESHOLD, tune_gc

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(GC_YOUNG_THRESHOLD * 5, 3, 4)
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD * 5, 3, 4), "a higher one is kept"
        gc.set_threshold(0, 10, 10)
        tune_gc()
        assert gc.get_threshold()[0] == 0, "a disabled collector stays disabled"
    finally:
        gc.set_threshold(*saved)


def test_the_relay_hands_the_gil_over_sooner_but_never_later() -> None:
    import sys

    import pytest

    from relay.app import SWITCH_INTERVAL_S, tune_switching

    saved = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        tune_switching()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        sys.setswitchinterval(0.0001)
        tune_switching()
        assert sys.getswitchinterval() == pytest.approx(0.0001), "a shorter one is kept"
    finally:
        sys.setswitchinterval(saved)
