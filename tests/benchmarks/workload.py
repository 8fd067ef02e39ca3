"""The shared workload: one generated backlog, loaded into each scenario's own schema.

Every scenario sends the same records (keys, payload sizes, headers), so their rates compare.
The backlog is generated once in SQL (``generate_series``) into ``bench_src.backlog`` and
copied with one ``INSERT ... SELECT`` into whatever table a scenario drains.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from psycopg import sql

import outbox_lib
from outbox_lib._sqlfiles import parse_queries
from tests.harness.kafka import create_topic

SOURCE_SCHEMA = "bench_src"
_QUERIES = parse_queries((Path(__file__).parent / "queries.sql").read_text("utf-8"))

# The relay's own headers (relay.sinks.kafka.record_headers) come first on every record.
Record = tuple[bytes, bytes, list[tuple[str, bytes | str | None]]]


@dataclass(frozen=True, slots=True)
class Workload:
    """What is sent: how many messages, over how many keys, how big, to how many partitions.

    ``messages`` is the backlog most scenarios send; ``generated`` (at least that) is how many
    records the source holds, for drains of bigger backlogs (``--drain-sizes``).
    """

    messages: int
    keys: int
    payload_bytes: int
    partitions: int
    generated: int = 0

    @property
    def source_rows(self) -> int:
        return max(self.messages, self.generated)


@dataclass(frozen=True, slots=True)
class Target:
    """Where every scenario runs: one PostgreSQL database and one broker."""

    database_url: str
    bootstrap: str
    workload: Workload


def query(name: str, **identifiers: str) -> sql.Composed:
    """A statement of ``queries.sql`` with its ``{schema}``-style identifiers quoted."""
    quoted = {k: sql.Identifier(v) for k, v in identifiers.items()}
    return sql.SQL(_QUERIES[name]).format(**quoted)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def fresh_schema(url: str, schema: str) -> None:
    with connect(url) as conn:
        conn.execute(query("drop_schema", schema=schema))
        conn.execute(query("create_schema", schema=schema))


def drop_schema(url: str, schema: str) -> None:
    """Dropped right after each scenario, so autovacuum has nothing left to chew on."""
    with connect(url) as conn:
        conn.execute(query("drop_schema", schema=schema))


def checkpoint(url: str) -> None:
    """Start each timed run with clean shared buffers; skipped without the privilege."""
    with connect(url) as conn, contextlib.suppress(psycopg.errors.InsufficientPrivilege):
        conn.execute(query("checkpoint"))


def prepare_source(url: str, workload: Workload, source: str = SOURCE_SCHEMA) -> float:
    """Generate the backlog once (into schema ``source``); returns the seconds it took."""
    fresh_schema(url, source)
    started = time.perf_counter()
    with connect(url) as conn:
        params = {"messages": workload.source_rows, "keys": workload.keys,
                  "payload_bytes": workload.payload_bytes}  # fmt: skip
        conn.execute(query("create_backlog", schema=source), params)
        # The generator's own table, never the outbox: read once now, which sets its hint
        # bits, or the first scenario to read it would write a full-page image of every
        # block (data checksums are on) into the WAL it is charged with: 350 B a message.
        conn.execute(query("read_backlog", schema=source))
    return time.perf_counter() - started


def backlog_sizes(url: str, limit: int) -> tuple[int, float, int]:
    """(rows, mean payload bytes, distinct keys) of the first ``limit`` backlog records."""
    with connect(url) as conn:
        row = conn.execute(
            query("backlog_sizes", source=SOURCE_SCHEMA), {"limit": limit}
        ).fetchone()
    assert row is not None
    return int(row[0]), float(row[1]), int(row[2])


# Backlog records are not bigger than this many: a load with no limit takes them all.
EVERY_RECORD = 2**62


def load_outbox(
    url: str, schema: str, topic: str, source: str = SOURCE_SCHEMA, upto: int = EVERY_RECORD
) -> float:
    """Migrate ``schema`` and commit the backlog's first ``upto`` records into its ``message``
    table, in one transaction and nothing else (no VACUUM, no ANALYZE); returns seconds."""
    fresh_schema(url, schema)
    with connect(url) as conn:
        outbox_lib.migrate(conn, schema)
    return commit_backlog(url, schema, topic, upto, chunk=upto, source=source)


def commit_backlog(
    url: str, schema: str, topic: str, upto: int, chunk: int, source: str = SOURCE_SCHEMA
) -> float:
    """Commit backlog records 1..``upto`` into an already migrated ``schema``, ``chunk`` per
    transaction, as fast as they go (a bulk job's shape); returns the seconds it took."""
    started = time.perf_counter()
    statement = query("load_outbox", schema=schema, source=source)
    with connect(url) as conn:
        for after in range(0, upto, chunk):
            bounds = {"after": after, "upto": min(upto, after + chunk)}
            with conn.transaction():
                # As enqueue() does: the transaction's id before the rows' seqs, which the
                # log first pass needs (docs/first-pass-log.md) of writers that commit live.
                conn.execute(query("take_xid"))
                conn.execute(statement, {"topic": topic, **bounds})
    return time.perf_counter() - started


@contextlib.contextmanager
def pinned_snapshot(url: str, schema: str) -> Iterator[None]:
    """While inside, a session holds a snapshot open (REPEATABLE READ, idle in transaction):
    the cluster's xmin stays where it was, as under a long report or a forgotten BEGIN."""
    with psycopg.connect(url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.execute(query("pin_snapshot", schema=schema))
        try:
            yield
        finally:
            conn.rollback()


def wal_lsn(url: str) -> str:
    with connect(url) as conn:
        row = conn.execute(query("wal_lsn")).fetchone()
    return str(row[0]) if row else "0/0"


def wal_bytes_since(url: str, lsn: str) -> int:
    """WAL the whole cluster wrote since ``lsn``: what a drain costs the database in writes."""
    with connect(url) as conn:
        row = conn.execute(query("wal_bytes_since"), {"lsn": lsn}).fetchone()
    return int(row[0]) if row else 0


def outbox_counts(url: str, schema: str) -> tuple[int, int, int]:
    """(rows left in message, rows in delivery, distinct messages in delivery)."""
    with connect(url) as conn:
        row = conn.execute(query("outbox_counts", schema=schema)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def count_rows(url: str, schema: str, table: str) -> int:
    with connect(url) as conn:
        row = conn.execute(query("count_rows", schema=schema, table=table)).fetchone()
    return int(row[0]) if row else 0


def relay_headers(
    message_id: str, topic: str, headers: dict[str, str]
) -> list[tuple[str, bytes | str | None]]:
    """The headers the relay puts on a record of a message without an idempotency key."""
    return [
        ("idempotency-key", message_id.encode()),
        ("outbox-message-id", message_id.encode()),
        ("outbox-topic", topic.encode()),
        *((name, value.encode()) for name, value in headers.items()),
    ]


def read_records(url: str, topic: str, limit: int) -> list[Record]:
    """The backlog's first ``limit`` records as the relay would produce them."""
    with connect(url) as conn:
        rows = conn.execute(
            query("backlog_records", source=SOURCE_SCHEMA), {"limit": limit}
        ).fetchall()
    return [(bytes(k), bytes(p), relay_headers(str(i), topic, h)) for i, k, p, h in rows]


def new_topic(bootstrap: str, scenario: str, partitions: int) -> str:
    """A fresh topic per scenario, so each one's records can be counted on the broker."""
    name = f"bench.{scenario}.{uuid.uuid4().hex[:6]}"
    create_topic(bootstrap, name, partitions=partitions)
    return name


def records_on_topic(
    bootstrap: str, topic: str, idle: float = 1.0, timeout: float = 120.0
) -> Count:
    """Read the whole topic: how many records, how many distinct payloads (duplicates = the
    difference). Read rather than summed from watermarks: Tansu under-reports high watermarks
    of compressed batches."""
    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}",
        "enable.auto.commit": False, "enable.partition.eof": False, "fetch.wait.max.ms": 10,
    })  # fmt: skip
    try:
        meta = consumer.list_topics(topic, timeout=10.0).topics[topic]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        return _count(consumer, idle, time.monotonic() + timeout)
    finally:
        consumer.close()


def _count(consumer: Consumer, idle: float, deadline: float) -> Count:
    records, payloads = 0, set[int]()
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < idle and time.monotonic() < deadline:
        batch = [m for m in consumer.consume(5000, 0.1) if m.error() is None]
        if batch:
            quiet_since = time.monotonic()
        records += len(batch)
        payloads.update(hash(m.value()) for m in batch)
    return Count(records, len(payloads))


@dataclass(frozen=True, slots=True)
class Count:
    records: int
    distinct: int

    @property
    def duplicates(self) -> int:
        return self.records - self.distinct
