"""The inbox's pure parts: webhook verification and building InboxMessages (no I/O)."""

from __future__ import annotations

import base64
import datetime as dt
import os
from types import ModuleType
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

import outbox_lib
from outbox_lib._signature import parse_secrets, sign
from outbox_lib.inbox import InboxMessage, WebhookReceiver, WebhookVerificationError

NOW = 1_800_000_000
SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()


def receiver(secret: str = SECRET, **kwargs: Any) -> WebhookReceiver:
    return WebhookReceiver(secret, clock=lambda: NOW, **kwargs)


def headers(
    body: bytes, webhook_id: str = "msg_1", stamp: int = NOW, secret: str = SECRET
) -> dict[str, str]:
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(parse_secrets(secret), webhook_id, stamp, body),
    }


def test_a_valid_request_becomes_an_inbox_message() -> None:
    body = b'{"order_id": 7}'
    message = receiver().verify({k.upper(): v for k, v in headers(body).items()}, body)
    assert message.idempotency_key == "msg_1"
    assert message.json() == {"order_id": 7}
    assert message.headers["webhook-id"] == b"msg_1"


def test_the_reference_implementation_signature_is_accepted() -> None:
    """Standard Webhooks' own package signs; our receiver verifies."""
    body = '{"order_id": 8}'
    stamp = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    signature = Webhook(SECRET).sign("msg_ref", stamp, body)
    sent = {"webhook-id": "msg_ref", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert receiver().verify(sent, body.encode()).idempotency_key == "msg_ref"


def test_binary_bodies_and_either_of_two_rotating_secrets() -> None:
    body = os.urandom(64)
    rotating = receiver(f"{OTHER} {SECRET}")
    assert rotating.verify(headers(body), body).payload == body
    assert rotating.verify(headers(body, secret=OTHER), body).payload == body


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, b: (h, b + b" "), "no signature matches"),
        (lambda h, b: ({**h, "webhook-id": "msg_2"}, b), "no signature matches"),
        (lambda h, b: ({**h, "webhook-signature": "v1a,abc v2,def"}, b), "no signature matches"),
        (lambda h, b: (headers(b, secret=OTHER), b), "no signature matches"),
        (lambda h, b: (headers(b, stamp=NOW - 301), b), "301 s in the past"),
        (lambda h, b: (headers(b, stamp=NOW + 400), b), "400 s in the future"),
        (lambda h, b: ({**h, "webhook-timestamp": "yesterday"}, b), "unix seconds"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "webhook-id header"),
        (lambda h, b: ({**h, "webhook-signature": " "}, b), "webhook-signature header"),
    ],
)
def test_bad_requests_name_the_failed_check(change: Any, reason: str) -> None:
    body = b"{}"
    sent, received = change(headers(body), body)
    with pytest.raises(WebhookVerificationError, match=reason) as caught:
        receiver().verify(sent, received)
    assert isinstance(caught.value, outbox_lib.OutboxError)
    assert SECRET.removeprefix("whsec_") not in str(caught.value)


def test_tolerance_is_configurable_and_the_secret_is_never_shown() -> None:
    body = b"{}"
    message = receiver(tolerance_s=1000).verify(headers(body, stamp=NOW - 900), body)
    assert (message.idempotency_key, message.payload) == ("msg_1", body)
    assert SECRET not in repr(receiver()) and "1 secret" in repr(receiver())
    with pytest.raises(outbox_lib.ConfigurationError, match="secret #1 is not valid") as caught:
        WebhookReceiver("whsec_notbase64!")
    assert "base64!" not in str(caught.value)
    with pytest.raises(outbox_lib.ConfigurationError, match="tolerance_s"):
        WebhookReceiver(SECRET, tolerance_s=0)
    with pytest.raises(outbox_lib.ConfigurationError, match="must be a str"):
        WebhookReceiver(b"whsec_x")  # type: ignore[arg-type]


class Record:
    """The part of ``confluent_kafka.Message`` that InboxMessage reads."""

    def __init__(
        self, headers: list[tuple[str, bytes]] | None, value: bytes | None = b"{}"
    ) -> None:
        self._headers = headers
        self._value = value

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._headers

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes:
        return b"k1"

    def topic(self) -> str:
        return "orders"

    def partition(self) -> int:
        return 2

    def offset(self) -> int:
        return 41


@pytest.mark.parametrize(
    ("record_headers", "key", "topic"),
    [
        ([("idempotency-key", b"order-1"), ("outbox-message-id", b"m-1")], "order-1", "orders"),
        (
            [("outbox-message-id", b"m-1"), ("outbox-topic", b"orders.created")],
            "m-1",
            "orders.created",
        ),
        (None, "kafka:orders:2:41", "orders"),
    ],
)
def test_kafka_records_become_inbox_messages(
    record_headers: list[tuple[str, bytes]] | None, key: str, topic: str
) -> None:
    message = InboxMessage.from_kafka(Record(record_headers))
    assert (message.idempotency_key, message.topic, message.key) == (key, topic, b"k1")
    assert dict(message.headers) == dict(record_headers or [])


def test_payload_helpers() -> None:
    assert InboxMessage.from_kafka(Record([], value=None)).payload == b""
    assert InboxMessage("k", "é".encode()).text() == "é"
    with pytest.raises(outbox_lib.InvalidMessageError, match="'k' is not JSON"):
        InboxMessage("k", b"not json").json()


def test_public_names_are_exactly_all() -> None:
    import outbox_lib.inbox as inbox

    public = {
        n for n, v in vars(inbox).items() if not n.startswith("_") and not isinstance(v, ModuleType)
    }
    assert public == set(inbox.__all__)
