"""segments: the lease holder as a process (node, pid, start time, pid space) for fast takeover

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # All nullable: leases taken before the upgrade (and by older clients) name no process; they
    # are only ever taken over when they expire, as before.
    with op.batch_alter_table("segments") as batch:
        batch.add_column(sa.Column("lease_node", sa.String(255), nullable=True))
        batch.add_column(sa.Column("lease_pid", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("lease_started", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("lease_pid_space", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_column("lease_pid_space")
        batch.drop_column("lease_started")
        batch.drop_column("lease_pid")
        batch.drop_column("lease_node")
