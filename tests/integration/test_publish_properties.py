"""``publish`` on a real PostgreSQL, over generated input (hypothesis).

Whatever is accepted is stored exactly as given; whatever is refused raises the documented
``InvalidMessageError`` before any SQL runs, so the caller's transaction goes on and commits
its other writes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib._encoding import decode_headers
from tests.harness.postgres import PgServer, fresh_database
from tests.integration.pg_helpers import migrate_url, sync_engine
from tests.unit.test_encoding_properties import (
    CONTAINERS,
    LONE_SURROGATE,
    with_a_non_finite_float,
)

pytestmark = pytest.mark.integration

TOPIC = "props.published"
TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
# One text in eight carries a lone surrogate, which every field must refuse.
ODD_TEXT = st.integers(0, 7).flatmap(
    lambda n: st.builds(lambda a, b, c: a + b + c, TEXT, LONE_SURROGATE, TEXT) if n == 0 else TEXT
)
# One payload in six holds a NaN or an infinity somewhere.
PAYLOADS = st.integers(0, 5).flatmap(
    lambda n: (
        with_a_non_finite_float().map(lambda case: case[0])
        if n == 0
        else CONTAINERS | ODD_TEXT | st.binary(max_size=64)
    )
)
HEADERS = st.none() | st.dictionaries(
    st.text(
        st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
        min_size=1,
        max_size=12,
    ).map(lambda name: "x-" + name),
    ODD_TEXT | st.binary(max_size=16),
    max_size=3,
)


@pytest.fixture(scope="module")
def shared_url(pg_server: PgServer) -> Iterator[str]:
    """One migrated database for a property test's many examples (nothing is committed)."""
    with fresh_database(pg_server) as url:
        migrate_url(url)
        yield url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    migrate_url(database_url)
    with sync_engine(database_url) as eng:
        yield eng


def stored(url: str, message_id: str) -> dict[str, Any]:
    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT payload, content_type, msg_key, headers, idempotency_key "
            "FROM outbox.message WHERE id = %s",
            (message_id,),
        ).fetchone()
    assert row is not None
    return row


def assert_stored_as_given(row: dict[str, Any], message: dict[str, Any]) -> None:
    payload, body = message["payload"], bytes(row["payload"])
    if isinstance(payload, str):
        assert (body, row["content_type"]) == (payload.encode(), "text/plain; charset=utf-8")
    elif isinstance(payload, bytes):
        assert (body, row["content_type"]) == (payload, "application/octet-stream")
    else:
        assert (orjson.loads(body), row["content_type"]) == (payload, "application/json")
    key = message["key"]
    assert (bytes(row["msg_key"]) if row["msg_key"] is not None else None) == (
        key.encode() if key is not None else None
    )
    given_headers = {
        name: value.encode() if isinstance(value, str) else value
        for name, value in (message["headers"] or {}).items()
    }
    assert dict(decode_headers(row["headers"])) == given_headers
    assert row["idempotency_key"] == message["idempotency_key"]


def test_accepted_input_is_stored_exactly_and_refused_input_leaves_the_transaction_usable(
    database_url: str, engine: Engine
) -> None:
    numbers = itertools.count()
    seen = {"accepted": 0, "refused": 0}

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        payload=PAYLOADS,
        key=st.none() | ODD_TEXT,
        headers=HEADERS,
        idempotency=st.none() | ODD_TEXT.filter(bool),
    )
    def publish_one(payload: Any, key: Any, headers: Any, idempotency: Any) -> None:
        n = next(numbers)
        # Idempotency keys are unique per topic: keep them so, or a repeat would be a no-op.
        unique = f"{idempotency}#{n}" if idempotency is not None else None
        message = {"payload": payload, "key": key, "headers": headers, "idempotency_key": unique}
        with Session(engine) as session, session.begin():
            before = outbox_lib.publish(session, TOPIC, {"before": n})
            try:
                message_id = outbox_lib.publish(session, TOPIC, **message)
            except outbox_lib.InvalidMessageError:
                message_id = None
            after = outbox_lib.publish(session, TOPIC, {"after": n})
        assert orjson.loads(bytes(stored(database_url, before)["payload"])) == {"before": n}
        assert orjson.loads(bytes(stored(database_url, after)["payload"])) == {"after": n}
        if message_id is None:
            seen["refused"] += 1
        else:
            seen["accepted"] += 1
            assert_stored_as_given(stored(database_url, message_id), message)

    publish_one()
    print(f"\npublish properties: {seen}")
    assert seen["accepted"] > 0 and seen["refused"] > 0


# What neither driver can send (NUL, lone surrogates) is refused client-side on both doors
# and tested above; here, everything else.
SENDABLE = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
ODD_CHARS = st.sampled_from([" ", "\t", "\n", "\x01", "\x7f", "\u2028", "\u3000", "\xa0"])


def sometimes(plain: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``plain`` three times in four."""
    return st.integers(0, 3).flatmap(lambda n: plain if n else odd)


PLAIN_TEXT = st.text(SENDABLE, min_size=1, max_size=20)
ODD_TEXT_ALL = st.builds(lambda a, b: a + b, PLAIN_TEXT, ODD_CHARS) | st.sampled_from(
    ["t" * 256, "k" * 513]
)
NAMES = sometimes(
    PLAIN_TEXT,
    st.sampled_from(["idempotency-key", "Outbox-Topic", "OUTBOX-MESSAGE-ID", ""]),
)


@settings(max_examples=150, deadline=None)
@given(
    topic=sometimes(PLAIN_TEXT, ODD_TEXT_ALL),
    headers=st.none() | st.dictionaries(NAMES, st.text(SENDABLE, max_size=8), max_size=2),
    idempotency_key=st.none() | sometimes(PLAIN_TEXT, ODD_TEXT_ALL),
)
def test_sql_and_python_accept_and_refuse_the_same_messages(
    shared_url: str, topic: str, headers: dict[str, str] | None, idempotency_key: str | None
) -> None:
    with sync_engine(shared_url) as engine, Session(engine) as session:
        try:
            outbox_lib.publish(session, topic, {}, headers=headers, idempotency_key=idempotency_key)
            python = "accepted"
        except outbox_lib.InvalidMessageError:
            python = "refused"
        session.rollback()
    with psycopg.connect(shared_url) as conn:
        try:
            conn.execute(
                "SELECT outbox.publish(%s, '{}'::jsonb, headers => %s::jsonb, "
                "idempotency_key => %s)",
                (topic, orjson.dumps(headers).decode() if headers is not None else None,
                 idempotency_key),
            )  # fmt: skip
            sql = "accepted"
        except psycopg.errors.InvalidParameterValue:
            sql = "refused"
        conn.rollback()
    assert python == sql, (topic, headers, idempotency_key)
