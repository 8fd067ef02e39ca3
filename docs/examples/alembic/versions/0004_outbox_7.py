"""Take the outbox schema from version 6 to 7 (outbox-relay's migration 0007: the inbox
deduplicates per topic, and publish() refuses idempotency keys no HTTP header can carry).
Added when the application adopted the release that ships it, as docs/alembic.md describes.

Revision ID: 0004_outbox_7
Revises: 0003_outbox_6
"""

from collections.abc import Sequence

from alembic import op

import outbox_lib.alembic

revision: str = "0004_outbox_7"
down_revision: str | Sequence[str] | None = "0003_outbox_6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    outbox_lib.alembic.upgrade(op, from_version=6, to_version=7, schema="outbox")


def downgrade() -> None:
    outbox_lib.alembic.downgrade(op, from_version=7, to_version=6, schema="outbox")
