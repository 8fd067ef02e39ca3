"""faststream-outbox draining the same backlog into the same broker.

Set up as its documentation shows a relay: ``OutboxBroker`` on an asyncpg engine, a subscriber
whose handler's return value a stacked Kafka publisher sends. FastStream's ``confluent``
KafkaBroker is used, so both contenders produce through librdkafka with the relay's producer
settings. Its per-message logging is switched off (``logger=None``) so logging is not what is
measured. The Kafka key travels as a row header (its table has no key column).
"""

# No ``from __future__ import annotations`` here: FastDepends resolves the handler's
# annotations at decoration time, and they name classes imported inside a function.
import asyncio
import time
from dataclasses import dataclass
from typing import Any

from . import workload as w
from .results import Throughput, unavailable

NAME = "faststream-outbox 0.19"
QUEUE = "bench"
TABLE = "outbox"
SCHEMA = "bench_fs"
PROGRESS_POLL_S = 0.2
# The best of a few tries at 2 cores (8 and 64 workers were slower); the library's default is 1.
FS_WORKERS = 32


@dataclass(frozen=True, slots=True)
class FsConfig:
    """Subscriber knobs; the defaults of the library are 1 worker and batches of 10."""

    max_workers: int = FS_WORKERS
    fetch_batch_size: int = 1000
    terminal_flush_batch_size: int = 100

    def describe(self) -> str:
        return (f"max_workers={self.max_workers}, fetch_batch_size={self.fetch_batch_size}, "
                f"terminal_flush_batch_size={self.terminal_flush_batch_size}")  # fmt: skip


def faststream_outbox(target: w.Target, cap_seconds: float, config: FsConfig) -> Throughput:
    missing = _missing_modules()
    if missing:
        return unavailable(NAME, f"needs {missing} (pip install faststream-outbox asyncpg)")
    topic = w.new_topic(target.bootstrap, "faststream", target.workload.partitions)
    expected = target.workload.messages
    table = _prepare(target.database_url, expected)
    try:
        delivered, seconds = asyncio.run(_drain(target, table, topic, cap_seconds, config))
        left = w.count_rows(target.database_url, SCHEMA, TABLE)
    finally:
        w.drop_schema(target.database_url, SCHEMA)
    count = w.records_on_topic(target.bootstrap, topic)
    done = left == 0
    note = f"{config.describe()}; topic holds {count.records} ({count.duplicates} duplicates)"
    if not done:
        note = f"capped at {cap_seconds:.0f} s: {delivered} of {expected} drained; " + note
    return Throughput(
        NAME, delivered, seconds, status="ok" if done else "partial", note=note,
        details={"records_on_topic": count.records, "rows_left": left,
                 "extrapolated_full_s": expected * seconds / delivered if delivered else None},
    )  # fmt: skip


def _missing_modules() -> str | None:
    for module in ("faststream_outbox", "faststream.confluent", "asyncpg", "sqlalchemy"):
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def _prepare(url: str, limit: int) -> Any:
    """Create its table (as its Alembic migration would) and commit the backlog's first
    ``limit`` records into it (no VACUUM, no ANALYZE: as for every scenario)."""
    # Imported here, as everywhere in this module: faststream-outbox is an optional extra.
    from faststream_outbox import make_outbox_table
    from sqlalchemy import MetaData, create_engine

    w.fresh_schema(url, SCHEMA)
    table = make_outbox_table(MetaData(schema=SCHEMA), table_name=TABLE)
    engine = create_engine(_sqlalchemy_url(url, "psycopg"))
    try:
        table.metadata.create_all(engine)
    finally:
        engine.dispose()
    with w.connect(url) as conn:
        load = w.query("load_faststream", schema=SCHEMA, source=w.SOURCE_SCHEMA, table=TABLE)
        conn.execute(load, {"queue": QUEUE, "limit": limit})
    w.checkpoint(url)
    return table


def _sqlalchemy_url(url: str, driver: str) -> str:
    return f"postgresql+{driver}://" + url.split("://", 1)[1]


async def _drain(
    target: w.Target, table: Any, topic: str, cap: float, config: FsConfig
) -> tuple[int, float]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(
        _sqlalchemy_url(target.database_url, "asyncpg"), pool_size=config.max_workers + 4
    )
    outbox, kafka = _brokers(engine, table, topic, target.bootstrap, config)
    await kafka.start()
    started = time.perf_counter()
    await outbox.start()
    try:
        left = await _wait_empty(engine, table, started + cap)
        seconds = time.perf_counter() - started
    finally:
        await outbox.stop()
        await kafka.stop()
        await engine.dispose()
    return target.workload.messages - left, seconds


def _brokers(engine: Any, table: Any, topic: str, bootstrap: str, config: FsConfig) -> Any:
    from faststream.confluent import KafkaBroker, KafkaResponse
    from faststream_outbox import OutboxBroker
    from faststream_outbox.annotations import OutboxMessage

    from .throughput import producer_config

    librdkafka = {k: v for k, v in producer_config(bootstrap).items() if k != "bootstrap.servers"}
    outbox = OutboxBroker(engine, outbox_table=table, logger=None)
    kafka = KafkaBroker(bootstrap, config=librdkafka, logger=None)  # type: ignore[arg-type]

    @kafka.publisher(topic)
    @outbox.subscriber(
        QUEUE, max_workers=config.max_workers, fetch_batch_size=config.fetch_batch_size,
        terminal_flush_batch_size=config.terminal_flush_batch_size,
        min_fetch_interval=0.1, max_fetch_interval=1.0,
    )  # fmt: skip
    async def relay(message: OutboxMessage) -> KafkaResponse:
        headers = dict(message.headers)
        key = headers.pop("kafka-key")
        return KafkaResponse(message.body, key=key.encode(), headers=headers)

    return outbox, kafka


async def _wait_empty(engine: Any, table: Any, deadline: float) -> int:
    """Rows left when the table is empty or the deadline passes."""
    from sqlalchemy import func, select

    count = select(func.count()).select_from(table)
    while True:
        async with engine.connect() as conn:
            left = int((await conn.execute(count)).scalar_one())
        if left == 0 or time.perf_counter() >= deadline:
            return left
        await asyncio.sleep(PROGRESS_POLL_S)
