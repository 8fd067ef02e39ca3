"""The log first pass (schema version 9): the upgrade from the claiming first pass, and the
cursor's guarantees that the engine tests do not show on their own."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest

import outbox_lib
import outbox_lib.alembic
from relay.config import Route
from relay.plan import plan_first_pass
from relay.sinks.base import Delivered, Failed, Outbound, Result
from relay.store import FirstPassLost, Store
from tests.harness.relay import RelayThread, scalar, settings_for, wait_until
from tests.harness.webhook import WebhookServer, new_secret
from tests.integration.pg_helpers import fetch, sync_engine
from tests.integration.test_engine_states import ScriptedSink, ok, relay_with, runtime

pytestmark = pytest.mark.integration

KEYS = 5
COUNT = 60


def _publish(conn: psycopg.Connection, numbers: range) -> None:
    for n in numbers:
        conn.execute(
            "SELECT outbox.publish('t', %s::jsonb, %s)",
            (json.dumps({"n": n}), f"k{n % KEYS}"),
        )


def _commit_and_deliver(url: str, relay: RelayThread, count: int) -> None:
    """Publish messages 0 to ``count`` - 1 in one transaction; wait until all are delivered."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        _publish(conn, range(count))
    relay.wait_delivered(count, timeout=20)


def _each_once_in_key_order(sink: ScriptedSink, count: int) -> None:
    assert sorted(n for _, n in sink.delivered) == list(range(count)), "each once, none skipped"
    for key, numbers in sink.order_by_key().items():
        assert numbers == sorted(numbers), key


def test_an_upgrade_from_version_8_delivers_every_message_once_in_key_order(
    database_url: str,
) -> None:
    """A version-8 database as a relay of the claiming first pass leaves it: messages pending,
    leased (the relay died mid-send), parked behind a retry, and dead-lettered. After the
    migration a relay delivers each pending message once, every key in order, and the
    dead letters stay as they were."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn, to_version=8)
        with conn.transaction():
            _publish(conn, range(COUNT))
        first = scalar(database_url, "SELECT min(seq) FROM outbox.message")
        # Leased by a relay that died: the first 10 messages.
        conn.execute(
            "UPDATE outbox.message SET claimed_by = 'gone', claimed_until = now() + '10 min'"
            " WHERE seq < %s",
            (first + 10,),
        )
        # Message 10 failed once on route r: fanned, with a retry due now; the later
        # messages of its key (k0) must wait for it.
        conn.execute("UPDATE outbox.message SET fanned = true WHERE seq = %s", (first + 10,))
        conn.execute(
            "INSERT INTO outbox.route_pending (seq, route, topic, msg_key, bucket, attempts)"
            " SELECT seq, 'r', topic, msg_key, bucket, 1 FROM outbox.message WHERE seq = %s",
            (first + 10,),
        )
        conn.execute(
            "INSERT INTO outbox.dead_letter (message_id, seq, route, topic, payload, headers,"
            " content_type, bucket, created_at, attempts, reason)"
            " VALUES (gen_random_uuid(), 0, 'r', 't', '{}', '{}', 'application/json', 0, now(), 5,"
            " 'max attempts reached')"
        )
        assert outbox_lib.migrate(conn) == [9, 10]
        columns = "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'outbox'"
        assert scalar(database_url, f"{columns} AND column_name = 'claimed_by'"
                      " AND table_name = 'message'") == 0  # fmt: skip
        assert scalar(database_url, "SELECT outbox.relay_format()") == 3
    sink = ScriptedSink(ok)
    with relay_with(database_url, runtime("r", sink), batch_size=7) as relay:
        relay.wait_delivered(COUNT, timeout=30)
        with psycopg.connect(database_url, autocommit=True) as conn:
            _publish(conn, range(COUNT, COUNT + 20))  # and what commits after the upgrade
        relay.wait_delivered(COUNT + 20, timeout=30)
    delivered = [n for _, n in sink.delivered]
    assert sorted(delivered) == list(range(COUNT + 20)), "each message once"
    for key, numbers in sink.order_by_key().items():
        assert numbers == sorted(numbers), key
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.route_pending") == 0
    assert scalar(database_url, "SELECT count(*) FROM outbox.dead_letter") == 1


def test_a_downgrade_hands_the_unread_messages_back_to_the_claiming_first_pass(
    database_url: str,
) -> None:
    """Version 9 back to 8 loses nothing: what the cursor passed is deleted or fanned, so the
    messages a relay of format 1 claims (not fanned) are exactly those not yet read."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        outbox_lib.migrate(conn)
        with conn.transaction():
            _publish(conn, range(30))
    sink = ScriptedSink(ok)
    with relay_with(database_url, runtime("r", sink)) as relay:
        relay.wait_delivered(30, timeout=30)
    with psycopg.connect(database_url, autocommit=True) as conn, conn.transaction():
        _publish(conn, range(30, 40))
    with sync_engine(database_url) as engine, engine.begin() as sa_conn:
        assert outbox_lib.alembic.downgrade(sa_conn, to_version=8, schema="outbox") == [10, 9]
    unread = fetch(
        database_url,
        "SELECT convert_from(payload, 'UTF8')::jsonb ->> 'n', claimed_by FROM outbox.message"
        " WHERE NOT fanned ORDER BY seq",
    )
    assert unread == [(str(n), None) for n in range(30, 40)]
    assert scalar(database_url, "SELECT outbox.relay_format()") == 1


class SilentSink(ScriptedSink):
    """A broker or endpoint that accepts connections and never answers (until released)."""

    def __init__(self) -> None:
        super().__init__(ok)
        self.released = asyncio.Event()
        self.calls = 0

    async def send(self, route: Route, batch: Sequence[Outbound]) -> list[Result]:
        self.calls += 1
        await self.released.wait()
        return await super().send(route, batch)


def test_a_silent_route_holds_back_no_other_route_on_the_same_topic_or_another(
    url: str,
) -> None:
    """Route "silent" takes topic a, route "good" takes a and b. With "silent" never
    answering, "good" gets every message within seconds; "silent" keeps its share queued
    (no attempt spent) and is sent nothing more until its send ends, then gets it all."""
    silent, good = SilentSink(), ScriptedSink(ok)
    routes = [runtime("silent", silent), runtime("good", good)]
    routes[0].route = Route(name="silent", topics=("a",), sink="kafka")
    settings = settings_for(url, "127.0.0.1:1", poll_interval=0.05, hold_seconds=0.5)
    with (
        psycopg.connect(url, autocommit=True) as conn,
        RelayThread(settings, routes=routes) as relay,
    ):
        started = time.monotonic()
        with conn.transaction():
            for n in range(40):
                conn.execute("SELECT outbox.publish(%s, %s::jsonb, %s)",
                             ("ab"[n % 2], json.dumps({"n": n}), f"k{n % 4}"))  # fmt: skip
        recorded = "SELECT count(*) FROM outbox.delivery WHERE route = 'good'"
        wait_until(lambda: scalar(url, recorded) == 40, 10, "the healthy route")
        took = time.monotonic() - started
        queued = "SELECT count(*), max(attempts) FROM outbox.route_pending WHERE route = %s"
        assert fetch(url, queued, ("silent",)) == [(20, 0)]
        assert silent.calls == 1, "nothing more is sent while the first send runs"
        relay.call_soon(silent.released.set)
        wait_until(lambda: scalar(url, "SELECT count(*) FROM outbox.route_pending") == 0,
                   15, "the silent route's retries")  # fmt: skip
    print(f"\nhealthy route delivered 40 in {took:.2f} s beside a silent one")
    assert took < 5.0
    # The send given up on delivered its share late (not recorded), then the retries again.
    first, retried = silent.delivered[:-20], silent.delivered[-20:]
    assert sorted(n for _, n in retried) == list(range(0, 40, 2))
    assert {n for _, n in first} <= set(range(0, 40, 2))
    by_key: dict[str | None, list[int]] = {}
    for key, n in retried:
        by_key.setdefault(key, []).append(n)
    assert all(numbers == sorted(numbers) for numbers in by_key.values()), by_key
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 60


def test_a_dead_broker_delays_no_webhook_of_the_same_topic_or_another(url: str) -> None:
    """The case that used to wait out librdkafka's message.timeout.ms (60 s): a Kafka route
    to a broker that refuses connections and a webhook route, both on orders.created; the
    webhook also takes orders.paid. Every webhook arrives within seconds."""
    secret = new_secret()
    kafka = Route(name="kafka", topics=("orders.created",), sink="kafka")
    with WebhookServer(secret) as server:
        hook = Route(
            name="hook", topics=("orders.created", "orders.paid"), sink="webhook",
            url=server.url(), secret=secret, allow_private_network=True,
        )  # fmt: skip
        base = settings_for(url, "127.0.0.1:1", poll_interval=0.1, hold_seconds=1.0)
        with (
            RelayThread(dataclasses.replace(base, routes=(kafka, hook))),
            psycopg.connect(url, autocommit=True) as conn,
        ):
            started = time.monotonic()
            with conn.transaction():
                for n in range(10):
                    topic = ("orders.created", "orders.paid")[n % 2]
                    conn.execute("SELECT outbox.publish(%s, %s::jsonb)", (topic, f'{{"n": {n}}}'))
            wait_until(lambda: len(server.requests) >= 10, 15, "every webhook")
            took = time.monotonic() - started
    print(f"\n10 webhooks in {took:.2f} s beside a Kafka route to a dead broker")
    assert sorted(r.json()["n"] for r in server.requests) == list(range(10))
    assert took < 8.0
    pending = "SELECT count(*), max(attempts) FROM outbox.route_pending WHERE route = 'kafka'"
    assert fetch(url, pending) == [(5, 0)], "the broker's share waits for it, no attempt spent"


def test_a_database_error_between_read_and_record_reads_the_chunk_again(url: str) -> None:
    """A chunk read but never recorded (the database failed while it was being sent) is
    read again from the cursor: nothing is skipped, and key order holds."""
    sink = ScriptedSink(ok)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        engine = relay.engine
        start = engine._start_first_pass
        failed = []

        async def fail_once(messages: list[Outbound], pending: bool) -> Any:
            if not failed and messages and json.loads(messages[0].payload)["n"] == 10:
                failed.append(messages[0].seq)
                raise psycopg.OperationalError("the database went away")
            return await start(messages, pending)

        engine._start_first_pass = fail_once  # type: ignore[method-assign]
        _commit_and_deliver(url, relay, 30)
    assert failed, "the chunk starting at message 10 failed once"
    _each_once_in_key_order(sink, 30)


def _five_fails_once(n: int, attempt: int) -> Result:
    """Message 5's first attempt fails (to be retried); everything else is delivered."""
    return Failed("retry", "flaky", "try later") if n == 5 and attempt == 1 else Delivered()


def _slow_record(store: Any, first_n: int, seconds: float, fail: bool = False) -> list[int]:
    """Make the record of the chunk starting at message ``first_n`` take ``seconds`` (and
    then fail for good, as a record does once its patience is spent, if ``fail``); the
    seqs of the chunks recorded, in order, are noted in the list returned."""
    record = store.record_first_pass
    recorded: list[int] = []

    async def slow(chunk: Any, plan: Any, within: float = 0.0) -> None:
        if chunk.messages and json.loads(chunk.messages[0].payload)["n"] == first_n:
            await asyncio.sleep(seconds)
            if fail and not recorded.count(-1):
                recorded.append(-1)
                store._reset()  # what a failed record does to the store's state
                raise psycopg.OperationalError("the connection broke during the record")
        await record(chunk, plan, within)
        recorded.extend(m.seq for m in chunk.messages)

    store.record_first_pass = slow
    return recorded


def test_the_next_chunk_is_sent_while_the_one_before_is_recorded(url: str) -> None:
    """The first pass is a pipeline of two: while a chunk is recorded, the next is read and
    sent; it is recorded only after the one before has committed, so records stay in order."""
    sent_during: list[int] = []
    sink = ScriptedSink(ok)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        recorded = _slow_record(relay.engine.store, 10, 0.5)
        send = sink.send

        async def noting(route: Route, batch: Sequence[Outbound]) -> list[Result]:
            if (
                recorded
                and recorded[-1] < batch[0].seq
                and any(json.loads(m.payload)["n"] == 20 for m in batch)
            ):
                sent_during.append(len(recorded))
            return await send(route, batch)

        sink.send = noting  # type: ignore[method-assign]
        _commit_and_deliver(url, relay, 30)
        wait_until(lambda: len(recorded) == 30, 10, "every record")
    assert sent_during == [10], "messages 20-29 went out while 10-19 were being recorded"
    assert recorded == sorted(recorded), "chunks are recorded in the order read"
    _each_once_in_key_order(sink, 30)
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0


def test_a_chunk_sent_ahead_of_a_failed_record_is_never_recorded_and_goes_again(
    url: str,
) -> None:
    """When a record fails for good, the chunk read and sent meanwhile is dropped too: both
    are read again from the cursor and sent again. Nothing is skipped; the broker sees those
    two chunks once more, in order (at-least-once): every key's first deliveries are in
    order, and so is every key's delivery sequence once the replayed run is set aside."""
    sink = ScriptedSink(ok)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        recorded = _slow_record(relay.engine.store, 10, 0.3, fail=True)
        with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
            _publish(conn, range(40))
        relay.wait_delivered(40, timeout=30)
        wait_until(
            lambda: scalar(url, "SELECT count(*) FROM outbox.message") == 0, 10, "every record"
        )
    assert -1 in recorded, "the record of messages 10-19 failed"
    numbers = [n for _, n in sink.delivered]
    assert sorted(set(numbers)) == list(range(40)), "none skipped"
    again = sorted(n for n, c in Counter(numbers).items() if c > 1)
    assert again == list(range(10, 30)), "exactly the failed chunk and the one sent ahead"
    assert all(c == 2 for c in Counter(numbers).values() if c > 1)
    for key, seen in sink.order_by_key().items():
        firsts = list(dict.fromkeys(seen))
        assert firsts == sorted(firsts), key
        replay = next((i for i, n in enumerate(seen) if n in seen[:i]), len(seen))
        assert seen[:replay] == sorted(seen[:replay]), key
        assert seen[replay:] == sorted(seen[replay:]), key


def test_a_failed_read_while_a_record_runs_loses_nothing(url: str) -> None:
    """A database error while a chunk is read during a record: the record commits, and the
    chunk is read again from the cursor, each message once. (Messages 20-29 are read while
    10-19 are sent and 0-9 recorded.)"""
    sink = ScriptedSink(ok)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        store = relay.engine.store
        _slow_record(store, 0, 0.3)
        record_first_pass, read_first_pass = store.record_first_pass, store.read_first_pass
        recording: list[int] = []
        failed: list[bool] = []

        async def noting(chunk: Any, plan: Any, within: float = 0.0) -> None:
            recording.append(len(chunk.messages))
            try:
                await record_first_pass(chunk, plan, within)
            finally:
                recording.pop()

        async def fail_once(limit: int) -> Any:
            chunk = await read_first_pass(limit)
            if not failed and chunk.messages and json.loads(chunk.messages[0].payload)["n"] == 20:
                failed.append(recording == [10])
                store._reading = None  # what the store does when its read fails
                raise psycopg.OperationalError("the database went away while reading")
            return chunk

        store.record_first_pass = noting
        store.read_first_pass = fail_once  # type: ignore[method-assign]
        _commit_and_deliver(url, relay, 40)
    assert failed == [True], "the read of the chunk starting at message 20 failed mid-record"
    _each_once_in_key_order(sink, 40)


def test_a_chunk_that_queues_a_retry_is_recorded_before_the_next_is_sent(url: str) -> None:
    """A chunk whose record writes route_pending (a failure here) is not left recording
    while the next chunk goes out: that chunk's messages of the failed key must see the
    retry and queue behind it."""

    sink = ScriptedSink(_five_fails_once)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        _slow_record(relay.engine.store, 0, 0.3)
        _commit_and_deliver(url, relay, 30)
    assert sink.attempts[5] == 2
    _each_once_in_key_order(sink, 30)


def _slow_send(sink: ScriptedSink, first_n: int, seconds: float) -> list[str]:
    """Make the send of the batch starting at message ``first_n`` take ``seconds``; its start
    and end are noted as "send <n> begins" / "send <n> ends" in the list returned."""
    send = sink.send
    events: list[str] = []

    async def slow(route: Route, batch: Sequence[Outbound]) -> list[Result]:
        first = json.loads(batch[0].payload)["n"]
        if first == first_n:
            events.append(f"send {first} begins")
            await asyncio.sleep(seconds)
        results = await send(route, batch)
        if first == first_n:
            events.append(f"send {first} ends")
        return results

    sink.send = slow  # type: ignore[method-assign]
    return events


def _noting_reads(store: Any, events: list[str]) -> None:
    """Note "read <n>" in ``events`` when a read returns the chunk starting at message n."""
    read_first_pass = store.read_first_pass

    async def noting(limit: int) -> Any:
        chunk = await read_first_pass(limit)
        if chunk.messages:
            events.append(f"read {json.loads(chunk.messages[0].payload)['n']}")
        return chunk

    store.read_first_pass = noting


def _sends_and_reads(
    url: str, sink: ScriptedSink, slow: int, seconds: float, count: int
) -> list[str]:
    """Deliver ``count`` messages, committed at once, in chunks of 10, the send of the one
    starting at message ``slow`` taking ``seconds``: that send's and every read's events."""
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        events = _slow_send(sink, slow, seconds)
        _noting_reads(relay.engine.store, events)
        _commit_and_deliver(url, relay, count)
    return events


def test_the_next_chunk_is_read_while_one_is_sent(url: str) -> None:
    """A pipeline of three: while a chunk is sent, the next is read (and the one before is
    recorded). Sends stay one at a time and in order."""
    sink = ScriptedSink(ok)
    events = _sends_and_reads(url, sink, 10, 0.5, 40)
    during = events[events.index("send 10 begins") + 1 : events.index("send 10 ends")]
    assert during == ["read 20"], events
    _each_once_in_key_order(sink, 40)


def test_a_chunk_read_while_the_one_before_fails_queues_behind_the_retry(url: str) -> None:
    """The chunk read while the one before it is sent asked whether route_pending held
    anything before that send failed (it did not): its messages of the failed key must
    still queue behind the retry, never go out ahead of it."""

    sink = ScriptedSink(_five_fails_once)
    events = _sends_and_reads(url, sink, 0, 0.3, 30)
    assert events.index("read 10") < events.index("send 0 ends"), events
    assert sink.attempts[5] == 2
    order = sink.order_by_key()["k0"]
    assert order == sorted(order) == list(range(0, 30, KEYS)), "10, 15, ... after 5's retry"
    _each_once_in_key_order(sink, 30)


def test_a_database_error_while_a_chunk_is_read_ahead_skips_nothing(url: str) -> None:
    """The retry pass fails (the database went away) while the next chunk is already read:
    that chunk is dropped and read again from the cursor, never skipped."""

    sink = ScriptedSink(_five_fails_once)
    with relay_with(url, runtime("r", sink), batch_size=10) as relay:
        assert relay.engine is not None
        engine, store = relay.engine, relay.engine.store
        claim = store.claim_retry_pass
        failed: list[bool] = []

        async def fail_once(*args: Any, **kwargs: Any) -> Any:
            if not failed and engine._ahead is not None:
                await asyncio.wait([engine._ahead])  # the chunk after is read in full
                failed.append(True)
                raise psycopg.OperationalError("the database went away")
            return await claim(*args, **kwargs)

        store.claim_retry_pass = fail_once  # type: ignore[method-assign]
        _commit_and_deliver(url, relay, 40)
    assert failed == [True], "the retry pass failed while a chunk was read ahead"
    _each_once_in_key_order(sink, 40)


def test_a_record_whose_cursor_moved_commits_nothing_of_its_chunk(url: str) -> None:
    """The record checks, in its own transaction, that this relay still holds bucket 0 and
    the cursor is where the chunk follows on: when not (the bucket changed hands while the
    chunk was sent), it rolls back whole. No message leaves the outbox, no delivery is
    written, and the relay that holds bucket 0 now sends them. Once it holds bucket 0 again,
    the same record commits."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        _publish(conn, range(5))
    hold = (
        "INSERT INTO outbox.relay (relay_id, host, pid, expires_at) "
        "VALUES ('r1', 'h', 1, now() + interval '1 minute'); "
        "UPDATE outbox.bucket_lease SET holder = 'r1' WHERE bucket = 0"
    )

    async def record_twice() -> type[Exception] | None:
        store = Store.create(url, "outbox", "r1")
        await store.open()
        try:
            chunk = await store.read_first_pass(10)
            verdicts: dict[tuple[int, str], Any] = {
                (m.seq, "r"): Delivered(0, i) for i, m in enumerate(chunk.messages)
            }
            plan = plan_first_pass(chunk.messages, verdicts, {m.seq: ["r"] for m in chunk.messages})
            lost: type[Exception] | None = None
            try:
                await store.record_first_pass(chunk, plan)
            except FirstPassLost as exc:
                lost = type(exc)
            assert scalar(url, "SELECT count(*) FROM outbox.message") == 5
            assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 0
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute(hold)
            store.forget_first_pass()
            chunk = await store.read_first_pass(10)
            await store.record_first_pass(chunk, plan)
            return lost
        finally:
            await store.close()

    assert asyncio.run(record_twice()) is FirstPassLost
    assert scalar(url, "SELECT count(*) FROM outbox.message") == 0
    assert scalar(url, "SELECT count(*) FROM outbox.delivery") == 5
