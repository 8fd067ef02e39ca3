"""Validation and encoding of what ``publish`` is given. Pure functions, no I/O.

Everything is checked and encoded before any SQL runs, so bad input never reaches the
caller's transaction.
"""

from __future__ import annotations

import base64
import dataclasses
import decimal
import math
import re
import string
from collections.abc import Mapping
from typing import Any

import orjson

from ._errors import ConfigurationError, InvalidMessageError, PayloadTooLargeError

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

MAX_TOPIC_LENGTH = 255
MAX_IDEMPOTENCY_KEY_LENGTH = 512
DEFAULT_MAX_PAYLOAD_BYTES = 1_048_576
# Header names the relay sets on deliveries (any case): idempotency-key and every outbox-*
# name (outbox-message-id, outbox-topic, outbox-topic-signature and any added later).
RESERVED_HEADER = "idempotency-key"
RESERVED_HEADER_PREFIX = "outbox-"
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_BAD_TOPIC_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")
# A published idempotency key travels as an HTTP header value (webhook-id, idempotency-key):
# printable ASCII, as the IETF Idempotency-Key header's structured string, and no space at
# either end, which HTTP parsers strip (the webhook signature would then not match).
_DELIVERY_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_UTC_Z


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedMessage:
    """A message ready for ``enqueue``: every field already in its stored form."""

    topic: str
    payload: bytes
    content_type: str
    key: bytes | None
    headers: bytes
    idempotency_key: str | None


def encode_message(
    topic: object,
    payload: object,
    key: object,
    headers: object,
    idempotency_key: object,
    max_payload_bytes: int,
) -> EncodedMessage:
    """Validate every argument of ``publish`` and return the stored form."""
    body, content_type = encode_payload(payload)
    if len(body) > max_payload_bytes:
        raise PayloadTooLargeError(
            f"payload is {len(body)} bytes, over the limit of {max_payload_bytes} bytes"
        )
    return EncodedMessage(
        topic=check_topic(topic),
        payload=body,
        content_type=content_type,
        key=encode_key(key),
        headers=encode_headers(headers),
        idempotency_key=_check_delivery_key(check_idempotency_key(idempotency_key)),
    )


def check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise InvalidMessageError(f"topic must be a str, got {type(topic).__name__}")
    if not topic:
        raise InvalidMessageError("topic must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidMessageError(f"topic is longer than {MAX_TOPIC_LENGTH} characters")
    if _BAD_TOPIC_CHARS.search(topic):
        raise InvalidMessageError(f"topic {topic!r} contains whitespace or control characters")
    return check_text("topic", topic)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise _UnsupportedValue(value)


class _UnsupportedValue(TypeError):
    """A value ``_json_default`` cannot encode: the error names its type itself, whatever
    orjson makes of the exception it wraps."""

    def __init__(self, value: object) -> None:
        self.type_name = type(value).__name__
        super().__init__(f"Type is not JSON serializable: {self.type_name}")


def encode_payload(payload: object) -> tuple[bytes, str]:
    """Return the payload bytes and their content type."""
    if isinstance(payload, dict | list):
        try:
            body = orjson.dumps(payload, default=_json_default, option=_JSON_OPTIONS)
        except orjson.JSONEncodeError as exc:
            cause = exc.__cause__
            reason = f"a {cause.type_name} value" if isinstance(cause, _UnsupportedValue) else exc
            raise InvalidMessageError(f"payload is not JSON-serializable: {reason}") from exc
        # orjson writes NaN and infinities as null: a changed payload, so refuse them. Only a
        # body with a null can hold one, so most payloads are never walked.
        if b"null" in body:
            _refuse_non_finite(payload, "payload")
        return body, JSON
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8"), TEXT
        except UnicodeEncodeError as exc:
            raise InvalidMessageError(f"payload str is not valid UTF-8: {exc}") from exc
    if isinstance(payload, bytes | bytearray | memoryview):
        return bytes(payload), BINARY
    raise InvalidMessageError(
        f"payload must be a dict, list, str or bytes, got {type(payload).__name__}"
    )


def _refuse_non_finite(value: object, path: str) -> None:
    """Raise naming the first NaN or infinity in ``value`` (JSON has no way to write one)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidMessageError(
                f"{path} is {value!r}: JSON has no NaN or infinity (send null or a string)"
            )
    elif isinstance(value, dict):
        for name, item in value.items():
            _refuse_non_finite(item, f"{path}[{name!r}]")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _refuse_non_finite(item, f"{path}[{index}]")
    elif isinstance(value, set | frozenset):
        for item in value:
            _refuse_non_finite(item, f"{path}[...]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            _refuse_non_finite(getattr(value, field.name), f"{path}.{field.name}")
    elif hasattr(value, "dtype") and hasattr(value, "tolist"):  # numpy scalars and arrays
        _refuse_non_finite(value.tolist(), path)


def encode_key(key: object) -> bytes | None:
    if key is None:
        return None
    if isinstance(key, str):
        return check_text("key", key).encode("utf-8")
    if isinstance(key, bytes | bytearray | memoryview):
        return bytes(key)
    raise InvalidMessageError(f"key must be a str, bytes or None, got {type(key).__name__}")


def encode_headers(headers: object) -> bytes:
    """Headers are stored as a JSON object; bytes values as ``{"b64": "..."}``."""
    if headers is None:
        return b"{}"
    if not isinstance(headers, Mapping):
        raise InvalidMessageError(
            f"headers must be a mapping of str to str or bytes, got {type(headers).__name__}"
        )
    stored: dict[str, object] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise InvalidMessageError(f"header names must be non-empty str, got {name!r}")
        check_text(f"header name {name!r}", name)
        if is_reserved_header(name):
            raise InvalidMessageError(
                f"header {name!r} is reserved: the relay sets idempotency-key and outbox-* headers"
            )
        stored[name] = _encode_header_value(name, value)
    return orjson.dumps(stored)


def is_reserved_header(name: str) -> bool:
    # ASCII case only, as header names compare on the wire (and as the SQL function folds).
    lowered = name.translate(_ASCII_LOWER)
    return lowered == RESERVED_HEADER or lowered.startswith(RESERVED_HEADER_PREFIX)


def _encode_header_value(name: str, value: object) -> object:
    if isinstance(value, str):
        return check_text(f"header {name!r}", value)
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    raise InvalidMessageError(f"header {name!r} must be str or bytes, got {type(value).__name__}")


def decode_headers(stored: Mapping[str, object]) -> list[tuple[str, bytes]]:
    """Inverse of :func:`encode_headers`, as (name, bytes) pairs for a sink."""
    try:  # the usual case, every value text: one pass (a relay decodes every message's)
        return [(name, value.encode("utf-8")) for name, value in stored.items()]  # type: ignore[attr-defined]
    except AttributeError:
        pass
    pairs: list[tuple[str, bytes]] = []
    for name, value in stored.items():
        if isinstance(value, str):
            pairs.append((name, value.encode("utf-8")))
        elif isinstance(value, Mapping) and isinstance(value.get("b64"), str):
            pairs.append((name, base64.b64decode(value["b64"])))
    return pairs


def check_idempotency_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidMessageError(
            f"idempotency_key must be a str or None, got {type(value).__name__}"
        )
    if not value:
        raise InvalidMessageError("idempotency_key must not be empty")
    if len(value) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise InvalidMessageError(
            f"idempotency_key is longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters"
        )
    return check_text("idempotency_key", value)


def _check_delivery_key(value: str | None) -> str | None:
    """A published idempotency key travels as a header (webhook-id, idempotency-key)."""
    if value is not None and not _DELIVERY_KEY.fullmatch(value):
        raise InvalidMessageError(
            f"idempotency_key {value!r} must be printable ASCII with no space at either end; "
            "it travels as an HTTP header (webhook-id, idempotency-key)"
        )
    return value


def check_text(what: str, value: str) -> str:
    """Text every driver and wire format can carry, refused the same way on every driver:
    no U+0000 (PostgreSQL text and jsonb cannot hold it) and no lone surrogate (not UTF-8)."""
    if "\x00" in value:
        raise InvalidMessageError(f"{what} contains a NUL character, which PostgreSQL cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError(
            f"{what} is not valid UTF-8: lone surrogate {value[exc.start]!r} at index {exc.start}"
        ) from None
    return value


def is_storable_text(value: str) -> bool:
    try:
        check_text("text", value)
    except InvalidMessageError:
        return False
    return True


def check_schema_name(schema: object) -> str:
    """Schema names are plain identifiers; anything else is refused up front."""
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigurationError(
            f"schema must be a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*, at most 63), "
            f"got {schema!r}"
        )
    return schema
