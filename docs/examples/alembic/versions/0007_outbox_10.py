"""Take the outbox schema from version 9 to 10 (outbox-relay's migration 0010: the delivery
log is written a batch at a time).
Added when the application adopted the release that ships it, as docs/alembic.md describes.

Revision ID: 0007_outbox_10
Revises: 0006_outbox_9
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0007_outbox_10"
down_revision: str | Sequence[str] | None = "0006_outbox_9"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version=9, to_version=10, schema="outbox")


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version=10, to_version=9, schema="outbox")
