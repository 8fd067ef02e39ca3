"""The relay's narrow connector to PostgreSQL: read, claim, record, listen.

Every method is one short transaction; nothing is held open while a sink works. The pool's
connections are in autocommit mode: a method of several statements opens a transaction. SQL comes
from ``sql/queries.sql`` (and ``sql/ticks.sql`` for the first pass's batches).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay

from outbox_lib._encoding import decode_headers
from outbox_lib._sqlfiles import load_queries, with_schema

from . import __version__, pgarrays
from .backoff import Backoff
from .errors import RelayError, SchemaTooNewError
from .plan import RecordPlan, Rows
from .sinks.base import Outbound, new_outbound
from .ticks import Batch, Tick, take_tick, tick
from .tracing import Spans

log = logging.getLogger(__name__)

# What a lost or unreachable database raises; callers back off and try again.
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
RECORD_BACKOFF = Backoff(initial=0.2, maximum=5.0)

Key = tuple[str, str, bytes]
T = TypeVar("T")

# The first-pass format this relay speaks (relay_format() in migration 0007; 2 from 0009, the
# log first pass; 3 from 0010, the delivery log written a batch at a time). A schema that
# serves a higher one was migrated for newer relays: this one must not read from it.
RELAY_FORMAT = 3


def check_format(schema: str, served: int) -> None:
    """Refuse a schema migrated for relays of a newer first-pass format."""
    if served > RELAY_FORMAT:
        raise SchemaTooNewError(
            f"schema {schema!r} was migrated for a newer outbox-relay (first-pass format "
            f"{served}; this relay {__version__} speaks {RELAY_FORMAT}): upgrade the relay "
            "(docs/operations.md, Upgrading)"
        )


@dataclass(frozen=True, slots=True)
class Gauges:
    """What the database says, for the metrics (see :mod:`relay.health`)."""

    topics: list[tuple[str, int, float | None]]
    dead_letters: list[tuple[str, str, int]]
    relays_live: int
    unowned_buckets: int


class FirstPassLost(Exception):
    """The first pass's cursor moved under this relay (another relay holds bucket 0 now, or
    this one's lease lapsed): nothing of the chunk was recorded."""


class FirstPassStale(FirstPassLost):
    """A chunk read while the record before it was in flight, and that record failed: the
    cursor is read again from the database, and the chunk with it; it is never recorded."""


@dataclass(frozen=True, slots=True)
class Position:
    """A row of ``first_pass``: the batch between two ticks, read up to ``after``."""

    position_id: int
    start: int
    end: int | None
    after: int


@dataclass(frozen=True, slots=True)
class FirstPassChunk:
    """Messages read from the first pass, and the position recording them moves the cursor
    to (``end`` None: the batch is done). ``resets`` is the store's reset count when it was
    read: a chunk read before a reset (a failed record) is stale and never recorded."""

    messages: list[Outbound]
    start: int
    end: int | None
    after: int
    resets: int = 0

    @property
    def moves(self) -> bool:
        """Recording it moves the cursor (empty chunks of an open batch do not)."""
        return bool(self.messages) or self.end is None


# jit=off: JIT compiles the claim query on every call (its LIMIT + subplan cost estimate
#   crosses jit_above_cost) and that costs more than running it.
# max_parallel_workers_per_gather=0: every statement of the relay reads a chunk or less,
#   which no parallel plan speeds up; but statistics taken while a bulk backlog was live
#   (10,000 rows per transaction id) made the planner pick a parallel bitmap scan for the
#   late-rows read after the drain, and starting its workers cost 8-20 ms a read for 0.06 ms
#   of work: commit-to-broker p50 of 40-60 ms instead of 10 in half the latency runs.
# synchronous_commit=off: losing the last recorded acknowledgements in a server crash only
#   means those messages are delivered again, which at-least-once allows; the application's
#   own publish transactions keep their durability settings.
# idle_in_transaction_session_timeout: no transaction of the relay stays open while a sink
#   works; should the relay freeze inside one anyway, the server ends the session rather
#   than let it hold locks forever.
def _session_options(hold_seconds: float) -> str:
    idle_ms = int((hold_seconds + 30.0) * 1000)
    return (
        "-c jit=off -c max_parallel_workers_per_gather=0 -c synchronous_commit=off"
        f" -c idle_in_transaction_session_timeout={idle_ms}"
    )


@functools.cache
def relay_queries(schema: str) -> Mapping[str, sql.Composed]:
    """Every statement of ``sql/queries.sql``, with ``schema`` substituted (built once)."""
    return MappingProxyType(
        {
            name: with_schema(text, schema)
            for name, text in load_queries("relay", "sql/queries.sql").items()
        }
    )


def _message(
    seq: int,
    id_: Any,
    topic: str,
    key: bytes | None,
    payload: bytes,
    ctype: str,
    headers: dict[str, Any],
    idem: str | None,
    created: dt.datetime,
    attempts: int,
) -> Outbound:
    return new_outbound(
        seq,
        id_,
        topic,
        bytes(key) if key is not None else None,
        bytes(payload),
        ctype,
        tuple(decode_headers(headers)) if headers else (),
        idem,
        created,
        attempts,
    )


def _outbound(row: Sequence[Any]) -> Outbound:
    """A retry row: the message's columns, its attempts so far, and its route."""
    seq, id_, topic, key, payload, ctype, headers, idem, created, attempts, _route = row
    return _message(seq, id_, topic, key, payload, ctype, headers, idem, created, attempts)


def _first_pass_message(row: tuple[Any, ...]) -> Outbound:
    """A first-pass row (``relay.ticks``, as selected): never attempted, for no route yet.
    Built straight from the fetched tuple: this runs once per message of every chunk."""
    seq, id_, topic, key, payload, ctype, headers, idem, created = row
    return _message(seq, id_, topic, key, payload, ctype, headers, idem, created, 0)


# The element type of each column array a record statement unnests (pgarrays: binary,
# packed in one go). Columns not named here (the retry delay, an interval) go as plain lists.
_ARRAY_OF: dict[str, type[list[Any]]] = {
    "seq": pgarrays.BigintArray,
    "offset": pgarrays.BigintArray,
    "attempts": pgarrays.IntArray,
    "partition": pgarrays.IntArray,
    "route": pgarrays.TextArray,
    "topic": pgarrays.TextArray,
    "reason": pgarrays.TextArray,
    "error": pgarrays.TextArray,
    "status": pgarrays.TextArray,
    "key": pgarrays.ByteaArray,
}


def _typed(name: str, values: list[Any]) -> list[Any]:
    array = _ARRAY_OF.get(name)
    return array(values) if array is not None else values


def _columns(rows: Rows) -> dict[str, list[Any]]:
    return {name: _typed(name, values) for name, values in rows.columns.items()}


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Headers arrive as jsonb on every claimed row: orjson decodes them several times faster.
    set_json_loads(orjson.loads, conn)
    pgarrays.register(conn)


async def _moved_to(moving: psycopg.AsyncCursor[Any]) -> int:
    """The new position's id, from :meth:`Store._move`'s cursor once its results are in."""
    row = await moving.fetchone()
    if row is None:
        raise FirstPassLost("the first-pass cursor moved under this relay (bucket 0 changed hands)")
    return int(row[0])


class Store:
    """Claims and records work for one relay process."""

    def __init__(self, pool: AsyncConnectionPool[Any], schema: str, relay_id: str) -> None:
        self._pool = pool
        self._q = relay_queries(schema)
        self.schema = schema
        self.relay_id = relay_id
        self.spans = Spans()
        # Told of every claim: (pass, rows claimed, seconds); the engine feeds the metrics.
        self.on_claim: Callable[[str, int, float], None] = lambda _pass, _rows, _seconds: None
        # The first pass while this relay reads it: the cursor as last recorded (or loaded),
        # and where the next read goes on from: a tick and the batch opened after it (None
        # until the next read takes the tick that ends it). Reads run ahead of records: the
        # chunk after the one being recorded is read (and sent) meanwhile, so the two differ.
        self._position: Position | None = None
        self._reading: tuple[Tick, Batch | None] | None = None
        self._resets = 0

    @classmethod
    def create(
        cls,
        conninfo: str,
        schema: str,
        relay_id: str,
        hold_seconds: float = 5.0,
        lanes: int = 0,
    ) -> Store:
        """A pool of 6 connections, plus 2 per lane (one claims while the other records).

        The first pass uses up to four at once: a record, the next chunk's read, the
        route_pending probe beside it, and the blocked-keys check of the chunk being sent."""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=6 + 2 * lanes,
            open=False,
            kwargs={
                # Every statement is its own transaction, without a BEGIN and a COMMIT
                # round trip each; what must be one transaction says so (conn.transaction()).
                "autocommit": True,
                "application_name": f"outbox-relay {relay_id}"[:63],
                "options": _session_options(hold_seconds),
            },
            configure=_configure,
            # A checkout waits at most this long; the engine backs off and retries.
            timeout=10.0,
        )
        return cls(pool, schema, relay_id)

    async def open(self, timeout: float = 30.0) -> None:
        await self._pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        await self._pool.close()

    def statement(self, name: str) -> sql.Composed:
        return self._q[name]

    async def read_first_pass(self, limit: int) -> FirstPassChunk:
        """The next first-pass messages, at most ``limit``, in ``seq`` order.

        Only the relay holding bucket 0 calls this. The position is read from the database
        once, then kept here; reads go on from where the last one ended, so the next chunk
        can be read while the one before it is being recorded (:meth:`record_first_pass`
        records them in the order read).
        """
        started = time.monotonic()
        if not self.spans.enabled:
            chunk = await self._read_first_pass(limit)
        else:
            with self.spans.claim("first", limit) as claim:
                chunk = await self._read_first_pass(limit)
                claim.count = len(chunk.messages)
        self.on_claim("first", len(chunk.messages), time.monotonic() - started)
        return chunk

    async def _read_first_pass(self, limit: int) -> FirstPassChunk:
        resets = self._resets
        try:
            async with self._pool.connection() as conn:
                if self._reading is None:
                    if self._position is None:
                        self._position = await self._load_position(conn)
                    self._reading = await self._batch_at(conn, self._position)
                start, batch = self._reading
                if batch is None:  # open the next batch: a tick ends it (autocommit: the
                    # lock that orders ticks ends with the statement)
                    batch = Batch(start, await take_tick(conn, self.schema))
                    if resets == self._resets:
                        self._reading = (start, batch)
                messages = await batch.read(conn, self.schema, limit, _first_pass_message)
        except BaseException:
            if resets == self._resets:  # the batch's read state may be ahead of what was
                self._reading = None  # returned: read on from the cursor as recorded
            raise
        chunk = FirstPassChunk(
            messages=messages,
            start=batch.end.tick_id if batch.done else batch.start.tick_id,
            end=None if batch.done else batch.end.tick_id,
            after=0 if batch.done else batch.after,
            resets=resets,
        )
        if batch.done and resets == self._resets:
            self._reading = (batch.end, None)  # its end starts the next batch
        return chunk

    async def _load_position(self, conn: psycopg.AsyncConnection[Any]) -> Position:
        cur = await conn.execute(self._q["first_pass_position"])
        row = await cur.fetchone()
        if row is None:
            raise RelayError(
                f"schema {self.schema!r} has no first-pass position (outbox.first_pass is "
                "empty): reset it as docs/first-pass-log.md describes"
            )
        return Position(int(row[0]), int(row[1]), _int(row[2]), int(row[3]))

    async def _batch_at(
        self, conn: psycopg.AsyncConnection[Any], position: Position
    ) -> tuple[Tick, Batch | None]:
        """Where reading goes on from at ``position``: its start tick, and its batch if open."""
        start = await tick(conn, self.schema, position.start)
        if position.end is None:
            return start, None
        end = await tick(conn, self.schema, position.end)
        return start, Batch(start, end, after=position.after)

    async def record_first_pass(
        self, chunk: FirstPassChunk, plan: RecordPlan, within: float = 0.0
    ) -> None:
        """Write a chunk's outcome and move the cursor past it, in one transaction, riding
        out a database outage of up to ``within`` seconds; or :class:`FirstPassLost` if the
        cursor is no longer where the chunk follows on from (:class:`FirstPassStale`: a
        record before it failed). Chunks are recorded one at a time, in the order read."""
        resets, position = self._resets, self._position
        if chunk.resets != resets or position is None:
            raise FirstPassStale("read before the record ahead of it failed; read again")

        async def record() -> int | None:
            # One pipeline: BEGIN, the move, the plan's statements, then one wait for their
            # results; COMMIT only if the move found the cursor where this chunk follows on
            # (else the transaction rolls back). Two round trips, not five or more.
            async with (
                self._pool.connection() as conn,
                conn.pipeline() as pipeline,
                conn.transaction(),
            ):
                moving = await self._move(conn, position, chunk) if chunk.moves else None
                await self.write(conn, plan)
                await pipeline.sync()
                return await _moved_to(moving) if moving is not None else None

        try:
            # Should a commit have happened unseen, the next try finds the cursor moved.
            moved_to = await self.patiently(record, within)
        except BaseException:
            if resets == self._resets:
                self._reset()
            raise
        if moved_to is not None and resets == self._resets:
            self._position = Position(moved_to, chunk.start, chunk.end, chunk.after)

    async def _move(
        self, conn: psycopg.AsyncConnection[Any], position: Position, chunk: FirstPassChunk
    ) -> psycopg.AsyncCursor[Any]:
        """Insert the next position and forget the one it replaces (and the batch's start
        tick once the batch is done); the cursor whose row is the new position's id, none
        if the cursor moved under this relay (:func:`_moved_to`)."""
        params = {
            "prev": position.position_id,
            "start": chunk.start,
            "end": chunk.end,
            "after": chunk.after,
            "relay": self.relay_id,
        }
        moving = await conn.execute(self._q["move_first_pass"], params)
        done_tick = position.start if chunk.end is None else None
        await conn.execute(
            self._q["forget_first_pass_rows"], {"prev": position.position_id, "tick": done_tick}
        )
        return moving

    def current(self, chunk: FirstPassChunk) -> bool:
        """Was ``chunk`` read since the last reset (it can still be recorded)?"""
        return chunk.resets == self._resets

    def forget_first_pass(self) -> None:
        """Read the position from the database again next time (leadership changed, or a
        chunk was read and not recorded)."""
        self._reset()

    def _reset(self) -> None:
        self._position = None
        self._reading = None
        self._resets += 1

    async def claim_retry_pass(
        self, limit: int, lease: float, routes: Sequence[str], claimer: str = "retry"
    ) -> list[tuple[Outbound, str]]:
        """Lease due per-route retries of ``routes``: (message, route name) in seq order.
        ``claimer`` names it in spans and metrics: the claim loop ("retry") or a lane."""
        started = time.monotonic()
        if not self.spans.enabled:
            claimed = await self._claim_retry_pass(limit, lease, routes)
        else:
            with self.spans.claim(claimer, limit) as claim:
                claimed = await self._claim_retry_pass(limit, lease, routes)
                claim.count = len(claimed)
        self.on_claim(claimer, len(claimed), time.monotonic() - started)
        return claimed

    async def _claim_retry_pass(
        self, limit: int, lease: float, routes: Sequence[str]
    ) -> list[tuple[Outbound, str]]:
        params = {
            "limit": limit,
            "relay": self.relay_id,
            "lease": dt.timedelta(seconds=lease),
            "routes": list(routes),
        }
        rows = await self._fetch("claim_retry_pass", params)
        return sorted(((_outbound(r), str(r[-1])) for r in rows), key=lambda x: x[0].seq)

    async def any_route_pending(self) -> bool:
        """Cheap probe: is there any per-route retry or parked work at all?"""
        rows = await self._fetch("any_route_pending", {})
        return bool(rows and rows[0][0])

    async def blocked_keys(self, messages: Sequence[Outbound]) -> set[Key]:
        """(route, topic, key) of these messages that queue behind earlier pending work."""
        keyed = [m for m in messages if m.key is not None]
        if not keyed:
            return set()
        params = {
            "topics": pgarrays.TextArray([m.topic for m in keyed]),
            "keys": pgarrays.ByteaArray([m.key for m in keyed]),
        }
        rows = await self._fetch("blocked_keys", params)
        return {(r, t, bytes(k)) for r, t, k in rows}

    async def record(self, plan: RecordPlan) -> None:
        """Write a plan in one transaction, for rows leased to this relay."""
        async with self._pool.connection() as conn, conn.transaction():
            await self.write(conn, plan)

    async def record_patiently(self, plan: RecordPlan, within: float) -> None:
        """:meth:`record`, riding out a database outage of up to ``within`` seconds rather
        than letting the leased rows be delivered again; then the error is raised."""
        await self.patiently(lambda: self.record(plan), within)

    async def patiently(self, work: Callable[[], Awaitable[T]], within: float) -> T:
        """Run ``work`` again while the database is unreachable, for up to ``within`` s;
        what it returns."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(within),
            wait=RECORD_BACKOFF.delay_strategy,
            retry=retry_if_exception_type(DB_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result = await work()
        return result

    async def write(self, conn: psycopg.AsyncConnection[Any], plan: RecordPlan) -> None:
        """The plan's statements, in the caller's transaction."""
        if plan.retried_seqs:
            # Two routes of one message may finish at once, in two transactions; each would
            # see the other's route_pending row and leave the message behind for good.
            # Locking the message rows first makes the second wait and then see the first.
            seqs = pgarrays.BigintArray(sorted(set(plan.retried_seqs)))
            await conn.execute(self._q["lock_messages"], {"seqs": seqs})
        if plan.finished:
            await conn.execute(self._q["finish_first_pass"], self._finish_params(plan))
        await self._bulk(conn, "insert_deliveries", plan.deliveries)
        await self._bulk(conn, "insert_dead_letters", plan.dead)
        await self._bulk(conn, "upsert_pending", plan.pending)
        await self._bulk(conn, "delete_pending", plan.pending_done)
        if plan.fanned:
            await conn.execute(
                self._q["settle_fanned"], {"seqs": pgarrays.BigintArray(plan.fanned)}
            )
        if plan.retried_seqs:
            await conn.execute(
                self._q["delete_completed"], {"seqs": pgarrays.BigintArray(plan.retried_seqs)}
            )

    def _finish_params(self, plan: RecordPlan) -> dict[str, Any]:
        params: dict[str, Any] = {"finished": pgarrays.BigintArray(plan.finished)}
        for prefix, rows, names in (
            ("d", plan.finished_deliveries, ("seq", "route", "attempts", "partition", "offset")),
            ("x", plan.finished_dead, ("seq", "route", "attempts", "reason", "error", "status")),
        ):
            for name in names:
                params[f"{prefix}_{name}"] = _typed(name, rows.columns.get(name, []))
        # Each route once, in the order first seen: one delivery batch row each.
        params["d_routes"] = pgarrays.TextArray(list(dict.fromkeys(params["d_route"])))
        return params

    async def _bulk(self, conn: psycopg.AsyncConnection[TupleRow], name: str, rows: Rows) -> None:
        if len(rows):
            await conn.execute(self._q[name], _columns(rows))

    async def schema_version(self) -> int | None:
        rows = await self._fetch("schema_version", {})
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def check_format(self) -> None:
        """:class:`SchemaTooNewError` if the schema now serves a newer first-pass format."""
        check_format(self.schema, await self.relay_format())

    async def relay_format(self) -> int:
        """The first-pass format the schema serves: 1 on a schema older than version 7."""
        try:
            rows = await self._fetch("relay_format", {})
        except psycopg.errors.UndefinedFunction:
            return 1
        return int(rows[0][0])

    async def release_all(self) -> int:
        rows = await self._fetch("release_all_of_relay", {"relay": self.relay_id})
        return int(rows[0][0]) if rows else 0

    async def seconds_until_due(self, routes: Sequence[str]) -> float | None:
        """Until the next ``route_pending`` row of ``routes`` is due (<= 0: one is due now)."""
        rows = await self._fetch("next_due", {"routes": list(routes)})
        value = rows[0][0] if rows else None
        return None if value is None else max(0.0, float(value))

    async def analyze_pending(self) -> None:
        """Refresh route_pending's statistics (a warning, not an error, for a non-owner)."""
        async with self._pool.connection() as conn:
            await conn.execute(self._q["analyze_pending"])

    async def disabled_routes(self) -> dict[str, str]:
        """Route name -> why it is disabled (HTTP 410, or an operator)."""
        return {str(r): str(why) for r, why in await self._fetch("disabled_routes", {})}

    async def disable_route(self, route: str, reason: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(self._q["disable_route"], {"route": route, "reason": reason})

    async def gauges(self) -> Gauges:
        """The database-derived gauges, read in one short transaction."""
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute(self._q["gauge_timeout"])
            topics = await (await conn.execute(self._q["gauge_topics"])).fetchall()
            dead = await (await conn.execute(self._q["gauge_dead_letters"])).fetchall()
            relays = await (await conn.execute(self._q["gauge_relays"])).fetchone()
        live, unowned = relays or (0, 0)
        return Gauges(
            [(str(t), int(n), None if age is None else float(age)) for t, n, age in topics],
            [(str(t), str(r), int(n)) for t, r, n in dead],
            int(live),
            int(unowned),
        )

    async def _fetch(self, name: str, params: dict[str, Any]) -> list[TupleRow]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._q[name], params)
            rows: list[TupleRow] = await cur.fetchall()
            return rows


async def listen(conninfo: str, schema: str, wake: asyncio.Event, stop: asyncio.Event) -> None:
    """Set ``wake`` on every NOTIFY from ``enqueue``; reconnect after failures.

    NOTIFY is only a hint: the engine polls anyway, so a lost notification costs latency,
    never a message.
    """
    channel = sql.Identifier(f"{schema}_wakeup")
    delay = 0.5
    while not stop.is_set():
        try:
            async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
                await conn.execute(sql.SQL("LISTEN {}").format(channel))
                delay = 0.5
                wake.set()
                while not stop.is_set():
                    async for _ in conn.notifies(timeout=1.0):
                        wake.set()
        except psycopg.Error as exc:
            log.warning("NOTIFY listener lost its connection (%s); polling meanwhile", exc)
            await _sleep_unless(stop, delay)
            delay = min(delay * 2, 10.0)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
