"""The webhook sink's request and retry policy, with httpx's MockTransport (no sockets).

The same behaviour against real HTTP servers is in tests/integration/test_webhooks.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import email.utils
import uuid
from collections.abc import Callable
from typing import Any

import httpcore
import httpx
import pytest
from standardwebhooks import Webhook

from outbox_lib._signature import SecretError, parse_secrets, sign
from outbox_lib.inbox import WebhookReceiver, WebhookVerificationError
from relay.backoff import Backoff
from relay.config import Route
from relay.plan import Dead, Pending, verdict
from relay.runtime import MAX_RETRY_AFTER, RouteRuntime
from relay.sinks.base import Delivered, Failed, Outbound
from relay.sinks.ssrf import blocked_reason
from relay.sinks.webhook import (
    BlockedAddressError,
    GuardedBackend,
    WebhookSink,
    classify_response,
    retry_after,
)

SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()


def route(**overrides: Any) -> Route:
    values: dict[str, Any] = {
        "name": "hook",
        "topics": ("orders.*",),
        "sink": "webhook",
        "url": "https://hooks.example/orders",
        "secret": SECRET,
        "max_attempts": 5,
        "backoff_initial_s": 1.0,
        "backoff_max_s": 60.0,
    }
    values.update(overrides)
    return Route(**values)


def message(attempts: int = 0, idempotency_key: str | None = None, **kw: Any) -> Outbound:
    values: dict[str, Any] = {
        "seq": 1,
        "id": uuid.UUID("00000000-0000-4000-8000-000000000007"),
        "topic": "orders.created",
        "key": b"7",
        "payload": b'{"order_id": 7}',
        "content_type": "application/json",
        "headers": (),
        "idempotency_key": idempotency_key,
        "created_at": dt.datetime.now(dt.UTC),
        "attempts": attempts,
    }
    values.update(kw)
    return Outbound(**values)


def sink_answering(
    handler: Callable[[httpx.Request], httpx.Response], r: Route | None = None, now: float = 0
) -> tuple[WebhookSink, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    r = r or route()
    clock = (lambda: now) if now else None
    sink = WebhookSink(r, parse_secrets(r.secret or ""), httpx.MockTransport(record), **(
        {"clock": clock} if clock else {}
    ))  # fmt: skip
    return sink, seen


def deliver(sink: WebhookSink, m: Outbound) -> Any:
    async def go() -> Any:
        try:
            return await sink.deliver(m)
        finally:
            await sink.close()

    return asyncio.run(go())


# --- headers and signatures ----------------------------------------------------------------


def test_request_carries_the_contract_headers_and_a_verifiable_signature() -> None:
    sink, seen = sink_answering(lambda _: httpx.Response(204))
    assert deliver(sink, message(idempotency_key="order-7-created")) == Delivered()
    (request,) = seen
    assert request.method == "POST"
    assert str(request.url) == "https://hooks.example/orders"
    assert request.content == b'{"order_id": 7}'
    h = request.headers
    assert h["content-type"] == "application/json"
    assert h["webhook-id"] == h["idempotency-key"] == "order-7-created"
    headers = {k: v for k, v in h.items()}
    assert Webhook(SECRET).verify(request.content, headers) == {"order_id": 7}
    assert h["outbox-message-id"] == "00000000-0000-4000-8000-000000000007"
    received = WebhookReceiver(SECRET).verify(headers, request.content)
    assert (received.idempotency_key, received.topic) == ("order-7-created", "orders.created")


@pytest.mark.parametrize(
    ("topic", "sent"),
    [
        ("orders.created", "orders.created"),
        ("bestellungen.größe", "bestellungen.gr%C3%B6%C3%9Fe"),
        ("50%.off", "50%25.off"),
    ],
)
def test_the_topic_travels_signed_and_percent_encoded_where_needed(topic: str, sent: str) -> None:
    sink, seen = sink_answering(lambda _: httpx.Response(204))
    deliver(sink, message(topic=topic, idempotency_key="order-7"))
    headers = dict(seen[0].headers.items())
    assert headers["outbox-topic"] == sent
    assert WebhookReceiver(SECRET).verify(headers, seen[0].content).topic == topic
    forged = {**headers, "outbox-topic": "orders.paid"}
    with pytest.raises(WebhookVerificationError, match="outbox-topic-signature"):
        WebhookReceiver(SECRET).verify(forged, seen[0].content)


def test_webhook_id_is_the_message_id_without_an_idempotency_key() -> None:
    sink, seen = sink_answering(lambda _: httpx.Response(200))
    deliver(sink, message())
    assert seen[0].headers["webhook-id"] == "00000000-0000-4000-8000-000000000007"


def test_each_attempt_gets_its_own_timestamp_and_signature_with_the_same_id() -> None:
    times = iter([1_700_000_000.0, 1_700_000_300.0])
    sink = WebhookSink(route(), parse_secrets(SECRET), clock=lambda: next(times))
    first, second = sink.headers(message()), sink.headers(message(attempts=1))
    assert first["webhook-id"] == second["webhook-id"]
    assert (first["webhook-timestamp"], second["webhook-timestamp"]) == (
        "1700000000",
        "1700000300",
    )
    assert first["webhook-signature"] != second["webhook-signature"]
    asyncio.run(sink.close())


def test_several_secrets_sign_with_each_so_rotation_never_breaks_a_receiver() -> None:
    r = route(secret=f"{SECRET} {OTHER}")
    sink, seen = sink_answering(lambda _: httpx.Response(200), r)
    deliver(sink, message())
    headers = dict(seen[0].headers.items())
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (SECRET, OTHER):  # a receiver that knows either secret accepts it
        Webhook(secret).verify(seen[0].content, headers)


def test_signature_covers_the_exact_body_bytes() -> None:
    key = parse_secrets(SECRET)
    body = b"\x00\xff binary"
    assert sign(key, "id", 5, body) != sign(key, "id", 5, body + b" ")
    assert sign(key, "id", 5, body).startswith("v1,")


@pytest.mark.parametrize("bad", ["", "   ", "whsec_", "whsec_not base64!", "whsec_@@@@"])
def test_bad_secrets_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(SecretError) as info:
        parse_secrets(bad)
    secret_part = bad.strip().removeprefix("whsec_")
    if secret_part:
        assert secret_part not in str(info.value)


def test_redirects_are_not_followed() -> None:
    sink, seen = sink_answering(
        lambda _: httpx.Response(302, headers={"location": "https://elsewhere.example/"})
    )
    result = deliver(sink, message())
    assert len(seen) == 1
    assert isinstance(result, Failed) and result.kind == "retry"
    assert result.reason == "HTTP 302" and "not followed" in result.detail


# --- status handling (CONTRACT section 5) ---------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify_response(status, httpx.Headers()) == Delivered()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 413, 422])
def test_other_4xx_are_dead_lettered_at_once(status: int) -> None:
    result = classify_response(status, httpx.Headers(), b"bad payload")
    assert result == Failed("permanent", f"HTTP {status}", "bad payload")


@pytest.mark.parametrize("status", [408, 409, 425, 429, 500, 502, 503, 504])
def test_retryable_statuses(status: int) -> None:
    result = classify_response(status, httpx.Headers())
    assert isinstance(result, Failed) and result.kind == "retry"


def test_410_disables_the_endpoint() -> None:
    result = classify_response(410, httpx.Headers())
    assert isinstance(result, Failed) and result.kind == "gone"
    v = verdict(result, 0, 12, 5.0, 0.0)
    assert isinstance(v, Dead) and v.reason.startswith("endpoint gone (HTTP 410)")


def test_429_and_503_concern_the_whole_endpoint_500_only_the_message() -> None:
    for status in (429, 503):
        result = classify_response(status, httpx.Headers())
        assert isinstance(result, Failed) and result.scope == "endpoint"
    result = classify_response(500, httpx.Headers())
    assert isinstance(result, Failed) and result.scope == "message"


def test_long_bodies_are_cut_in_the_recorded_error() -> None:
    result = classify_response(500, httpx.Headers(), b"x" * 5000)
    assert isinstance(result, Failed) and result.detail == "x" * 200 + "..."


# --- Retry-After and backoff ------------------------------------------------------------------


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    assert retry_after("120") == 120.0
    assert retry_after(" 3 ") == 3.0
    when = email.utils.formatdate(1_000_030.0, usegmt=True)
    assert retry_after(when, now=1_000_000.0) == pytest.approx(30.0)
    assert retry_after(email.utils.formatdate(1.0, usegmt=True), now=100.0) == 0.0
    assert retry_after("soon") is None
    assert retry_after(None) is None


def judge(r: Route, result: Failed, attempts: int) -> Any:
    """What the engine records: the backoff, never sooner than Retry-After (up to a day)."""
    runtime = RouteRuntime(r, None, Backoff(r.first_backoff, r.max_backoff))  # type: ignore[arg-type]
    backoff = runtime.backoff.delay(attempts + 1)
    if result.retry_after is not None:
        backoff = max(backoff, min(result.retry_after, MAX_RETRY_AFTER))
    return verdict(result, attempts, r.max_attempts, backoff, runtime.pause_left())


def test_retry_after_longer_than_the_backoff_wins() -> None:
    result = classify_response(429, httpx.Headers({"retry-after": "40"}))
    assert isinstance(result, Failed)
    v = judge(route(backoff_initial_s=1.0), result, 0)
    assert isinstance(v, Pending) and v.delay == 40.0 and v.attempts == 1


def test_retry_after_beyond_backoff_max_is_still_honoured_up_to_a_day() -> None:
    result = classify_response(503, httpx.Headers({"retry-after": "600"}))
    assert isinstance(result, Failed)
    v = judge(route(backoff_max_s=60.0), result, 0)
    assert isinstance(v, Pending) and v.delay == 600.0
    result = classify_response(503, httpx.Headers({"retry-after": str(10**9)}))
    assert isinstance(result, Failed)
    v = judge(route(backoff_max_s=60.0), result, 0)
    assert isinstance(v, Pending) and v.delay == MAX_RETRY_AFTER


def test_backoff_doubles_with_jitter_until_the_cap_then_dead_letters() -> None:
    r = route(backoff_initial_s=5.0, backoff_max_s=100.0, max_attempts=6)
    result = classify_response(500, httpx.Headers())
    assert isinstance(result, Failed)
    delays = []
    for attempts in range(5):
        v = judge(r, result, attempts)
        assert isinstance(v, Pending) and v.attempts == attempts + 1
        delays.append(v.delay)
    for n, delay in enumerate(delays):  # 5, 10, 20, 40, 80 plus up to 5 s of jitter, capped
        base = min(5.0 * 2**n, 100.0)
        assert base <= delay <= min(base + 5.0, 100.0)
    last = judge(r, result, 5)
    assert isinstance(last, Dead) and last.attempts == 6
    assert last.reason == "max attempts reached (HTTP 500)" and last.status == "HTTP 500"


def test_endpoint_failures_pause_the_route_for_retry_after() -> None:
    r = route()
    runtime = RouteRuntime(r, None, Backoff(r.first_backoff, r.max_backoff))  # type: ignore[arg-type]
    runtime.observe_endpoint(classify_response(429, httpx.Headers({"retry-after": "7"})))
    assert 6.5 < runtime.pause_left() <= 7.0
    runtime.observe_endpoint(classify_response(500, httpx.Headers()))  # one message: no change
    assert runtime.pause_left() > 6.5
    runtime.observe_endpoint(Delivered())
    assert runtime.pause_left() == 0


# --- transport failures --------------------------------------------------------------------


def failing(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def _wrapped_refusal() -> httpx.ConnectError:
    """What httpx raises: anyio wraps the refusal in its own OSError first."""
    refused = ConnectionRefusedError(111, "Connection refused")
    anyio_error = OSError("All connection attempts failed")
    anyio_error.__cause__ = refused
    error = httpx.ConnectError("All connection attempts failed")
    error.__cause__ = anyio_error
    return error


def test_refused_connection_is_retried_and_pauses_the_endpoint() -> None:
    sink, _ = sink_answering(failing(_wrapped_refusal()))
    result = deliver(sink, message())
    assert result == Failed(
        "retry", "connection refused", "[Errno 111] Connection refused", scope="endpoint"
    )


def test_other_connect_failures_are_connect_errors_of_the_endpoint() -> None:
    sink, _ = sink_answering(failing(httpx.ConnectError("Name or service not known")))
    result = deliver(sink, message())
    assert result == Failed("retry", "connect error", "Name or service not known", scope="endpoint")


def test_read_timeout_is_retried_for_this_message_only() -> None:
    sink, _ = sink_answering(failing(httpx.ReadTimeout("timed out")), route(timeout_s=3))
    result = deliver(sink, message())
    assert isinstance(result, Failed)
    assert (result.kind, result.reason, result.scope) == ("retry", "timeout", "message")


def test_blocked_address_is_dead_lettered() -> None:
    sink, _ = sink_answering(failing(BlockedAddressError("hooks.example resolves to 10.0.0.5")))
    result = deliver(sink, message())
    assert isinstance(result, Failed) and result.kind == "permanent"
    assert result.reason == "blocked address"


def test_a_request_that_is_not_valid_http_is_dead_lettered_at_once() -> None:
    sink, _ = sink_answering(failing(httpx.LocalProtocolError("Illegal header value b'a\\nb'")))
    result = deliver(sink, message())
    assert result == Failed(
        "permanent", "unsendable", "the request is not valid HTTP: Illegal header value b'a\\nb'"
    )


def test_a_webhook_id_no_header_can_carry_is_dead_lettered_without_a_request() -> None:
    sink, seen = sink_answering(lambda request: httpx.Response(200))
    result = deliver(sink, message(idempotency_key="bestellung-ü-1"))
    assert isinstance(result, Failed) and (result.kind, result.reason) == (
        "permanent",
        "unsendable",
    )
    assert result.detail.startswith("cannot build the request: ")
    assert seen == []


# --- SSRF guard: the address is checked after resolution, at connect time ----------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.9.9.9", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1",
        "169.254.169.254", "fd00:ec2::254", "100.100.100.200", "100.64.0.1", "0.0.0.0",
        "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "64:ff9b::a00:1",
        "224.0.0.1", "255.255.255.255",
    ],
)  # fmt: skip
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert blocked_reason(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert blocked_reason(address) is None


class _Recorder(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        self.connected: list[str] = []

    async def connect_tcp(self, host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        self.connected.append(host)
        raise httpcore.ConnectError("test backend never connects")


def guarded(answers: list[list[str]]) -> tuple[GuardedBackend, _Recorder]:
    calls = iter(answers)

    async def resolver(host: str, port: int) -> list[str]:
        return next(calls)

    backend = GuardedBackend(resolver)
    recorder = _Recorder()
    backend._inner = recorder  # type: ignore[assignment]
    return backend, recorder


def test_a_name_resolving_to_a_private_address_is_refused_before_connecting() -> None:
    backend, recorder = guarded([["10.0.0.5"]])
    with pytest.raises(BlockedAddressError, match=r"10\.0\.0\.5 \(private\)"):
        asyncio.run(backend.connect_tcp("hooks.example", 443))
    assert recorder.connected == []


def test_dns_rebinding_is_caught_on_the_next_connection() -> None:
    backend, recorder = guarded([["93.184.216.34"], ["127.0.0.1"]])
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("hooks.example", 443))
    assert recorder.connected == ["93.184.216.34"]
    with pytest.raises(BlockedAddressError):
        asyncio.run(backend.connect_tcp("hooks.example", 443))
    assert recorder.connected == ["93.184.216.34"]


def test_only_public_addresses_of_a_mixed_answer_are_tried() -> None:
    backend, recorder = guarded([["10.0.0.5", "93.184.216.34", "::1", "8.8.8.8"]])
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(backend.connect_tcp("hooks.example", 443))
    assert recorder.connected == ["93.184.216.34", "8.8.8.8"]


def test_literal_ip_hosts_are_checked_without_resolving() -> None:
    backend, recorder = guarded([])
    with pytest.raises(BlockedAddressError, match="loopback"):
        asyncio.run(backend.connect_tcp("127.0.0.1", 80))
    assert recorder.connected == []


def test_the_fast_outbound_constructor_builds_the_same_frozen_message() -> None:
    import dataclasses
    import datetime as dt
    import uuid

    from relay.sinks.base import Outbound, new_outbound

    values = (7, uuid.uuid4(), "t", b"k", b"{}", "application/json", (("h", b"v"),), "idem",
              dt.datetime.now(dt.UTC), 2)  # fmt: skip
    built = new_outbound(*values)
    assert built == Outbound(*values)
    assert [getattr(built, f.name) for f in dataclasses.fields(Outbound)] == list(values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.seq = 8  # type: ignore[misc]
