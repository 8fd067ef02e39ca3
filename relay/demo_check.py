"""``outbox-relay demo``, second half: read the topic back and prove what arrived.

Once the outbox is empty, a consumer reads the whole topic and the checks compare it with
what the sample app wrote: every committed order arrived, no rolled-back one did, each
message carries the contract's headers, and per customer (the message key) the orders
arrived in the order they were written, whichever relay sent them. The webhook route's
checks are in :mod:`relay.demo_webhook`; the summary shows both.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition
from rich.console import Console
from rich.table import Table

from .demo_webhook import WebhookReport
from .errors import RelayError

QUIET_S = 0.5
"""Once past the high watermarks with every committed order seen, this long without a new
record ends the read (Tansu under-reports watermarks for compressed batches)."""
GIVE_UP_QUIET_S = 3.0
"""The same, while committed orders are still missing: how long to wait for them."""
_POLL_S = 0.1


@dataclass(frozen=True)
class RelayShare:
    """One relay's part of the run: what it delivered and the key buckets it then held."""

    delivered: int
    buckets: int


@dataclass(frozen=True)
class Outcome:
    """What the sample app wrote and the relays did; the topic is checked against it."""

    topic: str
    committed: frozenset[int]
    rolled_back: int
    relays: tuple[RelayShare, ...]
    startup_s: float
    spread_s: float
    elapsed_s: float


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
    """The outcome and what the topic showed of it."""

    outcome: Outcome
    delivered: int
    duplicates: int
    missing: int
    unexpected: int
    bad_headers: int
    out_of_order: int

    @property
    def ok(self) -> bool:
        return bool(self.outcome.committed) and not (
            self.missing or self.unexpected or self.bad_headers or self.out_of_order
        )


# --- reading back ---------------------------------------------------------------------------


def consume(
    bootstrap: str, topic: str, committed: Collection[int], deadline: float
) -> list[Arrival]:
    """Everything in the topic: every partition from the beginning, past its high watermark
    and on until the topic has been quiet for a moment (see :func:`_read_until`).

    Reading to the end (not just to the expected count) is what proves that no rolled-back
    order slipped in. No group join (assign only): Tansu's joins are slow.
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
        ends = _partition_ends(consumer, topic, deadline)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        return _read_until(consumer, ends, committed, deadline)
    finally:
        consumer.close()


def _partition_ends(consumer: Consumer, topic: str, deadline: float) -> dict[int, int]:
    """Partition -> high watermark (0 when it looks empty), for every partition."""
    meta = consumer.list_topics(topic, timeout=max(1.0, deadline - time.monotonic()))
    info = meta.topics.get(topic)
    if info is None or info.error is not None:
        raise RelayError(f"topic {topic!r} is not readable: {info and info.error}")
    ends = {}
    for partition in info.partitions:
        _, ends[partition] = consumer.get_watermark_offsets(
            TopicPartition(topic, partition), timeout=10
        )
    return ends


def _read_until(
    consumer: Consumer, ends: dict[int, int], committed: Collection[int], deadline: float
) -> list[Arrival]:
    """Read past every high watermark, then until ``QUIET_S`` without a new record.

    The watermarks alone cannot say where the topic ends (Tansu under-reports them), so
    the read goes on while records keep coming; it waits up to ``GIVE_UP_QUIET_S`` for
    committed orders not seen yet. ``deadline`` bounds it all.
    """
    arrivals: list[Arrival] = []
    pending = {partition for partition, high in ends.items() if high > 0}
    unseen = set(committed)
    last_new = time.monotonic()
    while time.monotonic() < deadline:
        batch = [_arrival(m) for m in consumer.consume(1000, _POLL_S) if _ok(m)]
        if batch:
            last_new = time.monotonic()
        unseen.difference_update(a.order_id for a in batch)
        pending.difference_update(a.partition for a in batch if a.offset + 1 >= ends[a.partition])
        arrivals.extend(batch)
        quiet = time.monotonic() - last_new
        if not pending and quiet >= (GIVE_UP_QUIET_S if unseen else QUIET_S):
            break
    return arrivals


def _ok(message: Any) -> bool:
    """Skip transient errors (the deadline bounds how long we put up with them); raise
    fatal ones."""
    error = message.error()
    if error is not None and error.fatal():
        raise KafkaException(error)
    return error is None


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


# --- checking -------------------------------------------------------------------------------


def verify(outcome: Outcome, arrivals: list[Arrival]) -> Report:
    """Compare what arrived with what the app committed and rolled back."""
    committed = outcome.committed
    seen = Counter(a.order_id for a in arrivals)
    return Report(
        outcome=outcome,
        delivered=len(committed & set(seen)),
        duplicates=sum(n - 1 for n in seen.values() if n > 1),
        missing=len(committed - set(seen)),
        unexpected=sum(n for order_id, n in seen.items() if order_id not in committed),
        bad_headers=sum(1 for a in arrivals if not _headers_ok(a, outcome.topic)),
        out_of_order=_order_violations(arrivals),
    )


def _headers_ok(arrival: Arrival, topic: str) -> bool:
    headers = arrival.headers
    return (
        headers.get("idempotency-key") == f"order-{arrival.order_id}-created".encode()
        and bool(headers.get("outbox-message-id"))
        and headers.get("outbox-topic") == topic.encode()
        and headers.get("source") == b"demo"
    )


def _order_violations(arrivals: list[Arrival]) -> int:
    """Per key and partition, in offset order, each order id must be above the last.

    A redelivered duplicate repeats an id already seen; only first sightings count, since
    at-least-once delivery allows duplicates but not reordering. With several relays it
    also shows that no two of them sent one key at the same time.
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


# --- the summary ----------------------------------------------------------------------------


def print_summary(console: Console, report: Report, hooks: WebhookReport) -> None:
    """The summary table, one section per route, then a one-line verdict."""
    table = Table(title="outbox-relay demo", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    outcome = report.outcome
    sections = [
        [
            ("orders written (committed)", f"{len(outcome.committed)}"),
            ("rolled back on purpose", f"{outcome.rolled_back}"),
        ],
        [("kafka route, topic", outcome.topic), *_kafka_rows(report)],
        [(f"webhook route {hooks.route}", hooks.url.removeprefix("http://")), *hooks.rows()],
        _run_rows(outcome, report.delivered + hooks.delivered),
    ]
    for section in sections:
        for name, value in section:
            table.add_row(name, value)
        table.add_section()
    console.print(table)
    if report.ok and hooks.ok:
        console.print("[green]all checks passed[/green]")
    else:
        console.print("[red]checks failed[/red]")


def _kafka_rows(report: Report) -> list[tuple[str, str]]:
    return [
        ("  delivered", f"{report.delivered}"),
        ("  duplicates", f"{report.duplicates}"),
        ("  missing", f"{report.missing}"),
        ("  rolled back but delivered", f"{report.unexpected}"),
        ("  bad headers", f"{report.bad_headers}"),
        ("  per-key order violations", f"{report.out_of_order}"),
    ]


def _run_rows(outcome: Outcome, deliveries: int) -> list[tuple[str, str]]:
    """The relays' shares (of both routes' deliveries) and the timings."""
    rate = deliveries / outcome.elapsed_s if outcome.elapsed_s > 0 else 0.0
    relays = [
        (f"relay {n}", f"{share.delivered} delivered, {share.buckets} buckets")
        for n, share in enumerate(outcome.relays, start=1)
    ]
    return [
        ("deliveries (both routes)", f"{deliveries}"),
        ("relays", f"{len(outcome.relays)}"),
        *relays,
        ("start-up (postgres, broker, hook)", f"{outcome.startup_s:.2f} s"),
        ("relays join, share buckets", f"{outcome.spread_s:.2f} s"),
        ("elapsed (write + deliver)", f"{outcome.elapsed_s:.2f} s"),
        ("throughput", f"{rate:,.0f} msg/s"),
    ]
