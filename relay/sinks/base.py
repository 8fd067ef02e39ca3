"""The sink interface: send a batch for one route, get one result per message, in order.

A sink never raises for a message it could not deliver; it says why in a :class:`Failed`
result, classified so the relay knows what to do:

- ``unavailable``: the sink could not be reached (broker down, timeout). The message is
  released without spending its retry budget, and the route pauses with backoff.
- ``retry``: this message failed for now; retry it after its backoff, counting an attempt.
- ``permanent``: it can never succeed as it is (too large, not authorized): dead-letter it.
- ``held``: not attempted, because an earlier message of its key failed in this batch; it
  queues behind that message (no attempt spent). Sinks that send one message at a time use
  :class:`KeyGate` to produce it, so a later message never overtakes a failed one.
- ``gone``: the endpoint said it no longer exists (HTTP 410): the message is dead-lettered
  and the route disabled until an operator enables it again.

A failure may also say how long to wait (``retry_after``, from a ``Retry-After`` header) and
whether it concerns the whole endpoint (``scope="endpoint"``: refused connections, 429) rather
than this one message; the route then pauses, so an outage spends the retry budget of the
messages in flight only, never of the queue behind them.

A third sink (NATS, SQS, ...) is one new module implementing :class:`Sink`.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ..config import Route

FailureKind = Literal["unavailable", "retry", "permanent", "held", "gone"]

# The reason of a send given up unanswered because the relay is stopping (not an outage).
SHUTDOWN = "shutdown"
FailureScope = Literal["message", "endpoint"]


@dataclass(frozen=True, slots=True)
class Outbound:
    """A message as a sink sees it."""

    seq: int
    id: uuid.UUID
    topic: str
    key: bytes | None
    payload: bytes
    content_type: str
    headers: tuple[tuple[str, bytes], ...]
    idempotency_key: str | None
    created_at: dt.datetime
    attempts: int

    @property
    def delivery_key(self) -> str:
        """The idempotency key that travels with every delivery of this message."""
        return self.idempotency_key or str(self.id)


# Outbound(...) sets each field through the frozen class's __setattr__ guard: 0.74 us a
# message; its slots' own setters, unrolled, 0.41. The relay builds every message of every
# chunk it reads, so the hot path uses this; the result is the same frozen Outbound.
_SET_OUTBOUND = tuple(getattr(Outbound, f.name).__set__ for f in fields(Outbound))
(_s0, _s1, _s2, _s3, _s4, _s5, _s6, _s7, _s8, _s9) = _SET_OUTBOUND


def new_outbound(
    seq: int,
    id_: uuid.UUID,
    topic: str,
    key: bytes | None,
    payload: bytes,
    content_type: str,
    headers: tuple[tuple[str, bytes], ...],
    idempotency_key: str | None,
    created_at: dt.datetime,
    attempts: int,
) -> Outbound:
    """``Outbound(...)``, about twice as fast."""
    message = _new(Outbound)
    _s0(message, seq)
    _s1(message, id_)
    _s2(message, topic)
    _s3(message, key)
    _s4(message, payload)
    _s5(message, content_type)
    _s6(message, headers)
    _s7(message, idempotency_key)
    _s8(message, created_at)
    _s9(message, attempts)
    return message


_new = object.__new__


@dataclass(frozen=True, slots=True)
class Delivered:
    partition: int | None = None
    offset: int | None = None
    # When the sink acknowledged (unix time), for the delivery latency metric.
    acked_at: float = field(default_factory=time.time, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Failed:
    kind: FailureKind
    reason: str  # short, also recorded as the last status: "HTTP 503", "timeout", ...
    detail: str = ""
    retry_after: float | None = None
    scope: FailureScope = "message"


Result = Delivered | Failed


class KeyGate:
    """Per-batch memory of which keys failed, for sinks that send one message at a time.

    Once a message of a key fails (other than permanently: a dead letter does not block its
    key), later messages of that key in the batch are not sent. During an outage they are
    reported unavailable like their predecessor; otherwise they are held behind it.
    """

    def __init__(self) -> None:
        self._failed: dict[tuple[str, bytes], FailureKind] = {}

    def check(self, message: Outbound) -> Failed | None:
        """A result to report instead of sending ``message``, or None to send it."""
        if message.key is None:
            return None
        kind = self._failed.get((message.topic, message.key))
        if kind is None:
            return None
        detail = "an earlier message of this key failed in this batch"
        return Failed("unavailable" if kind == "unavailable" else "held", "held", detail)

    def record(self, message: Outbound, result: Result) -> None:
        if message.key is None or not isinstance(result, Failed) or result.kind == "permanent":
            return
        self._failed.setdefault((message.topic, message.key), result.kind)


class Sink(Protocol):
    """Delivers batches for routes of one kind."""

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        """Deliver ``batch`` in order; return one result per message, same order."""
        ...

    def abort(self) -> None:
        """Give up on in-flight sends soon (shutdown); they come back as ``unavailable``."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
