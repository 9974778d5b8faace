"""The guarded-transaction unit every write of the manifest goes through (:class:`Tx`): the
fence guard, one compare-and-set with a typed error naming the key, the expected and the actual
state, set-based moves of a segment's parts, and the audit rows (:class:`Audit`) collected and
written in one ``INSERT``; writes return the row as written (``RETURNING``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    Table,
    and_,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from uploader.config import MAX_NAME_CHARS
from uploader.errors import InvalidStateError, LeaseLostError, StaleStateError, UsageError
from uploader.manifest.bulk import insert_many
from uploader.manifest.rowmap import COMMITS, EVENTS, SEGMENTS, segment_record
from uploader.records import CommitRecord, Lease, SegmentRecord
from uploader.states import CommitState, SegmentState


def check_acknowledged(
    lease: Lease, commit: CommitRecord, etag: str, *, proven: bool = False
) -> None:
    """A part counts as uploaded only with the ETag the remote acknowledged equal to our MD5, or
    (``proven``) with another ETag when the remote echoed the part's CRC32C (SSE-KMS). A part of
    a segment in the crc32c mode has no MD5: only ``proven`` counts (its CRC32C echoed or listed,
    or the object it belongs to proven by its checksum or read back)."""
    if commit.md5 is None:
        if not proven:
            raise StaleStateError(
                f"{lease.key} part {commit.part_number}",
                "its CRC32C echoed by the remote",
                "etag " + etag + " without it",
                what="commit",
            )
        return
    if etag != commit.md5 and not (proven and etag):
        raise StaleStateError(
            f"{lease.key} part {commit.part_number}",
            "etag " + commit.md5,
            "etag " + etag,
            what="commit",
        )


def clip(message: str, limit: int = 2000) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def check_who(who: str, doing: str) -> None:
    """A human's name for the audit rows of what they are ``doing`` (a retry, a rename) that
    the worker column holds; else a :class:`UsageError` before anything is written (PostgreSQL
    would refuse it mid-transaction)."""
    if len(who) > MAX_NAME_CHARS:
        raise UsageError(
            f"who {doing} ({who[:40]!r}...) is {len(who)} characters; the manifest holds at "
            f"most {MAX_NAME_CHARS} (nothing was recorded)"
        )


@dataclass(frozen=True, slots=True)
class Audit:
    """One row of the audit trail (``events``), waiting to be written with the others of its
    transaction: which row moved, from which state to which, by whom under which fence, and why."""

    segment_id: int
    to_state: str
    worker: str
    fence: int
    from_state: str | None = None
    commit_id: int | None = None
    detail: str | None = None

    @classmethod
    def by(
        cls,
        lease: Lease,
        from_state: str | None,
        to_state: str,
        *,
        commit_id: int | None = None,
        detail: str | None = None,
    ) -> Audit:
        """A move made by the holder of ``lease`` (its owner and fence are recorded)."""
        return cls(
            segment_id=lease.segment_id,
            to_state=str(to_state),
            worker=lease.owner,
            fence=lease.fence,
            from_state=None if from_state is None else str(from_state),
            commit_id=commit_id,
            detail=detail,
        )


#: A part the remote does not hold yet (neither uploaded nor verified): none may be left when
#: its segment's object is complete (:meth:`Tx.check_all_sent`).
PART_UNSENT = COMMITS.c.state.not_in([CommitState.UPLOADED.value, CommitState.VERIFIED.value])


class Tx:
    """One write transaction: its connection, its time (``now`` stamps ``updated_at``), the
    guard and compare-and-set every write goes through, and the audit rows it collects; they
    are written in one multi-row ``INSERT`` when the transaction ends well (see
    :meth:`ManifestCore._write`)."""

    def __init__(self, conn: Connection, now: datetime, lease_now: Callable[[], Any]) -> None:
        self.conn = conn
        self.now = now
        #: Now on the lease clock (an SQL expression of the database's clock, or the client's).
        self._lease_now = lease_now
        self.audit: list[Audit] = []

    def guard_clause(self, lease: Lease) -> Any:
        """The segment row is ours: our fence, our name, and our lease not yet expired."""
        return and_(
            SEGMENTS.c.id == lease.segment_id,
            SEGMENTS.c.fence == lease.fence,
            SEGMENTS.c.lease_owner == lease.owner,
            self.lease_live(),
        )

    def lease_live(self) -> Any:
        """The leased row's lease has not expired (on the lease clock)."""
        return SEGMENTS.c.lease_expires > self._lease_now()

    def lease_error(self, lease: Lease) -> LeaseLostError | None:
        """Why a guarded write found nothing: our fence is stale, the row is someone else's, or
        our lease expired (judged by the lease clock, in the statement). None: it is ours."""
        row = self.conn.execute(
            select(
                SEGMENTS.c.fence,
                SEGMENTS.c.lease_owner,
                SEGMENTS.c.lease_expires,
                (SEGMENTS.c.lease_expires > self._lease_now()).label("live"),
            ).where(SEGMENTS.c.id == lease.segment_id)
        ).first()
        if row is None:
            return LeaseLostError(lease.key, lease.fence, None)
        if row.fence != lease.fence or row.lease_owner != lease.owner:
            return LeaseLostError(lease.key, lease.fence, row.fence)
        if row.lease_expires is None or not row.live:
            err = LeaseLostError(lease.key, lease.fence, row.fence)
            err.args = (
                f"segment {lease.key!r}: our lease expired at {row.lease_expires}; write refused",
            )
            return err
        return None

    def guard(self, lease: Lease, **values: Any) -> Row[Any]:
        """Check (and lock, on PostgreSQL) the segment row for ``lease``, writing ``values``;
        returns the row as written. Not ours: :class:`LeaseLostError`."""
        return self._ours(
            lease,
            self.conn.execute(
                update(SEGMENTS)
                .where(self.guard_clause(lease))
                .values(updated_at=self.now, **values)
                .returning(*SEGMENTS.c)
            ).first(),
        )

    def lock(self, lease: Lease) -> Row[Any]:
        """:meth:`guard` without the write: the segment row for ``lease``, checked and locked
        (``FOR UPDATE`` on PostgreSQL; SQLite's write transaction is exclusive already), for a
        transaction that may find it has nothing to write. Not ours: :class:`LeaseLostError`."""
        return self._ours(
            lease,
            self.conn.execute(
                select(*SEGMENTS.c).where(self.guard_clause(lease)).with_for_update()
            ).first(),
        )

    def _ours(self, lease: Lease, row: Row[Any] | None) -> Row[Any]:
        """The guarded row, or why the guard found none."""
        if row is None:
            raise self.lease_error(lease) or LeaseLostError(lease.key, lease.fence, None)
        return row

    def compare_and_set(
        self,
        table: Table,
        row_id: int,
        expected: str,
        values: dict[str, Any],
        *,
        key: str,
        where: Sequence[Any] = (),
        lease: Lease | None = None,
    ) -> Row[Any]:
        """``UPDATE table SET values WHERE id = :row_id AND state = :expected AND where``,
        returning the row as written. Zero rows never overwrite silently: with ``lease`` (whose
        guard is among ``where``) a lost lease is said first; else :class:`StaleStateError`
        names the key (and part), the expected and the actual state."""
        row = self.conn.execute(
            update(table)
            .where(table.c.id == row_id, table.c.state == str(expected), *where)
            .values({"updated_at": self.now, **values})
            .returning(*table.c)
        ).first()
        if row is not None:
            return row
        if lease is not None and (err := self.lease_error(lease)) is not None:
            raise err
        actual = self.conn.execute(select(table).where(table.c.id == row_id)).first()
        state = None if actual is None else actual.state
        if table is COMMITS:
            part = f"commit #{row_id}" if actual is None else f"part {actual.part_number}"
            raise StaleStateError(f"{key} {part}", str(expected), state, what="commit")
        raise StaleStateError(key, str(expected), state)

    def move_segment(
        self,
        lease: Lease,
        expected: SegmentState,
        new: SegmentState,
        values: dict[str, Any],
        detail: str | None,
        *,
        check_unsent: bool = True,
        audit: bool = True,
    ) -> SegmentRecord:
        """Guarded ``expected -> new`` of the leased segment, audited (unless the caller writes
        its own audit rows); returns the row as written."""
        row = self.compare_and_set(
            SEGMENTS,
            lease.segment_id,
            expected,
            {"state": new.value, **values},
            key=lease.key,
            where=[self.guard_clause(lease)],
            lease=lease,
        )
        if check_unsent and new in (SegmentState.UPLOADED, SegmentState.VERIFIED):
            # Checked after the guarded update so a stale caller hears "stale" first; raising
            # here rolls the update back.
            self.check_all_sent(lease, new)
        if audit:
            self.audit.append(Audit.by(lease, expected, new, detail=detail))
        return segment_record(row)

    def move_commit(
        self,
        lease: Lease,
        commit_id: int,
        expected: CommitState,
        new: CommitState,
        values: dict[str, Any],
        detail: str | None = None,
        *,
        audit: bool = True,
    ) -> None:
        """``expected -> new`` of one part of the leased segment (the caller guarded the segment
        row first: the lock every writer takes first on PostgreSQL), audited unless told not."""
        self.compare_and_set(
            COMMITS,
            commit_id,
            expected,
            {"state": new.value, **values},
            key=lease.key,
            where=[COMMITS.c.segment_id == lease.segment_id],
        )
        if audit:
            self.audit.append(Audit.by(lease, expected, new, commit_id=commit_id, detail=detail))

    def move_parts(
        self,
        segment_id: int,
        expected: Sequence[CommitState],
        new: CommitState,
        values: dict[str, Any],
        *,
        worker: str,
        fence: int,
        detail: str | None,
    ) -> None:
        """Every part of the segment in one of the ``expected`` states to ``new``: set-based,
        one ``UPDATE ... RETURNING id`` per expected state (so each audit row knows where its
        part came from), audited in part id order."""
        moved: list[tuple[int, CommitState]] = []
        for src in expected:
            ids = self.conn.execute(
                update(COMMITS)
                .where(COMMITS.c.segment_id == segment_id, COMMITS.c.state == src.value)
                .values({"state": new.value, "updated_at": self.now, **values})
                .returning(COMMITS.c.id)
            ).scalars()
            moved += [(cid, src) for cid in ids]
        self.audit.extend(
            Audit(segment_id, new.value, worker, fence, src.value, cid, detail)
            for cid, src in sorted(moved)
        )

    def insert_segment(self, **values: Any) -> Row[Any] | None:
        """Insert a segment row, returned as written; None if its key is already there (ON
        CONFLICT DO NOTHING: the existing row is left alone, and no unique-violation error
        lands in the server's log)."""
        insert_new = pg_insert if self.conn.dialect.name == "postgresql" else sqlite_insert
        return self.conn.execute(
            insert_new(SEGMENTS)
            .values(**values)
            .on_conflict_do_nothing(index_elements=[SEGMENTS.c.key])
            .returning(*SEGMENTS.c)
        ).first()

    def check_all_sent(self, lease: Lease, new: SegmentState) -> None:
        """An object complete or verified speaks for every part: none may still be unsent."""
        unsent = (
            self.conn.execute(
                select(COMMITS.c.part_number)
                .where(COMMITS.c.segment_id == lease.segment_id, PART_UNSENT)
                .order_by(COMMITS.c.part_number)
            )
            .scalars()
            .all()
        )
        if unsent:
            raise InvalidStateError(
                f"segment {lease.key!r} cannot become {new.value}: parts "
                f"{', '.join(map(str, unsent))} are not uploaded"
            )

    def write_audit(self, at: datetime) -> None:
        """The collected audit rows, in one ``INSERT`` (:func:`~uploader.manifest.bulk.insert_many`)."""
        if not self.audit:
            return
        insert_many(
            self.conn,
            EVENTS,
            {"at": at},  # converted once, not per row
            [
                {
                    "segment_id": a.segment_id,
                    "commit_id": a.commit_id,
                    "from_state": a.from_state,
                    "to_state": a.to_state,
                    "worker": a.worker,
                    "fence": a.fence,
                    "detail": None if a.detail is None else clip(a.detail),
                }
                for a in self.audit
            ],
        )
        self.audit.clear()
