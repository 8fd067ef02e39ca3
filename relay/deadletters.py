"""``outbox-relay dead-letters list|retry``.

A dead letter is one (message, route) the relay gave up on, with a full copy of the message.
Retrying it puts the message back in ``message`` with its id, idempotency key, key and bucket
(so consumers and webhook receivers see the same ``idempotency-key``/``webhook-id``):

- for a real route, only that route gets it again: the message comes back already fanned,
  with a ``route_pending`` row due now and its attempts reset;
- for ``no-route`` (its topic matched no route), the message comes back as new, and the
  relays route it with the routes they have now: add a route, then retry.

Everything happens in one transaction; see ``ops_retry_dead_letters`` in ``sql/queries.sql``.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.table import Table

from .db import schema_required
from .errors import NotFoundError
from .plan import NO_ROUTE
from .store import relay_queries
from .tables import cell, console, shorten, when


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: uuid.UUID
    route: str
    topic: str
    key: bytes | None
    attempts: int
    last_status: str | None
    reason: str
    last_error: str | None
    dead_at: dt.datetime
    created_at: dt.datetime
    idempotency_key: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "route": self.route,
            "topic": self.topic,
            "key": show_key(self.key),
            "attempts": self.attempts,
            "last_status": self.last_status,
            "reason": self.reason,
            "last_error": self.last_error,
            "dead_at": self.dead_at.isoformat(),
            "created_at": self.created_at.isoformat(),
            "idempotency_key": self.idempotency_key,
        }


@dataclass(frozen=True, slots=True)
class Page:
    """The newest dead letters matching a filter, and how many match in all."""

    letters: list[DeadLetter]
    total: int


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters to retry; every field ``None`` means all of them."""

    id: uuid.UUID | None = None
    topic: str | None = None
    route: str | None = None

    def params(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "route": self.route}


@dataclass(frozen=True, slots=True)
class Retried:
    """What a retry revived: dead letters per route, and the routes that are disabled."""

    per_route: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    disabled: dict[str, str | None] = field(default_factory=dict)

    @property
    def letters(self) -> int:
        return sum(self.per_route.values())


def show_key(key: bytes | None) -> str | None:
    r"""A message key as text: UTF-8 as is, other bytes in PostgreSQL's ``\x`` hex form."""
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError:
        return "\\x" + key.hex()


def list_dead_letters(
    conn: psycopg.Connection[Any],
    schema: str,
    *,
    topic: str | None = None,
    route: str | None = None,
    limit: int = 100,
) -> Page:
    """Newest first, at most ``limit``."""
    params = {"topic": topic, "route": route, "limit": limit}
    with schema_required(schema):
        rows = conn.execute(relay_queries(schema)["ops_list_dead_letters"], params).fetchall()
    letters = [
        DeadLetter(id_, route_, topic_, None if key is None else bytes(key), *rest)
        for id_, route_, topic_, key, *rest, _total in rows
    ]
    return Page(letters, int(rows[0][-1]) if rows else 0)


def retry_dead_letters(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> Retried:
    """Revive the selected dead letters in one transaction and wake the relays.

    Raises :class:`NotFoundError` when ``selection.id`` names no dead letter.
    """
    queries = relay_queries(schema)
    with schema_required(schema), conn.transaction():
        rows = conn.execute(queries["ops_retry_dead_letters"], selection.params()).fetchall()
        if not rows:
            if selection.id is not None:
                raise NotFoundError(_no_such_letter(selection))
            return Retried()
        per_route = {str(route): int(count) for route, count, _, _ in rows}
        disabled = conn.execute(
            queries["ops_disabled_routes_among"], {"routes": list(per_route)}
        ).fetchall()
        conn.execute(queries["ops_wake_relays"])
    return Retried(per_route, int(rows[0][2]), {str(r): why for r, why in disabled})


def _no_such_letter(selection: Selection) -> str:
    where = f" on route {selection.route}" if selection.route is not None else ""
    return f"no dead letter has id {selection.id}{where}"


def print_page(page: Page, *, as_json: bool) -> None:
    if as_json:
        print(json.dumps([letter.to_json() for letter in page.letters], indent=2))
        return
    if not page.letters:
        print("(no dead letters)")
        return
    console().print(_table(page.letters))
    if page.total > len(page.letters):
        print(f"showing {len(page.letters)} of {page.total}; use --limit")


def _table(letters: list[DeadLetter]) -> Table:
    table = Table(title="dead letters (newest first)")
    for name in ("id", "route", "topic", "key"):
        table.add_column(name, no_wrap=name == "id")
    table.add_column("attempts", justify="right")
    for name in ("last status", "reason", "last error", "dead at"):
        table.add_column(name, no_wrap=name == "dead at")
    for letter in letters:
        table.add_row(
            cell(letter.id),
            cell(letter.route),
            cell(letter.topic),
            cell(show_key(letter.key)),
            cell(letter.attempts),
            cell(letter.last_status),
            cell(letter.reason),
            cell(shorten(letter.last_error)),
            cell(when(letter.dead_at)),
        )
    return table


def print_retried(retried: Retried, configured: Collection[str] = ()) -> None:
    """The outcome on stdout; disabled or unconfigured routes as warnings on stderr.

    ``configured`` names the routes of the loaded configuration, if any: a revived letter of
    a route the relays do not serve would wait in ``route_pending`` for ever.
    """
    if not retried.letters:
        print("no dead letters to retry")
        return
    routes = ", ".join(f"{route}: {count}" for route, count in retried.per_route.items())
    print(f"retried {retried.letters} dead letter(s) as {retried.messages} message(s) ({routes})")
    for route in retried.disabled:
        _warn(
            f"route {route} is disabled; run `outbox-relay routes enable {route}` "
            "or its messages will be dead-lettered again"
        )
    for route in retried.per_route:
        if configured and route != NO_ROUTE and route not in configured:
            _warn(
                f"route {route} is not in the loaded configuration; its retried messages "
                "wait until a relay that has this route runs"
            )


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
