"""SQL lives in ``-- name:`` files; every statement loads and takes a quoted schema."""

from __future__ import annotations

import string

import pytest
from psycopg import sql

from outbox_lib._sqlfiles import load_queries, parse_queries, with_schema

QUERY_FILES = [
    ("outbox_lib", "_sql/queries.sql"),
    ("outbox_lib", "_sql/migrate.sql"),
    ("relay", "sql/queries.sql"),
]


def test_parse_queries_splits_on_name_markers() -> None:
    text = """-- a header comment that belongs to no query
-- name: first
SELECT 1;

--   name:   second_2
-- a comment kept with its query
SELECT 2
  FROM t;
"""
    assert parse_queries(text) == {
        "first": "SELECT 1",
        "second_2": "-- a comment kept with its query\nSELECT 2\n  FROM t",
    }


def test_duplicate_query_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="'dup' is defined twice"):
        parse_queries("-- name: dup\nSELECT 1\n-- name: dup\nSELECT 2\n")


@pytest.mark.parametrize(("package", "filename"), QUERY_FILES)
def test_every_query_formats_with_a_schema(package: str, filename: str) -> None:
    queries = load_queries(package, filename)
    assert queries, f"{package}/{filename} has no queries"
    for name, statement in queries.items():
        assert statement, name
        # migrate.sql also takes literals ({key}, {version}, ...) so it can be written offline.
        names = {field for _, field, _, _ in string.Formatter().parse(statement) if field}
        literals = {n: sql.Literal(1) for n in names - {"schema"}}
        for schema, quoted in (("outbox", '"outbox"'), ("Weird", '"Weird"')):
            composed = sql.SQL(statement).format(schema=sql.Identifier(schema), **literals)
            text = composed.as_string(None)
            assert "{schema}" not in text, name
            if "{schema}" in statement:
                assert quoted in text, name


def test_schema_is_quoted_as_an_identifier_not_spliced() -> None:
    text = with_schema("SELECT * FROM {schema}.message", 'evil"; DROP TABLE x; --')
    assert text.as_string(None) == 'SELECT * FROM "evil""; DROP TABLE x; --".message'
