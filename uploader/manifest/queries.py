"""Reading the manifest: segments, commits, events, what the driver compares with the remote."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select, text

from uploader.manifest.core import ManifestCore
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL
from uploader.manifest.rowmap import COMMITS, EVENTS, SEGMENTS, commit_record, segment_record
from uploader.records import CommitRecord, Event, Progress, SegmentRecord
from uploader.states import CommitState, SegmentState, parse_segment_state


class Queries(ManifestCore):
    """Reads: one snapshot each, no lock taken."""

    def segment(self, key: str) -> SegmentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(SEGMENTS).where(SEGMENTS.c.key == key)).first()
        return None if row is None else segment_record(row)

    def segment_by_id(self, segment_id: int) -> SegmentRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(SEGMENTS).where(SEGMENTS.c.id == segment_id)).one()
        return segment_record(row)

    def segments(
        self,
        states: Iterable[SegmentState | str] | None = None,
        *,
        keys: Iterable[str] | None = None,
    ) -> list[SegmentRecord]:
        q = select(SEGMENTS).order_by(SEGMENTS.c.id)
        if states is not None:
            q = q.where(SEGMENTS.c.state.in_([parse_segment_state(str(s)).value for s in states]))
        if keys is not None:
            q = q.where(SEGMENTS.c.key.in_(list(keys)))
        with self.engine.connect() as conn:
            return [segment_record(r) for r in conn.execute(q)]

    def progress(self, segment_id: int) -> Progress:
        """The segment's row, the end of its committed bytes and its last part, in one query."""
        # Parts are numbered 1, 2, ... without gaps and cover [0, end) in order: the last part
        # has both the highest number and the highest end.
        last_part = (
            select(func.coalesce(func.max(COMMITS.c.part_number), 0))
            .where(COMMITS.c.segment_id == SEGMENTS.c.id)
            .scalar_subquery()
        )
        last_end = (
            select(func.coalesce(func.max(COMMITS.c.end_offset), 0))
            .where(COMMITS.c.segment_id == SEGMENTS.c.id)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            row = conn.execute(
                select(SEGMENTS, last_part.label("last_part"), last_end.label("last_end")).where(
                    SEGMENTS.c.id == segment_id
                )
            ).one()
        return Progress(segment_record(row), int(row.last_end), int(row.last_part))

    def pending_commits(self, segment_id: int) -> list[CommitRecord]:
        """The segment's ``pending`` parts (the partial index of unfinished commits finds them)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(COMMITS)
                .where(
                    COMMITS.c.segment_id == segment_id, COMMITS.c.state == CommitState.PENDING.value
                )
                .order_by(COMMITS.c.part_number)
            )
            return [commit_record(r) for r in rows]

    def commits(self, segment_id: int) -> list[CommitRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(COMMITS)
                .where(COMMITS.c.segment_id == segment_id)
                .order_by(COMMITS.c.part_number)
            )
            return [commit_record(r) for r in rows]

    def events(self, segment_id: int | None = None) -> list[Event]:
        q = select(EVENTS).order_by(EVENTS.c.id)
        if segment_id is not None:
            q = q.where(EVENTS.c.segment_id == segment_id)
        with self.engine.connect() as conn:
            return [
                Event(
                    id=r.id,
                    at=r.at,
                    segment_id=r.segment_id,
                    commit_id=r.commit_id,
                    from_state=r.from_state,
                    to_state=r.to_state,
                    worker=r.worker,
                    fence=r.fence,
                    detail=r.detail,
                )
                for r in conn.execute(q)
            ]

    def position(
        self, segment_id: int, *, pending_only: bool = False
    ) -> tuple[SegmentRecord, list[CommitRecord]]:
        """The segment's row and its commits (or only its pending ones), in part order, read in
        one transaction: what the driver compares with what the remote holds."""
        with self.engine.connect() as conn, conn.begin():
            seg = segment_record(
                conn.execute(select(SEGMENTS).where(SEGMENTS.c.id == segment_id)).one()
            )
            q = select(COMMITS).where(COMMITS.c.segment_id == segment_id)
            if pending_only:
                q = q.where(COMMITS.c.state == CommitState.PENDING.value)
            commits = [commit_record(r) for r in conn.execute(q.order_by(COMMITS.c.part_number))]
        return seg, commits

    def to_scrub(self, limit: int) -> list[SegmentRecord]:
        """Verified segments, the longest unchecked first (never checked: oldest verified)."""
        order = func.coalesce(SEGMENTS.c.checked_at, SEGMENTS.c.verified_at, SEGMENTS.c.created_at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(SEGMENTS)
                .where(SEGMENTS.c.state == SegmentState.VERIFIED.value)
                .order_by(order, SEGMENTS.c.id)
                .limit(limit)
            )
            return [segment_record(r) for r in rows]

    def deletable(self, *, limit: int | None = None, after_id: int = 0) -> list[SegmentRecord]:
        """Verified segments: the only ones whose local file may be deleted."""
        q = (
            select(SEGMENTS)
            .where(SEGMENTS.c.state == SegmentState.VERIFIED.value, SEGMENTS.c.id > after_id)
            .order_by(SEGMENTS.c.id)
        )
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [segment_record(r) for r in conn.execute(q)]

    def live_upload_ids(self) -> set[str]:
        """Upload ids referenced by unfinished segments (everything else under the prefix is an orphan)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(SEGMENTS.c.upload_id).where(
                    text(UNFINISHED_SEGMENTS_SQL), SEGMENTS.c.upload_id.is_not(None)
                )
            )
            return {r[0] for r in rows}
