"""Resets and failures: parts back to ``pending``, segments back to ``sealed``, ``failed`` and a
human's retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select

from uploader.errors import InvalidStateError, SegmentBusyError, UsageError
from uploader.keys import validate_key
from uploader.manifest.guard import Audit, Tx, check_who, clip
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import SEGMENTS, segment_record
from uploader.records import CommitRecord, Lease, SegmentRecord
from uploader.states import (
    CommitState,
    SegmentState,
    check_commit_transition,
    check_segment_transition,
    parse_segment_state,
)


class Resets(Queries):
    """Writes that move rows backwards or to ``failed``."""

    def reupload(self, lease: Lease, reason: str, *, remove_etag: str | None = None) -> None:
        """``uploaded -> sealed``: the completed object failed verification; send it all again.

        ``remove_etag`` records the intent to remove the object at the key that has this ETag
        (the one that failed): written, fenced, before the conditional delete is sent.
        """
        with self._write() as tx:
            tx.move_segment(
                lease,
                SegmentState.UPLOADED,
                SegmentState.SEALED,
                {
                    "upload_id": None,
                    "object_etag": None,
                    "remove_etag": remove_etag,
                    "attempts": SEGMENTS.c.attempts + 1,
                    "last_error": clip(reason),
                },
                reason,
            )
            self._parts_back(tx, lease, CommitState.UPLOADED, reason)

    def drifted(self, lease: Lease, reason: str, *, remove_etag: str | None = None) -> None:
        """``verified -> sealed``: the verified object vanished or changed at the remote while
        the local bytes still match: every part back to ``pending``, uploaded again. With
        ``remove_etag``, the intent to remove exactly the object that is there now."""
        with self._write() as tx:
            tx.move_segment(
                lease,
                SegmentState.VERIFIED,
                SegmentState.SEALED,
                {
                    "upload_id": None,
                    "object_etag": None,
                    "remove_etag": remove_etag,
                    "verified_at": None,
                    "checked_at": tx.now,
                    "attempts": SEGMENTS.c.attempts + 1,
                    "last_error": clip(reason),
                },
                reason,
                check_unsent=False,
            )
            self._parts_back(tx, lease, CommitState.VERIFIED, reason)

    def parts_unsent(self, lease: Lease, commits: Sequence[CommitRecord], reason: str) -> None:
        """``uploaded -> pending``: the remote does not hold these parts with the recorded MD5."""
        if not commits:
            return
        with self._write() as tx:
            tx.guard(lease)
            for commit in commits:
                tx.move_commit(
                    lease,
                    commit.id,
                    CommitState.UPLOADED,
                    CommitState.PENDING,
                    {"etag": None},
                    reason,
                )

    def reset_commits(self, lease: Lease, reason: str) -> None:
        """Every ``uploaded`` commit back to ``pending`` (its upload id is gone from the remote)."""
        with self._write() as tx:
            tx.guard(lease, upload_id=None)
            self._parts_back(tx, lease, CommitState.UPLOADED, reason)

    @staticmethod
    def _parts_back(tx: Tx, lease: Lease, expected: CommitState, reason: str) -> None:
        """Every part of the leased segment in ``expected`` back to ``pending`` (its ETag
        forgotten): one UPDATE, one audit row each."""
        tx.move_parts(
            lease.segment_id,
            [expected],
            CommitState.PENDING,
            {"etag": None},
            worker=lease.owner,
            fence=lease.fence,
            detail=reason,
        )

    def fail_segment(self, lease: Lease, reason: str) -> None:
        """Terminal ``failed`` with a reason, for the segment and its unfinished commits."""
        with self._write() as tx:
            state = tx.conn.execute(
                select(SEGMENTS.c.state).where(SEGMENTS.c.id == lease.segment_id)
            ).scalar_one()
            src = parse_segment_state(state)
            check_segment_transition(src, SegmentState.FAILED, reason=reason)
            tx.move_segment(lease, src, SegmentState.FAILED, {"reason": clip(reason)}, reason)
            tx.move_parts(
                lease.segment_id,
                [CommitState.PENDING, CommitState.UPLOADED, CommitState.VERIFIED],
                CommitState.FAILED,
                {"reason": clip(reason)},
                worker=lease.owner,
                fence=lease.fence,
                detail=reason,
            )

    def retry_failed(
        self,
        key: str,
        *,
        who: str,
        why: str,
        identity: tuple[int, int] | None = None,
    ) -> SegmentRecord:
        """A human fixed what made ``key`` fail: ``failed -> sealed`` when its seal was recorded
        (size and checksums kept), else ``failed -> open``; every failed part back to
        ``pending`` (the driver learns again what the remote holds, and checks every local byte
        again against the recorded checksums before anything is verified).

        Guarded: the row must still be ``failed`` with the fence read, and leased by nobody
        (a live lease: :class:`SegmentBusyError`). The fence moves on, so a worker that failed it
        can write nothing more. ``identity`` (device, inode) re-records the local file's identity
        (a file restored from a copy is another inode; its bytes are still checked). Audit rows
        name ``who`` and ``why``.
        """
        validate_key(key)
        if not why.strip():
            raise UsageError("a retry needs a reason (who fixed what)")
        check_who(who, f"retried {key!r}")
        with self._write() as tx:
            row = tx.conn.execute(select(SEGMENTS).where(SEGMENTS.c.key == key)).first()
            if row is None:
                raise UsageError(f"segment {key!r} is not in the manifest")
            seg = segment_record(row)
            if seg.state is not SegmentState.FAILED:
                raise InvalidStateError(
                    f"segment {key!r} is {seg.state.value}, not failed: nothing to retry"
                )
            if (
                seg.lease_owner is not None
                and seg.lease_expires is not None
                and (seg.lease_expires > tx.now)
            ):
                raise SegmentBusyError(
                    f"segment {key!r} is leased by {seg.lease_owner} until "
                    f"{seg.lease_expires:%Y-%m-%d %H:%M:%S} UTC; retry once it is released"
                )
            sealed = seg.size is not None and seg.crc32c is not None
            dst = SegmentState.SEALED if sealed else SegmentState.OPEN
            check_segment_transition(SegmentState.FAILED, dst, has_checksum=sealed)
            check_commit_transition(CommitState.FAILED, CommitState.PENDING)
            values: dict[str, Any] = {
                "state": dst.value,
                "reason": None,
                "last_error": clip(f"retried after failure: {seg.reason or ''}"),
                "object_etag": None,
                "fence": SEGMENTS.c.fence + 1,
                "lease_owner": None,
                "lease_expires": None,
            }
            detail = f"retry by {who}: {why} (it had failed: {seg.reason or 'no reason'})"
            if identity is not None and identity != (seg.file_device, seg.file_inode):
                values["file_device"], values["file_inode"] = identity
                detail += (
                    f"; local file identity re-recorded (inode {seg.file_inode} -> {identity[1]})"
                )
            written = tx.compare_and_set(
                SEGMENTS,
                seg.id,
                SegmentState.FAILED,
                values,
                key=key,
                where=[SEGMENTS.c.fence == seg.fence],
            )
            fence = seg.fence + 1
            tx.audit.append(Audit(seg.id, dst.value, who, fence, "failed", detail=detail))
            tx.move_parts(
                seg.id,
                [CommitState.FAILED],
                CommitState.PENDING,
                {"etag": None, "reason": None},
                worker=who,
                fence=fence,
                detail=f"retry by {who}: {why}",
            )
        return segment_record(written)
