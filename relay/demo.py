"""``outbox-relay demo``: the whole pipeline on an embedded PostgreSQL and broker.

A sample order-taking app writes each order and its ``orders.created`` message in one
transaction (every tenth one is rolled back on purpose), the relay drains the outbox in the
same process while the app is still writing, and a consumer then reads the Kafka topic back
to prove what arrived: every committed order, no rolled-back one, the contract's headers,
and per-customer order. Exit code 0 only if every check passes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
import sqlalchemy
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # public path, stub gap
    AdminClient,
    NewTopic,
)
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import DateTime, Numeric, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import outbox_lib

from .app import run_relay
from .config import load_settings
from .db import connect, to_libpq
from .embedded import EmbeddedBroker, EmbeddedPostgres
from .engine import Engine, Stats
from .errors import RelayError

TOPIC = "orders.created"
# Several partitions, so the per-key order check means something (one partition would
# order everything trivially).
PARTITIONS = 4
CUSTOMERS = 25
ROLLBACK_EVERY = 10
DRAIN_TIMEOUT_S = 120.0
CONSUME_TIMEOUT_S = 30.0
_REFRESH_S = 0.05
_MIN_SHM_FREE = 512 * 1024 * 1024


class Base(DeclarativeBase):
    pass


class Order(Base):
    """The sample app's own table, in ``public``; the outbox lives in its own schema."""

    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    customer: Mapped[str] = mapped_column(String(40))
    amount: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class _Abandon(Exception):
    """Raised inside an order's transaction to roll it back, as an app error would."""


@dataclass
class Tally:
    """Shared by the writer thread (appends) and the event loop (reads lengths)."""

    committed: list[int] = field(default_factory=list)
    rolled_back: list[int] = field(default_factory=list)
    relay: Stats | None = None

    @property
    def written(self) -> int:
        return len(self.committed) + len(self.rolled_back)

    @property
    def delivered(self) -> int:
        return self.relay.delivered if self.relay is not None else 0

    def attach(self, engine: Engine) -> None:
        # Keep the stats only: holding the engine would keep its Kafka producer, and so its
        # broker connections, alive after the relay stops, and Tansu's SIGTERM waits for
        # every client to hang up (5 s, then SIGKILL).
        self.relay = engine.stats


@dataclass(frozen=True)
class Arrival:
    """One consumed record, reduced to what the checks need."""

    order_id: int | None
    key: bytes | None
    partition: int
    offset: int
    headers: dict[str, bytes]


@dataclass(frozen=True)
class Report:
    committed: int
    rolled_back: int
    delivered: int
    duplicates: int
    missing: int
    unexpected: int
    bad_headers: int
    out_of_order: int
    startup_s: float
    elapsed_s: float

    @property
    def ok(self) -> bool:
        return self.committed > 0 and not (
            self.missing or self.unexpected or self.bad_headers or self.out_of_order
        )


def run_demo(orders: int, workdir: str | None) -> int:
    """Run the demo; returns the process exit code (0: every check passed)."""
    console = Console()
    with _sigterm_as_interrupt(), _logs_through(console), ExitStack() as stack:
        began = time.monotonic()
        with console.status("starting embedded PostgreSQL and Kafka-compatible broker"):
            scratch = stack.enter_context(_scratch_dir(workdir))
            pg = stack.enter_context(EmbeddedPostgres(scratch))
            broker = stack.enter_context(EmbeddedBroker(log_dir=scratch))
            db = _prepare(pg.url, broker.bootstrap)
            stack.callback(db.dispose)
        startup = time.monotonic() - began
        tally = Tally()
        began = time.monotonic()
        if not asyncio.run(_pipeline(db, pg.url, broker.bootstrap, orders, tally, console)):
            console.print(
                f"[red]timed out after {DRAIN_TIMEOUT_S:.0f} s: the relay delivered "
                f"{tally.delivered} of {len(tally.committed)} committed orders[/red]"
            )
            return 1
        elapsed = time.monotonic() - began
        arrivals = _consume(broker.bootstrap, time.monotonic() + CONSUME_TIMEOUT_S)
        report = _verify(tally, arrivals, startup, elapsed)
        _print_summary(console, report)
        return 0 if report.ok else 1


# --- set-up -------------------------------------------------------------------------------


@contextmanager
def _scratch_dir(workdir: str | None) -> Iterator[Path]:
    """A fresh directory for this run (inside ``workdir`` if given), always removed."""
    parent = Path(workdir) if workdir else _fast_tmp()
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="outbox-demo-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _fast_tmp() -> Path:
    """tmpfs when usable: the app commits once per order, and fsync on disk is slow. Not
    when small: Docker's default /dev/shm (64 MB) cannot hold a fresh cluster and its WAL."""
    shm = Path("/dev/shm")  # noqa: S108 -- only the parent of a private mkdtemp()
    usable = shm.is_dir() and os.access(shm, os.W_OK | os.X_OK)
    if usable and shutil.disk_usage(shm).free >= _MIN_SHM_FREE:
        return shm
    return Path(tempfile.gettempdir())


def _prepare(url: str, bootstrap: str) -> sqlalchemy.Engine:
    """Migrate the outbox, create the app's table and the topic; the app's engine."""
    with connect(url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
    db = create_engine(sqlalchemy_url(url))
    Base.metadata.create_all(db)
    _create_topic(bootstrap)
    return db


def sqlalchemy_url(url: str) -> str:
    """``postgresql+psycopg://`` form of a libpq URL; the ``?host=`` socket dir is kept."""
    return "postgresql+psycopg://" + to_libpq(url).removeprefix("postgresql://")


def _create_topic(bootstrap: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(TOPIC, num_partitions=PARTITIONS, replication_factor=1)
    try:
        admin.create_topics([topic], operation_timeout=10)[TOPIC].result(timeout=15)
    except KafkaException as exc:
        raise RelayError(f"cannot create topic {TOPIC!r} on {bootstrap}: {exc}") from exc


# --- the sample app -------------------------------------------------------------------------


def write_orders(db: sqlalchemy.Engine, orders: int, tally: Tally, cancel: threading.Event) -> None:
    """One transaction per order: the row and its message commit, or vanish, together."""
    for order_id in range(1, orders + 1):
        if cancel.is_set():
            return
        try:
            _place_order(db, order_id, abandon=order_id % ROLLBACK_EVERY == 0)
        except _Abandon:
            tally.rolled_back.append(order_id)
        else:
            tally.committed.append(order_id)


def _place_order(db: sqlalchemy.Engine, order_id: int, *, abandon: bool) -> None:
    with Session(db) as session, session.begin():
        order = Order(
            id=order_id,
            customer=f"customer-{order_id % CUSTOMERS:02d}",
            amount=Decimal(500 + order_id * 7919 % 49500).scaleb(-2),
            created_at=datetime.now(UTC),
        )
        session.add(order)
        outbox_lib.publish(
            session,
            TOPIC,
            {"order_id": order.id, "customer": order.customer,
             "amount": order.amount, "created_at": order.created_at},
            key=order.customer,
            headers={"source": "demo"},
            idempotency_key=f"order-{order_id}-created",
        )  # fmt: skip
        if abandon:
            raise _Abandon  # after publish: the message must be rolled back with the order


# --- app and relay, concurrently ------------------------------------------------------------


async def _pipeline(
    db: sqlalchemy.Engine, url: str, bootstrap: str, orders: int, tally: Tally, console: Console
) -> bool:
    """Write and drain at the same time; True once every committed order was delivered."""
    settings = load_settings(
        {"database_url": url, "kafka_bootstrap_servers": bootstrap, "poll_interval": 0.2},
        {},  # not os.environ: stray OUTBOX_* variables must not redirect the demo
    )
    stop = asyncio.Event()
    cancel = threading.Event()
    relay = asyncio.create_task(run_relay(settings, stop=stop, on_start=tally.attach))
    writer = asyncio.create_task(asyncio.to_thread(write_orders, db, orders, tally, cancel))
    try:
        with _progress(console) as progress:
            return await _until_drained(tally, orders, relay, writer, progress)
    finally:
        # Also on Ctrl-C (this task is cancelled): stop both and let the relay hand back
        # whatever it holds before the servers go away.
        cancel.set()
        stop.set()
        await asyncio.gather(writer, relay, return_exceptions=True)


async def _until_drained(
    tally: Tally,
    orders: int,
    relay: asyncio.Task[Any],
    writer: asyncio.Task[None],
    progress: Progress,
) -> bool:
    expected = orders - orders // ROLLBACK_EVERY
    written = progress.add_task("orders written", total=orders)
    delivered = progress.add_task("messages delivered", total=expected)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while time.monotonic() < deadline:
        progress.update(written, completed=tally.written)
        progress.update(delivered, completed=tally.delivered)
        if relay.done():
            relay.result()  # re-raises what stopped it
            raise RelayError("the relay stopped before the outbox was drained")
        if writer.done():
            writer.result()
            if tally.delivered >= len(tally.committed):
                return True
        await asyncio.sleep(_REFRESH_S)
    return False


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<20}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


# --- reading back and checking --------------------------------------------------------------


def _consume(bootstrap: str, deadline: float) -> list[Arrival]:
    """Everything in the topic, up to each partition's end as of now.

    Reading to the high watermark (not just to the expected count) is what proves that no
    rolled-back order slipped in. No group join (assign only): Tansu's joins are slow.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"outbox-demo-{uuid.uuid4().hex}",  # never joined nor committed
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            "enable.partition.eof": False,
        }
    )
    try:
        ends = _partition_ends(consumer, deadline)
        consumer.assign([TopicPartition(TOPIC, p, OFFSET_BEGINNING) for p in ends])
        return _read_until(consumer, ends, deadline)
    finally:
        consumer.close()


def _partition_ends(consumer: Consumer, deadline: float) -> dict[int, int]:
    """Partition -> high watermark, for the partitions that hold anything."""
    meta = consumer.list_topics(TOPIC, timeout=max(1.0, deadline - time.monotonic()))
    info = meta.topics.get(TOPIC)
    if info is None or info.error is not None:
        raise RelayError(f"topic {TOPIC!r} is not readable: {info and info.error}")
    ends = {}
    for partition in info.partitions:
        _, high = consumer.get_watermark_offsets(TopicPartition(TOPIC, partition), timeout=10)
        if high > 0:
            ends[partition] = high
    return ends


def _read_until(consumer: Consumer, ends: dict[int, int], deadline: float) -> list[Arrival]:
    arrivals: list[Arrival] = []
    pending = set(ends)
    while pending and time.monotonic() < deadline:
        for message in consumer.consume(1000, 0.1):
            error = message.error()
            if error is not None:
                if error.fatal():
                    raise KafkaException(error)
                continue  # transient; the deadline bounds how long we put up with them
            arrival = _arrival(message)
            arrivals.append(arrival)
            if arrival.offset + 1 >= ends[arrival.partition]:
                pending.discard(arrival.partition)
    return arrivals


def _arrival(message: Any) -> Arrival:
    try:
        order_id = int(orjson.loads(message.value())["order_id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        order_id = None
    return Arrival(
        order_id=order_id,
        key=message.key(),
        partition=message.partition(),
        offset=message.offset(),
        headers={k: v or b"" for k, v in message.headers() or []},
    )


def _verify(tally: Tally, arrivals: list[Arrival], startup: float, elapsed: float) -> Report:
    committed = set(tally.committed)
    seen = Counter(a.order_id for a in arrivals)
    return Report(
        committed=len(committed),
        rolled_back=len(tally.rolled_back),
        delivered=len(committed & set(seen)),
        duplicates=sum(n - 1 for n in seen.values() if n > 1),
        missing=len(committed - set(seen)),
        unexpected=sum(n for order_id, n in seen.items() if order_id not in committed),
        bad_headers=sum(1 for a in arrivals if not _headers_ok(a)),
        out_of_order=_order_violations(arrivals),
        startup_s=startup,
        elapsed_s=elapsed,
    )


def _headers_ok(arrival: Arrival) -> bool:
    headers = arrival.headers
    return (
        headers.get("idempotency-key") == f"order-{arrival.order_id}-created".encode()
        and bool(headers.get("outbox-message-id"))
        and headers.get("outbox-topic") == TOPIC.encode()
        and headers.get("source") == b"demo"
    )


def _order_violations(arrivals: list[Arrival]) -> int:
    """Per key and partition, in offset order, each order id must be above the last.

    A redelivered duplicate repeats an id already seen; only first sightings count, since
    at-least-once delivery allows duplicates but not reordering.
    """
    streams: dict[tuple[bytes | None, int], list[Arrival]] = defaultdict(list)
    for arrival in arrivals:
        streams[arrival.key, arrival.partition].append(arrival)
    violations = 0
    for stream in streams.values():
        last, seen = 0, set()
        for arrival in sorted(stream, key=lambda a: a.offset):
            if arrival.order_id is None or arrival.order_id in seen:
                continue
            seen.add(arrival.order_id)
            if arrival.order_id < last:
                violations += 1
            last = max(last, arrival.order_id)
    return violations


def _print_summary(console: Console, report: Report) -> None:
    table = Table(title="outbox-relay demo", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    rate = report.delivered / report.elapsed_s if report.elapsed_s > 0 else 0.0
    rows = [
        ("orders written (committed)", f"{report.committed}"),
        ("rolled back on purpose", f"{report.rolled_back}"),
        ("delivered", f"{report.delivered}"),
        ("duplicates", f"{report.duplicates}"),
        ("missing", f"{report.missing}"),
        ("rolled back but delivered", f"{report.unexpected}"),
        ("bad headers", f"{report.bad_headers}"),
        ("per-key order violations", f"{report.out_of_order}"),
        ("start-up (postgres + broker)", f"{report.startup_s:.2f} s"),
        ("elapsed (write + deliver)", f"{report.elapsed_s:.2f} s"),
        ("throughput", f"{rate:,.0f} msg/s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if report.ok:
        console.print("[green]all checks passed[/green]")
    else:
        console.print("[red]checks failed[/red]")


# --- process plumbing -----------------------------------------------------------------------


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM does what Ctrl-C does, so the servers this process started are stopped
    instead of orphaned (they run in sessions of their own)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _as_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _as_sigint(signum: int, frame: FrameType | None) -> None:
    """Hand over to the current SIGINT handler: inside ``asyncio.run`` that one cancels the
    main task, so the relay is stopped in order rather than torn down mid-await."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored (a background job): still stop, the plain way
        raise KeyboardInterrupt


@contextmanager
def _logs_through(console: Console) -> Iterator[None]:
    """Route logs through rich so they print above the progress bars, and hide the INFO
    chatter (server start-up, relay start/stop) that the progress display replaces."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [RichHandler(console=console, show_path=False)]
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
