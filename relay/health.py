"""The relay's HTTP endpoint, and the loop that keeps its gauges and readiness fresh.

``/metrics``  Prometheus text format (OpenMetrics when asked), from the relay's registry
``/healthz``  200 while the process is alive and its event loop turns; 503 if the loop has
              been stuck for :data:`STUCK_SECONDS` (a liveness probe restarts it)
``/readyz``   200 when the database answered the last check and no route's sink is failing
              for connectivity (broker unreachable or paused, endpoint refusing connections);
              503 otherwise, with the reasons, one per line

The server runs in its own threads (the standard library's WSGI server), so a scrape never
waits for the event loop and a busy loop never delays a scrape. Everything it serves is
computed by :class:`Observer` on the loop every ``metrics_refresh_seconds``: gauges read from
the database with indexed queries, the routes' state, and a metadata request to the Kafka
cluster (a paused broker keeps its connections open; only asking shows it is gone).
"""

from __future__ import annotations

import asyncio
import logging
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psycopg
from prometheus_client import make_wsgi_app

from .errors import RelayError, one_line
from .membership import Membership
from .metrics import Metrics
from .runtime import RouteRuntime, wait_any
from .sinks.kafka import KafkaSink
from .store import DB_ERRORS, Store

log = logging.getLogger(__name__)

STUCK_SECONDS = 30.0
PROBE_TIMEOUT = 2.0
DATABASE_TIMEOUT = 10.0

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class Health:
    """What ``/healthz`` and ``/readyz`` answer; written by the loop, read by the server."""

    reasons: tuple[str, ...] = ("starting",)
    tick: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return not self.reasons

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.tick < STUCK_SECONDS


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not news."""


def _app(metrics: Metrics, health: Health) -> Callable[[dict[str, Any], StartResponse], Any]:
    serve_metrics = make_wsgi_app(metrics.registry)

    def reply(start: StartResponse, status: str, body: str) -> list[bytes]:
        start(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [body.encode()]

    def app(environ: dict[str, Any], start: StartResponse) -> Any:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return serve_metrics(environ, start)
        if path == "/healthz":
            if health.alive:
                return reply(start, "200 OK", "ok\n")
            return reply(start, "503 Service Unavailable", "event loop stuck\n")
        if path == "/readyz":
            reasons = health.reasons
            if not reasons:
                return reply(start, "200 OK", "ready\n")
            return reply(start, "503 Service Unavailable", "".join(f"{r}\n" for r in reasons))
        if path == "/":
            return reply(start, "200 OK", "outbox-relay: /metrics /healthz /readyz\n")
        return reply(start, "404 Not Found", "not found\n")

    return app


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``port`` (0: any free port)."""

    def __init__(self, port: int, metrics: Metrics, health: Health) -> None:
        try:
            self._server = make_server(
                "", port, _app(metrics, health), _Server, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise RelayError(f"cannot serve metrics on port {port}: {exc.strerror}") from exc
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Observer:
    """Refreshes the database-derived gauges, route gauges and readiness, every ``every`` s."""

    metrics: Metrics
    health: Health
    store: Store
    routes: Sequence[RouteRuntime]
    membership: Membership
    every: float = 5.0

    async def run(self, stop: asyncio.Event) -> None:
        ticker = asyncio.create_task(self._tick(stop))
        try:
            while not stop.is_set():
                try:
                    await self.refresh()
                except Exception as exc:  # a bug here must not silence the gauges for good
                    log.exception("metrics refresh failed; trying again")
                    self.health.reasons = (f"metrics refresh failed: {one_line(exc)}",)
                    self.metrics.ready.set(0)
                await wait_any(stop, None, self.every)
        finally:
            ticker.cancel()

    async def _tick(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.health.tick = time.monotonic()
            await wait_any(stop, None, 1.0)

    async def refresh(self) -> None:
        """One round: never raises for an unreachable database or broker, it reports them."""
        reasons: list[str] = []
        database = await self._refresh_database()
        if database is not None:
            reasons.append(database)
        reasons.extend(await self._probe_sinks())
        m = self.metrics
        for runtime in self.routes:
            name = runtime.route.name
            m.route_disabled.labels(name).set(runtime.disabled is not None)
            m.route_paused.labels(name).set(runtime.disabled is None and runtime.pause_left() > 0)
            outage = runtime.unreachable()
            if outage is not None and runtime.disabled is None:
                reasons.append(f"route {name}: sink unreachable ({outage})")
        m.buckets_held.set(len(self.membership.buckets))
        self.health.reasons = tuple(dict.fromkeys(reasons))
        m.ready.set(self.health.ready)

    async def _refresh_database(self) -> str | None:
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                gauges = await self.store.gauges()
        except psycopg.errors.QueryCanceled:
            # The database answered, it is only slow to count a huge backlog: keep the last
            # values (outbox_gauges_refreshed_timestamp_seconds shows their age).
            log.warning("metrics: counting the pending messages took over 5 s; skipped")
            self.metrics.database_up.set(1)
            return None
        except TimeoutError:
            self.metrics.database_up.set(0)
            return f"database unreachable: no answer within {DATABASE_TIMEOUT:g} s"
        except DB_ERRORS as exc:
            self.metrics.database_up.set(0)
            return f"database unreachable: {one_line(exc)}"
        m = self.metrics
        m.database_up.set(1)
        m.set_topics(gauges.topics)
        m.set_dead_letters(gauges.dead_letters)
        m.buckets_unowned.set(gauges.unowned_buckets)
        m.relays_live.set(gauges.relays_live)
        m.refreshed.set(time.time())
        return None

    async def _probe_sinks(self) -> Iterable[str]:
        kafka = {id(r.sink): r.sink for r in self.routes if isinstance(r.sink, KafkaSink)}
        probes = [
            sink.probe(sink.known_topic, min(PROBE_TIMEOUT, self.every)) for sink in kafka.values()
        ]
        return [reason for reason in await asyncio.gather(*probes) if reason is not None]
