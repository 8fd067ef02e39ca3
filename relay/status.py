"""``outbox-relay status``: per topic, what is pending, dead-lettered and how old; the routes
the database knows of (disabled ones, pending and dead rows per route); and the live relays
with the key buckets each holds."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

import psycopg
from rich.table import Table

from .db import schema_required
from .routestate import RouteStatus, read_routes, routes_json, routes_table
from .store import relay_queries
from .tables import cell, console


@dataclass(frozen=True, slots=True)
class TopicStatus:
    pending: int = 0
    dead: int = 0
    oldest_pending_age_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class RelayStatus:
    id: str
    host: str
    pid: int
    started_at: dt.datetime
    last_heartbeat: dt.datetime
    heartbeat_age_seconds: float
    buckets: tuple[int, ...]
    handing_over: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    topics: dict[str, TopicStatus]
    relays: list[RelayStatus] = field(default_factory=list)
    unowned_buckets: int = 0
    routes: dict[str, RouteStatus] = field(default_factory=dict)


def read_status(conn: psycopg.Connection[Any], schema: str) -> Report:
    queries = relay_queries(schema)

    def run(name: str) -> list[tuple[Any, ...]]:
        return conn.execute(queries[name]).fetchall()

    # The same queries as the relays' gauges (relay.health): status and metrics agree.
    with schema_required(schema):
        pending, dead = run("gauge_topics"), run("gauge_dead_letters")
        relays, ((_, unowned),) = run("status_relays"), run("gauge_relays")
    routes = read_routes(conn, schema)
    topics: dict[str, TopicStatus] = {}
    for topic, count, age in pending:
        topics[topic] = TopicStatus(int(count), 0, float(age) if age is not None else None)
    for topic, _route, count in dead:
        current = topics.get(topic, TopicStatus())
        topics[topic] = TopicStatus(
            current.pending, current.dead + int(count), current.oldest_pending_age_seconds
        )
    return Report(
        dict(sorted(topics.items())),
        [
            RelayStatus(rid, host, int(pid), started, beat, float(age), tuple(held), tuple(drain))
            for rid, host, pid, started, beat, age, held, drain in relays
        ],
        int(unowned),
        routes,
    )


def to_json(report: Report) -> str:
    return json.dumps(
        {
            "topics": {
                topic: {
                    "pending": s.pending,
                    "dead": s.dead,
                    "oldest_pending_age_seconds": s.oldest_pending_age_seconds,
                }
                for topic, s in report.topics.items()
            },
            "routes": routes_json(report.routes),
            "relays": [
                {
                    "id": r.id,
                    "host": r.host,
                    "pid": r.pid,
                    "buckets": list(r.buckets),
                    "last_heartbeat": r.last_heartbeat.isoformat(),
                    "heartbeat_age_seconds": round(r.heartbeat_age_seconds, 3),
                    "started_at": r.started_at.isoformat(),
                    "handing_over": list(r.handing_over),
                }
                for r in report.relays
            ],
            "unowned_buckets": report.unowned_buckets,
        },
        indent=2,
    )


def ranges(buckets: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5, 7, 8)`` -> ``"0-2,5,7-8"``."""
    parts: list[str] = []
    start = prev = None
    for b in (*buckets, None):
        if b is not None and prev is not None and b == prev + 1:
            prev = b
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = b
    return ",".join(parts) or "-"


def print_status(report: Report, *, as_json: bool) -> None:
    if as_json:
        print(to_json(report))
        return
    out = console()
    table = Table(title="outbox status")
    table.add_column("topic")
    table.add_column("pending", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("oldest pending", justify="right")
    for topic, s in report.topics.items():
        age = (
            "-" if s.oldest_pending_age_seconds is None else f"{s.oldest_pending_age_seconds:.1f}s"
        )
        table.add_row(cell(topic), str(s.pending), str(s.dead), age)
    if not report.topics:
        table.add_row("(no messages)", "0", "0", "-")
    out.print(table)
    notable = {name: route for name, route in report.routes.items() if route.notable}
    if notable:
        out.print(routes_table(notable))
    relays = Table(title="relays")
    relays.add_column("relay")
    relays.add_column("host")
    relays.add_column("pid", justify="right")
    relays.add_column("buckets", justify="right")
    relays.add_column("held")
    relays.add_column("last heartbeat", justify="right")
    for r in report.relays:
        held = ranges(r.buckets)
        if r.handing_over:
            held += f" (handing over {ranges(r.handing_over)})"
        relays.add_row(
            cell(r.id),
            cell(r.host),
            str(r.pid),
            str(len(r.buckets)),
            held,
            f"{r.heartbeat_age_seconds:.1f}s ago",
        )
    if not report.relays:
        relays.add_row("(no live relay)", "-", "-", "0", "-", "-")
    out.print(relays)
    if report.unowned_buckets:
        out.print(f"{report.unowned_buckets} key bucket(s) have no live holder")
