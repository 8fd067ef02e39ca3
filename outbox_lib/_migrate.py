"""Apply the plain-SQL migrations in ``migrations/`` to a schema.

Each file ``NNNN_name.sql`` is one version. ``migrate`` takes a transaction-scoped advisory
lock derived from the schema name, so several processes may run it at once: the first applies
what is missing, the others wait and then find nothing to do. Applied versions are recorded
with a checksum, so an edited migration is reported instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from ._encoding import check_schema_name
from ._errors import MigrationError
from ._sqlfiles import load_queries, with_schema

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


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


def advisory_key(purpose: str, schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for one ``purpose`` in this schema."""
    digest = hashlib.blake2b(f"outbox-relay:{purpose}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock_key(schema: str) -> int:
    """The advisory-lock key of this schema's migrations."""
    return advisory_key("migrate", schema)


def _queries() -> dict[str, str]:
    return load_queries("outbox_lib", "_sql/migrate.sql")


def applied_versions(conn: psycopg.Connection[Any], schema: str) -> dict[int, str]:
    """``{version: checksum}`` of what is applied; empty when the schema is absent."""
    check_schema_name(schema)
    q = _queries()
    exists = conn.execute(q["migrations_table_exists"], {"schema": schema}).fetchone()
    if not exists or not exists[0]:
        return {}
    rows = conn.execute(with_schema(q["applied"], schema)).fetchall()
    return {int(version): str(checksum) for version, checksum in rows}


def migrate(conn: psycopg.Connection[Any], schema: str = "outbox") -> list[int]:
    """Create or upgrade ``schema``; return the versions applied now (empty: up to date).

    Runs in its own transaction on ``conn``, which must not be inside one already.
    """
    check_schema_name(schema)
    known = available_migrations()
    q = _queries()
    with conn.transaction():
        conn.execute(q["lock"], {"key": lock_key(schema)})
        conn.execute(with_schema(q["create_schema"], schema))
        conn.execute(with_schema(q["create_migrations_table"], schema))
        applied = applied_versions(conn, schema)
        _check_history(applied, known)
        todo = [m for m in known if m.version not in applied]
        for migration in todo:
            _apply(conn, schema, migration)
    return [m.version for m in todo]


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
                f"migration {version:04d}_{by_version[version].name}.sql differs from the one "
                "applied to this database; migrations must never be edited once released"
            )


def _apply(conn: psycopg.Connection[Any], schema: str, migration: Migration) -> None:
    q = _queries()
    conn.execute(with_schema(q["set_search_path"], schema))
    try:
        conn.execute(sql.SQL(migration.sql))  # type: ignore[arg-type, unused-ignore]
    except psycopg.Error as exc:
        raise MigrationError(
            f"migration {migration.version:04d}_{migration.name}.sql failed: {exc}"
        ) from exc
    conn.execute(
        with_schema(q["record"], schema),
        {"version": migration.version, "name": migration.name, "checksum": migration.checksum},
    )
