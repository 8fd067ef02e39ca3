"""``outbox-relay purge --older-than DURATION``: trim the delivery log and discarded letters.

Deletes delivery records delivered before the cut-off (``now() - DURATION``, fixed when
the purge starts), a whole ``delivery_batch`` row at a time (its records share its
``delivered_at``), and dead letters discarded before it, never live dead letters; with
``--inbox-older-than``, also the consumers' inbox rows accepted before that second cut-off
(a message redelivered after its row is gone would be processed again). It works in
batches of at most ``batch_size`` rows, each its own short transaction with a lock timeout:
the relays' writes never wait behind a purge, and a batch that could not get a lock in time
is tried again after a pause instead of failing the purge.

Each table is walked once, front to back, in windows of heap blocks. One pass first counts
the rows to delete and finds the first and last heap block holding one (the :class:`Span`).
Each batch then picks the first ``batch_size`` of them in a window of ``W`` blocks and
deletes up to the last one picked, both with TID range scans that read only the window
(``ops_purge_*`` in ``sql/queries.sql``; PostgreSQL 14 or later). A full batch is followed by
one starting right after its last row; any other by one starting at the next window.
Picking rows through an index instead made the purge quadratic: through the BRIN index on
``delivered_at`` each batch re-read the blocks earlier batches had emptied (BRIN summaries
never shrink), and each batch of dead letters joined its rows with every letter still to
purge.

Why it is linear. With ``B`` blocks and ``R`` rows in the span, ``W = batch_size * B // R``
(at least 1): a window holds ``batch_size`` rows on average. Every batch reads at most ``W``
blocks twice, plus the block of each row it deletes. There are at most ``R / batch_size``
full batches, and each other batch moves a whole window on, so at most ``B / W + 1`` of
those: in all at most ``2 * (W * R / batch_size + B + W)`` block reads and ``R`` row
deletions, however the rows are spread. ``W * R / batch_size`` is at most ``B`` (or, when
one block holds more than a batch and ``W`` is 1, the number of full batches).

Batch sizes and windows count rows; the totals count records (a delivery batch row holds
up to the relay's ``batch_size`` of them).

No row moves while the walk passes: ``delivery_batch`` and ``inbox`` are append-only, and a
discarded letter is only ever rewritten as a live one (dead-lettered again), which the
batch's check of the cut-off leaves alone. Rows added meanwhile are newer than the cut-off.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import sys
import time
from collections.abc import Callable, Iterator, Mapping
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
# Each purge query (with its ``_span`` and ``_pick`` queries) and the Purged field it counts.
TABLES = {
    "ops_purge_deliveries": "deliveries",
    "ops_purge_delivery_rows": "deliveries",  # the records of schema 9 and before
    "ops_purge_discarded": "dead_letters",
    "ops_purge_inbox": "inbox",
}


@dataclass(frozen=True, slots=True)
class Purged:
    """Rows deleted (or, in a dry run, that would be) and the batches it took."""

    deliveries: int = 0
    dead_letters: int = 0
    batches: int = 0
    inbox: int = 0


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """How old a row must be to go: delivery log and discarded letters, inbox rows
    (``None``: leave those tables alone)."""

    older_than: dt.timedelta | None
    inbox_older_than: dt.timedelta | None = None

    def of(self, table: str) -> dt.timedelta | None:
        return self.inbox_older_than if table == "ops_purge_inbox" else self.older_than


@dataclass(frozen=True, slots=True)
class Span:
    """Where one table's rows to purge are: the records they hold (a delivery batch row holds
    many), how many rows, and the first and last heap block holding one (``first > last``
    when there are none)."""

    records: int
    rows: int
    first: int
    last: int

    def window(self, batch_size: int) -> int:
        """Blocks a batch may read: ``batch_size`` rows to delete on average, at least 1."""
        return max(1, batch_size * (self.last - self.first + 1) // max(self.rows, 1))


def count_purgeable(conn: psycopg.Connection[Any], schema: str, cutoffs: Cutoffs) -> Purged:
    """What ``purge`` would delete now; deletes nothing."""
    queries = relay_queries(schema)
    counts: dict[str, int] = {}
    with schema_required(schema):
        for name, cutoff in _cutoffs(conn, schema, cutoffs):
            span = _span(conn, queries[f"{name}_span"], cutoff)
            counts[TABLES[name]] = counts.get(TABLES[name], 0) + span.records
    return Purged(**counts)


def purge(
    conn: psycopg.Connection[Any],
    schema: str,
    cutoffs: Cutoffs,
    *,
    batch_size: int = 5000,
    on_batch: Callable[[Purged], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> Purged:
    """Delete, batch by batch, what is older than its cut-off; ``on_batch`` gets the
    running totals after each batch. ``conn`` must be in autocommit mode."""
    queries = relay_queries(schema)
    with schema_required(schema):
        totals = Purged()
        for name, cutoff in _cutoffs(conn, schema, cutoffs):
            span = _span(conn, queries[f"{name}_span"], cutoff)
            params = {"cutoff": cutoff, "limit": batch_size}
            for deleted in _walk(conn, queries, name, span, params, sleep):
                totals = _add(totals, name, deleted)
                log.debug("purge: batch %d deleted %d row(s) (%s)", totals.batches, deleted, name)
                if on_batch is not None:
                    on_batch(totals)
    return totals


def _cutoffs(
    conn: psycopg.Connection[Any], schema: str, cutoffs: Cutoffs
) -> Iterator[tuple[str, dt.datetime | None]]:
    """Each table to purge, with its cut-off as a time of the database's clock."""
    for name in TABLES:
        older_than = cutoffs.of(name)
        if older_than is not None:
            yield name, resolve(conn, schema, older_than)


def _span(conn: psycopg.Connection[Any], query: sql.Composed, cutoff: dt.datetime | None) -> Span:
    row = conn.execute(query, {"cutoff": cutoff}).fetchone()
    assert row is not None
    records, rows, first, last = row
    if not rows:
        return Span(int(records), 0, 0, -1)
    return Span(int(records), int(rows), int(first), int(last))


def _walk(
    conn: psycopg.Connection[Any],
    queries: Mapping[str, sql.Composed],
    name: str,
    span: Span,
    params: dict[str, Any],
    sleep: Callable[[float], None],
) -> Iterator[int]:
    """Records deleted per batch, front to back over ``span`` (see the module docstring)."""
    size = span.window(params["limit"])
    after, block = _start_of(span.first), span.first
    while block <= span.last:
        before = min(block + size, span.last + 1)
        window = params | {"after": after, "before": _start_of(before)}
        deleted, last = _batch(conn, queries, name, window, sleep)
        yield deleted
        if last is None:
            after, block = _start_of(before), before
        else:  # a full batch: its window may hold more after its last row
            after, block = last, int(last.strip("()").split(",")[0])


def _start_of(block: int) -> str:
    """The tid just before the first row of ``block`` (row offsets start at 1)."""
    return f"({block},0)"


def _add(totals: Purged, query: str, deleted: int) -> Purged:
    field = TABLES[query]
    return dataclasses.replace(
        totals, batches=totals.batches + 1, **{field: getattr(totals, field) + deleted}
    )


def _batch(
    conn: psycopg.Connection[Any],
    queries: Mapping[str, sql.Composed],
    name: str,
    params: dict[str, Any],
    sleep: Callable[[float], None],
) -> tuple[int, str | None]:
    """One batch in its own transaction; on a lock timeout, pause and try it again."""
    pause = FIRST_PAUSE
    while True:
        try:
            with conn.transaction():
                conn.execute(queries["ops_lock_timeout"], {"timeout": LOCK_TIMEOUT})
                return _pick_and_delete(conn, queries, name, params)
        except psycopg.errors.LockNotAvailable:
            log.warning(
                "purge: a batch waited %s for a lock; trying again in %.1f s", LOCK_TIMEOUT, pause
            )
            sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)


def _pick_and_delete(
    conn: psycopg.Connection[Any],
    queries: Mapping[str, sql.Composed],
    name: str,
    params: dict[str, Any],
) -> tuple[int, str | None]:
    """Records deleted, and the tid of the last row picked if the batch was full."""
    row = conn.execute(queries[f"{name}_pick"], params).fetchone()
    assert row is not None
    picked, last = int(row[0]), row[1]
    if not picked:
        return 0, None
    gone = conn.execute(queries[name], params | {"last": last}).fetchone()
    deleted = int(gone[0]) if gone else 0
    return deleted, last if picked == params["limit"] else None


def print_progress(totals: Purged) -> None:
    """A progress line on stderr every ``PROGRESS_EVERY`` batches (an ``on_batch``)."""
    if totals.batches % PROGRESS_EVERY == 0:
        print(
            f"purge: {totals.deliveries} delivery record(s), {totals.dead_letters} discarded "
            f"dead letter(s), {totals.inbox} inbox row(s) so far ({totals.batches} batches)",
            file=sys.stderr,
            flush=True,
        )


def print_purged(
    purged: Purged, older_than: str | None, inbox_older_than: str | None, *, dry_run: bool = False
) -> None:
    done = "would purge" if dry_run else "purged"
    if older_than is not None:
        print(
            f"{done} {purged.deliveries} delivery record(s) and {purged.dead_letters} discarded "
            f"dead letter(s) older than {older_than}"
        )
    if inbox_older_than is not None:
        print(f"{done} {purged.inbox} inbox row(s) older than {inbox_older_than}")
