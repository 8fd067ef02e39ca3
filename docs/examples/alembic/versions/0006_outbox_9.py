"""Take the outbox schema from version 8 to 9 (outbox-relay's migration 0009: the first pass
reads the outbox as a log, with one cursor).
Added when the application adopted the release that ships it, as docs/alembic.md describes.

Revision ID: 0006_outbox_9
Revises: 0005_outbox_8
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0006_outbox_9"
down_revision: str | Sequence[str] | None = "0005_outbox_8"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version=8, to_version=9, schema="outbox")


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version=9, to_version=8, schema="outbox")
