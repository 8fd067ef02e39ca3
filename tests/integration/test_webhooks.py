"""The webhook sink end to end: real PostgreSQL, a real relay, real HTTP receivers.

Every test runs ``run_relay`` in a thread (:class:`RelayThread`) against a fresh migrated
database and one or more :class:`WebhookServer` instances on 127.0.0.1 (hence
``allow_private_network = true`` on every route except the SSRF test). Nothing is mocked:
what a test asserts is what the receiver got (headers, body, signature verified by the
``standardwebhooks`` package for every configured secret, arrival order and times) and what
the relay wrote to the outbox schema (``delivery``, ``dead_letter``, ``route_pending``,
``route_state``, ``message``).

Payloads of the ordering tests carry their own key (``{"n": n, "key": "k3"}``): a webhook
request does not carry the message key, and the tests need it to check per-key order.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib.inbox import WebhookReceiver
from relay.config import Route, load_settings
from relay.errors import ConfigError
from relay.lanes import Lane
from tests.acceptance.cli import run_cli
from tests.harness.relay import RelayThread, publish_many, scalar, settings_for, wait_until
from tests.harness.webhook import (
    RecordedRequest,
    Reply,
    WebhookServer,
    fail_first,
    new_secret,
    refused_url,
)

pytestmark = pytest.mark.integration

TOPIC = "orders.created"
ROUTE = "hook"
JSON = "application/json"

# -- building blocks ---------------------------------------------------------------------


def hook(url: str, secret: str, **overrides: Any) -> Route:
    """A webhook route on ``TOPIC`` with fast retries, allowed to reach 127.0.0.1."""
    values: dict[str, Any] = {
        "name": ROUTE,
        "topics": (TOPIC,),
        "sink": "webhook",
        "url": url,
        "secret": secret,
        "timeout_s": 2.0,
        "max_attempts": 5,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        "allow_private_network": True,
    }
    values.update(overrides)
    return Route(**values)


def relay_for(db_url: str, *routes: Route, **settings: Any) -> RelayThread:
    """An in-process relay with exactly ``routes`` (no Kafka)."""
    base = settings_for(db_url, None, poll_interval=0.1, **settings)
    return RelayThread(dataclasses.replace(base, routes=routes))


def publish(engine: Engine, *messages: Mapping[str, Any]) -> list[str]:
    """Publish ``{"payload": ..., "key"?, "idempotency_key"?, "topic"?}`` in one transaction;
    return each message's expected ``webhook-id`` (its idempotency key, else its id)."""
    with Session(engine) as session:
        ids = [
            outbox_lib.publish(
                session,
                m.get("topic", TOPIC),
                m["payload"],
                key=m.get("key"),
                idempotency_key=m.get("idempotency_key"),
            )
            for m in messages
        ]
        session.commit()
    return [m.get("idempotency_key") or str(i) for m, i in zip(messages, ids, strict=True)]


def fetch(db_url: str, query: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(query, params).fetchall()  # type: ignore[arg-type]


_WEBHOOK_ID = "coalesce(idempotency_key, message_id::text) AS webhook_id"


def deliveries(db_url: str) -> list[dict[str, Any]]:
    return fetch(
        db_url,
        f"SELECT {_WEBHOOK_ID}, route, attempts, topic, payload, content_type"
        " FROM outbox.delivery ORDER BY seq, route",
    )


def dead_letters(db_url: str) -> list[dict[str, Any]]:
    return fetch(
        db_url,
        f"SELECT {_WEBHOOK_ID}, route, topic, attempts, reason, last_status, last_error"
        " FROM outbox.dead_letter ORDER BY seq, route",
    )


def pending(db_url: str) -> list[dict[str, Any]]:
    return fetch(
        db_url, "SELECT seq, route, attempts, last_status FROM outbox.route_pending ORDER BY seq"
    )


def count(db_url: str, table: str) -> int:
    return int(scalar(db_url, f"SELECT count(*) FROM outbox.{table}"))


def wait_count(db_url: str, table: str, expected: int, timeout: float = 15.0) -> None:
    wait_until(
        lambda: count(db_url, table) >= expected, timeout, f"{expected} rows in outbox.{table}"
    )


def assert_settled(db_url: str) -> None:
    """Nothing left to do: no message, no pending route."""
    assert count(db_url, "message") == 0
    assert count(db_url, "route_pending") == 0


def assert_signed(requests: Iterable[RecordedRequest]) -> None:
    """Every request verified by ``standardwebhooks`` with every configured secret."""
    for request in requests:
        assert request.verified, request.headers
        assert all(request.verified), (request.webhook_id, request.verify_errors)


def attempts_by_id(db_url: str, route: str = ROUTE) -> dict[str, int]:
    return {d["webhook_id"]: d["attempts"] for d in deliveries(db_url) if d["route"] == route}


def requests_by_id(server: WebhookServer) -> dict[str, int]:
    return dict(Counter(r.webhook_id or "" for r in server.requests))


def numbered(keys: int) -> Any:
    """publish_many payloads that name their own key (webhooks do not send the key)."""
    return lambda n: {"n": n, "key": f"k{n % keys}"}


def is_ok(request: RecordedRequest) -> bool:
    return request.reply_status is not None and 200 <= request.reply_status < 300


def order_by_key(requests: Iterable[RecordedRequest]) -> dict[str, list[int]]:
    order: dict[str, list[int]] = defaultdict(list)
    for request in requests:
        body = request.json()
        order[body["key"]].append(body["n"])
    return dict(order)


def published_by_key(committed: Sequence[int], keys: int) -> dict[str, list[int]]:
    return {f"k{k}": [n for n in committed if n % keys == k] for k in range(keys)}


def assert_per_key_order(server: WebhookServer, committed: Sequence[int], keys: int) -> None:
    """Successful deliveries follow publish order per key, and no request of a later
    message of a key ever arrives before an earlier one of that key is done."""
    requests = server.requests
    assert order_by_key(r for r in requests if is_ok(r)) == published_by_key(committed, keys)
    for key, numbers in order_by_key(requests).items():
        assert numbers == sorted(numbers), f"key {key}: a later message overtook an earlier one"


def hmac_signature(secret: str, webhook_id: str, timestamp: str, body: bytes) -> str:
    """Standard Webhooks v1 over raw bytes, computed independently of relay and harness."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


@pytest.fixture
def secret() -> str:
    return new_secret()


# -- 2xx ---------------------------------------------------------------------------------


def test_2xx_delivers_each_message_once_with_standard_webhooks_headers(
    url: str, engine: Engine, secret: str
) -> None:
    with WebhookServer(secret) as server, relay_for(url, hook(server.url(), secret)) as relay:
        ids = publish(
            engine,
            {"payload": {"order": 1}, "key": "1", "idempotency_key": "order-1-created"},
            {"payload": {"order": 2}, "key": "2"},
            {"payload": {"order": 3}},
        )
        first_id = scalar(
            url, "SELECT id FROM outbox.message WHERE idempotency_key = %(k)s", {"k": ids[0]}
        )
        # The same idempotency key again: the same message, no second delivery.
        with Session(engine) as session, session.begin():
            again = outbox_lib.publish(
                session, TOPIC, {"order": 1}, idempotency_key="order-1-created"
            )
        assert again == first_id
        assert count(url, "message") == 3
        relay.wait_delivered(3, timeout=15)
    started = time.time()

    requests = server.requests
    assert sorted(r.webhook_id or "" for r in requests) == sorted(ids), "once each"
    assert ids[0] == "order-1-created"
    bodies = {r.webhook_id: r.json() for r in requests}
    assert bodies == {ids[0]: {"order": 1}, ids[1]: {"order": 2}, ids[2]: {"order": 3}}
    for request in requests:
        assert request.method == "POST" and request.path == "/hook"
        assert request.headers["content-type"] == JSON
        assert request.headers["idempotency-key"] == request.webhook_id
        assert request.webhook_timestamp is not None
        assert abs(request.webhook_timestamp - request.received_at) <= 3
        assert abs(request.webhook_timestamp - started) <= 10
        assert [v for v, _ in request.signatures] == ["v1"]
    assert_signed(requests)

    rows = deliveries(url)
    assert [(d["webhook_id"], d["route"], d["attempts"], d["topic"]) for d in rows] == [
        (webhook_id, ROUTE, 1, TOPIC) for webhook_id in ids
    ]
    assert {d["webhook_id"]: bytes(d["payload"]) for d in rows} == {
        r.webhook_id: r.body for r in requests
    }, "the body is the stored payload, byte for byte"
    assert dead_letters(url) == []
    assert_settled(url)


def test_two_secrets_sign_twice_and_either_secret_verifies(url: str, engine: Engine) -> None:
    old, new = new_secret(), new_secret()
    with (
        WebhookServer(old, new) as server,
        relay_for(url, hook(server.url(), f"{old} {new}")) as relay,
    ):
        publish(engine, {"payload": {"rotating": True}, "idempotency_key": "rot-1"})
        relay.wait_delivered(1)

    [request] = server.requests
    assert [v for v, _ in request.signatures] == ["v1", "v1"]
    assert request.signatures[0][1] != request.signatures[1][1]
    assert request.verified == (True, True), "a receiver knowing only old, or only new, accepts"
    assert_signed(server.requests)
    stranger = hmac_signature(
        new_secret(), "rot-1", request.headers["webhook-timestamp"], request.body
    )
    assert stranger.removeprefix("v1,") not in {sig for _, sig in request.signatures}
    assert [(d["webhook_id"], d["attempts"]) for d in deliveries(url)] == [("rot-1", 1)]
    assert_settled(url)


# -- failures ----------------------------------------------------------------------------


def test_400_dead_letters_at_once_and_leaves_other_messages_alone(
    url: str, engine: Engine, secret: str
) -> None:
    with WebhookServer(secret) as server:
        server.responder = lambda r: (
            Reply(400, body=b"invalid order") if r.webhook_id == "bad" else 200
        )
        with relay_for(url, hook(server.url(), secret)) as relay:
            publish(
                engine,
                {"payload": {"n": 0}, "key": "a", "idempotency_key": "bad"},
                {"payload": {"n": 1}, "key": "a", "idempotency_key": "a-next"},
                {"payload": {"n": 2}, "key": "b", "idempotency_key": "b-1"},
            )
            relay.wait_delivered(2)
            wait_count(url, "dead_letter", 1)

    assert requests_by_id(server) == {"bad": 1, "a-next": 1, "b-1": 1}
    arrivals = server.webhook_ids()
    assert arrivals.index("bad") < arrivals.index("a-next"), "same key: publish order"
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert dead["webhook_id"] == "bad" and dead["route"] == ROUTE
    assert (dead["attempts"], dead["reason"], dead["last_status"]) == (1, "HTTP 400", "HTTP 400")
    assert "invalid order" in dead["last_error"]
    assert attempts_by_id(url) == {"a-next": 1, "b-1": 1}
    assert_settled(url)


@pytest.mark.parametrize("status", [408, 409, 425, 500])
def test_retryable_status_is_retried_then_delivered(
    url: str, engine: Engine, secret: str, status: int
) -> None:
    with WebhookServer(secret) as server:
        server.responder = fail_first(2, status)
        with relay_for(url, hook(server.url(), secret)) as relay:
            ids = publish(
                engine,
                {"payload": {"n": 0}, "key": "a", "idempotency_key": f"retry-{status}"},
                {"payload": {"n": 1}, "key": "b"},
            )
            relay.wait_delivered(2, timeout=15)

    assert requests_by_id(server) == {ids[0]: 3, ids[1]: 3}
    for webhook_id in ids:
        attempts = server.requests_for(webhook_id)
        assert [r.reply_status for r in attempts] == [status, status, 200]
        assert {r.headers["idempotency-key"] for r in attempts} == {webhook_id}
        stamps = [r.webhook_timestamp or 0 for r in attempts]
        assert stamps == sorted(stamps), "webhook-timestamp is the attempt's own"
        assert_signed(attempts)
    assert attempts_by_id(url) == {ids[0]: 3, ids[1]: 3}, "attempts recorded = requests made"
    assert dead_letters(url) == []
    assert_settled(url)


def test_500_forever_dead_letters_after_max_attempts(url: str, engine: Engine, secret: str) -> None:
    with WebhookServer(secret) as server:
        server.responder = lambda r: 500 if r.webhook_id == "doomed" else 200
        with relay_for(url, hook(server.url(), secret, max_attempts=3)) as relay:
            publish(
                engine,
                {"payload": {"n": 0}, "key": "a", "idempotency_key": "doomed"},
                {"payload": {"n": 1}, "key": "a", "idempotency_key": "after"},
            )
            wait_count(url, "dead_letter", 1)
            relay.wait_delivered(1)
            time.sleep(0.5)  # room for a (wrong) fourth attempt

    assert requests_by_id(server) == {"doomed": 3, "after": 1}
    assert server.webhook_ids()[-1] == "after", "its key waited for the dead letter"
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert dead["webhook_id"] == "doomed"
    assert dead["attempts"] == 3
    assert dead["reason"] == "max attempts reached (HTTP 500)"
    assert dead["last_status"] == "HTTP 500"
    assert attempts_by_id(url) == {"after": 1}
    assert_settled(url)


def test_429_retry_after_is_honoured(url: str, engine: Engine, secret: str) -> None:
    with WebhookServer(secret) as server:
        server.script("/hook", [Reply(429, headers={"Retry-After": "2"})])
        # Retry-After wins over both the backoff and its cap (backoff_max_s).
        route = hook(server.url(), secret, backoff_initial_s=0.05, backoff_max_s=0.2)
        with relay_for(url, route) as relay:
            publish(engine, {"payload": {"n": 0}, "idempotency_key": "limited"})
            assert server.wait_for(1, timeout=10)
            # The row exists from the start (queued for the lane, attempts 0): wait for the 429.
            wait_until(lambda: any(p["attempts"] == 1 for p in pending(url)), 5, "the 429 recorded")
            [row] = pending(url)
            assert (row["attempts"], row["last_status"]) == (1, "HTTP 429")
            relay.wait_delivered(1, timeout=15)

    first, second = server.requests
    assert (first.reply_status, second.reply_status) == (429, 200)
    assert second.received_at - first.received_at >= 1.8, "the retry waited for Retry-After"
    assert first.webhook_id == second.webhook_id == "limited"
    assert_signed(server.requests)
    assert attempts_by_id(url) == {"limited": 2}
    assert_settled(url)


def test_timeout_is_retried_then_dead_lettered(url: str, engine: Engine, secret: str) -> None:
    slow = Reply(200, delay=2.0)
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def respond(request: RecordedRequest) -> Reply:
        with lock:
            seen[request.webhook_id or ""] += 1
            first = seen[request.webhook_id or ""] == 1
        return slow if request.webhook_id == "never" or first else Reply(200)

    with WebhookServer(secret) as server:
        server.responder = respond
        # Equal initial and maximum backoff: a fixed 0.3 s retry delay, long enough to observe.
        route = hook(
            server.url(), secret, timeout_s=0.5, max_attempts=3,
            backoff_initial_s=0.3, backoff_max_s=0.3,
        )  # fmt: skip
        with relay_for(url, route) as relay:
            publish(
                engine,
                {"payload": {"n": 0}, "key": "a", "idempotency_key": "never"},
                {"payload": {"n": 1}, "key": "b", "idempotency_key": "once"},
            )
            wait_until(
                lambda: any(p["last_status"] == "timeout" for p in pending(url)),
                10,
                "a pending retry with last_status 'timeout'",
            )
            wait_count(url, "dead_letter", 1)
            relay.wait_delivered(1)
        assert server.wait_for(
            lambda reqs: all(r.client_gone for r in reqs if r.webhook_id == "never"), 5
        )

    assert requests_by_id(server) == {"never": 3, "once": 2}
    assert all(r.client_gone for r in server.requests_for("never")), "the relay hung up"
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert dead["webhook_id"] == "never"
    assert (dead["attempts"], dead["last_status"]) == (3, "timeout")
    assert dead["reason"] == "max attempts reached (timeout)"
    assert attempts_by_id(url) == {"once": 2}
    assert_settled(url)


def test_connection_refused_is_retried_then_dead_lettered(
    url: str, engine: Engine, secret: str
) -> None:
    route = hook(refused_url(), secret, max_attempts=3, backoff_initial_s=0.3, backoff_max_s=0.3)
    observed: set[tuple[int, str | None]] = set()
    with relay_for(url, route):
        publish(engine, *({"payload": {"n": n}, "key": f"k{n}"} for n in range(3)))
        deadline = time.monotonic() + 20
        while count(url, "dead_letter") < 3 and time.monotonic() < deadline:
            observed.update((p["attempts"], p["last_status"]) for p in pending(url))
            time.sleep(0.03)

    dead = dead_letters(url)
    assert len(dead) == 3
    [status] = {row["last_status"] for row in dead}
    assert status == "connection refused"
    assert {s for _, s in observed} <= {None, status}, observed
    assert any(attempts >= 1 for attempts, _ in observed), "retried: seen waiting"
    assert max(attempts for attempts, _ in observed) < 3, "never past max_attempts"
    for row in dead:
        assert row["attempts"] == 3
        assert row["reason"] == f"max attempts reached ({status})"
    assert count(url, "delivery") == 0
    assert_settled(url)


def test_connection_refused_is_labelled_as_such(url: str, engine: Engine, secret: str) -> None:
    with relay_for(url, hook(refused_url(), secret, max_attempts=1)):
        publish(engine, {"payload": {"n": 0}})
        wait_count(url, "dead_letter", 1)
    [dead] = dead_letters(url)
    assert dead["last_status"] == "connection refused"
    assert dead["reason"] == "max attempts reached (connection refused)"


def test_410_disables_the_route_until_an_operator_enables_it(
    url: str, engine: Engine, secret: str
) -> None:
    with WebhookServer(secret) as server:
        server.script("/hook", [Reply(410, body=b"no such hook")])
        with relay_for(
            url, hook(server.url(), secret), heartbeat_seconds=0.5, bucket_lease_seconds=2
        ) as relay:
            publish(engine, {"payload": {"n": 0}, "idempotency_key": "gone"})
            wait_count(url, "dead_letter", 1)
            wait_until(lambda: count(url, "route_state") == 1, 5, "route_state row")
            [state] = fetch(url, "SELECT * FROM outbox.route_state")
            assert state["route"] == ROUTE and state["disabled_at"] is not None
            assert "410" in state["disabled_reason"]
            # Past one heartbeat after the write (see the test below for why).
            time.sleep(0.7)
            assert relay.engine is not None
            runtime = relay.engine.routes[0]
            wait_until(lambda: runtime.disabled is not None, 5, "the relay to hold the disable")

            later = publish(engine, {"payload": {"n": 1}}, {"payload": {"n": 2}, "key": "x"})
            wait_count(url, "dead_letter", 3)
            assert len(server.requests) == 1, "nothing reaches a disabled route"

            result = run_cli("routes", "enable", ROUTE, env={"OUTBOX_DATABASE_URL": url})
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"route {ROUTE} enabled"
            wait_until(lambda: runtime.disabled is None, 5, "the relay to see the enable")
            [again] = publish(engine, {"payload": {"n": 3}, "idempotency_key": "again"})
            relay.wait_delivered(1)

    assert [r.webhook_id for r in server.requests] == ["gone", again]
    assert [r.reply_status for r in server.requests] == [410, 200]
    assert_signed(server.requests)
    dead = {d["webhook_id"]: d for d in dead_letters(url)}
    assert set(dead) == {"gone", *later}
    assert dead["gone"]["reason"].startswith("endpoint gone")
    assert (dead["gone"]["attempts"], dead["gone"]["last_status"]) == (1, "HTTP 410")
    for webhook_id in later:
        assert dead[webhook_id]["reason"] == "route disabled"
    [state] = fetch(url, "SELECT * FROM outbox.route_state")
    assert state["disabled_at"] is None and state["disabled_reason"] is None
    assert attempts_by_id(url) == {"again": 1}
    assert_settled(url)


def test_410_disable_holds_while_route_state_is_written(
    url: str, engine: Engine, secret: str
) -> None:
    """The route_state write is held at its COMMIT for two heartbeats (a slow database;
    a failed write is the same for the relay, which only logs it)."""
    install_commit_gate(url, "outbox.route_state", "INSERT OR UPDATE", 7332)
    with WebhookServer(secret) as server:
        server.script("/hook", [Reply(410)])
        with (
            relay_for(
                url, hook(server.url(), secret), heartbeat_seconds=0.5, bucket_lease_seconds=2
            ),
            psycopg.connect(url, autocommit=True) as gate,
        ):
            gate.execute("SELECT pg_advisory_lock(7332)")
            publish(engine, {"payload": {"n": 0}, "idempotency_key": "gone"})
            wait_count(url, "dead_letter", 1)
            wait_until(
                lambda: lock_waiters(url)["advisory"] == 1, 5, "the route_state write at the gate"
            )
            time.sleep(1.2)  # two heartbeats
            publish(engine, {"payload": {"n": 1}, "idempotency_key": "later"})
            wait_until(
                lambda: count(url, "dead_letter") + count(url, "delivery") == 2, 10, "'later'"
            )
            gate.execute("SELECT pg_advisory_unlock(7332)")
            wait_until(lambda: count(url, "route_state") == 1, 5, "the route_state row")

    assert [r.webhook_id for r in server.requests] == ["gone"], "nothing after the 410"
    dead = {d["webhook_id"]: d["reason"] for d in dead_letters(url)}
    assert dead["later"] == "route disabled"
    assert_settled(url)


def test_redirect_is_not_followed(url: str, engine: Engine, secret: str) -> None:
    with WebhookServer(secret) as server:
        elsewhere = server.url("/elsewhere")
        server.responder = lambda r: Reply(302, headers={"Location": elsewhere})
        with relay_for(url, hook(server.url(), secret, max_attempts=3)):
            publish(engine, {"payload": {"n": 0}, "idempotency_key": "moved"})
            wait_count(url, "dead_letter", 1)

    assert [r.path for r in server.requests] == ["/hook"] * 3, "never on /elsewhere"
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert (dead["attempts"], dead["last_status"]) == (3, "HTTP 302")
    assert dead["reason"] == "max attempts reached (HTTP 302)"
    assert elsewhere in dead["last_error"] and "not followed" in dead["last_error"]
    assert_settled(url)


# -- fan-out and order -------------------------------------------------------------------


def test_fan_out_failing_route_never_delays_the_other(url: str, engine: Engine) -> None:
    secret_a, secret_b = new_secret(), new_secret()
    keys = 3
    with WebhookServer(secret_a) as server_a, WebhookServer(secret_b) as server_b:
        server_a.default = Reply(500)
        route_a = hook(server_a.url(), secret_a, name="a", max_attempts=1000)
        route_b = hook(server_b.url(), secret_b, name="b")
        with relay_for(url, route_a, route_b):
            committed = publish_many(
                engine, TOPIC, 30, keys=keys, per_tx=10, payload=numbered(keys)
            )
            assert server_b.wait_for(30, timeout=10), "route b is not held back by route a"
            assert server_a.wait_for(10, timeout=10), "route a keeps retrying"
            wait_until(
                lambda: (
                    {(d["route"], d["webhook_id"]) for d in deliveries(url)}
                    >= {("b", r.webhook_id) for r in server_b.requests}
                ),
                5,
                "route b's deliveries recorded",
            )
            assert count(url, "message") == 30, "messages stay until route a is done"
            assert scalar(url, "SELECT bool_and(fanned) FROM outbox.message")
            waiting = pending(url)
            assert {p["route"] for p in waiting} == {"a"} and len(waiting) == 30
            assert "HTTP 500" in {p["last_status"] for p in waiting}
            server_a.default = Reply(200)
            wait_until(lambda: count(url, "message") == 0, 20, "route a to catch up")

    assert_signed(server_a.requests)
    assert_signed(server_b.requests)
    assert len(server_b.requests) == 30 and all(is_ok(r) for r in server_b.requests)
    assert_per_key_order(server_b, committed, keys)
    assert_per_key_order(server_a, committed, keys)
    assert attempts_by_id(url, "a") == requests_by_id(server_a)
    assert set(attempts_by_id(url, "b").values()) == {1}
    assert dead_letters(url) == []
    assert_settled(url)


def install_commit_gate(db_url: str, table: str, events: str, key: int) -> None:
    """Test-only instrumentation, no stand-in: a deferred trigger makes every transaction
    that ``events`` a row of ``table`` wait at its COMMIT while advisory lock ``key`` is
    held (``pg_advisory_lock(key)`` on the test's connection), to force an interleaving."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            f"""
            CREATE FUNCTION public.test_commit_gate_{key}() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                PERFORM pg_advisory_xact_lock_shared({key});
                RETURN NULL;
            END $$;
            CREATE CONSTRAINT TRIGGER test_commit_gate_{key} AFTER {events} ON {table}
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                EXECUTE FUNCTION public.test_commit_gate_{key}();
            """
        )


def lock_waiters(db_url: str) -> Counter[str]:
    rows = fetch(db_url, "SELECT locktype FROM pg_locks WHERE NOT granted")
    return Counter(str(row["locktype"]) for row in rows)


def test_fan_out_routes_finishing_together_leave_no_message_behind(
    url: str, engine: Engine
) -> None:
    """Two lanes that record the same message at the same moment must still remove it.

    Under load this happens by chance (2-20 % of messages fanned to two fast webhook routes
    in a local run). Here it is made certain: a test-only deferred trigger holds every
    transaction that deletes a ``route_pending`` row at its COMMIT until the test lets go,
    so both record transactions run all their statements before either commits. A relay
    that serializes the two (e.g. by locking the message row) blocks one of them before the
    gate instead; the test releases the gate then too.
    """
    install_commit_gate(url, "outbox.route_pending", "DELETE", 7331)
    secret_a, secret_b = new_secret(), new_secret()
    with WebhookServer(secret_a) as server_a, WebhookServer(secret_b) as server_b:
        routes = (
            hook(server_a.url(), secret_a, name="a"),
            hook(server_b.url(), secret_b, name="b"),
        )
        with relay_for(url, *routes), psycopg.connect(url, autocommit=True) as gate:
            gate.execute("SELECT pg_advisory_lock(7331)")
            publish(engine, {"payload": {"n": 0}, "idempotency_key": "both"})
            wait_until(
                lambda: (
                    (waiting := lock_waiters(url))["advisory"] == 2
                    or (waiting["advisory"] == 1 and waiting.total() > 1)
                ),
                10,
                "both record transactions at the gate (or one behind the other)",
            )
            gate.execute("SELECT pg_advisory_unlock(7331)")
            wait_count(url, "delivery", 2)
            time.sleep(0.5)  # any later clean-up would run now
        assert_signed([*server_a.requests, *server_b.requests])
        assert len(server_a.requests) == len(server_b.requests) == 1

    assert sorted((d["route"], d["attempts"]) for d in deliveries(url)) == [("a", 1), ("b", 1)]
    assert count(url, "route_pending") == 0
    assert count(url, "message") == 0, "delivered on every route, yet still in the hot table"


def test_per_key_order_holds_through_failures(url: str, engine: Engine, secret: str) -> None:
    keys, total = 5, 100
    failing = {n for n in range(total) if n % 7 == 3}
    seen: Counter[int] = Counter()
    lock = threading.Lock()

    def respond(request: RecordedRequest) -> Reply | int:
        n = request.json()["n"]
        with lock:
            seen[n] += 1
            attempt = seen[n]
        if n in failing and attempt <= 2:
            return 503 if n % 2 else 500  # 503 also pauses the whole route
        return 200

    with WebhookServer(secret) as server:
        server.responder = respond
        with relay_for(url, hook(server.url(), secret)) as relay:
            committed = publish_many(
                engine, TOPIC, total, keys=keys, per_tx=25, payload=numbered(keys)
            )
            relay.wait_delivered(total, timeout=40)

    assert_signed(server.requests)
    assert_per_key_order(server, committed, keys)
    requests_per_n = Counter(r.json()["n"] for r in server.requests)
    assert requests_per_n == {n: 3 if n in failing else 1 for n in range(total)}
    for n in failing:
        ids = {r.webhook_id for r in server.requests if r.json()["n"] == n}
        assert len(ids) == 1, "one webhook-id across attempts"
    assert attempts_by_id(url) == requests_by_id(server)
    assert dead_letters(url) == []
    assert_settled(url)


# -- pacing ------------------------------------------------------------------------------


def test_concurrency_limits_requests_in_flight(url: str, engine: Engine, secret: str) -> None:
    with WebhookServer(secret) as server:
        server.default = Reply(200, delay=0.2)
        with relay_for(url, hook(server.url(), secret, concurrency=4)) as relay:
            publish_many(engine, TOPIC, 40, keys=40, per_tx=40)
            relay.wait_delivered(40, timeout=30)

    assert len(server.requests) == 40
    assert 2 <= server.max_concurrent <= 4, server.max_concurrent
    assert_signed(server.requests)
    assert set(attempts_by_id(url).values()) == {1}
    assert_settled(url)


def test_rate_limit_spaces_requests(url: str, engine: Engine, secret: str) -> None:
    rate, total = 20, 60
    with (
        WebhookServer(secret) as server,
        relay_for(url, hook(server.url(), secret, rate_limit_per_s=rate)) as relay,
    ):
        published_at = time.time()
        publish_many(engine, TOPIC, total, keys=total, per_tx=total)
        relay.wait_delivered(total, timeout=30)

    arrivals = sorted(r.received_at for r in server.requests)
    assert len(arrivals) == total
    # aiolimiter's AsyncLimiter(rate, 1) is a leaky bucket of `rate`: a burst of `rate` at
    # once, then one every 1/rate s, so the k-th acquisition comes >= (k - rate) / rate s
    # after the first. Acquisitions follow the publish, and each request arrives after its
    # own: a bound with no slack, measured from the publish.
    for k, arrived in enumerate(arrivals, start=1):
        assert arrived - published_at >= (k - rate) / rate, (k, arrived - published_at)
    # First to last request: the first one arrives later after its acquisition than the
    # last (a new connection, an in-process server sharing the GIL), hence the slack.
    span = arrivals[-1] - arrivals[0]
    assert span >= (total - rate) / rate - 0.4, span
    assert span < (total - rate) / rate + 2.5, span
    assert_signed(server.requests)
    assert set(attempts_by_id(url).values()) == {1}
    assert_settled(url)


# -- SSRF and configuration --------------------------------------------------------------


def test_ssrf_guard_blocks_a_host_name_resolving_to_loopback(
    url: str, engine: Engine, secret: str, tmp_path: Path
) -> None:
    with WebhookServer(secret) as server:
        config = tmp_path / "relay.toml"
        config.write_text(
            "".join(
                f"""
[[routes]]
name = "{name}"
topics = ["{name}.events"]
sink = "webhook"
url = "http://localhost:{server.port}/{name}"
secret = "{secret}"
max_attempts = 3
backoff_initial_s = 0.05
backoff_max_s = 0.2
allow_private_network = {allow}
"""
                for name, allow in (("guarded", "false"), ("open", "true"))
            )
        )
        settings = settings_for(url, None, config=str(config), poll_interval=0.1)
        with RelayThread(settings):
            blocked, allowed = publish(
                engine,
                {"payload": {"n": 0}, "topic": "guarded.events"},
                {"payload": {"n": 1}, "topic": "open.events"},
            )
            wait_count(url, "dead_letter", 1)
            wait_count(url, "delivery", 1)

    assert [r.path for r in server.requests] == ["/open"], "nothing reached /guarded"
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert (dead["webhook_id"], dead["route"]) == (blocked, "guarded")
    assert (dead["attempts"], dead["reason"], dead["last_status"]) == (
        1,
        "blocked address",
        "blocked address",
    )
    assert "localhost" in dead["last_error"]
    assert [r.webhook_id for r in server.requests] == [allowed]
    assert attempts_by_id(url, "open") == {allowed: 1}
    assert_settled(url)


@pytest.mark.parametrize(
    ("host", "address"),
    [("127.0.0.1:8080", "127.0.0.1"), ("10.0.0.1", "10.0.0.1"), ("[::1]", "::1")],
)
def test_literal_private_address_is_refused_by_the_config(
    tmp_path: Path, secret: str, host: str, address: str
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[[routes]]\nname = "{ROUTE}"\ntopics = ["{TOPIC}"]\nsink = "webhook"\n'
        f'url = "http://{host}/hook"\nsecret = "{secret}"\nallow_private_network = false\n'
    )
    with pytest.raises(ConfigError, match=f"points at {address} ") as raised:
        load_settings({"database_url": "postgresql://localhost/db"}, {}, str(config))
    assert "allow_private_network" in str(raised.value)


def test_topic_matching_no_route_is_dead_lettered(url: str, engine: Engine, secret: str) -> None:
    with WebhookServer(secret) as server:
        route = hook(server.url(), secret, topics=("orders.*",))
        with relay_for(url, route) as relay:
            routed, lost = publish(
                engine,
                {"payload": {"n": 0}, "topic": "orders.created"},
                {"payload": {"n": 1}, "topic": "invoices.created"},
            )
            relay.wait_delivered(1)
            wait_count(url, "dead_letter", 1)

    assert [r.webhook_id for r in server.requests] == [routed]
    assert_signed(server.requests)
    [dead] = dead_letters(url)
    assert (dead["webhook_id"], dead["route"], dead["topic"]) == (
        lost,
        "no-route",
        "invoices.created",
    )
    assert dead["reason"] == "no route"
    assert attempts_by_id(url) == {routed: 1}
    assert_settled(url)


# -- payload kinds -----------------------------------------------------------------------


def test_binary_and_text_payloads_arrive_byte_for_byte(
    url: str, engine: Engine, secret: str
) -> None:
    binary = b"\x00\xff\xfe\x80 not utf-8"
    text = "héllo wörld ✓"
    with WebhookServer(secret) as server, relay_for(url, hook(server.url(), secret)) as relay:
        bin_id, text_id = publish(
            engine,
            {"payload": binary, "idempotency_key": "binary"},
            {"payload": text, "idempotency_key": "text"},
        )
        relay.wait_delivered(2)

    stored = {d["webhook_id"]: d for d in deliveries(url)}
    by_id = {r.webhook_id: r for r in server.requests}
    assert set(by_id) == {bin_id, text_id} and len(server.requests) == 2

    received = by_id[bin_id]
    assert received.body == binary
    assert received.headers["content-type"] == "application/octet-stream"
    assert received.headers["content-type"] == stored[bin_id]["content_type"]
    # A binary body is signed over its raw bytes: the HMAC written out here, the reference
    # package (the harness's verdict) and the receiver applications use all accept it.
    ts = received.headers["webhook-timestamp"]
    assert [f"v1,{sig}" for _, sig in received.signatures] == [
        hmac_signature(secret, bin_id, ts, binary)
    ]
    assert_signed([received])
    message = WebhookReceiver(secret).verify(received.headers, received.body)
    assert (message.idempotency_key, message.payload) == (bin_id, binary)

    received = by_id[text_id]
    assert received.body == text.encode()
    assert received.headers["content-type"] == "text/plain; charset=utf-8"
    assert received.headers["content-type"] == stored[text_id]["content_type"]
    assert_signed([received])
    assert received.signatures[0][1] == hmac_signature(
        secret, text_id, received.headers["webhook-timestamp"], received.body
    ).removeprefix("v1,")
    assert {k: v["attempts"] for k, v in stored.items()} == {bin_id: 1, text_id: 1}
    assert_settled(url)


# -- nothing stops a lane silently ---------------------------------------------------------


def lane_failures(relay: RelayThread, where: str) -> float | None:
    assert relay.engine is not None
    return relay.engine.metrics.registry.get_sample_value(
        "outbox_lane_failures_total", {"route": ROUTE, "where": where}
    )


def break_once(owner: object, method: str, error: str) -> None:
    """Make ``owner.method`` raise ``RuntimeError(error)`` on its next call only: a bug, once."""
    work: Callable[..., Awaitable[Any]] = getattr(owner, method)
    left = [1]

    async def once(*args: Any) -> Any:
        if left[0]:
            left[0] = 0
            raise RuntimeError(error)
        return await work(*args)

    setattr(owner, method, once)


def only_lane(relay: RelayThread) -> Lane:
    assert relay.engine is not None
    [lane] = relay.engine.lanes
    return lane


def test_a_message_no_request_can_carry_is_dead_lettered_and_its_key_moves_on(
    url: str, engine: Engine, secret: str
) -> None:
    """An idempotency key is the webhook-id, and an HTTP header carries ASCII only. Publish
    refuses such keys since schema version 7; one stored before (here through ``enqueue``,
    which publish calls after its checks) is dead-lettered, not left blocking its key."""
    legacy_key = "bestellung-ü-1"
    with Session(engine) as session, session.begin():
        session.execute(
            text(
                "SELECT outbox.enqueue(:topic, CAST('{}' AS bytea), 'application/json', "
                "CAST('k' AS bytea), CAST('{}' AS jsonb), :key)"
            ),
            {"topic": TOPIC, "key": legacy_key},
        )
        outbox_lib.publish(session, TOPIC, {"n": 2}, key="k", idempotency_key="bestellung-2")
    with WebhookServer(secret) as server, relay_for(url, hook(server.url(), secret)) as relay:
        relay.wait_delivered(1)
        wait_count(url, "dead_letter", 1)
        assert lane_failures(relay, "attempt") == lane_failures(relay, "lane") == 0

    assert [r.webhook_id for r in server.requests] == ["bestellung-2"]
    [dead] = dead_letters(url)
    assert (dead["webhook_id"], dead["attempts"], dead["reason"]) == (legacy_key, 1, "unsendable")
    assert dead["last_error"].startswith("unsendable: cannot build the request: ")
    assert_settled(url)


def test_an_unexpected_error_in_an_attempt_is_logged_counted_and_retried(
    url: str, engine: Engine, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookServer(secret) as server, relay_for(url, hook(server.url(), secret)) as relay:
        break_once(only_lane(relay).sink, "deliver", "a bug in the sink")
        [first, second] = publish(
            engine, {"payload": {"n": 1}, "key": "k"}, {"payload": {"n": 2}, "key": "k"}
        )
        relay.wait_delivered(2)
        assert lane_failures(relay, "attempt") == 1

    assert [r.webhook_id for r in server.requests] == [first, second], "key order kept"
    assert attempts_by_id(url) == {first: 2, second: 1}
    [logged] = [r for r in caplog.records if "failed unexpectedly" in r.getMessage()]
    assert logged.exc_info and "a bug in the sink" in str(logged.exc_info[1])
    assert_settled(url)


def test_a_lane_that_fails_is_logged_counted_and_restarted(
    url: str, engine: Engine, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    with WebhookServer(secret) as server, relay_for(url, hook(server.url(), secret)) as relay:
        break_once(only_lane(relay), "_idle_timeout", "a bug in the claim loop")
        wait_until(lambda: lane_failures(relay, "lane") == 1, 10, "the lane to fail once")
        [msg_id] = publish(engine, {"payload": {"n": 1}})
        relay.wait_delivered(1)

    assert [r.webhook_id for r in server.requests] == [msg_id]
    [logged] = [r for r in caplog.records if "the lane failed" in r.getMessage()]
    assert logged.exc_info and "a bug in the claim loop" in str(logged.exc_info[1])
    assert_settled(url)
