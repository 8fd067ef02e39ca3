"""``outbox-relay replay``: deliver again, to one route, messages it already delivered.

The ``delivery`` log keeps a full copy of every message a route acknowledged. Replaying puts
the chosen ones back in ``message`` with their id, idempotency key and key, already fanned,
with a ``route_pending`` row for that route only, due now, in the order they were first
delivered: Kafka consumers see the same ``idempotency-key`` and ``outbox-message-id``,
webhook receivers the same ``webhook-id``, and other routes get nothing. A chosen message
that already waits for that route (replayed or retried, not yet delivered) is skipped, so a
replay run twice queues each message once. The idempotency table is not touched. See
``ops_replay_deliveries`` in ``sql/queries.sql``.

Example::

    outbox-relay replay --topic orders.created --route billing-hook --since 2h
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import psycopg

from .db import schema_required
from .deadletters import warn, warn_unconfigured
from .moments import When, resolve
from .store import relay_queries


@dataclass(frozen=True, slots=True)
class Replay:
    """Which deliveries of ``route`` to replay: of ``topic``, delivered at or after
    ``since`` and before ``until``, of one ``key``; the first ``limit`` in delivery order."""

    topic: str
    route: str
    since: When | None = None
    until: When | None = None
    key: bytes | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Replayed:
    """How many messages were (or, in a dry run, would be) replayed; why the route is
    disabled, if it is; how many of those chosen were skipped, already queued for it."""

    messages: int
    disabled: str | None = None
    skipped: int = 0


def parse_key(text: str) -> bytes:
    r"""A key as ``dead-letters list`` shows it: UTF-8 text, or ``\x`` and hex digits."""
    if text.startswith("\\x"):
        try:
            return bytes.fromhex(text[2:])
        except ValueError:
            pass
    return text.encode("utf-8")


def replay(
    conn: psycopg.Connection[Any], schema: str, request: Replay, *, dry_run: bool = False
) -> Replayed:
    """Queue the chosen deliveries again in one transaction, but for those already queued
    for the route, and wake the relays (a dry run counts them and changes nothing)."""
    queries = relay_queries(schema)
    with schema_required(schema), conn.transaction():
        params = {
            "topic": request.topic,
            "route": request.route,
            "since": resolve(conn, schema, request.since),
            "until": resolve(conn, schema, request.until),
            "key": request.key,
            "limit": request.limit,
            "dry_run": dry_run,
        }
        row = conn.execute(queries["ops_replay_deliveries"], params).fetchone()
        assert row is not None
        fresh, queued, skipped = (int(n) for n in row)
        disabled = conn.execute(
            queries["ops_disabled_routes_among"], {"routes": [request.route]}
        ).fetchall()
        if queued:
            conn.execute(queries["ops_wake_relays"])
    return Replayed(fresh, (disabled[0][1] or "disabled") if disabled else None, skipped)


def print_replayed(
    request: Replay, replayed: Replayed, configured: Collection[str] = (), *, dry_run: bool = False
) -> None:
    """The outcome on stdout; a disabled or unconfigured route as a warning on stderr."""
    done = "would replay" if dry_run else "replayed"
    skipped = f" ({replayed.skipped} already queued, skipped)" if replayed.skipped else ""
    print(
        f"{done} {replayed.messages} message(s) of topic {request.topic} to route "
        f"{request.route}{skipped}"
    )
    if not replayed.messages:
        return
    if replayed.disabled is not None:
        warn(
            f"route {request.route} is disabled ({replayed.disabled}); run `outbox-relay "
            f"routes enable {request.route}` or its messages will be dead-lettered"
        )
    warn_unconfigured(request.route, configured, "replayed")
