"""Put the outbox schema into an application's own Alembic history.

Install with ``pip install 'outbox-relay[alembic]'``. Each revision that touches the outbox
pins the schema version it wants, so the application's history replays the same way when a
later outbox-relay release ships more migrations::

    # versions/0002_outbox.py
    from alembic import op
    import outbox_lib.alembic

    def upgrade() -> None:
        outbox_lib.alembic.upgrade(op, to_version=5)

    def downgrade() -> None:
        outbox_lib.alembic.downgrade(op, to_version=0, from_version=5)  # drops the outbox

The same SQL files, checksums and ``schema_migrations`` rows as ``outbox-relay migrate``
are used, under the same advisory lock, so the two agree: after an Alembic upgrade to the
relay's version ``outbox-relay migrate`` has nothing to do, and on a database that
``outbox-relay migrate`` already set up an Alembic upgrade applies nothing.

Online, the versions to apply or revert are read from the database (``from_version`` is not
used). Offline (``alembic upgrade --sql``) nothing can be read: the script applies the
versions after ``from_version`` (0 by default for an upgrade; required for a downgrade) and
stops with an error if, when it runs, the schema is not at ``from_version``.

Errors are :class:`outbox_lib.MigrationError` (a step failed, or the database is ahead of
this code), :class:`outbox_lib.ConfigurationError` (a bad schema name) and
:class:`outbox_lib.UnsupportedSessionError` (not an Alembic ``op``, ``MigrationContext`` or
SQLAlchemy ``Connection`` on PostgreSQL through psycopg or psycopg2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeAlias

from ._errors import MissingDependencyError

try:
    from alembic.operations import Operations
    from alembic.runtime.migration import MigrationContext
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(
        "outbox_lib.alembic needs Alembic: pip install 'outbox-relay[alembic]'"
    ) from exc
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.base import Executable
from sqlalchemy.sql.elements import ClauseElement

from . import _migrate
from ._encoding import check_schema_name
from ._errors import MigrationError, UnsupportedSessionError
from ._migrate import Migration, Statement

__all__ = ["Target", "downgrade", "upgrade"]

#: What the functions accept: Alembic's ``op`` (the module or an ``Operations``), a
#: ``MigrationContext``, or a plain SQLAlchemy ``Connection`` (online only).
Target: TypeAlias = Operations | MigrationContext | Connection | ModuleType

_DRIVERS = frozenset({"psycopg", "psycopg2", "psycopg2cffi"})
_log = logging.getLogger(__name__)


def upgrade(
    op: Target, *, to_version: int, from_version: int = 0, schema: str = "outbox"
) -> list[int]:
    """Apply the outbox migrations up to ``to_version`` that ``schema`` lacks.

    Returns the versions applied (online) or written to the script (offline); a schema
    already at or above ``to_version`` is left alone. ``from_version`` is read only offline.

    >>> outbox_lib.alembic.upgrade(op, to_version=5)  # doctest: +SKIP
    [1, 2, 3, 4, 5]
    """
    check_schema_name(schema)
    known = _migrate.available_migrations()
    _migrate.check_target(to_version, known, lowest=1)
    runner = _runner(op)
    if runner.offline and _migrate.check_target(from_version, known) >= to_version:
        return []
    runner.run(_migrate.prologue(schema), f"creating schema {schema}")
    applied = runner.applied(schema, from_version, known) or {}
    todo = _migrate.upgrade_plan(applied, known, to_version)
    _steps(runner, schema, todo, _migrate.apply_statements, "migration")
    return _done("applied", schema, todo)


def downgrade(
    op: Target, *, to_version: int, from_version: int | None = None, schema: str = "outbox"
) -> list[int]:
    """Revert the outbox migrations above ``to_version``, newest first.

    ``to_version=0`` also drops ``schema_migrations`` and the schema itself, with every
    message, delivery record, dead letter and inbox key in it (``DROP SCHEMA`` without
    ``CASCADE``: objects of the application's own in that schema stop the downgrade).
    Returns the versions reverted (online) or written to the script (offline).
    ``from_version``, the version the schema is at, is required offline and ignored online.

    >>> outbox_lib.alembic.downgrade(op, to_version=0, from_version=5)  # doctest: +SKIP
    [5, 4, 3, 2, 1]
    """
    check_schema_name(schema)
    known = _migrate.available_migrations()
    _migrate.check_target(to_version, known)
    runner = _runner(op)
    if runner.offline and _migrate.check_target(_offline_from(from_version), known) <= to_version:
        return []
    runner.run([_migrate.statement("lock", schema, key=_migrate.lock_key(schema))], "locking")
    applied = runner.applied(schema, from_version, known)
    if applied is None:
        return []
    todo = _migrate.downgrade_plan(applied, known, to_version)
    _steps(runner, schema, todo, _migrate.revert_statements, "down-migration")
    if to_version == 0:
        runner.run(_migrate.drop_statements(schema), f"dropping schema {schema}")
    return _done("reverted", schema, todo)


def _offline_from(from_version: int | None) -> int:
    if from_version is None:
        raise MigrationError(
            "an offline downgrade (alembic downgrade --sql) cannot read the outbox schema "
            "version from the database: pass from_version= to outbox_lib.alembic.downgrade"
        )
    return from_version


def _steps(
    runner: _Online | _Offline,
    schema: str,
    todo: list[Migration],
    statements_of: Callable[[str, Migration], list[Statement]],
    kind: str,
) -> None:
    """Run each step under the schema's search_path, then give the caller its own back."""
    if not todo:
        return
    runner.run([_migrate.statement("save_search_path", schema)], "saving the search_path")
    for migration in todo:
        runner.run(statements_of(schema, migration), f"{kind} {migration.filename}")
    runner.run([_migrate.statement("restore_search_path", schema)], "restoring the search_path")


def _done(verb: str, schema: str, todo: list[Migration]) -> list[int]:
    versions = [m.version for m in todo]
    _log.info("outbox schema %s: %s versions %s", schema, verb, versions or "none")
    return versions


# ---------------------------------------------------------------------------------- runners


@dataclass(frozen=True, slots=True)
class _Online:
    """Runs statements on Alembic's connection, inside its transaction."""

    bind: Connection
    offline = False

    def run(self, statements: Sequence[Statement], what: str) -> None:
        # no_parameters: the driver gets the text as is, so `%` and `:name` in the migration
        # files are never taken for placeholders (and several statements may share a call).
        try:
            for statement in statements:
                self.bind.exec_driver_sql(
                    statement.as_string(), execution_options={"no_parameters": True}
                )
        except DBAPIError as exc:
            raise MigrationError(f"{what} failed: {exc.orig}") from exc

    def applied(
        self, schema: str, _assumed: int | None, _known: list[Migration]
    ) -> dict[int, str] | None:
        """``{version: checksum}`` read from the database; None when it has no history."""
        try:
            exists = self.bind.exec_driver_sql(
                _migrate.query("migrations_table_exists"), {"schema": schema}
            ).scalar()
            if not exists:
                return None
            rows = self.bind.exec_driver_sql(
                _migrate.statement("applied", schema).as_string(),
                execution_options={"no_parameters": True},
            ).all()
        except DBAPIError as exc:
            raise MigrationError(f"reading the outbox schema history failed: {exc.orig}") from exc
        return {int(version): str(checksum) for version, checksum in rows}


@dataclass(frozen=True, slots=True)
class _Offline:
    """Writes statements to Alembic's ``--sql`` script."""

    ops: Operations
    offline = True

    def run(self, statements: Sequence[Statement], what: str) -> None:
        for statement in statements:
            # Alembic ends every statement with its own terminator.
            self.ops.execute(_Verbatim(statement.as_string().strip().rstrip(";")))

    def applied(
        self, schema: str, assumed: int | None, known: list[Migration]
    ) -> dict[int, str] | None:
        """The history the script assumes, checked by the script itself when it runs."""
        version = _offline_from(assumed)
        check = _migrate.statement("expect_version", schema, version=version, schema_name=schema)
        self.run([check], "checking the schema version")
        return {m.version: m.checksum for m in known if m.version <= version}


class _Verbatim(Executable, ClauseElement):
    """SQL text written to the offline script as is: no bind parameters, no `%` escaping."""

    inherit_cache = False

    def __init__(self, text: str) -> None:
        self.text = text


@compiles(_Verbatim)
def _compile_verbatim(element: _Verbatim, compiler: Any, **kw: Any) -> str:
    return element.text


def _runner(target: Target) -> _Online | _Offline:
    if isinstance(target, Connection):
        return _online(target)
    context = target if isinstance(target, MigrationContext) else _context_of(target)
    if context.as_sql:
        return _Offline(Operations(context))
    if context.bind is None:  # pragma: no cover - Alembic gives online contexts a connection
        raise UnsupportedSessionError("this Alembic migration context has no connection")
    return _online(context.bind)


def _context_of(target: object) -> MigrationContext:
    get_context = getattr(target, "get_context", None)
    context = get_context() if callable(get_context) else None
    if not isinstance(context, MigrationContext):
        raise UnsupportedSessionError(
            "expected Alembic's op, an Operations, a MigrationContext or a SQLAlchemy "
            f"Connection, got {type(target).__name__}"
        )
    return context


def _online(bind: Connection) -> _Online:
    dialect = bind.dialect
    if dialect.name != "postgresql" or dialect.driver not in _DRIVERS:
        raise UnsupportedSessionError(
            "outbox_lib.alembic runs on PostgreSQL through psycopg or psycopg2, "
            f"not {dialect.name}+{dialect.driver}"
        )
    if getattr(bind.connection.driver_connection, "autocommit", False):
        raise MigrationError(
            "the outbox migrations need a transaction (SET LOCAL, a transaction-scoped lock); "
            "run them outside autocommit_block() and without isolation_level='AUTOCOMMIT'"
        )
    return _Online(bind)
