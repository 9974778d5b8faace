"""segments: local file identity (device, inode) and the intent of a conditional remove

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 09:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("file_device", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("file_inode", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("remove_etag", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("remove_etag")
        batch.drop_column("file_inode")
        batch.drop_column("file_device")
