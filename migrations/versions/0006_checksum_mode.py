"""segments.checksum (md5 | crc32c) recorded per segment; commits.md5 nullable (crc32c mode)

A segment in the crc32c mode takes no MD5 of its parts: the remote's echo of each part's CRC32C
proves the part, the CRC32C the remote reports for the object proves the object, so it has no
ETag to expect either. Every row before this revision is in the md5 mode.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_CHECKSUM = (
    "state IN ('open', 'failed', 'unknown') OR (size IS NOT NULL AND crc32c IS NOT NULL "
    "AND expected_etag IS NOT NULL)"
)
NEW_CHECKSUM = (
    "state IN ('open', 'failed', 'unknown') OR (size IS NOT NULL AND crc32c IS NOT NULL "
    "AND (expected_etag IS NOT NULL OR checksum = 'crc32c'))"
)
MODES = "checksum IN ('md5', 'crc32c')"


def upgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.add_column(
            sa.Column("checksum", sa.String(8), nullable=False, server_default=sa.text("'md5'"))
        )
        batch.drop_constraint(op.f("ck_segments_sealed_checksum"), type_="check")
        batch.create_check_constraint(op.f("ck_segments_sealed_checksum"), NEW_CHECKSUM)
        batch.create_check_constraint(op.f("ck_segments_checksum"), MODES)
    with op.batch_alter_table("commits") as batch:
        batch.alter_column("md5", existing_type=sa.String(32), nullable=True)


def downgrade() -> None:
    # Segments in the crc32c mode have no part MD5s, which the older schema requires: they go
    # (their objects stay at the remote; a rebuild after upgrading finds them again).
    # Their parts and events first: SQLite enforces ON DELETE CASCADE only with foreign keys on.
    crc = "SELECT id FROM segments WHERE checksum = 'crc32c'"
    op.execute(f"DELETE FROM events WHERE segment_id IN ({crc})")
    op.execute(f"DELETE FROM commits WHERE segment_id IN ({crc})")
    op.execute("DELETE FROM segments WHERE checksum = 'crc32c'")
    with op.batch_alter_table("commits") as batch:
        batch.alter_column("md5", existing_type=sa.String(32), nullable=False)
    with op.batch_alter_table("segments") as batch:
        batch.drop_constraint(op.f("ck_segments_checksum"), type_="check")
        batch.drop_constraint(op.f("ck_segments_sealed_checksum"), type_="check")
        batch.create_check_constraint(op.f("ck_segments_sealed_checksum"), OLD_CHECKSUM)
        batch.drop_column("checksum")
