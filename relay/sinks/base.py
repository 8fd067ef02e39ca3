"""The sink interface: send a batch for one route, get one result per message, in order.

A sink never raises for a message it could not deliver; it says why in a :class:`Failed`
result, classified so the relay knows what to do:

- ``unavailable``: the sink could not be reached (broker down, timeout). The message is
  released without spending its retry budget, and the route pauses with backoff.
- ``retry``: this message failed for now; retry it after its backoff, counting an attempt.
- ``permanent``: it can never succeed as it is (too large, not authorized): dead-letter it.

A third sink (NATS, SQS, ...) is one new module implementing :class:`Sink`.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from ..config import Route

FailureKind = Literal["unavailable", "retry", "permanent"]


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


@dataclass(frozen=True, slots=True)
class Delivered:
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    kind: FailureKind
    reason: str
    detail: str = ""


Result = Delivered | Failed


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
