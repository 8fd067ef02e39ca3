"""Charge each order exactly once, however often Kafka delivers its ``orders.created`` record.

The relay delivers at least once; this consumer records every record's idempotency key in
its own database, in the transaction that writes the charge (``outbox_lib.inbox``), and
commits Kafka offsets only after that transaction commits.

Run it next to the quickstart::

    outbox-relay migrate --database-url "$DATABASE_URL"      # creates the inbox table too
    python docs/examples/inbox_kafka.py "$DATABASE_URL" localhost:9092 orders.created
"""

from __future__ import annotations

import signal
import sys
import threading
from decimal import Decimal
from typing import Any

from sqlalchemy import Engine, Numeric, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from outbox_lib.inbox import Inbox, InboxMessage, KafkaInboxLoop, LoopStats


class Base(DeclarativeBase):
    pass


class Charge(Base):
    """The business effect. Nothing here stops a second row for one order: the inbox does."""

    __tablename__ = "charges"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int]
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))


inbox = Inbox("billing")


def charge_handler(engine: Engine) -> Any:
    """The order handler: runs once per idempotency key, in its own transaction."""

    @inbox.handler(sessionmaker(engine))
    def charge(session: Session, message: InboxMessage) -> None:
        order = message.json()
        session.add(Charge(order_id=order["order_id"], amount=Decimal(order["total"])))

    return charge


def consume(
    engine: Engine,
    kafka: dict[str, Any],
    stop: threading.Event | None = None,
    idle_timeout_s: float | None = None,
    **where: Any,
) -> LoopStats:
    """Consume ``where`` (``topics=[...]`` or ``partitions=[...]``) until stopped or idle."""
    Base.metadata.create_all(engine)
    with KafkaInboxLoop(kafka, charge_handler(engine), **where) as loop:
        return loop.run(stop=stop, idle_timeout_s=idle_timeout_s)


def main() -> None:
    database_url, bootstrap, topic = sys.argv[1:4]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    engine = create_engine(database_url.replace("postgresql://", "postgresql+psycopg://", 1))
    kafka = {"bootstrap.servers": bootstrap, "group.id": "billing"}
    stats = consume(engine, kafka, stop, topics=[topic])
    print(f"charged {stats.processed} orders, skipped {stats.skipped} redeliveries")


if __name__ == "__main__":
    main()
