"""Proof that the shared fixtures do what other suites rely on."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from confluent_kafka import Producer

from tests.harness.kafka import (
    KafkaEndpoint,
    TansuBroker,
    consume_all,
    consume_for,
    create_topic,
)
from tests.harness.postgres import PgServer, dbname_of, with_dbname

pytestmark = pytest.mark.integration

# Names handed out earlier in this module, to prove each test gets its own database.
_seen_databases: list[str] = []


def _producer(bootstrap: str) -> Producer:
    """Fast-failing producer: no batching delay, so flush() measures broker acks."""
    return Producer({"bootstrap.servers": bootstrap, "linger.ms": 0, "acks": "all"})


@pytest.mark.parametrize("round_", [1, 2])
def test_database_url_is_empty_connectable_and_distinct(
    database_url: str, pg_server: PgServer, round_: int
) -> None:
    name = dbname_of(database_url)
    assert name.startswith("outbox_t_")
    assert name not in _seen_databases
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (name,)
        tables = conn.execute(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE leftover (id int)")  # a reused database would show it
    with psycopg.connect(pg_server.admin_url) as admin:
        existing = {row[0] for row in admin.execute("SELECT datname FROM pg_database")}
    assert not existing & set(_seen_databases), "previous test database was not dropped"
    _seen_databases.append(name)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres:@/postgres?host=/tmp/s", "postgresql://postgres:@/db1?host=/tmp/s"),
        ("postgresql:///postgres?host=/tmp/s", "postgresql:///db1?host=/tmp/s"),
        ("postgresql://u:p@h:5/x?sslmode=disable", "postgresql://u:p@h:5/db1?sslmode=disable"),
        ("postgresql://h/x?dbname=x&host=/tmp/s", "postgresql://h/db1?host=/tmp/s"),
    ],
)
def test_with_dbname_keeps_host_and_query(url: str, expected: str) -> None:
    assert with_dbname(url, "db1") == expected


def test_consume_all_returns_every_record_with_keys_and_headers(
    kafka: KafkaEndpoint, topic_name: str
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    producer = _producer(kafka.bootstrap)
    for i in range(100):
        producer.produce(
            topic_name,
            key=f"k{i}".encode(),
            value=f"v{i}".encode(),
            headers=[("idx", str(i).encode()), ("kind", b"test")],
        )
    assert producer.flush(10) == 0

    records = consume_all(kafka.bootstrap, topic_name, expected=100, timeout=30)

    assert len(records) == 100
    assert {r.key for r in records} == {f"k{i}".encode() for i in range(100)}
    for r in records:
        idx = r.header("idx")
        assert idx is not None
        assert r.key == b"k" + idx and r.value == b"v" + idx
        assert r.header("kind") == b"test" and r.header("missing") is None
    assert len({r.partition for r in records}) > 1, "3 partitions but everything in one"


def test_consume_for_sees_nothing_on_an_absent_topic(kafka: KafkaEndpoint, topic_name: str) -> None:
    started = time.monotonic()
    assert consume_for(kafka.bootstrap, topic_name, seconds=0.5) == []
    assert time.monotonic() - started < 5


def test_paused_broker_does_not_ack_until_resumed(
    kafka_broker: TansuBroker, topic_name: str
) -> None:
    create_topic(kafka_broker.bootstrap, topic_name)
    producer = _producer(kafka_broker.bootstrap)
    producer.produce(topic_name, value=b"warm-up")  # connection + metadata before pausing
    assert producer.flush(10) == 0
    delivered: list[Any] = []

    with kafka_broker.paused():
        producer.produce(
            topic_name, value=b"during-pause", on_delivery=lambda err, msg: delivered.append(err)
        )
        assert producer.flush(1.0) == 1, "a frozen broker acknowledged a produce"
        assert delivered == []

    assert producer.flush(10) == 0
    assert delivered == [None]
    values = [r.value for r in consume_all(kafka_broker.bootstrap, topic_name, expected=2)]
    assert values == [b"warm-up", b"during-pause"]


def test_pg_server_restart_keeps_data_and_accepts_new_connections(
    pg_server: PgServer, database_url: str
) -> None:
    if pg_server.kind != "embedded":
        pytest.skip("restart is only supported for the embedded server")
    old_pid = pg_server.pid
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE survivor (id int); INSERT INTO survivor VALUES (7)")
        pg_server.restart()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # fast shutdown cut the old session

    assert pg_server.pid not in (None, old_pid)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT id FROM survivor").fetchone() == (7,)
        assert conn.execute("SHOW max_connections").fetchone() == ("200",)
