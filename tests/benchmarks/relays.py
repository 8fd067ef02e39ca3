"""Several relay processes sharing one database.

**Drain with N relays.** The backlog is bulk-loaded (``workload.load_outbox``: one
INSERT ... SELECT committed, then a CHECKPOINT; no VACUUM, no ANALYZE: the table is as the
application's commit left it). N ``python -m relay.cli run`` processes
(configured through ``OUTBOX_*`` variables, as deployed) are then started against it while a
*gate* holds every bucket: the benchmark itself joins the lease table first, through
``relay.membership.Membership``, as a relay that never claims and never hands over, with an
hour-long lease. Joining relays mark their share of the gate's buckets for handoff and hold
nothing, so nothing is delivered while they start. Once all N have logged "started", the
gate leaves (``Membership.leave``: the relay's own code for a graceful exit), which in one
transaction frees its buckets, spreads them evenly over the N live relays and NOTIFYs them.
The clock starts just before that transaction and stops when ``message`` is empty (an index
probe every 10 ms: every delete is committed with its delivery rows).

Why a gate rather than starting the relays on an empty table and loading the backlog
afterwards (as the ``relay`` drains do): the relays join one after another, and the first
would drain alone until the others hold buckets. Why a gate rather than starting the clock
with the relays: a process start (imports, connecting, joining) is not drain throughput.
With the gate every relay starts claiming at the same instant with its final buckets, on the
same table state.

The poll interval stays at the relay's default (1 s, as in the ``relay`` scenario): the
gate's NOTIFY wakes every relay at once, and a relay that runs out of its own buckets early
would otherwise re-scan the others' rows every few milliseconds, a cost no deployment pays.

The machine may have as few cores as relays: N relay processes then compete with PostgreSQL,
the broker and each other for CPU, and the figures say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from relay.db import to_libpq
from relay.membership import Membership

from . import workload as w
from .results import Throughput
from .throughput import drain_note, drained, loaded_backlog

GATE_ID = "bench-gate"
GATE_LEASE_S = 3600.0  # the gate must never lose its buckets mid-run
POLL_INTERVAL_S = 1.0  # the relay's default; the gate's NOTIFY wakes the relays
EMPTY_POLL_S = 0.01
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
STARTED = re.compile(r"relay (\S+) started:")
STOPPED = re.compile(r"relay (\S+) stopped: (\d+) delivered")
REPO = Path(__file__).resolve().parents[2]


# --- relay processes ------------------------------------------------------------------------


def processes(count: int) -> str:
    return f"{count} relay process" + ("es" if count > 1 else "")


@dataclass
class RelayProcess:
    """One ``python -m relay.cli run``, its log (stderr) in a file."""

    process: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text("utf-8", errors="replace")

    def relay_id(self) -> str | None:
        found = STARTED.search(self.text())
        return found.group(1) if found else None

    def delivered(self) -> int | None:
        """From its last log line, "relay <id> stopped: N delivered"."""
        found = STOPPED.search(self.text())
        return int(found.group(2)) if found else None

    def last_line(self) -> str:
        lines = self.text().strip().splitlines()
        return lines[-1] if lines else "(no output)"


def relay_env(target: w.Target, schema: str, batch_size: int) -> dict[str, str]:
    """The environment of a relay process: ours without any OUTBOX_*, plus its settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    env.update({
        "OUTBOX_DATABASE_URL": target.database_url, "OUTBOX_SCHEMA": schema,
        "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": target.bootstrap,
        "OUTBOX_BATCH_SIZE": str(batch_size), "OUTBOX_POLL_INTERVAL": str(POLL_INTERVAL_S),
        "OUTBOX_LOG_LEVEL": "INFO",
    })  # fmt: skip
    return env


@contextlib.contextmanager
def relay_processes(count: int, env: dict[str, str]) -> Iterator[list[RelayProcess]]:
    """``count`` relays, always stopped (SIGTERM, then SIGKILL) and their logs removed."""
    logdir = Path(tempfile.mkdtemp(prefix="bench-relays-"))
    relays: list[RelayProcess] = []
    try:
        for index in range(count):
            log = logdir / f"relay{index}.log"
            with log.open("wb") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "relay.cli", "run"], cwd=REPO, env=env,
                    stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                )  # fmt: skip
            relays.append(RelayProcess(process, log))
        yield relays
    finally:
        stop_relays(relays)
        for relay in relays:
            relay.log.unlink(missing_ok=True)
        logdir.rmdir()


def stop_relays(relays: list[RelayProcess]) -> None:
    """SIGTERM all at once (each finishes its batch and gives its buckets back), then wait."""
    for relay in relays:
        if relay.process.poll() is None:
            relay.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for relay in relays:
        try:
            relay.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            relay.process.kill()
            relay.process.wait(5)


async def wait_started(relays: list[RelayProcess], timeout: float) -> list[str]:
    """Every relay's id, once each has logged "started" (it has joined the lease table)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [r for r in relays if r.process.poll() is not None]
        if dead:
            raise RuntimeError(f"a relay exited with {dead[0].process.returncode}: "
                               f"{dead[0].last_line()}")  # fmt: skip
        ids = [r.relay_id() for r in relays]
        if all(ids):
            return [i for i in ids if i is not None]
        await asyncio.sleep(0.05)
    raise RuntimeError(f"not all {len(relays)} relays started within {timeout:.0f} s")


# --- the gated drain ------------------------------------------------------------------------


@dataclass
class GatedDrain:
    """What one drain by N relay processes measured; lists are in process order."""

    seconds: float
    drained: bool
    buckets: list[int]  # held by each relay right after the gate opened
    delivered: list[int | None]  # from each relay's "stopped: N delivered" line
    exit_codes: list[int | None]


async def gated_drain(conninfo: str, schema: str, env: dict[str, str], count: int,
                      timeout: float) -> GatedDrain:  # fmt: skip
    """Hold every bucket, start the relays, open the gate, time the drain (module docstring)."""
    gate = Membership(conninfo, schema, GATE_ID, GATE_LEASE_S, GATE_LEASE_S / 3)
    await gate.heartbeat()  # the only live relay so far: it takes all 256 buckets
    try:
        with relay_processes(count, env) as running:
            ids = await wait_started(running, READY_TIMEOUT_S)
            seconds, drained, spread = await _open_and_time(
                conninfo, schema, gate.leave, running, timeout
            )
            await asyncio.to_thread(stop_relays, running)
            return GatedDrain(
                seconds, drained, [spread.get(relay_id, 0) for relay_id in ids],
                [r.delivered() for r in running], [r.process.returncode for r in running],
            )  # fmt: skip
    finally:
        await gate.close()


async def _open_and_time(
    conninfo: str, schema: str, open_gate: Callable[[], Awaitable[None]],
    running: list[RelayProcess], timeout: float,
) -> tuple[float, bool, dict[str, int]]:  # fmt: skip
    """(seconds from opening the gate until no message is left, drained?, buckets per relay)."""
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as conn:
        started = time.perf_counter()
        await open_gate()
        spread_query = w.query("bucket_spread", schema=schema)
        spread = {str(h): int(n) for h, n in await (await conn.execute(spread_query)).fetchall()}
        drained = await _wait_empty(conn, schema, started + timeout, running)
        return time.perf_counter() - started, drained, spread


async def _wait_empty(conn: psycopg.AsyncConnection[Any], schema: str, deadline: float,
                      relays: list[RelayProcess]) -> bool:  # fmt: skip
    """Until no message is left (True), or the deadline passes or a relay dies (False)."""
    probe = w.query("first_message", schema=schema)
    while time.perf_counter() < deadline:
        if await (await conn.execute(probe)).fetchone() is None:
            return True
        if any(r.process.poll() is not None for r in relays):
            return False
        await asyncio.sleep(EMPTY_POLL_S)
    return False


def relays_drain(target: w.Target, count: int, batch_size: int, timeout: float) -> Throughput:
    """``count`` relay processes draining the ``relay`` scenario's backlog together."""
    name = f"{processes(count)}, batch {batch_size}"
    schema = f"bench_relays_{count}"
    expected = target.workload.messages
    env = relay_env(target, schema, batch_size)
    conninfo = to_libpq(target.database_url)
    with loaded_backlog(target, schema, f"relays{count}") as backlog:
        run = asyncio.run(gated_drain(conninfo, schema, env, count, timeout))
    checks = backlog.checks
    delivered = checks["delivery_rows"]
    ok = run.drained and drained(checks, expected) and run.exit_codes == [0] * count
    details = {**checks, "relay_processes": count, "batch_size": batch_size,
               "buckets_per_relay": run.buckets, "delivered_per_relay": run.delivered,
               "exit_codes": run.exit_codes, "cpus": os.cpu_count()}  # fmt: skip
    return Throughput(
        name, delivered, run.seconds, status="ok" if ok else "partial" if delivered else "failed",
        note=_note(run, checks), details=details,
    )  # fmt: skip


def _note(run: GatedDrain, checks: dict[str, Any]) -> str:
    count = len(run.buckets)
    per_relay = "/".join("?" if d is None else f"{d:,}" for d in run.delivered)
    note = (f"{processes(count)}, PostgreSQL and the broker on "
            f"{os.cpu_count()} CPUs; buckets {'/'.join(map(str, run.buckets))}, delivered "
            f"{per_relay}; {drain_note(checks)}")  # fmt: skip
    if run.exit_codes != [0] * count:
        note += f"; exit codes {run.exit_codes}"
    return note if run.drained else note + "; NOT DRAINED (timeout or a relay died)"
