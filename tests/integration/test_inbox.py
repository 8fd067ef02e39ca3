"""The inbox on a real PostgreSQL: every message delivered three times, in shuffled order,
has its business effect exactly once.

The effect is deliberately not idempotent by itself (a ``charges``/``shipments`` row with a
serial id, no unique constraint on the order): only the inbox keeps it to one.
"""

from __future__ import annotations

import asyncio
import random
import threading
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

import outbox_lib
import outbox_lib.alembic
from outbox_lib.inbox import Inbox, InboxMessage
from tests.harness.examples import load_example
from tests.harness.relay import scalar, sqlalchemy_url
from tests.integration.pg_helpers import fetch, sync_engine

pytestmark = pytest.mark.integration

ORDERS = 40


def orders(count: int = ORDERS) -> list[InboxMessage]:
    return [
        InboxMessage(
            idempotency_key=f"order-{n}-created",
            payload=b'{"order_id": %d, "total": "%d.25"}' % (n, n),
            topic="orders.created",
        )
        for n in range(count)
    ]


def three_times_shuffled(messages: list[InboxMessage], seed: int = 7) -> list[InboxMessage]:
    deliveries = messages * 3
    random.Random(seed).shuffle(deliveries)
    return deliveries


def charges_per_order(url: str, table: str = "charges") -> dict[int, int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(f"SELECT order_id, count(*) FROM {table} GROUP BY order_id").fetchall()
    return {int(order): int(n) for order, n in rows}


def assert_each_effect_once(url: str, count: int = ORDERS, table: str = "charges") -> None:
    assert charges_per_order(url, table) == dict.fromkeys(range(count), 1)


@pytest.fixture
def kafka_example() -> Any:
    return load_example("inbox_kafka")


@pytest.fixture
def charges(engine: Engine, kafka_example: Any) -> Any:
    """The example's charge handler, its table created."""
    kafka_example.Base.metadata.create_all(engine)
    return kafka_example.charge_handler(engine)


def test_sync_handler_replayed_three_times_shuffled(url: str, charges: Any) -> None:
    outcomes = [charges(m) for m in three_times_shuffled(orders())]
    assert outcomes.count(True) == ORDERS and outcomes.count(False) == 2 * ORDERS
    assert_each_effect_once(url)
    total = scalar(url, "SELECT sum(amount) FROM charges")
    assert total == sum(Decimal(f"{n}.25") for n in range(ORDERS))
    assert scalar(url, "SELECT count(*) FROM outbox.inbox WHERE consumer = 'billing'") == ORDERS


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_handler_replayed_three_times_shuffled(url: str, engine: Engine, driver: str) -> None:
    example = load_example("inbox_kafka")
    example.Base.metadata.create_all(engine)
    inbox = Inbox("billing-async")

    async def main() -> list[bool]:
        async_engine = create_async_engine(sqlalchemy_url(url, driver))
        try:

            @inbox.handler_async(async_sessionmaker(async_engine))
            async def charge(session: AsyncSession, message: InboxMessage) -> None:
                order = message.json()
                session.add(example.Charge(order_id=order["order_id"], amount=order["total"]))

            return [await charge(m) for m in three_times_shuffled(orders(), seed=11)]
        finally:
            await async_engine.dispose()

    outcomes = asyncio.run(main())
    assert outcomes.count(True) == ORDERS
    assert_each_effect_once(url)


def test_concurrent_deliveries_of_the_same_messages(url: str, charges: Any) -> None:
    """Six consumers get all messages at once: the second accept of a key waits for the first
    transaction and skips once it commits."""
    messages = orders(15)
    barrier = threading.Barrier(6)
    outcomes: list[bool] = []
    lock = threading.Lock()

    def consumer(seed: int) -> None:
        mine = messages[:]
        random.Random(seed).shuffle(mine)
        barrier.wait()
        results = [charges(m) for m in mine]
        with lock:
            outcomes.extend(results)

    threads = [threading.Thread(target=consumer, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert outcomes.count(True) == 15 and outcomes.count(False) == 75
    assert_each_effect_once(url, 15)


def test_a_failed_handler_leaves_no_trace_and_the_redelivery_runs(
    url: str, engine: Engine, charges: Any
) -> None:
    inbox = Inbox("billing")
    attempts = []

    @inbox.handler(sessionmaker(engine))
    def flaky(session: Session, message: InboxMessage) -> None:
        attempts.append(message.idempotency_key)
        session.execute(text("INSERT INTO charges (order_id, amount) VALUES (99, 1)"))
        if len(attempts) == 1:
            raise RuntimeError("payment provider said no")

    message = InboxMessage("order-99", b"{}")
    with pytest.raises(RuntimeError, match="provider"):
        flaky(message)
    assert scalar(url, "SELECT count(*) FROM outbox.inbox") == 0
    assert scalar(url, "SELECT count(*) FROM charges") == 0
    assert flaky(message) is True
    assert flaky(message) is False
    assert attempts == ["order-99", "order-99"]
    assert charges_per_order(url) == {99: 1}


def test_accept_in_the_callers_transaction(url: str, engine: Engine) -> None:
    inbox = Inbox("c")
    with engine.connect() as conn:
        with conn.begin() as tx:
            assert inbox.accept(conn, "k1") is True
            assert inbox.accept(conn, "k1") is False  # its own uncommitted row counts
            tx.rollback()
        with conn.begin():
            assert inbox.accept(conn, "k1") is True  # rolled back: new again
    with Session(engine) as session, session.begin():
        assert inbox.accept(session, "k1") is False
        assert Inbox("other-consumer").accept(session, "k1") is True
    assert scalar(url, "SELECT count(*) FROM outbox.inbox") == 2


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_accept_async_on_session_and_connection(url: str, driver: str) -> None:
    inbox = Inbox("c")

    async def main() -> list[bool]:
        async_engine = create_async_engine(sqlalchemy_url(url, driver))
        try:
            async with async_engine.begin() as conn:
                first = [await inbox.accept_async(conn, "a"), await inbox.accept_async(conn, "a")]
            async with AsyncSession(async_engine) as session, session.begin():
                second = [await inbox.accept_async(session, "a")]
            return first + second
        finally:
            await async_engine.dispose()

    assert asyncio.run(main()) == [True, False, False]


def test_deduplication_is_per_topic_as_idempotency_keys_are(url: str, engine: Engine) -> None:
    """Two topics published with one key are two messages: each takes effect once."""
    inbox = Inbox("c")
    with Session(engine) as session, session.begin():
        assert inbox.accept(session, "order-7", topic="orders.created") is True
        assert inbox.accept(session, "order-7", topic="orders.paid") is True
        assert inbox.accept(session, "order-7", topic="orders.created") is False
        assert inbox.accept(session, "order-7", topic="orders.paid") is False
        # Without a topic (the form of schema version 6), a key is accepted once in all.
        assert inbox.accept(session, "order-7") is False
        assert inbox.accept(session, "order-8") is True
        assert inbox.accept(session, "order-8", topic="orders.created") is False
    assert sorted(
        (str(key), str(topic))
        for key, topic in fetch(url, "SELECT idempotency_key, topic FROM outbox.inbox")
    ) == [("order-7", "orders.created"), ("order-7", "orders.paid"), ("order-8", "")]


def test_the_handler_charges_each_topic_of_one_key_once(url: str, charges: Any) -> None:
    messages = [
        InboxMessage(idempotency_key="order-5", payload=b'{"order_id": 5, "total": "1"}', topic=t)
        for t in ("orders.created", "orders.paid")
    ]
    assert [charges(m) for m in three_times_shuffled(messages)].count(True) == 2
    assert charges_per_order(url) == {5: 2}


def test_keys_accepted_before_version_7_still_hold_for_every_topic(database_url: str) -> None:
    """An upgrade must not let a message processed before it take effect again."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn, to_version=6)
        assert conn.execute("SELECT outbox.inbox_accept('c', 'old')").fetchone() == (True,)
        assert outbox_lib.migrate(conn, to_version=7) == [7]
        accept = "SELECT outbox.inbox_accept('c', %s, %s)"
        assert conn.execute(accept, ("old", "orders.created")).fetchone() == (False,)
        assert conn.execute(accept, ("new", "orders.created")).fetchone() == (True,)
        assert conn.execute(accept, ("new", "orders.paid")).fetchone() == (True,)
    # Back down to 6: one row per (consumer, key) is kept, and it still holds the key.
    with sync_engine(database_url) as engine, engine.begin() as sa_conn:
        assert outbox_lib.alembic.downgrade(sa_conn, to_version=6, schema="outbox") == [7]
    assert fetch(database_url, "SELECT outbox.inbox_accept('c', 'new')") == [(False,)]
    assert fetch(database_url, "SELECT count(*) FROM outbox.inbox") == [(2,)]


def test_bad_input_is_refused_before_the_database(url: str, engine: Engine) -> None:
    inbox = Inbox("c")
    with Session(engine) as session, session.begin():
        for bad in ("", "x" * 513, None, b"bytes", "a\x00b"):
            with pytest.raises(outbox_lib.InvalidMessageError, match="idempotency_key"):
                inbox.accept(session, bad)  # type: ignore[arg-type]
        for topic, reason in (("", "must not be empty"), ("t" * 256, "longer"), (7, "str")):
            with pytest.raises(outbox_lib.InvalidMessageError, match=f"topic .*{reason}|{reason}"):
                inbox.accept(session, "k", topic=topic)  # type: ignore[arg-type]
        assert inbox.accept(session, "still-usable") is True
        with pytest.raises(
            outbox_lib.UnsupportedSessionError, match=r"AsyncSession .*Inbox\.accept\(\)"
        ):
            asyncio.run(inbox.accept_async(session, "k"))  # type: ignore[arg-type]
    with pytest.raises(outbox_lib.UnsupportedSessionError, match="got str"):
        inbox.accept("not a session", "k")  # type: ignore[arg-type]
    for consumer in ("", "c" * 201, 7, "a\x00"):
        with pytest.raises(outbox_lib.ConfigurationError, match="consumer"):
            Inbox(consumer)  # type: ignore[arg-type]
    with pytest.raises(outbox_lib.ConfigurationError, match="schema"):
        Inbox("c", schema="no such; schema")


def test_unmigrated_database_says_to_migrate(database_url: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with (
            Session(engine) as session,
            session.begin(),
            pytest.raises(outbox_lib.SchemaNotMigratedError, match="outbox-relay migrate"),
        ):
            Inbox("c").accept(session, "k")
    finally:
        engine.dispose()


def test_sql_function_for_non_python_consumers(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        accept = "SELECT outbox.inbox_accept(%s, %s)"
        assert conn.execute(accept, ("java-billing", "k")).fetchone() == (True,)
        assert conn.execute(accept, ("java-billing", "k")).fetchone() == (False,)
        for consumer, key in ((None, "k"), ("", "k"), ("c", None), ("c", ""), ("c", "x" * 513)):
            with pytest.raises(psycopg.errors.InvalidParameterValue, match="inbox_accept"):
                conn.execute(accept, (consumer, key))
        per_topic = "SELECT outbox.inbox_accept(%s, %s, %s)"
        assert conn.execute(per_topic, ("java-billing", "k2", "orders.paid")).fetchone() == (True,)
        assert conn.execute(per_topic, ("java-billing", "k2", "orders.x")).fetchone() == (True,)
        assert conn.execute(per_topic, ("java-billing", "k2", "orders.x")).fetchone() == (False,)
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="topic is longer"):
            conn.execute(per_topic, ("java-billing", "k3", "t" * 256))


def test_transient_error_classification() -> None:
    from outbox_lib.inbox import is_transient

    assert is_transient(OperationalError("SELECT 1", None, Exception("server closed")))
    assert is_transient(outbox_lib.DatabaseUnavailableError("down"))
    assert not is_transient(RuntimeError("bug"))
    assert not is_transient(outbox_lib.InvalidMessageError("bad"))
