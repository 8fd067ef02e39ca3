"""What the metrics cost: the gauge refresh query against a growing backlog, and the recorder.

Usage::

    python -m tests.benchmarks.gauges                      # embedded PostgreSQL
    python -m tests.benchmarks.gauges --database-url postgresql://... --backlogs 10000,1000000

For each backlog size (messages pending over ``--topics`` topics, bulk-loaded and committed;
no ``VACUUM``, no ``ANALYZE``: the refresh meets the table as the commits leave it), the
median of 5 runs of:

- ``gauge_topics``: what every relay runs every ``--metrics-refresh-seconds`` (a skip scan
  over ``message (topic, created_at)``, then one index range per topic);
- the naive query, ``SELECT topic, count(*), min(created_at) FROM message GROUP BY topic``,
  which reads the whole table;
- ``gauge_dead_letters`` and ``gauge_relays``.

Then the recorder: microseconds per delivered message spent in ``Metrics.recorded`` (counter
and latency histogram updates), the per-message cost the relay's hot path pays for metrics.
Sessions use the relay's settings (``jit=off``). Not a test: it gates nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

import outbox_lib
from relay.metrics import Metrics
from relay.plan import plan_first_pass
from relay.sinks.base import Delivered, Outbound
from relay.store import relay_queries
from tests.harness.postgres import fresh_database, running_pg_server

SCHEMA = "bench_gauges"
NAIVE = "SELECT topic, count(*), min(created_at) FROM {schema}.message GROUP BY topic"


@contextmanager
def database(url: str | None) -> Iterator[str]:
    """``url``, or a fresh database on the test harness's server (embedded by default)."""
    if url:
        yield url
        return
    with running_pg_server() as server, fresh_database(server) as fresh:
        yield fresh


def median_ms(conn: psycopg.Connection[Any], query: sql.Composable, runs: int = 5) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        conn.execute(query).fetchall()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def load(conn: psycopg.Connection[Any], total: int, topics: int) -> None:
    conn.execute(sql.SQL("TRUNCATE {}.message").format(sql.Identifier(SCHEMA)))
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.message (topic, msg_key, payload, content_type, bucket) "
            "SELECT 'topic-' || (g %% %s), ('k' || (g %% 1000))::bytea, '\\x7b7d', "
            "'application/json', g %% 256 FROM generate_series(1, %s) g"
        ).format(sql.Identifier(SCHEMA)),
        (topics, total),
    )


def recorder_us(messages: int = 2000, rounds: int = 20) -> float:
    now = dt.datetime.now(dt.UTC)
    batch = [
        Outbound(n, uuid.uuid4(), "orders", b"k", b"{}", "application/json", (), None, now, 0)
        for n in range(messages)
    ]
    verdicts = {(n, "kafka"): Delivered(0, n) for n in range(messages)}
    plan = plan_first_pass(batch, verdicts, {n: ["kafka"] for n in range(messages)})
    metrics = Metrics("bench", SCHEMA)
    metrics.add_routes({"kafka": "kafka"})
    started = time.perf_counter()
    for _ in range(rounds):
        metrics.recorded(plan)
    return (time.perf_counter() - started) / (messages * rounds) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", help="a PostgreSQL to use (default: embedded)")
    parser.add_argument("--backlogs", default="1000,100000,1000000", help="pending messages")
    parser.add_argument("--topics", type=int, default=20, help="topics the backlog spans")
    args = parser.parse_args(argv)
    backlogs = [int(b) for b in args.backlogs.split(",")]
    with database(args.database_url) as url, psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SET jit = off")
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        outbox_lib.migrate(conn, SCHEMA)
        queries = relay_queries(SCHEMA)
        naive = sql.SQL(NAIVE).format(schema=sql.Identifier(SCHEMA))
        print(f"{'pending':>10} {'gauge_topics':>13} {'naive GROUP BY':>15} "
              f"{'dead letters':>13} {'relays':>8}")  # fmt: skip
        try:
            for total in backlogs:
                load(conn, total, args.topics)
                row = [
                    median_ms(conn, queries["gauge_topics"]),
                    median_ms(conn, naive),
                    median_ms(conn, queries["gauge_dead_letters"]),
                    median_ms(conn, queries["gauge_relays"]),
                ]
                print(f"{total:>10,} " + " ".join(
                    f"{ms:>{w}.1f} ms" for ms, w in zip(row, (10, 12, 10, 5), strict=True)
                ))  # fmt: skip
        finally:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SCHEMA)))
    print(f"recorder: {recorder_us():.2f} us per delivered message (counters + histogram)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
