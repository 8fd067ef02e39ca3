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
from outbox_lib._signature import parse_secrets, sign, topic_header
from outbox_lib.inbox import InboxMessage, WebhookReceiver, WebhookVerificationError

NOW = 1_800_000_000
SECRET = "whsec_" + base64.b64encode(b"k" * 24).decode()
OTHER = "whsec_" + base64.b64encode(b"o" * 24).decode()


def receiver(secret: str = SECRET, **kwargs: Any) -> WebhookReceiver:
    return WebhookReceiver(secret, clock=lambda: NOW, **kwargs)


def headers(
    body: bytes,
    webhook_id: str = "msg_1",
    stamp: int = NOW,
    secret: str = SECRET,
    topic: str | None = "orders.created",
) -> dict[str, str]:
    """What the relay's webhook sink sends (``topic=None``: a sender without outbox-topic)."""
    keys = parse_secrets(secret)
    sent = {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(keys, webhook_id, stamp, body),
    }
    if topic is not None:
        value = topic_header(topic)
        sent["outbox-topic"] = value
        sent["outbox-topic-signature"] = sign(keys, webhook_id, stamp, body, topic=value)
    return sent


def test_a_valid_request_becomes_an_inbox_message() -> None:
    body = b'{"order_id": 7}'
    message = receiver().verify({k.upper(): v for k, v in headers(body).items()}, body)
    assert message.idempotency_key == "msg_1"
    assert message.topic == "orders.created"
    assert message.json() == {"order_id": 7}
    assert message.headers["webhook-id"] == b"msg_1"


@pytest.mark.parametrize("topic", ["orders.created", "bestellungen.größe", "50%.off", "a/b:c"])
def test_the_topic_arrives_as_published_whatever_its_characters(topic: str) -> None:
    body = b"{}"
    sent = headers(body, topic=topic)
    assert sent["outbox-topic"].isascii()
    assert (sent["outbox-topic"] == topic) == (topic.isascii() and "%" not in topic)
    assert receiver().verify(sent, body).topic == topic


def test_a_request_without_a_topic_is_refused_unless_allowed() -> None:
    """Stripping the topic from a captured request must not turn it into a new message."""
    body = b"{}"
    with pytest.raises(WebhookVerificationError, match="the outbox-topic header is missing"):
        receiver().verify(headers(body, topic=None), body)
    relaxed = receiver(require_topic=False)
    assert relaxed.verify(headers(body, topic=None), body).topic is None
    assert relaxed.verify(headers(body), body).topic == "orders.created"  # still checked
    assert "require_topic=False" in repr(relaxed)


def test_the_reference_implementation_signature_is_accepted() -> None:
    """Standard Webhooks' own package signs; our receiver verifies."""
    body = '{"order_id": 8}'
    stamp = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    signature = Webhook(SECRET).sign("msg_ref", stamp, body)
    sent = {"webhook-id": "msg_ref", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert receiver(require_topic=False).verify(sent, body.encode()).idempotency_key == "msg_ref"


def test_binary_bodies_and_either_of_two_rotating_secrets() -> None:
    body = os.urandom(64)
    rotating = receiver(f"{OTHER} {SECRET}")
    assert rotating.verify(headers(body), body).payload == body
    assert rotating.verify(headers(body, secret=OTHER), body).payload == body


def signed_topic(sent: dict[str, str], body: bytes, value: str) -> dict[str, str]:
    """``sent`` with an ``outbox-topic`` value the relay never sends, correctly signed."""
    stamp = int(sent["webhook-timestamp"])
    signature = sign(parse_secrets(SECRET), sent["webhook-id"], stamp, body, topic=value)
    return {**sent, "outbox-topic": value, "outbox-topic-signature": signature}


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
        (lambda h, b: ({**h, "outbox-topic": "orders.paid"}, b), "no outbox-topic-signature"),
        (
            lambda h, b: (
                {**h, "outbox-topic-signature": headers(b, topic="x")["outbox-topic-signature"]},
                b,
            ),
            "no outbox-topic-signature matches",
        ),
        (
            lambda h, b: ({k: v for k, v in h.items() if k != "outbox-topic-signature"}, b),
            "outbox-topic-signature header is missing",
        ),
        (lambda h, b: (signed_topic(h, b, "orders%2Ecreated"), b), "not a percent-encoded topic"),
        (lambda h, b: (signed_topic(h, b, "%C3"), b), "not a percent-encoded topic"),
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
