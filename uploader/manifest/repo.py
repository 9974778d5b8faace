"""The manifest: every segment, every commit (part) and every state transition, in SQL.

Each transition is one transaction and one guarded compare-and-set::

    UPDATE ... WHERE id = :id AND state = :expected AND fence = :token
                 AND lease_owner = :owner AND lease_expires > :now

Zero rows updated never overwrites silently: it raises :class:`StaleStateError` (someone else moved
the row; the message names the key, the expected and the actual state) or :class:`LeaseLostError`
(our fence token is stale or our lease expired). Every successful transition writes one audit row.

Leases: claiming a segment increments its fence token, so a worker that was paused past its lease
(GC, SIGSTOP, a network partition) finds every later write refused. On PostgreSQL the next unfinished
segment is claimed with ``FOR UPDATE SKIP LOCKED``; on SQLite every transaction is ``BEGIN
IMMEDIATE``, which makes the same read-then-claim exclusive across processes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    and_,
    exists,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from uploader import holders
from uploader.errors import (
    InvalidRangeError,
    InvalidStateError,
    KeyConflictError,
    LeaseLostError,
    SegmentBusyError,
    SegmentSealedError,
    StaleStateError,
    UsageError,
)
from uploader.keys import validate_key
from uploader.manifest import db
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL, CommitRow, EventRow, SegmentRow
from uploader.records import (
    CommitRecord,
    Event,
    Lease,
    NewCommit,
    Progress,
    SegmentRecord,
    Status,
)
from uploader.states import (
    CommitState,
    SegmentState,
    check_commit_transition,
    check_segment_transition,
    parse_commit_state,
    parse_segment_state,
)
from uploader.storage.base import MAX_PARTS

log = logging.getLogger("uploader")

DEFAULT_LEASE_SECONDS = 30.0
#: The detail of the audit event a pass that ended on a non-retryable error leaves (see
#: :meth:`Manifest.record_stuck`).
STUCK_PREFIX = "stuck: "
#: Unfinished segments are few among millions of verified ones. SQLite's planner, choosing
#: between the partial index of unfinished ids and a walk of the table in id order (an ORDER BY
#: id with a LIMIT), sometimes took the walk; this term (always true where it is used, next to
#: the partial index's own predicate) tells it how rare the rows it looks for are.
RARE_UNFINISHED = text(f"likelihood({UNFINISHED_SEGMENTS_SQL}, 0.0001)")
UNFINISHED = (SegmentState.OPEN.value, SegmentState.SEALED.value, SegmentState.UPLOADED.value)


def utcnow() -> datetime:
    """Naive UTC: what the manifest stores everywhere."""
    return datetime.now(UTC).replace(tzinfo=None)


def default_node() -> str:
    return os.environ.get("UPLOADER_NODE") or socket.gethostname()


def default_worker() -> str:
    return f"{default_node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _segment(row: Any) -> SegmentRecord:
    return SegmentRecord(
        id=row.id,
        key=row.key,
        path=row.path,
        node=row.node,
        state=SegmentState(row.state),
        part_size=row.part_size,
        size=row.size,
        crc32c=row.crc32c,
        expected_etag=row.expected_etag,
        upload_mode=row.upload_mode,
        upload_id=row.upload_id,
        object_etag=row.object_etag,
        fence=row.fence,
        lease_owner=row.lease_owner,
        lease_expires=row.lease_expires,
        attempts=row.attempts,
        last_error=row.last_error,
        reason=row.reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
        sealed_at=row.sealed_at,
        verified_at=row.verified_at,
        file_device=row.file_device,
        file_inode=row.file_inode,
        remove_etag=row.remove_etag,
        checked_at=row.checked_at,
    )


def _commit(row: Any) -> CommitRecord:
    return CommitRecord(
        id=row.id,
        segment_id=row.segment_id,
        part_number=row.part_number,
        start=row.start_offset,
        end=row.end_offset,
        md5=row.md5,
        crc32c=row.crc32c,
        etag=row.etag,
        state=CommitState(row.state),
        attempts=row.attempts,
        last_error=row.last_error,
        reason=row.reason,
    )


def _check_acknowledged(lease: Lease, commit: CommitRecord, etag: str) -> None:
    """A part counts as uploaded only with the ETag the remote acknowledged equal to our MD5."""
    if etag != commit.md5:
        raise StaleStateError(
            f"{lease.key} part {commit.part_number}",
            "etag " + commit.md5,
            "etag " + etag,
            what="commit",
        )


def _clip(message: str, limit: int = 2000) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


# Core tables: transitions are single guarded UPDATE statements, not ORM unit-of-work flushes.
S = cast(Table, SegmentRow.__table__)
#: An audit row waiting to be written: segment id, commit id, from, to, worker, fence, detail.
EventRow_ = tuple[int, int | None, str | None, str, str, int, str | None]
C = cast(Table, CommitRow.__table__)
E = cast(Table, EventRow.__table__)
#: What a takeover looks at: the lease and its holder process.
_HOLDER_COLUMNS = (
    S.c.id,
    S.c.key,
    S.c.fence,
    S.c.lease_owner,
    S.c.lease_node,
    S.c.lease_pid,
    S.c.lease_started,
    S.c.lease_pid_space,
)


_SQLITE_LOCKS: dict[str, threading.Lock] = {}
_SQLITE_LOCKS_GUARD = threading.Lock()


def _holder_gone(row: Any, node: str) -> bool:
    """Is the live lease of ``row`` held by a process on ``node`` that is certainly gone?"""
    return row.lease_node == node and holders.gone(
        row.lease_pid, row.lease_started, row.lease_pid_space
    )


def _log_takeover(key: str, held: Any, owner: str) -> None:
    log.info(
        "segment %r: its lease holder %s (pid %s on %s) is gone; %s takes the lease over now "
        "instead of waiting for it to expire",
        key,
        held.lease_owner,
        held.lease_pid,
        held.lease_node,
        owner,
    )


class Manifest:
    """The SQL manifest behind a store and the recovery job. Thread-safe (one engine, a pool)."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], datetime] = utcnow,
        lease_clock: str | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        #: Whose clock judges leases (invariant 11): "database" (PostgreSQL's ``now()`` inside
        #: the statements that register, claim, renew, guard and report leases, so skew between
        #: clients changes nothing) or "client" (``clock``). Default: the database's on
        #: PostgreSQL with the real clock; SQLite (one host) and injected test clocks: the
        #: client's (see :meth:`_db_leases`).
        if lease_clock not in (None, "database", "client"):
            raise ValueError(f"lease_clock must be 'database' or 'client', not {lease_clock!r}")
        self.lease_clock = lease_clock
        # SQLite has one writer at a time; threads of one process that collide would each sleep
        # in SQLite's busy handler (1 ms, 2 ms, ... 100 ms). A lock per database file queues them
        # without sleeping; other processes still meet in SQLite's own lock (busy_timeout).
        self._write_lock: threading.Lock | None = None
        if engine.dialect.name == "sqlite":
            path = os.path.abspath(engine.url.database or ":memory:")
            with _SQLITE_LOCKS_GUARD:
                self._write_lock = _SQLITE_LOCKS.setdefault(path, threading.Lock())

    @contextmanager
    def _begin(self) -> Iterator[Connection]:
        """One write transaction (on SQLite: ``BEGIN IMMEDIATE``, queued behind our other threads)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with (
            self._write_lock,
            self.engine.connect().execution_options(**{db.WRITE: True}) as conn,
            conn.begin(),
        ):
            yield conn

    @classmethod
    def open(
        cls,
        url: str,
        *,
        auto_upgrade: bool | None = None,
        clock: Callable[[], datetime] = utcnow,
        lease_clock: str | None = None,
    ) -> Manifest:
        """Connect, and bring an embedded SQLite file to head (a server database must be at head)."""
        engine = db.create_manifest_engine(url)
        try:
            db.ensure_schema(engine, auto_upgrade=auto_upgrade)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock=clock, lease_clock=lease_clock)

    @property
    def url(self) -> str:
        return db.redact(self.engine.url)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

    # --- the lease clock ------------------------------------------------------------------------

    def _db_leases(self) -> bool:
        if self.lease_clock is not None:
            return self.lease_clock == "database" and self.is_postgres
        # A clock a test injected (time travel) keeps judging leases itself.
        return self.is_postgres and self.clock is utcnow

    def _lease_now(self) -> Any:
        """Now, for lease comparisons: an SQL expression of the database's clock (UTC, naive,
        like every stored time), or the client's clock."""
        if self._db_leases():
            return func.timezone("UTC", func.now())
        return self.clock()

    def _lease_until(self, ttl: float) -> Any:
        """Now + ``ttl`` seconds, on the same clock as :meth:`_lease_now`."""
        if self._db_leases():
            return func.timezone("UTC", func.now()) + literal_column(
                f"interval '{float(ttl)!r} seconds'"
            )
        return self.clock() + timedelta(seconds=ttl)

    # --- the lease holder as a process ------------------------------------------------------------

    @staticmethod
    def _holder_values(node: str | None) -> dict[str, Any]:
        """The columns naming this process as a lease's holder on ``node`` (NULL when the caller
        names no node, or the process cannot be identified: then only expiry frees the lease)."""
        me = holders.this_process() if node is not None else None
        if me is None:
            return {
                "lease_node": None,
                "lease_pid": None,
                "lease_started": None,
                "lease_pid_space": None,
            }
        return {
            "lease_node": node,
            "lease_pid": me.pid,
            "lease_started": me.started,
            "lease_pid_space": me.space,
        }

    def _dead_holders(self, node: str, after_id: int) -> list[Any]:
        """Unfinished segments (ids > ``after_id``) under a live lease whose holder process on
        ``node`` is gone. Few rows: what this node's processes hold right now."""
        if holders.this_process() is None:
            return []
        q = select(*_HOLDER_COLUMNS).where(
            text(UNFINISHED_SEGMENTS_SQL),
            S.c.id > after_id,
            S.c.lease_node == node,
            S.c.lease_owner.is_not(None),
            S.c.lease_expires >= self._lease_now(),
        )
        if not self.is_postgres:
            q = q.where(RARE_UNFINISHED)
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        return [r for r in rows if _holder_gone(r, node)]

    # --- reading --------------------------------------------------------------------------------

    def segment(self, key: str) -> SegmentRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(S).where(S.c.key == key)).first()
        return None if row is None else _segment(row)

    def segment_by_id(self, segment_id: int) -> SegmentRecord:
        with self.engine.connect() as conn:
            row = conn.execute(select(S).where(S.c.id == segment_id)).one()
        return _segment(row)

    def segments(
        self,
        states: Iterable[SegmentState | str] | None = None,
        *,
        keys: Iterable[str] | None = None,
    ) -> list[SegmentRecord]:
        q = select(S).order_by(S.c.id)
        if states is not None:
            q = q.where(S.c.state.in_([parse_segment_state(str(s)).value for s in states]))
        if keys is not None:
            q = q.where(S.c.key.in_(list(keys)))
        with self.engine.connect() as conn:
            return [_segment(r) for r in conn.execute(q)]

    def progress(self, segment_id: int) -> Progress:
        """The segment's row, the end of its committed bytes and its last part, in one query."""
        # Parts are numbered 1, 2, ... without gaps and cover [0, end) in order: the last part
        # has both the highest number and the highest end.
        last_part = (
            select(func.coalesce(func.max(C.c.part_number), 0))
            .where(C.c.segment_id == S.c.id)
            .scalar_subquery()
        )
        last_end = (
            select(func.coalesce(func.max(C.c.end_offset), 0))
            .where(C.c.segment_id == S.c.id)
            .scalar_subquery()
        )
        with self.engine.connect() as conn:
            row = conn.execute(
                select(S, last_part.label("last_part"), last_end.label("last_end")).where(
                    S.c.id == segment_id
                )
            ).one()
        return Progress(_segment(row), int(row.last_end), int(row.last_part))

    def pending_commits(self, segment_id: int) -> list[CommitRecord]:
        """The segment's ``pending`` parts (the partial index of unfinished commits finds them)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(C)
                .where(C.c.segment_id == segment_id, C.c.state == CommitState.PENDING.value)
                .order_by(C.c.part_number)
            )
            return [_commit(r) for r in rows]

    def commits(self, segment_id: int) -> list[CommitRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(C).where(C.c.segment_id == segment_id).order_by(C.c.part_number)
            )
            return [_commit(r) for r in rows]

    def events(self, segment_id: int | None = None) -> list[Event]:
        q = select(E).order_by(E.c.id)
        if segment_id is not None:
            q = q.where(E.c.segment_id == segment_id)
        with self.engine.connect() as conn:
            return [
                Event(
                    id=r.id,
                    at=r.at,
                    segment_id=r.segment_id,
                    commit_id=r.commit_id,
                    from_state=r.from_state,
                    to_state=r.to_state,
                    worker=r.worker,
                    fence=r.fence,
                    detail=r.detail,
                )
                for r in conn.execute(q)
            ]

    # --- registering --------------------------------------------------------------------------

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
                insert_new(S)
                .values(
                    key=key,
                    path=path,
                    node=node,
                    state=SegmentState.OPEN.value,
                    part_size=part_size,
                    fence=fence,
                    lease_owner=owner,
                    lease_expires=expires,
                    **self._holder_values(None if lease_ttl is None else node),
                    attempts=0,
                    created_at=now,
                    updated_at=now,
                    file_device=None if identity is None else identity[0],
                    file_inode=None if identity is None else identity[1],
                )
                .on_conflict_do_nothing(index_elements=[S.c.key])
                .returning(S.c.id, S.c.lease_expires)
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

    # --- leases -------------------------------------------------------------------------------

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
        expires = self._lease_until(ttl)
        values = {
            "fence": S.c.fence + 1,
            "lease_owner": owner,
            "lease_expires": expires,
            "updated_at": now,
            **self._holder_values(node),
        }
        taken_from = None
        with self._begin() as conn:
            res = conn.execute(
                update(S)
                .where(
                    S.c.key == key,
                    or_(
                        S.c.lease_owner.is_(None),
                        S.c.lease_expires < lease_now,
                        S.c.lease_owner == owner,
                    ),
                )
                .values(**values)
            )
            if res.rowcount != 1 and node is not None:
                held = conn.execute(select(*_HOLDER_COLUMNS).where(S.c.key == key)).first()
                if held is not None and _holder_gone(held, node):
                    # Compare-and-set on the fence: only the dead holder's lease is taken.
                    res = conn.execute(
                        update(S).where(S.c.id == held.id, S.c.fence == held.fence).values(**values)
                    )
                    taken_from = held if res.rowcount == 1 else None
            row = conn.execute(
                select(S.c.id, S.c.fence, S.c.lease_owner, S.c.lease_expires).where(S.c.key == key)
            ).first()
        if row is None:
            raise UsageError(f"segment {key!r} is not registered")
        if res.rowcount != 1:
            raise SegmentBusyError(
                f"segment {key!r} is leased by {row.lease_owner} until {row.lease_expires:%Y-%m-%d %H:%M:%S} UTC; "
                "wait for it to finish or for the lease to expire"
            )
        if taken_from is not None:
            _log_takeover(key, taken_from, owner)
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
    ) -> list[tuple[Lease, SegmentRecord]]:
        """Claim up to ``limit`` unfinished segments (ids > ``after_id``, ascending), in one transaction.

        A worker claims segments whose local file is on its ``node``, and, from any node, sealed
        segments whose parts are all uploaded (completing needs no local bytes; verifying does: the
        bytes). Open segments are claimed only when they have pending whole parts to upload.
        Rows locked by another claimer are skipped (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; on
        SQLite the immediate transaction serialises claimers).
        """
        if limit < 1:
            return []
        now = self.clock()
        dead = self._dead_holders(node, after_id)
        pending = exists().where(C.c.segment_id == S.c.id, C.c.state == CommitState.PENDING.value)
        q = (
            select(S.c.id)
            .where(
                text(UNFINISHED_SEGMENTS_SQL),  # the partial index's own predicate
                S.c.id > after_id,
                or_(
                    S.c.lease_owner.is_(None),
                    S.c.lease_expires < self._lease_now(),
                    # Live leases whose holder process on this node is gone (same fence).
                    *(and_(S.c.id == d.id, S.c.fence == d.fence) for d in dead),
                ),
                # Another node's segment only to complete it (all parts uploaded): verifying
                # reads every local byte again, which only a worker on its node can.
                or_(S.c.node == node, and_(S.c.state == SegmentState.SEALED.value, ~pending)),
                or_(S.c.state != SegmentState.OPEN.value, pending),
            )
            .order_by(S.c.id)
            .limit(limit)
        )
        # PostgreSQL: skip rows another claimer holds; SQLite: the rarity hint (see above).
        q = q.with_for_update(skip_locked=True) if self.is_postgres else q.where(RARE_UNFINISHED)
        expires = self._lease_until(ttl)
        with self._begin() as conn:
            ids = list(conn.execute(q).scalars())
            if not ids:
                return []
            rows = conn.execute(
                update(S)
                .where(S.c.id.in_(ids))
                .values(
                    fence=S.c.fence + 1,
                    lease_owner=owner,
                    lease_expires=expires,
                    updated_at=now,
                    **self._holder_values(node),
                )
                .returning(*S.c)
            ).all()
        segs = sorted((_segment(r) for r in rows), key=lambda seg: seg.id)
        claimed_ids = {seg.id for seg in segs}
        for d in dead:
            if d.id in claimed_ids:
                _log_takeover(d.key, d, owner)
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

    def renew(self, lease: Lease, ttl: float = DEFAULT_LEASE_SECONDS) -> Lease:
        """Extend a lease we still hold; LeaseLostError if it expired or was taken over."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now, values={"lease_expires": self._lease_until(ttl)})
            expires = conn.execute(
                select(S.c.lease_expires).where(S.c.id == lease.segment_id)
            ).scalar_one()
        return Lease(lease.segment_id, lease.key, lease.owner, lease.fence, expires)

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
                    update(S)
                    .where(
                        S.c.id.in_(chunk),
                        S.c.lease_owner == owner,
                        S.c.lease_expires > self._lease_now(),
                    )
                    .values(lease_expires=self._lease_until(ttl))
                    .returning(S.c.id, S.c.fence, S.c.lease_expires)
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

    def release(self, lease: Lease) -> bool:
        """Give a lease back (no error if it was already lost). True if it was still ours."""
        with self._begin() as conn:
            res = conn.execute(
                update(S)
                .where(
                    S.c.id == lease.segment_id,
                    S.c.fence == lease.fence,
                    S.c.lease_owner == lease.owner,
                )
                .values(lease_owner=None, lease_expires=None)
            )
        return res.rowcount == 1

    # --- guarded writes -----------------------------------------------------------------------

    def _guard_clause(self, lease: Lease, now: datetime) -> Any:
        # ``now`` stamps the row (updated_at); the lease is judged by the lease clock.
        del now
        return and_(
            S.c.id == lease.segment_id,
            S.c.fence == lease.fence,
            S.c.lease_owner == lease.owner,
            S.c.lease_expires > self._lease_now(),
        )

    def _lease_error(self, conn: Connection, lease: Lease, now: datetime) -> LeaseLostError | None:
        del now  # judged by the lease clock, in the statement
        row = conn.execute(
            select(
                S.c.fence,
                S.c.lease_owner,
                S.c.lease_expires,
                (S.c.lease_expires > self._lease_now()).label("live"),
            ).where(S.c.id == lease.segment_id)
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

    def _guard(
        self, conn: Connection, lease: Lease, now: datetime, values: dict[str, Any] | None = None
    ) -> None:
        """Check (and lock, on PostgreSQL) the segment row for ``lease``; raise if not ours."""
        res = conn.execute(
            update(S).where(self._guard_clause(lease, now)).values(updated_at=now, **(values or {}))
        )
        if res.rowcount != 1:
            err = self._lease_error(conn, lease, now)
            raise err or LeaseLostError(lease.key, lease.fence, None)

    def _event(
        self,
        conn: Connection,
        segment_id: int,
        commit_id: int | None,
        src: str | None,
        dst: str,
        worker: str,
        fence: int,
        detail: str | None,
    ) -> None:
        self._events(conn, [(segment_id, commit_id, src, dst, worker, fence, detail)])

    def _events(
        self,
        conn: Connection,
        rows: Sequence[EventRow_],
    ) -> None:
        """Audit rows, one statement for all of them (executemany)."""
        if not rows:
            return
        at = self.clock()
        conn.execute(
            insert(E),
            [
                {
                    "at": at,
                    "segment_id": seg,
                    "commit_id": cid,
                    "from_state": src,
                    "to_state": dst,
                    "worker": worker,
                    "fence": fence,
                    "detail": None if detail is None else _clip(detail),
                }
                for seg, cid, src, dst, worker, fence, detail in rows
            ],
        )

    def _segment_cas(
        self,
        conn: Connection,
        lease: Lease,
        expected: SegmentState,
        new: SegmentState,
        values: dict[str, Any],
        detail: str | None,
        now: datetime,
        *,
        check_unsent: bool = True,
        events: list[EventRow_] | None = None,
    ) -> None:
        """Guarded ``expected -> new``. With ``events``, the audit row is appended there for the
        caller to write with its others in one statement."""
        res = conn.execute(
            update(S)
            .where(self._guard_clause(lease, now), S.c.state == expected.value)
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            err = self._lease_error(conn, lease, now)
            if err is not None:
                raise err
            actual = conn.execute(select(S.c.state).where(S.c.id == lease.segment_id)).scalar()
            raise StaleStateError(lease.key, expected.value, actual)
        if check_unsent and new in (SegmentState.UPLOADED, SegmentState.VERIFIED):
            # Checked after the guarded update so a stale caller hears "stale" first; raising
            # here rolls the update back.
            self._check_all_sent(conn, lease, new)
        row = (lease.segment_id, None, expected.value, new.value, lease.owner, lease.fence, detail)
        if events is None:
            self._events(conn, [row])
        else:
            events.append(row)

    def _check_all_sent(self, conn: Connection, lease: Lease, new: SegmentState) -> None:
        """An object complete or verified speaks for every part: none may still be unsent."""
        unsent = (
            conn.execute(
                select(C.c.part_number)
                .where(
                    C.c.segment_id == lease.segment_id,
                    C.c.state.not_in([CommitState.UPLOADED.value, CommitState.VERIFIED.value]),
                )
                .order_by(C.c.part_number)
            )
            .scalars()
            .all()
        )
        if unsent:
            raise InvalidStateError(
                f"segment {lease.key!r} cannot become {new.value}: parts "
                f"{', '.join(map(str, unsent))} are not uploaded"
            )

    def _commit_cas(
        self,
        conn: Connection,
        lease: Lease,
        commit_id: int,
        expected: CommitState,
        new: CommitState,
        values: dict[str, Any],
        detail: str | None,
        now: datetime,
    ) -> None:
        self._guard(conn, lease, now)
        res = conn.execute(
            update(C)
            .where(
                C.c.id == commit_id, C.c.segment_id == lease.segment_id, C.c.state == expected.value
            )
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            row = conn.execute(
                select(C.c.state, C.c.part_number).where(C.c.id == commit_id)
            ).first()
            what = (
                f"{lease.key} part {row.part_number}"
                if row is not None
                else f"{lease.key} commit #{commit_id}"
            )
            raise StaleStateError(
                what, expected.value, None if row is None else row.state, what="commit"
            )
        self._event(
            conn,
            lease.segment_id,
            commit_id,
            expected.value,
            new.value,
            lease.owner,
            lease.fence,
            detail,
        )

    def transition_segment(
        self,
        lease: Lease,
        expected: SegmentState | str,
        new: SegmentState | str,
        *,
        reason: str | None = None,
        detail: str | None = None,
        **values: Any,
    ) -> None:
        """One guarded segment transition (checked against the state machine first)."""
        src, dst = parse_segment_state(str(expected)), parse_segment_state(str(new))
        check_segment_transition(src, dst, reason=reason)  # the state machine first: no I/O
        if dst is SegmentState.VERIFIED:
            # Verifying moves every commit with the segment: one path for it, not two.
            with self.engine.connect() as conn:
                recorded = conn.execute(select(S.c.size).where(S.c.id == lease.segment_id)).scalar()
            check_segment_transition(src, dst, has_checksum=recorded is not None)
            self.segment_verified(lease, detail or reason or "verified")
            return
        if reason is not None:
            values["reason"] = _clip(reason)
        now = self.clock()
        with self._begin() as conn:
            if dst in (SegmentState.SEALED, SegmentState.VERIFIED) and "size" not in values:
                recorded = conn.execute(select(S.c.size).where(S.c.id == lease.segment_id)).scalar()
                check_segment_transition(src, dst, has_checksum=recorded is not None)
            self._segment_cas(conn, lease, src, dst, values, detail or reason, now)

    def transition_commit(
        self,
        lease: Lease,
        commit_id: int,
        expected: CommitState | str,
        new: CommitState | str,
        *,
        etag: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        """One guarded commit transition (checked against the state machine first)."""
        src, dst = parse_commit_state(str(expected)), parse_commit_state(str(new))
        has_etag = etag is not None or dst is not CommitState.UPLOADED
        check_commit_transition(src, dst, has_etag=has_etag, reason=reason)
        values: dict[str, Any] = {}
        if etag is not None:
            values["etag"] = etag
        if dst is CommitState.PENDING:
            values["etag"] = None
        if reason is not None:
            values["reason"] = _clip(reason)
        now = self.clock()
        with self._begin() as conn:
            self._commit_cas(conn, lease, commit_id, src, dst, values, detail or reason, now)

    # --- the commit path ----------------------------------------------------------------------

    def add_commits(self, lease: Lease, new: Sequence[NewCommit]) -> list[CommitRecord]:
        """Record parts as ``pending`` (the intent, durable before any byte is sent)."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            state = conn.execute(select(S.c.state).where(S.c.id == lease.segment_id)).scalar_one()
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
            select(C.c.part_number, C.c.end_offset)
            .where(C.c.segment_id == lease.segment_id)
            .order_by(C.c.part_number.desc())
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
                insert(C).returning(C.c.id, sort_by_parameter_order=True),
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
                update(S)
                .where(self._guard_clause(lease, now))
                .values(updated_at=now, **values)
                .returning(*S.c)
            ).first()
            if row is None:
                err = self._lease_error(conn, lease, now)
                raise err or LeaseLostError(lease.key, lease.fence, None)
        return _segment(row)

    def commit_uploaded(self, lease: Lease, commit: CommitRecord, etag: str) -> None:
        """``pending -> uploaded``: only with the ETag the remote acknowledged, equal to our MD5
        (one part of :meth:`parts_uploaded`)."""
        self.parts_uploaded(lease, [(commit, etag)])

    def put_done(self, lease: Lease, commit: CommitRecord, etag: str) -> None:
        """A single PUT was acknowledged: its part and the segment become ``uploaded`` at once.

        Both facts come from the same response, so one transaction records them.
        """
        _check_acknowledged(lease, commit, etag)
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
        self,
        lease: Lease,
        commit: CommitRecord,
        etag: str,
        detail: str,
        *,
        release: bool = False,
        object_etag: str | None = None,
    ) -> None:
        """A single PUT acknowledged *and* its object checked: ``put_done`` then
        ``segment_verified`` in one transaction (both facts are known when it starts).
        ``object_etag``: what the remote reports for the object when it is not the part's MD5
        (SSE-KMS; the bytes were read back)."""
        _check_acknowledged(lease, commit, etag)
        now = self.clock()
        values: dict[str, Any] = {
            "object_etag": object_etag or etag,
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
            update(C)
            .where(
                C.c.id == commit.id,
                C.c.segment_id == lease.segment_id,
                C.c.state == CommitState.PENDING.value,
            )
            .values(state=new.value, etag=etag, updated_at=now)
        )
        if res.rowcount != 1:
            actual = conn.execute(select(C.c.state).where(C.c.id == commit.id)).scalar()
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
                conn, lease, now, values={"attempts": S.c.attempts + 1, "last_error": _clip(error)}
            )
            conn.execute(
                update(C)
                .where(C.c.id == commit.id, C.c.segment_id == lease.segment_id)
                .values(attempts=C.c.attempts + 1, last_error=_clip(error), updated_at=now)
            )

    def record_error(self, lease: Lease, error: str) -> None:
        """A failed attempt on the segment (complete, verify): attempts and last error."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(
                conn, lease, now, values={"attempts": S.c.attempts + 1, "last_error": _clip(error)}
            )

    def record_stuck(self, lease: Lease, error: str) -> int:
        """A pass ended on an error retrying cannot cure: recorded like :meth:`record_error`, plus
        an audit event (state unchanged, detail ``stuck: <error>``). Returns how many passes in a
        row ended on this same error: the trailing run of such events, counted from the trail
        (a transition of the segment, or another error, ends the run)."""
        now = self.clock()
        detail = _clip(f"{STUCK_PREFIX}{error}")
        with self._begin() as conn:
            self._guard(
                conn, lease, now, values={"attempts": S.c.attempts + 1, "last_error": _clip(error)}
            )
            state = conn.execute(select(S.c.state).where(S.c.id == lease.segment_id)).scalar_one()
            self._event(conn, lease.segment_id, None, state, state, lease.owner, lease.fence, detail)
            trail = conn.execute(
                select(E.c.from_state, E.c.to_state, E.c.detail)
                .where(E.c.segment_id == lease.segment_id, E.c.commit_id.is_(None))
                .order_by(E.c.id.desc())
                .limit(64)
            ).all()
        run = 0
        for row in trail:
            if row.from_state != row.to_state or row.detail != detail:
                break
            run += 1
        return run

    def segment_uploaded(self, lease: Lease, object_etag: str | None) -> None:
        """``sealed -> uploaded``: the object is complete at its key; what the remote said is kept."""
        self.transition_segment(
            lease,
            SegmentState.SEALED,
            SegmentState.UPLOADED,
            object_etag=object_etag,
            upload_id=None,
            detail=f"object complete, etag {object_etag}",
        )

    def segment_verified(self, lease: Lease, detail: str, *, release: bool = False) -> None:
        """``uploaded -> verified`` for the segment and every one of its commits, in one transaction.

        With ``release`` the lease is given back in the same transaction (nothing is left to do).
        """
        now = self.clock()
        with self._begin() as conn:
            commits = conn.execute(
                select(C.c.id, C.c.state, C.c.part_number, C.c.etag)
                .where(C.c.segment_id == lease.segment_id)
                .order_by(C.c.part_number)
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
                update(C)
                .where(
                    C.c.segment_id == lease.segment_id,
                    C.c.state == CommitState.UPLOADED.value,
                )
                .values(state=CommitState.VERIFIED.value, updated_at=now)
            )
            if res.rowcount != len(commits):
                moved = (
                    conn.execute(
                        select(C.c.part_number)
                        .where(
                            C.c.segment_id == lease.segment_id,
                            C.c.state != CommitState.VERIFIED.value,
                        )
                        .order_by(C.c.part_number)
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
                    "attempts": S.c.attempts + 1,
                    "last_error": _clip(reason),
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
                    "attempts": S.c.attempts + 1,
                    "last_error": _clip(reason),
                },
                reason,
                now,
                check_unsent=False,
                events=events,
            )
            ids = (
                conn.execute(
                    update(C)
                    .where(
                        C.c.segment_id == lease.segment_id,
                        C.c.state == CommitState.VERIFIED.value,
                    )
                    .values(state=CommitState.PENDING.value, etag=None, updated_at=now)
                    .returning(C.c.id)
                )
                .scalars()
                .all()
            )
            events.extend(
                (lease.segment_id, cid, "verified", "pending", lease.owner, lease.fence, reason)
                for cid in sorted(ids)
            )
            self._events(conn, events)

    def checked(self, segment_id: int) -> None:
        """The verified object was just found matching: remember when (the scrub's order)."""
        with self._begin() as conn:
            conn.execute(
                update(S)
                .where(S.c.id == segment_id, S.c.state == SegmentState.VERIFIED.value)
                .values(checked_at=self.clock())
            )

    def to_scrub(self, limit: int) -> list[SegmentRecord]:
        """Verified segments, the longest unchecked first (never checked: oldest verified)."""
        order = func.coalesce(S.c.checked_at, S.c.verified_at, S.c.created_at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(S)
                .where(S.c.state == SegmentState.VERIFIED.value)
                .order_by(order, S.c.id)
                .limit(limit)
            )
            return [_segment(r) for r in rows]

    def object_removed(self, lease: Lease, etag: str) -> None:
        """The object named by ``remove_etag`` is gone from the key: the intent is fulfilled."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now)
            conn.execute(
                update(S)
                .where(S.c.id == lease.segment_id, S.c.remove_etag == etag)
                .values(remove_etag=None)
            )

    def position(
        self, segment_id: int, *, pending_only: bool = False
    ) -> tuple[SegmentRecord, list[CommitRecord]]:
        """The segment's row and its commits (or only its pending ones), in part order, read in
        one transaction: what the driver compares with what the remote holds."""
        with self.engine.connect() as conn, conn.begin():
            seg = _segment(conn.execute(select(S).where(S.c.id == segment_id)).one())
            q = select(C).where(C.c.segment_id == segment_id)
            if pending_only:
                q = q.where(C.c.state == CommitState.PENDING.value)
            commits = [_commit(r) for r in conn.execute(q.order_by(C.c.part_number))]
        return seg, commits

    def parts_uploaded(
        self,
        lease: Lease,
        acks: Sequence[tuple[CommitRecord, str]],
        detail: str | None = None,
    ) -> None:
        """``pending -> uploaded`` for parts the remote acknowledged or lists, each with the ETag
        it gave (equal to the recorded MD5), in one transaction."""
        for commit, etag in acks:
            _check_acknowledged(lease, commit, etag)
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

    def _commit_move(
        self,
        conn: Connection,
        lease: Lease,
        commit: CommitRecord,
        expected: CommitState,
        new: CommitState,
        values: dict[str, Any],
        now: datetime,
    ) -> None:
        res = conn.execute(
            update(C)
            .where(
                C.c.id == commit.id,
                C.c.segment_id == lease.segment_id,
                C.c.state == expected.value,
            )
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            actual = conn.execute(select(C.c.state).where(C.c.id == commit.id)).scalar()
            raise StaleStateError(
                f"{lease.key} part {commit.part_number}", expected.value, actual, what="commit"
            )

    @staticmethod
    def _commit_event(
        lease: Lease, commit: CommitRecord, src: str, dst: str, detail: str | None
    ) -> EventRow_:
        return (lease.segment_id, commit.id, src, dst, lease.owner, lease.fence, detail)

    def reset_commits(self, lease: Lease, reason: str) -> None:
        """Every ``uploaded`` commit back to ``pending`` (its upload id is gone from the remote)."""
        now = self.clock()
        with self._begin() as conn:
            self._guard(conn, lease, now, values={"upload_id": None})
            self._reset_commits(conn, lease, reason)

    def _reset_commits(self, conn: Connection, lease: Lease, reason: str) -> None:
        ids = (
            conn.execute(
                select(C.c.id).where(
                    C.c.segment_id == lease.segment_id, C.c.state == CommitState.UPLOADED.value
                )
            )
            .scalars()
            .all()
        )
        for cid in ids:
            conn.execute(
                update(C)
                .where(C.c.id == cid)
                .values(state=CommitState.PENDING.value, etag=None, updated_at=self.clock())
            )
            self._event(
                conn, lease.segment_id, cid, "uploaded", "pending", lease.owner, lease.fence, reason
            )

    def fail_segment(self, lease: Lease, reason: str) -> None:
        """Terminal ``failed`` with a reason, for the segment and its unfinished commits."""
        now = self.clock()
        with self._begin() as conn:
            state = conn.execute(select(S.c.state).where(S.c.id == lease.segment_id)).scalar_one()
            src = parse_segment_state(state)
            check_segment_transition(src, SegmentState.FAILED, reason=reason)
            self._segment_cas(
                conn, lease, src, SegmentState.FAILED, {"reason": _clip(reason)}, reason, now
            )
            for c in conn.execute(
                select(C.c.id, C.c.state).where(
                    C.c.segment_id == lease.segment_id,
                    C.c.state.in_(
                        [
                            CommitState.PENDING.value,
                            CommitState.UPLOADED.value,
                            CommitState.VERIFIED.value,
                        ]
                    ),
                )
            ).all():
                conn.execute(
                    update(C)
                    .where(C.c.id == c.id)
                    .values(state=CommitState.FAILED.value, reason=_clip(reason), updated_at=now)
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
            row = conn.execute(select(S).where(S.c.key == key)).first()
            if row is None:
                raise UsageError(f"segment {key!r} is not in the manifest")
            seg = _segment(row)
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
                "last_error": _clip(f"retried after failure: {seg.reason or ''}"),
                "object_etag": None,
                "fence": S.c.fence + 1,
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
                update(S)
                .where(
                    S.c.id == seg.id,
                    S.c.state == SegmentState.FAILED.value,
                    S.c.fence == seg.fence,
                )
                .values(**values)
            )
            if res.rowcount != 1:
                actual = conn.execute(select(S.c.state).where(S.c.id == seg.id)).scalar()
                raise StaleStateError(key, SegmentState.FAILED.value, actual)
            fence = seg.fence + 1
            events: list[EventRow_] = [(seg.id, None, "failed", dst.value, who, fence, detail)]
            ids = (
                conn.execute(
                    update(C)
                    .where(C.c.segment_id == seg.id, C.c.state == CommitState.FAILED.value)
                    .values(state=CommitState.PENDING.value, etag=None, reason=None, updated_at=now)
                    .returning(C.c.id)
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

    def leased_unfinished(
        self, *, exclude_owner: str | None = None
    ) -> list[tuple[str, str, datetime]]:
        """(key, lease owner, lease expiry) of unfinished segments another process holds now."""
        q = select(S.c.key, S.c.lease_owner, S.c.lease_expires).where(
            text(UNFINISHED_SEGMENTS_SQL),
            S.c.lease_owner.is_not(None),
            S.c.lease_expires > self._lease_now(),
        )
        if exclude_owner is not None:
            q = q.where(S.c.lease_owner != exclude_owner)
        with self.engine.connect() as conn:
            return [(k, o, e) for k, o, e in conn.execute(q.order_by(S.c.id))]

    def failed_keys(self) -> list[str]:
        """Every failed segment's key, in id order (``uploader retry --all-failed``)."""
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(S.c.key).where(S.c.state == SegmentState.FAILED.value).order_by(S.c.id)
                ).scalars()
            )

    # --- rebuild -------------------------------------------------------------------------------

    def rebuilt(
        self,
        key: str,
        *,
        state: SegmentState,
        path: str,
        node: str,
        part_size: int,
        size: int,
        crc32c: int | None,
        etag: str | None,
        upload_mode: str | None,
        parts: Sequence[NewCommit],
        worker: str,
        detail: str,
    ) -> SegmentRecord | None:
        """Insert a segment recreated from its object by a rebuild, with its parts, in one
        transaction; ``verified`` (parts verified, ETag = MD5) or ``unknown`` (unknown origin, no
        parts, ``detail`` is the reason). A key already present inserts nothing: None (a row is
        compared by the caller, never overwritten). Audited with ``detail``."""
        validate_key(key)
        if state not in (SegmentState.VERIFIED, SegmentState.UNKNOWN):
            raise InvalidStateError(f"a rebuild creates verified or unknown rows, not {state}")
        if state is SegmentState.VERIFIED and (crc32c is None or etag is None or not parts):
            raise InvalidStateError("a rebuilt verified row needs its checksums and parts")
        now = self.clock()
        insert_new = pg_insert if self.is_postgres else sqlite_insert
        verified = state is SegmentState.VERIFIED
        with self._begin() as conn:
            seg_id = conn.execute(
                insert_new(S)
                .values(
                    key=key,
                    path=path,
                    node=node,
                    state=state.value,
                    part_size=part_size,
                    size=size,
                    crc32c=crc32c,
                    expected_etag=etag if verified else None,
                    upload_mode=upload_mode,
                    object_etag=etag,
                    fence=0,
                    attempts=0,
                    reason=None if verified else detail,
                    created_at=now,
                    updated_at=now,
                    sealed_at=now if verified else None,
                    verified_at=now if verified else None,
                    checked_at=now,
                )
                .on_conflict_do_nothing(index_elements=[S.c.key])
                .returning(S.c.id)
            ).scalar_one_or_none()
            if seg_id is None:
                return None
            if parts:
                conn.execute(
                    insert(C),
                    [
                        {
                            "segment_id": seg_id,
                            "part_number": c.part_number,
                            "start_offset": c.start,
                            "end_offset": c.end,
                            "md5": c.md5,
                            "crc32c": c.crc32c,
                            "etag": c.md5,
                            "state": CommitState.VERIFIED.value,
                            "attempts": 0,
                            "created_at": now,
                            "updated_at": now,
                        }
                        for c in parts
                    ],
                )
            self._event(conn, seg_id, None, None, state.value, worker, 0, detail)
        return self.segment_by_id(seg_id)

    def rebuild_compared(self, segment_id: int, worker: str, detail: str) -> None:
        """Audit a rebuild's comparison of an existing row with its object (nothing changes)."""
        with self._begin() as conn:
            row = conn.execute(select(S.c.state, S.c.fence).where(S.c.id == segment_id)).one()
            self._event(conn, segment_id, None, row.state, row.state, worker, row.fence, detail)

    # --- overview -----------------------------------------------------------------------------

    def status(self) -> Status:
        now = self.clock()
        with self.engine.connect() as conn:
            segs = {
                r[0]: r[1]
                for r in conn.execute(select(S.c.state, func.count()).group_by(S.c.state))
            }
            commit_rows = conn.execute(
                select(
                    C.c.state,
                    func.count(),
                    func.coalesce(func.sum(C.c.end_offset - C.c.start_offset), 0),
                ).group_by(C.c.state)
            ).all()
            oldest = conn.execute(
                select(func.min(S.c.created_at)).where(text(UNFINISHED_SEGMENTS_SQL))
            ).scalar()
            # Sealed and not verified yet: what "stuck" means (an open segment of a quiet
            # writer is only waiting for bytes). Measured from the seal, not the creation.
            oldest_sealed = conn.execute(
                select(func.min(S.c.sealed_at)).where(
                    text(UNFINISHED_SEGMENTS_SQL), S.c.state != SegmentState.OPEN.value
                )
            ).scalar()
            failed = conn.execute(
                select(S.c.key, S.c.reason)
                .where(S.c.state == SegmentState.FAILED.value)
                .order_by(S.c.id)
                .limit(100)
            ).all()
            troubled_q = (
                select(S.c.key, S.c.last_error)
                .where(text(UNFINISHED_SEGMENTS_SQL), S.c.last_error.is_not(None))
                .order_by(S.c.id)
                .limit(100)
            )
            if not self.is_postgres:
                troubled_q = troubled_q.where(RARE_UNFINISHED)
            troubled = conn.execute(troubled_q).all()
            unknown = conn.execute(
                select(S.c.key, S.c.reason)
                .where(S.c.state == SegmentState.UNKNOWN.value)
                .order_by(S.c.id)
                .limit(100)
            ).all()
        commits = {r[0]: int(r[1]) for r in commit_rows}
        commit_bytes = {r[0]: int(r[2]) for r in commit_rows}
        return Status(
            segments={s.value: int(segs.get(s.value, 0)) for s in SegmentState},
            commits={s.value: commits.get(s.value, 0) for s in CommitState},
            commit_bytes={s.value: commit_bytes.get(s.value, 0) for s in CommitState},
            unverified_bytes=commit_bytes.get("pending", 0) + commit_bytes.get("uploaded", 0),
            oldest_unverified_age=None
            if oldest is None
            else max(0.0, (now - oldest).total_seconds()),
            oldest_sealed_age=None
            if oldest_sealed is None
            else max(0.0, (now - oldest_sealed).total_seconds()),
            failed=tuple((k, r or "") for k, r in failed),
            errors=tuple((k, e) for k, e in troubled),
            unknown=tuple((k, r or "") for k, r in unknown),
        )

    def deletable(self, *, limit: int | None = None, after_id: int = 0) -> list[SegmentRecord]:
        """Verified segments: the only ones whose local file may be deleted."""
        q = (
            select(S)
            .where(S.c.state == SegmentState.VERIFIED.value, S.c.id > after_id)
            .order_by(S.c.id)
        )
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_segment(r) for r in conn.execute(q)]

    def live_upload_ids(self) -> set[str]:
        """Upload ids referenced by unfinished segments (everything else under the prefix is an orphan)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(S.c.upload_id).where(
                    text(UNFINISHED_SEGMENTS_SQL), S.c.upload_id.is_not(None)
                )
            )
            return {r[0] for r in rows}
