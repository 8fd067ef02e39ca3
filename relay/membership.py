"""Bucket leases in the database: join, heartbeat, rebalance, hand over, leave.

Each relay keeps one connection of its own for this (a busy claim pool never delays a
heartbeat). Every change to ``bucket_lease`` runs in one short transaction under a
transaction-scoped advisory lock, so rebalances never race each other. The claim queries
read ``bucket_lease`` themselves: a relay claims keyed messages only of buckets the database
says it holds, with a lease that has not expired and no handoff pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg

from outbox_lib._migrate import advisory_key

from .errors import one_line
from .ownership import Lease, Moves, rebalance
from .store import relay_queries

log = logging.getLogger(__name__)

Connection = psycopg.AsyncConnection[Any]


def application_name(relay_id: str) -> str:
    """What every connection of a relay calls itself (``pg_stat_activity``)."""
    return f"outbox-relay {relay_id}"[:63]


class Membership:
    """This relay's view of, and part in, the bucket leases."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        relay_id: str,
        lease_seconds: float = 10.0,
        heartbeat_seconds: float = 2.0,
    ) -> None:
        self._conninfo = conninfo
        self._conn: Connection | None = None
        self._q = relay_queries(schema)
        self.schema = schema
        self.relay_id = relay_id
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.heartbeat_seconds = heartbeat_seconds
        self.buckets: frozenset[int] = frozenset()
        self.draining: frozenset[int] = frozenset()
        self._lock = advisory_key("buckets", schema)
        self._busy = asyncio.Lock()
        self._row = {  # what each heartbeat writes into this relay's row
            "relay": relay_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "lease": self.lease,
        }

    @property
    def handoff_due(self) -> bool:
        """Some of this relay's buckets should move: hand them over between batches."""
        return bool(self.draining)

    async def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                application_name=application_name(self.relay_id),
                connect_timeout=10,
            )
        return self._conn

    async def _in_transaction(self, work: Callable[[Connection], Awaitable[None]]) -> None:
        # The heartbeat task and the engine (hand_over, leave) share one connection: their
        # transactions must not interleave on it.
        async with self._busy:
            conn = await self._connection()
            try:
                async with conn.transaction():
                    await conn.execute(self._q["membership_lock"], {"lock": self._lock})
                    await work(conn)
            except psycopg.Error:
                await self._drop()
                raise

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def heartbeat(self) -> None:
        """Renew this relay and its buckets, rebalance if needed, learn what to hand over."""
        await self._in_transaction(self._heartbeat)

    async def _heartbeat(self, conn: Connection) -> None:
        await conn.execute(self._q["heartbeat"], self._row)
        await self._rebalance(conn)
        await self._read_own(conn)

    async def _rebalance(self, conn: Connection) -> None:
        gone = await (await conn.execute(self._q["forget_expired_relays"])).fetchall()
        live = [r[0] for r in await (await conn.execute(self._q["live_relays"])).fetchall()]
        rows = await (await conn.execute(self._q["bucket_leases"])).fetchall()
        leases = [Lease(int(b), h, s, bool(x)) for b, h, s, x in rows]
        moves = rebalance(leases, live)
        if gone:
            log.warning(
                "relay(s) %s stopped heartbeating; their buckets are taken over",
                ", ".join(r[0] for r in gone),
            )
        if moves:
            await self._fence_expired(conn, leases, moves)
            await self._write(conn, moves)

    async def _write(self, conn: Connection, moves: Moves) -> None:
        if moves.assign:
            await conn.execute(
                self._q["assign_buckets"],
                {"buckets": list(moves.assign), "holders": list(moves.assign.values())},
            )
        if moves.successors:
            await conn.execute(
                self._q["mark_successors"],
                {"buckets": list(moves.successors), "successors": list(moves.successors.values())},
            )
        await conn.execute(self._q["wake_relays"], {"channel": f"{self.schema}_wakeup"})
        log.info(
            "rebalanced buckets: %d assigned, %d handoffs requested",
            len(moves.assign),
            sum(1 for s in moves.successors.values() if s is not None),
        )

    async def _fence_expired(self, conn: Connection, leases: list[Lease], moves: Moves) -> None:
        """End the sessions of relays whose expired buckets are reassigned.

        A relay whose lease expired while it still runs (frozen, or cut off from the
        database but not its sessions) might still hold row locks in an open transaction.
        Ending its sessions releases them and makes its pending record fail, so it can never
        commit a batch of a bucket that has moved on. Best effort: only sessions of our own
        database role can be ended.
        """
        by_bucket = {lease.bucket: lease for lease in leases}
        stale = {
            by_bucket[b].holder
            for b in moves.assign
            if by_bucket[b].holder is not None and by_bucket[b].holder != self.relay_id
        }
        names = [application_name(h) for h in stale if h is not None]
        if names:
            await conn.execute(self._q["fence_sessions"], {"names": names})

    async def _read_own(self, conn: Connection) -> None:
        rows = await (
            await conn.execute(self._q["own_buckets"], {"relay": self.relay_id})
        ).fetchall()
        self.buckets = frozenset(int(b) for b, _ in rows)
        self.draining = frozenset(int(b) for b, draining in rows if draining)

    async def hand_over(self) -> None:
        """Give the buckets marked for handoff to their successors. Call between batches."""
        await self._in_transaction(self._hand_over)

    async def _hand_over(self, conn: Connection) -> None:
        cur = await conn.execute(self._q["hand_over"], {"relay": self.relay_id})
        moved = await cur.fetchall()
        if moved:
            await conn.execute(self._q["wake_relays"], {"channel": f"{self.schema}_wakeup"})
            log.info("handed over %d bucket(s)", len(moved))
        await self._read_own(conn)

    async def leave(self) -> None:
        """Give every bucket back and let the remaining relays take them at once."""
        try:
            await self._in_transaction(self._leave)
        finally:
            await self._drop()

    async def _leave(self, conn: Connection) -> None:
        await conn.execute(self._q["release_buckets"], {"relay": self.relay_id})
        await conn.execute(self._q["leave"], {"relay": self.relay_id})
        await self._rebalance(conn)
        self.buckets = self.draining = frozenset()

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Heartbeat every ``heartbeat_seconds`` until ``stop``; wake the engine on handoffs."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.heartbeat_seconds)
            if stop.is_set():
                return
            try:
                await self.heartbeat()
            except psycopg.Error as exc:
                log.warning("bucket lease heartbeat failed (%s); retrying", one_line(exc))
                continue
            except Exception:
                # Never let the heartbeat die quietly: the relay would lose its buckets.
                log.exception("bucket lease heartbeat failed; retrying")
                await self._drop()
                continue
            if self.handoff_due:
                wake.set()

    async def close(self) -> None:
        await self._drop()
