"""Wire settings into a running relay: store, sinks, engine, signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

from outbox_lib import DatabaseUnavailableError, SchemaNotMigratedError

from . import tracing
from .backoff import Backoff
from .config import Route, Settings, order_warnings, signing_keys
from .db import describe_connect_error, redact, to_libpq
from .engine import Engine, Stats
from .errors import ConfigError
from .health import Health, MetricsServer, Observer
from .logs import tag_relay
from .membership import Membership
from .runtime import RouteRuntime
from .sinks.base import Sink
from .sinks.kafka import KafkaSink
from .sinks.webhook import WebhookSink
from .store import DB_ERRORS, Store, check_format

log = logging.getLogger(__name__)

SCHEMA_VERSION = 10

Started = TypeVar("Started")


def new_relay_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def build_routes(settings: Settings) -> list[RouteRuntime]:
    """One runtime per route; every Kafka route shares one producer."""
    routes = settings.effective_routes()
    if not routes:
        raise ConfigError(
            "no routes: set OUTBOX_KAFKA_BOOTSTRAP_SERVERS (every topic to Kafka) "
            "or add [[routes]] to the config file"
        )
    kafka: KafkaSink | None = None
    runtimes = []
    for route in routes:
        sink: Sink
        if route.sink == "webhook":
            sink = WebhookSink(route, signing_keys(route))
        else:
            if kafka is None:
                kafka = KafkaSink(settings.producer_config())
                kafka.open()
            sink = kafka
        runtimes.append(_runtime(route, sink))
    return runtimes


def _runtime(route: Route, sink: Sink) -> RouteRuntime:
    return RouteRuntime(route, sink, Backoff(route.first_backoff, route.max_backoff))


async def open_store(settings: Settings, relay_id: str, lanes: int = 0) -> Store:
    url = settings.require_database_url()
    store = Store.create(to_libpq(url), settings.schema, relay_id, settings.hold_seconds, lanes)
    try:
        await store.open(timeout=30.0)
    except PoolTimeout as exc:
        await store.close()
        raise DatabaseUnavailableError(
            f"cannot connect to the database {redact(url)} (gave up after 30 s)"
        ) from exc
    except asyncio.CancelledError:  # stopped while waiting for the database
        await store.close()
        raise
    version = await _schema_version(store)
    if version is None or version < SCHEMA_VERSION:
        await store.close()
        raise SchemaNotMigratedError(
            f"schema {settings.schema!r} has no outbox tables; run `outbox-relay migrate` first"
            if version is None
            else f"schema {settings.schema!r} is at version {version}, this relay needs "
            f"{SCHEMA_VERSION}; run `outbox-relay migrate`"
        )
    try:
        check_format(settings.schema, await store.relay_format())
    except BaseException:
        await store.close()
        raise
    return store


async def join(settings: Settings, relay_id: str) -> Membership:
    """Register this relay and take its share of the key buckets."""
    url = settings.require_database_url()
    membership = Membership(
        to_libpq(url),
        settings.schema,
        relay_id,
        settings.bucket_lease_seconds,
        settings.heartbeat_seconds,
    )
    try:
        await membership.heartbeat()
    except psycopg.Error as exc:
        await membership.close()
        raise describe_connect_error(url, exc) from exc
    except asyncio.CancelledError:  # stopped while joining
        await membership.close()
        raise
    return membership


async def _schema_version(store: Store) -> int | None:
    try:
        return await store.schema_version()
    except psycopg.errors.UndefinedTable:
        return None


# Young objects the garbage collector lets pile up before a collection (CPython: 700). A
# chunk of 1,000 messages makes tens of thousands of short-lived objects (rows, messages,
# headers, results), none in a cycle; at 700 the collector ran dozens of times per chunk and
# promoted them into generations whose collections walk the whole heap. At 10,000 the 200k
# drain ran 22% faster (docs/performance.md), for a few MB of garbage held a little longer.
GC_YOUNG_THRESHOLD = 10_000
SWITCH_INTERVAL_S = 0.0005


def tune_gc() -> None:
    """Collect young objects less often (never more often than already set)."""
    young, middle, old = gc.get_threshold()
    if 0 < young < GC_YOUNG_THRESHOLD:
        gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def tune_switching() -> None:
    """Hand the GIL over sooner (never later than already set).

    The Kafka sink produces in a worker thread while the event loop reads and records. Each
    time the loop calls into libpq it lets go of the GIL, the producing thread takes it, and
    the loop waited up to the default switch interval (5 ms) to get it back, several times
    per chunk. At 0.5 ms a relay drained a 200,000 backlog about 13% faster on 2 cores
    (0.2 and 0.1 ms: slower again, the threads trade the GIL too often)."""
    if sys.getswitchinterval() > SWITCH_INTERVAL_S:
        sys.setswitchinterval(SWITCH_INTERVAL_S)


async def run_relay(
    settings: Settings,
    stop: asyncio.Event | None = None,
    on_start: Callable[[Engine], None] | None = None,
) -> Stats:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is not given)."""
    routes = build_routes(settings)
    tune_gc()
    tune_switching()
    relay_id = new_relay_id()
    tag_relay(relay_id)
    # From here on a signal stops the relay cleanly, while it waits for the database too.
    stop = stop or _stop_on_signals(routes, settings.shutdown_grace)
    started = await _unless_stopped(stop, _connect(settings, relay_id, routes))
    if started is None:
        log.info("stopped before start-up finished")
        await asyncio.gather(*(r.sink.close() for r in routes), return_exceptions=True)
        return Stats()
    store, membership = started
    engine = Engine(settings, store, routes, membership)
    tracing.install(settings.otel_spans, [store, *(r.sink for r in routes)])
    for warning in order_warnings(settings):
        log.warning("kafka: %s", warning)
    try:
        server, observing = _observe(settings, engine, stop)
    except BaseException:
        with contextlib.suppress(*DB_ERRORS):
            await membership.leave()  # give the buckets back now, not after their lease
        await membership.close()
        await store.close()
        raise
    log.info(
        "relay %s started: %d route(s), schema %s, %d key bucket(s)%s",
        relay_id,
        len(routes),
        settings.schema,
        len(membership.buckets),
        f", metrics on port {server.port}" if server else "",
    )
    if on_start:
        on_start(engine)
    try:
        await engine.run(stop, to_libpq(settings.require_database_url()))
        if engine.incompatible is not None:
            raise engine.incompatible
    finally:
        if observing is not None:
            await asyncio.gather(observing, return_exceptions=True)
        if server is not None:
            server.close()
        await membership.close()
        await store.close()
    log.info(
        "relay %s stopped: %d delivered, %d dead-lettered",
        relay_id,
        engine.stats.delivered,
        engine.stats.dead,
    )
    return engine.stats


async def _connect(
    settings: Settings, relay_id: str, routes: list[RouteRuntime]
) -> tuple[Store, Membership]:
    store = await open_store(settings, relay_id, sum(1 for r in routes if r.is_lane))
    try:
        return store, await join(settings, relay_id)
    except BaseException:
        await store.close()
        raise


async def _unless_stopped(
    stop: asyncio.Event, work: Coroutine[Any, Any, Started]
) -> Started | None:
    """``work``'s result, or None (``work`` cancelled) if ``stop`` is set first."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _observe(
    settings: Settings, engine: Engine, stop: asyncio.Event
) -> tuple[MetricsServer | None, asyncio.Task[None] | None]:
    """Serve /metrics, /healthz and /readyz, and keep them fresh, if a port is set."""
    if settings.metrics_port is None:
        return None, None
    health = Health()
    server = MetricsServer(settings.metrics_port, engine.metrics, health)
    observer = Observer(
        engine.metrics,
        health,
        engine.store,
        engine.routes,
        engine.membership,
        settings.metrics_refresh_seconds,
    )
    engine.metrics_port = server.port
    return server, asyncio.create_task(observer.run(stop))


def _abort_sinks(routes: list[RouteRuntime]) -> None:
    for runtime in routes:
        runtime.sink.abort()


def _stop_on_signals(routes: list[RouteRuntime], grace: float) -> asyncio.Event:
    """SIGTERM/SIGINT: stop claiming; after ``grace`` seconds, abort in-flight sends."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            return
        log.info("received %s: finishing in-flight work", signal.Signals(signum).name)
        stop.set()
        loop.call_later(grace, _abort_sinks, routes)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    return stop
