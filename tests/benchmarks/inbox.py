"""What the inbox costs a consumer, and how fast the Kafka inbox loop consumes.

Usage::

    python -m tests.benchmarks.inbox                         # embedded PostgreSQL + Tansu
    python -m tests.benchmarks.inbox --database-url postgresql://... --bootstrap host:9092

Rows of the table, each over ``--messages`` messages (one transaction per message, as a
consumer that processes each delivery on its own would):

- ``plain``: the business write alone (an insert into ``charges``), no inbox: the baseline;
- ``inbox, new``: the same write through ``Inbox.handler``, every message new;
- ``inbox, duplicate``: the same messages again, every one skipped;
- ``kafka loop``: records produced once each, consumed by ``KafkaInboxLoop`` with that
  handler (offsets committed every 500 records);
- ``kafka loop, 3x``: every record three times in shuffled order.

Not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import psycopg
from confluent_kafka import Producer, TopicPartition
from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib.inbox import InboxMessage, KafkaInboxLoop
from tests.benchmarks.gauges import database
from tests.harness.examples import load_example
from tests.harness.kafka import create_topic, start_tansu
from tests.harness.relay import sqlalchemy_url


@contextmanager
def broker(bootstrap: str | None) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    tansu = start_tansu()
    try:
        yield tansu.bootstrap
    finally:
        tansu.stop()


def messages(count: int, copies: int = 1) -> list[InboxMessage]:
    once = [
        InboxMessage(f"order-{n}", b'{"order_id": %d, "total": "%d.25"}' % (n, n))
        for n in range(count)
    ]
    deliveries = once * copies
    random.Random(1).shuffle(deliveries)
    return deliveries


def rate(count: int, run: Callable[[], object]) -> tuple[float, float]:
    """Messages per second and microseconds per message."""
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    return count / seconds, seconds / count * 1e6


def plain_writes(engine: Engine, example: Any, batch: list[InboxMessage]) -> None:
    table = example.Charge.__table__
    for message in batch:
        order = message.json()
        with Session(engine) as session, session.begin():
            session.execute(insert(table).values(order_id=order["order_id"], amount=order["total"]))


def produce(bootstrap: str, topic: str, batch: list[InboxMessage]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for message in batch:
        producer.produce(
            topic, value=message.payload, headers=[("idempotency-key", message.idempotency_key)]
        )
    assert producer.flush(30) == 0


def consume(bootstrap: str, topic: str, handler: Any, expected: int) -> None:
    config = {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "fetch.wait.max.ms": 10}
    with KafkaInboxLoop(config, handler, partitions=[TopicPartition(topic, 0)]) as loop:
        stats = loop.run(max_messages=expected)
    assert stats.handled == expected, stats


def measure(url: str, bootstrap: str, count: int) -> list[tuple[str, float, float]]:
    engine = create_engine(sqlalchemy_url(url), pool_size=2)
    example = load_example("inbox_kafka")
    example.Base.metadata.create_all(engine)
    handler = example.charge_handler(engine)
    rows = [("plain", *rate(count, lambda: plain_writes(engine, example, messages(count))))]
    rows.append(("inbox, new", *rate(count, lambda: [handler(m) for m in messages(count)])))
    rows.append(("inbox, duplicate", *rate(count, lambda: [handler(m) for m in messages(count)])))
    for label, copies in (("kafka loop", 1), ("kafka loop, 3x", 3)):
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE charges, outbox.inbox"))
        topic = f"bench-inbox-{uuid.uuid4().hex[:8]}"
        create_topic(bootstrap, topic)
        batch = messages(count, copies)
        produce(bootstrap, topic, batch)
        rows.append(
            (label, *rate(len(batch), partial(consume, bootstrap, topic, handler, len(batch))))
        )
    engine.dispose()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="default: an embedded PostgreSQL")
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers; default: a Tansu broker")
    parser.add_argument("--messages", type=int, default=5000)
    args = parser.parse_args(argv)
    with database(args.database_url) as url, broker(args.bootstrap) as bootstrap:
        with psycopg.connect(url, autocommit=True) as conn:
            outbox_lib.migrate(conn)
        rows = measure(url, bootstrap, args.messages)
    print(f"{'':<18} {'msg/s':>9} {'µs/msg':>9}")
    for label, per_second, micros in rows:
        print(f"{label:<18} {per_second:>9,.0f} {micros:>9,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
