"""Alembic environment of the example application.

The database URL is ``$DATABASE_URL`` (or ``config.attributes["database_url"]`` when Alembic
is driven from Python); a libpq URL ``postgresql://...`` is run through psycopg 3.
"""

from __future__ import annotations

import os
import re
from logging.config import fileConfig
from typing import Any

from alembic import context
from models import OUTBOX_SCHEMA, metadata
from sqlalchemy import create_engine, pool

config = context.config


def database_url() -> str | None:
    url = config.attributes.get("database_url") or os.environ.get("DATABASE_URL")
    if not url:
        return None
    return re.sub(r"^postgres(ql)?://", "postgresql+psycopg://", str(url))


def include_name(name: str | None, type_: str, parent_names: Any) -> bool:
    """Autogenerate compares every schema but the outbox's, which outbox_lib.alembic owns."""
    return not (type_ == "schema" and name == OUTBOX_SCHEMA)


COMPARE = {"target_metadata": metadata, "include_schemas": True, "include_name": include_name}


def run_migrations_offline() -> None:
    """``--sql``: write the script; the URL (optional) only picks the dialect."""
    url = database_url()
    context.configure(
        url=url,
        dialect_name=None if url else "postgresql",
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        **COMPARE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = database_url()
    if url is None:
        raise SystemExit("set DATABASE_URL, e.g. postgresql://app@localhost:5432/app")
    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, **COMPARE)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
