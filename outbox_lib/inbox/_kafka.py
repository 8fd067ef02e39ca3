"""A ready consume loop for confluent-kafka: process through the inbox, then commit offsets.

The order of events per record is: handler's database transaction commits (inbox row and
business write together), then the offset is committed to Kafka, in batches. A crash between
the two redelivers records whose work is already committed; the inbox turns those into
skips. Offsets are never committed ahead of the database, so nothing is lost.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import tenacity
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .._errors import ConfigurationError, DatabaseUnavailableError
from ._message import InboxMessage

log = logging.getLogger("outbox_lib.inbox")

# Serialization failure and deadlock: the transaction can simply run again.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
_FALSE = frozenset({"false", "0", "no", "off"})


def is_transient(exc: BaseException) -> bool:
    """Database errors worth retrying the same record for: lost connections, conflicts."""
    if isinstance(exc, OperationalError | InterfaceError | DatabaseUnavailableError):
        return True
    if isinstance(exc, DBAPIError):
        orig = exc.orig
        state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
        return state in _RETRY_SQLSTATES
    return False


@dataclass(slots=True)
class LoopStats:
    """What :meth:`KafkaInboxLoop.run` did: records processed now and duplicates skipped."""

    processed: int = 0
    skipped: int = 0

    @property
    def handled(self) -> int:
        return self.processed + self.skipped


def consumer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the settings the loop relies on; refuses ones that would lose records.

    ``group.id`` is required (offsets are committed to the group). Automatic commits are
    turned off: they could commit a record before its transaction commits. Unless given,
    ``auto.offset.reset`` is ``earliest`` and ``session.timeout.ms`` 10 s.
    """
    if not config.get("group.id"):
        raise ConfigurationError("the Kafka consumer config needs a group.id to commit offsets")
    auto = config.get("enable.auto.commit", False)
    if auto is not False and str(auto).strip().lower() not in _FALSE:
        raise ConfigurationError(
            "enable.auto.commit must be false: the inbox loop commits offsets itself, after "
            "the database commit"
        )
    merged: dict[str, Any] = {
        "auto.offset.reset": "earliest",
        # A crashed member holds its partitions until its session times out: 10 s rather
        # than librdkafka's 45 s before a restarted consumer resumes (brokers allow >= 6 s).
        "session.timeout.ms": 10_000,
        **config,
    }
    merged.update({"enable.auto.commit": False, "enable.auto.offset.store": False})
    return merged


class KafkaInboxLoop:
    """Consume records and pass each, as an :class:`InboxMessage`, to ``handle``.

    ``handle`` is usually a function decorated with :meth:`Inbox.handler`: it returns
    ``True`` when it processed the record and ``False`` for a duplicate. Give ``topics`` (a
    consumer group subscription) or ``partitions`` (a fixed assignment)::

        loop = KafkaInboxLoop(
            {"bootstrap.servers": "kafka:9092", "group.id": "billing"},
            charge,
            topics=["orders.created"],
        )
        with loop:
            loop.run(stop=stop_event)

    Transient database errors (:func:`is_transient`) retry the same record with backoff
    until ``stop`` is set. Any other error from ``handle`` stops the loop and propagates:
    offsets of records done before it are committed, and the consumer is rewound so the
    failed record comes first when ``run`` is called again (or the process restarts).
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        handle: Callable[[InboxMessage], object],
        *,
        topics: Sequence[str] | None = None,
        partitions: Sequence[TopicPartition] | None = None,
        batch_size: int = 100,
        poll_timeout_s: float = 0.5,
        commit_every: int = 500,
        commit_interval_s: float = 1.0,
        max_backoff_s: float = 10.0,
    ) -> None:
        if (topics is None) == (partitions is None):
            raise ConfigurationError("give exactly one of topics= or partitions=")
        for name, value in (("batch_size", batch_size), ("commit_every", commit_every)):
            if value <= 0:
                raise ConfigurationError(f"{name} must be positive, got {value!r}")
        self.consumer = Consumer(consumer_config(config))
        self._handle = handle
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        self._commit_every = commit_every
        self._commit_interval_s = commit_interval_s
        self._max_backoff_s = max_backoff_s
        self._done: dict[tuple[str, int], int] = {}
        self._uncommitted = 0
        self._last_commit = time.monotonic()
        if topics is not None:
            self.consumer.subscribe(list(topics), on_revoke=self._revoked, on_lost=self._lost)
        else:
            self.consumer.assign(list(partitions or ()))

    def __enter__(self) -> KafkaInboxLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        max_messages: int | None = None,
        idle_timeout_s: float | None = None,
    ) -> LoopStats:
        """Process records until ``stop`` is set, ``max_messages`` were handled, or nothing
        arrived for ``idle_timeout_s``; commit the offsets of what was done, and return."""
        stats = LoopStats()
        stop = stop or threading.Event()
        last_record = time.monotonic()
        try:
            while not stop.is_set():
                if max_messages is not None and stats.handled >= max_messages:
                    break
                wanted = self._batch_size
                if max_messages is not None:
                    wanted = min(wanted, max_messages - stats.handled)
                records = self._records(wanted)
                if records:
                    last_record = time.monotonic()
                    self._process(records, stats, stop)
                elif (
                    idle_timeout_s is not None and time.monotonic() - last_record >= idle_timeout_s
                ):
                    break
                self._maybe_commit()
        finally:
            self.commit()
        return stats

    def commit(self) -> None:
        """Commit the offsets of every record whose transaction has committed."""
        if not self._done:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in self._done.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            # Harmless for correctness: the records come again and the inbox skips them.
            log.warning("offset commit failed, will retry: %s", exc.args[0] if exc.args else exc)
            return
        self._done.clear()
        self._uncommitted = 0
        self._last_commit = time.monotonic()

    def close(self) -> None:
        """Commit what is done and leave the group."""
        try:
            self.commit()
        finally:
            self.consumer.close()

    def _records(self, wanted: int) -> list[Message]:
        records = []
        for record in self.consumer.consume(num_messages=wanted, timeout=self._poll_timeout_s):
            error = record.error()
            if error is None:
                records.append(record)
            elif error.fatal():
                raise KafkaException(error)
            elif error.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", error)
        return records

    def _process(self, records: list[Message], stats: LoopStats, stop: threading.Event) -> None:
        for index, record in enumerate(records):
            try:
                processed = self._handle_patiently(InboxMessage.from_kafka(record), stop)
            except BaseException:
                self._rewind(records[index:])
                raise
            if processed is None:  # stopping while retrying
                self._rewind(records[index:])
                return
            if processed:
                stats.processed += 1
            else:
                stats.skipped += 1
            topic, partition, offset = _coordinates(record)
            self._done[(topic, partition)] = offset + 1
            self._uncommitted += 1

    def _handle_patiently(self, message: InboxMessage, stop: threading.Event) -> bool | None:
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            wait=tenacity.wait_exponential(multiplier=0.1, max=self._max_backoff_s)
            + tenacity.wait_random(0, 0.1),
            stop=lambda _state: stop.is_set(),
            sleep=functools.partial(_pause, stop),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return bool(retrying(self._handle, message))
        except Exception as exc:
            if is_transient(exc) and stop.is_set():
                return None
            raise

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome else None
        log.warning("database error, retrying the same record: %s", type(error).__name__)

    def _maybe_commit(self) -> None:
        due = time.monotonic() - self._last_commit >= self._commit_interval_s
        if self._uncommitted >= self._commit_every or (due and self._done):
            self.commit()

    def _rewind(self, records: Iterable[Message]) -> None:
        """Seek each partition back to its first record not done, so nothing is skipped."""
        first: dict[tuple[str, int], int] = {}
        for record in records:
            topic, partition, offset = _coordinates(record)
            first[(topic, partition)] = min(first.get((topic, partition), offset), offset)
        for (topic, partition), offset in first.items():
            self.consumer.seek(TopicPartition(topic, partition, offset))

    def _revoked(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {(tp.topic, tp.partition) for tp in partitions}
        self.commit()
        for place in revoked:
            self._done.pop(place, None)

    def _lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._done.pop((tp.topic, tp.partition), None)


def _pause(stop: threading.Event, seconds: float) -> None:
    """Back off, but wake up at once when the loop is asked to stop."""
    stop.wait(seconds)


def _coordinates(record: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (never None for one without error)."""
    topic, partition, offset = record.topic(), record.partition(), record.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaException(f"record without coordinates: {topic}/{partition}/{offset}")
    return topic, partition, offset
