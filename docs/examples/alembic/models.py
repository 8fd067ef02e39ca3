"""The example application's own tables (what autogenerate compares the database with)."""

from __future__ import annotations

import sqlalchemy as sa

#: The schema outbox_lib.alembic installs into; autogenerate must leave it alone.
OUTBOX_SCHEMA = "outbox"

metadata = sa.MetaData()

orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("customer", sa.Text, nullable=False),
    sa.Column("total", sa.Numeric(12, 2), nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    ),
)
