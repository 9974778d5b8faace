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

from collections.abc import Callable
from datetime import datetime

from uploader.manifest import db
from uploader.manifest.core import DEFAULT_LEASE_SECONDS, default_node, default_worker, utcnow
from uploader.manifest.intents import Intents
from uploader.manifest.leases import Leases
from uploader.manifest.rebuilds import Rebuilds
from uploader.manifest.resets import Resets
from uploader.manifest.status import Overview
from uploader.manifest.transitions import Transitions

__all__ = ["DEFAULT_LEASE_SECONDS", "Manifest", "default_node", "default_worker", "utcnow"]


class Manifest(Leases, Intents, Transitions, Resets, Rebuilds, Overview):
    """The SQL manifest behind a store and the recovery job. Thread-safe (one engine, a pool)."""

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
