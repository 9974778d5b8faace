"""A segment's row and lease as its writer sees them: the base of :class:`uploader.segment.Segment`.

A writer's lease can be lost (this process was paused past it, or a recovery worker held the
segment meanwhile). :class:`SegmentLease` takes it again when it is free (a new fence, so what the
old lease still had in flight is refused), and runs a job once more when its write was refused
for a lost lease.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from uploader.errors import LeaseLostError, SegmentBusyError
from uploader.futures import CommitResult
from uploader.records import Lease, SegmentRecord
from uploader.states import SegmentState

if TYPE_CHECKING:
    from uploader.store import Store

log = logging.getLogger("uploader")


class SegmentLease:
    """The row and the lease of one segment of a store (set up by ``Segment.__init__``)."""

    _store: Store
    _id: int
    _lease: Lease | None
    _lease_lock: threading.Lock
    key: str

    @property
    def record(self) -> SegmentRecord:
        """The segment's manifest row as it is now."""
        return self._store.manifest.segment_by_id(self._id)

    @property
    def state(self) -> SegmentState:
        return self.record.state

    @property
    def lease(self) -> Lease:
        """The live lease this store holds on the segment, taken again if it was lost."""
        lease = self._store.keeper.get(self._id)
        return lease if lease is not None else self._take_back()

    def _take_back(self) -> Lease:
        """Our lease was lost (this process was paused past it, or a recovery worker held the
        segment meanwhile): take it again if it is free. The new lease has a new fence, so what
        the old one still had in flight is refused (and stays ``pending`` for a later drive).

        :class:`SegmentBusyError` while another live process holds it (try again later);
        :class:`LeaseLostError` if the segment left ``open`` meanwhile (recovery finishes it).
        """
        store = self._store
        with self._lease_lock:
            lease = store.keeper.get(self._id)
            if lease is not None:  # another job of this segment took it back first
                return lease
            seg = store.manifest.segment_by_id(self._id)
            old = self._lease.fence if self._lease is not None else -1
            if seg.state is not SegmentState.OPEN:
                raise LeaseLostError(self.key, old, seg.fence)
            try:
                lease = store.manifest.acquire(
                    self.key, store.worker, store.lease_seconds, node=store.node
                )
            except SegmentBusyError as exc:
                raise SegmentBusyError(
                    f"segment {self.key!r}: this writer's lease was lost and another process "
                    f"holds the segment now ({exc}); the writer takes it back once it is free"
                ) from None
            store.keeper.hold(lease)
            self._lease = lease
        log.warning(
            "segment %r: this writer's lease was lost (fence %d); taken again (fence %d)",
            self.key,
            old,
            lease.fence,
        )
        return lease

    def _with_lease(self, job: Callable[[Lease], CommitResult]) -> CommitResult:
        """Run ``job`` with the segment's lease; if its write is refused because the lease was
        lost meanwhile, take the lease again (when free) and run it once more. The manifest
        refused the stale write, so nothing half-done is left behind it; a segment that was
        recorded sealed before the loss is recovery's, and the error goes to the caller."""
        lease = self.lease
        try:
            return job(lease)
        except LeaseLostError as exc:
            self._store.keeper.forget(lease)
            if self.state is not SegmentState.OPEN:
                raise
            log.warning("segment %r: %s; taking the lease again to retry", self.key, exc)
            return job(self.lease)

    def _ensure_lease(self) -> None:
        """Before the store hands this segment out again: an open segment has a live lease."""
        if self._store.keeper.get(self._id) is None and self.state is SegmentState.OPEN:
            self._take_back()
