"""The FastAPI receiver of ``docs/examples/inbox_fastapi.py``, served for real by uvicorn.

Signed requests arrive three times each in shuffled order, forged and stale ones are
refused, and the relay's own webhook route delivers to it, then replays everything: each
order is shipped exactly once.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib._signature import parse_secrets, sign
from relay.replay import Replay, replay
from tests.harness.examples import load_example
from tests.harness.ports import free_port
from tests.harness.relay import RelayThread, scalar, settings_for, sqlalchemy_url, wait_until
from tests.harness.webhook import new_secret
from tests.integration.pg_helpers import fetch
from tests.integration.test_inbox import assert_each_effect_once
from tests.integration.test_webhook_faults import hook_config, hook_route

pytestmark = pytest.mark.integration

ORDERS = 20


class Receiver:
    """The example app on a real port, in a thread."""

    def __init__(self, database_url: str, secret: str, driver: str = "psycopg") -> None:
        app = load_example("inbox_fastapi").create_app(sqlalchemy_url(database_url, driver), secret)
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/orders"

    def __enter__(self) -> Receiver:
        self._thread.start()
        wait_until(lambda: self.server.started, 15, "uvicorn start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(15)


@pytest.fixture
def secret() -> str:
    return new_secret()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10.0, trust_env=False) as client:
        yield client


def signed(
    secret: str, webhook_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    """As the relay's webhook route signs a message of topic ``orders.created``."""
    stamp = int(time.time()) if timestamp is None else timestamp
    keys = parse_secrets(secret)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(keys, webhook_id, stamp, body),
        "outbox-topic": "orders.created",
        "outbox-topic-signature": sign(keys, webhook_id, stamp, body, topic="orders.created"),
        "content-type": "application/json",
    }


def body(n: int) -> bytes:
    return b'{"order_id": %d}' % n


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_each_request_three_times_shuffled_ships_once(
    url: str, secret: str, client: httpx.Client, driver: str
) -> None:
    deliveries = [n for n in range(ORDERS) for _ in range(3)]
    random.Random(5).shuffle(deliveries)
    with Receiver(url, secret, driver) as receiver:
        statuses = [
            client.post(
                receiver.url, content=body(n), headers=signed(secret, f"msg-{n}", body(n))
            ).status_code
            for n in deliveries
        ]
    assert statuses == [204] * len(deliveries)
    assert_each_effect_once(url, ORDERS, table="shipments")
    assert scalar(url, "SELECT count(*) FROM outbox.inbox WHERE consumer = 'shipping'") == ORDERS


def test_forged_stale_and_unsigned_requests_are_refused(
    url: str, secret: str, client: httpx.Client
) -> None:
    good = signed(secret, "msg-1", body(1))
    cases = {
        "tampered body": (body(2), good),
        "other secret": (body(1), signed(new_secret(), "msg-1", body(1))),
        "stale": (body(1), signed(secret, "msg-1", body(1), int(time.time()) - 600)),
        "unsigned": (body(1), {k: v for k, v in good.items() if k != "webhook-signature"}),
        "other id": (body(1), {**good, "webhook-id": "msg-2"}),
        "other topic": (body(1), {**good, "outbox-topic": "orders.paid"}),
        "no topic": (body(1), {k: v for k, v in good.items() if not k.startswith("outbox-")}),
    }
    with Receiver(url, secret) as receiver:
        answers = {
            what: client.post(receiver.url, content=content, headers=headers)
            for what, (content, headers) in cases.items()
        }
    assert {what: r.status_code for what, r in answers.items()} == dict.fromkeys(cases, 401)
    assert "no signature matches" in answers["tampered body"].text
    assert "in the past" in answers["stale"].text
    assert "webhook-signature header is missing" in answers["unsigned"].text
    assert "no outbox-topic-signature matches" in answers["other topic"].text
    assert "outbox-topic header is missing" in answers["no topic"].text
    assert all(secret not in r.text for r in answers.values())
    assert scalar(url, "SELECT count(*) FROM shipments") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.inbox") == 0


def test_relay_webhook_route_then_replay_ships_once(
    url: str, engine: Engine, secret: str, tmp_path: Path
) -> None:
    """End to end: outbox → relay → signed webhook → inbox, then an operator's replay."""
    with Session(engine) as session, session.begin():
        for n in range(ORDERS):
            outbox_lib.publish(session, "orders.created", {"order_id": n}, key=f"k{n}")
    with Receiver(url, secret) as receiver:
        config = hook_config(tmp_path, hook_route("shipping", receiver.url, secret))
        with RelayThread(settings_for(url, None, config=config)) as relay:
            relay.wait_delivered(ORDERS)
            assert_each_effect_once(url, ORDERS, table="shipments")
            with psycopg.connect(url) as conn:
                again = replay(conn, "outbox", Replay(topic="orders.created", route="shipping"))
            assert again.messages == ORDERS
            wait_until(lambda: relay.delivered >= 2 * ORDERS, 30, "the replay delivered")
    assert_each_effect_once(url, ORDERS, table="shipments")
    # The delivery log keeps both deliveries of every order: the first and the replay.
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 2 * ORDERS
    assert scalar(url, "SELECT count(DISTINCT message_id) FROM outbox.delivery") == ORDERS


def test_two_topics_published_with_one_idempotency_key_take_effect_twice(
    url: str, engine: Engine, secret: str, tmp_path: Path
) -> None:
    """Idempotency keys are unique per topic: one route sends both messages to one endpoint
    with the same webhook-id, and the topic the relay signs keeps them two effects."""
    with Session(engine) as session, session.begin():
        for topic in ("orders.created", "orders.paid"):
            outbox_lib.publish(session, topic, {"order_id": 7}, idempotency_key="order-7")
    with Receiver(url, secret) as receiver:
        config = hook_config(tmp_path, hook_route("shipping", receiver.url, secret))
        with RelayThread(settings_for(url, None, config=config)) as relay:
            relay.wait_delivered(2)
    assert scalar(url, "SELECT count(*) FROM shipments WHERE order_id = 7") == 2
    rows = fetch(url, "SELECT idempotency_key, topic FROM outbox.inbox ORDER BY topic")
    assert rows == [("order-7", "orders.created"), ("order-7", "orders.paid")]
