"""What ``publish`` accepts, and how it is stored: pure validation and encoding."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid

import orjson
import pytest

import outbox_lib
from outbox_lib._encoding import (
    BINARY,
    DEFAULT_MAX_PAYLOAD_BYTES,
    JSON,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    MAX_TOPIC_LENGTH,
    TEXT,
    EncodedMessage,
    check_idempotency_key,
    check_schema_name,
    check_topic,
    decode_headers,
    encode_headers,
    encode_key,
    encode_message,
    encode_payload,
)


def _encode(payload: object = None, **overrides: object) -> EncodedMessage:
    args: dict[str, object] = {
        "topic": "orders.created",
        "payload": {"order_id": 7} if payload is None else payload,
        "key": None,
        "headers": None,
        "idempotency_key": None,
        "max_payload_bytes": DEFAULT_MAX_PAYLOAD_BYTES,
    }
    args.update(overrides)
    return encode_message(**args)  # type: ignore[arg-type]


# --- the error hierarchy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "bases"),
    [
        (outbox_lib.InvalidMessageError, (outbox_lib.OutboxError, ValueError)),
        (
            outbox_lib.PayloadTooLargeError,
            (outbox_lib.InvalidMessageError, outbox_lib.OutboxError, ValueError),
        ),
        (outbox_lib.UnsupportedSessionError, (outbox_lib.OutboxError, TypeError)),
        (outbox_lib.ConfigurationError, (outbox_lib.OutboxError, ValueError)),
        (outbox_lib.SchemaNotMigratedError, (outbox_lib.OutboxError,)),
        (outbox_lib.MigrationError, (outbox_lib.OutboxError,)),
        (outbox_lib.DatabaseUnavailableError, (outbox_lib.OutboxError,)),
    ],
)
def test_error_hierarchy(error: type[Exception], bases: tuple[type[Exception], ...]) -> None:
    for base in bases:
        assert issubclass(error, base), f"{error.__name__} should derive from {base.__name__}"


# --- payloads ----------------------------------------------------------------------------


def test_dict_payload_is_utf8_json_with_rich_types() -> None:
    payload = {
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
        "day": dt.date(2024, 1, 2),
        "id": uuid.UUID(int=1),
        "total": decimal.Decimal("12.50"),
        "name": "Zoë",
    }
    body, content_type = encode_payload(payload)
    assert content_type == JSON
    assert orjson.loads(body) == {
        "at": "2024-01-02T03:04:05Z",
        "day": "2024-01-02",
        "id": "00000000-0000-0000-0000-000000000001",
        "total": "12.50",  # a Decimal keeps its exact digits, as a string
        "name": "Zoë",
    }
    assert "Zoë".encode() in body  # UTF-8, not \u-escaped ASCII


def test_list_payload_is_json() -> None:
    body, content_type = encode_payload([1, "two", None])
    assert (body, content_type) == (b'[1,"two",null]', JSON)


def test_str_payload_is_utf8_text() -> None:
    assert encode_payload("héllo") == ("héllo".encode(), TEXT)


@pytest.mark.parametrize(
    "raw", [b"\x00\xffraw", bytearray(b"\x00\xffraw"), memoryview(b"\x00\xffraw")]
)
def test_bytes_payload_is_kept_as_is(raw: bytes | bytearray | memoryview) -> None:
    body, content_type = encode_payload(raw)
    assert body == b"\x00\xffraw"
    assert type(body) is bytes
    assert content_type == BINARY


@pytest.mark.parametrize("payload", [7, 1.5, None, (1, 2), object()])
def test_other_payload_types_are_rejected(payload: object) -> None:
    with pytest.raises(
        outbox_lib.InvalidMessageError, match="payload must be a dict, list, str or bytes"
    ):
        encode_payload(payload)


def test_unserializable_value_names_its_type() -> None:
    class Money:
        pass

    with pytest.raises(outbox_lib.InvalidMessageError) as caught:
        encode_payload({"price": Money()})
    assert str(caught.value) == "payload is not JSON-serializable: a Money value"


def test_unencodable_str_payload_is_invalid() -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match="UTF-8"):
        encode_payload("lone surrogate \ud800")


def test_payload_exactly_at_the_limit_passes_one_byte_over_fails() -> None:
    assert _encode(b"x" * 100, max_payload_bytes=100).payload == b"x" * 100
    with pytest.raises(outbox_lib.PayloadTooLargeError, match=r"101 bytes.*limit of 100"):
        _encode(b"x" * 101, max_payload_bytes=100)


def test_size_limit_applies_to_the_encoded_bytes() -> None:
    # 50 two-byte characters: 50 chars but 100 encoded bytes.
    with pytest.raises(outbox_lib.PayloadTooLargeError):
        _encode("é" * 50, max_payload_bytes=99)


# --- topic -------------------------------------------------------------------------------


def test_valid_topic_is_returned() -> None:
    assert check_topic("orders.created-v2_x") == "orders.created-v2_x"
    assert check_topic("t" * MAX_TOPIC_LENGTH) == "t" * MAX_TOPIC_LENGTH


@pytest.mark.parametrize(
    ("topic", "problem"),
    [
        ("", "must not be empty"),
        ("t" * (MAX_TOPIC_LENGTH + 1), "longer than 255"),
        ("orders created", "whitespace"),
        ("orders\tcreated", "whitespace"),
        ("orders\n", "whitespace"),
        ("orders\x00", "control"),
        (b"orders", "must be a str, got bytes"),
        (None, "must be a str, got NoneType"),
    ],
)
def test_bad_topics_are_rejected_with_the_reason(topic: object, problem: str) -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match=problem):
        check_topic(topic)


def test_topic_is_checked_by_encode_message_too() -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match="topic"):
        _encode(topic="")


# --- key ---------------------------------------------------------------------------------


def test_keys_are_stored_as_bytes_or_null() -> None:
    assert encode_key("7ü") == "7ü".encode()
    assert encode_key(b"\x01") == b"\x01"
    assert encode_key(None) is None


@pytest.mark.parametrize("key", [7, 1.0, ["k"]])
def test_non_str_bytes_keys_are_rejected(key: object) -> None:
    with pytest.raises(
        outbox_lib.InvalidMessageError, match=f"key must be .*got {type(key).__name__}"
    ):
        encode_key(key)


# --- headers -----------------------------------------------------------------------------


def test_headers_round_trip_str_and_bytes() -> None:
    stored = encode_headers({"tenant": "acmé", "sig": b"\x00\xff", "empty": ""})
    assert decode_headers(orjson.loads(stored)) == [
        ("tenant", "acmé".encode()),
        ("sig", b"\x00\xff"),
        ("empty", b""),
    ]


def test_headers_all_text_decode_in_order_and_odd_stored_values_are_passed_over() -> None:
    assert decode_headers({"a": "1", "b": "é"}) == [("a", b"1"), ("b", "é".encode())]
    # Written by hand (SQL), not by encode_headers: a value neither text nor {"b64": ...}.
    assert decode_headers({"a": "1", "n": 5, "b": {"b64": "AP8="}, "x": {"y": 1}}) == [
        ("a", b"1"),
        ("b", b"\x00\xff"),
    ]


def test_no_headers_is_an_empty_object() -> None:
    assert encode_headers(None) == b"{}"
    assert encode_headers({}) == b"{}"


@pytest.mark.parametrize(
    "name", ["outbox-topic", "Outbox-Topic", "IDEMPOTENCY-KEY", "outbox-message-id"]
)
def test_reserved_header_names_are_rejected_case_insensitively(name: str) -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match="reserved"):
        encode_headers({name: "x"})


@pytest.mark.parametrize("headers", [{1: "x"}, {b"tenant": "x"}, {"": "x"}])
def test_header_names_must_be_non_empty_str(headers: dict[object, object]) -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match="header names"):
        encode_headers(headers)


def test_header_values_must_be_str_or_bytes() -> None:
    with pytest.raises(
        outbox_lib.InvalidMessageError, match="'retries' must be str or bytes, got int"
    ):
        encode_headers({"retries": 3})


def test_headers_must_be_a_mapping() -> None:
    with pytest.raises(outbox_lib.InvalidMessageError, match=r"must be a mapping.*got list"):
        encode_headers([("tenant", "acme")])


# --- idempotency key and schema name -----------------------------------------------------


def test_idempotency_key_checks() -> None:
    assert check_idempotency_key(None) is None
    assert (
        check_idempotency_key("k" * MAX_IDEMPOTENCY_KEY_LENGTH) == "k" * MAX_IDEMPOTENCY_KEY_LENGTH
    )
    with pytest.raises(outbox_lib.InvalidMessageError, match="must not be empty"):
        check_idempotency_key("")
    with pytest.raises(outbox_lib.InvalidMessageError, match="longer than 512"):
        check_idempotency_key("k" * (MAX_IDEMPOTENCY_KEY_LENGTH + 1))
    with pytest.raises(outbox_lib.InvalidMessageError, match="got int"):
        check_idempotency_key(42)


def test_encode_message_returns_every_field_in_stored_form() -> None:
    msg = _encode({"a": 1}, key="7", headers={"h": "v"}, idempotency_key="order-7")
    assert msg == EncodedMessage(
        topic="orders.created",
        payload=b'{"a":1}',
        content_type=JSON,
        key=b"7",
        headers=b'{"h":"v"}',
        idempotency_key="order-7",
    )


@pytest.mark.parametrize("schema", ["outbox", "Weird", "_x1", "s" * 63])
def test_plain_schema_names_pass(schema: str) -> None:
    assert check_schema_name(schema) == schema


@pytest.mark.parametrize(
    "schema", ["", "1abc", "out-box", 'a"b', "a b", "a;drop", "s" * 64, None, 5]
)
def test_other_schema_names_are_configuration_errors(schema: object) -> None:
    with pytest.raises(outbox_lib.ConfigurationError, match="plain SQL identifier"):
        check_schema_name(schema)


def test_schema_name_with_trailing_newline_is_rejected() -> None:
    with pytest.raises(outbox_lib.ConfigurationError):
        check_schema_name("outbox\n")
