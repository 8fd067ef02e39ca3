"""``outbox-relay dead-letters list|retry|discard``.

A dead letter is one (message, route) the relay gave up on, with a full copy of the message.
Discarding it keeps the row for audit (until ``purge``) but takes it out of every count, list
and retry; only live (not discarded) letters are retried or discarded. Retrying it puts the
message back in ``message`` with its id, idempotency key, key and bucket (so consumers and
webhook receivers see the same ``idempotency-key``/``webhook-id``):

- for a real route, only that route gets it again: the message comes back already fanned,
  with a ``route_pending`` row due now and its attempts reset;
- for ``no-route`` (its topic matched no route), the message comes back as new, and the
  relays route it with the routes they have now: add a route, then retry.

Everything happens in one transaction; see ``ops_retry_dead_letters`` in ``sql/queries.sql``.
A dry run (``preview``) counts what a retry or discard would take and changes nothing; a
discard confirmed after such a count takes exactly the letters counted, or none if they
changed in between.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import psycopg
from rich.table import Table

from .db import schema_required
from .errors import NotFoundError, RelayError
from .moments import When, resolve
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
    discarded_at: dt.datetime | None = None
    discarded_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The contract's fields; a discarded letter adds ``discarded_at`` and
        ``discarded_reason``."""
        document = {
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
        if self.discarded_at is not None:
            document["discarded_at"] = self.discarded_at.isoformat()
            document["discarded_reason"] = self.discarded_reason
        return document


@dataclass(frozen=True, slots=True)
class Page:
    """The newest dead letters matching a filter, and how many match in all."""

    letters: list[DeadLetter]
    total: int


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters; every field ``None`` means all of them.

    ``since``: dead-lettered at or after that time (or within that long ago). ``upto``:
    dead-lettered at or before that time, and ``checksum``: which letters were counted (both
    set by :func:`preview`, for a confirmed discard).
    """

    id: uuid.UUID | None = None
    topic: str | None = None
    route: str | None = None
    since: When | None = None
    upto: dt.datetime | None = None
    checksum: int | None = None

    def params(self, conn: psycopg.Connection[Any], schema: str) -> dict[str, Any]:
        """Query parameters, with ``since`` on the database's clock."""
        since = resolve(conn, schema, self.since)
        return {
            "id": self.id, "topic": self.topic, "route": self.route,
            "since": since, "upto": self.upto, "checksum": self.checksum,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Retried:
    """What a retry revived (or a preview counted): dead letters per route, how many
    messages they are, and which of their routes are disabled."""

    per_route: dict[str, int] = field(default_factory=dict)
    messages: int = 0
    disabled: dict[str, str | None] = field(default_factory=dict)

    @property
    def letters(self) -> int:
        return sum(self.per_route.values())


@dataclass(frozen=True, slots=True)
class Preview:
    """What a retry or discard of ``selection`` would take, counted at one moment.

    ``selection`` is the one counted: its ``since`` fixed, ``upto`` the newest counted
    letter's ``dead_at`` and ``checksum`` which letters were counted. Discarding it after a
    confirmation takes exactly the letters counted, or none if they changed in between
    (:func:`discard_dead_letters`).
    """

    selection: Selection
    counted: Retried


@dataclass(frozen=True, slots=True)
class Discarded:
    """Dead letters discarded, per route."""

    per_route: dict[str, int] = field(default_factory=dict)

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
    selection: Selection | None = None,
    *,
    limit: int = 100,
    discarded: bool = False,
) -> Page:
    """Live letters (or the ``discarded`` ones) of ``selection``, newest first, at most
    ``limit``."""
    with schema_required(schema):
        params = (selection or Selection()).params(conn, schema)
        params |= {"limit": limit, "discarded": discarded}
        rows = conn.execute(relay_queries(schema)["ops_list_dead_letters"], params).fetchall()
    letters = [
        DeadLetter(id_, route_, topic_, None if key is None else bytes(key), *rest)
        for id_, route_, topic_, key, *rest, _total in rows
    ]
    return Page(letters, int(rows[0][-1]) if rows else 0)


def preview(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> Preview:
    """Count what retrying or discarding ``selection`` would take; change nothing.

    Raises :class:`NotFoundError` when ``selection.id`` names no live dead letter.
    """
    queries = relay_queries(schema)
    with schema_required(schema):
        params = selection.params(conn, schema)
        rows = conn.execute(queries["ops_count_dead_letters"], params).fetchall()
        if not rows:
            _check_found(selection)
            return Preview(replace(selection, since=params["since"]), Retried())
        per_route = {str(route): int(count) for route, count, *_ in rows}
        disabled = _disabled_among(conn, schema, per_route)
    _, _, messages, newest, checksum = rows[0]
    counted = Retried(per_route, int(messages), disabled)
    fixed = replace(selection, since=params["since"], upto=newest, checksum=int(checksum))
    return Preview(fixed, counted)


def retry_dead_letters(conn: psycopg.Connection[Any], schema: str, selection: Selection) -> Retried:
    """Revive the selected live dead letters in one transaction and wake the relays.

    Raises :class:`NotFoundError` when ``selection.id`` names no live dead letter.
    """
    queries = relay_queries(schema)
    with schema_required(schema), conn.transaction():
        params = selection.params(conn, schema)
        rows = conn.execute(queries["ops_retry_dead_letters"], params).fetchall()
        if not rows:
            _check_found(selection)
            return Retried()
        per_route = {str(route): int(count) for route, count, _, _ in rows}
        disabled = _disabled_among(conn, schema, per_route)
        conn.execute(queries["ops_wake_relays"])
    return Retried(per_route, int(rows[0][2]), disabled)


def discard_dead_letters(
    conn: psycopg.Connection[Any], schema: str, selection: Selection, reason: str | None = None
) -> Discarded:
    """Mark the selected live dead letters discarded (now, with ``reason``). A selection
    counted by :func:`preview` takes exactly the letters counted, or none.

    Raises :class:`NotFoundError` when ``selection.id`` names no live dead letter, and
    :class:`RelayError` when the counted letters changed before the discard.
    """
    note = reason.strip() if reason and reason.strip() else None
    with schema_required(schema):
        params = selection.params(conn, schema) | {"reason": note}
        query = relay_queries(schema)["ops_discard_dead_letters"]
        rows = conn.execute(query, params).fetchall()
    if selection.checksum is not None and int(rows[0][1]) != selection.checksum:
        raise RelayError(
            f"the dead letters changed after they were counted ({rows[0][0]} match now): "
            "nothing discarded; run the command again"
        )
    discarded = {str(route): int(count) for _, _, route, count in rows if route is not None}
    if not discarded:
        _check_found(selection)
    return Discarded(discarded)


def _disabled_among(
    conn: psycopg.Connection[Any], schema: str, routes: Collection[str]
) -> dict[str, str | None]:
    query = relay_queries(schema)["ops_disabled_routes_among"]
    rows = conn.execute(query, {"routes": list(routes)}).fetchall()
    return {str(route): why for route, why in rows}


def _check_found(selection: Selection) -> None:
    if selection.id is not None:
        where = f" on route {selection.route}" if selection.route is not None else ""
        raise NotFoundError(f"no dead letter has id {selection.id}{where}")


def print_page(page: Page, *, as_json: bool, discarded: bool = False) -> None:
    if as_json:
        print(json.dumps([letter.to_json() for letter in page.letters], indent=2))
        return
    if not page.letters:
        print("(no discarded dead letters)" if discarded else "(no dead letters)")
        return
    console().print(_table(page.letters, discarded=discarded))
    if page.total > len(page.letters):
        print(f"showing {len(page.letters)} of {page.total}; use --limit")


def _table(letters: list[DeadLetter], *, discarded: bool = False) -> Table:
    title = "discarded dead letters" if discarded else "dead letters"
    table = Table(title=f"{title} (newest first)")
    for name in ("id", "route", "topic", "key"):
        table.add_column(name, no_wrap=name == "id")
    table.add_column("attempts", justify="right")
    for name in ("last status", "reason", "last error", "dead at"):
        table.add_column(name, no_wrap=name == "dead at")
    if discarded:
        table.add_column("discarded at", no_wrap=True)
        table.add_column("why discarded")
    for letter in letters:
        row = [
            cell(letter.id),
            cell(letter.route),
            cell(letter.topic),
            cell(show_key(letter.key)),
            cell(letter.attempts),
            cell(letter.last_status),
            cell(letter.reason),
            cell(shorten(letter.last_error)),
            cell(when(letter.dead_at)),
        ]
        if discarded:
            row += [cell(when(letter.discarded_at)), cell(shorten(letter.discarded_reason))]
        table.add_row(*row)
    return table


def print_retried(
    retried: Retried, configured: Collection[str] = (), *, dry_run: bool = False
) -> None:
    """The outcome on stdout; disabled or unconfigured routes as warnings on stderr.

    ``configured`` names the routes of the loaded configuration, if any: a revived letter of
    a route the relays do not serve would wait in ``route_pending`` for ever.
    """
    if not retried.letters:
        print("no dead letters to retry")
        return
    done = "would retry" if dry_run else "retried"
    print(
        f"{done} {retried.letters} dead letter(s) as {retried.messages} message(s) "
        f"({_per_route(retried.per_route)})"
    )
    for route in retried.disabled:
        warn(
            f"route {route} is disabled; run `outbox-relay routes enable {route}` "
            "or its messages will be dead-lettered again"
        )
    for route in retried.per_route:
        if route != NO_ROUTE:
            warn_unconfigured(route, configured, "retried")


def print_discarded(discarded: Discarded, *, dry_run: bool = False) -> None:
    if not discarded.letters:
        print("no dead letters to discard")
        return
    done = "would discard" if dry_run else "discarded"
    print(f"{done} {discarded.letters} dead letter(s) ({_per_route(discarded.per_route)})")


def _per_route(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{route}: {count}" for route, count in counts.items())


def warn_unconfigured(route: str, configured: Collection[str], what: str) -> None:
    """Warn when a configuration is loaded and ``route`` is not in it: the messages would
    wait in ``route_pending`` until a relay that has the route runs."""
    if configured and route not in configured:
        warn(
            f"route {route} is not in the loaded configuration; its {what} messages "
            "wait until a relay that has this route runs"
        )


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)
