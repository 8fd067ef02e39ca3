"""The relay against a real PostgreSQL and a real Kafka-compatible broker."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import outbox_lib
from tests.harness.kafka import Record, consume_all, consume_for, create_topic, java_partition
from tests.harness.relay import (
    RelayThread,
    publish_many,
    scalar,
    settings_for,
    wait_until,
)

pytestmark = pytest.mark.integration


def _numbers(records: list[Record]) -> list[int]:
    return [json.loads(r.value)["n"] for r in records]


def test_commit_delivers_and_rollback_never_does(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    committed = publish_many(engine, topic_name, 200, per_tx=20, rollback=lambda s: s % 40 == 20)
    assert len(committed) == 100
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(100)
        records = consume_all(kafka.bootstrap, topic_name, 100)
        late = consume_for(kafka.bootstrap, topic_name, 1.0)
    assert sorted(_numbers(records)) == committed
    assert len(late) == 100, "no rolled-back or extra message may arrive"
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 100


def test_record_key_value_and_headers_follow_the_contract(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    with Session(engine) as session, session.begin():
        with_key = outbox_lib.publish(
            session, topic_name, {"order_id": 7}, key="7",
            headers={"tenant": "acme", "raw": b"\x00\xff"}, idempotency_key="order-7-created",
        )  # fmt: skip
        keyless = outbox_lib.publish(session, topic_name, b"\x01binary")
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(2)
        records = consume_all(kafka.bootstrap, topic_name, 2)
    first, second = sorted(records, key=lambda r: r.key is None)
    assert first.key == b"7" and json.loads(first.value) == {"order_id": 7}
    names = [name for name, _ in first.headers]
    assert names[:3] == ["idempotency-key", "outbox-message-id", "outbox-topic"]
    assert first.header("idempotency-key") == b"order-7-created"
    assert first.header("outbox-message-id") == str(with_key).encode()
    assert first.header("outbox-topic") == topic_name.encode()
    assert first.header("tenant") == b"acme" and first.header("raw") == b"\x00\xff"
    assert second.key is None and second.value == b"\x01binary"
    assert second.header("idempotency-key") == str(keyless).encode(), "defaults to the message id"


def test_delivery_log_records_partition_and_offset(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    publish_many(engine, topic_name, 300, keys=30)
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(300)
        records = consume_all(kafka.bootstrap, topic_name, 300)
    where = {r.header("outbox-message-id").decode(): (r.partition, r.offset) for r in records}
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT message_id, kafka_partition, kafka_offset, attempts, route FROM outbox.delivery"
        ).fetchall()
    assert len(rows) == 300
    for message_id, partition, offset, attempts, route in rows:
        assert where[str(message_id)] == (partition, offset)
        assert (attempts, route) == (1, "kafka")


def test_per_key_order_across_partitions_and_batches(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    create_topic(kafka.bootstrap, topic_name, partitions=3)
    publish_many(engine, topic_name, 3000, keys=17, per_tx=250)
    with RelayThread(settings_for(url, kafka.bootstrap, batch_size=200)) as relay:
        relay.wait_delivered(3000, timeout=60)
        records = consume_all(kafka.bootstrap, topic_name, 3000)
    by_key: dict[bytes | None, list[int]] = defaultdict(list)
    partitions: dict[bytes | None, set[int]] = defaultdict(set)
    for record in records:
        by_key[record.key].append(json.loads(record.value)["n"])
        partitions[record.key].add(record.partition)
    assert len(by_key) == 17
    for key, numbers in by_key.items():
        assert numbers == sorted(numbers), f"key {key!r} out of order"
        assert key is not None
        assert partitions[key] == {java_partition(key, 3)}, "the Java client's partition"


def test_idempotency_key_produces_one_record(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    ids = set()
    for _ in range(3):
        with Session(engine) as session, session.begin():
            ids.add(outbox_lib.publish(session, topic_name, {"n": 1}, idempotency_key="once"))
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(1)
        with Session(engine) as session, session.begin():
            again = outbox_lib.publish(session, topic_name, {"n": 1}, idempotency_key="once")
        records = consume_for(kafka.bootstrap, topic_name, 1.5)
    assert len(ids) == 1 and again in ids
    assert len(records) == 1


def test_sql_function_publish_is_delivered(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("SELECT outbox.publish(:t, CAST(:p AS jsonb), key => 'k1', headers => :h)"),
            {"t": topic_name, "p": '{"from": "sql"}', "h": '{"x": "y"}'},
        )
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(1)
        (record,) = consume_all(kafka.bootstrap, topic_name, 1)
    assert json.loads(record.value) == {"from": "sql"}
    assert record.key == b"k1" and record.header("x") == b"y"


def test_record_too_large_is_dead_lettered_while_the_topic_flows(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    big = "x" * 20_000
    committed = publish_many(
        engine, topic_name, 30, keys=3,
        payload=lambda n: {"n": n, "pad": big if n == 4 else ""},
    )  # fmt: skip
    config = {"kafka_producer": {"message.max.bytes": 10_000}}
    settings = settings_for(url, kafka.bootstrap)
    settings = type(settings)(**{**_fields(settings), **config})
    with RelayThread(settings) as relay:
        wait_until(lambda: relay.engine is not None and relay.engine.stats.dead == 1, 30, "dead")
        relay.wait_delivered(29)
        records = consume_all(kafka.bootstrap, topic_name, 29)
    assert sorted(_numbers(records)) == [n for n in committed if n != 4]
    key_one = [n for n in _numbers(records) if n % 3 == 1]
    assert key_one == sorted(key_one) and 7 in key_one, "later messages of the key still flow"
    with psycopg.connect(url) as conn:
        reason, attempts, payload = conn.execute(
            "SELECT reason, attempts, payload FROM outbox.dead_letter"
        ).fetchone()
    assert "SIZE_TOO_LARGE" in reason and attempts == 1
    assert json.loads(payload)["n"] == 4, "the dead letter keeps the whole message"
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0


def _fields(settings: object) -> dict[str, object]:
    return {name: getattr(settings, name) for name in settings.__slots__}  # type: ignore[attr-defined]


def test_topic_without_route_is_dead_lettered_not_dropped(
    url: str, engine: Engine, kafka, topic_name: str, tmp_config
) -> None:
    path = tmp_config(
        f"""
[kafka]
bootstrap_servers = "{kafka.bootstrap}"
[[routes]]
name = "only-orders"
topics = ["{topic_name}.orders.*"]
sink = "kafka"
kafka_topic = "{topic_name}"
"""
    )
    with Session(engine) as session, session.begin():
        outbox_lib.publish(session, f"{topic_name}.orders.created", {"n": 1})
        lost = outbox_lib.publish(session, f"{topic_name}.audit", {"n": 2})
    with RelayThread(settings_for(url, None, config=str(path))) as relay:
        relay.wait_delivered(1)
        wait_until(lambda: relay.engine.stats.dead == 1, 10, "no-route dead letter")
        records = consume_all(kafka.bootstrap, topic_name, 1)
    assert _numbers(records) == [1]
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT message_id, route, reason FROM outbox.dead_letter").fetchone()
    assert row == (lost, "no-route", "no route")


def test_keyless_messages_are_all_delivered(
    url: str, engine: Engine, kafka, topic_name: str
) -> None:
    committed = publish_many(engine, topic_name, 500, keys=None)
    with RelayThread(settings_for(url, kafka.bootstrap, batch_size=64)) as relay:
        relay.wait_delivered(500)
        records = consume_all(kafka.bootstrap, topic_name, 500)
    assert sorted(_numbers(records)) == committed
    ids = {r.header("outbox-message-id") for r in records}
    assert len(ids) == 500 and all(uuid.UUID(i.decode()) for i in ids)
