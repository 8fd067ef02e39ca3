"""Take the outbox schema from version 5 to 6 (outbox-relay's migration 0006: publish()
refuses what outbox_lib.publish refuses). Added when the application adopted the release
that ships it, as docs/alembic.md describes.

Revision ID: 0003_outbox_6
Revises: 0002_outbox
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0003_outbox_6"
down_revision: str | Sequence[str] | None = "0002_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version=5, to_version=6, schema="outbox")


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version=6, to_version=5, schema="outbox")
