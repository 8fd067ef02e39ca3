"""Kafka sink on confluent-kafka (librdkafka), with an idempotent producer.

A batch is produced in one go and the delivery report of every record is read before the
batch returns. librdkafka keeps per-partition order and retries internally; what it finally
reports as failed is classified by :func:`classify`. Blocking calls run in a worker thread
so the relay's event loop keeps serving signals and NOTIFY.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from ..config import ProducerValue, Route
from ..errors import ConfigError
from ..logs import RepeatQuieter
from ..tracing import Spans
from .base import SHUTDOWN, Delivered, Failed, Outbound, Result

log = logging.getLogger(__name__)

_PERMANENT_NAMES = (
    "MSG_SIZE_TOO_LARGE",
    "RECORD_LIST_TOO_LARGE",
    "INVALID_RECORD",
    "TOPIC_AUTHORIZATION_FAILED",
    "CLUSTER_AUTHORIZATION_FAILED",
    "TOPIC_EXCEPTION",
    "UNKNOWN_TOPIC_OR_PART",
    "_UNKNOWN_TOPIC",
    "_UNKNOWN_PARTITION",
    "POLICY_VIOLATION",
    "_INVALID_ARG",
)
_UNAVAILABLE_NAMES = (
    "_MSG_TIMED_OUT",
    "_TIMED_OUT",
    "_TRANSPORT",
    "_ALL_BROKERS_DOWN",
    "_PURGE_QUEUE",
    "_PURGE_INFLIGHT",
    "_DESTROY",
    "NETWORK_EXCEPTION",
    "REQUEST_TIMED_OUT",
    "BROKER_NOT_AVAILABLE",
    "LEADER_NOT_AVAILABLE",
    "NOT_LEADER_FOR_PARTITION",
    "NOT_ENOUGH_REPLICAS",
    "NOT_ENOUGH_REPLICAS_AFTER_APPEND",
)


# The producer's idempotence state is broken (e.g. the broker fenced the epoch librdkafka
# bumped after timed-out requests): every later record fails the same way until a new
# producer (new producer id) replaces it. Nothing is wrong with the messages themselves.
_PRODUCER_RESET_NAMES = (
    "PRODUCER_FENCED",
    "INVALID_PRODUCER_EPOCH",
    "UNKNOWN_PRODUCER_ID",
    "OUT_OF_ORDER_SEQUENCE_NUMBER",
    "INVALID_PRODUCER_ID_MAPPING",
    "_FENCED",
    "_FATAL",
)


def _codes(names: Sequence[str]) -> frozenset[int]:
    return frozenset(getattr(KafkaError, n) for n in names if hasattr(KafkaError, n))


PERMANENT_CODES = _codes(_PERMANENT_NAMES)
UNAVAILABLE_CODES = _codes(_UNAVAILABLE_NAMES)
PRODUCER_RESET_CODES = _codes(_PRODUCER_RESET_NAMES)


def needs_new_producer(error: KafkaError) -> bool:
    return bool(error.fatal()) or error.code() in PRODUCER_RESET_CODES


def classify(error: KafkaError) -> Failed:
    """Map a librdkafka error to what the relay does with the message.

    Anything not known to be permanent is retried: a message that "may have been
    persisted" (POSSIBLY_PERSISTED) is retried too, which can duplicate but never loses.
    """
    reason = error.name() or f"kafka error {error.code()}"
    detail = error.str() or ""
    if error.code() in PERMANENT_CODES:
        return Failed("permanent", reason, detail)
    if error.code() in UNAVAILABLE_CODES or needs_new_producer(error):
        return Failed("unavailable", reason, detail)
    return Failed("retry", reason, detail)


def record_headers(message: Outbound) -> list[tuple[str, str | bytes | None]]:
    """The contract's headers first, then the message's own."""
    message_id = str(message.id).encode()
    idempotency = message.idempotency_key
    return [
        ("idempotency-key", idempotency.encode() if idempotency is not None else message_id),
        ("outbox-message-id", message_id),
        ("outbox-topic", message.topic.encode()),
        *message.headers,
    ]


class _Batch:
    """Delivery reports of one batch, filled in from librdkafka's callback thread."""

    def __init__(self, size: int) -> None:
        self.results: list[Result | None] = [None] * size
        self.remaining = size
        self.fatal = False

    def callback(self, index: int) -> Callable[[KafkaError | None, Any], None]:
        return functools.partial(self.on_delivery, index)

    def on_delivery(self, index: int, error: KafkaError | None, record: Any) -> None:
        if error is None:
            self.set(index, Delivered(record.partition(), record.offset(), time.time()))
        else:
            self.fatal = self.fatal or needs_new_producer(error)
            self.set(index, classify(error))

    def set(self, index: int, result: Result) -> None:
        if self.results[index] is None:
            self.remaining -= 1
        self.results[index] = result

    def finish(self) -> list[Result]:
        """Every report; records without one were given up because the relay is stopping."""
        unanswered = Failed("unavailable", SHUTDOWN, "relay stopped before the broker answered")
        return [r if r is not None else unanswered for r in self.results]


# While a batch is produced, delivery reports are served every this many records (the
# flush after the batch serves the rest).
_POLL_EVERY = 1024

# Properties whose values are secrets (sasl.password, ssl.key.password, ...): never echoed.
_SECRET_PROPERTY = re.compile(r"password|secret", re.IGNORECASE)


class KafkaSink:
    """Sends batches to Kafka; one idempotent producer per relay process."""

    def __init__(self, config: Mapping[str, ProducerValue], poll_interval: float = 0.05) -> None:
        self._config = dict(config)
        self._librdkafka_log = RepeatQuieter(log)
        self._poll_interval = poll_interval
        self._producer: Producer | None = None
        self._aborted = threading.Event()
        self._lock = threading.Lock()
        self.spans = Spans()
        # A topic a record was delivered to: what readiness probes ask about.
        self.known_topic: str | None = None
        self._closed = False

    def _get_producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(self._config, logger=self._librdkafka_log)
            return self._producer

    def open(self) -> None:
        """Create the producer now, so that librdkafka judges the configuration at start-up
        (an unknown property, a value out of range, idempotence with acks=0) and a relay
        whose Kafka routes can never work stops there instead of looking healthy."""
        try:
            self._get_producer()
        except (KafkaException, ValueError, TypeError) as exc:
            error = exc.args[0] if exc.args else exc
            text = error.str() if isinstance(error, KafkaError) else str(error)
            for key, value in self._config.items():
                if _SECRET_PROPERTY.search(key) and str(value):
                    text = text.replace(str(value), "***")
            text = " ".join(text.split())
            raise ConfigError(f"config [kafka.producer]: librdkafka refuses it: {text}") from None

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        return await asyncio.to_thread(self.send_sync, route, batch)

    def send_sync(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        """Produce ``batch`` and wait for every delivery report (or an abort)."""
        if not self.spans.enabled:
            return self._send_sync(route, batch)
        with self.spans.kafka_batch(route, batch) as span:
            results = self._send_sync(route, batch)
            span.results(results)
        return results

    def _send_sync(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        producer = self._get_producer()
        pending = _Batch(len(batch))
        target = route.kafka_topic
        for index, message in enumerate(batch):
            if self._aborted.is_set():
                break
            self._produce(producer, target or message.topic, message, pending, index)
        while pending.remaining and not self._aborted.is_set():
            # flush() sends what linger.ms would still hold back and serves the reports;
            # poll() alone would wait out the linger on every batch.
            producer.flush(self._poll_interval)
        if pending.remaining:
            producer.purge(in_queue=True, in_flight=True, blocking=False)
            producer.poll(0.5)
        if pending.fatal:
            self._drop_producer(producer)
        results = pending.finish()
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, Delivered):
                self.known_topic = route.target_topic(message.topic)
                break
        return results

    def _produce(
        self, producer: Producer, topic: str, message: Outbound, batch: _Batch, index: int
    ) -> None:
        while True:
            try:
                producer.produce(
                    topic,
                    value=message.payload,
                    key=message.key,
                    headers=record_headers(message),
                    on_delivery=batch.callback(index),
                )
            except BufferError:
                # The local queue is full: serve delivery reports to make room, unless
                # shutting down, in which case the message stays unsent (released).
                if self._aborted.is_set():
                    return
                producer.poll(self._poll_interval)
                continue
            except KafkaException as exc:
                batch.set(index, classify(exc.args[0]))
            except (TypeError, ValueError) as exc:
                batch.set(index, Failed("permanent", "invalid record", str(exc)))
            if index % _POLL_EVERY == _POLL_EVERY - 1:
                # Reports are served by the flush after the batch; polling on every record
                # cost about 2 us each and handed the GIL to the event loop each time.
                producer.poll(0)
            return

    def _drop_producer(self, producer: Producer) -> None:
        log.warning("kafka producer state is unusable (fenced or fatal); replacing the producer")
        with self._lock:
            if self._producer is producer:
                self._producer = None

    def abort(self) -> None:
        self._aborted.set()

    async def probe(self, topic: str | None, timeout: float) -> str | None:
        """Ask the cluster for metadata: None when it answers in time, else why not.

        A paused or partitioned broker keeps its TCP connections open, so librdkafka itself
        notices only after ``socket.timeout.ms``; readiness asks instead. With ``topic`` the
        request names one topic the relay produces to (never a new one: producers may create
        topics they name), without it the request covers every topic.
        """

        def ask() -> None:
            with self._lock:
                producer = self._producer
            if producer is None and self._closed:
                return  # the relay is stopping: no new producer only to ask
            self._get_producer().list_topics(topic, timeout=timeout)

        try:
            await asyncio.to_thread(ask)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError):
                return f"kafka: {error.name()}"
            return f"kafka: {exc}"
        return None

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            producer, self._producer = self._producer, None
        if producer is not None:
            await asyncio.to_thread(producer.flush, 5.0)
            del producer  # disconnects now rather than whenever the sink is collected
