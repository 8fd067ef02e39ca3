"""The inbox proper: accept an idempotency key once, in the caller's transaction."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import String, TextClause, bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .._encoding import check_idempotency_key, check_schema_name, is_storable_text
from .._errors import ConfigurationError, InvalidMessageError
from .._publish import (
    AsyncTarget,
    SyncTarget,
    _check_postgres,
    _is_async,
    _is_sync,
    scalar,
    scalar_async,
    unsupported,
)
from .._sqlfiles import load_queries, with_schema
from ._message import InboxMessage

MAX_CONSUMER_LENGTH = 200

SyncHandler = Callable[[Session, InboxMessage], object]
AsyncHandler = Callable[[AsyncSession, InboxMessage], Awaitable[object]]


class Inbox:
    """Records which messages a consumer has processed, next to its business data.

    Call :meth:`accept` in the transaction that makes the message's business write; it
    returns ``False`` when a committed transaction already accepted the same idempotency key,
    so the redelivery is skipped::

        inbox = Inbox("billing")

        with Session(engine) as session, session.begin():
            if inbox.accept(session, message.idempotency_key):
                session.add(Charge(order_id=message.json()["order_id"]))

    A rollback takes the inbox row with it, so the next delivery is processed. Two
    transactions accepting the same key at once: the second waits for the first and gets
    ``False`` if it commits, ``True`` if it rolls back. ``consumer`` names the processing
    step: several consumers of one database each accept a message once.
    """

    def __init__(self, consumer: str, *, schema: str = "outbox") -> None:
        if (
            not isinstance(consumer, str)
            or not consumer
            or len(consumer) > MAX_CONSUMER_LENGTH
            or not is_storable_text(consumer)
        ):
            raise ConfigurationError(
                f"consumer must be a non-empty str of at most {MAX_CONSUMER_LENGTH} characters "
                f"without NUL or lone surrogates, got {consumer!r}"
            )
        self.consumer = consumer
        self.schema = check_schema_name(schema)
        self._statement = _accept_statement(self.schema)

    def __repr__(self) -> str:
        return f"Inbox({self.consumer!r}, schema={self.schema!r})"

    def accept(self, session: SyncTarget, idempotency_key: str) -> bool:
        """``True``: first time, process the message in this transaction. ``False``: skip it."""
        if not _is_sync(session):
            raise unsupported(session, "Session or Connection", "Inbox.accept_async", _is_async)
        _check_postgres(session)
        return bool(scalar(session, self._statement, self._params(idempotency_key)))

    async def accept_async(self, session: AsyncTarget, idempotency_key: str) -> bool:
        """:meth:`accept` for ``AsyncSession`` and ``AsyncConnection``."""
        if not _is_async(session):
            raise unsupported(session, "AsyncSession or AsyncConnection", "Inbox.accept", _is_sync)
        _check_postgres(session)
        return bool(await scalar_async(session, self._statement, self._params(idempotency_key)))

    def handler(
        self, sessions: Callable[[], Session]
    ) -> Callable[[SyncHandler], Callable[[InboxMessage], bool]]:
        """Decorate ``fn(session, message)`` to run once per message, in its own transaction.

        ``sessions`` makes a session (a ``sessionmaker``). The decorated function takes the
        message and returns ``True`` when it ran and committed, ``False`` for a duplicate. If
        ``fn`` raises, the transaction (inbox row included) rolls back and the error
        propagates, so the message is processed again when it is redelivered::

            @inbox.handler(sessionmaker(engine))
            def charge(session: Session, message: InboxMessage) -> None:
                session.add(Charge(order_id=message.json()["order_id"]))

            charge(InboxMessage.from_kafka(record))
        """

        def decorate(fn: SyncHandler) -> Callable[[InboxMessage], bool]:
            @functools.wraps(fn)
            def once(message: InboxMessage) -> bool:
                with sessions() as session, session.begin():
                    if not self.accept(session, message.idempotency_key):
                        return False
                    fn(session, message)
                return True

            return once

        return decorate

    def handler_async(
        self, sessions: Callable[[], AsyncSession]
    ) -> Callable[[AsyncHandler], Callable[[InboxMessage], Awaitable[bool]]]:
        """:meth:`handler` for coroutine functions and an ``async_sessionmaker``."""

        def decorate(fn: AsyncHandler) -> Callable[[InboxMessage], Awaitable[bool]]:
            @functools.wraps(fn)
            async def once(message: InboxMessage) -> bool:
                async with sessions() as session, session.begin():
                    if not await self.accept_async(session, message.idempotency_key):
                        return False
                    await fn(session, message)
                return True

            return once

        return decorate

    def _params(self, idempotency_key: object) -> dict[str, Any]:
        if not isinstance(idempotency_key, str):  # publish's check also takes None (no key)
            raise InvalidMessageError(
                f"idempotency_key must be a non-empty str, got {type(idempotency_key).__name__}"
            )
        key = check_idempotency_key(idempotency_key)
        return {"consumer": self.consumer, "idempotency_key": key}


def _accept_statement(schema: str) -> TextClause:
    statement = with_schema(load_queries("outbox_lib", "_sql/queries.sql")["inbox_accept"], schema)
    return text(statement.as_string(None)).bindparams(
        bindparam("consumer", type_=String), bindparam("idempotency_key", type_=String)
    )
