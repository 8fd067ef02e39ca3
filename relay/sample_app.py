"""A sample order-taking app: each order and its ``orders.created`` message in one transaction.

What ``outbox-relay demo`` runs in a thread, and what the docker-compose stack's ``orders``
service runs on its own against ``OUTBOX_DATABASE_URL``::

    python -m relay.sample_app --rate 20            # 20 orders a second until SIGTERM
    python -m relay.sample_app --count 500 --rate 0 # 500 orders, as fast as it can

The outbox schema must exist (``outbox-relay migrate``); the app creates its own ``orders``
table in ``public`` if it is missing. Order ids come from a sequence, so several copies of
the app (or runs after one another) never collide. SIGTERM or SIGINT stops it after the order
in progress, with exit code 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from types import FrameType
from typing import TypeVar

import sqlalchemy
from sqlalchemy import DateTime, Numeric, String, create_engine, text
from sqlalchemy import Sequence as SqlSequence
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox_lib

from .db import redact, to_libpq
from .errors import ConfigError

TOPIC = "orders.created"
CUSTOMERS = 25
# Not attached to the table: the embedded demo numbers its orders itself.
ORDER_IDS = SqlSequence("sample_order_id")
# Serializes the app's table creation when several copies start at once.
_CREATE_LOCK = 0x6F72646572  # "order"
_REPORT_EVERY_S = 5.0
_DEFAULT_OUTBOX = outbox_lib.Outbox()
N = TypeVar("N", int, float)


class Base(DeclarativeBase):
    pass


class Order(Base):
    """The sample app's own table, in ``public``; the outbox lives in its own schema."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer: Mapped[str] = mapped_column(String(40))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def sqlalchemy_url(url: str) -> str:
    """``postgresql+psycopg://`` form of a libpq URL; the ``?host=`` socket dir is kept."""
    return "postgresql+psycopg://" + to_libpq(url).removeprefix("postgresql://")


def create_tables(db: sqlalchemy.Engine) -> None:
    """The ``orders`` table and the id sequence, if missing; safe from several processes."""
    with db.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK})
        Base.metadata.create_all(conn)
        ORDER_IDS.create(conn, checkfirst=True)


def place_order(
    session: Session, order_id: int, *, source: str, outbox: outbox_lib.Outbox | None = None
) -> Order:
    """Add order ``order_id`` and publish its ``orders.created`` message in ``session``'s
    transaction; commits nothing, so both happen or neither does."""
    order = Order(
        id=order_id,
        customer=f"customer-{order_id % CUSTOMERS:02d}",
        amount=Decimal(500 + order_id * 7919 % 49500).scaleb(-2),
        created_at=datetime.now(UTC),
    )
    session.add(order)
    (outbox or _DEFAULT_OUTBOX).publish(
        session,
        TOPIC,
        {"order_id": order.id, "customer": order.customer,
         "amount": order.amount, "created_at": order.created_at},
        key=order.customer,
        headers={"source": source},
        idempotency_key=f"order-{order_id}-created",
    )  # fmt: skip
    return order


def write_order(db: sqlalchemy.Engine, outbox: outbox_lib.Outbox) -> int:
    """One order with the next id from the sequence, committed; returns its id."""
    with Session(db) as session, session.begin():
        order_id = int(session.scalar(ORDER_IDS.next_value()))
        place_order(session, order_id, source="sample-app", outbox=outbox)
    return order_id


def run(
    db: sqlalchemy.Engine,
    outbox: outbox_lib.Outbox,
    *,
    rate: float,
    count: int,
    stop: threading.Event,
) -> int:
    """Write ``count`` orders (0: until ``stop``), at most ``rate`` a second (0: no limit);
    returns how many were written."""
    began = last_report = time.monotonic()
    written = 0
    while not stop.is_set() and (count == 0 or written < count):
        if rate > 0:
            due = began + written / rate
            if stop.wait(max(0.0, due - time.monotonic())):
                break
        write_order(db, outbox)
        written += 1
        now = time.monotonic()
        if now - last_report >= _REPORT_EVERY_S:
            last_report = now
            print(f"{written} orders written ({written / (now - began):.1f}/s)", flush=True)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay.sample_app",
        description="Write orders, each with its orders.created outbox message, in one "
        "transaction.",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_DATABASE_URL"),
        help="PostgreSQL URL (default: $OUTBOX_DATABASE_URL)",
    )
    parser.add_argument(
        "--schema",
        default=os.environ.get("OUTBOX_SCHEMA") or "outbox",
        help="the outbox schema (default: $OUTBOX_SCHEMA or outbox)",
    )
    parser.add_argument(
        "--rate", type=_non_negative, default=10.0, help="orders per second; 0: no limit (10)"
    )
    parser.add_argument(
        "--count", type=_count, default=0, help="orders to write, then exit; 0: until stopped (0)"
    )
    return parser


def _at_least_zero(convert: Callable[[str], N], kind: str) -> Callable[[str], N]:
    """An argparse type: ``convert`` the text, refusing what is not a ``kind`` or is below 0."""

    def parse(raw: str) -> N:
        try:
            value = convert(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not {kind}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"{raw!r} must be 0 or more")
        return value

    return parse


_non_negative = _at_least_zero(float, "a number")
_count = _at_least_zero(int, "an integer")


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set ``stop``: the order in progress commits, then the app exits 0."""

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.database_url:
        parser.error("no database URL: pass --database-url or set OUTBOX_DATABASE_URL")
    try:
        url = sqlalchemy_url(args.database_url)
        outbox = outbox_lib.Outbox(schema=args.schema)
    except (ConfigError, outbox_lib.OutboxError, ValueError) as exc:
        parser.error(str(exc))
    db = create_engine(url, pool_size=1, max_overflow=0)
    stop = threading.Event()
    written = 0
    try:
        with _stop_on_signals(stop):
            create_tables(db)
            print(f"writing orders to {redact(args.database_url)}", flush=True)
            written = run(db, outbox, rate=args.rate, count=args.count, stop=stop)
    except (SQLAlchemyError, outbox_lib.OutboxError) as exc:
        print(f"sample app: {_first_line(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        db.dispose()
    print(f"{written} orders written", flush=True)
    return 0


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
