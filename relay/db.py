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


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# What libpq takes as a secret, or as the path to one: never shown.
_SECRET_KEYS = "password|sslpassword|passfile"  # noqa: S105 (the names, not values)
_QUERY_SECRET = re.compile(rf"(?i)(^|&)({_SECRET_KEYS})=[^&]*")
# The key=value form (``host=db password='a b'``): a value is quoted (backslash escapes) or
# runs to the next space.
_CONNINFO_SECRET = re.compile(rf"(?i)\b({_SECRET_KEYS})\s*=\s*(?:'(?:[^'\\]|\\.)*'?|\S*)")


def redact(url: str) -> str:
    """The database URL (or libpq key=value string) with every password, ``sslpassword`` and
    ``passfile``, in the user part or the query, replaced by ``***``."""
    if not _URL.match(url):
        return _CONNINFO_SECRET.sub(r"\1=***", url)
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable URL>"
    query = _QUERY_SECRET.sub(r"\1\2=***", parts.query)
    if password is None and query == parts.query:
        return url
    netloc = parts.netloc
    if password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe_connect_error(url: str, exc: psycopg.Error) -> DatabaseUnavailableError:
    """A one-line, password-free error for a failed connection."""
    first = one_line(exc)
    for secret in _secrets(url):
        first = first.replace(secret, "***")
    return DatabaseUnavailableError(f"cannot connect to the database {redact(url)}: {first}")


def _secrets(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    keys = set(_SECRET_KEYS.split("|"))
    found += [v for k, v in parse_qsl(parts.query) if k.lower() in keys and v]
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
