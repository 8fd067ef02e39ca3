"""Routes as operators see them: ``outbox-relay routes list|enable|disable`` and the routes
section of ``outbox-relay status``.

A route is disabled in ``route_state`` by its endpoint (a webhook answering HTTP 410 Gone) or
by an operator, and stays disabled until ``outbox-relay routes enable``. ``no-route`` is not a
route: it names the dead letters of topics that matched no route.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from rich.table import Table

from .config import Route
from .db import schema_required
from .plan import NO_ROUTE
from .store import relay_queries
from .tables import cell, console, when

OPERATOR = "disabled by operator"


@dataclass(frozen=True, slots=True)
class RouteStatus:
    """One route's state and how many of its rows wait (``pending``) or were given up on."""

    disabled_at: dt.datetime | None = None
    reason: str | None = None
    pending: int = 0
    dead: int = 0

    @property
    def state(self) -> str:
        return "enabled" if self.disabled_at is None else "disabled"

    @property
    def notable(self) -> bool:
        """Worth a line in ``status``: disabled, or with rows pending or dead."""
        return self.disabled_at is not None or self.pending > 0 or self.dead > 0

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "disabled_at": None if self.disabled_at is None else self.disabled_at.isoformat(),
            "reason": self.reason,
            "pending": self.pending,
            "dead": self.dead,
        }


def read_routes(conn: psycopg.Connection[Any], schema: str) -> dict[str, RouteStatus]:
    """Every route with a ``route_state`` row, pending work or dead letters, by name."""
    with schema_required(schema):
        rows = conn.execute(relay_queries(schema)["status_routes"]).fetchall()
    return {
        str(name): RouteStatus(disabled_at, reason, int(pending), int(dead))
        for name, disabled_at, reason, pending, dead in rows
    }


def with_configured(
    known: Mapping[str, RouteStatus], configured: Sequence[Route]
) -> dict[str, RouteStatus]:
    """``known`` plus the configured routes the database has no rows for yet."""
    merged = dict(known)
    for route in configured:
        merged.setdefault(route.name, RouteStatus())
    return dict(sorted(merged.items()))


def check_route_name(name: str) -> str:
    """A name ``routes enable|disable`` accepts (an argparse ``type``)."""
    if not name.strip():
        raise ValueError("a route name must not be empty")
    if name == NO_ROUTE:
        raise ValueError(
            f"{NO_ROUTE!r} is not a route (it names dead letters whose topic matched no route) "
            "and cannot be enabled or disabled"
        )
    return name


def enable_route(conn: psycopg.Connection[Any], schema: str, name: str) -> bool:
    """Enable ``name``; False if it was not disabled. Relays are woken either way."""
    queries = relay_queries(schema)
    with schema_required(schema), conn.transaction():
        changed = conn.execute(queries["ops_enable_route"], {"route": name}).fetchall()
        conn.execute(queries["ops_wake_relays"])
    return bool(changed)


def disable_route(
    conn: psycopg.Connection[Any], schema: str, name: str, note: str | None = None
) -> str:
    """Disable ``name`` (known to a relay or not) and return the reason recorded."""
    reason = f"{OPERATOR}: {note.strip()}" if note and note.strip() else OPERATOR
    queries = relay_queries(schema)
    with schema_required(schema), conn.transaction():
        conn.execute(queries["ops_disable_route"], {"route": name, "reason": reason})
        conn.execute(queries["ops_wake_relays"])
    return reason


def routes_json(routes: Mapping[str, RouteStatus]) -> dict[str, dict[str, Any]]:
    return {name: status.to_json() for name, status in routes.items()}


def routes_table(
    routes: Mapping[str, RouteStatus], configured: Mapping[str, Route] | None = None
) -> Table:
    """One row per route; ``configured`` adds the sink and topic patterns of each."""
    table = Table(title="routes")
    table.add_column("route", no_wrap=True)
    if configured is not None:
        table.add_column("sink")
        table.add_column("topics")
    for name in ("state", "disabled since", "reason"):
        table.add_column(name)
    table.add_column("pending", justify="right")
    table.add_column("dead", justify="right")
    for name, status in routes.items():
        row = [cell(name)]
        if configured is not None:
            route = configured.get(name)
            row += [cell(route and route.sink), cell(route and ", ".join(route.topics))]
        style = "bold red" if status.disabled_at is not None else ""
        row += [
            cell(status.state, style),
            cell(when(status.disabled_at)),
            cell(status.reason),
            cell(status.pending),
            cell(status.dead),
        ]
        table.add_row(*row)
    return table


def print_routes(
    routes: Mapping[str, RouteStatus], configured: Sequence[Route], *, as_json: bool
) -> None:
    if as_json:
        print(json.dumps({"routes": routes_json(routes)}, indent=2))
    elif not routes:
        print("(no routes: none configured, and no route state, pending work or dead letters)")
    else:
        by_name = {route.name: route for route in configured} if configured else None
        console().print(routes_table(routes, by_name))
