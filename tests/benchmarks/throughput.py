"""Drain scenarios: raw produce (the ceiling), outbox-relay, and the naive one-row relay."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Producer

import outbox_lib
from relay.app import run_relay
from relay.config import KAFKA_PRODUCER_DEFAULTS, load_settings
from relay.engine import Engine

from . import workload as w
from .results import Throughput

PROGRESS_POLL_S = 0.002


def producer_config(bootstrap: str) -> dict[str, Any]:
    """The relay's own librdkafka settings, so every scenario produces alike."""
    return {**KAFKA_PRODUCER_DEFAULTS, "bootstrap.servers": bootstrap}


class Reports:
    """Delivery reports, counted; the first error kept for the table."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.first_error: str | None = None

    def on_delivery(self, error: KafkaError | None, _record: Any) -> None:
        if error is None:
            self.ok += 1
            return
        self.failed += 1
        self.first_error = self.first_error or f"{error.name()}: {error.str()}"


def produce(producer: Producer, topic: str, record: w.Record, reports: Reports) -> None:
    key, value, headers = record
    while True:
        try:
            producer.produce(topic, value, key, headers=headers, on_delivery=reports.on_delivery)
        except BufferError:
            producer.poll(0.01)
            continue
        producer.poll(0)
        return


# --- a. raw produce -------------------------------------------------------------------------


def raw_produce(target: w.Target) -> Throughput:
    """One process producing the backlog's records as fast as librdkafka takes them.

    The producer has the topic's metadata before the clock starts (the relay pays that once
    per process: noise in a drain, a visible share of a one-second run).
    """
    topic = w.new_topic(target.bootstrap, "raw", target.workload.partitions)
    records = w.read_records(target.database_url, topic, target.workload.messages)
    producer = Producer(producer_config(target.bootstrap))
    producer.list_topics(topic, timeout=10.0)
    reports = Reports()
    started = time.perf_counter()
    for record in records:
        produce(producer, topic, record, reports)
    left = producer.flush(120)
    seconds = time.perf_counter() - started
    del producer
    count = w.records_on_topic(target.bootstrap, topic)
    return Throughput(
        "raw produce (1 process, no DB)", reports.ok, seconds,
        status="ok" if reports.ok == len(records) else "failed",
        note=_report_note(reports, left, count, len(records)),
        details={"records_on_topic": count.records, "duplicates": count.duplicates},
    )  # fmt: skip


def _report_note(reports: Reports, left: int, count: w.Count, expected: int) -> str:
    problems = []
    if reports.failed or left:
        problems.append(f"{reports.failed} failed, {left} unflushed ({reports.first_error})")
    if count.records != expected:
        problems.append(f"{count.records} records on the topic, expected {expected}")
    return "; ".join(problems) or f"all {expected} delivery reports read; topic holds {expected}"


# --- b. outbox-relay drain ------------------------------------------------------------------


class Phases:
    """Wall time the engine spends in each store / sink call, by wrapping them per instance.

    The wrappers cost one ``perf_counter`` pair per batch, not per message.
    """

    LABELS = (
        ("read_first_pass", "first pass: read a batch chunk (SQL + rows to objects)"),
        ("any_route_pending", "route_pending probe (SQL)"),
        ("blocked_keys", "blocked-keys check (SQL)"),
        ("claim_retry_pass", "retry claim (SQL)"),
        ("record_first_pass", "record: DELETE ... INSERT delivery, move the cursor"),
        ("record", "retry record (SQL)"),
        ("seconds_until_due", "idle check (SQL)"),
    )

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()

    def instrument(self, engine: Engine) -> None:
        for attr, label in self.LABELS:
            self._wrap(engine.store, attr, label)
        for sink in {id(r.sink): r.sink for r in engine.routes}.values():
            self._wrap(sink, "send", "send (produce + wait for acks, in a thread)")

    def _wrap(self, obj: object, attr: str, label: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(obj, attr)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.calls[label] += 1

        setattr(obj, attr, timed)

    def breakdown(self, total: float) -> dict[str, dict[str, float]]:
        """Per call kind: seconds inside it, share of the drain's wall time, ms per call.

        The first pass reads, sends and records one chunk after another, so for a Kafka
        drain the shares add up to at most 100%.
        """
        return {
            label: {"seconds": spent, "share_of_wall": spent / total, "calls": self.calls[label],
                    "ms_per_call": 1000 * spent / max(1, self.calls[label])}
            for label, spent in self.seconds.items()
        }  # fmt: skip


async def _wait_delivered(
    engines: list[Engine], expected: int, relay: asyncio.Task[Any], deadline: float
) -> float:
    """The moment ``expected`` deliveries are recorded (or the deadline, or the relay died)."""
    while time.perf_counter() < deadline and not relay.done():
        if engines and engines[0].stats.delivered >= expected:
            break
        await asyncio.sleep(PROGRESS_POLL_S)
    return time.perf_counter()


@dataclass
class Backlog:
    """A loaded outbox in its own schema, and what the drain's checks need to know."""

    schema: str
    topic: str
    load_s: float
    wal_before: str
    checks: dict[str, Any]


@contextmanager
def loaded_backlog(target: w.Target, schema: str, label: str) -> Iterator[Backlog]:
    """Load the backlog into ``schema`` (checkpointed, so the WAL count is the drain's own);
    on a clean exit fill ``checks`` from SQL and the topic; drop the schema in any case."""
    topic = w.new_topic(target.bootstrap, label, target.workload.partitions)
    load_s = w.load_outbox(target.database_url, schema, topic, upto=target.workload.messages)
    w.checkpoint(target.database_url)
    backlog = Backlog(schema, topic, load_s, w.wal_lsn(target.database_url), {})
    try:
        yield backlog
        backlog.checks = sql_checks(target.database_url, schema, backlog.wal_before)
    finally:
        w.drop_schema(target.database_url, schema)
    backlog.checks |= topic_checks(target.bootstrap, topic) | {"backlog_load_s": load_s}


# The bulk job of the live drains commits this many messages per transaction.
LOAD_CHUNK = 10_000
# The relay idles on its empty outbox this long before the backlog starts committing.
IDLE_BEFORE_LOAD_S = 1.0


@dataclass(frozen=True, slots=True)
class Drain:
    """A live drain: ``size`` messages committed while the relay runs, optionally while
    another session holds a snapshot open the whole time (``pinned``)."""

    size: int
    batch_size: int
    pinned: bool = False

    @property
    def name(self) -> str:
        pinned = ", xmin pinned" if self.pinned else ""
        return f"outbox-relay, {self.size:,} committed while it runs{pinned}"

    @property
    def schema(self) -> str:
        return f"bench_drain_{self.size}" + ("_pinned" if self.pinned else "")


def relay_drain(target: w.Target, drain: Drain, timeout: float) -> Throughput:
    """outbox-relay in-process (``run_relay``) on an empty outbox; once it idles, a bulk job
    commits the backlog (``LOAD_CHUNK`` per transaction). Timed from the first commit until
    every message is delivered: what a backlog after an outage or a bulk import meets. No
    VACUUM or ANALYZE anywhere: the table is in whatever state the commits and the drain
    leave it (autovacuum runs as configured)."""
    url = target.database_url
    settings = load_settings(
        {"database_url": url, "schema": drain.schema, "batch_size": drain.batch_size,
         "kafka_bootstrap_servers": target.bootstrap, "poll_interval": 1.0},
        env={},
    )  # fmt: skip
    topic = w.new_topic(target.bootstrap, f"drain{drain.size}", target.workload.partitions)
    w.fresh_schema(url, drain.schema)
    with w.connect(url) as conn:
        outbox_lib.migrate(conn, drain.schema)
    w.checkpoint(url)
    wal_before = w.wal_lsn(url)
    try:
        seconds, delivered, phases, load_s = asyncio.run(
            _live_drain(settings, target, drain, topic, timeout)
        )
        checks = sql_checks(url, drain.schema, wal_before)
    finally:
        w.drop_schema(url, drain.schema)
    checks |= topic_checks(target.bootstrap, topic) | {"backlog_load_s": load_s}
    ok = drained(checks, drain.size) and delivered >= drain.size
    note = drain_note(checks) + f"; commits took {load_s:.1f} s"
    if not ok and delivered:
        note = f"capped at {timeout:.0f} s: {delivered:,} of {drain.size:,} delivered; " + note
    return Throughput(
        drain.name, delivered, seconds, status="ok" if ok else "partial" if delivered else "failed",
        note=note, details={**checks, "phases": phases.breakdown(seconds),
                            "size": drain.size, "pinned": drain.pinned},
    )  # fmt: skip


async def _live_drain(
    settings: Any, target: w.Target, drain: Drain, topic: str, timeout: float
) -> tuple[float, int, Phases, float]:
    """(seconds from the first commit to the last delivery, delivered, phases, commit s)."""
    stop = asyncio.Event()
    phases = Phases()
    engines: list[Engine] = []

    def on_start(engine: Engine) -> None:
        phases.instrument(engine)
        engines.append(engine)

    relay = asyncio.create_task(run_relay(settings, stop, on_start))
    while not engines and not relay.done():
        await asyncio.sleep(0.05)
    await asyncio.sleep(IDLE_BEFORE_LOAD_S)
    url = target.database_url
    pin = w.pinned_snapshot(url, drain.schema) if drain.pinned else contextlib.nullcontext()
    with pin:
        started = time.perf_counter()
        load = asyncio.ensure_future(
            asyncio.to_thread(w.commit_backlog, url, drain.schema, topic, drain.size, LOAD_CHUNK)
        )
        finished = await _wait_delivered(engines, drain.size, relay, started + timeout)
        load_s = await load
    stop.set()
    stats = await relay
    return finished - started, stats.delivered, phases, load_s


def sql_checks(url: str, schema: str, wal_before: str) -> dict[str, Any]:
    """After a drain, before its schema is dropped: what SQL holds, and the WAL it wrote."""
    wal = w.wal_bytes_since(url, wal_before)
    left, rows, distinct = w.outbox_counts(url, schema)
    return {"message_rows_left": left, "delivery_rows": rows, "distinct_delivered": distinct,
            "wal_bytes_per_message": wal / max(1, rows)}  # fmt: skip


def topic_checks(bootstrap: str, topic: str) -> dict[str, Any]:
    count = w.records_on_topic(bootstrap, topic)
    return {"records_on_topic": count.records, "duplicates": count.duplicates}


def drained(checks: dict[str, Any], expected: int) -> bool:
    """Nothing left, and every message recorded as delivered exactly once."""
    rows, distinct = checks["delivery_rows"], checks["distinct_delivered"]
    return bool(checks["message_rows_left"] == 0 and rows == expected == distinct)


def drain_note(checks: dict[str, Any]) -> str:
    return (
        f"SQL: {checks['delivery_rows']} delivery rows, {checks['message_rows_left']} messages "
        f"left; topic holds {checks['records_on_topic']} ({checks['duplicates']} duplicates); "
        f"{checks['wal_bytes_per_message']:,.0f} B WAL/msg"
    )


# --- c. naive relay -------------------------------------------------------------------------


def naive_relay(target: w.Target, cap_seconds: float) -> Throughput:
    """SELECT ... LIMIT 1 FOR UPDATE SKIP LOCKED, produce, flush, DELETE, COMMIT; per message."""
    schema = "bench_naive"
    expected = target.workload.messages
    topic = w.new_topic(target.bootstrap, "naive", target.workload.partitions)
    w.load_outbox(target.database_url, schema, topic, upto=target.workload.messages)
    w.checkpoint(target.database_url)
    try:
        delivered, seconds, reports = _naive_loop(target, schema, cap_seconds)
        left = w.count_rows(target.database_url, schema, "message")
    finally:
        w.drop_schema(target.database_url, schema)
    count = w.records_on_topic(target.bootstrap, topic)
    rate = delivered / seconds if seconds else 0.0
    done = delivered == expected and left == 0
    note = (
        f"capped at {cap_seconds:.0f} s: {delivered} of {expected} sent; "
        f"all {expected} would take ~{expected / rate / 60:.1f} min (extrapolated)"
        if not done and rate
        else f"drained; {left} rows left"
    )
    if reports.failed:
        note += f"; {reports.failed} failed ({reports.first_error})"
    return Throughput(
        "naive relay (1 row per txn, flush each)", delivered, seconds,
        status="ok" if done else "partial", note=note,
        details={"records_on_topic": count.records, "message_rows_left": left,
                 "extrapolated_full_s": expected / rate if rate else None},
    )  # fmt: skip


def _naive_loop(target: w.Target, schema: str, cap: float) -> tuple[int, float, Reports]:
    producer = Producer(producer_config(target.bootstrap))
    reports = Reports()
    claim, delete = w.query("naive_claim", schema=schema), w.query("naive_delete", schema=schema)
    delivered = 0
    with psycopg.connect(target.database_url) as conn:
        started = time.perf_counter()
        while time.perf_counter() - started < cap:
            with conn.transaction():
                row = conn.execute(claim).fetchone()
                if row is None:
                    break
                seq, id_, topic, key, payload, headers = row
                record = (bytes(key), bytes(payload), w.relay_headers(str(id_), topic, headers))
                failed_before = reports.failed
                produce(producer, topic, record, reports)
                producer.flush(30)
                if reports.failed > failed_before:
                    raise RuntimeError(f"naive relay: produce failed: {reports.first_error}")
                conn.execute(delete, {"seq": seq})
            delivered += 1
        seconds = time.perf_counter() - started
    del producer
    return delivered, seconds, reports
