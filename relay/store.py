"""The relay's narrow connector to PostgreSQL: claim, record, listen.

Every method is one short transaction; nothing is held open while a sink works. SQL comes
from ``sql/queries.sql``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay

from outbox_lib._encoding import decode_headers
from outbox_lib._sqlfiles import load_queries, with_schema

from . import __version__
from .backoff import Backoff
from .errors import SchemaTooNewError
from .plan import RecordPlan, Rows
from .sinks.base import Outbound
from .tracing import Spans

log = logging.getLogger(__name__)

# What a lost or unreachable database raises; callers back off and try again.
DB_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout)
RECORD_BACKOFF = Backoff(initial=0.2, maximum=5.0)

Key = tuple[str, str, bytes]

# The first-pass format this relay speaks (relay_format() in migration 0007). A schema that
# serves a higher one was migrated for newer relays: this one must not claim from it.
RELAY_FORMAT = 1


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


# jit=off: JIT compiles the claim query on every call (its LIMIT + subplan cost estimate
#   crosses jit_above_cost) and that costs more than running it.
# synchronous_commit=off: losing the last recorded acknowledgements in a server crash only
#   means those messages are delivered again, which at-least-once allows; the application's
#   own publish transactions keep their durability settings.
# idle_in_transaction_session_timeout: a held batch keeps its transaction open while the
#   batch is sent (at most hold_seconds); should the relay freeze, the server ends the
#   session and releases the rows rather than blocking them forever.
def _session_options(hold_seconds: float) -> str:
    idle_ms = int((hold_seconds + 30.0) * 1000)
    return f"-c jit=off -c synchronous_commit=off -c idle_in_transaction_session_timeout={idle_ms}"


@functools.cache
def relay_queries(schema: str) -> Mapping[str, sql.Composed]:
    """Every statement of ``sql/queries.sql``, with ``schema`` substituted (built once)."""
    return MappingProxyType(
        {
            name: with_schema(text, schema)
            for name, text in load_queries("relay", "sql/queries.sql").items()
        }
    )


def _outbound(row: Sequence[Any]) -> Outbound:
    seq, id_, topic, key, payload, ctype, headers, idem, created, attempts, _route = row
    return Outbound(
        seq=seq,
        id=id_,
        topic=topic,
        key=bytes(key) if key is not None else None,
        payload=bytes(payload),
        content_type=ctype,
        headers=tuple(decode_headers(headers)),
        idempotency_key=idem,
        created_at=created,
        attempts=attempts,
    )


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Headers arrive as jsonb on every claimed row: orjson decodes them several times faster.
    set_json_loads(orjson.loads, conn)


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

    @classmethod
    def create(
        cls,
        conninfo: str,
        schema: str,
        relay_id: str,
        hold_seconds: float = 5.0,
        lanes: int = 0,
    ) -> Store:
        """A pool of 4 connections, plus 2 per lane (one claims while the other records)."""
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=4 + 2 * lanes,
            open=False,
            kwargs={
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

    async def hold_first_pass(self, limit: int) -> HeldBatch:
        """Lock the oldest first-pass messages in a transaction left open for the caller.

        The caller must end it with :meth:`HeldBatch.commit`, :meth:`HeldBatch.lease` or
        :meth:`HeldBatch.abandon`.
        """
        started = time.monotonic()
        if not self.spans.enabled:
            held = await self._hold_first_pass(limit)
        else:
            with self.spans.claim("first", limit) as claim:
                held = await self._hold_first_pass(limit)
                claim.count = len(held.messages)
        self.on_claim("first", len(held.messages), time.monotonic() - started)
        return held

    async def _hold_first_pass(self, limit: int) -> HeldBatch:
        conn = await self._pool.getconn()
        try:
            cur = await conn.execute(
                self._q["hold_first_pass"], {"limit": limit, "relay": self.relay_id}
            )
            rows = await cur.fetchall()
        except BaseException:
            await self.release_connection(conn, rollback=True)
            raise
        if not rows:
            await self.release_connection(conn, rollback=True)
            return HeldBatch(self, None, [])
        return HeldBatch(self, conn, sorted((_outbound(r) for r in rows), key=lambda m: m.seq))

    async def release_connection(
        self, conn: psycopg.AsyncConnection[Any], *, rollback: bool
    ) -> None:
        try:
            if rollback and not conn.closed:
                await conn.rollback()
        except psycopg.Error:
            pass  # a broken connection: the pool discards it, the server already rolled back
        finally:
            await self._pool.putconn(conn)

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
        params = {"topics": [m.topic for m in keyed], "keys": [m.key for m in keyed]}
        rows = await self._fetch("blocked_keys", params)
        return {(r, t, bytes(k)) for r, t, k in rows}

    async def record(self, plan: RecordPlan) -> None:
        """Write a plan in one transaction, for rows leased to this relay."""
        async with self._pool.connection() as conn, conn.transaction():
            await self.write(conn, plan, self.relay_id)

    async def record_patiently(self, plan: RecordPlan, within: float) -> None:
        """:meth:`record`, riding out a database outage of up to ``within`` seconds rather
        than letting the leased rows be delivered again; then the error is raised."""
        retrying = AsyncRetrying(
            stop=stop_after_delay(within),
            wait=RECORD_BACKOFF.delay_strategy,
            retry=retry_if_exception_type(DB_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self.record(plan)

    async def write(
        self, conn: psycopg.AsyncConnection[Any], plan: RecordPlan, holder: str | None
    ) -> None:
        """The plan's statements; ``holder`` None means the rows are locked by ``conn``."""
        if plan.retried_seqs:
            # Two routes of one message may finish at once, in two transactions; each would
            # see the other's route_pending row and leave the message behind for good.
            # Locking the message rows first makes the second wait and then see the first.
            await conn.execute(self._q["lock_messages"], {"seqs": sorted(set(plan.retried_seqs))})
        if plan.finished:
            await conn.execute(self._q["finish_first_pass"], self._finish_params(plan, holder))
        await self._bulk(conn, "insert_deliveries", plan.deliveries)
        await self._bulk(conn, "insert_dead_letters", plan.dead)
        await self._bulk(conn, "upsert_pending", plan.pending)
        await self._bulk(conn, "delete_pending", plan.pending_done)
        await self._seqs(conn, "settle_fanned", plan.fanned, holder)
        await self._seqs(conn, "release", plan.released, holder)
        if plan.retried_seqs:
            await conn.execute(self._q["delete_completed"], {"seqs": plan.retried_seqs})

    def _finish_params(self, plan: RecordPlan, holder: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {"finished": plan.finished, "relay": holder}
        for prefix, rows, names in (
            ("d", plan.finished_deliveries, ("seq", "route", "attempts", "partition", "offset")),
            ("x", plan.finished_dead, ("seq", "route", "attempts", "reason", "error", "status")),
        ):
            for name in names:
                params[f"{prefix}_{name}"] = rows.columns.get(name, [])
        return params

    async def _bulk(self, conn: psycopg.AsyncConnection[TupleRow], name: str, rows: Rows) -> None:
        if len(rows):
            await conn.execute(self._q[name], rows.columns)

    async def _seqs(
        self, conn: psycopg.AsyncConnection[Any], name: str, seqs: list[int], holder: str | None
    ) -> None:
        if seqs:
            await conn.execute(self._q[name], {"seqs": seqs, "relay": holder})

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


class HeldBatch:
    """First-pass messages locked by an open transaction on one pooled connection.

    The fast path: no row is written to claim them, and the outcome is written in the same
    transaction. If sending is slow, :meth:`lease` converts the locks into a lease and
    commits, so no transaction stays open across an outage. If the relay dies, the server
    rolls the transaction back and the rows are free again at once.
    """

    def __init__(
        self, store: Store, conn: psycopg.AsyncConnection[Any] | None, messages: list[Outbound]
    ) -> None:
        self._store = store
        self._conn = conn
        self.messages = messages

    def _take(self) -> psycopg.AsyncConnection[Any]:
        conn, self._conn = self._conn, None
        if conn is None:
            raise RuntimeError("this held batch is already finished")
        return conn

    async def commit(self, plan: RecordPlan) -> None:
        """Write the outcome in the claiming transaction and commit."""
        conn = self._take()
        try:
            await self._store.write(conn, plan, None)
            await conn.commit()
        except BaseException:
            await self._store.release_connection(conn, rollback=True)
            raise
        await self._store.release_connection(conn, rollback=False)

    async def lease(self, seconds: float) -> None:
        """Keep the rows as a lease of this relay and end the transaction."""
        conn = self._take()
        params = {
            "seqs": [m.seq for m in self.messages],
            "relay": self._store.relay_id,
            "lease": dt.timedelta(seconds=seconds),
        }
        try:
            await conn.execute(self._store.statement("lease_held"), params)
            await conn.commit()
        except BaseException:
            await self._store.release_connection(conn, rollback=True)
            raise
        await self._store.release_connection(conn, rollback=False)

    async def abandon(self) -> None:
        """Roll back: the rows are free for the next claim."""
        if self._conn is not None:
            await self._store.release_connection(self._take(), rollback=True)


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
