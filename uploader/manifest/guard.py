"""The guarded-transaction unit every write uses: the engine and its write lock, the lease clock,
the fence guard, compare-and-set, and the audit rows.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, insert, literal_column, select, update

from uploader.errors import InvalidStateError, LeaseLostError, StaleStateError
from uploader.manifest import db
from uploader.manifest.rowmap import COMMITS, EVENTS, SEGMENTS
from uploader.records import CommitRecord, Lease
from uploader.states import CommitState, SegmentState

DEFAULT_LEASE_SECONDS = 30.0


def utcnow() -> datetime:
    """Naive UTC: what the manifest stores everywhere."""
    return datetime.now(UTC).replace(tzinfo=None)


def default_node() -> str:
    return os.environ.get("UPLOADER_NODE") or socket.gethostname()


def default_worker() -> str:
    return f"{default_node()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def check_acknowledged(lease: Lease, commit: CommitRecord, etag: str) -> None:
    """A part counts as uploaded only with the ETag the remote acknowledged equal to our MD5."""
    if etag != commit.md5:
        raise StaleStateError(
            f"{lease.key} part {commit.part_number}",
            "etag " + commit.md5,
            "etag " + etag,
            what="commit",
        )


def clip(message: str, limit: int = 2000) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


#: An audit row waiting to be written: segment id, commit id, from, to, worker, fence, detail.
EventRow_ = tuple[int, int | None, str | None, str, str, int, str | None]


_SQLITE_LOCKS: dict[str, threading.Lock] = {}
_SQLITE_LOCKS_GUARD = threading.Lock()


class ManifestCore:
    """The engine, the clocks and the guarded transaction shared by every part of the manifest."""

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

    @property
    def url(self) -> str:
        return db.redact(self.engine.url)

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def close(self) -> None:
        self.engine.dispose()

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

    def _guard_clause(self, lease: Lease, now: datetime) -> Any:
        # ``now`` stamps the row (updated_at); the lease is judged by the lease clock.
        del now
        return and_(
            SEGMENTS.c.id == lease.segment_id,
            SEGMENTS.c.fence == lease.fence,
            SEGMENTS.c.lease_owner == lease.owner,
            SEGMENTS.c.lease_expires > self._lease_now(),
        )

    def _lease_error(self, conn: Connection, lease: Lease, now: datetime) -> LeaseLostError | None:
        del now  # judged by the lease clock, in the statement
        row = conn.execute(
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

    def _guard(
        self, conn: Connection, lease: Lease, now: datetime, values: dict[str, Any] | None = None
    ) -> None:
        """Check (and lock, on PostgreSQL) the segment row for ``lease``; raise if not ours."""
        res = conn.execute(
            update(SEGMENTS)
            .where(self._guard_clause(lease, now))
            .values(updated_at=now, **(values or {}))
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
            insert(EVENTS),
            [
                {
                    "at": at,
                    "segment_id": seg,
                    "commit_id": cid,
                    "from_state": src,
                    "to_state": dst,
                    "worker": worker,
                    "fence": fence,
                    "detail": None if detail is None else clip(detail),
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
            update(SEGMENTS)
            .where(self._guard_clause(lease, now), SEGMENTS.c.state == expected.value)
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            err = self._lease_error(conn, lease, now)
            if err is not None:
                raise err
            actual = conn.execute(
                select(SEGMENTS.c.state).where(SEGMENTS.c.id == lease.segment_id)
            ).scalar()
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
                select(COMMITS.c.part_number)
                .where(
                    COMMITS.c.segment_id == lease.segment_id,
                    COMMITS.c.state.not_in(
                        [CommitState.UPLOADED.value, CommitState.VERIFIED.value]
                    ),
                )
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
            update(COMMITS)
            .where(
                COMMITS.c.id == commit_id,
                COMMITS.c.segment_id == lease.segment_id,
                COMMITS.c.state == expected.value,
            )
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            row = conn.execute(
                select(COMMITS.c.state, COMMITS.c.part_number).where(COMMITS.c.id == commit_id)
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
            update(COMMITS)
            .where(
                COMMITS.c.id == commit.id,
                COMMITS.c.segment_id == lease.segment_id,
                COMMITS.c.state == expected.value,
            )
            .values(state=new.value, updated_at=now, **values)
        )
        if res.rowcount != 1:
            actual = conn.execute(select(COMMITS.c.state).where(COMMITS.c.id == commit.id)).scalar()
            raise StaleStateError(
                f"{lease.key} part {commit.part_number}", expected.value, actual, what="commit"
            )

    @staticmethod
    def _commit_event(
        lease: Lease, commit: CommitRecord, src: str, dst: str, detail: str | None
    ) -> EventRow_:
        return (lease.segment_id, commit.id, src, dst, lease.owner, lease.fence, detail)
