"""A node renamed: the segments recorded under one node's name moved to another's.

A segment's ``node`` says which machine holds its local file: only a worker there claims it
while it has parts to send, and only there are its bytes read again before ``verified``. When a
machine's name changes (a new host name, an ``UPLOADER_NODE`` an earlier version took but this
one refuses), its unfinished segments would wait for a node that no longer comes. The rename is
a human's step, audited like a retry: who, why, from which name to which.
"""

from __future__ import annotations

from sqlalchemy import func, or_, select, text, update

from uploader.config import check_name
from uploader.errors import SegmentBusyError, UsageError
from uploader.manifest.guard import Audit, check_who
from uploader.manifest.lease_holders import holder_values
from uploader.manifest.queries import Queries
from uploader.manifest.rowmap import SEGMENTS, segment_record
from uploader.records import SegmentRecord


class Renames(Queries):
    """Segments moved from one node's name to another's."""

    def rename_node(
        self, old: str, new: str, *, who: str, why: str, merge: bool = False
    ) -> list[SegmentRecord]:
        """Every segment recorded under node ``old`` now under ``new``, in one transaction; the
        rows as written.

        Refused, with nothing written, when ``new`` is not a name a store can run under, when no
        segment is recorded under ``old``, when one of them is leased (a process still running
        under the old name: stop it first, or wait for its lease to end), and when ``new``
        already has segments unless ``merge`` (a typo naming another machine would hand it
        files it does not have; give ``merge`` when both names are this same machine).

        Each moved row's fence moves on and its lease is cleared, so nothing a process under
        the old name still holds can be written; one audit row each names ``who`` and ``why``.
        A multipart upload under way goes on: the object's metadata, written when it started,
        keeps the old name, and the record sidecar written before Complete the new one (a
        rebuild takes the record's; see :func:`uploader.objectmeta.check`).
        """
        if not old:
            raise UsageError("give the old node's name (rows of unknown origin have none)")
        check_name("node", new, where="the new name")
        if old == new:
            raise UsageError(f"node {old!r} is already called that: nothing to rename")
        if not why.strip():
            raise UsageError("a rename needs a reason (why the node's name changed)")
        check_who(who, f"renamed node {old[:40]!r}")
        with self._write() as tx:
            if self.is_postgres:
                # Every write to the segments, and every row lock (a claim's FOR UPDATE, a
                # writer's lock before its guarded write), waits until the rename is committed:
                # a row registered or claimed under the old name meanwhile (READ COMMITTED lets
                # each statement see it) cannot slip between the UPDATE and the check after it,
                # and no writer holds a row the rename then waits for (a deadlock).
                # SQLite's BEGIN IMMEDIATE has done as much already.
                tx.conn.execute(text(f"LOCK TABLE {SEGMENTS.name} IN EXCLUSIVE MODE"))

            def count(node: str) -> int:
                q = select(func.count()).select_from(SEGMENTS).where(SEGMENTS.c.node == node)
                return int(tx.conn.execute(q).scalar_one())

            if not count(old):
                raise UsageError(
                    f"no segment is recorded under node {old[:80]!r}: nothing to rename"
                )
            if not merge:
                theirs = count(new)
                if theirs:
                    raise UsageError(
                        f"node {new!r} already has {theirs} segments: if it is the same machine "
                        f"as {old[:40]!r}, give --merge (merge=True); nothing was renamed"
                    )
            # One UPDATE for the rows no live lease holds; a leased row is left under the old
            # name, and then the whole rename is undone below.
            moved = tx.conn.execute(
                update(SEGMENTS)
                .where(
                    SEGMENTS.c.node == old,
                    or_(SEGMENTS.c.lease_expires.is_(None), ~tx.lease_live()),
                )
                .values(
                    node=new,
                    fence=SEGMENTS.c.fence + 1,
                    lease_owner=None,
                    lease_expires=None,
                    updated_at=tx.now,
                    **holder_values(None),
                )
                .returning(*SEGMENTS.c)
            ).all()
            busy = tx.conn.execute(
                select(SEGMENTS.c.key, SEGMENTS.c.lease_owner, SEGMENTS.c.lease_expires)
                .where(SEGMENTS.c.node == old)
                .order_by(SEGMENTS.c.id)
                .limit(1)
            ).first()
            if busy is not None:
                until = busy.lease_expires
                raise SegmentBusyError(
                    f"segment {busy.key!r} of node {old[:40]!r} is leased by {busy.lease_owner}"
                    f"{'' if until is None else f' until {until:%Y-%m-%d %H:%M:%S} UTC'}: stop "
                    "the uploaders still running under the old name (or wait for the lease to "
                    "end), then rename; nothing was renamed"
                )
            detail = f"node renamed by {who}: {why} (from {old!r} to {new!r})"
            for r in moved:
                tx.audit.append(Audit(r.id, r.state, who, r.fence, r.state, detail=detail))
        return [segment_record(r) for r in sorted(moved, key=lambda r: r.id)]
