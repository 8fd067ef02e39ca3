"""W3C trace context end to end: real PostgreSQL, a real broker, a real HTTP receiver.

A publisher span comes from an SDK ``TracerProvider`` of the test's own (the global provider
is never set); the relay's spans go to the same provider's in-memory exporter. What is
asserted is what PostgreSQL stored, what the Kafka consumer and the webhook receiver got,
and which spans were finished.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import psycopg
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Span, SpanKind
from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import outbox_lib
from relay import tracing
from relay.config import Route, Settings
from relay.engine import Engine as RelayEngine
from tests.harness.kafka import consume_all
from tests.harness.relay import RelayThread, scalar, settings_for, wait_until
from tests.harness.webhook import WebhookServer, new_secret
from tests.integration.pg_helpers import make_async_engine

pytestmark = pytest.mark.integration

TOPIC = "orders.created"


def traceparent_of(span: Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def stored_headers(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT headers FROM outbox.message ORDER BY seq")]


def hook(url: str, secret: str, topic: str = TOPIC) -> Route:
    return Route(
        name="hook", topics=(topic,), sink="webhook", url=url, secret=secret, timeout_s=2.0,
        backoff_initial_s=0.05, backoff_max_s=0.2, allow_private_network=True,
    )  # fmt: skip


class TracedRelay(RelayThread):
    """An in-process relay whose store and sinks get spans from ``provider``.

    ``run_relay`` leaves the global tracer provider to the deployment; the test hands the
    store and the sinks a recorder on its own provider, the way ``tracing.install`` does.
    """

    def __init__(self, settings: Settings, provider: TracerProvider) -> None:
        super().__init__(settings)
        self._provider = provider

    def _started(self, engine: RelayEngine) -> None:
        targets = [engine.store, *(runtime.sink for runtime in engine.routes)]
        tracing.install(engine.settings.otel_spans, targets, self._provider)
        super()._started(engine)


# -- publish ------------------------------------------------------------------------------


def test_publish_in_a_span_stores_its_traceparent_and_without_one_none(
    url: str, engine: Engine, provider: TracerProvider
) -> None:
    tracer = provider.get_tracer("shop")
    with tracer.start_as_current_span("place order") as span, Session(engine) as session:
        outbox_lib.publish(session, TOPIC, {"n": 1}, headers={"tenant": "acme"})
        session.commit()
    with Session(engine) as session, session.begin():
        outbox_lib.publish(session, TOPIC, {"n": 2}, headers={"tenant": "acme"})
    traced, untraced = stored_headers(url)
    assert traced == {"tenant": "acme", "traceparent": traceparent_of(span)}
    assert traced["traceparent"].split("-")[1] == f"{span.get_span_context().trace_id:032x}"
    assert untraced == {"tenant": "acme"}


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_publish_async_in_a_span_stores_its_traceparent(
    url: str, driver: str, provider: TracerProvider
) -> None:
    async def run() -> Span:
        engine = make_async_engine(url, driver)
        try:
            tracer = provider.get_tracer("shop")
            async with AsyncSession(engine) as session:
                with tracer.start_as_current_span("place order") as span:
                    await outbox_lib.publish_async(session, TOPIC, {"n": 1})
                await outbox_lib.publish_async(session, TOPIC, {"n": 2})
                await session.commit()
            return span
        finally:
            await engine.dispose()

    span = asyncio.run(run())
    assert stored_headers(url) == [{"traceparent": traceparent_of(span)}, {}]


def test_a_traceparent_given_by_the_caller_wins(
    url: str, engine: Engine, provider: TracerProvider
) -> None:
    theirs = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with provider.get_tracer("shop").start_as_current_span("x"), Session(engine) as session:
        outbox_lib.publish(session, TOPIC, {"n": 1}, headers={"traceparent": theirs})
        session.commit()
    assert stored_headers(url) == [{"traceparent": theirs}]


# -- forwarding ---------------------------------------------------------------------------


def test_kafka_record_carries_the_stored_traceparent(
    url: str, engine: Engine, kafka: Any, topic_name: str, provider: TracerProvider
) -> None:
    with provider.get_tracer("shop").start_as_current_span("x"), Session(engine) as session:
        outbox_lib.publish(session, topic_name, {"n": 1}, key="k")
        session.commit()
    (stored,) = stored_headers(url)
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(1)
        (record,) = consume_all(kafka.bootstrap, topic_name, 1)
    assert record.header("traceparent") == stored["traceparent"].encode()
    assert record.header("outbox-topic") == topic_name.encode()


def test_webhook_forwards_the_stored_traceparent_and_drops_a_malformed_one(
    url: str, engine: Engine, provider: TracerProvider
) -> None:
    secret = new_secret()
    with provider.get_tracer("shop").start_as_current_span("x"), Session(engine) as session:
        good = outbox_lib.publish(session, TOPIC, {"n": 1}, headers={"tracestate": "shop=1"})
        session.commit()
    with psycopg.connect(url, autocommit=True) as conn:  # SQL writers pass their own
        bad = conn.execute(
            "SELECT outbox.publish(%s, '{\"n\": 2}'::jsonb, headers => %s::jsonb)",
            (TOPIC, json.dumps({"traceparent": "00-not-a-trace-01", "tracestate": "shop=1"})),
        ).fetchone()[0]  # type: ignore[index]
    stored = stored_headers(url)
    with WebhookServer(secret) as server:
        base = settings_for(url, None, poll_interval=0.1)
        with RelayThread(dataclasses.replace(base, routes=(hook(server.url(), secret),))):
            assert server.wait_for(2, timeout=15)
            wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.delivery") == 2, 15, "2")
    by_id = {r.webhook_id: r for r in server.requests}
    assert len(server.requests) == 2, "each delivered at the first attempt"
    assert by_id[str(good)].headers["traceparent"] == stored[0]["traceparent"]
    assert by_id[str(good)].headers["tracestate"] == "shop=1"
    assert "traceparent" not in by_id[str(bad)].headers
    assert "tracestate" not in by_id[str(bad)].headers
    assert all(r.ok for r in server.requests), "the signature is unchanged"
    assert scalar(url, "SELECT count(*) FROM outbox.dead_letter") == 0


# -- spans --------------------------------------------------------------------------------


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_relay_spans_claim_and_deliver_in_the_publishers_trace(
    url: str,
    engine: Engine,
    kafka: Any,
    topic_name: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    secret = new_secret()
    tracer = provider.get_tracer("shop")
    with tracer.start_as_current_span("order") as publisher, Session(engine) as session:
        outbox_lib.publish(session, topic_name, {"n": 1}, key="k")
        session.commit()
    trace_id = publisher.get_span_context().trace_id
    with WebhookServer(secret) as server:
        routes = (Route("kafka", (topic_name,), "kafka"), hook(server.url(), secret, topic_name))
        base = settings_for(url, kafka.bootstrap, poll_interval=0.1, otel_spans=True)
        with TracedRelay(dataclasses.replace(base, routes=routes), provider):
            assert server.wait_for(1, timeout=15)
            consume_all(kafka.bootstrap, topic_name, 1)
            wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.delivery") == 2, 15, "2")
    claims = finished(exporter, "outbox.claim")
    assert "first" in {(s.attributes or {}).get("outbox.pass") for s in claims}
    assert all((s.attributes or {}).get("outbox.claimed", 0) > 0 for s in claims)
    deliveries = {s.kind: s for s in finished(exporter, "outbox.deliver")}
    webhook, produce = deliveries[SpanKind.CLIENT], deliveries[SpanKind.PRODUCER]
    assert webhook.context.trace_id == trace_id
    assert webhook.parent is not None
    assert webhook.parent.span_id == publisher.get_span_context().span_id
    assert (webhook.attributes or {})["http.response.status_code"] == 200
    (request,) = server.requests
    assert request.headers["traceparent"].split("-")[1:3] == [
        f"{trace_id:032x}",
        f"{webhook.context.span_id:016x}",
    ]
    assert [link.context.trace_id for link in produce.links] == [trace_id]
    assert (produce.attributes or {})["messaging.destination.name"] == topic_name


def test_relay_records_no_spans_when_off(
    url: str, engine: Engine, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    secret = new_secret()
    with provider.get_tracer("shop").start_as_current_span("x"), Session(engine) as session:
        outbox_lib.publish(session, TOPIC, {"n": 1})
        session.commit()
    exporter.clear()
    with WebhookServer(secret) as server:
        base = settings_for(url, None, poll_interval=0.1)
        with TracedRelay(dataclasses.replace(base, routes=(hook(server.url(), secret),)), provider):
            assert server.wait_for(1, timeout=15)
            wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.delivery") == 1, 15, "1")
    assert "traceparent" in server.requests[0].headers
    assert exporter.get_finished_spans() == ()
