"""The relay's narrow connector to PostgreSQL: claim, record, listen.

Every method is one short transaction; nothing is held open while a sink works. SQL comes
from ``sql/queries.sql``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from outbox_lib._encoding import decode_headers
from outbox_lib._sqlfiles import load_queries, with_schema

from .plan import RecordPlan, Rows
from .sinks.base import Outbound

log = logging.getLogger(__name__)

Key = tuple[str, str, bytes]

# jit=off: JIT compiles the claim query on every call (its LIMIT + subplan cost estimate
#   crosses jit_above_cost) and that costs more than running it.
# synchronous_commit=off: losing the last recorded acknowledgements in a server crash only
#   means those messages are delivered again, which at-least-once allows; the application's
#   own publish transactions keep their durability settings.
_SESSION = "-c jit=off -c synchronous_commit=off"


def _queries(schema: str) -> dict[str, sql.Composed]:
    return {
        name: with_schema(text, schema)
        for name, text in load_queries("relay", "sql/queries.sql").items()
    }


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


class Store:
    """Claims and records work for one relay process."""

    def __init__(self, pool: AsyncConnectionPool[Any], schema: str, relay_id: str) -> None:
        self._pool = pool
        self._q = _queries(schema)
        self.schema = schema
        self.relay_id = relay_id

    @classmethod
    def create(cls, conninfo: str, schema: str, relay_id: str) -> Store:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            conninfo,
            min_size=1,
            max_size=3,
            open=False,
            kwargs={"application_name": f"outbox-relay {relay_id}"[:63], "options": _SESSION},
            check=AsyncConnectionPool.check_connection,
            # A checkout waits at most this long; the engine backs off and retries.
            timeout=10.0,
        )
        return cls(pool, schema, relay_id)

    async def open(self, timeout: float = 30.0) -> None:
        await self._pool.open(wait=True, timeout=timeout)

    async def close(self) -> None:
        await self._pool.close()

    async def claim_first_pass(self, limit: int, lease: float) -> list[Outbound]:
        params = {"limit": limit, "relay": self.relay_id, "lease": dt.timedelta(seconds=lease)}
        rows = await self._fetch("claim_first_pass", params)
        return sorted((_outbound(r) for r in rows), key=lambda m: m.seq)

    async def claim_retry_pass(
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

    async def blocked_keys(self, messages: Sequence[Outbound]) -> set[Key]:
        """(route, topic, key) of these messages that queue behind earlier pending work."""
        keyed = [m for m in messages if m.key is not None]
        if not keyed:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(self._q["any_route_pending"])
            row = await cur.fetchone()
            if not row or not row[0]:
                return set()
            params = {"topics": [m.topic for m in keyed], "keys": [m.key for m in keyed]}
            cur = await conn.execute(self._q["blocked_keys"], params)
            return {(r, t, bytes(k)) for r, t, k in await cur.fetchall()}

    async def record(self, plan: RecordPlan) -> None:
        """Write a plan in one transaction."""
        async with self._pool.connection() as conn, conn.transaction():
            if plan.finished:
                await conn.execute(self._q["finish_first_pass"], self._finish_params(plan))
            await self._bulk(conn, "insert_deliveries", plan.deliveries)
            await self._bulk(conn, "insert_dead_letters", plan.dead)
            await self._bulk(conn, "upsert_pending", plan.pending)
            await self._bulk(conn, "delete_pending", plan.pending_done)
            await self._seqs(conn, "settle_fanned", plan.fanned)
            await self._seqs(conn, "release", plan.released)
            if plan.retried_seqs:
                await conn.execute(self._q["delete_completed"], {"seqs": plan.retried_seqs})

    def _finish_params(self, plan: RecordPlan) -> dict[str, Any]:
        params: dict[str, Any] = {"finished": plan.finished, "relay": self.relay_id}
        for prefix, rows, names in (
            ("d", plan.finished_deliveries, ("seq", "route", "attempts", "partition", "offset")),
            ("x", plan.finished_dead, ("seq", "route", "attempts", "reason", "error")),
        ):
            for name in names:
                params[f"{prefix}_{name}"] = rows.columns.get(name, [])
        return params

    async def _bulk(self, conn: psycopg.AsyncConnection[TupleRow], name: str, rows: Rows) -> None:
        if len(rows):
            await conn.execute(self._q[name], rows.columns)

    async def _seqs(
        self, conn: psycopg.AsyncConnection[TupleRow], name: str, seqs: list[int]
    ) -> None:
        if seqs:
            await conn.execute(self._q[name], {"seqs": seqs, "relay": self.relay_id})

    async def schema_version(self) -> int | None:
        rows = await self._fetch("schema_version", {})
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    async def release_all(self) -> int:
        rows = await self._fetch("release_all_of_relay", {"relay": self.relay_id})
        return int(rows[0][0]) if rows else 0

    async def seconds_until_due(self) -> float | None:
        rows = await self._fetch("next_due", {})
        value = rows[0][0] if rows else None
        return None if value is None else max(0.0, float(value))

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
