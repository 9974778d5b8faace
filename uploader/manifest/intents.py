"""Intents: what is recorded before a remote call (registration, pending parts, the seal, the
upload id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import insert, select

from uploader.errors import (
    InvalidRangeError,
    KeyConflictError,
    SegmentSealedError,
    StaleStateError,
    UsageError,
)
from uploader.keys import validate_key
from uploader.manifest.guard import Audit, Tx
from uploader.manifest.lease_holders import holder_values
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import COMMITS, commit_record, new_commit_values, segment_record
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
        checksum: str = "md5",
    ) -> SegmentRecord:
        """Register a segment, or return the one registered under ``key`` for the same path."""
        return self.register_leased(
            key,
            path,
            node=node,
            part_size=part_size,
            worker=worker,
            identity=identity,
            checksum=checksum,
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
        checksum: str = "md5",
    ) -> tuple[SegmentRecord, Lease | None]:
        """Register a segment; with ``lease_ttl``, a new row is born leased to ``worker``.

        Registering and leasing a new segment is then one transaction (fence 1), which matters
        when thousands of small segments are shipped. An existing row is returned unleased (the
        caller acquires it if it wants it).

        ``checksum`` ('md5' or 'crc32c') is the mode of a new row, kept for its whole life: a key
        registered before keeps the mode it was registered with.
        """
        validate_key(key)
        if part_size <= 0:
            raise UsageError(f"segment {key!r}: part size must be positive, got {part_size}")
        # Insert first: a new key (the common case) costs one transaction and no read. A key
        # registered before is left alone by ON CONFLICT DO NOTHING (no unique-violation error
        # in the server's log for every re-open) and read back below.
        fence = 0 if lease_ttl is None else 1
        with self._write() as tx:
            row = tx.insert_segment(
                key=key,
                path=path,
                node=node,
                state=SegmentState.OPEN.value,
                part_size=part_size,
                fence=fence,
                lease_owner=None if lease_ttl is None else worker,
                lease_expires=None if lease_ttl is None else self._lease_until(lease_ttl),
                **holder_values(None if lease_ttl is None else node),
                attempts=0,
                created_at=tx.now,
                updated_at=tx.now,
                file_device=None if identity is None else identity[0],
                file_inode=None if identity is None else identity[1],
                checksum=checksum,
            )
            if row is not None:
                tx.audit.append(
                    Audit(
                        row.id, SegmentState.OPEN.value, worker, fence, detail=f"registered {path}"
                    )
                )
        if row is not None:
            record = segment_record(row)  # as written, the lease expiry as the lease clock set it
            lease = (
                None
                if record.lease_expires is None
                else Lease(record.id, key, worker, fence, record.lease_expires)
            )
            return record, lease
        existing = self.segment(key)  # registered before, or concurrently
        if existing is None:  # removed in between: nothing of ours to return
            raise StaleStateError(key, "registered", None)
        if existing.path != path:
            raise KeyConflictError(
                f"segment key {key!r} is already registered for {existing.path!r} "
                f"(state {existing.state.value}); refusing to register it for {path!r}"
            )
        return existing, None

    def add_commits(self, lease: Lease, new: Sequence[NewCommit]) -> list[CommitRecord]:
        """Record parts as ``pending`` (the intent, durable before any byte is sent)."""
        with self._write() as tx:
            state = tx.guard(lease).state
            if state != SegmentState.OPEN.value:
                raise SegmentSealedError(
                    f"segment {lease.key!r} is {state}; commits are accepted only while it is open"
                )
            _end, _before, records = self._insert_commits(tx, lease, new)
        return records

    def _insert_commits(
        self, tx: Tx, lease: Lease, new: Sequence[NewCommit]
    ) -> tuple[int, int, list[CommitRecord]]:
        """Insert ``new`` as ``pending`` after the last recorded part, audited.

        Returns the end offset of all the parts, how many parts there were before, and the new
        rows as records (as inserted: RETURNING, no read back).
        """
        last = tx.conn.execute(
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
        rows = tx.conn.execute(
            # Put in part order afterwards (part numbers are unique within a segment): on
            # SQLite, RETURNING in parameter order makes SQLAlchemy send one INSERT per row.
            insert(COMMITS).returning(*COMMITS.c),
            [new_commit_values(lease.segment_id, c, CommitState.PENDING, tx.now) for c in new],
        ).all()
        records = sorted((commit_record(r) for r in rows), key=lambda c: c.part_number)
        tx.audit.extend(
            Audit.by(
                lease,
                None,
                CommitState.PENDING,
                commit_id=c.id,
                detail=f"part {c.part_number} [{c.start}, {c.end})",
            )
            for c in records
        )
        return end, before, records

    def seal(
        self,
        lease: Lease,
        final: Sequence[NewCommit],
        *,
        size: int,
        crc32c: int,
        expected_etag: str | None,
        upload_mode: str,
    ) -> list[CommitRecord]:
        """The final commit's intent: the last parts as ``pending`` and ``open -> sealed``, at once."""
        check_segment_transition(SegmentState.OPEN, SegmentState.SEALED, has_checksum=True)
        if size < 0:
            raise InvalidRangeError(f"segment {lease.key!r}: negative size {size}")
        detail = f"sealed at {size} bytes, {upload_mode}"
        with self._write() as tx:
            # The guarded compare-and-set first (a stale lease or a second seal is refused before
            # anything else is looked at); a range error below rolls it back with the rest.
            try:
                tx.move_segment(
                    lease,
                    SegmentState.OPEN,
                    SegmentState.SEALED,
                    {
                        "size": size,
                        "crc32c": crc32c,
                        "expected_etag": expected_etag,
                        "upload_mode": upload_mode,
                        "sealed_at": tx.now,
                    },
                    detail,
                    audit=False,  # audited below, after the parts' intent
                )
            except StaleStateError as exc:
                raise SegmentSealedError(
                    f"segment {lease.key!r} is already {exc.actual}; it cannot be sealed again"
                ) from None
            end, before, records = self._insert_commits(tx, lease, final)
            if end != size:
                raise InvalidRangeError(
                    f"segment {lease.key!r}: sealed size {size} but commits cover [0, {end})"
                )
            tx.audit.append(Audit.by(lease, SegmentState.OPEN, SegmentState.SEALED, detail=detail))
        return records if before == 0 else self.commits(lease.segment_id)

    def set_upload(
        self, lease: Lease, upload_id: str | None, upload_mode: str | None = None
    ) -> SegmentRecord:
        """Record the remote upload id (or clear it) before any part is sent under it; returns
        the row as written (RETURNING: no read after)."""
        values: dict[str, Any] = {"upload_id": upload_id}
        if upload_mode is not None:
            values["upload_mode"] = upload_mode
        with self._write() as tx:
            return segment_record(tx.guard(lease, **values))
