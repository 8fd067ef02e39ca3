"""Load SQL from ``.sql`` files made of ``-- name: <query>`` blocks.

Keeping SQL in files (rather than Python strings) lets reviewers read every statement the
project runs in one place. Schema names are the only identifiers ever substituted, and only
through :func:`psycopg.sql.Identifier`.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

from psycopg import sql

_NAME = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """Split a ``-- name: x`` file into ``{name: statement}``."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"query {name!r} is defined twice")
        queries[name] = body.strip().rstrip(";")
    return queries


@cache
def load_queries(package: str, filename: str) -> dict[str, str]:
    """Read and parse a queries file shipped inside ``package``."""
    return parse_queries(resources.files(package).joinpath(filename).read_text("utf-8"))


def with_schema(statement: str, schema: str) -> sql.Composed:
    """Substitute ``{schema}`` in a statement with the quoted schema identifier."""
    return sql.SQL(statement).format(schema=sql.Identifier(schema))
