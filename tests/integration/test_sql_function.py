"""The SQL entry point ``outbox.publish(...)`` (CONTRACT section 2), against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy.orm import Session

import outbox_lib
from tests.integration.pg_helpers import count, migrate_url, sync_engine

pytestmark = pytest.mark.integration


@pytest.fixture
def url(database_url: str) -> str:
    migrate_url(database_url)
    return database_url


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection[Any]]:
    """An ordinary (non-autocommit) connection: every test controls its transactions."""
    with psycopg.connect(url) as c:
        yield c


def scalar(conn: psycopg.Connection[Any], query: str, params: Any = None) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, autocommit=True) as c, c.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT id, topic, msg_key, payload, content_type, headers, idempotency_key, bucket "
            "FROM outbox.message ORDER BY seq"
        )
        return cur.fetchall()


def test_publish_returns_uuid_and_stores_jsonb_text(
    url: str, conn: psycopg.Connection[Any]
) -> None:
    msg_id = scalar(conn, """SELECT outbox.publish('t', '{"a":1}'::jsonb)""")
    assert isinstance(msg_id, uuid.UUID)
    assert count(url) == 0  # the caller's transaction decides
    conn.commit()
    (row,) = rows(url)
    assert row["id"] == msg_id
    assert row["topic"] == "t"
    assert bytes(row["payload"]) == b'{"a": 1}'
    assert row["content_type"] == "application/json"
    assert row["msg_key"] is None
    assert row["headers"] == {}
    assert row["idempotency_key"] is None


def test_named_parameters(url: str, conn: psycopg.Connection[Any]) -> None:
    msg_id = scalar(
        conn,
        "SELECT outbox.publish('orders.created', %s::jsonb, key => 'k', "
        "headers => '{\"tenant\": \"acme\"}'::jsonb, idempotency_key => 'order-7')",
        (json.dumps({"order_id": 7, "name": "Zoë"}),),
    )
    conn.commit()
    (row,) = rows(url)
    assert row["id"] == msg_id
    assert bytes(row["msg_key"]) == b"k"
    assert row["bucket"] == hashlib.sha256(b"k").digest()[0]
    assert row["headers"] == {"tenant": "acme"}
    assert row["idempotency_key"] == "order-7"
    assert json.loads(bytes(row["payload"]).decode("utf-8")) == {"order_id": 7, "name": "Zoë"}


def test_same_key_same_bucket_as_python(url: str, conn: psycopg.Connection[Any]) -> None:
    """SQL and Python writers of one key land in the same bucket (same key bytes)."""
    conn.execute("SELECT outbox.publish('t', '{}'::jsonb, key => 'cust-42')")
    conn.commit()
    with sync_engine(url) as engine, Session(engine) as session, session.begin():
        outbox_lib.publish(session, "t", {}, key="cust-42")
    buckets = {(bytes(r["msg_key"]), r["bucket"]) for r in rows(url)}
    assert len(buckets) == 1


def test_idempotency_dedupe(url: str, conn: psycopg.Connection[Any]) -> None:
    query = "SELECT outbox.publish(%s, '{}'::jsonb, idempotency_key => 'once')"
    first = scalar(conn, query, ("t",))
    same_tx = scalar(conn, query, ("t",))
    conn.commit()
    next_tx = scalar(conn, query, ("t",))
    other_topic = scalar(conn, query, ("t2",))
    conn.commit()
    assert first == same_tx == next_tx
    assert other_topic != first
    assert sorted(r["topic"] for r in rows(url)) == ["t", "t2"]
    # Python publishers share the same idempotency table.
    with sync_engine(url) as engine, Session(engine) as session, session.begin():
        assert outbox_lib.publish(session, "t", {"x": 1}, idempotency_key="once") == first
    assert count(url) == 2


@pytest.mark.parametrize(
    "headers",
    ["[1, 2]", '"x"', '{"a": 1}', '{"a": null}', '{"a": {"b": "c"}}', '{"ok": "y", "a": true}'],
)
def test_bad_headers_raise_22023_and_write_nothing(
    url: str, conn: psycopg.Connection[Any], headers: str
) -> None:
    conn.execute("SELECT outbox.publish('t', '{}'::jsonb)")  # earlier work in the same tx
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT outbox.publish('t', '{}'::jsonb, headers => %s::jsonb)", (headers,))
    assert info.value.sqlstate == "22023"
    assert "header" in str(info.value)
    conn.rollback()
    assert count(url) == 0
    assert count(url, "outbox.idempotency") == 0


def test_bad_header_inside_savepoint_keeps_transaction(
    url: str, conn: psycopg.Connection[Any]
) -> None:
    """Nothing half-written: rolling back to a savepoint is enough to carry on."""
    good = scalar(conn, "SELECT outbox.publish('t', '{}'::jsonb)")
    with pytest.raises(psycopg.errors.InvalidParameterValue), conn.transaction():
        conn.execute(
            "SELECT outbox.publish('t', '{}'::jsonb, headers => '{\"a\": 1}', "
            "idempotency_key => 'k')"
        )
    conn.commit()
    assert [r["id"] for r in rows(url)] == [good]
    assert count(url, "outbox.idempotency") == 0


def test_payload_limit_setting(url: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute("SET outbox.max_payload_bytes = 50")
    small = json.dumps({"a": "x" * 20})
    large = json.dumps({"a": "x" * 60})
    conn.execute("SELECT outbox.publish('t', %s::jsonb)", (small,))
    conn.commit()
    with pytest.raises(psycopg.Error) as info:
        conn.execute("SELECT outbox.publish('t', %s::jsonb)", (large,))
    assert info.value.sqlstate == "54000"
    assert "50" in str(info.value)
    conn.rollback()
    assert count(url) == 1


@pytest.mark.parametrize(
    ("call", "sqlstate"),
    [
        ("SELECT outbox.publish('t', NULL)", "22004"),
        ("SELECT outbox.publish('t', NULL::jsonb, key => 'k')", "22004"),
        ("SELECT outbox.publish(NULL, '{}'::jsonb)", "22023"),
        ("SELECT outbox.publish('', '{}'::jsonb)", "22023"),
        ("SELECT outbox.publish('t', '{}'::jsonb, idempotency_key => '')", "22023"),
    ],
    ids=["null-payload", "null-payload-with-key", "null-topic", "empty-topic", "empty-idem-key"],
)
def test_invalid_arguments_raise(
    url: str, conn: psycopg.Connection[Any], call: str, sqlstate: str
) -> None:
    with pytest.raises(psycopg.Error) as info:
        conn.execute(call)
    assert info.value.sqlstate == sqlstate
    assert "outbox" in str(info.value)
    conn.rollback()
    assert count(url) == 0


def test_publish_from_trigger(url: str, conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "CREATE TABLE orders (id int PRIMARY KEY, customer text NOT NULL, total numeric NOT NULL)"
    )
    conn.execute(
        """
        CREATE FUNCTION orders_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM outbox.publish('orders.created', row_to_json(NEW)::jsonb,
                                   key => NEW.customer,
                                   idempotency_key => 'order-' || NEW.id || '-created');
            RETURN NULL;
        END $$
        """
    )
    conn.execute(
        "CREATE TRIGGER orders_outbox AFTER INSERT ON orders "
        "FOR EACH ROW EXECUTE FUNCTION orders_outbox()"
    )
    conn.commit()

    conn.execute("INSERT INTO orders VALUES (1, 'alice', 12.50), (2, 'bob', 3), (3, 'alice', 7.25)")
    assert count(url) == 0
    conn.commit()
    conn.execute("INSERT INTO orders VALUES (4, 'carol', 1)")
    conn.rollback()

    stored = rows(url)
    assert [json.loads(bytes(r["payload"])) for r in stored] == [
        {"id": 1, "customer": "alice", "total": 12.50},
        {"id": 2, "customer": "bob", "total": 3},
        {"id": 3, "customer": "alice", "total": 7.25},
    ]
    assert [bytes(r["msg_key"]) for r in stored] == [b"alice", b"bob", b"alice"]
    assert [r["idempotency_key"] for r in stored] == [f"order-{i}-created" for i in (1, 2, 3)]
    assert {r["topic"] for r in stored} == {"orders.created"}
    assert all(r["content_type"] == "application/json" for r in stored)
    assert stored[0]["bucket"] == stored[2]["bucket"]
    assert count(url, "outbox.idempotency") == 3


# -- one set of rules at every door -------------------------------------------------------

WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()]
SAME_RULES = [
    pytest.param({"topic": "x" * 256}, "topic is longer than 255 characters", id="long-topic"),
    *(
        pytest.param(
            {"topic": f"orders{c}created"},
            "contains whitespace or control characters",
            id=f"topic-U+{ord(c):04X}",
        )
        for c in [*WHITESPACE, "\x01", "\x7f"]
    ),
    pytest.param({"headers": {"": "v"}}, "header names must be non-empty", id="empty-header"),
    *(
        pytest.param({"headers": {name: "x"}}, f"header '{name}' is reserved", id=name)
        for name in [
            "idempotency-key",
            "Outbox-Message-Id",
            "OUTBOX-TOPIC",
            "outbox-topic-signature",
            "Outbox-Anything-Later",
        ]
    ),
    pytest.param(
        {"idempotency_key": "k" * 513},
        "idempotency_key is longer than 512 characters",
        id="long-key",
    ),
    *(
        pytest.param(
            {"idempotency_key": key},
            "must be printable ASCII with no space at either end; it travels as an HTTP header",
            id=name,
        )
        for name, key in [
            ("key-newline", "order\n7"),
            ("key-del", "order\x7f7"),
            ("key-non-ascii", "bestellung-ü-1"),
            ("key-nbsp", "order\xa07"),
            ("key-leading-space", " order-7"),
            ("key-trailing-space", "order-7 "),
            ("key-space-only", " "),
        ]
    ),
]


@pytest.mark.parametrize(
    "arguments",
    [
        {"headers": {"idempotency-\u212aey": "x"}},  # KELVIN SIGN: not ASCII, not the header
        {"headers": {"x-outbox-topic": "x", "outbox": "x"}},
        {"idempotency_key": "order 7 / payment ~#!"},
        {"idempotency_key": "k" * 512},
    ],
)
def test_sql_and_python_accept_the_same_near_misses(
    url: str, conn: psycopg.Connection[Any], arguments: dict[str, Any]
) -> None:
    call = {"headers": None, "idempotency_key": None, **arguments}
    with sync_engine(url) as engine, Session(engine) as session, session.begin():
        outbox_lib.publish(session, "orders.created", {}, **call)
    conn.execute(
        "SELECT outbox.publish('orders.other', '{}'::jsonb, headers => %s::jsonb, "
        "idempotency_key => %s)",
        (json.dumps(call["headers"]) if call["headers"] else None, call["idempotency_key"]),
    )
    conn.commit()
    assert count(url) == 2


@pytest.mark.parametrize(("arguments", "refusal"), SAME_RULES)
def test_sql_and_python_refuse_the_same_input_in_the_same_words(
    url: str, conn: psycopg.Connection[Any], arguments: dict[str, Any], refusal: str
) -> None:
    call = {"topic": "orders.created", "headers": None, "idempotency_key": None, **arguments}
    with (
        sync_engine(url) as engine,
        Session(engine) as session,
        pytest.raises(outbox_lib.InvalidMessageError) as python,
    ):
        outbox_lib.publish(session, call["topic"], {}, **_without_topic(call))
    with pytest.raises(psycopg.errors.InvalidParameterValue) as sql:
        conn.execute(
            "SELECT outbox.publish(%s, '{}'::jsonb, headers => %s::jsonb, "
            "idempotency_key => %s)",
            (call["topic"], json.dumps(call["headers"]) if call["headers"] else None,
             call["idempotency_key"]),
        )  # fmt: skip
    conn.rollback()
    assert refusal in str(python.value)
    assert str(sql.value.diag.message_primary).startswith("outbox.publish: ")
    assert refusal in str(sql.value.diag.message_primary)
    assert count(url) == 0


def _without_topic(call: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in call.items() if k != "topic"}
