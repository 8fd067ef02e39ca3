"""The relay's typed array parameters (relay.pgarrays) arrive as what they hold: every
element, NULLs, empty arrays, the extremes of each type, any text and any bytes."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from relay import pgarrays
from relay.pgarrays import BigintArray, ByteaArray, IntArray, TextArray

CASES: list[tuple[type[list[Any]], list[Any], str]] = [
    (BigintArray, [], "bigint"),
    (BigintArray, [1, -1, 0, 2**63 - 1, -(2**63)], "bigint"),
    (BigintArray, list(range(10**12, 10**12 + 1000)), "bigint"),
    (BigintArray, [None], "bigint"),
    (BigintArray, [1, None, 3], "bigint"),
    (IntArray, [], "integer"),
    (IntArray, [2**31 - 1, -(2**31), None, 0], "integer"),
    (TextArray, [], "text"),
    (TextArray, ["", "a", "é ☃ 𝄞", None, 'quote " back\\slash {brace}, comma', "NULL"], "text"),
    (ByteaArray, [], "bytea"),
    (ByteaArray, [b"", b"\x00\xff", None, bytes(range(256))], "bytea"),
    (ByteaArray, [b"key-%d" % i for i in range(1000)], "bytea"),
]


@pytest.mark.parametrize(("array", "values", "sql_type"), CASES)
def test_a_typed_array_arrives_element_for_element(
    database_url: str, array: type[list[Any]], values: list[Any], sql_type: str
) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgarrays.register(conn)
        row = conn.execute(
            f"SELECT %s::{sql_type}[], cardinality(%s::{sql_type}[])",  # type: ignore[arg-type]
            (array(values), array(values)),
        ).fetchone()
    assert row is not None
    got = [bytes(v) if isinstance(v, memoryview) else v for v in row[0]]
    assert got == values
    assert row[1] == len(values)


def test_typed_arrays_unnest_side_by_side(database_url: str) -> None:
    """The shape every record statement uses: several column arrays zipped by unnest."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        pgarrays.register(conn)
        rows = conn.execute(
            "SELECT * FROM unnest(%s::bigint[], %s::text[], %s::integer[], %s::bytea[])",
            (BigintArray([1, 2]), TextArray(["a", None]), IntArray([None, 7]),
             ByteaArray([b"k", None])),
        ).fetchall()  # fmt: skip
    assert rows == [(1, "a", None, b"k"), (2, None, 7, None)]


def test_without_registration_a_typed_array_is_an_ordinary_list(database_url: str) -> None:
    """A connection that never registered the dumpers still sends them, as psycopg's lists."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT %s::bigint[]", (BigintArray([5, None]),)).fetchone()
    assert row is not None and row[0] == [5, None]
