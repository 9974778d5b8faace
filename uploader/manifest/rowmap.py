"""Rows of the manifest's Core tables mapped to the frozen records; the tables themselves
(defined in :mod:`uploader.manifest.models`) are importable from here as they always were."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text

from uploader.manifest.models import COMMITS as COMMITS
from uploader.manifest.models import EVENTS as EVENTS
from uploader.manifest.models import SEGMENTS as SEGMENTS
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL
from uploader.records import CommitRecord, NewCommit, SegmentRecord
from uploader.states import CommitState, SegmentState

#: Unfinished segments are few among millions of verified ones. SQLite's planner, choosing
#: between the partial index of unfinished ids and a walk of the table in id order (an ORDER BY
#: id with a LIMIT), sometimes took the walk; this term (always true where it is used, next to
#: the partial index's own predicate) tells it how rare the rows it looks for are.
RARE_UNFINISHED = text(f"likelihood({UNFINISHED_SEGMENTS_SQL}, 0.0001)")


def segment_record(row: Any) -> SegmentRecord:
    return SegmentRecord(
        id=row.id,
        key=row.key,
        path=row.path,
        node=row.node,
        state=SegmentState(row.state),
        part_size=row.part_size,
        size=row.size,
        crc32c=row.crc32c,
        expected_etag=row.expected_etag,
        upload_mode=row.upload_mode,
        upload_id=row.upload_id,
        object_etag=row.object_etag,
        fence=row.fence,
        lease_owner=row.lease_owner,
        lease_expires=row.lease_expires,
        attempts=row.attempts,
        last_error=row.last_error,
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        sealed_at=row.sealed_at,
        verified_at=row.verified_at,
        file_device=row.file_device,
        file_inode=row.file_inode,
        remove_etag=row.remove_etag,
        checked_at=row.checked_at,
        checksum=row.checksum,
    )


def commit_record(row: Any) -> CommitRecord:
    return CommitRecord(
        id=row.id,
        segment_id=row.segment_id,
        part_number=row.part_number,
        start=row.start_offset,
        end=row.end_offset,
        md5=row.md5,
        crc32c=row.crc32c,
        etag=row.etag,
        state=CommitState(row.state),
        attempts=row.attempts,
        last_error=row.last_error,
        reason=row.reason,
    )


def new_commit_values(
    segment_id: int,
    commit: NewCommit,
    state: CommitState,
    now: datetime,
    *,
    etag: str | None = None,
) -> dict[str, Any]:
    """The row a new part is inserted as."""
    return {
        "segment_id": segment_id,
        "part_number": commit.part_number,
        "start_offset": commit.start,
        "end_offset": commit.end,
        "md5": commit.md5,
        "crc32c": commit.crc32c,
        "etag": etag,
        "state": state.value,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
    }
