"""``outbox_lib.publish`` refuses what it cannot use before any SQL runs.

No test here connects anywhere: engines are created (which never connects) and, where a
connection attempt would prove a bug, a ``do_connect`` hook turns the attempt into an error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import ModuleType

import pytest
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import outbox_lib

# Port 1 on loopback is closed: if SQL ever ran we would get a connection error, not ours.
_CLOSED_PG = "postgresql+psycopg://u@127.0.0.1:1/x"


class ConnectAttempted(Exception):
    pass


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    engine = create_engine(_CLOSED_PG)

    @event.listens_for(engine, "do_connect")
    def refuse(*_: object) -> None:
        raise ConnectAttempted("publish tried to reach the database")

    yield engine
    engine.dispose()


class NotASession:
    def execute(self, *_: object) -> None:
        raise AssertionError("publish must not call execute on an unsupported object")


def test_non_sqlalchemy_object_is_rejected_before_use() -> None:
    with pytest.raises(outbox_lib.UnsupportedSessionError, match="got NotASession"):
        outbox_lib.publish(NotASession(), "t", {"a": 1})  # type: ignore[arg-type]


def test_async_session_given_to_publish_points_to_publish_async() -> None:
    engine = create_async_engine("postgresql+psycopg://u@localhost/x")
    session = AsyncSession(engine)
    with pytest.raises(outbox_lib.UnsupportedSessionError, match=r"publish_async\(\)"):
        outbox_lib.publish(session, "t", {"a": 1})  # type: ignore[arg-type]


def test_sync_session_given_to_publish_async_points_to_publish(pg_engine: Engine) -> None:
    with (
        Session(pg_engine) as session,
        pytest.raises(
            outbox_lib.UnsupportedSessionError,
            match=r"expected a SQLAlchemy AsyncSession or AsyncConnection, got Session; "
            r"use outbox_lib\.publish\(\)",
        ),
    ):
        asyncio.run(outbox_lib.publish_async(session, "t", {"a": 1}))  # type: ignore[arg-type]


def test_sqlite_session_is_rejected_as_not_postgresql() -> None:
    engine = create_engine("sqlite://")
    with (
        Session(engine) as session,
        pytest.raises(outbox_lib.UnsupportedSessionError, match=r"needs PostgreSQL.*sqlite"),
    ):
        outbox_lib.publish(session, "t", {"a": 1})
    engine.dispose()


def test_sqlite_scoped_session_is_rejected_as_not_postgresql() -> None:
    engine = create_engine("sqlite://")
    session = scoped_session(sessionmaker(bind=engine))
    with pytest.raises(outbox_lib.UnsupportedSessionError, match="sqlite"):
        outbox_lib.publish(session, "t", {"a": 1})
    session.remove()
    engine.dispose()


def test_bad_payload_raises_before_any_sql(pg_engine: Engine) -> None:
    with (
        Session(pg_engine) as session,
        pytest.raises(outbox_lib.InvalidMessageError, match="not JSON-serializable"),
    ):
        outbox_lib.publish(session, "orders.created", {"when": object()})


def test_bad_topic_and_headers_raise_before_any_sql(pg_engine: Engine) -> None:
    with Session(pg_engine) as session:
        with pytest.raises(outbox_lib.InvalidMessageError, match="empty"):
            outbox_lib.publish(session, "", {"a": 1})
        with pytest.raises(outbox_lib.InvalidMessageError, match="reserved"):
            outbox_lib.publish(session, "t", {"a": 1}, headers={"outbox-topic": "x"})


def test_valid_message_does_reach_the_database(pg_engine: Engine) -> None:
    # The control for the two tests above: a valid call does try to connect.
    with Session(pg_engine) as session, pytest.raises(ConnectAttempted):
        outbox_lib.publish(session, "orders.created", {"a": 1})


def test_outbox_payload_limit_raises_before_any_sql(pg_engine: Engine) -> None:
    outbox = outbox_lib.Outbox(max_payload_bytes=4)
    with Session(pg_engine) as session, pytest.raises(outbox_lib.PayloadTooLargeError):
        outbox.publish(session, "t", b"12345")


def test_bad_payload_async_raises_before_any_sql() -> None:
    engine = create_async_engine(_CLOSED_PG)

    async def go() -> None:
        async with AsyncSession(engine) as session:
            await outbox_lib.publish_async(session, "t", {1, 2, object()})

    with pytest.raises(outbox_lib.InvalidMessageError, match="payload must be"):
        asyncio.run(go())


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"schema": "bad-name"}, "plain SQL identifier"), ({"max_payload_bytes": 0}, "positive")],
)
def test_outbox_settings_are_validated(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(outbox_lib.ConfigurationError, match=problem):
        outbox_lib.Outbox(**kwargs)  # type: ignore[arg-type]


def test_unbound_session_is_an_outbox_error() -> None:
    with Session() as session, pytest.raises(outbox_lib.UnsupportedSessionError):
        outbox_lib.publish(session, "t", {"a": 1})


def _isort_key(name: str) -> tuple[int, str]:
    # ruff RUF022 order: CONSTANTS, then Classes, then functions.
    kind = 0 if name.isupper() else 1 if name[0].isupper() else 2
    return kind, name


def test_all_matches_the_public_names() -> None:
    # Public submodules (outbox_lib.inbox, outbox_lib.alembic) are imported by name, not via *.
    public = {
        name
        for name, value in vars(outbox_lib).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }
    assert set(outbox_lib.__all__) == public
    assert outbox_lib.__all__ == sorted(outbox_lib.__all__, key=_isort_key)
    assert all(hasattr(outbox_lib, name) for name in outbox_lib.__all__)
    assert {"publish", "publish_async", "OutboxError"} <= public
