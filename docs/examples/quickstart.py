"""The quickstart's order app: write an order and its outbox message in one transaction.

Run it after ``outbox-relay migrate`` (see docs/quickstart.md)::

    export OUTBOX_DATABASE_URL=postgresql://app@localhost:5432/shop
    export OUTBOX_KAFKA_BOOTSTRAP_SERVERS=localhost:9092
    python docs/examples/quickstart.py publish     # three orders, one of them rolled back
    outbox-relay run                               # delivers the two committed ones
    python docs/examples/quickstart.py read        # prints what arrived in Kafka

``--database-url`` and ``--bootstrap-servers`` override the two variables; ``--topic``
changes the outbox topic (default ``orders.created``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Sequence
from decimal import Decimal

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from sqlalchemy import Engine, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox_lib


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str] = mapped_column(String(100))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` (what the relay takes too) to SQLAlchemy's psycopg 3 form."""
    scheme, rest = url.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else url


def place_order(session: Session, order: Order, topic: str) -> uuid.UUID:
    """The business write and its message, in the caller's transaction; nothing commits here."""
    session.add(order)
    return outbox_lib.publish(
        session,
        topic,
        {"order_id": order.id, "customer": order.customer, "total": order.total},
        key=order.customer,  # one customer's messages arrive in order
        headers={"source": "quickstart"},
        idempotency_key=f"order-{order.id}-created",
    )


def publish(engine: Engine, topic: str) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        first = place_order(session, Order(id=1, customer="acme", total=Decimal("12.50")), topic)
    print(f"order 1 committed, message {first}")

    with Session(engine) as session, session.begin():
        place_order(session, Order(id=2, customer="acme", total=Decimal("30.00")), topic)
    print("order 2 committed")

    try:
        with Session(engine) as session, session.begin():
            place_order(session, Order(id=3, customer="globex", total=Decimal("7.00")), topic)
            raise RuntimeError("payment declined")
    except RuntimeError as exc:
        print(f"order 3 rolled back ({exc}): its message never existed")

    # Same topic and idempotency key: the first message's id, and no second delivery.
    with Session(engine) as session, session.begin():
        again = outbox_lib.publish(session, topic, {}, idempotency_key="order-1-created")
    print(f"order 1 published again: message {again}, no second delivery")


def read(bootstrap: str, topic: str, expected: int, timeout: float) -> int:
    """Print the topic's records from the start; assign() partitions, no consumer group."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "quickstart", "enable.auto.commit": False}
    )
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        consumer.assign(_partitions(consumer, topic, deadline))
        while seen < expected and time.monotonic() < deadline:
            record = consumer.poll(0.2)
            if record is None or record.error():
                continue
            seen += 1
            headers = dict(record.headers() or [])
            print(
                f"key={record.key()!r} idempotency-key={headers['idempotency-key'].decode()} "
                f"value={record.value().decode()}"
            )
    finally:
        consumer.close()
    return seen


def _partitions(consumer: Consumer, topic: str, deadline: float) -> list[TopicPartition]:
    while time.monotonic() < deadline:
        info = consumer.list_topics(topic, timeout=5).topics.get(topic)
        if info is not None and info.error is None and info.partitions:
            return [TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions]
        time.sleep(0.2)
    raise SystemExit(f"topic {topic} did not appear: is `outbox-relay run` running?")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("command", choices=["publish", "read"])
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_DATABASE_URL"))
    parser.add_argument(
        "--bootstrap-servers", default=os.environ.get("OUTBOX_KAFKA_BOOTSTRAP_SERVERS")
    )
    parser.add_argument("--topic", default="orders.created")
    parser.add_argument("--expect", type=int, default=2, help="records `read` waits for")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.command == "publish":
        if not args.database_url:
            parser.error("set OUTBOX_DATABASE_URL or pass --database-url")
        engine = create_engine(sqlalchemy_url(args.database_url))
        try:
            publish(engine, args.topic)
        finally:
            engine.dispose()
        return 0
    if not args.bootstrap_servers:
        parser.error("set OUTBOX_KAFKA_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
    seen = read(args.bootstrap_servers, args.topic, args.expect, args.timeout)
    print(f"{seen} of {args.expect} records read")
    return 0 if seen >= args.expect else 1


if __name__ == "__main__":
    sys.exit(main())
