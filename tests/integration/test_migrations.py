"""``outbox_lib.migrate`` and the schema it creates, against a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from importlib import resources
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session

import outbox_lib
from outbox_lib._sqlfiles import parse_queries
from tests.integration.pg_helpers import count, fetch, migrate_url, sync_engine

pytestmark = pytest.mark.integration

KNOWN = [m.version for m in outbox_lib.available_migrations()]


def test_migrate_applies_everything_once(database_url: str) -> None:
    assert KNOWN[0] == 1
    assert migrate_url(database_url) == KNOWN
    assert migrate_url(database_url) == []
    with psycopg.connect(database_url) as conn:
        applied = outbox_lib.applied_versions(conn, "outbox")
    assert sorted(applied) == KNOWN
    expected = {m.version: m.checksum for m in outbox_lib.available_migrations()}
    assert applied == expected
    tables = {
        row[0]
        for row in fetch(
            database_url,
            "SELECT relname FROM pg_class WHERE relnamespace = 'outbox'::regnamespace "
            "AND relkind = 'r'",
        )
    }
    assert {"message", "idempotency", "schema_migrations"} <= tables


def test_concurrent_migrations_all_succeed(database_url: str) -> None:
    workers = 4
    barrier = threading.Barrier(workers)
    results: list[list[int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            with psycopg.connect(database_url, autocommit=True) as conn:
                barrier.wait(10)
                applied = outbox_lib.migrate(conn)
            with lock:
                results.append(applied)
        except BaseException as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == [[], [], [], KNOWN]
    rows = fetch(
        database_url, "SELECT version, count(*) FROM outbox.schema_migrations GROUP BY version"
    )
    assert sorted(rows) == [(v, 1) for v in KNOWN]


def test_tampered_checksum_names_the_file(database_url: str) -> None:
    migrate_url(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE outbox.schema_migrations SET checksum = 'tampered' WHERE version = 1")
        with pytest.raises(outbox_lib.MigrationError, match=r"0001_core\.sql"):
            outbox_lib.migrate(conn)


def test_database_ahead_of_code_says_upgrade(database_url: str) -> None:
    migrate_url(database_url)
    newer = KNOWN[-1] + 1
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO outbox.schema_migrations (version, name, checksum) "
            "VALUES (%s, 'future', 'x')",
            (newer,),
        )
        with pytest.raises(outbox_lib.MigrationError, match="upgrade") as info:
            outbox_lib.migrate(conn)
    assert str(newer) in str(info.value)


def test_functions_pin_their_search_path(database_url: str) -> None:
    """Decoys in ``public`` must not capture the functions' unqualified names."""
    migrate_url(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE public.message (LIKE outbox.message)")
        conn.execute("CREATE TABLE public.idempotency (LIKE outbox.idempotency)")
        conn.execute(
            "CREATE FUNCTION public.key_bucket(k bytea) RETURNS smallint "
            "LANGUAGE sql AS $$ SELECT 999::smallint $$"
        )
        conn.execute("LISTEN outbox_wakeup")
        sql_ids = []
        for path in ("public", "''"):
            conn.execute(f"SET search_path = {path}")
            with conn.transaction():
                row = conn.execute(
                    "SELECT outbox.publish('t.sp', '{\"a\": 1}'::jsonb, key => 'k', "
                    "idempotency_key => 'i-' || current_setting('search_path'))"
                ).fetchone()
                assert row is not None
                sql_ids.append(row[0])
        conn.execute("SET search_path = public")
        with sync_engine(database_url) as engine, Session(engine) as session:
            session.connection().exec_driver_sql("SET search_path = public")
            lib_id = outbox_lib.publish(session, "t.sp", {"a": 2}, key="k", idempotency_key="j")
            session.commit()
        notes = list(conn.notifies(timeout=1, stop_after=3))
    assert count(database_url, "public.message") == 0
    assert count(database_url, "public.idempotency") == 0
    rows = fetch(database_url, "SELECT id, bucket FROM outbox.message ORDER BY seq")
    assert [id_ for id_, _ in rows] == [*sql_ids, lib_id]
    # outbox.key_bucket, not the decoy (which would say 999).
    assert [bucket for _, bucket in rows] == [hashlib.sha256(b"k").digest()[0]] * 3
    assert count(database_url, "outbox.idempotency") == 3
    assert [n.channel for n in notes] == ["outbox_wakeup"] * 3


@pytest.mark.parametrize("via", ["sql", "python"])
def test_session_temp_table_does_not_capture_publish(database_url: str, via: str) -> None:
    migrate_url(database_url)
    with sync_engine(database_url) as engine, Session(engine) as session:
        session.connection().exec_driver_sql(
            "CREATE TEMP TABLE message (LIKE outbox.message INCLUDING ALL)"
        )
        if via == "sql":
            session.connection().exec_driver_sql("SELECT outbox.publish('t', '{}'::jsonb)")
        else:
            outbox_lib.publish(session, "t", {"a": 1})
        session.commit()
    assert count(database_url, "outbox.message") == 1


def test_two_schemas_in_one_database_are_independent(database_url: str) -> None:
    assert migrate_url(database_url, "a") == KNOWN
    assert migrate_url(database_url, "b") == KNOWN
    assert migrate_url(database_url, "a") == []
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Breaking a's history does not affect b.
        conn.execute("UPDATE a.schema_migrations SET checksum = 'tampered'")
        assert outbox_lib.migrate(conn, "b") == []
        with pytest.raises(outbox_lib.MigrationError):
            outbox_lib.migrate(conn, "a")
        ids = {
            schema: conn.execute(
                f"SELECT {schema}.publish('t', '{{}}'::jsonb, idempotency_key => 'same')"
            ).fetchone()
            for schema in ("a", "b")
        }
    assert ids["a"] != ids["b"]
    with sync_engine(database_url) as engine, Session(engine) as session, session.begin():
        a_id = outbox_lib.Outbox(schema="a").publish(session, "t", {}, idempotency_key="same")
        b_id = outbox_lib.Outbox(schema="b").publish(session, "t", {}, idempotency_key="x")
    assert (a_id,) == ids["a"]
    assert count(database_url, "a.message") == 1
    assert count(database_url, "b.message") == 2
    assert b_id != a_id
    assert fetch(database_url, "SELECT to_regnamespace('outbox')") == [(None,)]


# --------------------------------------------------------------------------- query plans


def _relay_query(name: str) -> str:
    text = resources.files("relay").joinpath("sql", "queries.sql").read_text("utf-8")
    return parse_queries(text)[name]


def _plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from _plan_nodes(child)


def test_wakeup_notification_per_schema(database_url: str) -> None:
    migrate_url(database_url, "a")
    migrate_url(database_url, "b")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN a_wakeup")
        listener.execute("LISTEN b_wakeup")
        with psycopg.connect(database_url) as conn:
            conn.execute("SELECT a.publish('t', '{}'::jsonb)")
            conn.execute("SELECT b.publish('t', '{}'::jsonb)")
            conn.commit()
            conn.execute("SELECT pg_notify('a_wakeup', 'sentinel')")
            conn.commit()
        channels: list[str] = []
        for note in listener.notifies(timeout=5):
            if note.payload == "sentinel":
                break
            channels.append(note.channel)
    assert sorted(channels) == ["a_wakeup", "b_wakeup"]
