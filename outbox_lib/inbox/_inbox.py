"""The inbox proper: accept an idempotency key once, in the caller's transaction."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import String, TextClause, bindparam, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from .._encoding import (
    MAX_TOPIC_LENGTH,
    check_idempotency_key,
    check_schema_name,
    check_text,
    is_storable_text,
)
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
    returns ``False`` when a committed transaction already accepted the same idempotency key
    for the same topic, so the redelivery is skipped::

        inbox = Inbox("billing")

        with Session(engine) as session, session.begin():
            if inbox.accept(session, message.idempotency_key, topic=message.topic):
                session.add(Charge(order_id=message.json()["order_id"]))

    Deduplication is per topic, as idempotency keys are unique per topic at publish:
    ``orders.created`` and ``orders.paid`` published with one key are two messages, and each
    is accepted once. Without ``topic`` (the form before schema version 7), a key is
    accepted once whatever its topic.

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

    def accept(
        self, session: SyncTarget, idempotency_key: str, *, topic: str | None = None
    ) -> bool:
        """``True``: first time, process the message in this transaction. ``False``: skip it."""
        if not _is_sync(session):
            raise unsupported(session, "Session or Connection", "Inbox.accept_async", _is_async)
        _check_postgres(session)
        return bool(scalar(session, self._statement, self._params(idempotency_key, topic)))

    async def accept_async(
        self, session: AsyncTarget, idempotency_key: str, *, topic: str | None = None
    ) -> bool:
        """:meth:`accept` for ``AsyncSession`` and ``AsyncConnection``."""
        if not _is_async(session):
            raise unsupported(session, "AsyncSession or AsyncConnection", "Inbox.accept", _is_sync)
        _check_postgres(session)
        params = self._params(idempotency_key, topic)
        return bool(await scalar_async(session, self._statement, params))

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
                    if not self.accept(session, message.idempotency_key, topic=message.topic):
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
                    accepted = await self.accept_async(
                        session, message.idempotency_key, topic=message.topic
                    )
                    if not accepted:
                        return False
                    await fn(session, message)
                return True

            return once

        return decorate

    def _params(self, idempotency_key: object, topic: object) -> dict[str, Any]:
        if not isinstance(idempotency_key, str):  # publish's check also takes None (no key)
            raise InvalidMessageError(
                f"idempotency_key must be a non-empty str, got {type(idempotency_key).__name__}"
            )
        key = check_idempotency_key(idempotency_key)
        return {"consumer": self.consumer, "idempotency_key": key, "topic": _check_topic(topic)}


def _check_topic(topic: object) -> str | None:
    """The topic a key is accepted for; any text a delivery can carry (None: every topic)."""
    if topic is None:
        return None
    if not isinstance(topic, str):
        raise InvalidMessageError(f"topic must be a str or None, got {type(topic).__name__}")
    if not topic:
        raise InvalidMessageError("topic must not be empty (None accepts the key for every topic)")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidMessageError(f"topic is longer than {MAX_TOPIC_LENGTH} characters")
    return check_text("topic", topic)


def _accept_statement(schema: str) -> TextClause:
    statement = with_schema(load_queries("outbox_lib", "_sql/queries.sql")["inbox_accept"], schema)
    return text(statement.as_string(None)).bindparams(
        bindparam("consumer", type_=String),
        bindparam("idempotency_key", type_=String),
        bindparam("topic", type_=String),
    )
