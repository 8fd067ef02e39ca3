"""Standard Webhooks v1 signatures: secrets, signing, and verifying ``webhook-signature``.

The relay signs with :func:`sign`; receivers verify with :func:`verify` (through
:class:`outbox_lib.inbox.WebhookReceiver`), so both sides share one definition of the scheme.

A secret is ``whsec_`` followed by base64 (the prefix is optional); a route may list several,
space-separated, while it rotates them: each signs the request, and the receiver accepts the
request if any signature matches. The signed content is ``{webhook-id}.{webhook-timestamp}.``
followed by the exact body bytes.

Signing is done here with :mod:`hmac` rather than with the ``standardwebhooks`` package: that
package signs a ``str`` body, so it cannot sign a binary payload byte for byte. The tests
verify every request with the package itself.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Sequence

from ._errors import ConfigurationError

PREFIX = "whsec_"


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


def _digest(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> bytes:
    content = b"%s.%d.%s" % (webhook_id.encode(), timestamp, body)
    return base64.b64encode(hmac.new(key, content, hashlib.sha256).digest())


def sign(keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64>`` per key, space-separated."""
    return " ".join("v1," + _digest(key, webhook_id, timestamp, body).decode() for key in keys)


def verify(
    keys: Sequence[bytes], webhook_id: str, timestamp: int, body: bytes, header: str
) -> bool:
    """True when any ``v1,`` entry of ``header`` is the signature of one of ``keys``.

    Every comparison is constant-time; other versions (``v1a,`` ...) are ignored.
    """
    offered = [
        sig.encode()
        for version, _, sig in (e.partition(",") for e in header.split())
        if version == "v1"
    ]
    expected = [_digest(key, webhook_id, timestamp, body) for key in keys]
    # No short-circuit: the time taken does not say which entry matched.
    matches = [hmac.compare_digest(o, e) for o in offered for e in expected]
    return any(matches)
