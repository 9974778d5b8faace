"""Single guarded transitions checked against the state machine (the generic path; tests and
``segment_uploaded``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from uploader.manifest.guard import clip
from uploader.manifest.outcomes import Outcomes
from uploader.manifest.rowmap import SEGMENTS
from uploader.records import Lease
from uploader.states import (
    CommitState,
    SegmentState,
    check_commit_transition,
    check_segment_transition,
    parse_commit_state,
    parse_segment_state,
)


class Transitions(Outcomes):
    """One guarded segment or commit transition at a time."""

    def transition_segment(
        self,
        lease: Lease,
        expected: SegmentState | str,
        new: SegmentState | str,
        *,
        reason: str | None = None,
        detail: str | None = None,
        **values: Any,
    ) -> None:
        """One guarded segment transition (checked against the state machine first)."""
        src, dst = parse_segment_state(str(expected)), parse_segment_state(str(new))
        check_segment_transition(src, dst, reason=reason)  # the state machine first: no I/O
        if dst is SegmentState.VERIFIED:
            # Verifying moves every commit with the segment: one path for it, not two.
            with self.engine.connect() as conn:
                recorded = conn.execute(
                    select(SEGMENTS.c.size).where(SEGMENTS.c.id == lease.segment_id)
                ).scalar()
            check_segment_transition(src, dst, has_checksum=recorded is not None)
            self.segment_verified(lease, detail or reason or "verified")
            return
        if reason is not None:
            values["reason"] = clip(reason)
        with self._write() as tx:
            if dst is SegmentState.SEALED and "size" not in values:
                recorded = tx.conn.execute(
                    select(SEGMENTS.c.size).where(SEGMENTS.c.id == lease.segment_id)
                ).scalar()
                check_segment_transition(src, dst, has_checksum=recorded is not None)
            tx.move_segment(lease, src, dst, values, detail or reason)

    def transition_commit(
        self,
        lease: Lease,
        commit_id: int,
        expected: CommitState | str,
        new: CommitState | str,
        *,
        etag: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """One guarded commit transition (checked against the state machine first)."""
        src, dst = parse_commit_state(str(expected)), parse_commit_state(str(new))
        has_etag = etag is not None or dst is not CommitState.UPLOADED
        check_commit_transition(src, dst, has_etag=has_etag, reason=reason)
        values: dict[str, Any] = {}
        if etag is not None:
            values["etag"] = etag
        if dst is CommitState.PENDING:
            values["etag"] = None
        if reason is not None:
            values["reason"] = clip(reason)
        with self._write() as tx:
            tx.guard(lease)
            tx.move_commit(lease, commit_id, src, dst, values, detail or reason)

    def segment_uploaded(self, lease: Lease, object_etag: str | None) -> None:
        """``sealed -> uploaded``: the object is complete at its key; what the remote said is kept."""
        self.transition_segment(
            lease,
            SegmentState.SEALED,
            SegmentState.UPLOADED,
            object_etag=object_etag,
            upload_id=None,
            detail=f"object complete, etag {object_etag}",
        )
