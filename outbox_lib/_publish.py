"""``publish`` and ``publish_async``: write a message in the caller's transaction.

One code path serves the four SQLAlchemy entry points (``Session``, ``Connection``,
``AsyncSession``, ``AsyncConnection``): validation and encoding happen first, then a single
call to the ``enqueue`` SQL function, which the SQL ``publish`` function uses too.

The active OpenTelemetry span's ``traceparent`` is added to the headers on the way
(:mod:`._tracecontext`). The SQL function cannot see the caller's span: SQL writers pass
``traceparent`` in its ``headers`` argument themselves.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, LargeBinary, String, TextClause, bindparam, text
from sqlalchemy.exc import DBAPIError, UnboundExecutionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session
from sqlalchemy.orm import Session, scoped_session

from ._encoding import DEFAULT_MAX_PAYLOAD_BYTES, EncodedMessage, check_schema_name, encode_message
from ._errors import (
    ConfigurationError,
    InvalidMessageError,
    OutboxError,
    PayloadTooLargeError,
    SchemaNotMigratedError,
    UnsupportedSessionError,
)
from ._sqlfiles import load_queries, with_schema
from ._tracecontext import with_trace_context

Headers = Mapping[str, str | bytes]
SyncTarget = Session | Connection | scoped_session[Any]
AsyncTarget = AsyncSession | AsyncConnection | async_scoped_session[Any]

# SQLSTATEs that mean "the outbox schema or its functions are not there".
_NOT_MIGRATED = {"3F000", "42883", "42P01"}
# SQLSTATEs the enqueue/publish functions raise for bad input.
_BAD_INPUT = {"22023", "22004", "22P02"}
_TOO_LARGE = "54000"


@dataclass(frozen=True)
class Outbox:
    """Publisher settings: the schema the outbox lives in and the payload size limit.

    The module-level :func:`publish` uses ``Outbox()``; build your own to change either::

        outbox = Outbox(schema="billing_outbox", max_payload_bytes=256 * 1024)
        outbox.publish(session, "invoices.issued", {"invoice": 12})
    """

    schema: str = "outbox"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    _statement: TextClause = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_schema_name(self.schema)
        if not isinstance(self.max_payload_bytes, int) or self.max_payload_bytes <= 0:
            raise ConfigurationError("max_payload_bytes must be a positive int")
        object.__setattr__(self, "_statement", _enqueue_statement(self.schema))

    def publish(
        self,
        session: SyncTarget,
        topic: str,
        payload: object,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        idempotency_key: str | None = None,
    ) -> uuid.UUID:
        """Write a message in ``session``'s current transaction and return its id.

        Nothing is committed: the message is delivered if and only if the caller commits.
        """
        if not isinstance(session, Session | Connection | scoped_session):
            raise unsupported(
                session, "Session or Connection", "outbox_lib.publish_async", _is_async
            )
        _check_postgres(session)
        params = self._params(topic, payload, key, headers, idempotency_key)
        return _as_uuid(scalar(session, self._statement, params))

    async def publish_async(
        self,
        session: AsyncTarget,
        topic: str,
        payload: object,
        *,
        key: str | bytes | None = None,
        headers: Headers | None = None,
        idempotency_key: str | None = None,
    ) -> uuid.UUID:
        """Async twin of :meth:`publish` for ``AsyncSession`` and ``AsyncConnection``."""
        if not isinstance(session, AsyncSession | AsyncConnection | async_scoped_session):
            raise unsupported(
                session, "AsyncSession or AsyncConnection", "outbox_lib.publish", _is_sync
            )
        _check_postgres(session)
        params = self._params(topic, payload, key, headers, idempotency_key)
        return _as_uuid(await scalar_async(session, self._statement, params))

    def _params(
        self, topic: object, payload: object, key: object, headers: object, idem: object
    ) -> dict[str, object]:
        headers = with_trace_context(headers)
        msg = encode_message(topic, payload, key, headers, idem, self.max_payload_bytes)
        return _bind_values(msg)


def scalar(session: SyncTarget, statement: TextClause, params: dict[str, object]) -> object:
    """Run one of the library's statements in the caller's transaction; errors translated."""
    try:
        return session.execute(statement, params).scalar_one()
    except DBAPIError as exc:
        raise _translate(exc) from exc


async def scalar_async(
    session: AsyncTarget, statement: TextClause, params: dict[str, object]
) -> object:
    """:func:`scalar` for ``AsyncSession`` and ``AsyncConnection``."""
    try:
        result = await session.execute(statement, params)
    except DBAPIError as exc:
        raise _translate(exc) from exc
    return result.scalar_one()


def _enqueue_statement(schema: str) -> TextClause:
    statement = with_schema(load_queries("outbox_lib", "_sql/queries.sql")["enqueue"], schema)
    return text(statement.as_string(None)).bindparams(
        bindparam("topic", type_=String),
        bindparam("payload", type_=LargeBinary),
        bindparam("content_type", type_=String),
        bindparam("msg_key", type_=LargeBinary),
        bindparam("headers", type_=String),
        bindparam("idempotency_key", type_=String),
    )


def _bind_values(msg: EncodedMessage) -> dict[str, object]:
    return {
        "topic": msg.topic,
        "payload": msg.payload,
        "content_type": msg.content_type,
        "msg_key": msg.key,
        "headers": msg.headers.decode("utf-8"),
        "idempotency_key": msg.idempotency_key,
    }


def _is_async(obj: object) -> bool:
    return isinstance(obj, AsyncSession | AsyncConnection | async_scoped_session)


def _is_sync(obj: object) -> bool:
    return isinstance(obj, Session | Connection | scoped_session)


def unsupported(
    obj: object, wanted: str, other: str, is_other: Callable[[object], bool]
) -> UnsupportedSessionError:
    """The error for a session of the wrong kind, pointing at ``other`` when it would do."""
    hint = f"; use {other}() for this one" if is_other(obj) else ""
    return UnsupportedSessionError(
        f"expected a SQLAlchemy {wanted}, got {type(obj).__name__}{hint}"
    )


def _bind_of(session: Any) -> object:
    try:
        return session.get_bind()
    except UnboundExecutionError:
        return None


def _check_postgres(target: object) -> None:
    """Refuse a session or connection that is not bound to PostgreSQL."""
    if isinstance(target, Connection):
        _check_dialect(target)
    elif isinstance(target, AsyncConnection):
        _check_dialect(target.sync_engine)
    else:
        _check_dialect(_bind_of(target))


def _check_dialect(bind: object) -> None:
    dialect = getattr(getattr(bind, "dialect", None), "name", None)
    if dialect != "postgresql":
        raise UnsupportedSessionError(
            f"the outbox needs PostgreSQL, but this session is bound to {dialect or 'nothing'}"
        )


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    for attr in ("sqlstate", "pgcode"):
        value = getattr(orig, attr, None)
        if isinstance(value, str):
            return value
    return None


def _translate(exc: DBAPIError) -> OutboxError | DBAPIError:
    state = _sqlstate(exc)
    detail = str(exc.orig).splitlines()[0] if exc.orig is not None else str(exc)
    if state in _NOT_MIGRATED:
        return SchemaNotMigratedError(
            f"the outbox schema is missing from this database ({detail}); "
            "run `outbox-relay migrate` first"
        )
    if state == _TOO_LARGE:
        return PayloadTooLargeError(detail)
    if state in _BAD_INPUT:
        return InvalidMessageError(detail)
    return exc


def _as_uuid(value: object) -> uuid.UUID:
    # Exactly uuid.UUID: asyncpg returns a subclass of its own that orjson refuses to
    # serialize, so its id could not go into the next message's payload.
    return value if type(value) is uuid.UUID else uuid.UUID(str(value))


_DEFAULT = Outbox()


def publish(
    session: SyncTarget,
    topic: str,
    payload: object,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """Write a message to the ``outbox`` schema in ``session``'s current transaction.

    ``session`` is a SQLAlchemy ``Session`` or ``Connection``. The message is delivered if and
    only if that transaction commits; ``publish`` never commits. Returns the message id::

        with Session(engine) as session, session.begin():
            session.add(Order(id=7))
            outbox_lib.publish(session, "orders.created", {"order_id": 7}, key="7")

    Publishing again with the same topic and ``idempotency_key`` returns the first message's id
    and delivers nothing new. Inside an OpenTelemetry span (the ``otel`` extra), the span's W3C
    ``traceparent`` and ``tracestate`` are stored among the headers, unless ``headers`` already
    has a ``traceparent``.
    """
    return _DEFAULT.publish(
        session, topic, payload, key=key, headers=headers, idempotency_key=idempotency_key
    )


async def publish_async(
    session: AsyncTarget,
    topic: str,
    payload: object,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    idempotency_key: str | None = None,
) -> uuid.UUID:
    """:func:`publish` for ``AsyncSession`` and ``AsyncConnection``."""
    return await _DEFAULT.publish_async(
        session, topic, payload, key=key, headers=headers, idempotency_key=idempotency_key
    )
