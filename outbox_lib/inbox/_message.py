"""What a consumer receives, whichever way it arrived: :class:`InboxMessage`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson

from .._errors import InvalidMessageError

_EMPTY: Mapping[str, bytes] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class InboxMessage:
    """One delivery of an outbox message, as a consumer sees it.

    ``idempotency_key`` and ``topic`` are what the inbox records: the same values on every
    delivery of one message (the Kafka ``idempotency-key`` and ``outbox-topic`` headers, the
    webhook's ``webhook-id`` and signed ``outbox-topic``). Keys are unique per topic, so two
    messages of different topics may share a key. ``key`` is the record key on Kafka, and
    ``None`` from a webhook, whose requests do not carry it.
    """

    idempotency_key: str
    payload: bytes
    topic: str | None = None
    key: bytes | None = None
    headers: Mapping[str, bytes] = field(default_factory=lambda: _EMPTY)

    def json(self) -> Any:
        """The payload decoded as JSON; :class:`InvalidMessageError` if it is not JSON."""
        try:
            return orjson.loads(self.payload)
        except orjson.JSONDecodeError as exc:
            raise InvalidMessageError(
                f"payload of message {self.idempotency_key!r} is not JSON: {exc}"
            ) from exc

    def text(self) -> str:
        """The payload decoded as UTF-8."""
        return self.payload.decode("utf-8")

    @classmethod
    def from_kafka(cls, record: Any) -> InboxMessage:
        """Build from a ``confluent_kafka.Message``.

        The key is the ``idempotency-key`` header the relay sets on every record, else the
        ``outbox-message-id`` header; a record from another producer, with neither, is
        identified by its coordinates (``kafka:topic:partition:offset``), which dedupes
        redeliveries of that record after a consumer crash but not a producer's duplicates.
        """
        headers = {name: bytes(value or b"") for name, value in record.headers() or ()}
        key = headers.get("idempotency-key") or headers.get("outbox-message-id")
        idempotency_key = (
            key.decode("utf-8", "replace")
            if key
            else f"kafka:{record.topic()}:{record.partition()}:{record.offset()}"
        )
        topic = headers.get("outbox-topic")
        return cls(
            idempotency_key=idempotency_key,
            payload=bytes(record.value() or b""),
            topic=topic.decode("utf-8", "replace") if topic else record.topic(),
            key=record.key(),
            headers=MappingProxyType(headers),
        )
