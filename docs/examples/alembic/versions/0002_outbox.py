"""Install the outbox schema at version 5 (outbox-relay's migrations 0001-0005).

The version is pinned: when a later outbox-relay ships migration 6, this revision still
installs 5 and a new revision takes the schema from 5 to 6 (see docs/alembic.md).

Revision ID: 0002_outbox
Revises: 0001_orders
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0002_outbox"
down_revision: str | Sequence[str] | None = "0001_orders"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, to_version=5, schema="outbox")


def downgrade() -> None:
    # Drops the outbox schema with every message, delivery record and dead letter in it.
    outbox_lib.alembic.downgrade(op, to_version=0, from_version=5, schema="outbox")
