"""Webhook sink: one signed ``POST`` per message, per Standard Webhooks.

Every attempt carries the same ``webhook-id`` (the message's idempotency key, or its id) and
a fresh ``webhook-timestamp`` and ``webhook-signature``; the outbox topic (``outbox-topic``,
signed with id, timestamp and body in ``outbox-topic-signature``: deduplication is per
topic) and ``outbox-message-id``; and the message's W3C ``traceparent`` and ``tracestate``
when well formed (:func:`relay.tracing.trace_headers`). No other message header is sent.
Redirects are not followed. The route's lane (:mod:`relay.lanes`) decides how many requests
run at once; this module only sends one request and says what its answer means
(:func:`classify_response`).

Connections go through :class:`GuardedBackend`, which resolves the host itself and refuses
non-public addresses (:mod:`relay.sinks.ssrf`) right before connecting, so a DNS answer that
changes after the configuration was checked cannot reach an internal service.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import socket
import ssl
import time
import typing
from collections.abc import Callable, Iterable, Sequence

import httpcore
import httpx

from outbox_lib._signature import sign, topic_header

from .. import __version__
from ..config import Route
from ..errors import one_line
from ..tracing import Spans, trace_headers
from .base import SHUTDOWN, Delivered, Failed, FailureScope, KeyGate, Outbound, Result
from .ssrf import blocked_reason, literal_ip

log = logging.getLogger(__name__)

USER_AGENT = f"outbox-relay/{__version__}"
# Statuses the contract retries (besides 5xx); every other 4xx is dead-lettered at once.
RETRY_STATUSES = frozenset({408, 409, 425, 429})
# Answers about the endpoint as a whole: the route pauses instead of trying the next message.
ENDPOINT_STATUSES = frozenset({429, 503})
_EXCERPT = 200
# The reason of a message no request can carry (dead-lettered at once).
UNSENDABLE = "unsendable"

Resolver = Callable[[str, int], typing.Awaitable[list[str]]]


class BlockedAddressError(Exception):
    """The webhook's host resolves only to addresses the SSRF guard refuses."""


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, checking every resolved address before connecting."""

    def __init__(self, resolver: Resolver = resolve) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._resolve = resolver

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self._addresses(host, port, timeout)
        allowed = [a for a in addresses if blocked_reason(a) is None]
        if not allowed:
            first = addresses[0]
            raise BlockedAddressError(
                f"{host} resolves to {first} ({blocked_reason(first)}); refused by the SSRF "
                "guard (allow_private_network = true allows it)"
            )
        error: httpcore.ConnectError | None = None
        for address in allowed:  # the first address that answers, like a browser would
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                error = exc
        assert error is not None
        raise error

    async def _addresses(self, host: str, port: int, timeout: float | None) -> list[str]:
        literal = literal_ip(host)
        if literal is not None:
            return [str(literal)]
        try:
            addresses = await asyncio.wait_for(self._resolve(host, port), timeout)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        if not addresses:
            raise httpcore.ConnectError(f"{host} resolves to no address")
        return addresses

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise BlockedAddressError("unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def transport_for(
    route: Route, ssl_context: ssl.SSLContext | None = None, resolver: Resolver = resolve
) -> httpx.AsyncHTTPTransport:
    """An httpx transport holding one kept-alive connection to the route's endpoint.

    Unless the route allows private networks, the transport's connection pool is replaced by
    one on :class:`GuardedBackend` (httpx does not take a network backend; the SSRF tests
    fail should a new httpx version stop using ``_pool``).
    """
    ssl_context = ssl_context or httpx.create_ssl_context(trust_env=False)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    transport = httpx.AsyncHTTPTransport(verify=ssl_context, limits=limits, trust_env=False)
    if route.allow_private_network:
        return transport
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=1,
        max_keepalive_connections=1,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=GuardedBackend(resolver),
    )
    return transport


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def classify_response(status: int, headers: httpx.Headers, body: bytes = b"") -> Result:
    """What an HTTP answer means for the message (CONTRACT section 5)."""
    if 200 <= status < 300:
        return Delivered()
    reason = f"HTTP {status}"
    detail = _excerpt(body)
    wait = retry_after(headers.get("retry-after"))
    if status == 410:
        return Failed("gone", reason, detail or "the endpoint no longer exists")
    if 300 <= status < 400:
        where = headers.get("location", "?")
        return Failed("retry", reason, f"redirect to {where} not followed", wait)
    if 400 <= status < 500 and status not in RETRY_STATUSES:
        return Failed("permanent", reason, detail)
    scope: FailureScope = "endpoint" if status in ENDPOINT_STATUSES else "message"
    return Failed("retry", reason, detail, wait, scope)


def classify_error(exc: httpx.HTTPError | BlockedAddressError, timeout: float) -> Failed:
    """A request that got no answer. Connecting failures concern the whole endpoint."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, BlockedAddressError):
        return Failed("permanent", "blocked address", text)
    if isinstance(exc, httpx.LocalProtocolError):  # e.g. a header value with a line break
        return Failed("permanent", UNSENDABLE, f"the request is not valid HTTP: {text}")
    if isinstance(exc, httpx.ConnectTimeout):
        return Failed("retry", "connect timeout", text, scope="endpoint")
    if isinstance(exc, httpx.TimeoutException):
        return Failed("retry", "timeout", f"no answer within {timeout:g} s")
    if isinstance(exc, httpx.ConnectError):
        refused = _caused_by(exc, ConnectionRefusedError)
        if refused is not None:
            return Failed("retry", "connection refused", str(refused), scope="endpoint")
        return Failed("retry", "connect error", text, scope="endpoint")
    return Failed("retry", "connection error", text)


def _caused_by(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first ``kind`` among the causes of ``exc`` (httpx wraps, anyio wraps again)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _excerpt(body: bytes) -> str:
    text = body[:_EXCERPT].decode("utf-8", "replace")
    return " ".join(text.split()) + ("..." if len(body) > _EXCERPT else "")


class WebhookSink:
    """Signed deliveries to one route's URL, straight through httpx transports.

    Each request in flight uses a transport of its own, with one kept-alive connection,
    taken from a free list (at most ``concurrency`` exist). One client with a pool of many
    connections would be simpler, but httpcore's pool examines every connection on every
    request: at 64 connections that tripled the CPU spent per request. The client layer
    (auth, cookies, redirects, event hooks) is skipped too: the sink needs none of it, and
    it cost a quarter of the time of a request (see the README's webhook figures).
    """

    def __init__(
        self,
        route: Route,
        keys: Sequence[bytes],
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not route.url:
            raise ValueError(f"route {route.name!r} has no url")
        self.route = route
        self._url = httpx.URL(route.url)
        self._keys = tuple(keys)
        self._clock = clock
        self._transport = transport  # tests: one shared (mock) transport
        self._ssl = httpx.create_ssl_context(trust_env=False) if transport is None else None
        self._idle: list[httpx.AsyncBaseTransport] = []
        self._transports: list[httpx.AsyncBaseTransport] = []
        self._timeout = httpx.Timeout(route.timeout_s).as_dict()
        self._requests: set[asyncio.Task[Result]] = set()
        self.spans = Spans()

    def _checkout(self) -> httpx.AsyncBaseTransport:
        if self._idle:
            return self._idle.pop()
        if self._transport is not None:
            return self._transport
        transport = transport_for(self.route, self._ssl)
        self._transports.append(transport)
        return transport

    def _checkin(self, transport: httpx.AsyncBaseTransport) -> None:
        if transport is not self._transport:
            self._idle.append(transport)

    def headers(self, message: Outbound) -> dict[str, str]:
        """This attempt's headers: same id every time, fresh timestamp and signatures, the
        topic, and the message's well-formed trace headers (which no signature covers)."""
        webhook_id = message.delivery_key
        timestamp = int(self._clock())
        topic = topic_header(message.topic)
        body = message.payload
        return {
            "content-type": message.content_type,
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._keys, webhook_id, timestamp, body),
            "idempotency-key": webhook_id,
            "outbox-topic": topic,
            "outbox-topic-signature": sign(self._keys, webhook_id, timestamp, body, topic=topic),
            "outbox-message-id": str(message.id),
            "user-agent": USER_AGENT,
            **trace_headers(message.headers),
        }

    async def deliver(self, message: Outbound) -> Result:
        """One attempt; cancelled by :meth:`abort` it reports ``unavailable``."""
        task = asyncio.ensure_future(self._post(message))
        self._requests.add(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # aborted: the endpoint may or may not have it
                return Failed("unavailable", SHUTDOWN, "relay stopped before the answer")
            raise
        finally:
            self._requests.discard(task)

    async def _post(self, message: Outbound) -> Result:
        headers = self.headers(message)
        if not self.spans.enabled:
            return (await self._send(message, headers))[1]
        with self.spans.webhook(self.route, message, headers) as span:  # adds traceparent
            status, result = await self._send(message, headers)
            if status is not None:
                span.http_status(status)
            span.results([result])
        return result

    async def _send(self, message: Outbound, headers: dict[str, str]) -> tuple[int | None, Result]:
        try:
            request = httpx.Request(
                "POST",
                self._url,
                content=message.payload,
                headers=headers,
                extensions={"timeout": self._timeout},
            )
        except (UnicodeError, ValueError, TypeError) as exc:
            # Not the endpoint's fault, and no retry would change it: dead-letter the message
            # with the reason, and let the rest of its key go on.
            detail = f"cannot build the request: {one_line(exc)}"
            return None, Failed("permanent", UNSENDABLE, detail)
        return await self._request(request)

    async def _request(self, request: httpx.Request) -> tuple[int | None, Result]:
        """The HTTP status (None without an answer) and what it means for the message."""
        transport = self._checkout()
        try:
            response = await transport.handle_async_request(request)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        except (httpx.HTTPError, BlockedAddressError) as exc:
            return None, classify_error(exc, self.route.timeout_s)
        finally:
            self._checkin(transport)
        status = response.status_code
        return status, classify_response(status, response.headers, body)

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        """The batch in order, one request at a time (lanes call :meth:`deliver` instead)."""
        gate = KeyGate()
        results: list[Result] = []
        for message in batch:
            result = gate.check(message) or await self.deliver(message)
            gate.record(message, result)
            results.append(result)
        return results

    def abort(self) -> None:
        for task in list(self._requests):
            task.cancel()

    async def close(self) -> None:
        transports, self._transports, self._idle = self._transports, [], []
        if self._transport is not None:
            transports.append(self._transport)
        for transport in transports:
            await transport.aclose()
