"""W3C trace context: what ``publish`` adds, what the relay forwards, and its optional spans.

No I/O: publish's header step is called directly, the webhook sink answers through httpx's
MockTransport, and spans go to the SDK's in-memory exporter on a provider of the test's own
(never the global one). The same behaviour against PostgreSQL, Kafka and a real HTTP server
is in tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from standardwebhooks import Webhook

from outbox_lib._encoding import decode_headers, encode_headers
from outbox_lib._tracecontext import _otel, with_trace_context
from relay.config import Route, load_settings
from relay.sinks.base import Delivered, Failed, Outbound
from relay.sinks.webhook import WebhookSink
from relay.tracing import Spans, install, trace_headers, valid_traceparent

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def no_otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make ``import opentelemetry`` fail, as it does when the package is not installed."""
    _otel.cache_clear()
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    yield
    monkeypatch.undo()
    _otel.cache_clear()


def traceparent_of(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


# -- publish: the headers stored -----------------------------------------------------------


def test_without_a_span_headers_pass_through_untouched() -> None:
    headers = {"tenant": "acme"}
    assert with_trace_context(headers) is headers
    assert with_trace_context(None) is None


def test_an_active_span_adds_its_traceparent(provider: TracerProvider) -> None:
    with provider.get_tracer("t").start_as_current_span("publish") as span:
        stored = with_trace_context({"tenant": "acme"})
        alone = with_trace_context(None)
    assert stored == {"tenant": "acme", "traceparent": traceparent_of(span)}
    assert alone == {"traceparent": traceparent_of(span)}


def test_tracestate_travels_when_not_empty() -> None:
    context = SpanContext(
        int("0af7651916cd43dd8448eb211c80319c", 16),
        int("b7ad6b7169203331", 16),
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )
    with trace.use_span(NonRecordingSpan(context)):
        stored = with_trace_context({})
    assert stored == {"traceparent": PARENT, "tracestate": "vendor=v1,other=x"}


def test_an_unsampled_span_still_propagates(provider: TracerProvider) -> None:
    context = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    with trace.use_span(NonRecordingSpan(context)):
        stored = with_trace_context(None)
    assert stored == {"traceparent": f"00-{1:032x}-{2:016x}-00"}


@pytest.mark.parametrize("name", ["traceparent", "Traceparent", "TRACEPARENT"])
def test_a_traceparent_from_the_caller_wins(provider: TracerProvider, name: str) -> None:
    mine = {name: PARENT, "tenant": "acme"}
    with provider.get_tracer("t").start_as_current_span("publish"):
        assert with_trace_context(mine) is mine


def test_bad_headers_are_left_for_validation_to_refuse(provider: TracerProvider) -> None:
    with provider.get_tracer("t").start_as_current_span("publish"):
        assert with_trace_context(["not", "a", "mapping"]) == ["not", "a", "mapping"]
        odd = {1: "x"}
        with pytest.raises(ValueError, match="non-empty str"):
            encode_headers(with_trace_context(odd))


def test_without_opentelemetry_publish_headers_are_untouched(
    provider: TracerProvider, no_otel: None
) -> None:
    with provider.get_tracer("t").start_as_current_span("publish"):
        headers = {"tenant": "acme"}
        assert with_trace_context(headers) is headers
    assert _otel() is None


def test_the_stored_header_round_trips_to_the_sink(provider: TracerProvider) -> None:
    with provider.get_tracer("t").start_as_current_span("publish") as span:
        stored = encode_headers(with_trace_context({"raw": b"\x00"}))
    pairs = decode_headers(orjson.loads(stored))
    assert ("traceparent", traceparent_of(span).encode()) in pairs


# -- the relay: which trace headers are forwarded -----------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        PARENT,
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-09",
    ],
)
def test_valid_traceparents(value: str) -> None:
    assert valid_traceparent(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        PARENT + "\n",
        PARENT.upper(),
        PARENT + "-extra",
        "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ],
)
def test_malformed_traceparents(value: str) -> None:
    assert not valid_traceparent(value)


def test_trace_headers_picks_only_the_two_w3c_headers() -> None:
    headers = [("tenant", b"acme"), ("TraceParent", PARENT.encode()), ("tracestate", b"v=1")]
    assert trace_headers(headers) == {"traceparent": PARENT, "tracestate": "v=1"}


def test_a_malformed_traceparent_drops_its_tracestate_too() -> None:
    assert trace_headers([("traceparent", b"00-zz"), ("tracestate", b"v=1")]) == {}
    assert trace_headers([("tracestate", b"v=1")]) == {}
    assert trace_headers([("traceparent", b"\xff\xfe")]) == {}


@pytest.mark.parametrize("state", [b"v=1\r\nx-injected: 1", b"", b"v=\xe9", b"v" * 513])
def test_a_malformed_tracestate_is_dropped_alone(state: bytes) -> None:
    headers = [("traceparent", PARENT.encode()), ("tracestate", state)]
    assert trace_headers(headers) == {"traceparent": PARENT}


# -- the webhook sink ----------------------------------------------------------------------


def route() -> Route:
    return Route(
        name="hook", topics=("orders.*",), sink="webhook", url="https://hooks.example/o",
        secret=SECRET,
    )  # fmt: skip


def message(*headers: tuple[str, bytes], attempts: int = 0) -> Outbound:
    return Outbound(
        seq=1,
        id=uuid.UUID("00000000-0000-4000-8000-000000000007"),
        topic="orders.created",
        key=b"7",
        payload=b'{"order_id": 7}',
        content_type="application/json",
        headers=headers,
        idempotency_key=None,
        created_at=dt.datetime.now(dt.UTC),
        attempts=attempts,
    )


def send(sink: WebhookSink, m: Outbound) -> Any:
    async def run() -> Any:
        try:
            return await sink.deliver(m)
        finally:
            await sink.close()

    return asyncio.run(run())


def sink_seeing(status: int = 200) -> tuple[WebhookSink, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(status)

    return WebhookSink(route(), [b"s" * 32], transport=httpx.MockTransport(answer)), seen


def test_webhook_request_carries_the_trace_headers_and_still_verifies() -> None:
    sink, seen = sink_seeing()
    m = message(("tenant", b"acme"), ("traceparent", PARENT.encode()), ("tracestate", b"v=1"))
    assert isinstance(send(sink, m), Delivered)
    (request,) = seen
    assert request.headers["traceparent"] == PARENT
    assert request.headers["tracestate"] == "v=1"
    assert "tenant" not in request.headers, "other message headers are not forwarded"
    Webhook(SECRET).verify(request.content, dict(request.headers))


def test_webhook_request_drops_a_malformed_traceparent_and_delivers() -> None:
    sink, seen = sink_seeing()
    m = message(("traceparent", b"00-not-a-trace\r\nx: 1"), ("tracestate", b"v=1"))
    assert isinstance(send(sink, m), Delivered)
    (request,) = seen
    assert "traceparent" not in request.headers and "tracestate" not in request.headers
    Webhook(SECRET).verify(request.content, dict(request.headers))


# -- spans ---------------------------------------------------------------------------------


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_webhook_span_is_a_child_of_the_message_and_the_request_carries_it(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    sink, seen = sink_seeing(503)
    sink.spans = Spans.create(True, provider)
    m = message(("traceparent", PARENT.encode()), ("tracestate", b"v=1"), attempts=2)
    result = send(sink, m)
    assert isinstance(result, Failed)
    (span,) = finished(exporter, "outbox.deliver")
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None and span.parent.span_id == int("b7ad6b7169203331", 16)
    assert span.context.trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
    assert span.attributes is not None
    assert span.attributes["outbox.route"] == "hook"
    assert span.attributes["outbox.topic"] == "orders.created"
    assert span.attributes["messaging.message.id"] == str(m.id)
    assert span.attributes["http.response.status_code"] == 503
    assert span.attributes["outbox.attempt"] == 3
    assert span.status.status_code is trace.StatusCode.ERROR
    (request,) = seen
    assert request.headers["traceparent"] == (
        f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-01"
    )
    assert request.headers["tracestate"] == "v=1"
    Webhook(SECRET).verify(request.content, dict(request.headers))


def test_webhook_span_without_a_message_trace_is_a_root(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    sink, seen = sink_seeing()
    sink.spans = Spans.create(True, provider)
    assert isinstance(send(sink, message(("traceparent", b"bad"))), Delivered)
    (span,) = finished(exporter, "outbox.deliver")
    assert span.parent is None
    assert span.status.status_code is trace.StatusCode.UNSET
    assert seen[0].headers["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"


def test_kafka_batch_span_links_each_distinct_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    other = "00-11111111111111111111111111111111-2222222222222222-01"
    batch = [
        message(("traceparent", PARENT.encode())),
        message(("traceparent", PARENT.encode())),
        message(("traceparent", other.encode())),
        message(),
    ]
    kafka = Route(name="k", topics=("*",), sink="kafka", kafka_topic="orders")
    with Spans.create(True, provider).kafka_batch(kafka, batch) as span:
        span.results([Delivered(), Delivered(), Failed("retry", "boom"), Delivered()])
    (done,) = finished(exporter, "outbox.deliver")
    assert done.kind is SpanKind.PRODUCER
    assert [link.context.trace_id for link in done.links] == [
        int("0af7651916cd43dd8448eb211c80319c", 16),
        int("1" * 32, 16),
    ]
    assert done.attributes is not None
    assert done.attributes["messaging.destination.name"] == "orders"
    assert done.attributes["messaging.batch.message_count"] == 4
    assert (done.attributes["outbox.delivered"], done.attributes["outbox.failed"]) == (3, 1)
    assert done.status.status_code is trace.StatusCode.ERROR


def test_claim_spans_only_for_claims_that_found_work_or_failed(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    spans = Spans.create(True, provider)
    with spans.claim("first", 100):
        pass
    with spans.claim("retry", 50) as claim:
        claim.count = 7
    with pytest.raises(RuntimeError), spans.claim("first", 100):
        raise RuntimeError("db gone")
    done = finished(exporter, "outbox.claim")
    assert [(s.attributes or {}).get("outbox.pass") for s in done] == ["retry", "first"]
    assert dict(done[0].attributes or {}) == {
        "outbox.pass": "retry",
        "outbox.batch_size": 50,
        "outbox.claimed": 7,
    }
    assert done[1].status.status_code is trace.StatusCode.ERROR


def test_spans_off_records_nothing(provider: TracerProvider) -> None:
    assert not Spans().enabled
    assert not Spans.create(False, provider).enabled


def test_spans_on_without_opentelemetry_warns_and_records_nothing(
    no_otel: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "relay.tracing"):
        spans = Spans.create(True)
    assert not spans.enabled
    assert "opentelemetry-api is not installed" in caplog.text


def test_install_gives_every_traced_target_the_same_spans(provider: TracerProvider) -> None:
    sink, _ = sink_seeing()
    untraced = object()
    spans = install(True, [sink, untraced], provider)
    assert sink.spans is spans and spans.enabled


# -- the setting ---------------------------------------------------------------------------


def test_otel_spans_setting_from_flag_env_and_file(tmp_path: Any) -> None:
    assert load_settings({}, {}).otel_spans is False
    assert load_settings({}, {"OUTBOX_OTEL_SPANS": "true"}).otel_spans is True
    assert load_settings({"otel_spans": False}, {"OUTBOX_OTEL_SPANS": "on"}).otel_spans is False
    config = tmp_path / "relay.toml"
    config.write_text("otel_spans = true\n")
    assert load_settings({}, {}, str(config)).otel_spans is True
