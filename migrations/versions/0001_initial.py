"""initial schema: segments, commits, events

Revision ID: 0001
Revises:
Create Date: 2026-11-24 11:34:04.915376
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("key", sa.String(length=1024), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("node", sa.String(length=255), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("part_size", sa.BigInteger(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("crc32c", sa.BigInteger(), nullable=True),
        sa.Column("expected_etag", sa.String(length=64), nullable=True),
        sa.Column("upload_mode", sa.String(length=16), nullable=True),
        sa.Column("upload_id", sa.String(length=1024), nullable=True),
        sa.Column("object_etag", sa.String(length=64), nullable=True),
        sa.Column("fence", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("lease_owner", sa.String(length=255), nullable=True),
        sa.Column("lease_expires", sa.DateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("sealed_at", sa.DateTime(), nullable=True),
        sa.Column("verified_at", sa.DateTime(), nullable=True),
        sa.CheckConstraint(
            "state <> 'failed' OR reason IS NOT NULL", name=op.f("ck_segments_failed_reason")
        ),
        sa.CheckConstraint(
            "state IN ('open', 'failed') OR (size IS NOT NULL AND crc32c IS NOT NULL "
            "AND expected_etag IS NOT NULL)",
            name=op.f("ck_segments_sealed_checksum"),
        ),
        sa.CheckConstraint(
            "state IN ('open', 'sealed', 'uploaded', 'verified', 'failed')",
            name=op.f("ck_segments_state"),
        ),
        sa.CheckConstraint(
            "upload_mode IS NULL OR upload_mode IN ('multipart', 'put')",
            name=op.f("ck_segments_mode"),
        ),
        sa.CheckConstraint("fence >= 0", name=op.f("ck_segments_fence")),
        sa.CheckConstraint("part_size > 0", name=op.f("ck_segments_part_size")),
        sa.CheckConstraint("size IS NULL OR size >= 0", name=op.f("ck_segments_size")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_segments")),
        sa.UniqueConstraint("key", name=op.f("uq_segments_key")),
    )
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.create_index("ix_segments_state", ["state"], unique=False)
        batch_op.create_index(
            "ix_segments_unfinished",
            ["id"],
            unique=False,
            sqlite_where=sa.text("state IN ('open', 'sealed', 'uploaded')"),
            postgresql_where=sa.text("state IN ('open', 'sealed', 'uploaded')"),
        )

    op.create_table(
        "commits",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("segment_id", sa.BigInteger(), nullable=False),
        sa.Column("part_number", sa.Integer(), nullable=False),
        sa.Column("start_offset", sa.BigInteger(), nullable=False),
        sa.Column("end_offset", sa.BigInteger(), nullable=False),
        sa.Column("md5", sa.String(length=32), nullable=False),
        sa.Column("crc32c", sa.BigInteger(), nullable=False),
        sa.Column("etag", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint(
            "state <> 'failed' OR reason IS NOT NULL", name=op.f("ck_commits_failed_reason")
        ),
        sa.CheckConstraint(
            "state = 'pending' OR state = 'failed' OR etag IS NOT NULL",
            name=op.f("ck_commits_etag"),
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'uploaded', 'verified', 'failed')", name=op.f("ck_commits_state")
        ),
        sa.CheckConstraint("part_number BETWEEN 1 AND 10000", name=op.f("ck_commits_part_number")),
        sa.CheckConstraint(
            "start_offset >= 0 AND end_offset >= start_offset", name=op.f("ck_commits_range")
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["segments.id"],
            name=op.f("fk_commits_segment_id_segments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_commits")),
        sa.UniqueConstraint(
            "segment_id", "part_number", name=op.f("uq_commits_segment_id_part_number")
        ),
        sa.UniqueConstraint(
            "segment_id", "start_offset", name=op.f("uq_commits_segment_id_start_offset")
        ),
    )
    with op.batch_alter_table("commits", schema=None) as batch_op:
        batch_op.create_index(
            "ix_commits_unfinished",
            ["segment_id"],
            unique=False,
            sqlite_where=sa.text("state IN ('pending', 'uploaded')"),
            postgresql_where=sa.text("state IN ('pending', 'uploaded')"),
        )

    op.create_table(
        "events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("segment_id", sa.BigInteger(), nullable=False),
        sa.Column("commit_id", sa.BigInteger(), nullable=True),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("to_state", sa.String(length=16), nullable=False),
        sa.Column("worker", sa.String(length=255), nullable=False),
        sa.Column("fence", sa.BigInteger(), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["commit_id"],
            ["commits.id"],
            name=op.f("fk_events_commit_id_commits"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["segments.id"],
            name=op.f("fk_events_segment_id_segments"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_segment_id", ["segment_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_segment_id")

    op.drop_table("events")
    with op.batch_alter_table("commits", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_commits_unfinished",
            sqlite_where=sa.text("state IN ('pending', 'uploaded')"),
            postgresql_where=sa.text("state IN ('pending', 'uploaded')"),
        )

    op.drop_table("commits")
    with op.batch_alter_table("segments", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_segments_unfinished",
            sqlite_where=sa.text("state IN ('open', 'sealed', 'uploaded')"),
            postgresql_where=sa.text("state IN ('open', 'sealed', 'uploaded')"),
        )
        batch_op.drop_index("ix_segments_state")

    op.drop_table("segments")
