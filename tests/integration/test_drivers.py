"""``publish`` / ``publish_async`` on every supported driver (CONTRACT section 3, issue 6).

The matrix: sync psycopg 3 and psycopg2, async psycopg 3 and asyncpg, each through its session
form (``Session`` / ``AsyncSession``) and its connection form (``Connection`` /
``AsyncConnection``). Every test runs on all eight against a real PostgreSQL.

A :class:`Handle` gives the eight one blocking surface, so each test is written once: async
handles drive their session on an ``asyncio.Runner`` of their own, which keeps one event loop
(and so one pooled connection) alive across calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox_lib
from tests.harness.relay import sqlalchemy_url
from tests.integration.pg_helpers import count, fetch

pytestmark = pytest.mark.integration

DEFAULT = outbox_lib.Outbox()


@dataclass(frozen=True)
class Combo:
    driver: str  # the SQLAlchemy driver: postgresql+<driver>://
    is_async: bool
    form: str  # "session" or "connection"

    @property
    def id(self) -> str:
        return f"{'async' if self.is_async else 'sync'}-{self.driver}-{self.form}"


COMBOS = [
    Combo(driver, is_async, form)
    for driver, is_async in [
        ("psycopg", False),
        ("psycopg2", False),
        ("psycopg", True),
        ("asyncpg", True),
    ]
    for form in ("session", "connection")
]


class Handle:
    """One session or connection of one combo, driven synchronously."""

    def __init__(self, target: Any, sync_engine: Engine, runner: asyncio.Runner | None) -> None:
        self.target = target
        self.sync_engine = sync_engine  # where cursor events fire, async engines included
        self._runner = runner

    def _call(self, value: Any) -> Any:
        """The sync result as is, or an async call's coroutine run to its end."""
        return value if self._runner is None else self._runner.run(value)

    def publish(self, *args: Any, outbox: outbox_lib.Outbox = DEFAULT, **kw: Any) -> uuid.UUID:
        if self._runner is None:
            return outbox.publish(self.target, *args, **kw)
        return self._runner.run(outbox.publish_async(self.target, *args, **kw))

    def scalar(self, sql: str) -> Any:
        return self._call(self.target.execute(text(sql))).scalar_one()

    def commit(self) -> None:
        self._call(self.target.commit())

    def rollback(self) -> None:
        self._call(self.target.rollback())


@contextmanager
def _sync_handle(combo: Combo, url: str) -> Iterator[Handle]:
    engine = create_engine(sqlalchemy_url(url, combo.driver))
    try:
        target = Session(engine) if combo.form == "session" else engine.connect()
        with target:
            yield Handle(target, engine, None)
    finally:
        engine.dispose()


@contextmanager
def _async_handle(combo: Combo, url: str) -> Iterator[Handle]:
    async def connect() -> AsyncConnection:
        return await engine.connect()

    with asyncio.Runner() as runner:
        engine = create_async_engine(sqlalchemy_url(url, combo.driver))
        try:
            target = AsyncSession(engine) if combo.form == "session" else runner.run(connect())
            try:
                yield Handle(target, engine.sync_engine, runner)
            finally:
                runner.run(target.close())
        finally:
            # Disposing on the loop the connections were made on: asyncpg and psycopg
            # otherwise warn about connections garbage-collected unclosed.
            runner.run(engine.dispose())


@pytest.fixture(params=COMBOS, ids=lambda c: c.id)
def combo(request: pytest.FixtureRequest) -> Combo:
    combo: Combo = request.param
    return combo


@pytest.fixture
def open_handle(combo: Combo) -> Iterator[Callable[[str], Handle]]:
    """``open_handle(url)``: a new handle of this test's combo, closed after the test."""
    with ExitStack() as stack:
        factory = _async_handle if combo.is_async else _sync_handle
        yield lambda url: stack.enter_context(factory(combo, url))


def stored(url: str) -> list[tuple[Any, ...]]:
    """Committed messages as (id, topic, payload, content_type, key, headers, idem key)."""
    return fetch(
        url,
        "SELECT id, topic, payload, content_type, msg_key, headers, idempotency_key "
        "FROM outbox.message ORDER BY seq",
    )


# --------------------------------------------------------------------------- commit / rollback

WHEN = dt.datetime(2024, 5, 17, 12, 30, 1, 250000, tzinfo=dt.UTC)
IDENT = uuid.UUID("12345678-1234-5678-1234-567812345678")

# (payload, key, headers) -> (stored payload, content type, stored key, stored headers)
FORMS = {
    "dict": (
        ({"at": WHEN, "id": IDENT, "total": decimal.Decimal("12.50"), "name": "Zoë"}, "k-7",
         {"tenant": "acme", "sig": b"\x00\x01\xff"}),
        (b'{"at":"2024-05-17T12:30:01.250000Z","id":"12345678-1234-5678-1234-567812345678",'
         b'"total":"12.50","name":"Zo\xc3\xab"}', "application/json", b"k-7",
         {"tenant": "acme", "sig": {"b64": "AAH/"}}),
    ),
    "str": (
        ("héllo 100%s", b"\x00\xffkey", None),
        ("héllo 100%s".encode(), "text/plain; charset=utf-8", b"\x00\xffkey", {}),
    ),
    "bytes": (
        (b"\x00\xff\\x00'raw", None, {"%(x)s": "%"}),
        (b"\x00\xff\\x00'raw", "application/octet-stream", None, {"%(x)s": "%"}),
    ),
}  # fmt: skip


@pytest.mark.parametrize("form", FORMS)
def test_commit_stores_exactly_the_row(
    url: str, open_handle: Callable[[str], Handle], form: str
) -> None:
    (payload, key, headers), (body, content_type, stored_key, stored_headers) = FORMS[form]
    handle = open_handle(url)
    msg_id = handle.publish("t.forms", payload, key=key, headers=headers)
    assert type(msg_id) is uuid.UUID
    assert count(url) == 0  # written in the caller's transaction, not committed by publish
    handle.commit()
    assert stored(url) == [
        (msg_id, "t.forms", body, content_type, stored_key, stored_headers, None)
    ]


def test_rollback_leaves_nothing(url: str, open_handle: Callable[[str], Handle]) -> None:
    handle = open_handle(url)
    handle.publish("t.rb", {"n": 1}, idempotency_key="once")
    assert handle.scalar("SELECT count(*) FROM outbox.message") == 1
    handle.rollback()
    assert count(url) == 0
    assert count(url, "outbox.idempotency") == 0
    # The key was released with the rollback: the next transaction writes a new message.
    again = handle.publish("t.rb", {"n": 2}, idempotency_key="once")
    handle.commit()
    assert [row[0] for row in stored(url)] == [again]


def test_idempotency_same_and_later_transaction(
    url: str, open_handle: Callable[[str], Handle]
) -> None:
    handle = open_handle(url)
    first = handle.publish("t.i", {"n": 1}, idempotency_key="order-1")
    assert handle.publish("t.i", {"n": 2}, idempotency_key="order-1") == first
    handle.commit()
    assert handle.publish("t.i", {"n": 3}, idempotency_key="order-1") == first
    # The same key under another topic is another message; the returned id is a plain
    # uuid.UUID on every driver, so it can go into a payload.
    other_topic = handle.publish("t.other", {"ref": first}, idempotency_key="order-1")
    handle.commit()
    assert other_topic != first
    assert [(r[0], r[1], r[2]) for r in stored(url)] == [
        (first, "t.i", b'{"n":1}'),
        (other_topic, "t.other", b'{"ref":"%s"}' % str(first).encode()),
    ]


def _wait_for_lock_wait(url: str, pid: int, thread: threading.Thread) -> None:
    """Return once backend ``pid`` waits on a lock; fail if the thread ends first."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and thread.is_alive():
        rows = fetch(url, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
        if rows == [("Lock",)]:
            return
        time.sleep(0.01)
    raise AssertionError("the second publisher never waited for the first one's lock")


def test_concurrent_idempotency_key_waits_for_the_first(
    url: str, open_handle: Callable[[str], Handle]
) -> None:
    first, second = open_handle(url), open_handle(url)
    first_id = first.publish("t.c", {"who": "first"}, idempotency_key="same")
    second_pid = second.scalar("SELECT pg_backend_pid()")
    result: dict[str, Any] = {}

    def publish_second() -> None:
        try:
            result["id"] = second.publish("t.c", {"who": "second"}, idempotency_key="same")
            second.commit()
        except BaseException as exc:
            result["error"] = exc

    # An async handle's runner may run in this other thread: no other thread uses it meanwhile.
    thread = threading.Thread(target=publish_second, daemon=True)
    thread.start()
    _wait_for_lock_wait(url, second_pid, thread)
    first.commit()
    thread.join(10)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert result["id"] == first_id
    assert [(r[0], r[2]) for r in stored(url)] == [(first_id, b'{"who":"first"}')]


# --------------------------------------------------------------------------- errors


# jsonb (headers) and text (idempotency key) cannot hold U+0000: _encoding refuses it, so
# every driver raises the same InvalidMessageError instead of its own error.
TOO_SMALL = outbox_lib.Outbox(max_payload_bytes=8)
BAD_INPUT = [
    pytest.param(TOO_SMALL, "123456789", {}, outbox_lib.PayloadTooLargeError,
                 "9 bytes, over the limit of 8", id="too-large"),
    pytest.param(DEFAULT, {}, {"headers": {"n": 1}}, outbox_lib.InvalidMessageError, "'n'",
                 id="header-value-int"),
    pytest.param(DEFAULT, {}, {"headers": {1: "v"}}, outbox_lib.InvalidMessageError, "names",
                 id="header-name-int"),
    pytest.param(DEFAULT, {}, {"headers": {"h": "a\x00b"}}, outbox_lib.InvalidMessageError,
                 "NUL", id="header-value-nul"),
    pytest.param(DEFAULT, {}, {"idempotency_key": "a\x00b"}, outbox_lib.InvalidMessageError,
                 "NUL", id="idempotency-key-nul"),
]  # fmt: skip


@pytest.mark.parametrize(("outbox", "payload", "kwargs", "error", "words"), BAD_INPUT)
def test_bad_input_is_refused_before_any_sql(
    url: str,
    open_handle: Callable[[str], Handle],
    outbox: outbox_lib.Outbox,
    payload: object,
    kwargs: dict[str, Any],
    error: type[outbox_lib.OutboxError],
    words: str,
) -> None:
    handle = open_handle(url)
    handle.scalar("SELECT 1")  # the transaction is open and has done work
    statements: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        statements.append(statement)

    event.listen(handle.sync_engine, "before_cursor_execute", record)
    try:
        with pytest.raises(error, match=words):
            handle.publish("t.bad", payload, outbox=outbox, **kwargs)
    finally:
        event.remove(handle.sync_engine, "before_cursor_execute", record)
    assert statements == [], "SQL ran before the bad input was refused"
    good = handle.publish("t.good", "ok", outbox=outbox)
    handle.commit()
    assert [(r[0], r[1]) for r in stored(url)] == [(good, "t.good")]


def test_unmigrated_database_says_to_migrate(
    database_url: str, open_handle: Callable[[str], Handle]
) -> None:
    handle = open_handle(database_url)
    with pytest.raises(outbox_lib.SchemaNotMigratedError, match="run `outbox-relay migrate`") as e:
        handle.publish("t", {"a": 1})
    assert isinstance(e.value.__cause__, DBAPIError)  # the driver's error, kept as the cause
    handle.rollback()
    assert handle.scalar("SELECT 1") == 1


def _raise_on_insert(sqlstate: str) -> str:
    """A trigger that refuses every message with ``sqlstate``, as a database-side guard would."""
    return f"""
        CREATE FUNCTION outbox.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'refused by the database' USING ERRCODE = '{sqlstate}'; END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON outbox.message
            FOR EACH ROW EXECUTE FUNCTION outbox.refuse();
    """


# enqueue itself raises only for what publish has already refused (an empty topic), so the
# SQL-side errors come from the database around it: a guard trigger, or a damaged schema.
SQL_SIDE = {
    "trigger-54000": (_raise_on_insert("54000"), outbox_lib.PayloadTooLargeError, "refused"),
    "trigger-22023": (_raise_on_insert("22023"), outbox_lib.InvalidMessageError, "refused"),
    "enqueue-dropped-42883": (
        "DROP FUNCTION outbox.enqueue",
        outbox_lib.SchemaNotMigratedError,
        "outbox-relay migrate",
    ),
    "table-dropped-42P01": (
        "DROP TABLE outbox.idempotency",
        outbox_lib.SchemaNotMigratedError,
        "outbox-relay migrate",
    ),
    "untranslated-P0001": (_raise_on_insert("P0001"), DBAPIError, "refused by the database"),
}


@pytest.mark.parametrize("case", SQL_SIDE)
def test_sql_side_errors_are_translated_by_sqlstate(
    url: str, open_handle: Callable[[str], Handle], case: str
) -> None:
    setup, error, words = SQL_SIDE[case]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(setup)
    handle = open_handle(url)
    with pytest.raises(error, match=words) as info:
        handle.publish("t.sql", {"a": 1}, idempotency_key="k")
    if error is DBAPIError:  # a SQLSTATE the library has no meaning for passes through
        assert not isinstance(info.value, outbox_lib.OutboxError)
    else:
        assert isinstance(info.value.__cause__, DBAPIError)
    handle.rollback()
    assert handle.scalar("SELECT 1") == 1
    assert count(url) == 0
