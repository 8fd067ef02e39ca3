"""Points in time given to operator commands: a duration ago (``15m``, ``7d``) or an ISO-8601
time (``2026-11-20T12:00:00Z``; without an offset, the local time of the machine running
the command).

A duration is turned into a time by the database (``now() - duration``), not by the local
clock: every time it is compared with was stamped by the database.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg

from .durations import parse_duration
from .store import relay_queries

When = dt.timedelta | dt.datetime
"""A duration ago, or a point in time."""


def parse_positive_duration(text: str) -> dt.timedelta:
    """A duration of more than zero. Raises ``ValueError`` with the reason."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} is not a duration of more than zero (examples: 15m, 7d)")
    return dt.timedelta(seconds=seconds)


def parse_when(text: str) -> When:
    """``15m`` (that long ago) or an ISO-8601 time. Raises ``ValueError`` with the reason."""
    try:
        return dt.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (15m, 7d) nor an ISO-8601 time (2026-11-20T12:00:00Z)"
        ) from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def local_time(when: When, now: dt.datetime | None = None) -> dt.datetime:
    """``when`` on the local clock: for checks made before any connection (e.g. that a
    window's start is not after its end)."""
    if isinstance(when, dt.datetime):
        return when
    return (now or dt.datetime.now(dt.UTC)) - when


def resolve(conn: psycopg.Connection[Any], schema: str, when: When | None) -> dt.datetime | None:
    """``when`` as a time of the database's clock; ``None`` stays ``None``."""
    if when is None or isinstance(when, dt.datetime):
        return when
    row = conn.execute(relay_queries(schema)["ops_time_ago"], {"ago": when}).fetchone()
    assert row is not None
    moment: dt.datetime = row[0]
    return moment
