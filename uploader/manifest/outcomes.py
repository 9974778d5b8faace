"""Outcomes: what the remote said, recorded after the call (acknowledged parts, complete and
verified objects, failed attempts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, update

from uploader.errors import StaleStateError
from uploader.manifest.core import ManifestCore
from uploader.manifest.guard import Audit, Tx, check_acknowledged, clip
from uploader.manifest.rowmap import COMMITS, EVENTS, SEGMENTS
from uploader.records import CommitRecord, Lease
from uploader.states import CommitState, SegmentState, check_commit_transition

#: The detail of the audit event a pass that ended on a non-retryable error leaves (see
#: :meth:`Outcomes.record_stuck`).
STUCK_PREFIX = "stuck: "


class Outcomes(ManifestCore):
    """Writes that record what a remote call answered."""

    def commit_uploaded(self, lease: Lease, commit: CommitRecord, etag: str) -> None:
        """``pending -> uploaded``: only with the ETag the remote acknowledged, equal to our MD5
        (one part of :meth:`parts_uploaded`)."""
        self.parts_uploaded(lease, [(commit, etag)])

    def put_done(
        self, lease: Lease, commit: CommitRecord, etag: str, *, proven: bool = False
    ) -> None:
        """A single PUT was acknowledged: its part and the segment become ``uploaded`` at once.
        ``proven``: the response echoed the part's CRC32C (what a crc32c-mode part needs).

        Both facts come from the same response, so one transaction records them.
        """
        check_acknowledged(lease, commit, etag, proven=proven)
        with self._write() as tx:
            # The part's audit row first, as the part moves first in the story; in SQL the
            # segment row moves first (guarded; it is also the lock every writer takes first on
            # PostgreSQL), then the part; "no unsent part" is checked once the part has moved.
            tx.audit.append(
                Audit.by(lease, CommitState.PENDING, CommitState.UPLOADED, commit_id=commit.id)
            )
            tx.move_segment(
                lease,
                SegmentState.SEALED,
                SegmentState.UPLOADED,
                {"object_etag": etag, "upload_id": None},
                f"object complete (single PUT), etag {etag}",
                check_unsent=False,
            )
            self._put_part(tx, lease, commit, CommitState.UPLOADED, etag)

    def put_verified(
        self,
        lease: Lease,
        commit: CommitRecord,
        etag: str,
        detail: str,
        *,
        release: bool = False,
        object_etag: str | None = None,
        proven: bool = False,
    ) -> None:
        """A single PUT acknowledged *and* its object checked: ``put_done`` then
        ``segment_verified`` in one transaction (both facts are known when it starts).
        ``object_etag``: what the remote reports for the object when it is not the part's MD5
        (SSE-KMS; the bytes were read back). ``proven``: the object was proven by its CRC32C or
        read back (a crc32c-mode part has no MD5 to compare ``etag`` with)."""
        check_acknowledged(lease, commit, etag, proven=proven)
        with self._write() as tx:
            self._put_verified_segment(tx, lease, release, object_etag or etag)
            self._put_verified_part(tx, lease, commit, etag, detail)

    def _put_verified_segment(self, tx: Tx, lease: Lease, release: bool, object_etag: str) -> None:
        """The first write of :meth:`put_verified`, the guarded move of the segment row: when
        it raises, nothing of this segment was written (a group commit's batch goes on)."""
        values = self._verified(tx, release, object_etag=object_etag, upload_id=None)
        # sealed -> uploaded -> verified in one guarded update (both steps are proven when
        # the transaction starts); the audit trail still shows each step.
        tx.move_segment(
            lease,
            SegmentState.SEALED,
            SegmentState.VERIFIED,
            values,
            None,
            check_unsent=False,
            audit=False,
        )

    def _put_verified_part(
        self, tx: Tx, lease: Lease, commit: CommitRecord, etag: str, detail: str
    ) -> None:
        """The rest of :meth:`put_verified`, after its segment row moved: the part, and the
        audit rows of every step."""
        self._put_part(tx, lease, commit, CommitState.VERIFIED, etag)
        tx.audit += self.put_verified_audit(lease, commit, etag, detail)

    @staticmethod
    def put_verified_audit(
        lease: Lease, commit: CommitRecord, etag: str, detail: str
    ) -> list[Audit]:
        """The audit rows of :meth:`put_verified`: every step, though one write made them."""
        pending, uploaded = CommitState.PENDING, CommitState.UPLOADED
        return [
            Audit.by(lease, pending, uploaded, commit_id=commit.id),
            Audit.by(
                lease,
                SegmentState.SEALED,
                SegmentState.UPLOADED,
                detail=f"object complete (single PUT), etag {etag}",
            ),
            Audit.by(lease, SegmentState.UPLOADED, SegmentState.VERIFIED, detail=detail),
            Audit.by(lease, uploaded, CommitState.VERIFIED, commit_id=commit.id),
        ]

    @staticmethod
    def _put_part(tx: Tx, lease: Lease, commit: CommitRecord, new: CommitState, etag: str) -> None:
        """A single-PUT segment's one part leaves ``pending`` with the PUT's ETag (after the
        segment row moved, so the segment lock is taken first); then no part may be unsent.
        Audited by the caller."""
        tx.move_commit(lease, commit.id, CommitState.PENDING, new, {"etag": etag}, audit=False)
        verified = new is CommitState.VERIFIED
        tx.check_all_sent(lease, SegmentState.VERIFIED if verified else SegmentState.UPLOADED)

    @staticmethod
    def _verified(tx: Tx, release: bool, **values: Any) -> dict[str, Any]:
        """What a segment row becomes with ``verified`` (and ``release``: the lease given back
        in the same transaction, as nothing is left to do)."""
        values.update(verified_at=tx.now, last_error=None)
        if release:
            values.update(lease_owner=None, lease_expires=None)
        return values

    def commit_attempt_failed(self, lease: Lease, commit: CommitRecord, error: str) -> None:
        """A send failed: the row stays ``pending``, with attempts and the last error recorded."""
        with self._write() as tx:
            self._attempt_failed(tx, lease, commit, error)

    @staticmethod
    def _attempt_failed(tx: Tx, lease: Lease, commit: CommitRecord, error: str) -> None:
        """:meth:`commit_attempt_failed` within ``tx``; the guard is the first write (when it
        raises, nothing was written)."""
        tx.guard(lease, attempts=SEGMENTS.c.attempts + 1, last_error=clip(error))
        tx.conn.execute(
            update(COMMITS)
            .where(COMMITS.c.id == commit.id, COMMITS.c.segment_id == lease.segment_id)
            .values(attempts=COMMITS.c.attempts + 1, last_error=clip(error), updated_at=tx.now)
        )

    def record_error(self, lease: Lease, error: str) -> None:
        """A failed attempt on the segment (complete, verify): attempts and last error."""
        with self._write() as tx:
            tx.guard(lease, attempts=SEGMENTS.c.attempts + 1, last_error=clip(error))

    def record_stuck(self, lease: Lease, error: str) -> int:
        """A pass ended on an error retrying cannot cure: recorded like :meth:`record_error`, plus
        an audit event (state unchanged, detail ``stuck: <error>``). Returns how many passes in a
        row ended on this same error: the trailing run of such events, counted from the trail
        (a transition of the segment, or another error, ends the run)."""
        detail = clip(f"{STUCK_PREFIX}{error}")
        with self._write() as tx:
            row = tx.guard(lease, attempts=SEGMENTS.c.attempts + 1, last_error=clip(error))
            # The trail before this pass's event (written when the transaction ends): 63 rows
            # and this one make the 64 the run is counted over.
            trail = tx.conn.execute(
                select(EVENTS.c.from_state, EVENTS.c.to_state, EVENTS.c.detail)
                .where(EVENTS.c.segment_id == lease.segment_id, EVENTS.c.commit_id.is_(None))
                .order_by(EVENTS.c.id.desc())
                .limit(63)
            ).all()
            tx.audit.append(Audit.by(lease, row.state, row.state, detail=detail))
        run = 1
        for event in trail:
            if event.from_state != event.to_state or event.detail != detail:
                break
            run += 1
        return run

    def segment_verified(self, lease: Lease, detail: str, *, release: bool = False) -> None:
        """``uploaded -> verified`` for the segment and every one of its commits, in one transaction.

        With ``release`` the lease is given back in the same transaction (nothing is left to do).
        """
        with self._write() as tx:
            commits = tx.conn.execute(
                select(COMMITS.c.id, COMMITS.c.state, COMMITS.c.part_number, COMMITS.c.etag)
                .where(COMMITS.c.segment_id == lease.segment_id)
                .order_by(COMMITS.c.part_number)
            ).all()
            for c in commits:
                check_commit_transition(c.state, CommitState.VERIFIED, has_etag=c.etag is not None)
            values = self._verified(tx, release)
            # Every part was just read as uploaded (checked above); the conditional update of
            # the parts below proves nobody moved one in between.
            tx.move_segment(
                lease,
                SegmentState.UPLOADED,
                SegmentState.VERIFIED,
                values,
                detail,
                check_unsent=False,
            )
            res = tx.conn.execute(
                update(COMMITS)
                .where(
                    COMMITS.c.segment_id == lease.segment_id,
                    COMMITS.c.state == CommitState.UPLOADED.value,
                )
                .values(state=CommitState.VERIFIED.value, updated_at=tx.now)
            )
            if res.rowcount != len(commits):
                moved = (
                    tx.conn.execute(
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
            tx.audit.extend(
                Audit.by(lease, CommitState.UPLOADED, CommitState.VERIFIED, commit_id=c.id)
                for c in commits
            )

    def parts_uploaded(
        self,
        lease: Lease,
        acks: Sequence[tuple[CommitRecord, str]],
        detail: str | None = None,
        *,
        proven: frozenset[int] = frozenset(),
        upload_id: str | None = None,
    ) -> None:
        """``pending -> uploaded`` for parts the remote acknowledged or lists, each with the ETag
        it gave (equal to the recorded MD5, or for the commit ids in ``proven`` another ETag
        acknowledged with the part's own CRC32C echoed), in one transaction. With ``upload_id``
        (the upload they were sent to), refused if the segment's upload is another one now (a
        drive reset it meanwhile: the parts belong to an upload that will not be completed)."""
        for commit, etag in acks:
            check_acknowledged(lease, commit, etag, proven=commit.id in proven)
        if not acks:
            return
        with self._write() as tx:
            # The row is ours and locked before the parts are read, without writing it yet: a
            # first write of the same acknowledgements still committing is waited for, then
            # seen below.
            row = tx.lock(lease)
            if upload_id is not None and row.upload_id != upload_id:
                raise StaleStateError(
                    lease.key, f"upload {upload_id}", f"upload {row.upload_id}", what="segment"
                )
            # Written already by a transaction whose answer was lost (the caller tries again):
            # the same ETag is no news, and nothing is written for it, not even the row's
            # updated_at. Any other difference is refused by the move below.
            done = {
                r.id: r.etag
                for r in tx.conn.execute(
                    select(COMMITS.c.id, COMMITS.c.etag).where(
                        COMMITS.c.id.in_([c.id for c, _ in acks]),
                        COMMITS.c.state == CommitState.UPLOADED.value,
                    )
                )
            }
            news = [(c, etag) for c, etag in acks if done.get(c.id, object()) != etag]
            if news:
                tx.guard(lease)
            for commit, etag in news:
                tx.move_commit(
                    lease,
                    commit.id,
                    CommitState.PENDING,
                    CommitState.UPLOADED,
                    {"etag": etag},
                    detail,
                )

    def object_adopted(
        self, lease: Lease, commits: Sequence[CommitRecord], object_etag: str, detail: str
    ) -> None:
        """``sealed -> uploaded`` for an object found complete at the key, matching what the seal
        expects (a completion or PUT whose response was lost); its pending parts with it."""
        with self._write() as tx:
            tx.move_segment(
                lease,
                SegmentState.SEALED,
                SegmentState.UPLOADED,
                {"object_etag": object_etag, "upload_id": None},
                detail,
                check_unsent=False,
            )
            for commit in commits:
                if commit.state is CommitState.PENDING:
                    tx.move_commit(
                        lease,
                        commit.id,
                        CommitState.PENDING,
                        CommitState.UPLOADED,
                        # A crc32c-mode part has no MD5 and its own ETag was never seen: the
                        # object it is part of was proven, by its checksum or its bytes.
                        {"etag": commit.md5 if commit.md5 is not None else ""},
                        detail,
                    )
            tx.check_all_sent(lease, SegmentState.UPLOADED)

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
        with self._write() as tx:
            tx.guard(lease)
            tx.conn.execute(
                update(SEGMENTS)
                .where(SEGMENTS.c.id == lease.segment_id, SEGMENTS.c.remove_etag == etag)
                .values(remove_etag=None)
            )
