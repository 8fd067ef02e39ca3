"""Standard Webhooks v1 signatures: secrets, signing, and verifying ``webhook-signature``.

The relay signs with :func:`sign`; receivers verify with :func:`verify` (through
:class:`outbox_lib.inbox.WebhookReceiver`), so both sides share one definition of the scheme.

A secret is ``whsec_`` followed by base64 (the prefix is optional); a route may list several,
space-separated, while it rotates them: each signs the request, and the receiver accepts the
request if any signature matches. The signed content is ``{webhook-id}.{webhook-timestamp}.``
followed by the exact body bytes.

The relay adds the outbox topic (``outbox-topic``, :func:`topic_header`) and signs it in
``outbox-topic-signature``, the same scheme over ``{outbox-topic}``, a line feed, then the
content above. Deduplication is per topic, so a receiver must not take the topic from a
header anyone replaying a captured request could change.

Signing is done here with :mod:`hmac` rather than with the ``standardwebhooks`` package: that
package signs a ``str`` body, so it cannot sign a binary payload byte for byte. The tests
verify every request with the package itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import string
import urllib.parse
from collections.abc import Sequence

from ._errors import ConfigurationError

PREFIX = "whsec_"
# Visible ASCII but "%": what a topic keeps as is in the outbox-topic header.
_TOPIC_SAFE = "".join(sorted(set(string.punctuation) - {"%"}))


class SecretError(ConfigurationError):
    """A secret that is not ``whsec_`` + base64. The text never contains the secret."""


def parse_secrets(text: str) -> tuple[bytes, ...]:
    """Signing keys from a route's ``secret`` value (one or more, space-separated)."""
    parts = text.split()
    if not parts:
        raise SecretError("secret must not be empty")
    return tuple(_key(number, part) for number, part in enumerate(parts, start=1))


def _key(number: int, part: str) -> bytes:
    encoded = part.removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(
            f"secret #{number} is not valid: expected whsec_ followed by base64"
        ) from None
    if not key:
        raise SecretError(f"secret #{number} is empty after the whsec_ prefix")
    return key


def _digest(
    key: bytes, webhook_id: str, timestamp: int, body: bytes, topic: str | None = None
) -> bytes:
    content = b"%s.%d.%s" % (webhook_id.encode(), timestamp, body)
    if topic is not None:  # a topic header holds no line feed (topics hold no whitespace)
        content = topic.encode() + b"\n" + content
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())


def sign(
    keys: Sequence[bytes],
    webhook_id: str,
    timestamp: int,
    body: bytes,
    *,
    topic: str | None = None,
) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64>`` per key, space-separated.

    With ``topic`` (the ``outbox-topic`` header value), the ``outbox-topic-signature`` one.
    """
    return " ".join(
        "v1," + _digest(key, webhook_id, timestamp, body, topic).decode() for key in keys
    )


def verify(
    keys: Sequence[bytes],
    webhook_id: str,
    timestamp: int,
    body: bytes,
    header: str,
    *,
    topic: str | None = None,
) -> bool:
    """True when any ``v1,`` entry of ``header`` is the signature of one of ``keys``.

    Every comparison is constant-time; other versions (``v1a,`` ...) are ignored.
    """
    offered = [
        sig.encode()
        for version, _, sig in (e.partition(",") for e in header.split())
        if version == "v1"
    ]
    expected = [_digest(key, webhook_id, timestamp, body, topic) for key in keys]
    # No short-circuit: the time taken does not say which entry matched.
    matches = [hmac.compare_digest(o, e) for o in offered for e in expected]
    return any(matches)


def topic_header(topic: str) -> str:
    """The ``outbox-topic`` header value: the topic, with ``%`` and every character outside
    visible ASCII percent-encoded as UTF-8 (RFC 3986), so any topic fits a header and two
    topics never share a value. Most topics (``orders.created``) are sent as they are."""
    return urllib.parse.quote(topic, safe=_TOPIC_SAFE)


def parse_topic_header(value: str) -> str:
    """Inverse of :func:`topic_header`; ``ValueError`` if ``value`` is not one of its values."""
    try:
        topic = urllib.parse.unquote(value, errors="strict")
    except UnicodeDecodeError:
        topic = ""
    if not topic or topic_header(topic) != value:
        raise ValueError(f"not a percent-encoded topic: {value[:60]!r}")
    return topic
