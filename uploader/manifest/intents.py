"""Intents: what is recorded before a remote call (registration, pending parts, the seal, the
upload id).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from uploader.errors import (
    InvalidRangeError,
    KeyConflictError,
    LeaseLostError,
    SegmentSealedError,
    StaleStateError,
    UsageError,
)
from uploader.keys import validate_key
from uploader.manifest.guard import EventRow_
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import COMMITS, SEGMENTS, segment_record
from uploader.records import CommitRecord, Lease, NewCommit, SegmentRecord
from uploader.states import CommitState, SegmentState, check_segment_transition
from uploader.storage.base import MAX_PARTS


class Intents(Queries):
    """Writes that make an intent durable before the remote call it announces."""

    def register(
        self,
        key: str,
        path: str,
        *,
        node: str,
        part_size: int,
        worker: str,
        identity: tuple[int, int] | None = None,
    ) -> SegmentRecord:
        """Register a segment, or return the one registered under ``key`` for the same path."""
        return self.register_leased(
            key, path, node=node, part_size=part_size, worker=worker, identity=identity
        )[0]

    def register_leased(
        self,
        key: str,
        path: str,
        *,
        node: str,
        part_size: int,
        worker: str,
        lease_ttl: float | None = None,
        identity: tuple[int, int] | None = None,
    ) -> tuple[SegmentRecord, Lease | None]:
        """Register a segment; with ``lease_ttl``, a new row is born leased to ``worker``.

        Registering and leasing a new segment is then one transaction (fence 1), which matters
        when thousands of small segments are shipped. An existing row is returned unleased (the
        caller acquires it if it wants it).
        """
        validate_key(key)
        if part_size <= 0:
            raise UsageError(f"segment {key!r}: part size must be positive, got {part_size}")
        # Insert first: a new key (the common case) costs one transaction and no read. A key
        # registered before is left alone by ON CONFLICT DO NOTHING (no unique-violation error
        # in the server's log for every re-open) and read back below.
        now = self.clock()
        expires = None if lease_ttl is None else self._lease_until(lease_ttl)
        fence = 0 if lease_ttl is None else 1
        owner = None if lease_ttl is None else worker
        insert_new = pg_insert if self.is_postgres else sqlite_insert
        with self._begin() as conn:
            inserted = conn.execute(
                insert_new(SEGMENTS)
                .values(
                    key=key,
                    path=path,
                    node=node,
                    state=SegmentState.OPEN.value,
                    part_size=part_size,
                    fence=fence,
                    lease_owner=owner,
                    lease_expires=expires,
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                    file_device=None if identity is None else identity[0],
                    file_inode=None if identity is None else identity[1],
                )
                .on_conflict_do_nothing(index_elements=[SEGMENTS.c.key])
                .returning(SEGMENTS.c.id, SEGMENTS.c.lease_expires)
            ).first()
            seg_id: int | None = None if inserted is None else int(inserted.id)
            if seg_id is not None:
                assert inserted is not None
                expires = inserted.lease_expires  # as the lease clock set it
                self._event(
                    conn,
                    seg_id,
                    None,
                    None,
                    SegmentState.OPEN.value,
                    worker,
                    fence,
                    f"registered {path}",
                )
        if seg_id is None:
            existing = self.segment(key)  # registered before, or concurrently
            if existing is None:  # removed in between: nothing of ours to return
                raise StaleStateError(key, "registered", None)
        else:
            record = SegmentRecord(
                id=seg_id,
                key=key,
                path=path,
                node=node,
                state=SegmentState.OPEN,
                part_size=part_size,
                size=None,
                crc32c=None,
                expected_etag=None,
                upload_mode=None,
                upload_id=None,
                object_etag=None,
                fence=fence,
                lease_owner=owner,
                lease_expires=expires,
                attempts=0,
                last_error=None,
                reason=None,
                created_at=now,
                updated_at=now,
                sealed_at=None,
                verified_at=None,
                file_device=None if identity is None else identity[0],
                file_inode=None if identity is None else identity[1],
            )
            lease = (
                None
                if expires is None
                else Lease(segment_id=seg_id, key=key, owner=worker, fence=fence, expires=expires)
            )
            return record, lease
        if existing.path != path:
            raise KeyConflictError(
                f"segment key {key!r} is already registered for {existing.path!r} "
                f"(state {existing.state.value}); refusing to register it for {path!r}"
            )
        return existing, None

    def add_commits(self, lease: Lease, new: Sequence[NewCommit]) -> list[CommitRecord]:
        """Record parts as ``pending`` (the intent, durable before any byte is sent)."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            state = conn.execute(
                select(SEGMENTS.c.state).where(SEGMENTS.c.id == lease.segment_id)
            ).scalar_one()
            if state != SegmentState.OPEN.value:
                raise SegmentSealedError(
                    f"segment {lease.key!r} is {state}; commits are accepted only while it is open"
                )
            events: list[EventRow_] = []
            _end, _before, records = self._insert_commits(conn, lease, new, now, events)
            self._events(conn, events)
        return records

    def _insert_commits(
        self,
        conn: Connection,
        lease: Lease,
        new: Sequence[NewCommit],
        now: datetime,
        events: list[EventRow_],
    ) -> tuple[int, int, list[CommitRecord]]:
        """Insert ``new`` as ``pending`` after the last recorded part.

        Returns the end offset of all the parts, how many parts there were before, and the new
        rows as records (built from what was inserted: no read back).
        """
        last = conn.execute(
            select(COMMITS.c.part_number, COMMITS.c.end_offset)
            .where(COMMITS.c.segment_id == lease.segment_id)
            .order_by(COMMITS.c.part_number.desc())
            .limit(1)
        ).first()
        number, end = (0, 0) if last is None else (last.part_number, last.end_offset)
        before = number
        for c in new:
            if c.start < 0 or c.end < c.start:
                raise InvalidRangeError(
                    f"segment {lease.key!r} part {c.part_number}: invalid byte range [{c.start}, {c.end})"
                )
            if c.part_number != number + 1:
                raise InvalidRangeError(
                    f"segment {lease.key!r}: part {c.part_number} does not follow part {number}"
                )
            if c.start != end:
                kind = "overlaps" if c.start < end else "leaves a gap after"
                raise InvalidRangeError(
                    f"segment {lease.key!r} part {c.part_number}: range [{c.start}, {c.end}) {kind} "
                    f"the committed bytes [0, {end})"
                )
            if c.part_number > MAX_PARTS:
                raise InvalidRangeError(
                    f"segment {lease.key!r}: more than {MAX_PARTS} parts; use a larger part size"
                )
            number, end = c.part_number, c.end
        if not new:
            return end, before, []
        ids = (
            conn.execute(
                insert(COMMITS).returning(COMMITS.c.id, sort_by_parameter_order=True),
                [
                    {
                        "segment_id": lease.segment_id,
                        "part_number": c.part_number,
                        "start_offset": c.start,
                        "end_offset": c.end,
                        "md5": c.md5,
                        "crc32c": c.crc32c,
                        "state": CommitState.PENDING.value,
                        "attempts": 0,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for c in new
                ],
            )
            .scalars()
            .all()
        )
        records: list[CommitRecord] = []
        for commit_id, c in zip(ids, new, strict=True):
            events.append(
                (
                    lease.segment_id,
                    commit_id,
                    None,
                    CommitState.PENDING.value,
                    lease.owner,
                    lease.fence,
                    f"part {c.part_number} [{c.start}, {c.end})",
                )
            )
            records.append(
                CommitRecord(
                    id=commit_id,
                    segment_id=lease.segment_id,
                    part_number=c.part_number,
                    start=c.start,
                    end=c.end,
                    md5=c.md5,
                    crc32c=c.crc32c,
                    etag=None,
                    state=CommitState.PENDING,
                    attempts=0,
                    last_error=None,
                    reason=None,
                )
            )
        return end, before, records

    def seal(
        self,
        lease: Lease,
        final: Sequence[NewCommit],
        *,
        size: int,
        crc32c: int,
        expected_etag: str,
        upload_mode: str,
    ) -> list[CommitRecord]:
        """The final commit's intent: the last parts as ``pending`` and ``open -> sealed``, at once."""
        check_segment_transition(SegmentState.OPEN, SegmentState.SEALED, has_checksum=True)
        if size < 0:
            raise InvalidRangeError(f"segment {lease.key!r}: negative size {size}")
        now = self.clock()
        with self._begin() as conn:
            sealed: list[EventRow_] = []
            # The guarded compare-and-set first (a stale lease or a second seal is refused before
            # anything else is looked at); a range error below rolls it back with the rest.
            try:
                self._segment_cas(
                    conn,
                    lease,
                    SegmentState.OPEN,
                    SegmentState.SEALED,
                    {
                        "size": size,
                        "crc32c": crc32c,
                        "expected_etag": expected_etag,
                        "upload_mode": upload_mode,
                        "sealed_at": now,
                    },
                    f"sealed at {size} bytes, {upload_mode}",
                    now,
                    events=sealed,
                )
            except StaleStateError as exc:
                raise SegmentSealedError(
                    f"segment {lease.key!r} is already {exc.actual}; it cannot be sealed again"
                ) from None
            events: list[EventRow_] = []
            end, before, records = self._insert_commits(conn, lease, final, now, events)
            if end != size:
                raise InvalidRangeError(
                    f"segment {lease.key!r}: sealed size {size} but commits cover [0, {end})"
                )
            self._events(conn, events + sealed)  # the parts' intent, then the seal
        return records if before == 0 else self.commits(lease.segment_id)

    def set_upload(
        self, lease: Lease, upload_id: str | None, upload_mode: str | None = None
    ) -> SegmentRecord:
        """Record the remote upload id (or clear it) before any part is sent under it; returns
        the row as written (RETURNING: no read after)."""
        values: dict[str, Any] = {"upload_id": upload_id}
        if upload_mode is not None:
            values["upload_mode"] = upload_mode
        now = self.clock()
        with self._begin() as conn:
            row = conn.execute(
                update(SEGMENTS)
                .where(self._guard_clause(lease, now))
                .values(updated_at=now, **values)
                .returning(*SEGMENTS.c)
            ).first()
            if row is None:
                err = self._lease_error(conn, lease, now)
                raise err or LeaseLostError(lease.key, lease.fence, None)
        return segment_record(row)
