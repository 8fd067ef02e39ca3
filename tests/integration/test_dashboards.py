"""The shipped alert rules and dashboard against a real relay scraped by a real Prometheus.

Real PostgreSQL, a real Tansu broker, ``outbox-relay run`` as a subprocess serving
``/metrics`` (``--metrics-refresh-seconds 1``), and the ``prometheus`` binary scraping it
every second with deploy/prometheus/alerts.yml, rewritten only in its thresholds: every
``for:`` becomes 2 s and the lag threshold 3 s. What the tests read is what an operator's
Prometheus would answer: ``/api/v1/alerts`` and instant queries.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.harness.kafka import TansuBroker
from tests.harness.prometheus import (
    ALERTS,
    DASHBOARD,
    RELAY_METRICS,
    PrometheusServer,
    dashboard_queries,
    fast_alert_rules,
    instantiate,
    require_binary,
    variable_queries,
)
from tests.harness.relay import RelayProcess, publish_many
from tests.harness.webhook import Reply, WebhookServer, new_secret

pytestmark = pytest.mark.integration

HOOK_ROUTE = "hook"
KAFKA_ROUTE = "to-kafka"

PrometheusFactory = Callable[[Sequence[str]], PrometheusServer]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Factory: ``prometheus([target])`` starts a server scraping ``target`` as job
    ``outbox-relay`` with the fast alerts.yml; stopped after the test. Its data directory
    stays under ``tmp_path`` for post-mortems."""
    require_binary("prometheus")
    rules = tmp_path / "alerts.yml"
    rules.write_text(fast_alert_rules(ALERTS.read_text("utf-8")), "utf-8")
    started: list[PrometheusServer] = []

    def start(targets: Sequence[str]) -> PrometheusServer:
        workdir = tmp_path / f"prometheus-{len(started)}"
        server = PrometheusServer(targets, [rules], workdir=workdir)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def start_relay(url: str, bootstrap: str, log: Path, **env: str) -> tuple[RelayProcess, str]:
    """``outbox-relay run`` with metrics on a port it picks; returns it and its target."""
    relay = RelayProcess(
        url,
        bootstrap,
        log,
        OUTBOX_METRICS_PORT="0",
        OUTBOX_METRICS_REFRESH_SECONDS="1",
        **env,
    ).wait_started()
    found = re.search(rb"metrics on port (\d+)", log.read_bytes())
    assert found, f"the relay did not say where it serves metrics:\n{log.read_text()}"
    return relay, f"127.0.0.1:{int(found[1])}"


def test_lag_alert_fires_while_the_broker_is_paused_and_resolves(
    url: str,
    engine: Engine,
    kafka_broker: TansuBroker,
    topic_name: str,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    relay, target = start_relay(url, kafka_broker.bootstrap, tmp_path / "relay.log")
    try:
        prom = prometheus([target])
        # A topic drained before any refresh saw it pending has no lag series at all.
        lag = f'max(outbox_oldest_pending_age_seconds{{topic="{topic_name}"}}) or vector(0)'
        delivered = f'sum(outbox_delivered_total{{topic="{topic_name}"}})'

        publish_many(engine, topic_name, 50, keys=5)
        prom.wait_for_value(delivered, lambda v: v >= 50, 30, "the first 50 delivered")
        prom.wait_for_value(lag, lambda v: v == 0, 10, "no lag once delivered")
        prom.wait_for_value("max(outbox_ready)", lambda v: v == 1, 10, "ready")
        assert prom.alert_state("OutboxDeliveryLagHigh") is None

        with kafka_broker.paused():
            publish_many(engine, topic_name, 20, keys=5, payload_offset=50)
            prom.wait_for_value("max(outbox_ready)", lambda v: v == 0, 20, "not ready")
            prom.wait_for_alert("OutboxDeliveryLagHigh", "firing", topic=topic_name)
            prom.wait_for_alert("OutboxRelayNotReady", "firing")
            alert = next(a for a in prom.alerts() if a.name == "OutboxDeliveryLagHigh")
            assert alert.labels["severity"] == "page"
            assert alert.value > 3
            assert alert.annotations["summary"].startswith(f"Outbox topic {topic_name} is ")

        prom.wait_for_alert("OutboxDeliveryLagHigh", None)
        prom.wait_for_value("max(outbox_ready)", lambda v: v == 1, 20, "ready again")
        prom.wait_for_alert("OutboxRelayNotReady", None)
        prom.wait_for_value(delivered, lambda v: v >= 70, 30, "all 70 delivered")
        assert relay.terminate() == 0
    finally:
        relay.stop_quietly()


def hook_config(tmp_path: Path, bootstrap: str, topic: str, hook_url: str) -> Path:
    """Kafka for ``topic``; a webhook route for ``topic.hook`` that dead-letters on 4xx."""
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
[kafka]
bootstrap_servers = "{bootstrap}"

[[routes]]
name = "{KAFKA_ROUTE}"
topics = ["{topic}"]
sink = "kafka"

[[routes]]
name = "{HOOK_ROUTE}"
topics = ["{topic}.hook"]
sink = "webhook"
url = "{hook_url}"
secret = "{new_secret()}"
max_attempts = 1
timeout_s = 5
allow_private_network = true
""",
        "utf-8",
    )
    return path


def test_every_dashboard_query_evaluates_and_shows_data(
    url: str,
    engine: Engine,
    kafka: Any,
    topic_name: str,
    prometheus: PrometheusFactory,
    tmp_path: Path,
) -> None:
    with WebhookServer() as hook:
        # Slow enough that a gauge refresh sees the hook topic pending: a topic drained
        # between two refreshes never gets a lag series.
        hook.default = Reply(400, body=b"no such customer", delay=2.5)
        config = hook_config(tmp_path, kafka.bootstrap, topic_name, hook.url())
        relay, target = start_relay(
            url, kafka.bootstrap, tmp_path / "relay.log", OUTBOX_CONFIG=str(config)
        )
        try:
            prom = prometheus([target])
            _traffic_scraped(prom, engine, topic_name)
            _check_dashboard(prom, topic_name)
            _check_exported_names(prom)
            prom.wait_for_alert("OutboxDeadLetters", "firing", route=HOOK_ROUTE)
            assert relay.terminate() == 0
            prom.wait_for_alert("OutboxRelayDown", "firing", instance=target)
            prom.wait_for_alert("OutboxNoRelayUp", "firing")
        finally:
            relay.stop_quietly()


def _traffic_scraped(prom: PrometheusServer, engine: Engine, topic: str) -> None:
    """Two waves of Kafka deliveries (so rates are positive) and three dead letters,
    pending for a while first."""
    delivered = f'sum(outbox_delivered_total{{topic="{topic}"}})'
    publish_many(engine, topic, 200, keys=10)
    publish_many(engine, f"{topic}.hook", 3)
    prom.wait_for_value(delivered, lambda v: v >= 200, 30, "the first wave delivered")
    publish_many(engine, topic, 200, keys=10, payload_offset=200)
    prom.wait_for_value(delivered, lambda v: v >= 400, 30, "the second wave delivered")
    prom.wait_for_value(
        f'max(outbox_dead_letters{{route="{HOOK_ROUTE}"}})', lambda v: v == 3, 20, "3 dead"
    )
    prom.wait_for_value(
        f'sum(rate(outbox_delivered_total{{topic="{topic}"}}[1m]))', lambda v: v > 0, 20, "rate"
    )


def _check_dashboard(prom: PrometheusServer, topic: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    empty = [
        f"{title}: {expr}"
        for title, expr in dashboard_queries(dashboard)
        if not prom.query(instantiate(expr))  # raises PromQLError if Prometheus rejects it
    ]
    # Kafka deliveries, a webhook lane failing into dead letters: every panel has data, the
    # core ones (lag, throughput, latency, dead letters, buckets) included.
    assert empty == [], "queries without data:\n" + "\n".join(empty)
    # The template variables (label_values) offer this test's topics and routes.
    offered = {
        name: {s.labels.get(label) for s in prom.query(selector)}
        for name, (selector, label) in variable_queries(dashboard).items()
    }
    assert {topic, f"{topic}.hook"} <= offered["topic"]
    assert {KAFKA_ROUTE, HOOK_ROUTE} <= offered["route"]


def _check_exported_names(prom: PrometheusServer) -> None:
    """Every metric the dashboard and rules assume is really exported, under that name."""
    names = {
        s.labels["__name__"] for s in prom.query('count by (__name__) ({__name__=~"outbox_.*"})')
    }
    expected = {
        f"{name}_bucket" if kind == "histogram" else name for name, kind in RELAY_METRICS.items()
    }
    assert expected - names == set()
