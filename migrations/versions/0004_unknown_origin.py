"""segments: the 'unknown' state (an object of unknown origin found by a rebuild)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 10:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_STATES = "state IN ('open', 'sealed', 'uploaded', 'verified', 'failed')"
NEW_STATES = "state IN ('open', 'sealed', 'uploaded', 'verified', 'failed', 'unknown')"
OLD_CHECKSUM = (
    "state IN ('open', 'failed') OR (size IS NOT NULL AND crc32c IS NOT NULL "
    "AND expected_etag IS NOT NULL)"
)
NEW_CHECKSUM = (
    "state IN ('open', 'failed', 'unknown') OR (size IS NOT NULL AND crc32c IS NOT NULL "
    "AND expected_etag IS NOT NULL)"
)
UNKNOWN_REASON = "state <> 'unknown' OR reason IS NOT NULL"


def upgrade() -> None:
    with op.batch_alter_table("segments") as batch:
        batch.drop_constraint(op.f("ck_segments_state"), type_="check")
        batch.drop_constraint(op.f("ck_segments_sealed_checksum"), type_="check")
        batch.create_check_constraint(op.f("ck_segments_state"), NEW_STATES)
        batch.create_check_constraint(op.f("ck_segments_sealed_checksum"), NEW_CHECKSUM)
        batch.create_check_constraint(op.f("ck_segments_unknown_reason"), UNKNOWN_REASON)


def downgrade() -> None:
    # Rows of unknown origin cannot be expressed by the older schema: they go (the objects stay
    # at the remote; a rebuild after upgrading finds them again).
    op.execute("DELETE FROM segments WHERE state = 'unknown'")
    with op.batch_alter_table("segments") as batch:
        batch.drop_constraint(op.f("ck_segments_unknown_reason"), type_="check")
        batch.drop_constraint(op.f("ck_segments_sealed_checksum"), type_="check")
        batch.drop_constraint(op.f("ck_segments_state"), type_="check")
        batch.create_check_constraint(op.f("ck_segments_state"), OLD_STATES)
        batch.create_check_constraint(op.f("ck_segments_sealed_checksum"), OLD_CHECKSUM)
