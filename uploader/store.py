"""The library users call: ``uploader.open(...)``, ``Store.segment``, ``Segment.commit/seal``.

A :class:`Store` joins one manifest and one remote root. ``store.segment(key, path)`` registers a
segment (idempotent by key) and takes its lease; a heartbeat renews the leases while the store is
open. ``commit()`` and ``seal()`` return futures; whatever happens to them, the manifest keeps every
unfinished part ``pending`` with its attempts and last error, so the recovery job finishes what the
caller never looked at (the RocketMQ ``commitAsync`` loss cannot happen here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from uploader import recovery
from uploader.digest import combine_crcs, file_size, multipart_etag, read_range
from uploader.engine import Counters, Shipper
from uploader.errors import (
    LeaseLostError,
    LocalFileError,
    SegmentFailedError,
    SegmentSealedError,
    StoreClosedError,
    UploaderError,
    UsageError,
)
from uploader.keys import validate_key
from uploader.manifest.repo import DEFAULT_LEASE_SECONDS, Manifest, default_node, default_worker
from uploader.records import Lease, NewCommit, SegmentRecord, Status
from uploader.states import SegmentState
from uploader.storage import open_storage
from uploader.storage.base import MAX_PART_SIZE, MAX_PARTS, Storage

log = logging.getLogger("uploader")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = 8 * MiB

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CommitResult:
    """What one ``commit()`` or ``seal()`` did."""

    key: str
    sent_bytes: int  # bytes uploaded by this call
    sent_parts: int
    committed: int  # end of the bytes recorded in the manifest (offset)
    carried_bytes: int  # bytes appended but smaller than a part: they wait for a later commit/seal
    sealed: bool = False
    verified: bool = False
    object_etag: str | None = None


class UploadFuture(Future[T]):
    """A ``concurrent.futures.Future`` that logs a failure nobody retrieved.

    Logging is a courtesy: the manifest, not the future, is what keeps the work from being lost.
    """

    def __init__(self, description: str) -> None:
        super().__init__()
        self._description = description
        self._retrieved = False

    def result(self, timeout: float | None = None) -> T:
        self._retrieved = True
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._retrieved = True
        return super().exception(timeout)

    def __del__(self) -> None:
        if not self._retrieved and self.done() and not self.cancelled():
            exc = super().exception(0)
            if exc is not None:
                log.error(
                    "%s failed and nobody retrieved the result: %s; the manifest keeps it "
                    "pending and `uploader recover` will finish it",
                    self._description,
                    exc,
                )


class Segment:
    """A local append-only file shipped to ``key``. Obtain it from :meth:`Store.segment`."""

    def __init__(self, store: Store, record: SegmentRecord, lease: Lease | None) -> None:
        self._store = store
        self.key = record.key
        self.path = record.path
        self._id = record.id
        self._lease = lease
        # Jobs of one segment start in the order they were asked for. A commit starts once the
        # previous job has *recorded* its parts (their sends may still be in flight: consecutive
        # commits overlap on the network); a seal starts once every earlier job is done.
        self._lock = threading.Lock()
        self._last_recorded: threading.Event | None = None
        self._outstanding: set[Future[Any]] = set()
        self._inflight: set[int] = set()  # commit ids being sent by a job of this segment

    # --- public -----------------------------------------------------------------------------------

    @property
    def record(self) -> SegmentRecord:
        """The segment's manifest row as it is now."""
        return self._store.manifest.segment_by_id(self._id)

    @property
    def state(self) -> SegmentState:
        return self.record.state

    def commit(self) -> UploadFuture[CommitResult]:
        """Send the whole parts appended since the last commit. Bad input raises at once."""
        self._check_open("commit")
        return self._submit("commit", self._do_commit, after_all=False)

    def seal(self) -> UploadFuture[CommitResult]:
        """The final commit: send the rest, complete the object, verify it."""
        self._check_open("seal")
        return self._submit("seal", lambda _recorded: self._do_seal(), after_all=True)

    def __repr__(self) -> str:
        return f"Segment(key={self.key!r}, path={self.path!r})"

    # --- internals --------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        """Refuse bad input before anything is recorded or sent."""
        self._store._check_open()
        progress = self._store.manifest.progress(self._id)
        seg, committed = progress.segment, progress.committed
        if seg.state is not SegmentState.OPEN:
            if seg.state is SegmentState.FAILED:
                raise SegmentFailedError(f"segment {self.key!r} failed: {seg.reason}")
            raise SegmentSealedError(
                f"segment {self.key!r} is already {seg.state.value}; {what} after seal is refused "
                "(append to a new segment; `uploader recover` finishes a seal that did not)"
            )
        size = file_size(self.path)
        if size < committed:
            raise LocalFileError(
                f"{self.path}: local file of segment {self.key!r} has {size} bytes, fewer than the "
                f"{committed} already committed; it was truncated or replaced. Restore the file "
                "(nothing was recorded or sent)"
            )
        if self._lease is None:
            raise UsageError(f"segment {self.key!r} is not leased by this store")

    def _submit(
        self,
        what: str,
        job: Callable[[threading.Event], CommitResult],
        *,
        after_all: bool,
    ) -> UploadFuture[CommitResult]:
        fut: UploadFuture[CommitResult] = UploadFuture(f"{what} of segment {self.key!r}")
        recorded = threading.Event()
        with self._lock:
            prev_recorded = self._last_recorded
            earlier = list(self._outstanding)
            self._last_recorded = recorded
            self._outstanding.add(fut)

        def run() -> None:
            # Only wait: an earlier job's outcome is its own future's business (reading it here
            # would count as "retrieved" and silence the log of an ignored failure).
            if after_all:
                wait(earlier)
            elif prev_recorded is not None:
                prev_recorded.wait()
            try:
                if not fut.set_running_or_notify_cancel():
                    return
                try:
                    fut.set_result(job(recorded))
                except BaseException as exc:
                    log.debug("%s of %r failed: %s", what, self.key, exc)
                    fut.set_exception(exc)
            finally:
                recorded.set()
                # Drop our reference once done, so a future nobody kept is collected (and its
                # unretrieved failure logged) as soon as the caller lets go of it.
                with self._lock:
                    self._outstanding.discard(fut)

        self._store._submit_job(run, fut)
        return fut

    @property
    def lease(self) -> Lease:
        lease = self._store._leases.get(self._id)
        if lease is None:
            raise LeaseLostError(self.key, self._lease.fence if self._lease else -1, None)
        return lease

    def _new_parts(
        self, start: int, end: int, part_size: int, number: int, *, final: bool
    ) -> list[tuple[int, int, int]]:
        """(part number, start, end) of the parts covering ``[start, end)``."""
        parts: list[tuple[int, int, int]] = []
        pos = start
        while end - pos >= part_size or (final and pos < end):
            stop = min(pos + part_size, end)
            number += 1
            parts.append((number, pos, stop))
            pos = stop
        if number > MAX_PARTS:
            raise UsageError(
                f"segment {self.key!r} would need {number} parts of {part_size} bytes; S3 allows "
                f"{MAX_PARTS}: use a larger part_size"
            )
        return parts

    def _do_commit(self, recorded: threading.Event) -> CommitResult:
        store = self._store
        lease = self.lease
        # Snapshot the parts in flight *before* reading their states: a part that finishes in
        # between then shows its final state instead of looking like a failed, pending one.
        with self._lock:
            inflight = set(self._inflight)
        # Two indexed reads whatever the segment's length: a broker commits after every append,
        # so reading every part of a long segment on each commit would grow quadratically.
        progress = store.manifest.progress(self._id)
        seg, committed = progress.segment, progress.committed
        pending = store.manifest.pending_commits(seg.id)
        size = file_size(self.path)
        if size < committed:
            raise LocalFileError(
                f"{self.path}: shorter ({size}) than what was committed ({committed})"
            )
        counters = Counters()
        new = self._new_parts(committed, size, seg.part_size, progress.parts, final=False)
        # Pending parts nobody is sending: earlier sends that failed. They go first.
        retry = [c for c in pending if c.id not in inflight]
        if new or retry:
            upload_id = store.shipper.ensure_upload(lease, seg)
            seg = self.record
            if retry:
                counters = store.shipper.send_parts(lease, seg, upload_id, retry)
            committed = self._record_and_send(
                lease, seg, upload_id, new, counters, recorded, committed
            )
        recorded.set()
        return CommitResult(
            key=self.key,
            sent_bytes=counters.bytes_sent,
            sent_parts=counters.parts_sent,
            committed=committed,
            carried_bytes=size - committed,
        )

    def _record_and_send(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        parts: list[tuple[int, int, int]],
        counters: Counters,
        recorded: threading.Event,
        committed: int,
    ) -> int:
        """Record each new part ``pending`` with the checksums of its bytes, then send it.

        Pipelined: part N+1 is read and recorded while part N is in flight, within the store's
        slots. Returns the end of the recorded bytes.
        """
        shipper = self._store.shipper
        futures: list[Future[None]] = []
        try:
            for number, start, end in parts:
                shipper.slots.acquire()
                try:
                    payload = read_range(self.path, start, end)
                    [commit] = self._store.manifest.add_commits(
                        lease, [NewCommit(number, start, end, payload.md5, payload.crc32c)]
                    )
                    committed = end
                    with self._lock:
                        self._inflight.add(commit.id)
                    part = shipper.submit_part(lease, seg, upload_id, commit, counters, payload)
                    part.add_done_callback(functools.partial(self._sent, commit.id))
                    futures.append(part)
                except BaseException:
                    shipper.slots.release()
                    raise
        finally:
            recorded.set()  # the next commit may start recording while these are in flight
            shipper.wait(futures)
        return committed

    def _sent(self, commit_id: int, _done: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(commit_id)

    def _do_seal(self) -> CommitResult:
        store = self._store
        manifest = store.manifest
        lease = self.lease
        progress = manifest.progress(self._id)
        seg, committed = progress.segment, progress.committed
        size = file_size(self.path)
        if size < committed:
            raise LocalFileError(
                f"{self.path}: shorter ({size}) than what was committed ({committed})"
            )
        try:
            # A segment no bigger than a part, with nothing sent yet, goes as one atomic PUT.
            if not committed and seg.upload_id is None and size <= seg.part_size:
                return self._seal_single(lease, seg, size)
            return self._seal_multipart(lease, seg, size)
        finally:
            # Sealed: whatever happened, the writer is done with it. Releasing the lease lets a
            # recovery worker (this store's or another) claim what is unfinished right away.
            store._forget_lease(seg.id)

    def _seal_single(self, lease: Lease, seg: SegmentRecord, size: int) -> CommitResult:
        """Read once (within a slot), record the seal with its checksums, PUT those same bytes,
        check the object, then record uploaded and verified together."""
        store = self._store
        shipper = store.shipper
        shipper.slots.acquire()
        try:
            payload = read_range(self.path, 0, size)
            [commit] = store.manifest.seal(
                lease,
                [NewCommit(1, 0, size, payload.md5, payload.crc32c)],
                size=size,
                crc32c=payload.crc32c,
                expected_etag=payload.md5,
                upload_mode="put",
            )
            etag = shipper.put(lease, seg, commit, payload, record=False)
        finally:
            shipper.slots.release()
        del payload
        # The row as the seal just wrote it: verification compares with these values.
        sealed = dataclasses.replace(
            seg,
            state=SegmentState.SEALED,
            size=size,
            crc32c=commit.crc32c,
            expected_etag=commit.md5,
            upload_mode="put",
        )
        shipper.verify_put(lease, sealed, commit, etag, release=True)
        store._drop_lease(seg.id)
        return CommitResult(
            key=self.key,
            sent_bytes=size,
            sent_parts=1,
            committed=size,
            carried_bytes=0,
            sealed=True,
            verified=True,
            object_etag=etag,
        )

    def _seal_multipart(self, lease: Lease, seg: SegmentRecord, size: int) -> CommitResult:
        """Two passes, so that the seal is durable before any remote call.

        The digest pass reads the final parts (in parallel on the part pool, within the slots)
        and keeps only their checksums; then the seal and every final part are recorded in one
        transaction. From there a crash, a kill or a failure nobody looks at leaves a sealed
        segment that the recovery job finishes (a seal recorded part by part as it is sent would
        leave an open segment, which only its writer may seal). The send pass reads each part
        again, checks its CRC32C and sends it.
        """
        store = self._store
        manifest = store.manifest
        shipper = store.shipper
        commits = manifest.commits(seg.id)
        committed = commits[-1].end if commits else 0
        parts = self._new_parts(committed, size, seg.part_size, len(commits), final=True)
        final = shipper.digest(self.path, parts)
        # The seal's intent: size, whole-file CRC32C and the multipart ETag to expect.
        all_commits = manifest.seal(
            lease,
            final,
            size=size,
            crc32c=combine_crcs(
                [(c.crc32c, c.size) for c in commits] + [(c.crc32c, c.end - c.start) for c in final]
            ),
            expected_etag=multipart_etag([c.md5 for c in commits] + [c.md5 for c in final]),
            upload_mode="multipart",
        )
        try:
            upload_id = shipper.ensure_upload(lease, seg)
        except UploaderError as exc:
            with contextlib.suppress(UploaderError):  # a lost lease: the new holder retries
                manifest.record_error(lease, f"start_upload: {exc}")
            raise
        seg = self.record
        counters = shipper.send_parts(lease, seg, upload_id, all_commits)
        all_commits = manifest.commits(seg.id)
        info = shipper.complete(lease, seg, all_commits)
        # What verification compares with (size, checksums, expected ETag) was fixed by the seal:
        # the row read after the upload started serves.
        shipper.verify(lease, seg, all_commits, release=True)
        store._drop_lease(seg.id)
        return CommitResult(
            key=self.key,
            sent_bytes=counters.bytes_sent,
            sent_parts=counters.parts_sent,
            committed=size,
            carried_bytes=0,
            sealed=True,
            verified=True,
            object_etag=info.etag,
        )


class Store:
    """A manifest and a remote root. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        manifest: Manifest,
        storage: Storage,
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = 4,
        verify: str = "etag",
        node: str | None = None,
        worker: str | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        if concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {concurrency}")
        if part_size < storage.min_part_size or part_size > MAX_PART_SIZE:
            raise UsageError(
                f"part_size {part_size} is outside [{storage.min_part_size}, {MAX_PART_SIZE}] for "
                f"{storage.url}"
            )
        self.manifest = manifest
        self.storage = storage
        self.part_size = part_size
        self.concurrency = concurrency
        self.node = node or default_node()
        self.worker = worker or default_worker()
        self.lease_seconds = lease_seconds
        self.shipper = Shipper(manifest, storage, concurrency=concurrency, verify=verify)
        self.verify_mode = verify
        # Segment jobs wait on part futures: a pool of their own so they cannot starve the parts.
        self._jobs = ThreadPoolExecutor(
            max_workers=max(2, concurrency), thread_name_prefix="uploader-job"
        )
        self._pending: set[Future[Any]] = set()
        self._segments: dict[str, Segment] = {}
        self._leases: dict[int, Lease] = {}
        self._state_lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._heartbeat = threading.Thread(
            target=self._beat, name="uploader-heartbeat", daemon=True
        )
        self._heartbeat.start()

    # --- context ----------------------------------------------------------------------------------

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self, *, wait: bool = True) -> None:
        """Finish queued work (``wait``), release leases and connections. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._jobs.shutdown(wait=wait, cancel_futures=not wait)
        self._stop.set()
        self._heartbeat.join(timeout=5)
        self.shipper.shutdown()
        for lease in list(self._leases.values()):
            try:
                self.manifest.release(lease)
            except Exception as exc:  # the lease simply expires
                log.warning("could not release the lease on %r: %s", lease.key, exc)
        self._leases.clear()
        self.storage.close()
        self.manifest.close()

    def abandon(self) -> None:
        """Stop without finishing or releasing anything, as a crash would (for tests and demos)."""
        with self._state_lock:
            self._closed = True
        self._stop.set()
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self.shipper.shutdown()
        self.storage.close()
        self.manifest.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the store is closed; open a new one with uploader.open(...)")

    # --- segments ---------------------------------------------------------------------------------

    def segment(self, key: str, path: str | os.PathLike[str]) -> Segment:
        """Register (or reopen) the segment ``key`` for the local file ``path`` and lease it."""
        self._check_open()
        validate_key(key)
        apath = os.path.abspath(os.fspath(path))
        if not os.path.isfile(apath):
            raise LocalFileError(
                f"{apath}: no such local file for segment {key!r}; create the file before "
                "registering it (nothing was recorded)"
            )
        with self._state_lock:
            existing = self._segments.get(key)
        if existing is not None:
            if existing.path != apath:
                raise UsageError(
                    f"segment key {key!r} is open for {existing.path!r}, not {apath!r}"
                )
            return existing
        record, lease = self.manifest.register_leased(
            key,
            apath,
            node=self.node,
            part_size=self.part_size,
            worker=self.worker,
            lease_ttl=self.lease_seconds,
        )
        if lease is None and record.state is SegmentState.OPEN:
            lease = self.manifest.acquire(key, self.worker, self.lease_seconds)
        seg = Segment(self, record, lease)
        with self._state_lock:
            self._segments[key] = seg
            if lease is not None:
                self._leases[record.id] = lease
        return seg

    def _hold_lease(self, lease: Lease) -> None:
        """Keep ``lease`` renewed by the heartbeat until it is forgotten."""
        with self._state_lock:
            self._leases[lease.segment_id] = lease

    def _drop_lease(self, segment_id: int) -> None:
        """Stop renewing a lease the manifest already released."""
        with self._state_lock:
            self._leases.pop(segment_id, None)

    def _forget_lease(self, segment_id: int) -> None:
        with self._state_lock:
            lease = self._leases.pop(segment_id, None)
        if lease is not None:
            self.manifest.release(lease)

    def _submit_job(self, run: Callable[[], None], fut: Future[Any]) -> None:
        with self._state_lock:
            if self._closed:
                raise StoreClosedError(
                    "the store is closed; open a new one with uploader.open(...)"
                )
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            self._jobs.submit(run)

    def _beat(self) -> None:
        interval = max(0.05, self.lease_seconds / 3)
        while not self._stop.wait(interval):
            with self._state_lock:
                leases = list(self._leases.values())
            if not leases:
                continue
            try:
                renewed, lost = self.manifest.renew_many(leases, self.lease_seconds)
            except Exception as exc:  # a transient database error: try again next beat
                log.warning("lease renewal failed: %s", exc)
                continue
            gone = []
            with self._state_lock:
                for lease in renewed:
                    if lease.segment_id in self._leases:
                        self._leases[lease.segment_id] = lease
                for lease in lost:
                    # Released meanwhile (sealed and verified) is not lost: only ours still held.
                    if self._leases.get(lease.segment_id) is lease:
                        del self._leases[lease.segment_id]
                        gone.append(lease)
            for lease in gone:
                log.error(
                    "lease on %r lost (expired or taken over); another worker finishes it",
                    lease.key,
                )

    # --- overview ---------------------------------------------------------------------------------

    def status(self) -> Status:
        """Counts per state, unverified bytes, age of the oldest unverified segment."""
        return self.manifest.status()

    def deletable(self) -> list[SegmentRecord]:
        """Segments whose local file may now be deleted: verified ones, and only those."""
        return self.manifest.deletable()

    def recover(
        self,
        *,
        limit: int | None = None,
        max_reuploads: int = recovery.DEFAULT_MAX_REUPLOADS,
        stop: threading.Event | None = None,
        on_segment: Callable[[recovery.SegmentOutcome], None] | None = None,
    ) -> recovery.RecoveryReport:
        """Finish every interrupted segment this worker can act on; see :mod:`uploader.recovery`.

        ``on_segment`` is called with each segment's outcome as it is known (progress).
        """
        self._check_open()
        return recovery.recover(
            self, limit=limit, max_reuploads=max_reuploads, stop=stop, on_segment=on_segment
        )

    def sweep(
        self,
        *,
        dry_run: bool = False,
        older_than: float = recovery.DEFAULT_SWEEP_AGE,
    ) -> recovery.SweepReport:
        """Abort multipart uploads and staged parts no live manifest row references."""
        self._check_open()
        return recovery.sweep(self, dry_run=dry_run, older_than=older_than)


def open(
    manifest: str,
    remote: str,
    *,
    storage_options: dict[str, Any] | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    concurrency: int = 4,
    verify: str = "etag",
    node: str | None = None,
    worker: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    storage: Storage | None = None,
    min_part_size: int | None = None,
) -> Store:
    """Open a store: a manifest (SQLAlchemy URL) and a remote root (fsspec URL).

    ``storage`` replaces the backend built from ``remote`` (e.g. a fault-injecting wrapper);
    ``min_part_size`` lowers S3's 5 MiB part minimum for test servers.
    """
    if verify not in ("etag", "deep"):
        raise UsageError(f"verify must be 'etag' or 'deep', not {verify!r}")
    m = Manifest.open(manifest)
    try:
        st = (
            storage
            if storage is not None
            else open_storage(remote, storage_options, min_part_size=min_part_size)
        )
        return Store(
            m,
            st,
            part_size=part_size,
            concurrency=concurrency,
            verify=verify,
            node=node,
            worker=worker,
            lease_seconds=lease_seconds,
        )
    except BaseException:
        m.close()
        raise
