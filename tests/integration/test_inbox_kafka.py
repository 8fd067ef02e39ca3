"""The Kafka inbox loop against a real broker and a real PostgreSQL.

Records are produced three times each in shuffled order, consumers are stopped between the
database commit and the offset commit, a handler fails half way: every order is charged
exactly once and offsets never run ahead of the database.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
from confluent_kafka import OFFSET_INVALID, Consumer, Producer, TopicPartition
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib.inbox import InboxMessage, KafkaInboxLoop, consumer_config
from relay.replay import Replay, replay
from tests.harness.examples import load_example
from tests.harness.kafka import KafkaEndpoint, create_topic
from tests.harness.relay import RelayThread, settings_for, wait_until
from tests.integration.test_inbox import assert_each_effect_once, charges_per_order

pytestmark = pytest.mark.integration

ORDERS = 30
PARTITIONS = 2


def produce_three_times_shuffled(bootstrap: str, topic: str, count: int = ORDERS) -> None:
    """Each order as the relay would send it, three times, in shuffled order."""
    records = [n for n in range(count) for _ in range(3)]
    random.Random(3).shuffle(records)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for n in records:
        producer.produce(
            topic,
            key=f"k{n}".encode(),
            value=b'{"order_id": %d, "total": "%d.25"}' % (n, n),
            headers=[("idempotency-key", f"order-{n}".encode()), ("outbox-topic", b"orders")],
            partition=n % PARTITIONS,
        )
    assert producer.flush(15) == 0


def kafka_config(bootstrap: str, group: str) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "group.id": group, "fetch.wait.max.ms": 10}


def partitions(topic: str) -> list[TopicPartition]:
    """Assigned without an offset: the consumer resumes from the group's committed offset."""
    return [TopicPartition(topic, p) for p in range(PARTITIONS)]


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    consumer = Consumer(kafka_config(bootstrap, group))
    try:
        return [tp.offset for tp in consumer.committed(partitions(topic), timeout=10)]
    finally:
        consumer.close()


@pytest.fixture
def topic(kafka: KafkaEndpoint) -> str:
    name = f"inbox-{uuid.uuid4().hex[:10]}"
    create_topic(kafka.bootstrap, name, partitions=PARTITIONS)
    return name


@pytest.fixture
def example(engine: Engine) -> Any:
    module = load_example("inbox_kafka")
    module.Base.metadata.create_all(engine)
    return module


def test_each_record_three_times_shuffled_is_charged_once(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    produce_three_times_shuffled(kafka.bootstrap, topic)
    group = f"billing-{uuid.uuid4().hex[:8]}"
    stats = example.consume(
        engine,
        kafka_config(kafka.bootstrap, group),
        idle_timeout_s=2.0,
        partitions=partitions(topic),
    )
    assert (stats.processed, stats.skipped) == (ORDERS, 2 * ORDERS)
    assert_each_effect_once(url, ORDERS)
    # Everything is done, so the group's offsets reach the end of each partition.
    assert committed(kafka.bootstrap, group, topic) == [3 * ORDERS // PARTITIONS] * PARTITIONS


def test_a_consumer_dying_after_the_database_commit_redelivers_harmlessly(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    """Work committed, offsets not: the next consumer gets those records again and the
    inbox skips them."""
    produce_three_times_shuffled(kafka.bootstrap, topic)
    group = f"billing-{uuid.uuid4().hex[:8]}"
    config = kafka_config(kafka.bootstrap, group)
    dying = KafkaInboxLoop(
        config,
        example.charge_handler(engine),
        partitions=partitions(topic),
        commit_every=10_000,
        commit_interval_s=3600,
    )
    dying.commit = lambda: None  # type: ignore[method-assign]  # the crash: no commit ever
    first = dying.run(max_messages=40)
    dying.close()
    assert first.handled == 40
    # None committed.
    assert committed(kafka.bootstrap, group, topic) == [OFFSET_INVALID] * PARTITIONS

    stats = example.consume(engine, config, idle_timeout_s=2.0, partitions=partitions(topic))
    assert stats.handled == 3 * ORDERS  # the 40 came again
    assert first.processed + stats.processed == ORDERS
    assert_each_effect_once(url, ORDERS)


def test_a_failing_handler_stops_the_loop_without_committing_past_it(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    produce_three_times_shuffled(kafka.bootstrap, topic)
    group = f"billing-{uuid.uuid4().hex[:8]}"
    config = kafka_config(kafka.bootstrap, group)
    charge = example.charge_handler(engine)
    seen: list[InboxMessage] = []

    def poisoned(message: InboxMessage) -> bool:
        seen.append(message)
        if len(seen) == 25:
            raise ValueError("card network rejected the order")
        return bool(charge(message))

    loop = KafkaInboxLoop(config, poisoned, partitions=partitions(topic))
    with loop, pytest.raises(ValueError, match="card network"):
        loop.run()
    offsets = committed(kafka.bootstrap, group, topic)
    assert sum(max(o, 0) for o in offsets) == 24  # exactly the records handled before it

    # A fresh consumer of the group starts at the failed record and finishes the rest.
    stats = example.consume(engine, config, idle_timeout_s=2.0, partitions=partitions(topic))
    assert stats.handled == 3 * ORDERS - 24
    assert_each_effect_once(url, ORDERS)


def test_the_same_loop_rewinds_and_retries_the_failed_record(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    produce_three_times_shuffled(kafka.bootstrap, topic)
    charge = example.charge_handler(engine)
    failures = {"left": 1}
    before: list[bool] = []  # what each record handled before the failure returned

    def once_broken(message: InboxMessage) -> bool:
        if message.idempotency_key == "order-7" and failures["left"]:
            failures["left"] -= 1
            raise ValueError("temporarily broken")
        processed = bool(charge(message))
        if failures["left"]:
            before.append(processed)
        return processed

    config = kafka_config(kafka.bootstrap, f"billing-{uuid.uuid4().hex[:8]}")
    with KafkaInboxLoop(config, once_broken, partitions=partitions(topic), batch_size=50) as loop:
        with pytest.raises(ValueError, match="temporarily"):
            loop.run()
        stats = loop.run(idle_timeout_s=2.0)
    assert charges_per_order(url).get(7) == 1
    assert_each_effect_once(url, ORDERS)
    # The second run starts at the failed record: every record is handled once in all.
    assert stats.processed == ORDERS - sum(before)
    assert stats.skipped == 2 * ORDERS - (len(before) - sum(before))


def test_transient_database_errors_retry_the_same_record(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    produce_three_times_shuffled(kafka.bootstrap, topic, count=4)
    charge = example.charge_handler(engine)
    calls: list[str] = []

    def connection_drops_twice(message: InboxMessage) -> bool:
        calls.append(message.idempotency_key)
        if len(calls) <= 2:
            raise OperationalError("INSERT", None, Exception("server closed the connection"))
        return bool(charge(message))

    config = kafka_config(kafka.bootstrap, f"billing-{uuid.uuid4().hex[:8]}")
    with KafkaInboxLoop(config, connection_drops_twice, partitions=partitions(topic)) as loop:
        stats = loop.run(idle_timeout_s=2.0)
    assert calls[0] == calls[1] == calls[2]  # the same record, three times
    assert stats.handled == 12
    assert_each_effect_once(url, 4)


def test_stop_interrupts_the_backoff(
    engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    produce_three_times_shuffled(kafka.bootstrap, topic, count=2)
    stop = threading.Event()
    calls: list[float] = []
    stopped: list[tuple[float, int]] = []  # when stop was set, after how many calls

    def set_stop() -> None:
        stopped.append((time.monotonic(), len(calls)))
        stop.set()

    def database_down(message: InboxMessage) -> bool:
        calls.append(time.monotonic())
        if len(calls) == 5:  # the wait after the 5th try is 1.6 s or more: stop 0.4 s into it
            threading.Timer(0.4, set_stop).start()
        raise OperationalError("INSERT", None, Exception("connection refused"))

    config = kafka_config(kafka.bootstrap, f"billing-{uuid.uuid4().hex[:8]}")
    with KafkaInboxLoop(
        config, database_down, partitions=partitions(topic), max_backoff_s=60
    ) as loop:
        stats = loop.run(stop=stop)
        returned = time.monotonic()
    assert stats.handled == 0
    [(stopped_at, tries)] = stopped
    # The wait after try n is at least 0.1 * 2**(n - 1) s (0.1 s doubling, plus jitter).
    wait_ends = calls[tries - 1] + 0.1 * 2 ** (tries - 1)
    assert returned < wait_ends, "the loop slept its backoff out"
    assert returned - stopped_at < 0.5


def test_config_that_could_lose_records_is_refused() -> None:
    with pytest.raises(outbox_lib.ConfigurationError, match=r"group\.id"):
        consumer_config({"bootstrap.servers": "x"})
    for auto in (True, "true", "1"):
        with pytest.raises(outbox_lib.ConfigurationError, match=r"enable\.auto\.commit"):
            consumer_config({"group.id": "g", "enable.auto.commit": auto})
    merged = consumer_config({"group.id": "g", "enable.auto.commit": "false"})
    assert merged["enable.auto.commit"] is False and merged["enable.auto.offset.store"] is False
    assert merged["auto.offset.reset"] == "earliest"
    assert merged["session.timeout.ms"] == 10_000, "a crashed member's partitions wait 10 s"
    given = consumer_config({"group.id": "g", "session.timeout.ms": 30_000})
    assert given["session.timeout.ms"] == 30_000
    with pytest.raises(outbox_lib.ConfigurationError, match="exactly one"):
        KafkaInboxLoop({"group.id": "g"}, bool)


def test_end_to_end_relay_to_kafka_to_inbox_with_a_replay(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    """Published through the outbox, relayed to Kafka, charged once; an operator's replay
    sends everything again and nothing is charged twice."""
    with Session(engine) as session, session.begin():
        for n in range(ORDERS):
            outbox_lib.publish(
                session,
                topic,
                {"order_id": n, "total": f"{n}.25"},
                key=f"k{n}",
                idempotency_key=f"order-{n}-created",
            )
    config = kafka_config(kafka.bootstrap, f"billing-{uuid.uuid4().hex[:8]}")
    with RelayThread(settings_for(url, kafka.bootstrap)) as relay:
        relay.wait_delivered(ORDERS)
        first = example.consume(engine, config, idle_timeout_s=2.0, partitions=partitions(topic))
        assert first.processed == ORDERS
        with psycopg.connect(url) as conn:
            assert replay(conn, "outbox", Replay(topic=topic, route="kafka")).messages == ORDERS
        wait_until(lambda: relay.delivered >= 2 * ORDERS, 30, "the replay delivered")
    again = example.consume(engine, config, idle_timeout_s=2.0, partitions=partitions(topic))
    assert (again.processed, again.skipped) == (0, ORDERS)
    assert_each_effect_once(url, ORDERS)


def test_two_topics_published_with_one_idempotency_key_are_charged_once_each(
    url: str, engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any, tmp_path: Any
) -> None:
    """Idempotency keys are unique per topic. One route sends orders.created and orders.paid
    to one Kafka topic with the same idempotency-key header; outbox-topic keeps them apart."""
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[kafka]\nbootstrap_servers = "{kafka.bootstrap}"\n'
        f'[[routes]]\nname = "orders"\ntopics = ["orders.*"]\nsink = "kafka"\n'
        f'kafka_topic = "{topic}"\n'
    )
    with Session(engine) as session, session.begin():
        for outbox_topic in ("orders.created", "orders.paid"):
            outbox_lib.publish(
                session,
                outbox_topic,
                {"order_id": 7, "total": "7.25"},
                key="k7",
                idempotency_key="order-7",
            )
    with RelayThread(settings_for(url, None, config=str(config))) as relay:
        relay.wait_delivered(2)
    group = kafka_config(kafka.bootstrap, f"billing-{uuid.uuid4().hex[:8]}")
    stats = example.consume(engine, group, idle_timeout_s=2.0, partitions=partitions(topic))
    assert (stats.processed, stats.skipped) == (2, 0)
    assert charges_per_order(url) == {7: 2}
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT idempotency_key, topic FROM outbox.inbox ORDER BY 2").fetchall()
    assert rows == [("order-7", "orders.created"), ("order-7", "orders.paid")]


def test_revoked_partitions_get_their_offsets_committed_first(
    engine: Engine, kafka: KafkaEndpoint, topic: str, example: Any
) -> None:
    """What the loop does when a rebalance takes partitions away (called here directly: a
    group join on the test broker takes about 20 s)."""
    produce_three_times_shuffled(kafka.bootstrap, topic, count=4)
    group = f"billing-{uuid.uuid4().hex[:8]}"
    config = kafka_config(kafka.bootstrap, group)
    loop = KafkaInboxLoop(
        config, example.charge_handler(engine), partitions=partitions(topic), commit_every=10_000
    )
    with loop:
        loop.commit = lambda: None  # type: ignore[method-assign]  # only the revoke commits
        loop.run(max_messages=12)
        del loop.commit
        assert committed(kafka.bootstrap, group, topic) == [OFFSET_INVALID] * PARTITIONS
        loop._revoked(loop.consumer, partitions(topic))
        assert committed(kafka.bootstrap, group, topic) == [6] * PARTITIONS
        loop._lost(loop.consumer, partitions(topic))
