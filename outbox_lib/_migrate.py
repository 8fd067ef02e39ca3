"""Apply the plain-SQL migrations in ``migrations/`` to a schema.

Each file ``NNNN_name.sql`` is one version; ``down/NNNN_name.sql`` reverses it (used by
:mod:`outbox_lib.alembic`). ``migrate`` takes a transaction-scoped advisory lock derived from
the schema name, so several processes may run it at once: the first applies what is missing,
the others wait and then find nothing to do. Applied versions are recorded with a checksum,
so an edited migration is reported instead of silently diverging.

The plan (which versions to apply or revert) and the statements of each step are pure
functions; :func:`migrate` runs them on a psycopg connection, :mod:`outbox_lib.alembic` on
Alembic's connection or into its offline script.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any, TypeAlias

import psycopg
from psycopg import sql

from ._encoding import check_schema_name
from ._errors import MigrationError
from ._sqlfiles import load_queries, with_schema

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: One statement (or, for a migration file, a script) run with no parameters.
Statement: TypeAlias = sql.SQL | sql.Composed


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()

    @property
    def filename(self) -> str:
        return f"{self.version:04d}_{self.name}.sql"


def _migrations_dir() -> Traversable:
    shipped = resources.files("outbox_lib").joinpath("_sql", "migrations")
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parent.parent / "migrations"


def available_migrations() -> list[Migration]:
    """Every migration this version of the code knows, in order."""
    found = []
    for entry in _migrations_dir().iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    if [m.version for m in found] != list(range(1, len(found) + 1)):
        raise MigrationError("migration versions must be 1, 2, 3, ... without gaps")
    return found


def down_sql(migration: Migration) -> str:
    """The SQL that reverses ``migration``: ``migrations/down/`` holds a file of the same name."""
    entry = _migrations_dir().joinpath("down", migration.filename)
    if not entry.is_file():
        raise MigrationError(f"migration {migration.filename} has no down-migration")
    return entry.read_text("utf-8")


def advisory_key(purpose: str, schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for one ``purpose`` in this schema."""
    digest = hashlib.blake2b(f"outbox-relay:{purpose}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_key(schema: str) -> int:
    """The advisory-lock key of this schema's migrations."""
    return advisory_key("migrate", schema)


def _queries() -> dict[str, str]:
    return load_queries("outbox_lib", "_sql/migrate.sql")


def query(name: str) -> str:
    """The text of query ``name`` in ``migrate.sql``, placeholders and all."""
    return _queries()[name]


def statement(name: str, schema: str, /, **literals: object) -> sql.Composed:
    """Query ``name`` of ``migrate.sql`` for ``schema``, its ``{placeholders}`` as literals."""
    values = {key: sql.Literal(value) for key, value in literals.items()}
    return sql.SQL(query(name)).format(schema=sql.Identifier(schema), **values)


# ------------------------------------------------------------------------------- planning


def check_target(version: int, known: list[Migration], lowest: int = 0) -> int:
    """``version`` if this code can migrate to it, else a :class:`MigrationError`."""
    if isinstance(version, bool) or not isinstance(version, int) or version < lowest:
        raise MigrationError(f"a schema version must be an integer >= {lowest}, got {version!r}")
    if version > len(known):
        raise MigrationError(
            f"outbox schema version {version} is not known to this outbox-relay, which ships "
            f"versions up to {len(known)}; upgrade outbox-relay"
        )
    return version


def upgrade_plan(
    applied: dict[int, str], known: list[Migration], target: int | None = None
) -> list[Migration]:
    """The migrations to apply, in order, to bring ``applied`` up to ``target`` (all)."""
    _check_history(applied, known)
    top = len(known) if target is None else check_target(target, known)
    return [m for m in known if m.version <= top and m.version not in applied]


def downgrade_plan(applied: dict[int, str], known: list[Migration], target: int) -> list[Migration]:
    """The migrations to revert, newest first, to bring ``applied`` down to ``target``."""
    _check_history(applied, known)
    check_target(target, known)
    return [m for m in reversed(known) if m.version > target and m.version in applied]


def _check_history(applied: dict[int, str], known: list[Migration]) -> None:
    by_version = {m.version: m for m in known}
    newer = sorted(v for v in applied if v not in by_version)
    if newer:
        raise MigrationError(
            f"the database has outbox schema version {newer[-1]}, newer than this "
            f"outbox-relay knows (up to {len(known)}); upgrade outbox-relay"
        )
    for version, checksum in applied.items():
        if by_version[version].checksum != checksum:
            raise MigrationError(
                f"migration {by_version[version].filename} differs from the one "
                "applied to this database; migrations must never be edited once released"
            )


# ----------------------------------------------------------------------------- statements


def prologue(schema: str) -> list[sql.Composed]:
    """Lock the schema's migrations, then create the schema and its history table if absent."""
    return [
        statement("lock", schema, key=lock_key(schema)),
        statement("create_schema", schema),
        statement("create_migrations_table", schema),
    ]


def apply_statements(schema: str, migration: Migration) -> list[Statement]:
    """Run ``migration`` inside ``schema`` and record it (the caller's transaction)."""
    return [
        statement("set_search_path", schema),
        sql.SQL(migration.sql),  # type: ignore[arg-type, unused-ignore]
        statement(
            "record",
            schema,
            version=migration.version,
            name=migration.name,
            checksum=migration.checksum,
        ),
    ]


def revert_statements(schema: str, migration: Migration) -> list[Statement]:
    """Run the down-migration of ``migration`` inside ``schema`` and forget it."""
    return [
        statement("set_search_path", schema),
        sql.SQL(down_sql(migration)),  # type: ignore[arg-type, unused-ignore]
        statement("unrecord", schema, version=migration.version),
    ]


def drop_statements(schema: str) -> list[sql.Composed]:
    """Below version 1: the history table, then the (by now empty) schema."""
    return [statement("drop_migrations_table", schema), statement("drop_schema", schema)]


# ----------------------------------------------------------------------- psycopg runner


def applied_versions(conn: psycopg.Connection[Any], schema: str) -> dict[int, str]:
    """``{version: checksum}`` of what is applied; empty when the schema is absent."""
    check_schema_name(schema)
    q = _queries()
    exists = conn.execute(q["migrations_table_exists"], {"schema": schema}).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(with_schema(q["applied"], schema)).fetchall()
    return {int(version): str(checksum) for version, checksum in rows}


def migrate(
    conn: psycopg.Connection[Any], schema: str = "outbox", *, to_version: int | None = None
) -> list[int]:
    """Create or upgrade ``schema``; return the versions applied now (empty: up to date).

    Runs in its own transaction on ``conn``, which must not be inside one already.
    ``to_version`` stops at that version (default: the newest this code ships); it never
    downgrades.

    >>> with psycopg.connect(url, autocommit=True) as conn:  # doctest: +SKIP
    ...     outbox_lib.migrate(conn)
    [1, 2, 3, 4, 5]
    """
    check_schema_name(schema)
    known = available_migrations()
    with conn.transaction():
        for step in prologue(schema):
            conn.execute(step)
        todo = upgrade_plan(applied_versions(conn, schema), known, to_version)
        for migration in todo:
            _run(conn, migration, apply_statements(schema, migration))
    return [m.version for m in todo]


def _run(conn: psycopg.Connection[Any], migration: Migration, statements: list[Statement]) -> None:
    try:
        for step in statements:
            conn.execute(step)
    except psycopg.Error as exc:
        raise MigrationError(f"migration {migration.filename} failed: {exc}") from exc
