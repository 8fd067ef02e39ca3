"""``outbox_lib.alembic`` driven by real Alembic commands on a real PostgreSQL.

The reference for every check is ``outbox_lib.migrate``: a database migrated by Alembic must
have exactly the catalog (tables, columns, constraints, indexes, functions) and the
``schema_migrations`` rows of one migrated by ``migrate`` to the same version, and each
down-migration must give back exactly the catalog of the version before.
"""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from psycopg import sql
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

import outbox_lib
import outbox_lib.alembic
from tests.harness.postgres import PgServer, fresh_database
from tests.harness.relay import sqlalchemy_url
from tests.integration.pg_helpers import fetch, migrate_url, sync_engine

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "alembic"
KNOWN = outbox_lib.available_migrations()
HEAD = len(KNOWN)

CATALOG = {
    "schema": "SELECT nspname FROM pg_namespace WHERE nspname = %(s)s",
    "relations": """
        SELECT relname, relkind::text, relpersistence::text, coalesce(reloptions, '{}')::text
          FROM pg_class WHERE relnamespace = to_regnamespace(%(s)s) ORDER BY 1""",
    # By name, not position: a down-migration adds a column the up-migration dropped back at
    # the end of its table (0009 and message.claimed_by).
    "columns": """
        SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = to_regnamespace(%(s)s) AND a.attnum > 0 AND NOT a.attisdropped
         ORDER BY c.relname, a.attname""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = to_regnamespace(%(s)s) ORDER BY 1, 2""",
    "indexes": """
        SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
          FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         WHERE c.relnamespace = to_regnamespace(%(s)s) ORDER BY 1""",
    "functions": """
        SELECT oid::regprocedure::text, pg_get_functiondef(oid)
          FROM pg_proc WHERE pronamespace = to_regnamespace(%(s)s) ORDER BY 1""",
}
HISTORY = "SELECT version, name, checksum FROM {}.schema_migrations ORDER BY version"


def catalog(url: str, schema: str = "outbox") -> dict[str, list[tuple[Any, ...]]]:
    """The schema's objects, and its ``schema_migrations`` rows under "history"."""
    with psycopg.connect(url, autocommit=True) as conn:
        found = {name: conn.execute(q, {"s": schema}).fetchall() for name, q in CATALOG.items()}
        if found["schema"]:
            found["history"] = conn.execute(
                sql.SQL(HISTORY).format(sql.Identifier(schema))
            ).fetchall()
        return found


@pytest.fixture(scope="module")
def reference(pg_server: PgServer) -> Iterator[dict[int, dict[str, list[tuple[Any, ...]]]]]:
    """The catalog ``outbox_lib.migrate`` produces at each version, 0 (nothing) to head."""
    with fresh_database(pg_server) as url:
        snapshots = {0: catalog(url)}
        with psycopg.connect(url, autocommit=True) as conn:
            for version in range(1, HEAD + 1):
                assert outbox_lib.migrate(conn, to_version=version) == [version]
                snapshots[version] = catalog(url)
        assert all(snapshots[HEAD][part] for part in CATALOG)  # the dump sees the schema
        yield snapshots


def example_config(url: str | None, output: io.StringIO | None = None) -> Config:
    cfg = Config(str(EXAMPLE / "alembic.ini"), output_buffer=output)
    cfg.attributes["database_url"] = url
    cfg.attributes["configure_logger"] = False
    return cfg


STEP = '''"""Outbox schema version {v}."""
from alembic import op

import outbox_lib.alembic

revision = "outbox_{v}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version={p}, to_version={v})


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version={v}, to_version={p})
'''


def stepwise_config(url: str | None, directory: Path, output: io.StringIO | None = None) -> Config:
    """An Alembic project (the example's env.py) with one revision per outbox version, as an
    application gets by adding a revision for each outbox-relay release it adopts."""
    (directory / "versions").mkdir(parents=True)
    shutil.copy(EXAMPLE / "env.py", directory / "env.py")
    for v in range(1, HEAD + 1):
        down = f"outbox_{v - 1}" if v > 1 else None
        step = STEP.format(v=v, p=v - 1, down=down)
        (directory / "versions" / f"outbox_{v}.py").write_text(step, "utf-8")
    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(directory))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("prepend_sys_path", str(EXAMPLE))
    cfg.attributes["database_url"] = url
    return cfg


def offline_script(run: Any, cfg: Config, buffer: io.StringIO, *args: Any) -> str:
    run(cfg, *args, sql=True)
    return buffer.getvalue()


def run_script(url: str, script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run an offline script the way a DBA would: psql, stopping at the first error."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    path = tmp_path / "migration.sql"
    path.write_text(script, "utf-8")
    return subprocess.run(
        [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def history(url: str, schema: str = "outbox") -> list[tuple[Any, ...]]:
    return fetch(url, f"SELECT version, name, checksum, applied_at FROM {schema}.schema_migrations")


def publish_one(url: str, schema: str = "outbox") -> None:
    with sync_engine(url) as engine, Session(engine) as session, session.begin():
        outbox_lib.Outbox(schema=schema).publish(session, "orders.created", {"order_id": 1})


# --------------------------------------------------------------------------------- online


def test_upgrade_head_equals_migrate_and_leaves_migrate_nothing(
    database_url: str, reference: dict[int, Any]
) -> None:
    command.upgrade(example_config(database_url), "head")
    assert catalog(database_url) == reference[HEAD]
    expected = [(m.version, m.name, m.checksum) for m in KNOWN]
    assert catalog(database_url)["history"] == expected
    assert migrate_url(database_url) == []
    publish_one(database_url)
    assert fetch(database_url, "SELECT topic FROM outbox.message") == [("orders.created",)]
    # The app's own tables and Alembic's stayed on the app's search_path.
    assert fetch(database_url, "SELECT to_regclass('public.orders') IS NOT NULL") == [(True,)]
    assert fetch(database_url, "SELECT version_num FROM public.alembic_version") == [
        ("0007_outbox_10",)
    ]


def test_autogenerate_sees_no_difference(database_url: str) -> None:
    cfg = example_config(database_url)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if autogenerate would add or drop anything, outbox included


def test_each_down_migration_restores_the_previous_version(
    database_url: str, reference: dict[int, Any], tmp_path: Path
) -> None:
    cfg = stepwise_config(database_url, tmp_path / "project")
    command.upgrade(cfg, "head")
    assert catalog(database_url) == reference[HEAD]
    for version in range(HEAD, 0, -1):
        command.downgrade(cfg, "-1")
        assert catalog(database_url) == reference[version - 1], f"down from {version}"
    assert fetch(database_url, "SELECT to_regnamespace('outbox')") == [(None,)]
    for version in range(1, HEAD + 1):
        command.upgrade(cfg, "+1")
        assert catalog(database_url) == reference[version], f"up to {version}"


def test_downgrade_to_base_drops_the_outbox_keeps_the_app_then_upgrades_again(
    database_url: str, reference: dict[int, Any]
) -> None:
    cfg = example_config(database_url)
    command.upgrade(cfg, "head")
    publish_one(database_url)
    command.downgrade(cfg, "0001_orders")
    assert catalog(database_url) == reference[0]
    assert fetch(database_url, "SELECT count(*) FROM public.orders") == [(0,)]
    command.upgrade(cfg, "head")
    assert catalog(database_url) == reference[HEAD]
    assert fetch(database_url, "SELECT count(*) FROM outbox.message") == [(0,)]
    command.downgrade(cfg, "base")
    assert fetch(database_url, "SELECT to_regclass('public.orders')") == [(None,)]


def test_adopting_a_database_migrate_set_up_applies_nothing(
    database_url: str, reference: dict[int, Any]
) -> None:
    migrate_url(database_url)
    publish_one(database_url)
    before = history(database_url)
    command.upgrade(example_config(database_url), "head")
    assert history(database_url) == before  # same rows, applied_at untouched
    assert catalog(database_url) == reference[HEAD]
    assert fetch(database_url, "SELECT count(*) FROM outbox.message") == [(1,)]


def test_a_pinned_revision_catches_up_or_leaves_a_newer_schema_alone(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert outbox_lib.migrate(conn, to_version=2) == [1, 2]
    with sync_engine(database_url) as engine, engine.begin() as conn:
        assert outbox_lib.alembic.upgrade(conn, to_version=4) == [3, 4]
        assert outbox_lib.alembic.upgrade(conn, to_version=3) == []
    assert migrate_url(database_url) == list(range(5, HEAD + 1))


def test_downgrade_refuses_to_drop_objects_the_app_put_in_the_schema(
    database_url: str, reference: dict[int, Any]
) -> None:
    cfg = example_config(database_url)
    command.upgrade(cfg, "head")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE VIEW outbox.app_report AS SELECT topic FROM outbox.message")
    with pytest.raises(outbox_lib.MigrationError, match=r"down-migration 0001_core\.sql failed"):
        command.downgrade(cfg, "0001_orders")
    # Rolled back as a whole: still at head, view and all.
    assert catalog(database_url)["history"] == reference[HEAD]["history"]
    assert fetch(database_url, "SELECT version_num FROM alembic_version") == [("0007_outbox_10",)]


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_connection_api_with_another_schema(database_url: str, driver: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url, driver))
    try:
        with engine.begin() as conn:
            path = conn.execute(text("SHOW search_path")).scalar()
            assert outbox_lib.alembic.upgrade(conn, to_version=HEAD, schema="events") == [
                m.version for m in KNOWN
            ]
            assert conn.execute(text("SHOW search_path")).scalar() == path
        with psycopg.connect(database_url, autocommit=True) as raw:
            assert outbox_lib.migrate(raw, "events") == []
        publish_one(database_url, "events")
        with engine.begin() as conn:
            reverted = outbox_lib.alembic.downgrade(conn, to_version=0, schema="events")
        assert reverted == [m.version for m in reversed(KNOWN)]
    finally:
        engine.dispose()
    assert fetch(database_url, "SELECT to_regnamespace('events')") == [(None,)]


def test_autocommit_connection_is_refused(database_url: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url), isolation_level="AUTOCOMMIT")
    try:
        with (
            engine.connect() as conn,
            pytest.raises(outbox_lib.MigrationError, match="transaction"),
        ):
            outbox_lib.alembic.upgrade(conn, to_version=HEAD)
    finally:
        engine.dispose()
    assert fetch(database_url, "SELECT to_regnamespace('outbox')") == [(None,)]


# -------------------------------------------------------------------------------- offline


def test_offline_scripts_run_in_psql(
    database_url: str, reference: dict[int, Any], tmp_path: Path
) -> None:
    up = io.StringIO()
    script = offline_script(command.upgrade, example_config(None, up), up, "head")
    done = run_script(database_url, script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert catalog(database_url) == reference[HEAD]
    assert migrate_url(database_url) == []
    publish_one(database_url)
    down = io.StringIO()
    script = offline_script(command.downgrade, example_config(None, down), down, "head:base")
    done = run_script(database_url, script, tmp_path)
    assert done.returncode == 0, done.stderr
    assert catalog(database_url) == reference[0]
    assert fetch(database_url, "SELECT to_regclass('public.orders')") == [(None,)]


def test_offline_stepwise_scripts_run_in_psql(
    database_url: str, reference: dict[int, Any], tmp_path: Path
) -> None:
    for start, stop in [(0, 2), (2, HEAD)]:
        out = io.StringIO()
        cfg = stepwise_config(None, tmp_path / f"up{start}", out)
        frm = f"outbox_{start}" if start else "base"
        offline_script(command.upgrade, cfg, out, f"{frm}:outbox_{stop}")
        done = run_script(database_url, out.getvalue(), tmp_path)
        assert done.returncode == 0, done.stderr
        assert catalog(database_url) == reference[stop]
    out = io.StringIO()
    cfg = stepwise_config(None, tmp_path / "down", out)
    offline_script(command.downgrade, cfg, out, f"outbox_{HEAD}:outbox_1")
    done = run_script(database_url, out.getvalue(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert catalog(database_url) == reference[1]


def test_offline_script_stops_on_a_schema_at_another_version(
    database_url: str, tmp_path: Path
) -> None:
    migrate_url(database_url)
    before = history(database_url)
    out = io.StringIO()
    script = offline_script(command.upgrade, example_config(None, out), out, "head")
    done = run_script(database_url, script, tmp_path)
    assert done.returncode != 0
    assert "outbox schema outbox is not at version 0" in done.stderr
    assert history(database_url) == before
    assert fetch(database_url, "SELECT to_regclass('public.orders')") == [(None,)]


def test_async_env_through_run_sync(database_url: str) -> None:
    """What an async ``env.py`` does: ``AsyncConnection.run_sync`` on psycopg's async mode."""

    def install(conn: Connection) -> list[int]:
        return outbox_lib.alembic.upgrade(
            Operations(MigrationContext.configure(conn)), to_version=2
        )

    async def run() -> list[int]:
        engine = create_async_engine(sqlalchemy_url(database_url))
        try:
            async with engine.begin() as conn:
                return await conn.run_sync(install)
        finally:
            await engine.dispose()

    assert asyncio.run(run()) == [1, 2]
    assert migrate_url(database_url) == list(range(3, HEAD + 1))
