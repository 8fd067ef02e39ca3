"""Database URLs and connections.

Both URL forms of the contract are accepted: libpq (``postgresql://user@host/db``,
``?host=/socket/dir``) and SQLAlchemy (``postgresql+psycopg://...``). Passwords never leave
this module: :func:`redact` is what logs and errors show.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import psycopg

from outbox_lib import DatabaseUnavailableError, SchemaNotMigratedError

from .errors import ConfigError, one_line

_SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)


def to_libpq(url: str) -> str:
    """Normalise a SQLAlchemy or libpq URL to what psycopg accepts."""
    match = _SCHEME.match(url)
    if not match:
        raise ConfigError(
            f"database URL {redact(url)!r} must start with postgresql:// (or postgresql+psycopg://)"
        )
    return "postgresql://" + url[match.end() :]


_QUERY_PASSWORD = re.compile(r"(?i)(^|&)(password)=[^&]*")


def redact(url: str) -> str:
    """The URL with any password (user part or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    query = _QUERY_PASSWORD.sub(r"\1\2=***", parts.query)
    if parts.password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe_connect_error(url: str, exc: psycopg.Error) -> DatabaseUnavailableError:
    """A one-line, password-free error for a failed connection."""
    first = one_line(exc)
    for secret in _passwords(url):
        first = first.replace(secret, "***")
    return DatabaseUnavailableError(f"cannot connect to the database {redact(url)}: {first}")


def _passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [v for k, v in parse_qsl(parts.query) if k.lower() == "password" and v]
    return found


def connect(url: str, *, autocommit: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """A synchronous connection for CLI commands, with errors made readable."""
    libpq = to_libpq(url)
    try:
        return psycopg.connect(libpq, autocommit=autocommit, connect_timeout=10)
    except psycopg.Error as exc:
        raise describe_connect_error(url, exc) from exc


@contextmanager
def schema_required(schema: str) -> Iterator[None]:
    """Turn "no such table/column/function" from an operator command's queries into
    :class:`SchemaNotMigratedError`: the schema is missing or older than this code."""
    try:
        yield
    except (
        psycopg.errors.UndefinedTable,
        psycopg.errors.UndefinedColumn,
        psycopg.errors.UndefinedFunction,
    ) as exc:
        raise SchemaNotMigratedError(
            f"schema {schema!r} is missing outbox tables or is out of date "
            f"({one_line(exc)}); run `outbox-relay migrate` first"
        ) from exc
