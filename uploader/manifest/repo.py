"""The manifest: every segment, every commit (part) and every state transition, in SQL.

:class:`Manifest` is the front callers use; it only puts together the parts below, each a kind
of transaction, all going through one guarded-transaction unit:

* :mod:`~uploader.manifest.guard` -- :class:`~uploader.manifest.guard.Tx`: the fence guard,
  the compare-and-set (typed error naming key, expected and actual state), set-based moves of
  parts, the audit rows written in one multi-row ``INSERT``, rows returned as written;
* :mod:`~uploader.manifest.core` -- the engine, the SQLite write lock, the lease clock;
* :mod:`~uploader.manifest.leases` -- acquire, claim, renew, release;
* :mod:`~uploader.manifest.intents` -- what is recorded before a remote call;
* :mod:`~uploader.manifest.outcomes` -- what a remote call answered, recorded after it;
* :mod:`~uploader.manifest.batches` -- a group commit's intents and outcomes, a batch per
  transaction;
* :mod:`~uploader.manifest.resets` -- rows moved backwards, ``failed``, a human's retry;
* :mod:`~uploader.manifest.renames` -- a node's segments moved to its new name;
* :mod:`~uploader.manifest.transitions` -- single transitions checked against the state machine;
* :mod:`~uploader.manifest.rebuilds` -- rows recreated from the objects by a rebuild;
* :mod:`~uploader.manifest.queries`, :mod:`~uploader.manifest.status` -- reads;
* :mod:`~uploader.manifest.rowmap` -- the tables, and rows mapped to records.

Each transition is one transaction and one guarded compare-and-set::

    UPDATE ... WHERE id = :id AND state = :expected AND fence = :token
                 AND lease_owner = :owner AND lease_expires > :now

Zero rows updated never overwrites silently: it raises :class:`StaleStateError` (someone else moved
the row; the message names the key, the expected and the actual state) or :class:`LeaseLostError`
(our fence token is stale or our lease expired). Every successful transition writes one audit row.

Leases: claiming a segment increments its fence token, so a worker that was paused past its lease
(GC, SIGSTOP, a network partition) finds every later write refused. On PostgreSQL the next unfinished
segments are claimed with ``FOR UPDATE SKIP LOCKED``; on SQLite every *write* transaction is ``BEGIN
IMMEDIATE`` (reads are deferred WAL snapshots that take no lock), which makes the same
read-then-claim exclusive across processes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from uploader.manifest import db
from uploader.manifest.batches import Batches
from uploader.manifest.core import DEFAULT_LEASE_SECONDS, default_node, default_worker, utcnow
from uploader.manifest.intents import Intents
from uploader.manifest.leases import Leases
from uploader.manifest.outcomes import STUCK_PREFIX
from uploader.manifest.rebuilds import Rebuilds
from uploader.manifest.renames import Renames
from uploader.manifest.resets import Resets
from uploader.manifest.status import Overview
from uploader.manifest.transitions import Transitions

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "STUCK_PREFIX",
    "Manifest",
    "default_node",
    "default_worker",
    "utcnow",
]


class Manifest(Leases, Intents, Transitions, Batches, Resets, Renames, Rebuilds, Overview):
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
