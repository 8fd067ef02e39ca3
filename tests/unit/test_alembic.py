"""``outbox_lib.alembic`` without a database: plans, down files and offline scripts."""

from __future__ import annotations

import importlib
import io
import re
import sys

import pytest
from alembic.runtime.migration import MigrationContext

import outbox_lib
import outbox_lib.alembic
from outbox_lib._migrate import (
    _migrations_dir,
    down_sql,
    downgrade_plan,
    upgrade_plan,
)
from outbox_lib._sqlfiles import load_queries

KNOWN = outbox_lib.available_migrations()
HEAD = len(KNOWN)


def offline() -> tuple[MigrationContext, io.StringIO]:
    buffer = io.StringIO()
    context = MigrationContext.configure(
        dialect_name="postgresql", opts={"as_sql": True, "output_buffer": buffer}
    )
    return context, buffer


def test_every_migration_has_a_down_migration_and_no_other_exists() -> None:
    names = {e.name for e in _migrations_dir().joinpath("down").iterdir()}
    assert names == {m.filename for m in KNOWN}
    assert all(down_sql(m).strip() for m in KNOWN)


def test_down_migrations_never_cascade() -> None:
    for migration in KNOWN:
        code = re.sub(r"--[^\n]*", "", down_sql(migration))
        assert not re.search(r"\bcascade\b", code, re.IGNORECASE), migration.filename


def test_runner_queries_end_in_sql_not_a_comment() -> None:
    # Offline, Alembic appends ';' to each statement: after a trailing comment it would be
    # commented out and the statement would run into the next one.
    for name, text in load_queries("outbox_lib", "_sql/migrate.sql").items():
        assert not text.splitlines()[-1].lstrip().startswith("--"), name


def test_upgrade_plan_applies_what_is_missing_up_to_the_target() -> None:
    applied = {1: KNOWN[0].checksum}
    assert [m.version for m in upgrade_plan(applied, KNOWN, 3)] == [2, 3]
    assert [m.version for m in upgrade_plan(applied, KNOWN)] == list(range(2, HEAD + 1))
    everything = {m.version: m.checksum for m in KNOWN}
    assert upgrade_plan(everything, KNOWN, 2) == []


def test_downgrade_plan_reverts_newest_first_and_checks_the_history() -> None:
    applied = {m.version: m.checksum for m in KNOWN[:3]}
    assert [m.version for m in downgrade_plan(applied, KNOWN, 1)] == [3, 2]
    assert [m.version for m in downgrade_plan(applied, KNOWN, 0)] == [3, 2, 1]
    with pytest.raises(outbox_lib.MigrationError, match="never be edited"):
        downgrade_plan({1: "edited"}, KNOWN, 0)


@pytest.mark.parametrize("target", [-1, HEAD + 1, "5", True])
def test_unknown_targets_are_refused(target: object) -> None:
    with pytest.raises(outbox_lib.MigrationError):
        upgrade_plan({}, KNOWN, target)  # type: ignore[arg-type]


def test_offline_upgrade_writes_every_version_with_its_checksum() -> None:
    context, buffer = offline()
    assert outbox_lib.alembic.upgrade(context, to_version=HEAD) == [m.version for m in KNOWN]
    script = buffer.getvalue()
    assert "pg_advisory_xact_lock(" in script
    assert "<> 0 THEN" in script  # the script checks the schema is at version 0
    for migration in KNOWN:
        assert migration.sql.strip().rstrip(";") in script
        assert f"VALUES ({migration.version}, '{migration.name}', '{migration.checksum}')" in script
    assert "%%" not in script
    assert script.rstrip().endswith("current_setting('outbox_relay.saved_search_path'), true);")


def test_offline_upgrade_from_a_pinned_version() -> None:
    context, buffer = offline()
    assert outbox_lib.alembic.upgrade(context, from_version=3, to_version=5) == [4, 5]
    script = buffer.getvalue()
    assert "<> 3 THEN" in script
    assert "'core'" not in script
    context, buffer = offline()
    assert outbox_lib.alembic.upgrade(context, from_version=5, to_version=5) == []
    assert buffer.getvalue() == ""


def test_offline_downgrade_needs_from_version() -> None:
    context, buffer = offline()
    with pytest.raises(outbox_lib.MigrationError, match="from_version="):
        outbox_lib.alembic.downgrade(context, to_version=0)
    assert buffer.getvalue() == ""


def test_offline_downgrade_to_zero_drops_the_schema_last() -> None:
    context, buffer = offline()
    assert outbox_lib.alembic.downgrade(context, to_version=0, from_version=2) == [2, 1]
    script = buffer.getvalue()
    positions = [script.index(down_sql(m).strip().rstrip(";")) for m in reversed(KNOWN[:2])]
    assert positions == sorted(positions)
    assert script.rstrip().endswith('DROP SCHEMA "outbox" RESTRICT;')


def test_a_version_newer_than_the_code_says_upgrade_outbox_relay() -> None:
    context, _ = offline()
    with pytest.raises(outbox_lib.MigrationError, match="upgrade outbox-relay"):
        outbox_lib.alembic.upgrade(context, to_version=HEAD + 1)
    with pytest.raises(outbox_lib.MigrationError):
        outbox_lib.alembic.upgrade(context, to_version=0)


def test_bad_schema_and_bad_target_are_refused() -> None:
    context, _ = offline()
    with pytest.raises(outbox_lib.ConfigurationError):
        outbox_lib.alembic.upgrade(context, to_version=1, schema="no such")
    with pytest.raises(outbox_lib.UnsupportedSessionError, match="Alembic's op"):
        outbox_lib.alembic.upgrade(object(), to_version=1)  # type: ignore[arg-type]


def test_schema_name_is_quoted_as_an_identifier() -> None:
    context, buffer = offline()
    outbox_lib.alembic.upgrade(context, to_version=1, schema="Events")
    assert 'CREATE SCHEMA IF NOT EXISTS "Events"' in buffer.getvalue()


def test_import_without_alembic_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "alembic" or n.startswith("alembic.")]:
        monkeypatch.setitem(sys.modules, name, None)  # what an import sees when uninstalled
    monkeypatch.delitem(sys.modules, "outbox_lib.alembic")
    monkeypatch.delattr(outbox_lib, "alembic")
    with pytest.raises(ImportError, match=re.escape("pip install 'outbox-relay[alembic]'")):
        importlib.import_module("outbox_lib.alembic")
