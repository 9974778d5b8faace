"""The lease keeper: the leases one process holds, renewed by one heartbeat.

Both the writer (:class:`uploader.store.Store`) and the recovery job hold leases through it: a
lease is *held* (renewed every third of its length, all of them in one transaction), *dropped*
(the manifest released it already, e.g. with ``verified``) or *released* (given back now).
A lease the heartbeat finds lost (expired or taken over) is forgotten and logged: every later
write with it is refused by the manifest's fence anyway. A writer whose lease was lost takes it
again when it is free (:meth:`uploader.store.Segment.lease`); the new lease has a new fence.
"""

from __future__ import annotations

import logging
import threading

from uploader.manifest.db import describe
from uploader.manifest.repo import Manifest
from uploader.records import Lease

log = logging.getLogger("uploader")


class LeaseKeeper:
    """Holds and renews the leases of one worker identity."""

    def __init__(self, manifest: Manifest, lease_seconds: float) -> None:
        self.manifest = manifest
        self.lease_seconds = lease_seconds
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="uploader-heartbeat", daemon=True)
        self._thread.start()

    def hold(self, lease: Lease) -> None:
        """Keep ``lease`` renewed until it is dropped or released."""
        with self._lock:
            self._leases[lease.segment_id] = lease

    def get(self, segment_id: int) -> Lease | None:
        with self._lock:
            return self._leases.get(segment_id)

    def forget(self, lease: Lease) -> None:
        """Stop renewing ``lease`` (a write with it was refused: it is lost), unless another
        lease on the same segment replaced it meanwhile."""
        with self._lock:
            held = self._leases.get(lease.segment_id)
            if held is not None and held.fence == lease.fence:
                del self._leases[lease.segment_id]

    def drop(self, segment_id: int) -> None:
        """Stop renewing a lease the manifest already released."""
        with self._lock:
            self._leases.pop(segment_id, None)

    def release(self, segment_id: int) -> None:
        """Give the lease back now (no error if it was lost meanwhile)."""
        with self._lock:
            lease = self._leases.pop(segment_id, None)
        if lease is not None:
            self.manifest.release(lease)

    def stop(self, *, release: bool) -> None:
        """Stop the heartbeat; with ``release``, give every lease back (else they expire)."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            leases = list(self._leases.values())
            self._leases.clear()
        if not release:
            return
        for lease in leases:
            try:
                self.manifest.release(lease)
            except Exception as exc:  # the lease simply expires
                log.warning("could not release the lease on %r: %s", lease.key, describe(exc))

    def _beat(self) -> None:
        interval = max(0.05, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            self.renew_now()

    def renew_now(self) -> None:
        """One heartbeat: renew every held lease in one transaction."""
        with self._lock:
            leases = list(self._leases.values())
        if not leases:
            return
        try:
            renewed, lost = self.manifest.renew_many(leases, self.lease_seconds)
        except Exception as exc:  # a transient database error: try again next beat
            # One line (a database error's text carries its SQL and parameters).
            log.warning("lease renewal failed: %s", describe(exc))
            return
        gone = []
        with self._lock:
            for lease in renewed:
                # Only the lease that was renewed: one re-acquired meanwhile (a new fence) stays.
                held = self._leases.get(lease.segment_id)
                if held is not None and held.fence == lease.fence:
                    self._leases[lease.segment_id] = lease
            for lease in lost:
                # Released meanwhile (sealed and verified) is not lost: only ours still held.
                if self._leases.get(lease.segment_id) is lease:
                    del self._leases[lease.segment_id]
                    gone.append(lease)
        for lease in gone:
            log.error(
                "lease on %r lost (expired or taken over); writes with it are refused: a writer "
                "takes it again once it is free, else another worker finishes the segment",
                lease.key,
            )
