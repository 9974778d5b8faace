"""Outcomes: what the remote said, recorded after the call (acknowledged parts, complete and
verified objects, failed attempts).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from uploader.errors import StaleStateError
from uploader.manifest.guard import EventRow_, ManifestCore, check_acknowledged, clip
from uploader.manifest.rowmap import COMMITS, SEGMENTS
from uploader.records import CommitRecord, Lease
from uploader.states import CommitState, SegmentState, check_commit_transition


class Outcomes(ManifestCore):
    """Writes that record what a remote call answered."""

    def commit_uploaded(self, lease: Lease, commit: CommitRecord, etag: str) -> None:
        """``pending -> uploaded``: only with the ETag the remote acknowledged, equal to our MD5
        (one part of :meth:`parts_uploaded`)."""
        self.parts_uploaded(lease, [(commit, etag)])

    def put_done(self, lease: Lease, commit: CommitRecord, etag: str) -> None:
        """A single PUT was acknowledged: its part and the segment become ``uploaded`` at once.

        Both facts come from the same response, so one transaction records them.
        """
        check_acknowledged(lease, commit, etag)
        now = self.clock()
        with self._begin() as conn:
            # The part's audit row first, as the part moves first in the story; in SQL the
            # segment row moves first (guarded; it is also the lock every writer takes first on
            # PostgreSQL), then the part; "no unsent part" is checked once the part has moved.
            events: list[EventRow_] = [
                (
                    lease.segment_id,
                    commit.id,
                    CommitState.PENDING.value,
                    CommitState.UPLOADED.value,
                    lease.owner,
                    lease.fence,
                    None,
                )
            ]
            self._segment_cas(
                conn,
                lease,
                SegmentState.SEALED,
                SegmentState.UPLOADED,
                {"object_etag": etag, "upload_id": None},
                f"object complete (single PUT), etag {etag}",
                now,
                check_unsent=False,
                events=events,
            )
            self._pending_part_to(conn, lease, commit, CommitState.UPLOADED, etag, now)
            self._events(conn, events)

    def put_verified(
        self, lease: Lease, commit: CommitRecord, etag: str, detail: str, *, release: bool = False
    ) -> None:
        """A single PUT acknowledged *and* its object checked: ``put_done`` then
        ``segment_verified`` in one transaction (both facts are known when it starts)."""
        check_acknowledged(lease, commit, etag)
        now = self.clock()
        values: dict[str, Any] = {
            "object_etag": etag,
            "upload_id": None,
            "verified_at": now,
            "last_error": None,
        }
        if release:
            values.update(lease_owner=None, lease_expires=None)
        with self._begin() as conn:
            # sealed -> uploaded -> verified in one guarded update (both steps are proven when
            # the transaction starts); the audit trail still shows each step.
            self._segment_cas(
                conn,
                lease,
                SegmentState.SEALED,
                SegmentState.VERIFIED,
                values,
                None,
                now,
                check_unsent=False,
                events=[],
            )
            self._pending_part_to(conn, lease, commit, CommitState.VERIFIED, etag, now)
            seg, cid, owner, fence = lease.segment_id, commit.id, lease.owner, lease.fence
            self._events(
                conn,
                [
                    (seg, cid, "pending", "uploaded", owner, fence, None),
                    (
                        seg,
                        None,
                        "sealed",
                        "uploaded",
                        owner,
                        fence,
                        f"object complete (single PUT), etag {etag}",
                    ),
                    (seg, None, "uploaded", "verified", owner, fence, detail),
                    (seg, cid, "uploaded", "verified", owner, fence, None),
                ],
            )

    def _pending_part_to(
        self,
        conn: Connection,
        lease: Lease,
        commit: CommitRecord,
        new: CommitState,
        etag: str,
        now: datetime,
    ) -> None:
        """A single-PUT segment's one part leaves ``pending`` with the PUT's ETag (after the
        segment row moved, so the segment lock is taken first); then no part may be unsent."""
        res = conn.execute(
            update(COMMITS)
            .where(
                COMMITS.c.id == commit.id,
                COMMITS.c.segment_id == lease.segment_id,
                COMMITS.c.state == CommitState.PENDING.value,
            )
            .values(state=new.value, etag=etag, updated_at=now)
        )
        if res.rowcount != 1:
            actual = conn.execute(select(COMMITS.c.state).where(COMMITS.c.id == commit.id)).scalar()
            raise StaleStateError(
                f"{lease.key} part {commit.part_number}", "pending", actual, what="commit"
            )
        segment_state = (
            SegmentState.VERIFIED if new is CommitState.VERIFIED else SegmentState.UPLOADED
        )
        self._check_all_sent(conn, lease, segment_state)

    def commit_attempt_failed(self, lease: Lease, commit: CommitRecord, error: str) -> None:
        """A send failed: the row stays ``pending``, with attempts and the last error recorded."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(
                conn,
                lease,
                now,
                values={"attempts": SEGMENTS.c.attempts + 1, "last_error": clip(error)},
            )
            conn.execute(
                update(COMMITS)
                .where(COMMITS.c.id == commit.id, COMMITS.c.segment_id == lease.segment_id)
                .values(attempts=COMMITS.c.attempts + 1, last_error=clip(error), updated_at=now)
            )

    def record_error(self, lease: Lease, error: str) -> None:
        """A failed attempt on the segment (complete, verify): attempts and last error."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(
                conn,
                lease,
                now,
                values={"attempts": SEGMENTS.c.attempts + 1, "last_error": clip(error)},
            )

    def segment_verified(self, lease: Lease, detail: str, *, release: bool = False) -> None:
        """``uploaded -> verified`` for the segment and every one of its commits, in one transaction.

        With ``release`` the lease is given back in the same transaction (nothing is left to do).
        """
        now = self.clock()
        with self._begin() as conn:
            commits = conn.execute(
                select(COMMITS.c.id, COMMITS.c.state, COMMITS.c.part_number, COMMITS.c.etag)
                .where(COMMITS.c.segment_id == lease.segment_id)
                .order_by(COMMITS.c.part_number)
            ).all()
            for c in commits:
                check_commit_transition(c.state, CommitState.VERIFIED, has_etag=c.etag is not None)
            values: dict[str, Any] = {"verified_at": now, "last_error": None}
            if release:
                values.update(lease_owner=None, lease_expires=None)
            events: list[EventRow_] = []
            # Every part was just read as uploaded (checked above); the conditional update of
            # the parts below proves nobody moved one in between.
            self._segment_cas(
                conn,
                lease,
                SegmentState.UPLOADED,
                SegmentState.VERIFIED,
                values,
                detail,
                now,
                check_unsent=False,
                events=events,
            )
            res = conn.execute(
                update(COMMITS)
                .where(
                    COMMITS.c.segment_id == lease.segment_id,
                    COMMITS.c.state == CommitState.UPLOADED.value,
                )
                .values(state=CommitState.VERIFIED.value, updated_at=now)
            )
            if res.rowcount != len(commits):
                moved = (
                    conn.execute(
                        select(COMMITS.c.part_number)
                        .where(
                            COMMITS.c.segment_id == lease.segment_id,
                            COMMITS.c.state != CommitState.VERIFIED.value,
                        )
                        .order_by(COMMITS.c.part_number)
                    )
                    .scalars()
                    .all()
                )
                raise StaleStateError(
                    f"{lease.key} part(s) {', '.join(map(str, moved))}",
                    "uploaded",
                    "moved meanwhile",
                    what="commit",
                )
            events.extend(
                (lease.segment_id, c.id, "uploaded", "verified", lease.owner, lease.fence, None)
                for c in commits
            )
            self._events(conn, events)

    def parts_uploaded(
        self,
        lease: Lease,
        acks: Sequence[tuple[CommitRecord, str]],
        detail: str | None = None,
    ) -> None:
        """``pending -> uploaded`` for parts the remote acknowledged or lists, each with the ETag
        it gave (equal to the recorded MD5), in one transaction."""
        for commit, etag in acks:
            check_acknowledged(lease, commit, etag)
        if not acks:
            return
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            events: list[EventRow_] = []
            for commit, etag in acks:
                self._commit_move(
                    conn,
                    lease,
                    commit,
                    CommitState.PENDING,
                    CommitState.UPLOADED,
                    {"etag": etag},
                    now,
                )
                events.append(self._commit_event(lease, commit, "pending", "uploaded", detail))
            self._events(conn, events)

    def object_adopted(
        self, lease: Lease, commits: Sequence[CommitRecord], object_etag: str, detail: str
    ) -> None:
        """``sealed -> uploaded`` for an object found complete at the key, matching what the seal
        expects (a completion or PUT whose response was lost); its pending parts with it."""
        now = self.clock()
        with self._begin() as conn:
            events: list[EventRow_] = []
            self._segment_cas(
                conn,
                lease,
                SegmentState.SEALED,
                SegmentState.UPLOADED,
                {"object_etag": object_etag, "upload_id": None},
                detail,
                now,
                check_unsent=False,
                events=events,
            )
            for commit in commits:
                if commit.state is CommitState.PENDING:
                    self._commit_move(
                        conn,
                        lease,
                        commit,
                        CommitState.PENDING,
                        CommitState.UPLOADED,
                        {"etag": commit.md5},
                        now,
                    )
                    events.append(self._commit_event(lease, commit, "pending", "uploaded", detail))
            self._check_all_sent(conn, lease, SegmentState.UPLOADED)
            self._events(conn, events)

    def checked(self, segment_id: int) -> None:
        """The verified object was just found matching: remember when (the scrub's order)."""
        with self._begin() as conn:
            conn.execute(
                update(SEGMENTS)
                .where(SEGMENTS.c.id == segment_id, SEGMENTS.c.state == SegmentState.VERIFIED.value)
                .values(checked_at=self.clock())
            )

    def object_removed(self, lease: Lease, etag: str) -> None:
        """The object named by ``remove_etag`` is gone from the key: the intent is fulfilled."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            conn.execute(
                update(SEGMENTS)
                .where(SEGMENTS.c.id == lease.segment_id, SEGMENTS.c.remove_etag == etag)
                .values(remove_etag=None)
            )
