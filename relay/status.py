"""``outbox-relay status``: per topic, what is pending, dead-lettered and how old."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from outbox_lib import SchemaNotMigratedError
from outbox_lib._sqlfiles import load_queries, with_schema


@dataclass(frozen=True, slots=True)
class TopicStatus:
    pending: int = 0
    dead: int = 0
    oldest_pending_age_seconds: float | None = None


def read_status(conn: psycopg.Connection[Any], schema: str) -> dict[str, TopicStatus]:
    queries = load_queries("relay", "sql/queries.sql")
    try:
        pending = conn.execute(with_schema(queries["status_pending"], schema)).fetchall()
        dead = conn.execute(with_schema(queries["status_dead"], schema)).fetchall()
    except psycopg.errors.UndefinedTable as exc:
        raise SchemaNotMigratedError(
            f"schema {schema!r} has no outbox tables; run `outbox-relay migrate` first"
        ) from exc
    topics: dict[str, TopicStatus] = {}
    for topic, count, age in pending:
        topics[topic] = TopicStatus(int(count), 0, float(age) if age is not None else None)
    for topic, count in dead:
        current = topics.get(topic, TopicStatus())
        topics[topic] = TopicStatus(current.pending, int(count), current.oldest_pending_age_seconds)
    return dict(sorted(topics.items()))


def to_json(report: dict[str, TopicStatus]) -> str:
    return json.dumps(
        {
            "topics": {
                topic: {
                    "pending": s.pending,
                    "dead": s.dead,
                    "oldest_pending_age_seconds": s.oldest_pending_age_seconds,
                }
                for topic, s in report.items()
            }
        },
        indent=2,
    )


def print_status(report: dict[str, TopicStatus], *, as_json: bool) -> None:
    if as_json:
        print(to_json(report))
        return
    table = Table(title="outbox status")
    table.add_column("topic")
    table.add_column("pending", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("oldest pending", justify="right")
    for topic, s in report.items():
        age = (
            "-" if s.oldest_pending_age_seconds is None else f"{s.oldest_pending_age_seconds:.1f}s"
        )
        table.add_row(topic, str(s.pending), str(s.dead), age)
    if not report:
        table.add_row("(no messages)", "0", "0", "-")
    Console().print(table)
