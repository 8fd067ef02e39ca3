"""Take the outbox schema from version 7 to 8 (outbox-relay's migration 0008: messages record
their transaction, and snapshots are recorded as ticks, for the log-shaped first pass).
Added when the application adopted the release that ships it, as docs/alembic.md describes.

Revision ID: 0005_outbox_8
Revises: 0004_outbox_7
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0005_outbox_8"
down_revision: str | Sequence[str] | None = "0004_outbox_7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version=7, to_version=8, schema="outbox")


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version=8, to_version=7, schema="outbox")
