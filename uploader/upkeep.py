"""What a store does with what is already recorded: the overview, the deletion gate, checks of
verified objects, reading back, rebuilding rows, recovery, a human's retry, the sweep.

A mixin of :class:`uploader.store.Store` (whose manifest, remote, driver and leases these use);
each is a thin front over the module that owns the work (:mod:`uploader.deletable`,
:mod:`uploader.verify`, :mod:`uploader.readback`, :mod:`uploader.rebuild`,
:mod:`uploader.recovery`, :mod:`uploader.sweep`).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from uploader import deletable as deletable_mod
from uploader import readback, recovery
from uploader import rebuild as rebuild_mod
from uploader import verify as verify_mod
from uploader.config import DEFAULT_MAX_REUPLOADS, DEFAULT_STUCK_PASSES
from uploader.errors import UsageError
from uploader.records import SegmentRecord, Status
from uploader.stalled import find_stalled
from uploader.states import SegmentState
from uploader.transport import file_identity

if TYPE_CHECKING:
    from uploader.driver import Driver
    from uploader.manifest.repo import Manifest
    from uploader.storage.base import Storage


class Upkeep:
    """The store's operations on recorded work; :class:`~uploader.store.Store` provides the rest."""

    if TYPE_CHECKING:  # provided by Store
        manifest: Manifest
        storage: Storage
        driver: Driver

        @property
        def crew(self) -> recovery.Crew: ...
        @property
        def node(self) -> str: ...
        @property
        def worker(self) -> str: ...
        @property
        def part_size(self) -> int: ...
        @property
        def concurrency(self) -> int: ...
        def _check_open(self) -> None: ...

    # --- overview ---------------------------------------------------------------------------------

    def status(self) -> Status:
        """Counts per state, unverified bytes, age of the oldest unverified segment, and the
        open segments of this node whose local file vanished or shrank (``stalled``)."""
        status = self.manifest.status()
        return dataclasses.replace(status, stalled=find_stalled(self.manifest, self.node))

    def deletable(self) -> list[SegmentRecord]:
        """Segments whose local file may now be deleted: verified ones, and only those.

        The gate looks at the local files of this node once more (a ``stat``, no read): a file
        replaced by another inode, of another size than the verified object, or modified after
        it was verified is not offered (it holds bytes the remote does not have; ``uploader
        status`` and the log say which). Files already gone are still listed (nothing to lose).
        """
        self._check_open()
        return deletable_mod.deletable(self.crew)

    def verify(
        self,
        keys: Sequence[str] | None = None,
        *,
        deep: bool = False,
        repair: bool = True,
        on_check: Callable[[verify_mod.Check], None] | None = None,
    ) -> verify_mod.VerifyReport:
        """Check the objects of verified segments again (all of them, or ``keys``).

        A verified object found missing or different is drift: the segment leaves ``verified``
        (audited) and, with ``repair`` and its local file on this node and intact, is uploaded
        again at once; with the local file gone too it becomes ``failed``. See
        :mod:`uploader.verify`.
        """
        self._check_open()
        if keys is None:
            records = self.manifest.segments([SegmentState.VERIFIED])
        else:
            records = []
            for key in keys:
                rec = self.manifest.segment(key)
                if rec is None:
                    raise UsageError(f"segment {key!r} is not in the manifest {self.manifest.url}")
                records.append(rec)
        return verify_mod.verify(self.crew, records, deep=deep, repair=repair, on_check=on_check)

    def scrub(
        self,
        *,
        limit: int = 1000,
        deep: bool = False,
        rate: float | None = None,
        stop: threading.Event | None = None,
        on_check: Callable[[verify_mod.Check], None] | None = None,
    ) -> verify_mod.VerifyReport:
        """One scrub pass: up to ``limit`` verified segments, the longest unchecked first."""
        self._check_open()
        return verify_mod.scrub(
            self.crew, limit=limit, deep=deep, rate=rate, stop=stop, on_check=on_check
        )

    def check_object(self, key: str, *, deep: bool = False) -> str | None:
        """None if the object at ``key`` matches what the manifest recorded, else what differs.

        Changes nothing (``uploader verify``).
        """
        self._check_open()
        seg = self.manifest.segment(key)
        if seg is None:
            raise UsageError(f"segment {key!r} is not in the manifest")
        return self.driver.check_object(seg, deep=deep)

    # --- reading back and rebuilding -------------------------------------------------------

    def _readable(self, key: str, allow_unverified: bool) -> tuple[int, list[readback.Window]]:
        """The object's size and its windows (recorded parts), after the manifest's consent."""
        self._check_open()
        return readback.readable(self.manifest, self.storage, key, allow_unverified)

    def open_read(self, key: str, *, allow_unverified: bool = False) -> readback.ObjectReader:
        """A seekable binary file over the object of ``key``, streamed in part-sized windows,
        each whole part's CRC32C checked against the manifest before its bytes are returned
        (:class:`~uploader.errors.CorruptObjectError` names the part). A segment that is not
        ``verified`` is refused unless ``allow_unverified``."""
        size, windows = self._readable(key, allow_unverified)
        return readback.ObjectReader(self.storage, key, size, windows)

    def read(
        self, key: str, start: int, end: int, *, allow_unverified: bool = False
    ) -> readback.RangeRead:
        """Bytes ``[start, end)`` of ``key``'s object; every part the range covers completely is
        checked, and ``unchecked`` names the byte ranges no part could check."""
        size, windows = self._readable(key, allow_unverified)
        return readback.read_range(self.storage, key, size, windows, start, end)

    def rebuild(
        self,
        *,
        prefix: str = "",
        on_object: Callable[[rebuild_mod.RebuiltObject], None] | None = None,
    ) -> rebuild_mod.RebuildReport:
        """Recreate rows from the objects under ``prefix`` (see :mod:`uploader.rebuild`):
        ``verified`` ones from the objects' metadata, ``unknown`` (unknown origin) for the
        others; rows already present are compared, never overwritten."""
        self._check_open()
        return rebuild_mod.rebuild(
            self.manifest,
            self.storage,
            prefix=prefix,
            worker=self.worker,
            part_size=self.part_size,
            concurrency=self.concurrency,
            on_object=on_object,
        )

    def recover(
        self,
        *,
        limit: int | None = None,
        max_reuploads: int = DEFAULT_MAX_REUPLOADS,
        stop: threading.Event | None = None,
        on_segment: Callable[[recovery.SegmentOutcome], None] | None = None,
        stuck_passes: int = DEFAULT_STUCK_PASSES,
        owed: recovery.Owed | None = None,
    ) -> recovery.RecoveryReport:
        """Finish every interrupted segment this worker can act on; see :mod:`uploader.recovery`.

        ``on_segment`` is called with each segment's outcome as it is known (progress).
        ``stuck_passes``: a segment whose passes end on the same error that no retry can fix
        (a call the remote does not support, a request it refuses) this many times in a row
        becomes ``failed`` with it. ``owed``: a loop's :class:`uploader.recovery.Owed`, noting what
        a manifest outage kept this pass from settling (the loop settles it before its next pass).
        """
        self._check_open()
        if stuck_passes < 1:
            raise UsageError(f"stuck_passes must be at least 1, not {stuck_passes}")
        return recovery.recover(
            self.crew,
            limit=limit,
            max_reuploads=max_reuploads,
            stop=stop,
            on_segment=on_segment,
            stuck_passes=stuck_passes,
            owed=owed,
        )

    def finish(self, key: str) -> recovery.SegmentOutcome:
        """Drive the segment ``key`` as far as it goes now (recovery for one key): claim it
        (:class:`SegmentBusyError` if another process holds it), drive, release."""
        self._check_open()
        return recovery.resume_key(self.crew, key)

    def retry(self, key: str, *, who: str, why: str) -> SegmentRecord:
        """A human fixed what made ``key`` fail: move it out of ``failed`` (audited: who, why);
        see :meth:`Manifest.retry_failed`. Its local file's identity is re-recorded when the
        file exists (a file restored from a copy); its bytes are still checked against the
        recorded checksums before anything is verified. :meth:`finish` drives it."""
        self._check_open()
        seg = self.manifest.segment(key)
        identity = None
        if seg is not None and seg.node == self.node and os.path.isfile(seg.path):
            identity = file_identity(seg.path)
        return self.manifest.retry_failed(key, who=who, why=why, identity=identity)

    def sweep(
        self,
        *,
        dry_run: bool = False,
        older_than: float = recovery.DEFAULT_SWEEP_AGE,
    ) -> recovery.SweepReport:
        """Abort multipart uploads and staged parts no live manifest row references."""
        self._check_open()
        return recovery.sweep(self.crew, dry_run=dry_run, older_than=older_than)
