"""``outbox-relay migrate`` as operators run it (CONTRACT sections 2 and 4)."""

from __future__ import annotations

import time

import pytest

import outbox_lib
from tests.acceptance.cli import (
    error_lines,
    query,
    run_cli,
    scalar,
    sqlalchemy_url,
    start_cli,
)

pytestmark = pytest.mark.acceptance

TABLES = ("message", "route_pending", "delivery", "dead_letter", "idempotency", "schema_migrations")
VERSIONS = [m.version for m in outbox_lib.available_migrations()]


def _tables(database_url: str, schema: str) -> set[str]:
    rows = query(
        database_url,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = %(s)s",
        {"s": schema},
    )
    return {row[0] for row in rows}


def _schemas(database_url: str) -> set[str]:
    rows = query(database_url, "SELECT nspname FROM pg_namespace")
    return {row[0] for row in rows}


def test_migrate_applies_on_a_fresh_database_then_reports_up_to_date(database_url: str) -> None:
    env = {"OUTBOX_DATABASE_URL": database_url}

    first = run_cli("migrate", env=env)

    assert first.returncode == 0, first.stderr
    assert "applied" in first.stdout
    for version in VERSIONS:
        assert str(version) in first.stdout
    assert set(TABLES) <= _tables(database_url, "outbox")
    assert scalar(database_url, "SELECT to_regclass('outbox.message') IS NOT NULL") is True
    applied = query(database_url, "SELECT version FROM outbox.schema_migrations ORDER BY 1")
    assert [row[0] for row in applied] == VERSIONS
    # The SQL entry point for non-Python writers exists and works.
    msg_id = scalar(database_url, "SELECT outbox.publish('t', '{\"a\": 1}'::jsonb)")
    assert (
        scalar(database_url, "SELECT count(*) FROM outbox.message WHERE id = %(i)s", {"i": msg_id})
        == 1
    )

    second = run_cli("migrate", env=env)

    assert second.returncode == 0, second.stderr
    assert "up to date" in second.stdout
    assert "applied" not in second.stdout
    assert scalar(database_url, "SELECT count(*) FROM outbox.schema_migrations") == len(VERSIONS)
    assert scalar(database_url, "SELECT count(*) FROM outbox.message") == 1, "data kept"


def test_migrate_into_a_custom_schema_creates_everything_there(database_url: str) -> None:
    result = run_cli("migrate", "--schema", "custom_s", env={"OUTBOX_DATABASE_URL": database_url})

    assert result.returncode == 0, result.stderr
    assert "custom_s" in result.stdout
    assert set(TABLES) <= _tables(database_url, "custom_s")
    assert "outbox" not in _schemas(database_url)
    msg_id = scalar(database_url, "SELECT custom_s.publish('t', '{}'::jsonb)")
    assert (
        scalar(database_url, "SELECT topic FROM custom_s.message WHERE id = %(i)s", {"i": msg_id})
        == "t"
    )


def test_concurrent_migrations_all_succeed_and_apply_each_version_once(
    database_url: str,
) -> None:
    env = {"OUTBOX_DATABASE_URL": database_url}
    procs = [start_cli("migrate", env=env) for _ in range(4)]
    try:
        results = [(*p.communicate(timeout=60), p.returncode) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()

    for _out, err, code in results:
        assert code == 0, err
    outputs = [out for out, _err, _code in results]
    assert sum("applied" in out for out in outputs) == 1, outputs
    assert sum("up to date" in out for out in outputs) == 3, outputs
    rows = query(
        database_url, "SELECT version, count(*) FROM outbox.schema_migrations GROUP BY version"
    )
    assert sorted(rows) == [(v, 1) for v in VERSIONS]
    assert set(TABLES) <= _tables(database_url, "outbox")


def test_migrate_accepts_the_sqlalchemy_url_form(database_url: str) -> None:
    url = sqlalchemy_url(database_url)
    assert url.startswith("postgresql+psycopg://")

    result = run_cli("migrate", "--database-url", url)

    assert result.returncode == 0, result.stderr
    assert "applied" in result.stdout
    assert set(TABLES) <= _tables(database_url, "outbox")


def test_migrate_against_an_unreachable_database_fails_fast_with_one_clean_line() -> None:
    url = "postgresql://u:secretpw@127.0.0.1:1/x"
    started = time.monotonic()
    assert run_cli("migrate").returncode == 2  # fails before connecting: the start-up cost
    startup = time.monotonic() - started
    started = time.monotonic()

    result = run_cli("migrate", env={"OUTBOX_DATABASE_URL": url}, timeout=30)

    # A refused connection fails at once: no retry, no wait for the 10 s connect timeout.
    assert time.monotonic() - started < 2 * startup + 2
    assert result.returncode == 1, "an unreachable database is a failure, not a usage error"
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error:")
    assert "database" in lines[0]
    assert "127.0.0.1" in lines[0]
    assert "secretpw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_migrate_without_a_database_url_is_a_usage_error() -> None:
    result = run_cli("migrate")

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("outbox-relay: error:")
    assert "OUTBOX_DATABASE_URL" in lines[0] and "--database-url" in lines[0]


def test_a_key_value_database_string_is_refused_without_its_password() -> None:
    dsn = "host=127.0.0.1 port=1 user=u password=SECRET sslpassword=KEYPW dbname=shop"
    result = run_cli("migrate", "--database-url", dsn)

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert "must start with postgresql://" in lines[0]
    assert "SECRET" not in result.stderr + result.stdout
    assert "KEYPW" not in result.stderr + result.stdout
