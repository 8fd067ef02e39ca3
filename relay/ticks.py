"""Snapshot batches: what committed between two recorded snapshots, in publish order.

The ground of the log-shaped first pass (``docs/first-pass-log.md``, schema version 8). A
*tick* is a snapshot of the database with two bounds of the message sequence: ``lo`` read
before the snapshot, ``hi`` after. The *batch* between ticks A < B is every message whose
transaction B sees committed and A did not. It is read in two parts, both through indexes:

* the rows of transactions running at A, with ``seq <= A.lo`` (``message_xid_idx``): those
  A's snapshot lists, and those from its ``xmax`` up to ``A.xnext``, a transaction id taken
  after the snapshot (a snapshot does not list running transactions at or above its xmax);
* rows with ``A.lo < seq <= B.hi`` (the primary key), of transactions B sees and A did not,
  read a window of ``seq`` at a time, so no plan can read more than the window.

Every row of the first part precedes every row of the second, so a batch comes out in
``seq`` order, chunk by chunk (:meth:`Batch.read`). The argument holds because a message's
transaction takes its id before the message takes its ``seq`` (``enqueue()`` makes sure):
a transaction a tick does not list as running then has its ``seq`` above the tick's ``lo``.
No row is skipped however late its transaction commits: it is in the first batch whose end
sees it. No read waits for the oldest
transaction in the cluster, and none walks rows delivered before: the cost of a chunk is the
chunk, plus rows of transactions still running.

Rows written before schema version 8 have no ``xid``: they count as committed before every
tick, so they are in no batch. A first cursor placed before them reads them as its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString, TypeVar

import psycopg
from psycopg import sql

from outbox_lib._sqlfiles import load_queries, with_schema

_QUERIES = load_queries("relay", "sql/ticks.sql")
# Local to the transaction it runs in (Batch.read opens one for it).
_NO_SEQSCAN: LiteralString = "SELECT set_config('enable_seqscan', 'off', true)"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Tick:
    """A recorded snapshot (``snap`` in PostgreSQL's text form), its sequence bounds, and a
    transaction id above every transaction running at it (``xnext``)."""

    tick_id: int
    snap: str
    lo: int
    hi: int
    xnext: int

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Tick:
        return cls(int(row[0]), str(row[1]), int(row[2]), int(row[3]), int(row[4]))

    @property
    def had_running(self) -> bool:
        """Were transactions running at this tick (``xmin:xmax:xip,...``: any listed, or
        any begun between the snapshot and ``xnext``)? If not, no late row can follow it."""
        _xmin, xmax, xip = self.snap.split(":")
        return bool(xip) or int(xmax) < self.xnext


@dataclass(frozen=True, slots=True)
class Row:
    """A message of a batch: what a reader gets (``seq`` first, the rest as selected)."""

    seq: int
    values: tuple[Any, ...]

    @classmethod
    def from_tuple(cls, row: tuple[Any, ...]) -> Row:
        return cls(int(row[0]), tuple(row[1:]))


def _statement(name: str, schema: str) -> sql.Composed:
    return with_schema(_QUERIES[name], schema)


async def take_tick(conn: psycopg.AsyncConnection[Any], schema: str) -> Tick:
    """Record a tick. Commit right after (or use an autocommit connection): the lock that
    orders ticks is held until the transaction that took it ends, so a tick inside a longer
    transaction would hold back every other relay's ticks."""
    cur = await conn.execute(_statement("take_tick", schema))
    row = await cur.fetchone()
    assert row is not None
    return Tick.from_row(row)


async def tick(conn: psycopg.AsyncConnection[Any], schema: str, tick_id: int) -> Tick:
    cur = await conn.execute(_statement("tick", schema), {"tick_id": tick_id})
    row = await cur.fetchone()
    if row is None:
        raise LookupError(f"no tick {tick_id} in schema {schema!r}")
    return Tick.from_row(row)


@dataclass
class Batch:
    """The messages committed between ticks ``start`` and ``end``, read in ``seq`` order.

    ``after`` is the position: every message of the batch up to that ``seq`` has been read
    (0 before the first chunk). A reader that records its position after each chunk resumes
    exactly there.
    """

    start: Tick
    end: Tick
    after: int = 0
    done: bool = False
    # The seq window of the next read of the second part: grows over gaps, shrinks back.
    window: int = field(default=0, repr=False)

    async def read(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        limit: int,
        make: Callable[[tuple[Any, ...]], T] = Row.from_tuple,  # type: ignore[assignment]
    ) -> list[T]:
        """The next messages, at most ``limit``; ``done`` once the batch is exhausted. Each
        row, as selected (``seq`` first), is turned into what ``make`` returns: a
        :class:`Row` unless the caller builds its own objects straight from the tuple."""
        rows: list[tuple[Any, ...]] = []
        if self.after < self.start.lo and not self.start.had_running:
            self.after = self.start.lo  # nothing was running at the start: no late rows
        if self.after < self.start.lo:
            # The late rows are found by transaction id, never by reading the table: with
            # statistics taken while a bulk backlog was live (10,000 rows per transaction)
            # the planner costed a few ids above a scan of the whole table and chose it,
            # 12-30 ms a read after a drain (every dead row kept by a long transaction) for
            # none found. For the rest of this read's transaction, no sequential scan.
            async with conn.transaction():
                await conn.execute(_NO_SEQSCAN)
                rows = await self._part(conn, schema, "batch_late", limit, {})
            if len(rows) < limit:
                self.after = self.start.lo  # every late row is read
            elif rows:
                self.after = rows[-1][0]
        while len(rows) < limit and not self.done:
            if self.after >= self.end.hi:
                self.done = True
                break
            wanted = limit - len(rows)
            self.window = max(self.window, 4 * wanted)
            upto = min(self.after + self.window, self.end.hi)
            found = await self._part(conn, schema, "batch_rest", wanted, {"upto": upto})
            rows += found
            if len(found) == wanted:
                self.after = found[-1][0]
                self.window = 0
            else:  # the window is exhausted: skip to its end, wider next time if it was empty
                self.after = upto
                self.window = 2 * self.window if not found else 0
        return [make(r) for r in rows]

    async def _part(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        name: str,
        limit: int,
        extra: dict[str, Any],
    ) -> list[tuple[Any, ...]]:
        params = {
            "after": self.after,
            "limit": limit,
            "start_snap": self.start.snap,
            "start_lo": self.start.lo,
            "start_next": self.start.xnext,
            "end_snap": self.end.snap,
            **extra,
        }
        # batch_late is planned with its values every time (once per batch): see ticks.sql.
        # Rows come in binary: a third less time than text for a chunk of 200-byte payloads
        # (no hex for bytea, no parsing of uuids and timestamps).
        prepare = False if name == "batch_late" else None
        cur = await conn.execute(_statement(name, schema), params, prepare=prepare, binary=True)
        return await cur.fetchall()
