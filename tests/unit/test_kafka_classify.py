"""Kafka sink logic that needs no broker: error classes, record headers, batch bookkeeping."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from relay.sinks.base import SHUTDOWN, Delivered, Failed, Outbound
from relay.sinks.kafka import KafkaSink, _Batch, classify, needs_new_producer, record_headers


def outbound(
    idempotency_key: str | None = None, headers: tuple[tuple[str, bytes], ...] = ()
) -> Outbound:
    return Outbound(
        seq=1,
        id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        topic="orders.created",
        key=b"7",
        payload=b'{"order_id":7}',
        content_type="application/json",
        headers=headers,
        idempotency_key=idempotency_key,
        created_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        attempts=0,
    )


# --- classify ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError._UNKNOWN_TOPIC,
        KafkaError.INVALID_RECORD,
    ],
)
def test_permanent_errors_dead_letter(code: int) -> None:
    assert classify(KafkaError(code)).kind == "permanent"


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError.REQUEST_TIMED_OUT,  # listed with the outage errors
        KafkaError.NOT_ENOUGH_REPLICAS,
    ],
)
def test_outage_errors_are_unavailable(code: int) -> None:
    assert classify(KafkaError(code)).kind == "unavailable"


def test_unlisted_error_is_retried() -> None:
    failed = classify(KafkaError(KafkaError.INVALID_TIMESTAMP))
    assert failed.kind == "retry"
    assert failed.reason == "INVALID_TIMESTAMP"


@pytest.mark.parametrize(
    "code", [KafkaError.PRODUCER_FENCED, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER]
)
def test_fenced_producer_is_an_outage_and_gets_replaced(code: int) -> None:
    """Seen on a broker paused past message.timeout.ms: the bumped epoch gets fenced."""
    error = KafkaError(code)
    assert classify(error).kind == "unavailable"
    assert needs_new_producer(error)


def test_fatal_unlisted_error_is_unavailable_not_a_spent_attempt() -> None:
    error = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True)
    assert classify(error).kind == "unavailable"


def test_permanent_wins_over_fatal() -> None:
    assert classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, fatal=True)).kind == "permanent"


def test_classify_keeps_the_error_name_and_text() -> None:
    failed = classify(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "record of 2 MB"))
    assert failed == Failed("permanent", "MSG_SIZE_TOO_LARGE", "record of 2 MB")


# --- record headers ----------------------------------------------------------------------


def test_record_headers_use_the_idempotency_key_first() -> None:
    msg = outbound("order-7-created", headers=(("tenant", b"acme"), ("sig", b"\x00")))
    assert record_headers(msg) == [
        ("idempotency-key", b"order-7-created"),
        ("outbox-message-id", b"12345678-1234-5678-1234-567812345678"),
        ("outbox-topic", b"orders.created"),
        ("tenant", b"acme"),
        ("sig", b"\x00"),
    ]


def test_record_headers_fall_back_to_the_message_id() -> None:
    headers = dict(record_headers(outbound(None)))
    assert headers["idempotency-key"] == b"12345678-1234-5678-1234-567812345678"
    assert headers["idempotency-key"] == headers["outbox-message-id"]


# --- _Batch ------------------------------------------------------------------------------


class _Record:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


def test_batch_callbacks_fill_results_in_order() -> None:
    batch = _Batch(3)
    assert batch.remaining == 3
    batch.callback(2)(None, _Record(1, 20))
    assert batch.remaining == 2
    batch.callback(0)(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), None)
    assert batch.remaining == 1
    results = batch.finish()
    assert results[0] == Failed("permanent", "MSG_SIZE_TOO_LARGE", results[0].detail)  # type: ignore[union-attr]
    assert (results[1].kind, results[1].reason) == ("unavailable", SHUTDOWN)  # type: ignore[union-attr]
    assert results[2] == Delivered(1, 20)
    assert not batch.fatal


def test_batch_counts_each_index_once_and_notes_fatal_errors() -> None:
    batch = _Batch(1)
    batch.callback(0)(KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True), None)
    batch.set(0, Delivered(0, 1))  # a second report for the same record
    assert batch.remaining == 0
    assert batch.fatal
    assert batch.finish() == [Delivered(0, 1)]


# --- _produce with a stand-in producer (no broker) ---------------------------------------


class FakeProducer:
    def __init__(self, produce: Callable[..., None]) -> None:
        self._produce = produce
        self.produce_calls = 0
        self.on_poll: Callable[[], None] = lambda: None

    def produce(self, topic: str, **kwargs: Any) -> None:
        self.produce_calls += 1
        self._produce(topic, **kwargs)

    def poll(self, timeout: float) -> int:
        self.on_poll()
        return 0


def test_produce_sends_value_key_headers_and_reports_delivery() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    producer = FakeProducer(lambda topic, **kw: sent.append((topic, kw)))
    batch, msg = _Batch(1), outbound("idem")
    KafkaSink({})._produce(producer, "orders", msg, batch, 0)  # type: ignore[arg-type]
    ((topic, kwargs),) = sent
    assert (topic, kwargs["value"], kwargs["key"]) == ("orders", msg.payload, b"7")
    assert kwargs["headers"] == record_headers(msg)
    kwargs["on_delivery"](None, _Record(0, 5))
    assert batch.finish() == [Delivered(0, 5)]


@pytest.mark.parametrize(
    ("raised", "expected_kind", "expected_reason"),
    [
        (
            KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)),
            "permanent",
            "MSG_SIZE_TOO_LARGE",
        ),
        (KafkaException(KafkaError(KafkaError._TRANSPORT)), "unavailable", "_TRANSPORT"),
        (TypeError("headers must be bytes"), "permanent", "invalid record"),
    ],
)
def test_produce_errors_are_classified(
    raised: Exception, expected_kind: str, expected_reason: str
) -> None:
    def fail(topic: str, **kwargs: Any) -> None:
        raise raised

    batch = _Batch(1)
    KafkaSink({})._produce(FakeProducer(fail), "t", outbound(), batch, 0)  # type: ignore[arg-type]
    (result,) = batch.finish()
    assert isinstance(result, Failed)
    assert (result.kind, result.reason) == (expected_kind, expected_reason)


def test_full_local_queue_is_waited_out() -> None:
    calls = iter([BufferError(), BufferError(), None])

    def produce(topic: str, **kwargs: Any) -> None:
        error = next(calls)
        if error:
            raise error

    producer = FakeProducer(produce)
    batch = _Batch(1)
    KafkaSink({})._produce(producer, "t", outbound(), batch, 0)  # type: ignore[arg-type]
    assert producer.produce_calls == 3
    assert batch.remaining == 1  # queued; its delivery report is still to come


def test_abort_stops_waiting_for_queue_space() -> None:
    sink = KafkaSink({})

    def queue_full(topic: str, **kwargs: Any) -> None:
        if producer.produce_calls > 20:
            raise RuntimeError("still retrying produce() after abort()")
        raise BufferError

    producer = FakeProducer(queue_full)
    producer.on_poll = sink.abort  # SIGTERM's grace runs out while we wait for space
    batch = _Batch(1)
    sink._produce(producer, "t", outbound(), batch, 0)  # type: ignore[arg-type]
    (result,) = batch.finish()
    assert isinstance(result, Failed) and result.kind == "unavailable"
