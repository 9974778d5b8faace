"""Leases: acquire, claim (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), renew, release; the
lease holder as a process (same-node fast takeover of a dead holder's lease)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    DateTime,
    Integer,
    Interval,
    and_,
    bindparam,
    exists,
    func,
    or_,
    select,
    text,
    update,
)

from uploader import holders
from uploader.errors import SegmentBusyError, UsageError
from uploader.manifest.core import DEFAULT_LEASE_SECONDS, ManifestCore
from uploader.manifest.lease_holders import (
    HOLDER_COLUMNS,
    HOLDER_VALUE_NAMES,
    holder_gone,
    holder_values,
    log_takeover,
)
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL
from uploader.manifest.rowmap import COMMITS, RARE_UNFINISHED, SEGMENTS, segment_record
from uploader.records import Lease, SegmentRecord
from uploader.states import CommitState, SegmentState

log = logging.getLogger("uploader")

#: What :meth:`Leases.acquire` returns a lease from.
_LEASE_COLUMNS = (
    SEGMENTS.c.id,
    SEGMENTS.c.fence,
    SEGMENTS.c.lease_owner,
    SEGMENTS.c.lease_expires,
)


#: Statements built once from bound parameters (see :meth:`Leases._claim_statement`), by what
#: changes their shape: which statement, dead holders matched, whose clock, which database.
_STATEMENTS: dict[tuple[str, int, bool, bool], Any] = {}


def _unheld(held: Lease | None, fence: int) -> bool:
    return held is None or held.fence != fence  # a stale lease held is lost already


class Leases(ManifestCore):
    """Taking, keeping and giving back leases; every claim increments the fence."""

    def acquire(
        self, key: str, owner: str, ttl: float = DEFAULT_LEASE_SECONDS, *, node: str | None = None
    ) -> Lease:
        """Take the lease on ``key``: free, expired, or already ours. Increments the fence.

        With ``node`` (the caller's node), the lease records this process as its holder, and a
        live lease whose holder process on this node is gone (:func:`uploader.holders.gone`) is
        taken at once instead of after it expires (logged at INFO).
        """
        now = self.clock()
        lease_now = self._lease_now()
        values = {
            "fence": SEGMENTS.c.fence + 1,
            "lease_owner": owner,
            "lease_expires": self._lease_until(ttl),
            "updated_at": now,
            **holder_values(node),
        }
        taken_from = None
        with self._begin() as conn:
            taken = conn.execute(
                update(SEGMENTS)
                .where(
                    SEGMENTS.c.key == key,
                    or_(
                        SEGMENTS.c.lease_owner.is_(None),
                        SEGMENTS.c.lease_expires < lease_now,
                        SEGMENTS.c.lease_owner == owner,
                    ),
                )
                .values(**values)
                .returning(*_LEASE_COLUMNS)
            ).first()
            if taken is None and node is not None:
                held = conn.execute(select(*HOLDER_COLUMNS).where(SEGMENTS.c.key == key)).first()
                if held is not None and holder_gone(held, node):
                    # Compare-and-set on the fence: only the dead holder's lease is taken.
                    taken = conn.execute(
                        update(SEGMENTS)
                        .where(SEGMENTS.c.id == held.id, SEGMENTS.c.fence == held.fence)
                        .values(**values)
                        .returning(*_LEASE_COLUMNS)
                    ).first()
                    taken_from = held if taken is not None else None
            row = (
                taken or conn.execute(select(*_LEASE_COLUMNS).where(SEGMENTS.c.key == key)).first()
            )
        if row is None:
            raise UsageError(f"segment {key!r} is not registered")
        if taken is None:
            raise SegmentBusyError(
                f"segment {key!r} is leased by {row.lease_owner} until {row.lease_expires:%Y-%m-%d %H:%M:%S} UTC; "
                "wait for it to finish or for the lease to expire"
            )
        if taken_from is not None:
            log_takeover(key, taken_from, owner)
        return Lease(
            segment_id=row.id, key=key, owner=owner, fence=row.fence, expires=row.lease_expires
        )

    def claim_next(
        self,
        owner: str,
        *,
        node: str,
        ttl: float = DEFAULT_LEASE_SECONDS,
        after_id: int = 0,
    ) -> tuple[Lease, SegmentRecord] | None:
        """Claim the next unfinished segment (id > ``after_id``) that this worker can act on."""
        claimed = self.claim(owner, node=node, ttl=ttl, after_id=after_id, limit=1)
        return claimed[0] if claimed else None

    def claim(
        self,
        owner: str,
        *,
        node: str,
        ttl: float = DEFAULT_LEASE_SECONDS,
        after_id: int = 0,
        limit: int = 1,
        at: datetime | None = None,
    ) -> list[tuple[Lease, SegmentRecord]]:
        """Claim up to ``limit`` unfinished segments (ids > ``after_id``, ascending), in one transaction.

        A worker claims segments whose local file is on its ``node``, and, from any node, sealed
        segments whose parts are all uploaded (completing needs no local bytes; verifying does: the
        bytes). Open segments are claimed only when they have pending whole parts to upload.
        Rows locked by another claimer are skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on
        SQLite the immediate transaction serialises claimers). ``at``: the time written on the
        rows it takes (default: now; see :meth:`give_back_unheld`).
        """
        if limit < 1:
            return []
        params: dict[str, Any] = {
            "p_after_id": after_id,
            "p_lim": limit,
            "p_node": node,
            "p_owner": owner,
            "p_now": at or self.clock(),
            **{f"p_{k}": v for k, v in holder_values(node).items()},
        }
        if self._db_leases():
            params["p_ttl"] = timedelta(seconds=ttl)
        else:
            params["p_lease_now"] = self._lease_now()
            params["p_expires"] = self._lease_until(ttl)
        # One connection and one transaction for the lookup of dead holders and the claim:
        # each checkout costs a round trip (the pool's pre-ping).
        with self._begin() as conn:
            dead = self._dead_holders(conn, node, params)
            for i, d in enumerate(dead):
                params[f"p_dead_id_{i}"] = d.id
                params[f"p_dead_fence_{i}"] = d.fence
            rows = conn.execute(self._claim_statement(len(dead)), params).all()
        if not rows:
            return []
        segs = sorted((segment_record(r) for r in rows), key=lambda seg: seg.id)
        claimed_ids = {seg.id for seg in segs}
        for d in dead:
            if d.id in claimed_ids:
                log_takeover(d.key, d, owner)
        return [
            (
                Lease(
                    segment_id=seg.id,
                    key=seg.key,
                    owner=owner,
                    fence=seg.fence,
                    expires=seg.lease_expires or self.clock(),
                ),
                seg,
            )
            for seg in segs
        ]

    def _claim_statement(self, dead: int) -> Any:
        """The claim as one statement: pick (a CTE, so evaluated and locked once) and take.

        Built from bound parameters (``p_*``: an UPDATE reserves its columns' names; see
        :meth:`claim`) and kept, since a recovery pass claims over and over and building it
        cost about 0.7 ms per claim. ``dead`` live leases of gone holders (rare) are matched by
        id and fence (``p_dead_id_N``, ``p_dead_fence_N``); only the shape without them is kept.
        """
        key = ("claim", dead, self._db_leases(), self.is_postgres)
        stmt = _STATEMENTS.get(key)
        if stmt is not None:
            return stmt
        lease_now = self._bound_lease_now()
        expires = (
            lease_now + bindparam("p_ttl", type_=Interval())
            if self._db_leases()
            else bindparam("p_expires", type_=DateTime())
        )
        pending = exists().where(
            COMMITS.c.segment_id == SEGMENTS.c.id, COMMITS.c.state == CommitState.PENDING.value
        )
        pick = (
            select(SEGMENTS.c.id)
            .where(
                text(UNFINISHED_SEGMENTS_SQL),  # the partial index's own predicate
                SEGMENTS.c.id > bindparam("p_after_id"),
                or_(
                    SEGMENTS.c.lease_owner.is_(None),
                    SEGMENTS.c.lease_expires < lease_now,
                    # Live leases whose holder process on this node is gone (same fence).
                    *(
                        and_(
                            SEGMENTS.c.id == bindparam(f"p_dead_id_{i}"),
                            SEGMENTS.c.fence == bindparam(f"p_dead_fence_{i}"),
                        )
                        for i in range(dead)
                    ),
                ),
                # Another node's segment only to complete it (all parts uploaded): verifying
                # reads every local byte again, which only a worker on its node can.
                or_(
                    SEGMENTS.c.node == bindparam("p_node"),
                    and_(SEGMENTS.c.state == SegmentState.SEALED.value, ~pending),
                ),
                or_(SEGMENTS.c.state != SegmentState.OPEN.value, pending),
            )
            .order_by(SEGMENTS.c.id)
            .limit(bindparam("p_lim", type_=Integer()))
        )
        # PostgreSQL: skip rows another claimer holds; SQLite: the rarity hint (see above).
        pick = (
            pick.with_for_update(skip_locked=True)
            if self.is_postgres
            else pick.where(RARE_UNFINISHED)
        )
        picked = pick.cte("picked")
        stmt = (
            update(SEGMENTS)
            .where(SEGMENTS.c.id.in_(select(picked.c.id)))
            .values(
                fence=SEGMENTS.c.fence + 1,
                lease_owner=bindparam("p_owner"),
                lease_expires=expires,
                updated_at=bindparam("p_now", type_=DateTime()),
                **{name: bindparam(f"p_{name}") for name in HOLDER_VALUE_NAMES},
            )
            .returning(*SEGMENTS.c)
        )
        if dead == 0:
            _STATEMENTS[key] = stmt
        return stmt

    def _bound_lease_now(self) -> Any:
        """:meth:`_lease_now` for a kept statement: the database's clock, or ``p_lease_now``."""
        if self._db_leases():
            return func.timezone("UTC", func.now())
        return bindparam("p_lease_now", type_=DateTime())

    def _dead_holders(self, conn: Connection, node: str, params: dict[str, Any]) -> list[Any]:
        """Unfinished segments (ids > ``p_after_id``) under a live lease whose holder process
        on ``node`` (``p_node``) is gone: the claim's own parameters. Few rows: what this node's
        processes hold right now."""
        if holders.this_process() is None:
            return []
        key = ("dead", 0, self._db_leases(), self.is_postgres)
        q = _STATEMENTS.get(key)
        if q is None:
            q = select(*HOLDER_COLUMNS).where(
                text(UNFINISHED_SEGMENTS_SQL),
                SEGMENTS.c.id > bindparam("p_after_id"),
                SEGMENTS.c.lease_node == bindparam("p_node"),
                SEGMENTS.c.lease_owner.is_not(None),
                SEGMENTS.c.lease_expires >= self._bound_lease_now(),
            )
            if not self.is_postgres:
                q = q.where(RARE_UNFINISHED)
            _STATEMENTS[key] = q
        return [r for r in conn.execute(q, params).all() if holder_gone(r, node)]

    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_SECONDS) -> Lease:
        """Extend a lease we still hold; LeaseLostError if it expired or was taken over."""
        with self._write() as tx:
            row = tx.guard(lease, lease_expires=self._lease_until(ttl))
        return Lease(lease.segment_id, lease.key, lease.owner, lease.fence, row.lease_expires)

    def renew_many(
        self, leases: Sequence[Lease], ttl: float = DEFAULT_LEASE_SECONDS
    ) -> tuple[list[Lease], list[Lease]]:
        """Extend many leases of one owner in one transaction: ``(renewed, lost)``.

        A store may hold thousands of leases (small segments queued for sealing); renewing them
        one transaction each would let the last ones expire before the heartbeat reaches them.
        """
        if not leases:
            return [], []
        owner = leases[0].owner
        if any(lease.owner != owner for lease in leases):
            raise ValueError("renew_many: every lease must have the same owner")
        by_id = {lease.segment_id: lease for lease in leases}
        renewed_until: dict[int, datetime] = {}
        ids = list(by_id)
        with self._begin() as conn:
            for i in range(0, len(ids), 500):  # bounded IN lists
                chunk = ids[i : i + 500]
                for seg_id, fence, until in conn.execute(
                    update(SEGMENTS)
                    .where(
                        SEGMENTS.c.id.in_(chunk),
                        SEGMENTS.c.lease_owner == owner,
                        SEGMENTS.c.lease_expires > self._lease_now(),
                    )
                    .values(lease_expires=self._lease_until(ttl))
                    .returning(SEGMENTS.c.id, SEGMENTS.c.fence, SEGMENTS.c.lease_expires)
                ):
                    # Renewed only with our fence: a row taken over (and by chance given to the
                    # same owner name) is not ours.
                    if fence == by_id[seg_id].fence:
                        renewed_until[seg_id] = until
        renewed = [
            Lease(
                lease.segment_id,
                lease.key,
                lease.owner,
                lease.fence,
                renewed_until[lease.segment_id],
            )
            for lease in leases
            if lease.segment_id in renewed_until
        ]
        lost = [lease for lease in leases if lease.segment_id not in renewed_until]
        return renewed, lost

    def give_back_unheld(
        self, owner: str, claimed_at: datetime, held: Callable[[int], Lease | None]
    ) -> list[str]:
        """Give back (fenced) the leases a claim of ``owner`` at ``claimed_at`` took, if it
        committed but its answer was lost: rows still ``owner``'s, last written then, that
        ``held`` (the keeper, by segment id) says no thread holds. Returns their keys."""
        q = select(SEGMENTS.c.id, SEGMENTS.c.key, SEGMENTS.c.fence).where(
            text(UNFINISHED_SEGMENTS_SQL),
            SEGMENTS.c.lease_owner == owner,
            # Only that claim's rows: any later write (a writer's acquire, a transition) moves it.
            SEGMENTS.c.updated_at == claimed_at,
        )
        if not self.is_postgres:
            q = q.where(RARE_UNFINISHED)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [
            r.key
            for r in rows
            if _unheld(held(r.id), r.fence)
            and self.release(Lease(r.id, r.key, owner, r.fence, claimed_at))
        ]

    def release(self, lease: Lease) -> bool:
        """Give a lease back (no error if it was already lost). True if it was still ours."""
        with self._begin() as conn:
            res = conn.execute(
                update(SEGMENTS)
                .where(
                    SEGMENTS.c.id == lease.segment_id,
                    SEGMENTS.c.fence == lease.fence,
                    SEGMENTS.c.lease_owner == lease.owner,
                )
                .values(lease_owner=None, lease_expires=None)
            )
        return res.rowcount == 1
