"""The overview: counts per state, unverified bytes, failed and troubled keys, live leases."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, text

from uploader.manifest.core import ManifestCore
from uploader.manifest.lease_holders import HOLDER_COLUMNS, holder_gone
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL
from uploader.manifest.rowmap import COMMITS, RARE_UNFINISHED, SEGMENTS
from uploader.records import Status
from uploader.states import CommitState, SegmentState


class Overview(ManifestCore):
    """What ``uploader status`` and the CLI's listings show."""

    def status(self) -> Status:
        now = self.clock()
        with self.engine.connect() as conn:
            segs = {
                r[0]: r[1]
                for r in conn.execute(
                    select(SEGMENTS.c.state, func.count()).group_by(SEGMENTS.c.state)
                )
            }
            commit_rows = conn.execute(
                select(
                    COMMITS.c.state,
                    func.count(),
                    func.coalesce(func.sum(COMMITS.c.end_offset - COMMITS.c.start_offset), 0),
                ).group_by(COMMITS.c.state)
            ).all()
            oldest = conn.execute(
                select(func.min(SEGMENTS.c.created_at)).where(text(UNFINISHED_SEGMENTS_SQL))
            ).scalar()
            # Sealed and not verified yet: what "stuck" means (an open segment of a quiet
            # writer is only waiting for bytes). Measured from the seal, not the creation.
            oldest_sealed = conn.execute(
                select(func.min(SEGMENTS.c.sealed_at)).where(
                    text(UNFINISHED_SEGMENTS_SQL), SEGMENTS.c.state != SegmentState.OPEN.value
                )
            ).scalar()
            # The first 100 keys, with their reasons, of the two states that need a human.
            failed, unknown = (
                conn.execute(
                    select(SEGMENTS.c.key, SEGMENTS.c.reason)
                    .where(SEGMENTS.c.state == state.value)
                    .order_by(SEGMENTS.c.id)
                    .limit(100)
                ).all()
                for state in (SegmentState.FAILED, SegmentState.UNKNOWN)
            )
            troubled_q = (
                select(SEGMENTS.c.key, SEGMENTS.c.last_error)
                .where(text(UNFINISHED_SEGMENTS_SQL), SEGMENTS.c.last_error.is_not(None))
                .order_by(SEGMENTS.c.id)
                .limit(100)
            )
            if not self.is_postgres:
                troubled_q = troubled_q.where(RARE_UNFINISHED)
            troubled = conn.execute(troubled_q).all()
        commits = {r[0]: int(r[1]) for r in commit_rows}
        commit_bytes = {r[0]: int(r[2]) for r in commit_rows}
        return Status(
            segments={s.value: int(segs.get(s.value, 0)) for s in SegmentState},
            commits={s.value: commits.get(s.value, 0) for s in CommitState},
            commit_bytes={s.value: commit_bytes.get(s.value, 0) for s in CommitState},
            unverified_bytes=commit_bytes.get("pending", 0) + commit_bytes.get("uploaded", 0),
            oldest_unverified_age=None
            if oldest is None
            else max(0.0, (now - oldest).total_seconds()),
            oldest_sealed_age=None
            if oldest_sealed is None
            else max(0.0, (now - oldest_sealed).total_seconds()),
            failed=tuple((k, r or "") for k, r in failed),
            errors=tuple((k, e) for k, e in troubled),
            unknown=tuple((k, r or "") for k, r in unknown),
        )

    def failed_keys(self) -> list[str]:
        """Every failed segment's key, in id order (``uploader retry --all-failed``)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(SEGMENTS.c.key)
                    .where(SEGMENTS.c.state == SegmentState.FAILED.value)
                    .order_by(SEGMENTS.c.id)
                ).scalars()
            )

    def leased_unfinished(
        self, *, exclude_owner: str | None = None, node: str | None = None
    ) -> list[tuple[str, str, datetime]]:
        """(key, lease owner, lease expiry) of unfinished segments another process holds now.

        With ``node``: leaves out leases whose holder process on that node is certainly gone
        (any process there takes them over at once, so nobody waits for them)."""
        q = select(*HOLDER_COLUMNS, SEGMENTS.c.lease_expires).where(
            text(UNFINISHED_SEGMENTS_SQL),
            SEGMENTS.c.lease_owner.is_not(None),
            SEGMENTS.c.lease_expires > self._lease_now(),
        )
        if exclude_owner is not None:
            q = q.where(SEGMENTS.c.lease_owner != exclude_owner)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(SEGMENTS.c.id)).all()
        return [
            (r.key, r.lease_owner, r.lease_expires)
            for r in rows
            if node is None or not holder_gone(r, node)
        ]
