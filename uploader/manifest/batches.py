"""Group commit: many small segments' intents in one transaction, their outcomes in another.

The rows, states and audit events are the ones the one-at-a-time path writes (``register_leased``
then ``seal``; then ``put_verified`` or ``commit_attempt_failed``); only the transactions are
shared by a batch, so a batch costs two fsyncs instead of three per segment. Each segment's
writes stay guarded by its own lease: one whose lease was lost is refused alone, the others of
the batch are written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select, update

from uploader.config import UploadMode
from uploader.errors import LeaseLostError, StaleStateError, UploaderError, UsageError
from uploader.keys import validate_key
from uploader.manifest.bulk import insert_many
from uploader.manifest.guard import PART_UNSENT, Audit, Tx, check_acknowledged
from uploader.manifest.lease_holders import holder_values
from uploader.manifest.outcomes import Outcomes
from uploader.manifest.rowmap import (
    COMMITS,
    SEGMENTS,
    commit_record,
    new_commit_values,
    segment_record,
)
from uploader.records import (
    CommitRecord,
    Lease,
    NewCommit,
    PutFailed,
    PutProven,
    SegmentRecord,
    SmallSeal,
)
from uploader.states import CommitState, SegmentState

#: A sealed segment of a batch, as written: its lease, its row and its one part.
Sealed = tuple[Lease, SegmentRecord, CommitRecord]


class Batches(Outcomes):
    """Set-based versions of the small segment's intents and outcomes."""

    def seal_small_many(
        self,
        items: Sequence[SmallSeal],
        *,
        node: str,
        part_size: int,
        worker: str,
        lease_ttl: float,
    ) -> list[Sealed | None]:
        """Register, lease (fence 1) and seal new segments for one PUT each, in one
        transaction, before any byte is sent: per segment the row ``register_leased`` and
        ``seal`` leave, its part ``pending``, and their audit events in the same order.

        None for a key already registered (``ON CONFLICT DO NOTHING``: that row is left alone,
        its caller takes the one-at-a-time path, which says whether it is busy, sealed or
        another file's)."""
        seen: set[str] = set()
        for it in items:
            validate_key(it.key)
            if not 0 <= it.size <= part_size:
                raise UsageError(
                    f"segment {it.key!r}: {it.size} bytes do not fit one part of {part_size}"
                )
            if it.key in seen:
                raise UsageError(f"segment key {it.key!r} is given twice (nothing was recorded)")
            seen.add(it.key)
        if not items:
            return []
        mode = UploadMode.PUT
        with self._write() as tx:
            # One statement for the batch (see uploader.manifest.bulk): the values every row
            # shares (the lease clock, which may be an SQL expression, the holder, the times)
            # are the statement's. A key registered before inserts nothing (rows are matched
            # by key). The rows go in key order: two batches that share keys (two processes
            # shipping the same files) then wait for each other's keys in the same order, where
            # in opposite orders each could hold a key the other waits for (a deadlock on
            # PostgreSQL, the whole batch failed).
            shared = self._born_sealed_shared(node, part_size, worker, lease_ttl, tx.now)
            rows = insert_many(
                tx.conn,
                SEGMENTS,
                shared,
                [self._born_sealed(it) for it in sorted(items, key=lambda it: it.key)],
                returning=list(SEGMENTS.c),
                skip_conflicts_on="key",
            ).all()
            by_key = {row.key: segment_record(row) for row in rows}
            born = [by_key.get(it.key) for it in items]
            new = [(it, seg) for it, seg in zip(items, born, strict=True) if seg is not None]
            # Each segment's one part, matched to it by segment id, not by order (on SQLite,
            # RETURNING in parameter order makes SQLAlchemy send one INSERT per row).
            commits: dict[int, CommitRecord] = {}
            if new:
                values = [
                    new_commit_values(
                        seg.id,
                        NewCommit(1, 0, it.size, it.md5, it.crc32c),
                        CommitState.PENDING,
                        tx.now,
                    )
                    for it, seg in new
                ]
                own = ("segment_id", "end_offset", "md5", "crc32c")
                same = {k: v for k, v in values[0].items() if k not in own}
                if any(v[k] != same[k] for v in values for k in same):
                    # new_commit_values has grown a column of its own: add it to `own`.
                    raise AssertionError(f"parts of a batch differ beyond {own}")
                inserted = insert_many(
                    tx.conn,
                    COMMITS,
                    same,
                    [{k: v[k] for k in own} for v in values],
                    returning=list(COMMITS.c),
                )
                commits = {row.segment_id: commit_record(row) for row in inserted}
            out: dict[str, Sealed] = {}
            for it, seg in new:
                commit = commits[seg.id]
                assert seg.lease_expires is not None
                lease = Lease(seg.id, seg.key, worker, 1, seg.lease_expires)
                # The one-at-a-time path's events, in its order: registered, the part's
                # intent, then the seal (its own audit comes after the parts').
                tx.audit += [
                    Audit(
                        seg.id, SegmentState.OPEN.value, worker, 1, detail=f"registered {it.path}"
                    ),
                    Audit.by(
                        lease,
                        None,
                        CommitState.PENDING,
                        commit_id=commit.id,
                        detail=f"part 1 [0, {it.size})",
                    ),
                    Audit.by(
                        lease,
                        SegmentState.OPEN,
                        SegmentState.SEALED,
                        detail=f"sealed at {it.size} bytes, {mode}",
                    ),
                ]
                out[it.key] = (lease, seg, commit)
        return [out.get(it.key) for it in items]

    def _born_sealed_shared(
        self, node: str, part_size: int, worker: str, lease_ttl: float, now: Any
    ) -> dict[str, Any]:
        """The columns every new segment of a batch shares after ``register_leased`` and
        ``seal`` of one PUT (see :meth:`_born_sealed` for each row's own)."""
        return {
            "node": node,
            "state": SegmentState.SEALED.value,
            "part_size": part_size,
            "fence": 1,
            "lease_owner": worker,
            "lease_expires": self._lease_until(lease_ttl),
            **holder_values(node),
            "attempts": 0,
            "created_at": now,
            "updated_at": now,
            "upload_mode": UploadMode.PUT.value,
            "sealed_at": now,
        }

    @staticmethod
    def _born_sealed(it: SmallSeal) -> dict[str, Any]:
        """A new segment's own columns (see :meth:`_born_sealed_shared` for the others)."""
        return {
            "key": it.key,
            "path": it.path,
            "file_device": None if it.identity is None else it.identity[0],
            "file_inode": None if it.identity is None else it.identity[1],
            "size": it.size,
            "crc32c": it.crc32c,
            "expected_etag": it.md5,  # None in the crc32c mode (proven by the CRC32C)
            "checksum": it.checksum,
        }

    def settle_puts(
        self, proven: Sequence[PutProven], failed: Sequence[PutFailed]
    ) -> dict[int, UploaderError]:
        """The outcomes of a batch's PUTs in one transaction: ``put_verified`` (with the lease
        given back) for each proven one, ``commit_attempt_failed`` for each failed one.

        Returns the segments (by id) whose write was refused, with why: a lease lost meanwhile
        (its new holder finishes it) or a row moved. A refusal is found by the segment's guarded
        first write, so nothing of that segment was written and the batch's others are."""
        # As the driver's put_verified: the part's ETag is its MD5, proven by the object; a
        # crc32c-mode part has none and was proven by the object's CRC32C or its bytes.
        for p in proven:
            check_acknowledged(p.lease, p.commit, _part_etag(p), proven=p.commit.md5 is None)
        refused: dict[int, UploaderError] = {}
        if not proven and not failed:
            return refused
        if proven and not failed:
            try:
                with self._write() as tx:
                    self._settle_proven_at_once(tx, proven)
                return refused
            except _NotAllOurs:
                pass  # rolled back: one segment at a time, which names each refusal
        with self._write() as tx:
            for p in proven:
                try:
                    self._put_verified_segment(tx, p.lease, True, p.object_etag)
                except (LeaseLostError, StaleStateError) as exc:
                    refused[p.lease.segment_id] = exc
                    continue
                # From here an error is not a refusal: it rolls the whole batch back.
                self._put_verified_part(tx, p.lease, p.commit, _part_etag(p), p.detail)
            for f in failed:
                try:
                    self._attempt_failed(tx, f.lease, f.commit, f.error)
                except LeaseLostError as exc:
                    refused[f.lease.segment_id] = exc
        return refused

    def _settle_proven_at_once(self, tx: Tx, proven: Sequence[PutProven]) -> None:
        """Every proven PUT of a batch as :meth:`Outcomes.put_verified` writes it (the lease given
        back), in two updates and one check instead of three statements per segment: the usual
        case, where every segment is still ours and sealed and its one part pending. Anything else
        raises :class:`_NotAllOurs` (the transaction rolls back, nothing is written)."""
        owners = {p.lease.owner for p in proven}
        if len(owners) != 1 or len({p.lease.segment_id for p in proven}) != len(proven):
            raise _NotAllOurs
        ids = [p.lease.segment_id for p in proven]
        # Each row's own values as executemany parameters of one cached statement (what
        # differs per row is bound, not built into the SQL: a CASE over the batch cost about
        # four bind parameters per segment to build and compile in every batch), and the
        # rows moved counted: on both dialects an executemany's rowcount is the sum.
        moved = tx.conn.execute(
            update(SEGMENTS)
            .where(
                # The guard of each row (Tx.guard_clause).
                SEGMENTS.c.id == bindparam("b_id"),
                SEGMENTS.c.fence == bindparam("b_fence"),
                SEGMENTS.c.lease_owner == owners.pop(),
                tx.lease_live(),
                SEGMENTS.c.state == SegmentState.SEALED.value,
            )
            .values(
                # What _put_verified_segment writes (through the same _verified), each row's ETag.
                state=SegmentState.VERIFIED.value,
                updated_at=tx.now,
                **self._verified(tx, True, object_etag=bindparam("b_etag"), upload_id=None),
            ),
            [
                {"b_id": p.lease.segment_id, "b_fence": p.lease.fence, "b_etag": p.object_etag}
                for p in proven
            ],
        ).rowcount
        if moved != len(proven):
            raise _NotAllOurs
        parts = tx.conn.execute(
            update(COMMITS)
            .where(
                COMMITS.c.id == bindparam("b_id"),
                COMMITS.c.segment_id == bindparam("b_segment"),
                COMMITS.c.state == CommitState.PENDING.value,
            )
            .values(state=CommitState.VERIFIED.value, etag=bindparam("b_etag"), updated_at=tx.now),
            [
                {"b_id": p.commit.id, "b_segment": p.lease.segment_id, "b_etag": _part_etag(p)}
                for p in proven
            ],
        ).rowcount
        if parts != len(proven):
            raise _NotAllOurs
        # As Tx.check_all_sent: a verified object speaks for every part of its segment.
        unsent = tx.conn.execute(
            select(COMMITS.c.id).where(COMMITS.c.segment_id.in_(ids), PART_UNSENT).limit(1)
        ).first()
        if unsent is not None:
            raise _NotAllOurs
        for p in proven:
            tx.audit += self.put_verified_audit(p.lease, p.commit, _part_etag(p), p.detail)


class _NotAllOurs(Exception):
    """A batch's set-based write did not find every row as expected (rolls it back)."""


def _part_etag(p: PutProven) -> str:
    return p.commit.md5 if p.commit.md5 is not None else p.object_etag
