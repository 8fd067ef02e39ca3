"""Kafka-compatible broker for tests (Tansu, in memory) and group-free consume helpers.

Tansu is a single static binary that starts in ~50 ms, so every test that wants to
freeze a broker can have its own. Its consumer-group joins are slow, so the helpers
here read with ``assign()`` instead of ``subscribe()``.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from relay.embedded import EmbeddedBroker

ENV_BOOTSTRAP = "OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS"
_TOPIC_ILLEGAL = re.compile(r"[^A-Za-z0-9._-]+")
MAX_TOPIC_LEN = 200


@dataclass(frozen=True)
class Record:
    """One consumed Kafka record, detached from librdkafka's Message object.

    A null value or header value is reported as b"" (the outbox never writes nulls).
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> bytes | None:
        """First value of header ``name`` (Kafka allows repeats), None if absent."""
        return next((value for key, value in self.headers if key == name), None)


class TansuBroker(EmbeddedBroker):
    """The demo's embedded Tansu broker, plus a block-scoped pause for fault tests."""

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Pause for the block; always resumes, so a failing test cannot wedge teardown."""
        self.pause()
        try:
            yield
        finally:
            self.resume()


def start_tansu(log_dir: Path | None = None) -> TansuBroker:
    """A broker on a fresh port (``start`` retries if the port is grabbed meanwhile)."""
    broker = TansuBroker(log_dir=log_dir)
    broker.start()
    return broker


class KafkaEndpoint(Protocol):
    """What the session ``kafka`` fixture promises, for either broker flavour."""

    bootstrap: str

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def paused(self) -> AbstractContextManager[None]: ...


class ExternalKafka:
    """A broker given by ``OUTBOX_TEST_KAFKA_BOOTSTRAP_SERVERS``: shared, so never frozen."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    def pause(self) -> None:
        pytest.skip("cannot pause an external Kafka broker")

    def resume(self) -> None:
        pytest.skip("cannot resume an external Kafka broker")

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause()
        yield


def topic_name_for(test_name: str) -> str:
    """``t.<test>.<6 hex>``: readable in broker logs, unique across reruns, Kafka-legal."""
    suffix = secrets.token_hex(3)
    middle = _TOPIC_ILLEGAL.sub("_", test_name).strip("._") or "test"
    middle = middle[: MAX_TOPIC_LEN - len("t..") - len(suffix)]
    return f"t.{middle}.{suffix}"


def java_partition(key: bytes, partitions: int) -> int:
    """The partition the Java client's default partitioner picks for ``key``: Kafka's
    murmur2 (seed 0x9747b28c), made positive, modulo the partition count."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    h = (0x9747B28C ^ len(key)) & mask
    whole = len(key) - len(key) % 4
    for i in range(0, whole, 4):
        k = (int.from_bytes(key[i : i + 4], "little") * m) & mask
        k = ((k ^ (k >> 24)) * m) & mask
        h = ((h * m) & mask) ^ k
    if key[whole:]:
        h = ((h ^ int.from_bytes(key[whole:], "little")) * m) & mask
    h = ((h ^ (h >> 13)) * m) & mask
    h ^= h >> 15
    return (h & 0x7FFFFFFF) % partitions


def create_topic(bootstrap: str, name: str, partitions: int = 1, timeout: float = 15.0) -> None:
    """Create explicitly when the partition count matters (auto-create gives 1)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=partitions, replication_factor=1)
    future = admin.create_topics([topic], operation_timeout=timeout)[name]
    try:
        future.result(timeout=timeout)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise


def consume_all(bootstrap: str, topic: str, expected: int, timeout: float = 30.0) -> list[Record]:
    """Read from offset 0 of every partition until ``expected`` records or ``timeout``.

    Returns what arrived (possibly fewer: the caller asserts); stops at ``expected``,
    so use :func:`consume_for` to prove nothing *extra* arrived.
    """
    return _consume(bootstrap, topic, time.monotonic() + timeout, expected)


def consume_for(bootstrap: str, topic: str, seconds: float) -> list[Record]:
    """Everything in ``topic`` seen within ``seconds`` (an absent topic yields [])."""
    return _consume(bootstrap, topic, time.monotonic() + seconds, None)


def _consume(bootstrap: str, topic: str, deadline: float, limit: int | None) -> list[Record]:
    consumer = Consumer(_consumer_config(bootstrap))
    records: list[Record] = []
    try:
        if not _assign_all(consumer, topic, deadline):
            return records
        while (limit is None or len(records) < limit) and time.monotonic() < deadline:
            wait = max(0.0, min(0.1, deadline - time.monotonic()))
            records.extend(_to_record(m) for m in consumer.consume(1000, wait) if _ok(m))
        return records if limit is None else records[:limit]
    finally:
        consumer.close()


def _consumer_config(bootstrap: str) -> dict[str, Any]:
    """Random group that never joins (assign only) and never commits."""
    return {
        "bootstrap.servers": bootstrap,
        "group.id": f"harness-{uuid.uuid4().hex}",
        "enable.auto.commit": False,
        "fetch.wait.max.ms": 10,
        "allow.auto.create.topics": False,
        "enable.partition.eof": False,
    }


def _assign_all(consumer: Consumer, topic: str, deadline: float) -> bool:
    """Wait for the topic to exist (the code under test may create it late), then
    assign every partition from the beginning. False if it never appeared."""
    while time.monotonic() < deadline:
        meta = consumer.list_topics(topic, timeout=max(0.1, deadline - time.monotonic()))
        info = meta.topics.get(topic)
        if info is not None and info.error is None and info.partitions:
            consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in info.partitions])
            return True
        time.sleep(0.05)
    return False


def _ok(message: Any) -> bool:
    """Skip transient errors (the caller's deadline bounds them); raise fatal ones."""
    err = message.error()
    if err is not None and err.fatal():
        raise KafkaException(err)
    return err is None


def _to_record(message: Any) -> Record:
    return Record(
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        value=message.value() or b"",
        headers=[(k, v if v is not None else b"") for k, v in message.headers() or []],
    )


def consume_until(
    bootstrap: str,
    topic: str,
    done: Callable[[list[Record]], bool],
    timeout: float = 60.0,
    settle: float = 0.5,
) -> list[Record]:
    """Everything in ``topic`` (duplicates included) once ``done(records)`` holds, plus
    whatever else arrives within ``settle`` seconds of quiet after that.

    Use this when duplicates are possible, so a count cannot tell when to stop. High
    watermarks cannot either: Tansu under-reports them for compressed batches.
    """
    deadline = time.monotonic() + timeout
    consumer = Consumer(_consumer_config(bootstrap))
    records: list[Record] = []
    try:
        if not _assign_all(consumer, topic, deadline):
            return records
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            batch = [_to_record(m) for m in consumer.consume(1000, 0.1) if _ok(m)]
            records.extend(batch)
            if quiet_since is None:
                if done(records):
                    quiet_since = time.monotonic()
            elif batch:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= settle:
                break
        return records
    finally:
        consumer.close()
