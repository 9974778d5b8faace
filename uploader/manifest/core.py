"""The manifest's engine and clocks: the SQLite write lock, the lease clock (invariant 11) and
the write transaction (:meth:`ManifestCore._write`) that hands every write its :class:`Tx`.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    func,
    literal_column,
)

from uploader.config import DEFAULT_LEASE_SECONDS, fit_name
from uploader.manifest import db
from uploader.manifest.guard import Tx

__all__ = ["DEFAULT_LEASE_SECONDS", "ManifestCore", "default_node", "default_worker", "utcnow"]


def utcnow() -> datetime:
    """Naive UTC: what the manifest stores everywhere."""
    return datetime.now(UTC).replace(tzinfo=None)


def default_node() -> str:
    return os.environ.get("UPLOADER_NODE") or socket.gethostname()


def default_worker() -> str:
    """``node:pid:random``, the node's name cut so that it fits the manifest's column (the pid
    and the random part make it unique, not the node's name)."""
    return fit_name(default_node(), f":{os.getpid()}:{uuid.uuid4().hex[:8]}")


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

    @contextmanager
    def _write(self) -> Iterator[Tx]:
        """One guarded write transaction (see :class:`Tx`); its audit rows are written at the
        end, in one statement, only if the body raised nothing."""
        with self._begin() as conn:
            tx = Tx(conn, self.clock(), self._lease_now)
            yield tx
            tx.write_audit(self.clock())
