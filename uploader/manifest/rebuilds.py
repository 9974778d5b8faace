"""Rows recreated by a rebuild from the objects' metadata, and the audit of a comparison."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from uploader.errors import InvalidStateError
from uploader.keys import validate_key
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import COMMITS, SEGMENTS
from uploader.records import NewCommit, SegmentRecord
from uploader.states import CommitState, SegmentState


class Rebuilds(Queries):
    """Inserts of rebuilt rows; an existing row is never overwritten."""

    def rebuilt(
        self,
        key: str,
        *,
        state: SegmentState,
        path: str,
        node: str,
        part_size: int,
        size: int,
        crc32c: int | None,
        etag: str | None,
        upload_mode: str | None,
        parts: Sequence[NewCommit],
        worker: str,
        detail: str,
    ) -> SegmentRecord | None:
        """Insert a segment recreated from its object by a rebuild, with its parts, in one
        transaction; ``verified`` (parts verified, ETag = MD5) or ``unknown`` (unknown origin, no
        parts, ``detail`` is the reason). A key already present inserts nothing: None (a row is
        compared by the caller, never overwritten). Audited with ``detail``."""
        validate_key(key)
        if state not in (SegmentState.VERIFIED, SegmentState.UNKNOWN):
            raise InvalidStateError(f"a rebuild creates verified or unknown rows, not {state}")
        if state is SegmentState.VERIFIED and (crc32c is None or etag is None or not parts):
            raise InvalidStateError("a rebuilt verified row needs its checksums and parts")
        now = self.clock()
        insert_new = pg_insert if self.is_postgres else sqlite_insert
        verified = state is SegmentState.VERIFIED
        with self._begin() as conn:
            seg_id = conn.execute(
                insert_new(SEGMENTS)
                .values(
                    key=key,
                    path=path,
                    node=node,
                    state=state.value,
                    part_size=part_size,
                    size=size,
                    crc32c=crc32c,
                    expected_etag=etag if verified else None,
                    upload_mode=upload_mode,
                    object_etag=etag,
                    fence=0,
                    attempts=0,
                    reason=None if verified else detail,
                    created_at=now,
                    updated_at=now,
                    sealed_at=now if verified else None,
                    verified_at=now if verified else None,
                    checked_at=now,
                )
                .on_conflict_do_nothing(index_elements=[SEGMENTS.c.key])
                .returning(SEGMENTS.c.id)
            ).scalar_one_or_none()
            if seg_id is None:
                return None
            if parts:
                conn.execute(
                    insert(COMMITS),
                    [
                        {
                            "segment_id": seg_id,
                            "part_number": c.part_number,
                            "start_offset": c.start,
                            "end_offset": c.end,
                            "md5": c.md5,
                            "crc32c": c.crc32c,
                            "etag": c.md5,
                            "state": CommitState.VERIFIED.value,
                            "attempts": 0,
                            "created_at": now,
                            "updated_at": now,
                        }
                        for c in parts
                    ],
                )
            self._event(conn, seg_id, None, None, state.value, worker, 0, detail)
        return self.segment_by_id(seg_id)

    def rebuild_compared(self, segment_id: int, worker: str, detail: str) -> None:
        """Audit a rebuild's comparison of an existing row with its object (nothing changes)."""
        with self._begin() as conn:
            row = conn.execute(
                select(SEGMENTS.c.state, SEGMENTS.c.fence).where(SEGMENTS.c.id == segment_id)
            ).one()
            self._event(conn, segment_id, None, row.state, row.state, worker, row.fence, detail)
