"""W3C trace context for ``publish``: the active span's ``traceparent``, stored with the message.

When ``opentelemetry-api`` is installed (the ``otel`` extra) and the caller's context holds a
valid span, :func:`with_trace_context` adds ``traceparent`` (and ``tracestate`` when it is
not empty) to the message headers, so a consumer can continue the publisher's trace. Only the
TraceContext propagator is used, never the globally configured one: that may add baggage or
vendor headers, and those would be stored and sent to every sink.

Headers the caller gives win: a ``traceparent`` (any case) among them turns this off. Without
OpenTelemetry, or without an active span, the headers pass through untouched; that costs one
cached import lookup, or one context-variable read.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.trace import Span

TRACE_HEADERS = ("traceparent", "tracestate")

Inject = Callable[[dict[str, str]], None]


@functools.cache
def _otel() -> tuple[Callable[[], Span], Inject] | None:
    """The current-span getter and a TraceContext injector, or None without OpenTelemetry.

    Imported on the first publish, not with ``outbox_lib``; the answer is kept for the
    process (OpenTelemetry does not come and go).
    """
    try:
        from opentelemetry import trace  # noqa: PLC0415 -- optional dependency
        from opentelemetry.trace.propagation.tracecontext import (  # noqa: PLC0415
            TraceContextTextMapPropagator,
        )
    except ImportError:
        return None
    return trace.get_current_span, TraceContextTextMapPropagator().inject


def with_trace_context(headers: object) -> object:
    """``headers`` plus the current span's W3C trace headers, when there are any to add.

    Anything that is not a mapping is returned as is, for :func:`encode_headers` to refuse.
    """
    otel = _otel()
    if otel is None:
        return headers
    current_span, inject = otel
    if not current_span().get_span_context().is_valid:
        return headers
    if headers is not None and not isinstance(headers, Mapping):
        return headers
    given = {name.lower() for name in headers or () if isinstance(name, str)}
    if "traceparent" in given:
        return headers
    carrier: dict[str, str] = {}
    inject(carrier)
    added = {name: value for name, value in carrier.items() if name not in given}
    return {**headers, **added} if headers else added
