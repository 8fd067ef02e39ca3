"""Webhook senders without the relay's lanes: what the HTTP client itself reaches on this
machine, the relay's sink alone, and the naive relay most people write.

``httpx alone`` posts the backlog with the relay's headers (Standard Webhooks id, timestamp
and signature, user agent) from ``concurrency`` coroutines, no database, through an
``httpx.AsyncClient`` without proxy lookup, in two layouts: one client whose pool holds
``concurrency`` connections (the usual way), and one single-connection client per coroutine
(httpcore's pool examines every connection on every request, so small pools cost less).
The faster of the two is the ceiling of anything built on httpx here. The transports are
built here, not borrowed from the relay, so the ceiling stays what it says whatever the
relay's sink does. ``WebhookSink alone`` drives the relay's ``WebhookSink.deliver`` the same
way. The naive relay claims one row at a time (``SELECT ... LIMIT 1 FOR UPDATE SKIP
LOCKED``), posts it with a synchronous ``httpx.Client``, moves it to ``delivery`` and
commits, per message.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import psycopg

from outbox_lib._signature import parse_secrets, sign
from relay.config import Route
from relay.sinks.base import Delivered, Outbound
from relay.sinks.webhook import USER_AGENT, WebhookSink
from tests.harness.fast_webhook import FastStats, FastWebhookProcess

from . import workload as w
from .machine import tree_seconds
from .results import Throughput

CONTENT_TYPE = "application/json"
TIMEOUT_S = 10.0


@dataclass
class Endpoint:
    """A FastWebhookProcess the scenarios post to, and the secret they sign with."""

    server: FastWebhookProcess
    secret: str

    @property
    def url(self) -> str:
        return self.server.url()

    @property
    def keys(self) -> tuple[bytes, ...]:
        return parse_secrets(self.secret)

    def route(self, name: str, concurrency: int, topics: Sequence[str] = ("*",)) -> Route:
        return Route(
            name=name,
            topics=tuple(topics),
            sink="webhook",
            url=self.url,
            secret=self.secret,
            allow_private_network=True,
            concurrency=concurrency,
            timeout_s=TIMEOUT_S,
        )


@dataclass
class Meter:
    """CPU seconds between ``start`` and ``stop``: this process (the relay or the client),
    PostgreSQL (postmaster and every backend) and the endpoints (each a process tree)."""

    others: dict[str, psutil.Process | None]
    _began: dict[str, float] = field(default_factory=dict)

    def start(self) -> None:
        self._began = self._read()

    def stop(self) -> dict[str, float]:
        now = self._read()
        return {label: now[label] - self._began.get(label, 0.0) for label in now}

    def _read(self) -> dict[str, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        seconds = {"this process": usage.ru_utime + usage.ru_stime}
        for label, process in self.others.items():
            if process is not None:
                seconds[label] = seconds.get(label, 0.0) + tree_seconds(process)
        return seconds


def per_1000(cpu: dict[str, float], delivered: int) -> dict[str, float]:
    """CPU seconds per 1,000 deliveries, by process."""
    return {label: 1000 * spent / max(1, delivered) for label, spent in cpu.items()}


def server_checks(stats: FastStats, expected: int) -> dict[str, Any]:
    """What the endpoint saw: every message once (requests == ids == expected), signatures
    valid on the 1 request in 1000 it verifies."""
    ok = stats.requests == stats.ids == expected and stats.verify_failures == 0
    return {
        "requests": stats.requests,
        "ids": stats.ids,
        "verified": stats.verified,
        "verify_failures": stats.verify_failures,
        "endpoint_ok": ok,
    }


def backlog_messages(url: str, source: str, topic: str) -> list[Outbound]:
    """The backlog as the webhook sink sees it (the relay sends neither key nor headers)."""
    with w.connect(url) as conn:
        rows = conn.execute(w.query("webhook_records", source=source)).fetchall()
    now = dt.datetime.now(dt.UTC)
    return [
        Outbound(
            seq=n,
            id=id_,
            topic=topic,
            key=bytes(key),
            payload=bytes(payload),
            content_type=CONTENT_TYPE,
            headers=(),
            idempotency_key=None,
            created_at=now,
            attempts=0,
        )
        for n, id_, key, payload in rows
    ]


def signed_headers(
    keys: Sequence[bytes], webhook_id: str, payload: bytes, content_type: str
) -> dict[str, str]:
    """The headers ``WebhookSink.headers`` sends (the client adds the user agent)."""
    timestamp = int(time.time())
    return {
        "content-type": content_type,
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, webhook_id, timestamp, payload),
        "idempotency-key": webhook_id,
    }


Send = Callable[[Outbound], Awaitable[bool]]


async def _post_all(senders: Sequence[Send], messages: Sequence[Outbound]) -> tuple[float, int]:
    """Each sender a coroutine taking the next message until none is left: (seconds, ok)."""
    backlog = iter(messages)
    ok = 0

    async def worker(send: Send) -> None:
        nonlocal ok
        for message in backlog:
            answered = await send(message)  # not `ok += await ...`: that reads ok first
            ok += answered

    started = time.perf_counter()
    await asyncio.gather(*(worker(send) for send in senders))
    return time.perf_counter() - started, ok


def _httpx_sender(client: httpx.AsyncClient, endpoint: Endpoint) -> Send:
    url, keys = endpoint.url, endpoint.keys

    async def send(message: Outbound) -> bool:
        headers = signed_headers(keys, str(message.id), message.payload, message.content_type)
        response = await client.post(url, content=message.payload, headers=headers)
        return 200 <= response.status_code < 300

    return send


def _client(connections: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(limits=limits, trust_env=False),
        timeout=httpx.Timeout(TIMEOUT_S),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
    )


async def _httpx_loop(
    endpoint: Endpoint, messages: Sequence[Outbound], concurrency: int, split: bool, meter: Meter
) -> tuple[float, int, dict[str, float]]:
    """``split``: one client of one connection per coroutine, else one pool shared by all."""
    shared = None if split else _client(concurrency)
    clients = [_client(1) for _ in range(concurrency)] if split else [shared] * concurrency
    try:
        meter.start()
        seconds, ok = await _post_all([_httpx_sender(c, endpoint) for c in clients if c], messages)
        return seconds, ok, meter.stop()
    finally:
        for client in {id(c): c for c in clients if c}.values():
            await client.aclose()


def httpx_ceiling(
    endpoint: Endpoint,
    messages: Sequence[Outbound],
    concurrency: int,
    meter: Meter,
    split: bool = False,
) -> Throughput:
    """httpx alone, the relay's client settings and headers, no database."""
    layout = "1-connection client per coroutine" if split else "1 client, pool of conc."
    endpoint.server.reset()
    seconds, ok, cpu = asyncio.run(_httpx_loop(endpoint, messages, concurrency, split, meter))
    return _client_result(
        f"httpx alone, {layout}",
        "ceiling",
        endpoint,
        messages,
        concurrency,
        seconds,
        ok,
        cpu,
    )


async def _sink_loop(
    endpoint: Endpoint, messages: Sequence[Outbound], concurrency: int, meter: Meter
) -> tuple[float, int, dict[str, float]]:
    route = endpoint.route("sink", concurrency)
    sink = WebhookSink(route, endpoint.keys)

    async def send(message: Outbound) -> bool:
        return isinstance(await sink.deliver(message), Delivered)

    try:
        meter.start()
        seconds, ok = await _post_all([send] * concurrency, messages)
        return seconds, ok, meter.stop()
    finally:
        await sink.close()


def sink_ceiling(
    endpoint: Endpoint, messages: Sequence[Outbound], concurrency: int, meter: Meter
) -> Throughput:
    """The relay's WebhookSink.deliver in a loop, no database, no lane."""
    endpoint.server.reset()
    seconds, ok, cpu = asyncio.run(_sink_loop(endpoint, messages, concurrency, meter))
    return _client_result(
        "WebhookSink.deliver alone",
        "sink",
        endpoint,
        messages,
        concurrency,
        seconds,
        ok,
        cpu,
    )


def _client_result(
    name: str,
    kind: str,
    endpoint: Endpoint,
    messages: Sequence[Outbound],
    concurrency: int,
    seconds: float,
    ok: int,
    cpu: dict[str, float],
) -> Throughput:
    checks = server_checks(endpoint.server.stats(), len(messages))
    status = "ok" if ok == len(messages) and checks["endpoint_ok"] else "failed"
    note = (
        f"no DB; {ok:,} of {len(messages):,} answered 2xx; endpoint saw "
        f"{checks['requests']:,} requests, {checks['ids']:,} ids"
    )
    return Throughput(
        f"{name}, concurrency {concurrency}",
        ok,
        seconds,
        status=status,
        note=note,
        details={
            "kind": kind,
            "concurrency": concurrency,
            "server": checks,
            "cpu_seconds": cpu,
            "cpu_s_per_1000": per_1000(cpu, ok),
        },
    )


# --- the naive relay ------------------------------------------------------------------------


def naive_webhook(
    url: str, source: str, endpoint: Endpoint, cap: float, meter: Meter
) -> Throughput:
    """One row per transaction: claim, signed POST, DELETE ... INSERT INTO delivery, COMMIT."""
    schema = "bench_wh_naive"
    w.load_outbox(url, schema, "wh.naive", source)
    w.checkpoint(url)
    wal_before = w.wal_lsn(url)
    expected = w.count_rows(url, schema, "message")
    try:
        endpoint.server.reset()
        delivered, seconds, cpu = _naive_loop(url, schema, endpoint, cap, meter)
        wal = w.wal_bytes_since(url, wal_before)
        left = w.count_rows(url, schema, "message")
    finally:
        w.drop_schema(url, schema)
    checks = server_checks(endpoint.server.stats(), delivered)
    rate = delivered / seconds if seconds else 0.0
    done = left == 0 and delivered == expected
    if done:
        note = "drained"
    elif rate:
        note = (
            f"capped at {cap:.0f} s: {delivered:,} of {expected:,}; all would take "
            f"~{expected / rate:.0f} s (extrapolated)"
        )
    else:
        note = "nothing sent"
    note += "; synchronous_commit on (the session default)"
    return Throughput(
        "naive relay (1 row/txn, sync httpx)",
        delivered,
        seconds,
        status="ok" if done else "partial",
        note=note,
        details={
            "kind": "naive",
            "concurrency": 1,
            "server": checks,
            "cpu_seconds": cpu,
            "cpu_s_per_1000": per_1000(cpu, delivered),
            "message_rows_left": left,
            "wal_bytes_per_message": wal / max(1, delivered),
        },
    )


def _naive_loop(
    url: str, schema: str, endpoint: Endpoint, cap: float, meter: Meter
) -> tuple[int, float, dict[str, float]]:
    """(delivered, seconds, CPU): the meter stops before the connection closes, while its
    backend is still a live child of the postmaster (an exited one is counted only once
    the postmaster has reaped it)."""
    claim = w.query("naive_webhook_claim", schema=schema)
    record = w.query("naive_webhook_record", schema=schema)
    keys, delivered = endpoint.keys, 0
    with (
        psycopg.connect(url) as conn,
        httpx.Client(
            timeout=TIMEOUT_S,
            trust_env=False,
            follow_redirects=False,
            headers={"user-agent": USER_AGENT},
        ) as client,
    ):
        meter.start()
        started = time.perf_counter()
        while time.perf_counter() - started < cap:
            with conn.transaction():
                row = conn.execute(claim).fetchone()
                if row is None:
                    break
                seq, id_, payload, content_type = row
                body = bytes(payload)
                headers = signed_headers(keys, str(id_), body, content_type)
                response = client.post(endpoint.url, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    raise RuntimeError(f"naive webhook relay: HTTP {response.status_code}")
                conn.execute(record, {"seq": seq, "route": "naive"})
            delivered += 1
        seconds = time.perf_counter() - started
        return delivered, seconds, meter.stop()
