"""Receiving webhooks: verify the Standard Webhooks signature, then hand over an InboxMessage."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from .._errors import ConfigurationError, WebhookVerificationError
from .._signature import SecretError, parse_secrets, parse_topic_header, verify
from ._message import InboxMessage

DEFAULT_TOLERANCE_S = 300.0


class WebhookReceiver:
    """Verifies requests signed per Standard Webhooks (as the relay's webhook routes sign).

    ``secret`` is the route's ``whsec_...`` secret; while rotating, give both, space-separated
    (a request signed by either passes). ``tolerance_s`` bounds how far ``webhook-timestamp``
    may be from now, in either direction, which stops a captured request being replayed
    later::

        receiver = WebhookReceiver(os.environ["ORDERS_HOOK_SECRET"])
        message = receiver.verify(request.headers, await request.body())

    The message's ``topic`` comes from the ``outbox-topic`` header, whose own signature
    (``outbox-topic-signature``) is checked too: the inbox deduplicates per topic, so a
    replayed request with its topic changed or removed would otherwise pass as a new message.
    A request without the header is refused unless ``require_topic=False`` (for senders
    other than outbox-relay, or while relays too old to send it are upgraded); its message
    then has no topic, and the inbox accepts its key once across all topics.

    The secret is never part of an error message or the object's ``repr``.
    """

    def __init__(
        self,
        secret: str,
        *,
        tolerance_s: float = DEFAULT_TOLERANCE_S,
        require_topic: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(secret, str):
            raise ConfigurationError(f"secret must be a str, got {type(secret).__name__}")
        try:
            self._keys = parse_secrets(secret)
        except SecretError as exc:
            raise SecretError(f"webhook receiver {exc}") from None
        if tolerance_s <= 0:
            raise ConfigurationError(f"tolerance_s must be positive, got {tolerance_s!r}")
        self.tolerance_s = float(tolerance_s)
        self.require_topic = bool(require_topic)
        self._clock = clock

    def __repr__(self) -> str:
        return (
            f"WebhookReceiver(<{len(self._keys)} secret(s)>, tolerance_s={self.tolerance_s:g}, "
            f"require_topic={self.require_topic})"
        )

    def verify(self, headers: Mapping[str, str], body: bytes) -> InboxMessage:
        """The message, if ``headers`` carry a valid, fresh signature of exactly ``body``.

        ``headers`` may be any mapping (Starlette's, a ``dict``); names are matched without
        regard to case. Raises :class:`WebhookVerificationError` naming the failed check.
        """
        lowered = {name.lower(): value for name, value in headers.items()}
        webhook_id = _required(lowered, "webhook-id")
        timestamp = self._fresh_timestamp(_required(lowered, "webhook-timestamp"))
        signature = _required(lowered, "webhook-signature")
        if not verify(self._keys, webhook_id, timestamp, body, signature):
            raise WebhookVerificationError(
                f"webhook {webhook_id!r}: no signature matches the body and secret"
            )
        return InboxMessage(
            idempotency_key=webhook_id,
            payload=bytes(body),
            topic=self._topic(lowered, webhook_id, timestamp, body),
            headers=MappingProxyType({k: v.encode("utf-8") for k, v in lowered.items()}),
        )

    def _topic(
        self, headers: Mapping[str, str], webhook_id: str, timestamp: int, body: bytes
    ) -> str | None:
        value = headers.get("outbox-topic", "").strip()
        if not value:
            if self.require_topic:
                raise WebhookVerificationError(
                    f"webhook {webhook_id!r}: the outbox-topic header is missing "
                    "(require_topic=False accepts requests without it)"
                )
            return None
        signature = _required(headers, "outbox-topic-signature")
        if not verify(self._keys, webhook_id, timestamp, body, signature, topic=value):
            raise WebhookVerificationError(
                f"webhook {webhook_id!r}: no outbox-topic-signature matches the topic, body "
                "and secret"
            )
        try:
            return parse_topic_header(value)
        except ValueError as exc:
            raise WebhookVerificationError(f"webhook {webhook_id!r}: {exc}") from None

    def _fresh_timestamp(self, value: str) -> int:
        try:
            timestamp = int(value)
        except ValueError:
            raise WebhookVerificationError(
                f"webhook-timestamp must be unix seconds, got {value[:40]!r}"
            ) from None
        skew = self._clock() - timestamp
        if abs(skew) > self.tolerance_s:
            when = "in the past" if skew > 0 else "in the future"
            raise WebhookVerificationError(
                f"webhook-timestamp is {abs(skew):.0f} s {when} "
                f"(tolerance {self.tolerance_s:g} s); refusing a possible replay"
            )
        return timestamp


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name, "").strip()
    if not value:
        raise WebhookVerificationError(f"the {name} header is missing")
    return value
