"""``outbox-relay purge --older-than DURATION``: trim the delivery log and discarded letters.

Deletes ``delivery`` records delivered before the cut-off (``now() - DURATION``, fixed when
the purge starts) and dead letters discarded before it, never live dead letters. It works in
batches of ``batch_size`` rows, each its own short transaction with a lock timeout: the
relays' writes never wait behind a purge, and a batch that could not get a lock in time is
tried again after a pause instead of failing the purge. Rows go in the order the indexes
find them (``delivery_delivered_at_idx``, a BRIN index, and ``dead_letter_discarded_idx``);
see ``ops_purge_*`` in ``sql/queries.sql``.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .db import schema_required
from .moments import resolve
from .store import relay_queries

log = logging.getLogger(__name__)

PROGRESS_EVERY = 10  # batches between two progress lines
LOCK_TIMEOUT = "1s"
FIRST_PAUSE = 0.1  # seconds before a batch that timed out on a lock is tried again
MAX_PAUSE = 5.0


@dataclass(frozen=True, slots=True)
class Purged:
    """Rows deleted (or, in a dry run, that would be) and the batches it took."""

    deliveries: int = 0
    dead_letters: int = 0
    batches: int = 0


def count_purgeable(conn: psycopg.Connection[Any], schema: str, older_than: dt.timedelta) -> Purged:
    """What ``purge`` would delete now; deletes nothing."""
    queries = relay_queries(schema)
    with schema_required(schema):
        cutoff = resolve(conn, schema, older_than)
        row = conn.execute(queries["ops_count_purgeable"], {"cutoff": cutoff}).fetchone()
    assert row is not None
    return Purged(int(row[0]), int(row[1]))


def purge(
    conn: psycopg.Connection[Any],
    schema: str,
    older_than: dt.timedelta,
    *,
    batch_size: int = 5000,
    on_batch: Callable[[Purged], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Purged:
    """Delete, batch by batch, what is older than ``older_than``; ``on_batch`` gets the
    running totals after each batch. ``conn`` must be in autocommit mode."""
    queries = relay_queries(schema)
    with schema_required(schema):
        params = {"cutoff": resolve(conn, schema, older_than), "limit": batch_size}
        totals = Purged()
        for name in ("ops_purge_deliveries", "ops_purge_discarded"):
            deleted = batch_size
            while deleted == batch_size:
                deleted = _batch(conn, queries["ops_lock_timeout"], queries[name], params, sleep)
                totals = _add(totals, name, deleted)
                log.debug("purge: batch %d deleted %d row(s) (%s)", totals.batches, deleted, name)
                if on_batch is not None:
                    on_batch(totals)
    return totals


def _add(totals: Purged, query: str, deleted: int) -> Purged:
    if query == "ops_purge_deliveries":
        return Purged(totals.deliveries + deleted, totals.dead_letters, totals.batches + 1)
    return Purged(totals.deliveries, totals.dead_letters + deleted, totals.batches + 1)


def _batch(
    conn: psycopg.Connection[Any],
    lock_timeout: sql.Composed,
    query: sql.Composed,
    params: dict[str, Any],
    sleep: Callable[[float], None],
) -> int:
    """One batch in its own transaction; on a lock timeout, pause and try it again."""
    pause = FIRST_PAUSE
    while True:
        try:
            with conn.transaction():
                conn.execute(lock_timeout, {"timeout": LOCK_TIMEOUT})
                return conn.execute(query, params).rowcount
        except psycopg.errors.LockNotAvailable:
            log.warning(
                "purge: a batch waited %s for a lock; trying again in %.1f s", LOCK_TIMEOUT, pause
            )
            sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)


def print_progress(totals: Purged) -> None:
    """A progress line on stderr every ``PROGRESS_EVERY`` batches (an ``on_batch``)."""
    if totals.batches % PROGRESS_EVERY == 0:
        print(
            f"purge: {totals.deliveries} delivery record(s), {totals.dead_letters} discarded "
            f"dead letter(s) so far ({totals.batches} batches)",
            file=sys.stderr,
            flush=True,
        )


def print_purged(purged: Purged, older_than: str, *, dry_run: bool = False) -> None:
    done = "would purge" if dry_run else "purged"
    print(
        f"{done} {purged.deliveries} delivery record(s) and {purged.dead_letters} discarded "
        f"dead letter(s) older than {older_than}"
    )
