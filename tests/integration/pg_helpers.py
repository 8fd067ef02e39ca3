"""Small helpers shared by the library's integration tests (real PostgreSQL, no mocks).

``database_url`` (see ``tests/conftest.py``) is a libpq URL, possibly
``postgresql://postgres:@/db?host=/socket/dir``. These helpers migrate it and turn it into
the SQLAlchemy URLs the psycopg and asyncpg dialects need.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import URL, Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import outbox_lib

_SCHEME = re.compile(r"^(postgres|postgresql)(\+[a-z0-9_]+)?://", re.IGNORECASE)


def migrate_url(url: str, schema: str = "outbox") -> list[int]:
    """Run ``outbox_lib.migrate`` on ``url`` with its own autocommit connection."""
    with psycopg.connect(url, autocommit=True) as conn:
        return outbox_lib.migrate(conn, schema)


def sa_url(url: str, driver: str = "psycopg") -> str:
    """libpq URL -> ``postgresql+psycopg://...``; path, credentials and query kept verbatim.

    psycopg hands the whole query string (``host=/socket/dir`` included) to libpq, so a
    textual scheme swap is all the psycopg dialect needs.
    """
    match = _SCHEME.match(url)
    assert match, f"not a PostgreSQL URL: {url!r}"
    return f"postgresql+{driver}://" + url[match.end() :]


# libpq parameters asyncpg understands under another name; anything else is refused.
_ASYNCPG_RENAMES = {"sslmode": "ssl", "connect_timeout": "timeout"}
_ASYNCPG_DROPPED = {"application_name"}


def asyncpg_url(url: str) -> URL:
    """The URL for SQLAlchemy's asyncpg dialect.

    asyncpg does not read libpq's query parameters: SQLAlchemy passes every query item as a
    keyword argument to ``asyncpg.connect``. The dialect does treat a ``host`` query item as
    the host (``_split_multihost_from_url``), and asyncpg treats a host starting with ``/`` as
    a unix-socket directory (connecting to ``<dir>/.s.PGSQL.<port>``), so a socket URL works
    if host and port travel as query items and the other libpq parameters are translated.
    """
    params = psycopg.conninfo.conninfo_to_dict(url)
    host = params.pop("host", None)
    port = params.pop("port", None)
    query: dict[str, str] = {}
    for name, value in list(params.items()):
        if name in {"user", "password", "dbname"}:
            continue
        if name in _ASYNCPG_DROPPED:
            continue
        if name not in _ASYNCPG_RENAMES:
            pytest.skip(f"asyncpg cannot take the libpq parameter {name!r} of the test URL")
        query[_ASYNCPG_RENAMES[name]] = str(value)
    host_s = str(host) if host is not None else None
    if host_s and "," in host_s:
        pytest.skip("asyncpg test helper does not handle multi-host libpq URLs")
    socket_dir = host_s is not None and host_s.startswith("/")
    if socket_dir:
        assert host_s is not None
        query["host"] = host_s
        if port is not None:
            query["port"] = str(port)
    return URL.create(
        "postgresql+asyncpg",
        username=str(params["user"]) if params.get("user") else None,
        password=str(params["password"]) if params.get("password") else None,
        host=None if socket_dir else host_s,
        port=None if socket_dir or port is None else int(port),
        database=str(params["dbname"]) if params.get("dbname") else None,
        query=query,
    )


@contextmanager
def sync_engine(url: str) -> Iterator[Engine]:
    engine = create_engine(sa_url(url))
    try:
        yield engine
    finally:
        engine.dispose()


def make_async_engine(url: str, driver: str) -> AsyncEngine:
    """``driver``: ``psycopg`` (psycopg's async mode) or ``asyncpg``."""
    if driver == "asyncpg":
        return create_async_engine(asyncpg_url(url))
    return create_async_engine(sa_url(url, "psycopg"))


def fetch(url: str, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    """Rows of ``query`` read on a brand-new connection (sees committed data only)."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def count(url: str, table: str = "outbox.message") -> int:
    rows = fetch(url, f"SELECT count(*) FROM {table}")
    return int(rows[0][0])
