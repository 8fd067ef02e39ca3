"""Snapshot batches on a real PostgreSQL (relay.ticks, schema version 8).

What the log-shaped first pass will stand on: every committed message is read exactly once,
in seq order within a batch, however late its transaction commits; nothing waits for a
transaction that is still running; rolled-back messages never appear; and the statements
read through indexes, without a sort of the backlog, on a table nobody analyzed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from relay.store import _session_options, relay_queries
from relay.ticks import _NO_SEQSCAN, Batch, Row, Tick, _statement, take_tick, tick

pytestmark = pytest.mark.integration

SCHEMA = "outbox"
LIMIT = 1000
SCANS = ("Seq Scan", "Index Scan", "Index Only Scan", "Bitmap Index Scan")
PUBLISH = "SELECT outbox.publish(%s, %s::jsonb)"
TAKE_TICK = "SELECT tick_id, snap::text, lo, hi, xnext::text::bigint FROM outbox.take_tick()"


class Reader:
    """The relay's async reading, driven from a test (or a thread) through its own loop."""

    def __init__(self, url: str) -> None:
        self._runner = asyncio.Runner()
        self.conn = self._runner.run(psycopg.AsyncConnection.connect(url, autocommit=True))

    def tick(self) -> Tick:
        return self._runner.run(take_tick(self.conn, SCHEMA))

    def load(self, tick_id: int) -> Tick:
        return self._runner.run(tick(self.conn, SCHEMA, tick_id))

    def read_all(self, start: Tick, end: Tick, limit: int = 1000) -> list[Row]:
        batch = Batch(start, end)
        rows: list[Row] = []
        while not batch.done:
            rows += self._runner.run(batch.read(self.conn, SCHEMA, limit))
        return rows

    def close(self) -> None:
        self._runner.run(self.conn.close())
        self._runner.close()


@pytest.fixture
def reader(url: str) -> Iterator[Reader]:
    opened = Reader(url)
    try:
        yield opened
    finally:
        opened.close()


def publish(conn: psycopg.Connection[Any], *numbers: int, topic: str = "t") -> None:
    for n in numbers:
        conn.execute(PUBLISH, (topic, json.dumps({"n": n})))


async def _fetch_all(conn: psycopg.AsyncConnection[Any], query: str) -> list[Any]:
    cur = await conn.execute(query)  # type: ignore[arg-type]
    return await cur.fetchall()


def numbers(rows: list[Row]) -> list[int]:
    return [json.loads(bytes(r.values[3]))["n"] for r in rows]


def test_a_batch_is_what_committed_between_two_ticks_in_seq_order(url: str, reader: Reader) -> None:
    empty = reader.tick()
    with psycopg.connect(url) as writer:
        publish(writer, 1, 2, 3)
        writer.commit()
        publish(writer, 4)
        writer.rollback()  # never committed: in no batch
    first = reader.tick()
    assert numbers(reader.read_all(empty, first)) == [1, 2, 3]
    assert reader.read_all(first, reader.tick()) == []
    assert reader.load(first.tick_id) == first
    assert first.tick_id > empty.tick_id and first.lo <= first.hi


def test_a_running_transaction_holds_nothing_back_and_loses_nothing(
    url: str, reader: Reader
) -> None:
    """The sequence-gap trap: the long transaction took the lower seq and commits last."""
    start = reader.tick()
    with psycopg.connect(url) as long, psycopg.connect(url) as short:
        publish(long, 1)  # seq 1, transaction left open
        publish(short, 2)  # seq 2, committed at once
        short.commit()
        middle = reader.tick()
        assert numbers(reader.read_all(start, middle)) == [2]  # no wait for the long one
        publish(long, 3)
        long.commit()
    end = reader.tick()
    late = reader.read_all(middle, end)
    assert numbers(late) == [1, 3]
    assert [r.seq for r in late] == sorted(r.seq for r in late)


def test_chunks_resume_where_the_last_one_ended(url: str, reader: Reader) -> None:
    start = reader.tick()
    with psycopg.connect(url) as long, psycopg.connect(url) as other:
        publish(long, *range(0, 40))  # late: seen running by the middle tick
        for n in range(40, 250, 30):
            publish(other, *range(n, min(n + 30, 250)))
            other.commit()
        middle = reader.tick()
        long.commit()
    end = reader.tick()
    whole = reader.read_all(start, middle) + reader.read_all(middle, end)
    chunked = reader.read_all(start, middle, limit=7) + reader.read_all(middle, end, limit=7)
    assert numbers(chunked) == numbers(whole)
    assert sorted(numbers(whole)) == list(range(250))
    assert numbers(reader.read_all(middle, end)) == list(range(40))


def test_concurrent_writers_every_committed_message_read_exactly_once(
    url: str, reader: Reader
) -> None:
    """Writers commit and roll back at random, some transactions stay open across many
    ticks; a reader ticks and reads the whole time. What it read is exactly what committed."""
    rng = random.Random(16)
    committed: list[int] = []
    lock = threading.Lock()
    counter = iter(range(1_000_000))
    stop = threading.Event()

    def writer(seed: int) -> None:
        local = random.Random(seed)
        with psycopg.connect(url) as conn:
            for _ in range(40):
                mine = [next(counter) for _ in range(local.randint(1, 5))]
                for n in mine:
                    publish(conn, n)
                    time.sleep(local.random() * 0.004)
                if local.random() < 0.15:
                    conn.rollback()
                else:
                    conn.commit()
                    with lock:
                        committed.extend(mine)

    seen: list[int] = []
    batches: list[list[int]] = []

    def read_loop() -> None:
        mine = Reader(url)
        try:
            # From the tick taken before any writer started: a writer may commit before this
            # thread has connected, and a first tick of its own would count that as before.
            last = mine.load(first.tick_id)
            while True:
                finishing = stop.is_set()
                now = mine.tick()
                rows = mine.read_all(last, now, limit=rng.randint(1, 9))
                batches.append([r.seq for r in rows])
                seen.extend(numbers(rows))
                last = now
                if finishing:
                    return
                time.sleep(0.002)
        finally:
            mine.close()

    first = reader.tick()
    reading = threading.Thread(target=read_loop)
    reading.start()
    writers = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    reading.join(60)

    assert sorted(seen) == sorted(committed), "each committed message exactly once"
    # Many batches, each meeting writers mid-transaction (18 on a loaded machine, 40 or more
    # on an idle one: the count is how often the reader got the CPU, not what is tested).
    assert len(committed) > 500 and sum(1 for b in batches if b) > 10
    assert all(b == sorted(b) for b in batches), "each batch in seq order"
    assert sorted(numbers(reader.read_all(first, reader.tick()))) == sorted(seen)


def test_ticks_need_read_committed(url: str) -> None:
    with psycopg.connect(url) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with pytest.raises(psycopg.errors.InvalidTransactionState, match="READ COMMITTED"):
            conn.execute("SELECT * FROM outbox.take_tick()")


def _plan(url: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    from relay.ticks import _statement

    explain = psycopg.sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) ") + _statement(name, SCHEMA)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(explain, params).fetchone()
    assert row is not None
    plan: dict[str, Any] = row[0][0]["Plan"]
    return plan


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_batches_read_through_indexes_after_a_million_row_bulk_publish_without_analyze(
    url: str, reader: Reader
) -> None:
    """The guard of the hot path: right after a bulk publish nobody analyzed, a chunk reads
    at most its window of seq (whatever plan the planner picks for it), and late rows are
    found by their transaction, never by walking the table."""
    start = reader.tick()
    with psycopg.connect(url) as long:
        publish(long, -1)  # a transaction running across the bulk publish: one late row
        with psycopg.connect(url) as bulk:
            bulk.execute("SELECT pg_current_xact_id()")  # as enqueue(): the id before the seqs
            bulk.execute(
                "INSERT INTO outbox.message (topic, payload, content_type, bucket) "
                "SELECT 'bulk', convert_to('{\"n\": ' || g || '}', 'UTF8'), "
                "'application/json', 0 FROM generate_series(1, 1000000) g"
            )
            bulk.commit()
        middle = reader.tick()
        long.commit()
    end = reader.tick()
    window = 4 * LIMIT
    params = {"after": start.lo, "upto": start.lo + window, "limit": LIMIT,
              "start_snap": start.snap, "end_snap": middle.snap}  # fmt: skip
    rest = _plan(url, "batch_rest", params)
    scans = [n for n in _nodes(rest) if "Scan" in n["Node Type"]]
    assert scans and all(n["Node Type"] != "Seq Scan" for n in scans), scans
    assert all(n["Actual Rows"] <= window for n in scans)
    assert rest["Actual Rows"] == LIMIT
    late_params = {"after": 0, "limit": LIMIT, "start_snap": middle.snap, "start_lo": middle.lo,
                   "start_next": middle.xnext, "end_snap": end.snap}  # fmt: skip
    late = _plan(url, "batch_late", late_params)
    scans = [n for n in _nodes(late) if n["Node Type"] in SCANS]
    assert scans and {n.get("Index Name") for n in scans} == {"message_xid_idx"}, scans
    assert all(n["Actual Rows"] <= 1 for n in _nodes(late) if n["Node Type"] == "Sort")
    assert numbers(reader.read_all(middle, end)) == [-1]
    assert len(reader.read_all(start, middle, limit=LIMIT)) == 1_000_000

    # The rest of the hot path on the same table: the record that deletes a chunk, the check
    # of keys queued behind a retry, and the cursor's own statements.
    chunk = [r.seq for r in reader.read_all(start, middle, limit=LIMIT)[:LIMIT]]
    record = {"finished": chunk, **{f"d_{c}": [] for c in ("seq", "route", "routes",
              "attempts", "partition", "offset")}, **{f"x_{c}": [] for c in ("seq", "route",
              "attempts", "reason", "error", "status")}}  # fmt: skip
    statements = {
        "finish_first_pass": record,
        "blocked_keys": {"topics": ["bulk"] * 10, "keys": [b"k"] * 10},
        "first_pass_position": {},
        "move_first_pass": {"prev": 1, "start": 1, "end": None, "after": 0, "relay": "r"},
    }
    with psycopg.connect(url) as conn:
        for name, params in statements.items():
            explain = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + relay_queries(SCHEMA)[name]
            row = conn.execute(explain, params).fetchone()
            assert row is not None
            nodes = list(_nodes(row[0][0]["Plan"]))
            seq_scans = [n.get("Relation Name") for n in nodes if n["Node Type"] == "Seq Scan"]
            assert "message" not in seq_scans, (name, seq_scans)
            sorts = [n for n in nodes if n["Node Type"] == "Sort"]
            assert not sorts or name == "blocked_keys", (name, sorts)
        conn.rollback()


def test_the_late_rows_read_is_never_prepared(url: str, reader: Reader) -> None:
    """psycopg prepares a statement after its fifth run, and PostgreSQL may then give it a
    generic plan, chosen without the values: for the late rows that plan walked the table
    (25 ms a read after a 200,000 drain under a pinned xmin, against 0.5 ms planned with the
    values). Read many batches with late rows on one connection: the late-rows statement is
    never among the connection's prepared statements, while the other read is."""
    with psycopg.connect(url) as long:
        publish(long, 0)
        ticks = [reader.tick()]
        for n in range(1, 9):  # a late row in each batch: the long transaction's
            publish(long, n)
            ticks.append(reader.tick())
        long.commit()
    ticks.append(reader.tick())
    conn = reader.conn
    for start, end in itertools.pairwise(ticks):
        batch = Batch(start, end)
        while not batch.done:
            reader._runner.run(batch.read(conn, SCHEMA, 2))
    prepared = [
        row[0]
        for row in reader._runner.run(
            _fetch_all(conn, "SELECT statement FROM pg_prepared_statements")
        )
    ]
    assert any("m.seq > $1" in s for s in prepared), "the seq-window read is prepared"
    assert not any("pg_snapshot_xip" in s for s in prepared), prepared


def _bulk_publish(conn: psycopg.Connection[Any], transactions: int, each: int, pad: int) -> None:
    """A bulk job's backlog: ``transactions`` of ``each`` messages (topic 'bulk')."""
    for _ in range(transactions):
        with conn.transaction():
            conn.execute(
                "SELECT outbox.publish('bulk', jsonb_build_object('n', n, 'pad', repeat('x', %s)))"
                " FROM generate_series(1, %s) AS n",
                (pad, each),
            )


async def _seq_scans(conn: psycopg.AsyncConnection[Any]) -> int:
    """Sequential scans of ``message`` so far, this session's included (flushed first)."""
    await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.commit()  # the backend flushes when it goes idle after a transaction
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    cur = await conn.execute(
        "SELECT seq_scan FROM pg_stat_user_tables WHERE relid = 'outbox.message'::regclass"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


def test_the_late_rows_read_never_scans_the_table_on_stale_statistics(url: str) -> None:
    """Statistics taken while a bulk backlog was live say 50,000 rows per transaction id;
    after the drain deleted it, the late-rows read of a steady trickle finds none. Planned on
    those statistics, that read became a scan of the whole table (or a parallel bitmap scan,
    whose workers cost milliseconds to start): 12-30 ms a read after a drain. Read as the
    relay reads (its session options, in a transaction), it scans no table and starts no
    workers."""
    with psycopg.connect(url, autocommit=True) as conn:
        _bulk_publish(conn, transactions=4, each=50_000, pad=100)
        conn.execute("ANALYZE outbox.message")  # taken while the backlog is live
        conn.execute("DELETE FROM outbox.message")  # the drain
        publish(conn, *range(5))
        with psycopg.connect(url) as running:  # running at the start tick: a late row
            publish(running, 5)
            start = Tick.from_row(conn.execute(TAKE_TICK).fetchone() or ())
        end = Tick.from_row(conn.execute(TAKE_TICK).fetchone() or ())
    params = {"after": 0, "limit": LIMIT, "start_snap": start.snap, "start_lo": start.lo,
              "start_next": start.xnext, "end_snap": end.snap}  # fmt: skip
    explain = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + _statement("batch_late", SCHEMA)

    async def read_as_the_relay() -> tuple[list[Any], list[Any]]:
        options = _session_options(10.0)
        async with await psycopg.AsyncConnection.connect(url, options=options) as relay:
            batch = Batch(start, end)
            before = await _seq_scans(relay)
            rows = await batch.read(relay, SCHEMA, LIMIT)
            assert await _seq_scans(relay) == before, "the read scanned the table"
            async with relay.transaction():  # planned as that read plans it
                await relay.execute(_NO_SEQSCAN)
                plan = await (await relay.execute(explain, params)).fetchall()
            return rows, plan

    rows, [(plan,)] = asyncio.run(read_as_the_relay())
    assert [json.loads(r.values[3])["n"] for r in rows] == [5]
    nodes = list(_nodes(plan[0]["Plan"]))
    assert [n for n in nodes if n["Node Type"] == "Seq Scan"] == [], nodes
    assert not [n for n in nodes if n["Node Type"].startswith("Gather")], nodes
    assert not [n for n in nodes if n.get("Parallel Aware")], nodes


def test_the_late_rows_read_finds_rows_by_transaction_among_dead_rows_nobody_can_vacuum(
    url: str,
) -> None:
    """After a drain under a pinned xmin, autovacuum can remove nothing but analyzes: the
    statistics say the table is empty while every dead row stays. Planned on that, the
    late-rows read walked the whole partial index of unrouted messages (every dead entry,
    43-105 ms a read: commit-to-broker p50 of 100 ms in the pinned latency benchmark). It
    goes in by transaction id, whatever the statistics say; and when no transaction ran at
    the start tick there is nothing late to look for, so it is not run at all."""
    with psycopg.connect(url, autocommit=True) as conn:
        _bulk_publish(conn, transactions=5, each=10_000, pad=0)
        with psycopg.connect(url) as pinned, psycopg.connect(url) as running:
            pinned.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            pinned.execute("SELECT count(*) FROM outbox.message")  # holds the snapshot
            conn.execute("DELETE FROM outbox.message")  # the drain
            conn.execute("ANALYZE outbox.message")  # autovacuum's, after the drain
            publish(running, 1)  # a transaction running at the start tick
            start = Tick.from_row(conn.execute(TAKE_TICK).fetchone() or ())
            running.commit()
            end = Tick.from_row(conn.execute(TAKE_TICK).fetchone() or ())
            quiet = Tick.from_row(conn.execute(TAKE_TICK).fetchone() or ())
            assert start.had_running and not quiet.had_running
            params = {"after": 0, "limit": LIMIT, "start_snap": start.snap, "end_snap": end.snap,
                      "start_lo": start.lo, "start_next": start.xnext}  # fmt: skip
            explain = psycopg.sql.SQL("EXPLAIN (FORMAT JSON) ") + _statement("batch_late", SCHEMA)

            async def read_as_the_relay() -> tuple[list[Row], list[Any], list[str]]:
                options = _session_options(10.0)
                async with await psycopg.AsyncConnection.connect(url, options=options) as relay:
                    rows = await Batch(start, end).read(relay, SCHEMA, LIMIT)
                    plan = await (await relay.execute(explain, params)).fetchall()
                    statements: list[str] = []
                    execute = relay.execute

                    async def noting(query: Any, *args: Any, **kwargs: Any) -> Any:
                        statements.append(str(query))
                        return await execute(query, *args, **kwargs)

                    relay.execute = noting  # type: ignore[method-assign]
                    await Batch(quiet, quiet).read(relay, SCHEMA, LIMIT)
                    return rows, plan, statements

            rows, [(plan,)], statements = asyncio.run(read_as_the_relay())
    assert numbers(rows) == [1], "the late row is read"
    on_message = [n for n in _nodes(plan[0]["Plan"]) if n.get("Relation Name") == "message"
                  or n.get("Index Name", "").startswith("message")]  # fmt: skip
    assert on_message, plan
    for node in on_message:
        assert node["Node Type"] != "Seq Scan", node
        if "Index Name" in node:
            assert node["Index Name"] == "message_xid_idx" and "Index Cond" in node, node
    assert not any("batch_late" in s or "enable_seqscan" in s for s in statements), statements
