"""W3C trace headers of a message, and the relay's optional OpenTelemetry spans.

Trace context travels with every message whatever the settings: ``publish`` stores the
publisher's ``traceparent`` and ``tracestate`` among the message headers, the Kafka sink
forwards all the message's headers, and the webhook sink forwards these two
(:func:`trace_headers`), each only when well formed, so a bad header never breaks a delivery.

With ``otel_spans`` on and ``opentelemetry-api`` installed, the relay also records

- ``outbox.claim`` (INTERNAL): a claim that returned messages (empty polls, several a second
  when idle, are not recorded), with ``outbox.pass`` (``first``, ``retry`` or ``lane``),
  ``outbox.batch_size`` (the limit asked for) and ``outbox.claimed``;
- ``outbox.deliver`` for a webhook request (CLIENT): a child of the message's
  ``traceparent``, current while the request runs; the request carries this span's own
  ``traceparent``, so the receiver's span is its child;
- ``outbox.deliver`` for a Kafka batch of one route (PRODUCER): one span from produce to the
  last acknowledgement, linked to the trace of each message in it. Records keep the
  publisher's ``traceparent``: a consumer continues the publisher's trace.

The relay sets up no exporter: spans go to the global tracer provider, which
``opentelemetry-instrument`` (with the SDK and an exporter installed, configured by the
``OTEL_*`` variables) provides. Spans off, or OpenTelemetry missing, cost one boolean test.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from . import __version__
from .sinks.base import Failed, Outbound, Result

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Link, Span, Tracer, TracerProvider

    from .config import Route

log = logging.getLogger(__name__)

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
# W3C: list members of printable ASCII; 512 characters is what every vendor must pass on.
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")


def valid_traceparent(value: str) -> bool:
    """Version-00 form; the all-zero ids and version ``ff`` are invalid (W3C Trace Context)."""
    match = _TRACEPARENT.fullmatch(value)
    return (
        match is not None
        and not value.startswith("ff")
        and match[1] != "0" * 32
        and match[2] != "0" * 16
    )


def trace_headers(headers: Iterable[tuple[str, bytes]]) -> dict[str, str]:
    """A message's well-formed ``traceparent`` and ``tracestate``, by their lower-case names.

    A malformed ``traceparent`` is dropped, and so is any ``tracestate`` then (it means
    nothing without its parent); a malformed ``tracestate`` alone is dropped by itself.
    """
    found: dict[str, str] = {}
    for name, raw in headers:
        lowered = name.lower()
        if lowered in ("traceparent", "tracestate") and lowered not in found:
            found[lowered] = raw.decode("ascii", "replace").strip()
    parent = found.get("traceparent")
    if parent is None or not valid_traceparent(parent):
        return {}
    state = found.get("tracestate")
    if state is None or not _TRACESTATE.fullmatch(state):
        return {"traceparent": parent}
    return {"traceparent": parent, "tracestate": state}


@runtime_checkable
class Traced(Protocol):
    """Something that records spans through the :class:`Spans` it is given."""

    spans: Spans


@dataclass(frozen=True, slots=True)
class Spans:
    """The relay's span recorder; ``Spans()`` records nothing (the default everywhere)."""

    tracer: Tracer | None = None

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @classmethod
    def create(cls, enabled: bool, provider: TracerProvider | None = None) -> Spans:
        """Spans on the global tracer provider (or ``provider``), if enabled and possible."""
        if not enabled:
            return cls()
        try:
            from opentelemetry import trace  # noqa: PLC0415 -- optional dependency
        except ImportError:
            log.warning(
                "otel_spans is on but opentelemetry-api is not installed "
                "(pip install 'outbox-relay[otel]'); recording no spans"
            )
            return cls()
        return cls(trace.get_tracer("outbox-relay", __version__, provider))

    def claim(self, which: str, limit: int) -> ClaimSpan:
        """Time a claim: ``with spans.claim("first", n) as claim: ...; claim.count = k``."""
        assert self.tracer is not None, "check Spans.enabled first"
        return ClaimSpan(self.tracer, which, limit)

    @contextmanager
    def webhook(
        self, route: Route, message: Outbound, headers: dict[str, str]
    ) -> Iterator[DeliverSpan]:
        """A CLIENT span for one request, current meanwhile; rewrites ``headers``'s trace
        headers to this span's own."""
        from opentelemetry.trace import SpanKind, use_span  # noqa: PLC0415

        assert self.tracer is not None, "check Spans.enabled first"
        span = self.tracer.start_span(
            "outbox.deliver",
            context=_parent(trace_headers(message.headers)),
            kind=SpanKind.CLIENT,
            attributes={
                "outbox.route": route.name,
                "outbox.topic": message.topic,
                "messaging.message.id": str(message.id),
                "outbox.attempt": message.attempts + 1,
                "http.request.method": "POST",
            },
        )
        with use_span(span, end_on_exit=True, set_status_on_exception=True):
            _inject_current(headers)
            yield DeliverSpan(span)

    @contextmanager
    def kafka_batch(self, route: Route, batch: Sequence[Outbound]) -> Iterator[DeliverSpan]:
        """A PRODUCER span for one batch of one route, linked to each message's trace."""
        from opentelemetry.trace import SpanKind  # noqa: PLC0415

        assert self.tracer is not None, "check Spans.enabled first"
        topics = {route.target_topic(m.topic) for m in batch}
        attributes: dict[str, str | int] = {
            "outbox.route": route.name,
            "messaging.system": "kafka",
            "messaging.operation.type": "send",
            "messaging.batch.message_count": len(batch),
        }
        if len(topics) == 1:
            attributes["messaging.destination.name"] = next(iter(topics))
        with self.tracer.start_as_current_span(
            "outbox.deliver", kind=SpanKind.PRODUCER, attributes=attributes, links=_links(batch)
        ) as span:
            yield DeliverSpan(span)


class DeliverSpan:
    """What a sink tells the span about the outcome."""

    def __init__(self, span: Span) -> None:
        self.span = span

    def http_status(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)

    def results(self, results: Sequence[Result]) -> None:
        """Outcome of every message; the span is an error if any failed."""
        failures = [r for r in results if isinstance(r, Failed)]
        self.span.set_attribute("outbox.delivered", len(results) - len(failures))
        self.span.set_attribute("outbox.failed", len(failures))
        if failures:
            from opentelemetry.trace import StatusCode  # noqa: PLC0415

            first = failures[0]
            self.span.set_status(StatusCode.ERROR, f"{first.kind}: {first.reason}")


class ClaimSpan:
    """Times a claim and records it afterwards, and only if it found work or failed."""

    def __init__(self, tracer: Tracer, which: str, limit: int) -> None:
        self.count = 0
        self._tracer = tracer
        self._attributes: dict[str, str | int] = {"outbox.pass": which, "outbox.batch_size": limit}
        self._start = 0

    def __enter__(self) -> ClaimSpan:
        self._start = time.time_ns()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        failed = isinstance(exc, Exception)
        if not self.count and not failed:
            return
        span = self._tracer.start_span(
            "outbox.claim", attributes=self._attributes, start_time=self._start
        )
        span.set_attribute("outbox.claimed", self.count)
        if failed:
            from opentelemetry.trace import StatusCode  # noqa: PLC0415

            assert exc is not None
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, type(exc).__name__)
        span.end()


def _parent(carrier: dict[str, str]) -> Context:
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    return TraceContextTextMapPropagator().extract(carrier)


def _inject_current(headers: dict[str, str]) -> None:
    from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
        TraceContextTextMapPropagator,
    )

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    if carrier:  # a span with an invalid context (no provider, no parent) injects nothing
        headers.pop("traceparent", None)
        headers.pop("tracestate", None)
        headers.update(carrier)


def _links(batch: Sequence[Outbound]) -> list[Link]:
    """One link per distinct trace context in the batch."""
    from opentelemetry.trace import Link, get_current_span  # noqa: PLC0415

    seen: set[str] = set()
    links: list[Link] = []
    for message in batch:
        carrier = trace_headers(message.headers)
        parent = carrier.get("traceparent")
        if parent is None or parent in seen:
            continue
        seen.add(parent)
        links.append(Link(get_current_span(_parent(carrier)).get_span_context()))
    return links


def install(enabled: bool, targets: Iterable[Any], provider: TracerProvider | None = None) -> Spans:
    """Give every :class:`Traced` target (the store, the sinks) one :class:`Spans`.

    Called once by the relay at start-up, before anything is claimed.
    """
    spans = Spans.create(enabled, provider)
    for target in targets:
        if isinstance(target, Traced):
            target.spans = spans
    return spans
