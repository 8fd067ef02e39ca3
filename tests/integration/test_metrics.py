"""Metric values in known scenarios, and the HTTP endpoint (/metrics, /healthz, /readyz).

Real PostgreSQL, a real Kafka-compatible broker (Tansu), real HTTP receivers; the relay runs
in-process with ``metrics_port=0`` (any free port) and the tests scrape it over HTTP like
Prometheus would, parsing the text format with prometheus_client's own parser. Every
assertion is a number: what the relay must have counted given what was published and how
the sinks answered.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from relay.app import open_store
from relay.config import Route, Settings
from relay.health import Health, Observer
from relay.membership import Membership
from relay.metrics import Metrics
from relay.store import Store
from tests.harness.kafka import TansuBroker
from tests.harness.relay import RelayThread, publish_many, scalar, settings_for, wait_until
from tests.harness.webhook import Reply, WebhookServer, fail_first, new_secret, refused_url

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def failures(samples: Samples, topic: str, route: str) -> float:
    found = value(samples, "outbox_delivery_failures_total", topic=topic, route=route)
    return found or 0.0


def port_of(relay: RelayThread) -> int:
    """The port the relay bound (it was given 0: any free port)."""
    assert relay.engine is not None and relay.engine.metrics_port is not None
    return relay.engine.metrics_port


def eventually(port: int, check: Any, timeout: float = 15.0, what: str = "metrics") -> Samples:
    """Scrape until ``check(samples)`` holds; return the samples that satisfied it."""
    found: list[Samples] = []

    def ok() -> bool:
        samples = scrape(port)
        if check(samples):
            found.append(samples)
            return True
        return False

    wait_until(ok, timeout, what)
    return found[0]


@pytest.fixture
def metered(url: str) -> Iterator[Any]:
    """Build in-process relays serving metrics on a free port, refreshing every 0.2 s."""

    def build(
        bootstrap: str | None, *routes: Route, producer: Any = None, **overrides: Any
    ) -> RelayThread:
        base = settings_for(
            url, bootstrap, metrics_port=0, metrics_refresh_seconds=0.2, **overrides
        )
        if routes:
            base = dataclasses.replace(base, routes=routes)
        if producer:
            base = dataclasses.replace(base, kafka_producer=producer)
        return RelayThread(base)

    yield build


def hook(url: str, secret: str, **overrides: Any) -> Route:
    values: dict[str, Any] = {
        "name": "hook",
        "topics": ("orders.*",),
        "sink": "webhook",
        "url": url,
        "secret": secret,
        "timeout_s": 2.0,
        "max_attempts": 3,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.1,
        "allow_private_network": True,
    }
    values.update(overrides)
    return Route(**values)


# -- Kafka: delivered, latency, buckets, relays, readiness --------------------------------


def test_kafka_deliveries_counted_per_topic_and_route(
    metered: Any, engine: Engine, kafka: Any, topic_name: str
) -> None:
    a, b = f"{topic_name}-a", f"{topic_name}-b"
    before_publish = time.time()
    publish_many(engine, a, 10, keys=3)
    publish_many(engine, b, 3)
    with metered(kafka.bootstrap) as relay:
        relay.wait_delivered(13)
        port = port_of(relay)
        route = relay.engine.routes[0].route.name
        samples = eventually(
            port,
            lambda s: (
                value(s, "outbox_pending_messages", topic=a) == 0 and value(s, "outbox_ready") == 1
            ),
        )
        # Every message was created after ``before_publish`` and acknowledged before now.
        longest = time.time() - before_publish
        health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        missing = httpx.get(f"http://127.0.0.1:{port}/nope", timeout=5)
    assert value(samples, "outbox_delivered_total", topic=a, route=route) == 10
    assert value(samples, "outbox_delivered_total", topic=b, route=route) == 3
    assert value(samples, "outbox_delivery_failures_total", topic=a, route=route) is None
    assert value(samples, "outbox_delivery_latency_seconds_count", route=route) == 13
    total = value(samples, "outbox_delivery_latency_seconds_sum", route=route)
    assert total is not None and 0 < total <= 13 * longest, "creation to ack, seconds"
    assert value(samples, "outbox_delivery_latency_seconds_bucket", route=route, le="+Inf") == 13
    assert value(samples, "outbox_pending_messages", topic=b) == 0
    assert value(samples, "outbox_oldest_pending_age_seconds", topic=a) == 0
    assert value(samples, "outbox_buckets_held") == 256
    assert value(samples, "outbox_buckets_unowned") == 0
    assert value(samples, "outbox_relays_live") == 1
    assert value(samples, "outbox_database_up") == 1
    assert value(samples, "outbox_route_paused", route=route) == 0
    assert value(samples, "outbox_route_disabled", route=route) == 0
    # All 13 were committed before the relay started, and a batch holds up to 2000.
    assert value(samples, "outbox_batch_size_count", **{"pass": "first"}) == 1
    claimed = value(samples, "outbox_batch_size_sum", **{"pass": "first"})
    assert claimed == 13, "every message claimed once on its first pass"
    info = [k for k in samples if k[0] == "outbox_relay_info"]
    assert len(info) == 1 and dict(info[0][1])["schema"] == "outbox"
    assert (health.status_code, health.text) == (200, "ok\n")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert missing.status_code == 404


def test_lag_pending_and_readiness_follow_a_broker_pause(
    metered: Any, engine: Engine, kafka_broker: TansuBroker, topic_name: str
) -> None:
    publish_many(engine, topic_name, 1)
    with metered(kafka_broker.bootstrap, hold_seconds=0.5, lease_seconds=5) as relay:
        relay.wait_delivered(1)
        port = port_of(relay)
        eventually(port, lambda s: value(s, "outbox_ready") == 1, what="ready")
        with kafka_broker.paused():
            published_at = time.monotonic()
            publish_many(engine, topic_name, 5)
            paused = eventually(
                port,
                lambda s: (
                    value(s, "outbox_ready") == 0
                    and (value(s, "outbox_oldest_pending_age_seconds", topic=topic_name) or 0) >= 2
                ),
                timeout=30,
                what="not ready and lag >= 2 s while the broker is paused",
            )
            lag_bound = time.monotonic() - published_at + 1.0
            readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        resumed = eventually(
            port,
            lambda s: (
                value(s, "outbox_ready") == 1
                and value(s, "outbox_pending_messages", topic=topic_name) == 0
                and sum(v for (name, _), v in s.items() if name == "outbox_delivered_total") == 6
            ),
            timeout=90,
            what="ready again and nothing pending after the broker resumed",
        )
    assert value(paused, "outbox_pending_messages", topic=topic_name) == 5
    lag = value(paused, "outbox_oldest_pending_age_seconds", topic=topic_name)
    assert lag is not None and 2 <= lag <= lag_bound
    assert value(paused, "outbox_database_up") == 1, "the database was fine all along"
    assert readyz.status_code == 503 and "kafka" in readyz.text
    assert value(resumed, "outbox_oldest_pending_age_seconds", topic=topic_name) == 0
    route = relay.engine.routes[0].route.name
    assert value(resumed, "outbox_delivered_total", topic=topic_name, route=route) == 6
    assert scalar(relay.settings.database_url, "SELECT count(*) FROM outbox.message") == 0


# -- webhooks: failures, errors by reason, dead letters, disabled routes -------------------


def test_webhook_failures_errors_and_dead_letters(metered: Any, engine: Engine, url: str) -> None:
    secret = new_secret()
    with WebhookServer(secret) as server:
        server.responder = _by_n({0: fail_first(2, 503), 1: lambda _r: Reply(400)})
        publish_many(engine, "orders.created", 2, keys=2)
        publish_many(engine, "misc", 1, payload_offset=10)  # matches no route
        with metered(None, hook(server.url(), secret)) as relay:
            port = port_of(relay)
            samples = eventually(
                port,
                lambda s: (
                    value(s, "outbox_delivered_total", topic="orders.created", route="hook") == 1
                    and value(s, "outbox_dead_letters", topic="orders.created", route="hook") == 1
                    and value(s, "outbox_dead_letters", topic="misc", route="no-route") == 1
                    and value(s, "outbox_pending_messages", topic="orders.created") == 0
                ),
                what="1 delivered, 1 dead letter, 1 unrouted, nothing pending",
            )
    failures = value(
        samples, "outbox_delivery_failures_total", topic="orders.created", route="hook"
    )
    assert failures == 3, "two 503s for message 0, one 400 for message 1"
    assert value(samples, "outbox_delivery_errors_total", route="hook", sink="webhook",
                 reason="HTTP 503") == 2  # fmt: skip
    assert value(samples, "outbox_delivery_errors_total", route="hook", sink="webhook",
                 reason="HTTP 400") == 1  # fmt: skip
    assert value(samples, "outbox_delivery_failures_total", topic="misc", route="no-route") == 1
    assert value(samples, "outbox_delivery_latency_seconds_count", route="hook") == 1
    assert value(samples, "outbox_oldest_pending_age_seconds", topic="orders.created") == 0
    # Both rows are queued for the lane by one first pass and claimed together; the lane
    # waits out each 503's pause before claiming message 0 again, so no claim is spent
    # without a request.
    assert value(samples, "outbox_batch_size_sum", **{"pass": "lane"}) == 4, (
        "message 0 claimed by the lane three times, 1 once"
    )
    assert sorted((r.json()["n"], r.reply_status) for r in server.requests) == [
        (0, 200), (0, 503), (0, 503), (1, 400),
    ]  # fmt: skip


def _by_n(responders: dict[int, Any]) -> Any:
    def respond(request: Any) -> Any:
        return responders[request.json()["n"]](request)

    return respond


def test_route_disabled_by_410_is_a_gauge(metered: Any, engine: Engine) -> None:
    secret = new_secret()
    with WebhookServer(secret) as server:
        server.responder = lambda _r: Reply(410)
        publish_many(engine, "orders.created", 3, keys=1)
        with metered(None, hook(server.url(), secret)) as relay:
            port = port_of(relay)
            samples = eventually(
                port,
                lambda s: (
                    value(s, "outbox_route_disabled", route="hook") == 1
                    and value(s, "outbox_dead_letters", topic="orders.created", route="hook") == 3
                ),
                what="route disabled, 3 dead letters",
            )
    assert value(samples, "outbox_route_paused", route="hook") == 0
    failures = value(
        samples, "outbox_delivery_failures_total", topic="orders.created", route="hook"
    )
    assert failures == 1, "one attempt got the 410; the other two were not sent"
    assert value(samples, "outbox_ready") == 1, "a disabled route is not an outage"


def test_refused_connections_make_the_relay_unready(metered: Any, engine: Engine, url: str) -> None:
    secret = new_secret()
    server = WebhookServer(secret).start()
    refused = server.url()
    server.stop()
    publish_many(engine, "orders.created", 1)
    # Pauses of 0.5 s and more (the outage backoff, capped by backoff_max_s) are seen by the
    # gauges, refreshed every 0.2 s.
    route = hook(refused, secret, max_attempts=100, backoff_initial_s=0.5, backoff_max_s=2.0)
    with metered(None, route) as relay:
        port = port_of(relay)
        samples = eventually(
            port,
            lambda s: (
                value(s, "outbox_ready") == 0 and value(s, "outbox_route_paused", route="hook") == 1
            ),
            what="not ready and the route paused while refused",
        )
        readyz = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert readyz.status_code == 503
        assert readyz.text == "route hook: sink unreachable (connection refused)\n"
        server.start()
        after = eventually(
            port,
            lambda s: (
                value(s, "outbox_ready") == 1
                and value(s, "outbox_delivered_total", topic="orders.created", route="hook") == 1
            ),
            timeout=30,
            what="ready again once the endpoint accepts connections",
        )
        server.stop()
    assert value(samples, "outbox_route_paused", route="hook") == 1
    assert value(after, "outbox_route_paused", route="hook") == 0, "resumed by the success"
    assert len(server.requests) == 1, "refused attempts never reached the endpoint"
    refusals = value(after, "outbox_delivery_errors_total", route="hook", sink="webhook",
                     reason="connection refused")  # fmt: skip
    assert refusals is not None and refusals >= 1
    assert failures(after, "orders.created", "hook") == refusals, "every failure was a refusal"
    attempts = scalar(url, "SELECT attempts FROM outbox.delivery")
    assert attempts == refusals + 1, "each counted failure spent one attempt"


# -- the database-derived gauges, exactly -----------------------------------------------


def test_gauges_read_pending_lag_and_live_dead_letters(
    url: str, engine: Engine, observing: Any
) -> None:
    publish_many(engine, "a", 3)
    publish_many(engine, "b", 2)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox.message SET created_at = now() - interval '300 seconds' "
            "WHERE seq = (SELECT min(seq) FROM outbox.message WHERE topic = 'a')"
        )
        conn.execute(
            "UPDATE outbox.message SET created_at = now() - interval '40 seconds' WHERE topic = 'b'"
        )
        for n, (topic, route, discarded) in enumerate(
            [("a", "r1", False), ("a", "r1", False), ("a", "r2", False), ("b", "r1", True)]
        ):
            conn.execute(
                "INSERT INTO outbox.dead_letter (message_id, seq, route, topic, payload, "
                "content_type, headers, bucket, created_at, attempts, reason, discarded_at) "
                "VALUES (gen_random_uuid(), %s, %s, %s, '\\x00', 'application/json', '{}', 0, "
                "now(), 1, 'test', CASE WHEN %s THEN now() END)",
                (1000 + n, route, topic, discarded),
            )
    metrics, health = Metrics("test-relay", "outbox"), Health()
    observer = observing(metrics, health)
    _run(observer.refresh())
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    assert value(samples, "outbox_pending_messages", topic="a") == 3
    assert value(samples, "outbox_pending_messages", topic="b") == 2
    age_a = value(samples, "outbox_oldest_pending_age_seconds", topic="a")
    age_b = value(samples, "outbox_oldest_pending_age_seconds", topic="b")
    assert age_a is not None and 300 <= age_a < 310
    assert age_b is not None and 40 <= age_b < 50
    assert value(samples, "outbox_dead_letters", topic="a", route="r1") == 2
    assert value(samples, "outbox_dead_letters", topic="a", route="r2") == 1
    assert value(samples, "outbox_dead_letters", topic="b", route="r1") is None, "discarded"
    assert value(samples, "outbox_buckets_unowned") == 256, "no relay holds any bucket"
    assert value(samples, "outbox_relays_live") == 0
    assert value(samples, "outbox_ready") == 1
    # Topics that drained read 0 rather than vanishing (an alert on them resolves).
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox.message WHERE topic = 'a'")
        conn.execute("DELETE FROM outbox.dead_letter WHERE route = 'r2'")
    _run(observer.refresh())
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in metrics.registry.collect()
        for s in family.samples
    }
    assert value(samples, "outbox_pending_messages", topic="a") == 0
    assert value(samples, "outbox_oldest_pending_age_seconds", topic="a") == 0
    assert value(samples, "outbox_dead_letters", topic="a", route="r2") == 0
    assert value(samples, "outbox_pending_messages", topic="b") == 2


def test_unreachable_database_makes_the_relay_unready(observing: Any) -> None:
    metrics, health = Metrics("test-relay", "outbox"), Health()
    observer = observing(metrics, health)
    _run(observer.refresh())
    assert health.ready
    _run(observer.store.close())
    _run(observer.refresh())
    assert not health.ready
    assert health.reasons[0].startswith("database unreachable")
    assert metrics.database_up._value.get() == 0  # type: ignore[attr-defined]


def test_metrics_and_readyz_never_show_secrets(metered: Any, engine: Engine, url: str) -> None:
    password = "pw-never-shown-7f3a"
    with_password = url.replace("://", f"://postgres:{password}@", 1) if "@" not in url else url
    secret = new_secret()
    publish_many(engine, "orders.created", 2)
    with WebhookServer(secret) as server:
        server.responder = lambda _r: Reply(503)
        with metered(None, hook(server.url(), secret), database_url=with_password) as relay:
            port = port_of(relay)
            eventually(port, lambda s: failures(s, "orders.created", "hook") >= 2)
            bodies = [
                httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5).text
                for path in ("/metrics", "/readyz", "/healthz")
            ]
    for body in bodies:
        assert password not in body and secret not in body
        assert secret.removeprefix("whsec_") not in body


# -- helpers ------------------------------------------------------------------------------


_LOOP = asyncio.new_event_loop()


def _run(coro: Any) -> Any:
    return _LOOP.run_until_complete(coro)


@pytest.fixture
def observing(url: str) -> Iterator[Any]:
    """Build an :class:`Observer` on a real store (no relay running); closed afterwards."""
    stores = []

    def build(metrics: Metrics, health: Health) -> Observer:
        store = _run(open_store(Settings(database_url=url), "test-relay"))
        stores.append(store)
        membership = Membership(url, "outbox", "test-relay")
        return Observer(metrics, health, store, [], membership, every=0.2)

    yield build
    for store in stores:
        _run(store.close())


def test_a_discarded_dead_letter_that_dies_again_counts_again(
    metered: Any, engine: Engine, url: str
) -> None:
    secret = new_secret()
    with WebhookServer(secret) as server:
        server.responder = lambda _r: Reply(400)
        publish_many(engine, "orders.created", 1)
        with metered(None, hook(server.url(), secret)) as relay:
            port = port_of(relay)
            dead = lambda s: value(s, "outbox_dead_letters", topic="orders.created", route="hook")  # noqa: E731
            eventually(port, lambda s: dead(s) == 1, what="a dead letter")
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("UPDATE outbox.dead_letter SET discarded_at = now()")
                eventually(port, lambda s: dead(s) == 0, what="discarded: not counted")
                # The same message comes back (as replay and retry bring it) and fails again.
                conn.execute(
                    "INSERT INTO outbox.message (id, topic, msg_key, payload, content_type, "
                    "headers, idempotency_key, bucket, created_at) "
                    "SELECT message_id, topic, msg_key, payload, content_type, headers, "
                    "idempotency_key, bucket, created_at FROM outbox.dead_letter"
                )
            eventually(port, lambda s: dead(s) == 1, what="the new failure counted again")
    assert scalar(url, "SELECT count(*) FROM outbox.dead_letter WHERE discarded_at IS NULL") == 1
    assert len(server.requests) == 2


def test_readiness_recovers_when_an_outage_is_not_retried(metered: Any, engine: Engine) -> None:
    """The only message is dead-lettered on its first refused attempt; nothing is sent after,
    and the relay is ready again although the endpoint still refuses connections."""
    secret = new_secret()
    refused = refused_url()
    publish_many(engine, "orders.created", 1)
    with metered(None, hook(refused, secret, max_attempts=1)) as relay:
        port = port_of(relay)
        eventually(port, lambda s: value(s, "outbox_ready") == 0, what="not ready (refused)")
        samples = eventually(
            port,
            lambda s: value(s, "outbox_ready") == 1,
            timeout=20,
            what="ready again without another attempt",
        )
    assert value(samples, "outbox_dead_letters", topic="orders.created", route="hook") == 1
    assert failures(samples, "orders.created", "hook") == 1


def test_kafka_permanent_failures_are_counted_by_reason(
    metered: Any, engine: Engine, kafka: Any, topic_name: str
) -> None:
    publish_many(engine, topic_name, 2, payload=lambda n: {"n": n, "pad": "x" * 20_000 * n})
    with metered(kafka.bootstrap, producer={"message.max.bytes": 10_000}) as relay:
        port = port_of(relay)
        route = relay.engine.routes[0].route.name
        samples = eventually(
            port,
            lambda s: (
                value(s, "outbox_dead_letters", topic=topic_name, route=route) == 1
                and value(s, "outbox_delivered_total", topic=topic_name, route=route) == 1
            ),
            what="one delivered, one too large",
        )
    assert failures(samples, topic_name, route) == 1
    errors = value(
        samples, "outbox_delivery_errors_total", route=route, sink="kafka",
        reason="MSG_SIZE_TOO_LARGE",
    )  # fmt: skip
    assert errors == 1


def test_a_broken_refresh_is_reported_not_silent(url: str) -> None:
    """An error that is not the database being away (here: a schema that does not exist)
    keeps the observer running and says so on /readyz."""
    metrics, health = Metrics("test-relay", "nope"), Health()

    async def run() -> None:
        store = Store.create(url, "nope", "test-relay")
        await store.open()
        observer = Observer(metrics, health, store, [], Membership(url, "nope", "r"), 0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(observer.run(stop))
        await asyncio.sleep(0.3)
        stop.set()
        await task
        await store.close()

    _run(run())
    assert health.reasons[0].startswith("metrics refresh failed: relation")
    assert metrics.registry.get_sample_value("outbox_ready") == 0
