"""``outbox_lib.publish`` / ``publish_async`` against a real PostgreSQL (CONTRACT sections 3, 6)."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from sqlalchemy import Engine, event, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

import outbox_lib
from tests.integration.pg_helpers import (
    count,
    fetch,
    make_async_engine,
    migrate_url,
    sync_engine,
)

pytestmark = pytest.mark.integration

CHANNEL = "outbox_wakeup"


@pytest.fixture
def url(database_url: str) -> str:
    """A migrated database."""
    migrate_url(database_url)
    return database_url


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    with sync_engine(url) as eng:
        yield eng


def message_rows(url: str, where: str = "true", params: Any = None) -> list[dict[str, Any]]:
    with (
        psycopg.connect(url, autocommit=True) as conn,
        conn.cursor(row_factory=psycopg.rows.dict_row) as cur,
    ):
        cur.execute(
            "SELECT id, topic, msg_key, payload, content_type, headers, idempotency_key, bucket "
            f"FROM outbox.message WHERE {where} ORDER BY seq",
            params,
        )
        return cur.fetchall()


# --------------------------------------------------------------------------- transactions


def test_commit_delivers_one_row_with_the_returned_id(url: str, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        msg_id = outbox_lib.publish(session, "orders.created", {"order_id": 7}, key="7")
    assert isinstance(msg_id, uuid.UUID)
    rows = message_rows(url)
    assert [(r["id"], r["topic"]) for r in rows] == [(msg_id, "orders.created")]


def test_rollback_leaves_no_row(url: str, engine: Engine) -> None:
    with Session(engine) as session:
        session.begin()
        outbox_lib.publish(session, "orders.created", {"order_id": 7})
        session.rollback()
    assert count(url) == 0


def test_publish_never_commits(url: str, engine: Engine) -> None:
    with Session(engine) as session:
        msg_id = outbox_lib.publish(session, "orders.created", {"order_id": 1})
        # Visible inside the caller's transaction ...
        inside = session.execute(text("SELECT count(*) FROM outbox.message")).scalar_one()
        assert inside == 1
        # ... but not to anyone else until the caller commits.
        assert count(url) == 0
        assert session.in_transaction()
        session.commit()
    assert [r["id"] for r in message_rows(url)] == [msg_id]


def test_core_connection(url: str, engine: Engine) -> None:
    with engine.connect() as conn:
        msg_id = outbox_lib.publish(conn, "t.core", "hello")
        assert count(url) == 0
        conn.commit()
    assert [r["id"] for r in message_rows(url)] == [msg_id]


@pytest.mark.parametrize(
    ("driver", "kind"),
    [("psycopg", "session"), ("psycopg", "connection"), ("asyncpg", "session")],
)
def test_publish_async(url: str, driver: str, kind: str) -> None:
    async def run() -> uuid.UUID:
        engine = make_async_engine(url, driver)
        try:
            if kind == "session":
                async with AsyncSession(engine) as session:
                    msg_id = await outbox_lib.publish_async(
                        session, "t.async", {"n": 1}, key="k", headers={"h": "v"}
                    )
                    assert count(url) == 0  # not committed yet
                    await session.commit()
            else:
                async with engine.connect() as conn:
                    msg_id = await outbox_lib.publish_async(conn, "t.async", {"n": 1}, key="k")
                    assert count(url) == 0
                    await conn.commit()
            return msg_id
        finally:
            await engine.dispose()

    msg_id = asyncio.run(run())
    assert isinstance(msg_id, uuid.UUID)
    rows = message_rows(url)
    assert [(r["id"], r["payload"], r["msg_key"]) for r in rows] == [(msg_id, b'{"n":1}', b"k")]


def test_async_rollback_leaves_no_row(url: str) -> None:
    async def run() -> None:
        engine = make_async_engine(url, "psycopg")
        try:
            async with AsyncSession(engine) as session:
                await outbox_lib.publish_async(session, "t.async", {"n": 1})
                await session.rollback()
        finally:
            await engine.dispose()

    asyncio.run(run())
    assert count(url) == 0


# --------------------------------------------------------------------------- stored form


def test_dict_payload_is_json_with_rich_types(url: str, engine: Engine) -> None:
    when = dt.datetime(2024, 5, 17, 12, 30, 1, 250000, tzinfo=dt.UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    payload = {
        "at": when,
        "day": dt.date(2024, 5, 17),
        "id": ident,
        "total": decimal.Decimal("12.50"),
        "items": [1, "two", None, True],
        "name": "Zoë",
    }
    with Session(engine) as session, session.begin():
        outbox_lib.publish(session, "t.json", payload)
    (row,) = message_rows(url)
    assert row["content_type"] == "application/json"
    assert json.loads(bytes(row["payload"]).decode("utf-8")) == {
        "at": "2024-05-17T12:30:01.250000Z",
        "day": "2024-05-17",
        "id": "12345678-1234-5678-1234-567812345678",
        "total": "12.50",
        "items": [1, "two", None, True],
        "name": "Zoë",
    }
    assert bytes(row["payload"]).decode("utf-8")  # valid UTF-8


@pytest.mark.parametrize(
    ("payload", "stored", "content_type"),
    [
        ([1, 2], b"[1,2]", "application/json"),
        ("héllo", "héllo".encode(), "text/plain; charset=utf-8"),
        (b"\x00\xffraw", b"\x00\xffraw", "application/octet-stream"),
    ],
    ids=["list", "str", "bytes"],
)
def test_payload_forms(
    url: str, engine: Engine, payload: object, stored: bytes, content_type: str
) -> None:
    with Session(engine) as session, session.begin():
        outbox_lib.publish(session, "t.forms", payload)
    (row,) = message_rows(url)
    assert bytes(row["payload"]) == stored
    assert row["content_type"] == content_type


def test_key_and_headers_stored_form(url: str, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        outbox_lib.publish(
            session, "t.k", {}, key="clé", headers={"tenant": "acme", "sig": b"\x00\x01\xff"}
        )
        outbox_lib.publish(session, "t.k", {}, key=b"\x00bin")
        outbox_lib.publish(session, "t.k", {}, key=None)
    rows = message_rows(url)
    assert [None if r["msg_key"] is None else bytes(r["msg_key"]) for r in rows] == [
        "clé".encode(),
        b"\x00bin",
        None,
    ]
    assert rows[0]["headers"] == {"tenant": "acme", "sig": {"b64": "AAH/"}}
    assert rows[1]["headers"] == {}
    assert rows[2]["headers"] == {}


def test_bucket_is_the_first_byte_of_the_keys_sha256(url: str, engine: Engine) -> None:
    keys = [f"k{i}" for i in range(40)]
    with Session(engine) as session, session.begin():
        for k in keys + keys:
            outbox_lib.publish(session, "t.b", {}, key=k)
        for _ in range(20):
            outbox_lib.publish(session, "t.b", {}, key=None)
    rows = message_rows(url)
    keyed = [r for r in rows if r["msg_key"] is not None]
    assert len(keyed) == 80
    assert all(r["bucket"] == hashlib.sha256(bytes(r["msg_key"])).digest()[0] for r in keyed)
    by_key: dict[bytes, set[int]] = {}
    for r in rows:
        if r["msg_key"] is not None:
            by_key.setdefault(bytes(r["msg_key"]), set()).add(r["bucket"])
    assert len(by_key) == 40
    assert all(len(buckets) == 1 for buckets in by_key.values())
    assert len({b for s in by_key.values() for b in s}) > 1  # keys spread over buckets


# --------------------------------------------------------------------------- idempotency


def test_idempotency_same_transaction(url: str, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        first = outbox_lib.publish(session, "t.i", {"n": 1}, idempotency_key="order-1")
        second = outbox_lib.publish(session, "t.i", {"n": 2}, idempotency_key="order-1")
    assert first == second
    rows = message_rows(url)
    assert [(r["id"], r["idempotency_key"], bytes(r["payload"])) for r in rows] == [
        (first, "order-1", b'{"n":1}')
    ]


def test_idempotency_across_transactions_and_topics(url: str, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        first = outbox_lib.publish(session, "t.i", {"n": 1}, idempotency_key="order-1")
    with Session(engine) as session, session.begin():
        again = outbox_lib.publish(session, "t.i", {"n": 2}, idempotency_key="order-1")
        other_topic = outbox_lib.publish(session, "t.other", {"n": 3}, idempotency_key="order-1")
    assert again == first
    assert other_topic != first
    assert sorted((r["topic"], r["id"] == first) for r in message_rows(url)) == [
        ("t.i", True),
        ("t.other", False),
    ]


def test_idempotency_outlives_delivery(url: str, engine: Engine) -> None:
    with Session(engine) as session, session.begin():
        first = outbox_lib.publish(session, "t.i", {"n": 1}, idempotency_key="order-1")
    # The relay deletes a message row once every route has it.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM outbox.message WHERE id = %s", (first,))
    with Session(engine) as session, session.begin():
        again = outbox_lib.publish(session, "t.i", {"n": 2}, idempotency_key="order-1")
    assert again == first
    assert count(url) == 0
    assert fetch(url, "SELECT topic, idempotency_key, message_id FROM outbox.idempotency") == [
        ("t.i", "order-1", first)
    ]


def _second_publisher(engine: Engine, result: dict[str, Any]) -> threading.Thread:
    """Start a publisher of the same topic + idempotency key in its own transaction."""

    def second() -> None:
        try:
            with Session(engine) as session, session.begin():
                result["id"] = outbox_lib.publish(
                    session, "t.c", {"who": "second"}, idempotency_key="same"
                )
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    return thread


def test_idempotency_concurrent_publishers(url: str, engine: Engine) -> None:
    """The second publisher waits for the first's transaction, then returns its id."""
    result: dict[str, Any] = {}
    with Session(engine) as session:
        session.begin()
        first = outbox_lib.publish(session, "t.c", {"who": "first"}, idempotency_key="same")
        thread = _second_publisher(engine, result)
        thread.join(0.5)
        assert thread.is_alive(), f"second publisher did not block: {result}"
        session.commit()
    thread.join(10)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert result["id"] == first
    rows = message_rows(url)
    assert [(r["id"], bytes(r["payload"])) for r in rows] == [(first, b'{"who":"first"}')]


def test_idempotency_concurrent_first_rolls_back(url: str, engine: Engine) -> None:
    """If the first publisher rolls back, the waiting one writes its own message."""
    result: dict[str, Any] = {}
    with Session(engine) as session:
        session.begin()
        first = outbox_lib.publish(session, "t.c", {"who": "first"}, idempotency_key="same")
        thread = _second_publisher(engine, result)
        thread.join(0.3)
        assert thread.is_alive()
        session.rollback()
    thread.join(10)
    assert "error" not in result, result.get("error")
    assert result["id"] != first
    rows = message_rows(url)
    assert [(r["id"], bytes(r["payload"])) for r in rows] == [(result["id"], b'{"who":"second"}')]


# --------------------------------------------------------------------------- bad input


class _Unserializable:
    pass


@pytest.mark.parametrize(
    ("outbox", "args", "kwargs", "error", "words"),
    [
        (outbox_lib.Outbox(), ("", {"a": 1}), {}, outbox_lib.InvalidMessageError, "topic"),
        (
            outbox_lib.Outbox(),
            ("t.bad", {"a": _Unserializable()}),
            {},
            outbox_lib.InvalidMessageError,
            "serializ",
        ),
        (
            outbox_lib.Outbox(),
            ("t.bad", {"a": 1}),
            {"headers": {"n": 1}},
            outbox_lib.InvalidMessageError,
            "header 'n'",
        ),
        (
            outbox_lib.Outbox(max_payload_bytes=100),
            ("t.bad", "x" * 101),
            {},
            outbox_lib.PayloadTooLargeError,
            "limit",
        ),
    ],
    ids=["empty-topic", "unserializable", "header-int", "too-large"],
)
def test_bad_input_raises_before_writing_and_keeps_transaction(
    url: str,
    engine: Engine,
    outbox: outbox_lib.Outbox,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    error: type[Exception],
    words: str,
) -> None:
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    with Session(engine) as session, session.begin():
        session.execute(text("SELECT 1"))  # the transaction is open and has done work
        event.listen(engine, "before_cursor_execute", record)
        try:
            with pytest.raises(error, match=words) as info:
                outbox.publish(session, *args, **kwargs)
            assert isinstance(info.value, outbox_lib.OutboxError)
            assert statements == [], "SQL ran before the bad input was refused"
        finally:
            event.remove(engine, "before_cursor_execute", record)
        good = outbox.publish(session, "t.good", {"ok": True})
    assert [(r["id"], r["topic"]) for r in message_rows(url)] == [(good, "t.good")]


def test_non_sqlalchemy_session_is_refused(url: str) -> None:
    with (
        psycopg.connect(url) as conn,
        pytest.raises(outbox_lib.UnsupportedSessionError, match="SQLAlchemy"),
    ):
        outbox_lib.publish(conn, "t", {})  # type: ignore[arg-type]
    assert count(url) == 0


def test_unmigrated_database_says_to_migrate(database_url: str) -> None:
    with sync_engine(database_url) as engine, Session(engine) as session:
        with pytest.raises(outbox_lib.SchemaNotMigratedError, match="outbox-relay migrate"):
            outbox_lib.publish(session, "t", {"a": 1})
        session.rollback()


# --------------------------------------------------------------------------- schema


def test_custom_schema(database_url: str) -> None:
    migrate_url(database_url, "other")
    outbox = outbox_lib.Outbox(schema="other")
    with sync_engine(database_url) as engine, Session(engine) as session, session.begin():
        msg_id = outbox.publish(session, "t.s", {"a": 1}, idempotency_key="i")
        assert outbox.publish(session, "t.s", {"a": 2}, idempotency_key="i") == msg_id
    assert fetch(database_url, "SELECT id FROM other.message") == [(msg_id,)]
    assert fetch(database_url, "SELECT to_regnamespace('outbox')") == [(None,)]
    # The default publisher does not find an outbox in this database.
    with sync_engine(database_url) as engine, Session(engine) as session:
        with pytest.raises(outbox_lib.SchemaNotMigratedError):
            outbox_lib.publish(session, "t.s", {"a": 1})
        session.rollback()


# --------------------------------------------------------------------------- NOTIFY


def _notifications(listener: psycopg.Connection[Any], url: str) -> list[str]:
    """Payloads received on the channel up to a sentinel sent after everything else.

    Notifications are delivered in commit order, so once the sentinel arrives every
    notification of the transactions committed before it has arrived too.
    """
    sentinel = f"sentinel-{uuid.uuid4()}"
    with psycopg.connect(url, autocommit=True) as other:
        other.execute("SELECT pg_notify(%s, %s)", (CHANNEL, sentinel))
    seen: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for note in listener.notifies(timeout=deadline - time.monotonic()):
            if note.payload == sentinel:
                return seen
            assert note.channel == CHANNEL
            seen.append(note.payload)
    raise AssertionError("sentinel notification never arrived")


@pytest.fixture
def listener(url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"LISTEN {CHANNEL}")
        yield conn


@pytest.mark.parametrize(
    ("transactions", "commit", "expected"),
    [(1, True, 1), (2, True, 2), (1, False, 0)],
    ids=["one-tx-50-messages", "two-tx", "rolled-back"],
)
def test_notify_at_most_once_per_transaction(
    url: str,
    engine: Engine,
    listener: psycopg.Connection[Any],
    transactions: int,
    commit: bool,
    expected: int,
) -> None:
    for t in range(transactions):
        with Session(engine) as session:
            session.begin()
            for i in range(50):
                outbox_lib.publish(session, "t.n", {"t": t, "i": i}, key=str(i % 7))
            if commit:
                session.commit()
            else:
                session.rollback()
    assert len(_notifications(listener, url)) == expected
    assert count(url) == (50 * transactions if commit else 0)


def test_notify_survives_rolled_back_savepoint(
    url: str, engine: Engine, listener: psycopg.Connection[Any]
) -> None:
    """A publish in a savepoint that is rolled back must not use up the transaction's NOTIFY."""
    with Session(engine) as session:
        session.begin()
        nested = session.begin_nested()
        outbox_lib.publish(session, "t.n", {"i": 0})
        nested.rollback()
        kept = outbox_lib.publish(session, "t.n", {"i": 1})
        outbox_lib.publish(session, "t.n", {"i": 2})
        session.commit()
    assert len(_notifications(listener, url)) == 1
    assert message_rows(url)[0]["id"] == kept
    assert count(url) == 2


def test_stored_payload_matches_orjson(url: str, engine: Engine) -> None:
    """The bytes stored are exactly what a consumer gets; no re-encoding by the database."""
    payload = {"b": 1, "a": [1.5, "x"], "nested": {"z": None}}
    with Session(engine) as session, session.begin():
        outbox_lib.publish(session, "t.raw", payload)
    (row,) = message_rows(url)
    assert bytes(row["payload"]) == orjson.dumps(payload)
