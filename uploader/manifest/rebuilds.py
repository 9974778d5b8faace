"""Rows recreated by a rebuild from the objects' metadata, and the audit of a comparison."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import insert, select

from uploader.errors import InvalidStateError
from uploader.keys import validate_key
from uploader.manifest.guard import Audit
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import COMMITS, SEGMENTS, new_commit_values, segment_record
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
        object_etag: str | None = None,
        checksum: str = "md5",
    ) -> SegmentRecord | None:
        """Insert a segment recreated from its object by a rebuild, with its parts, in one
        transaction; ``verified`` (parts verified, ETag = MD5) or ``unknown`` (unknown origin, no
        parts, ``detail`` is the reason). A key already present inserts nothing: None (a row is
        compared by the caller, never overwritten). Audited with ``detail``. ``checksum``: the
        segment's mode ('crc32c': no ETag expected, no part MD5s; ``object_etag`` is then what the
        remote reports for the object)."""
        validate_key(key)
        if state not in (SegmentState.VERIFIED, SegmentState.UNKNOWN):
            raise InvalidStateError(f"a rebuild creates verified or unknown rows, not {state}")
        no_proof = etag is None and checksum != "crc32c"
        if state is SegmentState.VERIFIED and (crc32c is None or no_proof or not parts):
            raise InvalidStateError("a rebuilt verified row needs its checksums and parts")
        verified = state is SegmentState.VERIFIED
        with self._write() as tx:
            now = tx.now
            row = tx.insert_segment(
                key=key,
                path=path,
                node=node,
                state=state.value,
                part_size=part_size,
                size=size,
                crc32c=crc32c,
                expected_etag=etag if verified else None,
                upload_mode=upload_mode,
                object_etag=object_etag or etag,
                checksum=checksum,
                fence=0,
                attempts=0,
                reason=None if verified else detail,
                created_at=now,
                updated_at=now,
                sealed_at=now if verified else None,
                verified_at=now if verified else None,
                checked_at=now,
            )
            if row is None:
                return None
            if parts:
                tx.conn.execute(
                    insert(COMMITS),
                    [
                        # (a crc32c-mode part: no MD5, and no part ETag was ever seen)
                        new_commit_values(row.id, c, CommitState.VERIFIED, now, etag=c.md5 or "")
                        for c in parts
                    ],
                )
            tx.audit.append(Audit(row.id, state.value, worker, 0, detail=detail))
        return segment_record(row)

    def rebuild_compared(self, segment_id: int, worker: str, detail: str) -> None:
        """Audit a rebuild's comparison of an existing row with its object (nothing changes)."""
        with self._write() as tx:
            row = tx.conn.execute(
                select(SEGMENTS.c.state, SEGMENTS.c.fence).where(SEGMENTS.c.id == segment_id)
            ).one()
            tx.audit.append(
                Audit(segment_id, row.state, worker, row.fence, row.state, detail=detail)
            )
