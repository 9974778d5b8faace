"""Resets and failures: parts back to ``pending``, segments back to ``sealed``, ``failed`` and a
human's retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, select, update

from uploader.errors import InvalidStateError, SegmentBusyError, StaleStateError, UsageError
from uploader.keys import validate_key
from uploader.manifest.guard import EventRow_, clip
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import COMMITS, SEGMENTS, segment_record
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
        now = self.clock()
        with self._begin() as conn:
            self._segment_cas(
                conn,
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
                now,
            )
            self._reset_commits(conn, lease, reason)

    def drifted(self, lease: Lease, reason: str, *, remove_etag: str | None = None) -> None:
        """``verified -> sealed``: the verified object vanished or changed at the remote while
        the local bytes still match: every part back to ``pending``, uploaded again. With
        ``remove_etag``, the intent to remove exactly the object that is there now."""
        now = self.clock()
        with self._begin() as conn:
            events: list[EventRow_] = []
            self._segment_cas(
                conn,
                lease,
                SegmentState.VERIFIED,
                SegmentState.SEALED,
                {
                    "upload_id": None,
                    "object_etag": None,
                    "remove_etag": remove_etag,
                    "verified_at": None,
                    "checked_at": now,
                    "attempts": SEGMENTS.c.attempts + 1,
                    "last_error": clip(reason),
                },
                reason,
                now,
                check_unsent=False,
                events=events,
            )
            ids = (
                conn.execute(
                    update(COMMITS)
                    .where(
                        COMMITS.c.segment_id == lease.segment_id,
                        COMMITS.c.state == CommitState.VERIFIED.value,
                    )
                    .values(state=CommitState.PENDING.value, etag=None, updated_at=now)
                    .returning(COMMITS.c.id)
                )
                .scalars()
                .all()
            )
            events.extend(
                (lease.segment_id, cid, "verified", "pending", lease.owner, lease.fence, reason)
                for cid in sorted(ids)
            )
            self._events(conn, events)

    def parts_unsent(self, lease: Lease, commits: Sequence[CommitRecord], reason: str) -> None:
        """``uploaded -> pending``: the remote does not hold these parts with the recorded MD5."""
        if not commits:
            return
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            events: list[EventRow_] = []
            for commit in commits:
                self._commit_move(
                    conn,
                    lease,
                    commit,
                    CommitState.UPLOADED,
                    CommitState.PENDING,
                    {"etag": None},
                    now,
                )
                events.append(self._commit_event(lease, commit, "uploaded", "pending", reason))
            self._events(conn, events)

    def reset_commits(self, lease: Lease, reason: str) -> None:
        """Every ``uploaded`` commit back to ``pending`` (its upload id is gone from the remote)."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now, values={"upload_id": None})
            self._reset_commits(conn, lease, reason)

    def _reset_commits(self, conn: Connection, lease: Lease, reason: str) -> None:
        ids = (
            conn.execute(
                select(COMMITS.c.id).where(
                    COMMITS.c.segment_id == lease.segment_id,
                    COMMITS.c.state == CommitState.UPLOADED.value,
                )
            )
            .scalars()
            .all()
        )
        for cid in ids:
            conn.execute(
                update(COMMITS)
                .where(COMMITS.c.id == cid)
                .values(state=CommitState.PENDING.value, etag=None, updated_at=self.clock())
            )
            self._event(
                conn, lease.segment_id, cid, "uploaded", "pending", lease.owner, lease.fence, reason
            )

    def fail_segment(self, lease: Lease, reason: str) -> None:
        """Terminal ``failed`` with a reason, for the segment and its unfinished commits."""
        now = self.clock()
        with self._begin() as conn:
            state = conn.execute(
                select(SEGMENTS.c.state).where(SEGMENTS.c.id == lease.segment_id)
            ).scalar_one()
            src = parse_segment_state(state)
            check_segment_transition(src, SegmentState.FAILED, reason=reason)
            self._segment_cas(
                conn, lease, src, SegmentState.FAILED, {"reason": clip(reason)}, reason, now
            )
            for c in conn.execute(
                select(COMMITS.c.id, COMMITS.c.state).where(
                    COMMITS.c.segment_id == lease.segment_id,
                    COMMITS.c.state.in_(
                        [
                            CommitState.PENDING.value,
                            CommitState.UPLOADED.value,
                            CommitState.VERIFIED.value,
                        ]
                    ),
                )
            ).all():
                conn.execute(
                    update(COMMITS)
                    .where(COMMITS.c.id == c.id)
                    .values(state=CommitState.FAILED.value, reason=clip(reason), updated_at=now)
                )
                self._event(
                    conn,
                    lease.segment_id,
                    c.id,
                    c.state,
                    "failed",
                    lease.owner,
                    lease.fence,
                    reason,
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
        now = self.clock()
        with self._begin() as conn:
            row = conn.execute(select(SEGMENTS).where(SEGMENTS.c.key == key)).first()
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
                and (seg.lease_expires > now)
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
                "updated_at": now,
            }
            detail = f"retry by {who}: {why} (it had failed: {seg.reason or 'no reason'})"
            if identity is not None and identity != (seg.file_device, seg.file_inode):
                values["file_device"], values["file_inode"] = identity
                detail += (
                    f"; local file identity re-recorded (inode {seg.file_inode} -> {identity[1]})"
                )
            res = conn.execute(
                update(SEGMENTS)
                .where(
                    SEGMENTS.c.id == seg.id,
                    SEGMENTS.c.state == SegmentState.FAILED.value,
                    SEGMENTS.c.fence == seg.fence,
                )
                .values(**values)
            )
            if res.rowcount != 1:
                actual = conn.execute(
                    select(SEGMENTS.c.state).where(SEGMENTS.c.id == seg.id)
                ).scalar()
                raise StaleStateError(key, SegmentState.FAILED.value, actual)
            fence = seg.fence + 1
            events: list[EventRow_] = [(seg.id, None, "failed", dst.value, who, fence, detail)]
            ids = (
                conn.execute(
                    update(COMMITS)
                    .where(
                        COMMITS.c.segment_id == seg.id, COMMITS.c.state == CommitState.FAILED.value
                    )
                    .values(state=CommitState.PENDING.value, etag=None, reason=None, updated_at=now)
                    .returning(COMMITS.c.id)
                )
                .scalars()
                .all()
            )
            events.extend(
                (seg.id, cid, "failed", "pending", who, fence, f"retry by {who}: {why}")
                for cid in sorted(ids)
            )
            self._events(conn, events)
        return self.segment_by_id(seg.id)
