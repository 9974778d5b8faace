"""The library users call: ``uploader.open(...)``, ``Store.segment``, ``Segment.commit/seal``.

A :class:`Store` joins one manifest and one remote root. ``store.segment(key, path)`` registers a
segment (idempotent by key) and takes its lease; a heartbeat renews the leases while the store is
open. ``commit()`` and ``seal()`` return futures; whatever happens to them, the manifest keeps every
unfinished part ``pending`` with its attempts and last error, so the recovery job finishes what the
caller never looked at (the RocketMQ ``commitAsync`` loss cannot happen here).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

from uploader import config as config_mod
from uploader import readback, recovery
from uploader import rebuild as rebuild_mod
from uploader import verify as verify_mod
from uploader.config import StoreConfig, UploadMode, VerifyMode
from uploader.config import resolve as resolve_config
from uploader.digest import (
    Payload,
    combine_crcs,
    file_size,
    multipart_etag,
    read_range,
    stat_file,
)
from uploader.driver import DEFAULT_MAX_REUPLOADS, Driver, DriveResult
from uploader.errors import (
    KeyConflictError,
    LeaseLostError,
    LocalFileError,
    SegmentBusyError,
    SegmentFailedError,
    SegmentSealedError,
    StoreClosedError,
    UnverifiedObjectError,
    UsageError,
    VerificationError,
)
from uploader.keys import validate_key
from uploader.leases import LeaseKeeper
from uploader.manifest.repo import Manifest, default_node, default_worker
from uploader.records import Lease, NewCommit, SegmentRecord, Status
from uploader.stalled import find_stalled
from uploader.states import SegmentState
from uploader.storage import open_storage
from uploader.storage.base import MAX_PART_SIZE, MAX_PARTS, Storage
from uploader.transport import Counters, Transport, file_identity, wait_all

log = logging.getLogger("uploader")

MiB = 1024 * 1024
DEFAULT_PART_SIZE = config_mod.DEFAULT_PART_SIZE  # kept importable from here

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


@dataclass(frozen=True, slots=True)
class _Known:
    """An open segment as its writer last recorded it, under the lease with ``fence``.

    While that lease is live nobody else can add a part, seal, fail or move the segment (every
    such write is fenced), so a commit that finds no whole part to add can answer from this
    without a manifest read. A part whose send failed makes it stale (its re-send needs the
    driver, which reads what is recorded).
    """

    fence: int
    segment: SegmentRecord
    committed: int
    parts: int


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
        self._lease_lock = threading.Lock()  # one re-acquisition at a time
        # What this writer knows of its open segment while it holds the lease (see _known).
        self._known: _Known | None = None
        self._failed_sends = 0  # sends of this segment that failed, ever (under self._lock)
        self._sealing = False

    # --- public -----------------------------------------------------------------------------------

    @property
    def record(self) -> SegmentRecord:
        """The segment's manifest row as it is now."""
        return self._store.manifest.segment_by_id(self._id)

    @property
    def state(self) -> SegmentState:
        return self.record.state

    def commit(self, upto: int | None = None) -> UploadFuture[CommitResult]:
        """Send the whole parts of ``[committed, upto)`` (``upto``: the file size by default).

        ``upto`` is the valid end of a file written in place (preallocated, filled through mmap):
        bytes past it are never read or sent. Bad input raises at once, before anything is
        recorded or sent.
        """
        self._check_open("commit", upto)
        return self._submit("commit", lambda recorded: self._do_commit(recorded, upto), False)

    def seal(self, size: int | None = None) -> UploadFuture[CommitResult]:
        """The final commit: send the rest up to ``size`` (the file size by default), complete
        the object, check every local byte again, verify the object."""
        self._check_open("seal", size)
        self._sealing = True  # commits after this read the manifest (and are refused there)
        return self._submit("seal", lambda _recorded: self._do_seal(size), True)

    def __repr__(self) -> str:
        return f"Segment(key={self.key!r}, path={self.path!r})"

    # --- internals --------------------------------------------------------------------------------

    def _check_open(self, what: str, end: int | None) -> None:
        """Refuse bad input before anything is recorded or sent."""
        self._store._check_open()
        if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < 0):
            raise UsageError(
                f"segment {self.key!r}: {what} end must be a non-negative int, got {end!r}"
            )
        known = self._known_now() if what == "commit" else None
        if known is not None:
            seg, committed = known.segment, known.committed
        else:
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
        if end is not None and end < committed:
            raise UsageError(
                f"segment {self.key!r}: {what} end {end} is below the {committed} bytes already "
                "committed; committed bytes cannot be taken back (nothing was recorded or sent)"
            )
        if end is not None and end > size:
            raise UsageError(
                f"segment {self.key!r}: {what} end {end} is past the end of {self.path} "
                f"({size} bytes) (nothing was recorded or sent)"
            )
        if self._lease is None:
            raise UsageError(f"segment {self.key!r} is not leased by this store")

    def _submit(
        self,
        what: str,
        job: Callable[[threading.Event], CommitResult],
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

    def _known_now(self) -> _Known | None:
        """What the last commit recorded, if it still holds: the same live lease, no seal
        asked for, no failed send since."""
        known = self._known
        if known is None or self._sealing:
            return None
        lease = self._store.keeper.get(self._id)
        if lease is None or lease.fence != known.fence:
            return None
        return known

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

    def _valid_end(
        self, lease: Lease, seg: SegmentRecord, committed: int, end: int | None, what: str
    ) -> int:
        """The end a job ships up to (``end``, default the file size), checked against one
        ``stat`` of the file: replaced by another inode, the segment fails (its bytes are not the
        ones committed); shorter than what the job needs, LocalFileError."""
        st = stat_file(self.path)
        if seg.file_inode is not None and (st.st_dev, st.st_ino) != (
            seg.file_device,
            seg.file_inode,
        ):
            reason = (
                f"local bytes unusable: {self.path} was replaced by another file (inode "
                f"{seg.file_inode} registered, {st.st_ino} now); its bytes are not the ones "
                "committed"
            )
            self._store.manifest.fail_segment(lease, reason)
            self._store.keeper.release(seg.id)
            raise SegmentFailedError(f"segment {self.key!r} failed: {reason}")
        end = st.st_size if end is None else end
        if st.st_size < committed or end > st.st_size:
            raise LocalFileError(
                f"{self.path}: local file of segment {self.key!r} has {st.st_size} bytes; the "
                f"{what} needs [{committed}, {end}); it was truncated"
            )
        return end

    def _do_commit(self, recorded: threading.Event, upto: int | None) -> CommitResult:
        return self._with_lease(lambda lease: self._commit_with(lease, recorded, upto))

    def _commit_with(
        self, lease: Lease, recorded: threading.Event, upto: int | None
    ) -> CommitResult:
        store = self._store
        # Snapshot the parts in flight *before* reading their states: a part that finishes in
        # between then shows its final state instead of looking like a failed, pending one.
        with self._lock:
            inflight = frozenset(self._inflight)
            failed_sends = self._failed_sends
        known = self._known_now()
        if known is not None and known.fence == lease.fence:
            # A broker commits after every append, and most appends add no whole part: answer
            # from what this writer recorded under the same lease, with one stat and no
            # manifest read (see _Known).
            end = self._valid_end(lease, known.segment, known.committed, upto, "commit")
            if end - known.committed < known.segment.part_size:
                recorded.set()
                return CommitResult(
                    key=self.key,
                    sent_bytes=0,
                    sent_parts=0,
                    committed=known.committed,
                    carried_bytes=end - known.committed,
                )
        # Two indexed reads whatever the segment's length: a broker commits after every append,
        # so reading every part of a long segment on each commit would grow quadratically.
        progress = store.manifest.progress(self._id)
        seg, committed = progress.segment, progress.committed
        end = self._valid_end(lease, seg, committed, upto, "commit")
        counters = Counters()
        new = self._new_parts(committed, end, seg.part_size, progress.parts, final=False)
        pending = store.manifest.pending_commits(seg.id)
        if any(c.id not in inflight for c in pending):
            # Earlier sends that failed: the driver learns what the remote holds, then re-sends.
            store.driver.drive(lease, inflight=inflight, counters=counters)
            seg = store.manifest.segment_by_id(seg.id)
        if new:
            if seg.upload_id is None:
                seg = store.driver.start_upload(lease, seg)
            assert seg.upload_id is not None
            committed = self._record_and_send(lease, seg, seg.upload_id, new, counters, recorded)
        with self._lock:
            # Only if no send failed since this job began (its re-send needs the driver); one
            # that fails from now on clears it again (_sent).
            if seg.state is SegmentState.OPEN and self._failed_sends == failed_sends:
                self._known = _Known(lease.fence, seg, committed, progress.parts + len(new))
        recorded.set()
        return CommitResult(
            key=self.key,
            sent_bytes=counters.bytes_sent,
            sent_parts=counters.parts_sent,
            committed=committed,
            carried_bytes=end - committed,
        )

    def _record_and_send(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        parts: list[tuple[int, int, int]],
        counters: Counters,
        recorded: threading.Event,
    ) -> int:
        """Record each new part ``pending`` with the checksums of its bytes, then send it.

        Pipelined: part N+1 is read and recorded while part N is in flight, within the store's
        slots. Returns the end of the recorded bytes.
        """
        store = self._store
        transport = store.transport
        futures: list[Future[None]] = []
        committed = parts[0][1]
        try:
            for number, start, end in parts:
                transport.slots.acquire()
                try:
                    payload = read_range(self.path, start, end)
                    [commit] = store.manifest.add_commits(
                        lease, [NewCommit(number, start, end, payload.md5, payload.crc32c)]
                    )
                    committed = end
                    with self._lock:
                        self._inflight.add(commit.id)
                except BaseException:
                    transport.slots.release()
                    raise
                part = transport.submit_held(
                    store.driver.send_recorded, lease, seg, upload_id, commit, payload, counters
                )
                del payload
                part.add_done_callback(functools.partial(self._sent, commit.id))
                futures.append(part)
        finally:
            recorded.set()  # the next commit may start recording while these are in flight
            wait_all(futures)
        return committed

    def _sent(self, commit_id: int, done: Future[None]) -> None:
        with self._lock:
            self._inflight.discard(commit_id)
            if done.cancelled() or done.exception() is not None:
                self._failed_sends += 1
                self._known = None  # the next commit drives the re-send

    def _do_seal(self, size: int | None) -> CommitResult:
        try:
            return self._with_lease(lambda lease: self._seal_with(lease, size))
        finally:
            # Sealed: whatever happened, the writer is done with it. Releasing the lease lets a
            # recovery worker (this store's or another) claim what is unfinished right away.
            # (Not sealed: the next seal takes the lease again.)
            self._store.keeper.release(self._id)

    def _seal_with(self, lease: Lease, size: int | None) -> CommitResult:
        progress = self._store.manifest.progress(self._id)
        seg, committed = progress.segment, progress.committed
        end = self._valid_end(lease, seg, committed, size, "seal")
        # A segment no bigger than a part, with nothing sent yet, goes as one atomic PUT.
        if not committed and seg.upload_id is None and end <= seg.part_size:
            return self._seal_single(lease, seg, end)
        return self._seal_multipart(lease, seg, end)

    def _seal_single(self, lease: Lease, seg: SegmentRecord, size: int) -> CommitResult:
        """Read once, record the seal with the checksums of those bytes, then drive: the same
        bytes are PUT, the object checked, uploaded and verified recorded together."""
        store = self._store
        with store.transport.slots:
            payload = read_range(self.path, 0, size)
        [commit] = store.manifest.seal(
            lease,
            [NewCommit(1, 0, size, payload.md5, payload.crc32c)],
            size=size,
            crc32c=payload.crc32c,
            expected_etag=payload.md5,
            upload_mode=UploadMode.PUT,
        )
        counters = Counters()
        result = store.driver.drive(
            lease, fresh={commit.id: payload}, counters=counters, release=True
        )
        del payload
        return self._sealed(result, counters, size)

    def _seal_multipart(self, lease: Lease, seg: SegmentRecord, size: int) -> CommitResult:
        """Two passes, so that the seal is durable before any remote call.

        The digest pass reads the final parts (in parallel on the part pool, within the slots)
        and keeps only their checksums; then the seal and every final part are recorded in one
        transaction. From there a crash, a kill or a failure nobody looks at leaves a sealed
        segment that the recovery job finishes (a seal recorded part by part as it is sent would
        leave an open segment, which only its writer may seal). Then the driver sends each final
        part (read again and checked), checks every earlier part's local bytes, completes and
        verifies.
        """
        store = self._store
        manifest = store.manifest
        commits = manifest.commits(seg.id)
        committed = commits[-1].end if commits else 0
        parts = self._new_parts(committed, size, seg.part_size, len(commits), final=True)
        final = store.transport.digest(self.path, parts)
        # The seal's intent: size, whole-file CRC32C and the multipart ETag to expect.
        all_commits = manifest.seal(
            lease,
            final,
            size=size,
            crc32c=combine_crcs(
                [(c.crc32c, c.size) for c in commits] + [(c.crc32c, c.end - c.start) for c in final]
            ),
            expected_etag=multipart_etag([c.md5 for c in commits] + [c.md5 for c in final]),
            upload_mode=UploadMode.MULTIPART,
        )
        counters = Counters()
        fresh: dict[int, Payload | None] = {
            c.id: None for c in all_commits if c.part_number > len(commits)
        }
        result = store.driver.drive(lease, fresh=fresh, counters=counters, release=True)
        return self._sealed(result, counters, size)

    def _sealed(self, result: DriveResult, counters: Counters, size: int) -> CommitResult:
        if result.state is SegmentState.FAILED:
            raise SegmentFailedError(f"segment {self.key!r} failed: {result.detail}")
        if not result.verified:
            raise VerificationError(
                f"segment {self.key!r} is sealed but not verified ({result.state.value}): "
                f"{result.detail}; `uploader recover` finishes it"
            )
        return CommitResult(
            key=self.key,
            sent_bytes=counters.bytes_sent,
            sent_parts=counters.parts_sent,
            committed=size,
            carried_bytes=0,
            sealed=True,
            verified=True,
            object_etag=result.object_etag,
        )


class Store:
    """A manifest and a remote root. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        manifest: Manifest,
        storage: Storage,
        config: StoreConfig | None = None,
        *,
        part_size: int | None = None,
        concurrency: int | None = None,
        verify: str | VerifyMode | None = None,
        node: str | None = None,
        worker: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        """``config`` holds the settings (:class:`~uploader.config.StoreConfig`); a keyword
        argument given here overrides its field of the same name."""
        cfg = resolve_config(
            config,
            part_size=part_size,
            concurrency=concurrency,
            verify=verify,
            node=node,
            worker=worker,
            lease_seconds=lease_seconds,
        )
        if cfg.part_size < storage.min_part_size or cfg.part_size > MAX_PART_SIZE:
            raise UsageError(
                f"part_size {cfg.part_size} is outside [{storage.min_part_size}, {MAX_PART_SIZE}] "
                f"for {storage.url}"
            )
        # Names resolved once: the config a store reports is the one it runs with.
        self.config = cfg.with_(node=cfg.node or default_node(), worker=cfg.worker or default_worker())
        self.manifest = manifest
        self.storage = storage
        self.transport = Transport(storage, concurrency=cfg.concurrency)
        self.keeper = LeaseKeeper(manifest, cfg.lease_seconds)
        self.driver = Driver(
            manifest, storage, self.transport, self.keeper, node=self.node, verify=cfg.verify
        )
        # Segment jobs wait on part futures: a pool of their own so they cannot starve the parts.
        self._jobs = ThreadPoolExecutor(
            max_workers=max(2, cfg.concurrency), thread_name_prefix="uploader-job"
        )
        self._pending: set[Future[Any]] = set()
        self._segments: dict[str, Segment] = {}
        self._state_lock = threading.Lock()
        self._closed = False

    # The settings, read from the one config (frozen: they do not change under running jobs).

    @property
    def part_size(self) -> int:
        return self.config.part_size

    @property
    def concurrency(self) -> int:
        return self.config.concurrency

    @property
    def lease_seconds(self) -> float:
        return self.config.lease_seconds

    @property
    def verify_mode(self) -> VerifyMode:
        return self.config.verify

    @property
    def node(self) -> str:
        assert self.config.node is not None  # resolved in __init__
        return self.config.node

    @property
    def worker(self) -> str:
        assert self.config.worker is not None  # resolved in __init__
        return self.config.worker

    @property
    def on_bytes(self) -> Callable[[str, int], None] | None:
        """Progress hook: ``fn(key, nbytes)`` each time the remote acknowledges a part or an
        object of this store's work (commits, seals, recovery), or parts already at the remote
        are adopted; called from part threads, as it happens. Must be quick and thread-safe."""
        return self.driver.on_bytes

    @on_bytes.setter
    def on_bytes(self, fn: Callable[[str, int], None] | None) -> None:
        self.driver.on_bytes = fn

    @property
    def crew(self) -> recovery.Crew:
        """What the recovery job works with: this store's manifest, driver and leases."""
        return recovery.Crew(
            manifest=self.manifest,
            storage=self.storage,
            driver=self.driver,
            keeper=self.keeper,
            worker=self.worker,
            node=self.node,
            lease_seconds=self.lease_seconds,
            concurrency=self.concurrency,
        )

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
        self.transport.shutdown()
        self.keeper.stop(release=True)
        self.storage.close()
        self.manifest.close()

    def abandon(self) -> None:
        """Stop without finishing or releasing anything, as a crash would (for tests and demos)."""
        with self._state_lock:
            self._closed = True
        self.keeper.stop(release=False)
        self._jobs.shutdown(wait=True, cancel_futures=True)
        self.transport.shutdown()
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
        self.storage.check_key(key)
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
                raise KeyConflictError(
                    f"segment key {key!r} is open for {existing.path!r}, not {apath!r}"
                )
            # Never handed out without a live lease: taken again if it was lost and is free
            # (SegmentBusyError while another process holds it: ask again later).
            existing._ensure_lease()
            return existing
        record, lease = self.manifest.register_leased(
            key,
            apath,
            node=self.node,
            part_size=self.part_size,
            worker=self.worker,
            lease_ttl=self.lease_seconds,
            identity=file_identity(apath),
        )
        if lease is None and record.state is SegmentState.OPEN:
            # A dead predecessor's lease on this node is taken at once (see uploader.holders).
            lease = self.manifest.acquire(key, self.worker, self.lease_seconds, node=self.node)
        seg = Segment(self, record, lease)
        with self._state_lock:
            self._segments[key] = seg
        if lease is not None:
            self.keeper.hold(lease)
        return seg

    def _submit_job(self, run: Callable[[], None], fut: Future[Any]) -> None:
        with self._state_lock:
            if self._closed:
                raise StoreClosedError(
                    "the store is closed; open a new one with uploader.open(...)"
                )
            self._pending.add(fut)
            fut.add_done_callback(self._pending.discard)
            self._jobs.submit(run)

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
        out = []
        for rec in self.manifest.deletable():
            problem = self._changed_since_verified(rec) if rec.node == self.node else None
            if problem is not None:
                log.error("segment %r is verified but not deletable: %s", rec.key, problem)
                continue
            # The object itself, at the time of the question (one HEAD): a verified object
            # that vanished or changed since is drift, recorded, and the file is not offered.
            remote = self.driver.check_object(rec, deep=False)
            if remote is not None:
                log.error("segment %r is not deletable: %s", rec.key, remote)
                verify_mod.drift(self.crew, rec, remote, repair=False)
                continue
            out.append(rec)
        return out

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

    @staticmethod
    def _changed_since_verified(rec: SegmentRecord) -> str | None:
        try:
            st = os.stat(rec.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"cannot stat {rec.path}: {exc.strerror or exc}"
        if rec.file_inode is not None and (st.st_dev, st.st_ino) != (
            rec.file_device,
            rec.file_inode,
        ):
            return f"{rec.path} was replaced by another file after it was verified"
        if rec.size is not None and st.st_size != rec.size:
            return (
                f"{rec.path} has {st.st_size} bytes, the verified object {rec.size}: it was "
                "written after it was sealed (a file written in place needs --format or "
                "commit(upto=...))"
            )
        verified_at = rec.verified_at
        if verified_at is not None:
            modified = datetime.fromtimestamp(st.st_mtime, UTC).replace(tzinfo=None)
            if modified > verified_at:
                return (
                    f"{rec.path} was modified at {modified:%Y-%m-%d %H:%M:%S.%f} UTC, after it "
                    f"was verified ({verified_at:%Y-%m-%d %H:%M:%S.%f} UTC): the remote copy "
                    "does not have those bytes"
                )
        return None

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
        seg = self.manifest.segment(key)
        if seg is None:
            raise UsageError(f"segment {key!r} is not in the manifest {self.manifest.url}")
        if seg.state is not SegmentState.VERIFIED and not allow_unverified:
            raise UnverifiedObjectError(
                f"segment {key!r} is {seg.state.value}, not verified: its object is not known to "
                "hold the segment's bytes; reading it is refused (allow_unverified=True, "
                "`uploader get --allow-unverified`, reads it anyway)"
            )
        info = self.storage.head(key)
        if info is None:
            raise VerificationError(
                f"segment {key!r} ({seg.state.value}): no object at the key under {self.storage.url}"
            )
        if seg.size is not None and info.size != seg.size:
            raise VerificationError(
                f"segment {key!r}: the object has {info.size} bytes, the manifest records "
                f"{seg.size}; it is not the object that was verified"
            )
        commits = [] if seg.state is SegmentState.UNKNOWN else self.manifest.commits(seg.id)
        return info.size, readback.windows(info.size, seg.part_size, commits)

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
    ) -> recovery.RecoveryReport:
        """Finish every interrupted segment this worker can act on; see :mod:`uploader.recovery`.

        ``on_segment`` is called with each segment's outcome as it is known (progress).
        """
        self._check_open()
        return recovery.recover(
            self.crew, limit=limit, max_reuploads=max_reuploads, stop=stop, on_segment=on_segment
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

    def stop_sending(self) -> None:
        """No new part starts from now on (parts in flight finish and are recorded). Takes no
        lock of the store: safe to call from a signal handler."""
        self.transport.stop.set()

    def interrupt(self) -> None:
        """Stop taking new work (SIGINT): jobs not started are cancelled, no new part starts,
        parts in flight finish and are recorded. What is left stays recorded for recovery."""
        self.stop_sending()
        with self._state_lock:
            pending = list(self._pending)
        for fut in pending:
            fut.cancel()

    def sweep(
        self,
        *,
        dry_run: bool = False,
        older_than: float = recovery.DEFAULT_SWEEP_AGE,
    ) -> recovery.SweepReport:
        """Abort multipart uploads and staged parts no live manifest row references."""
        self._check_open()
        return recovery.sweep(self.crew, dry_run=dry_run, older_than=older_than)


def open(
    manifest: str,
    remote: str,
    *,
    storage_options: dict[str, Any] | None = None,
    config: StoreConfig | None = None,
    part_size: int | None = None,
    concurrency: int | None = None,
    verify: str | VerifyMode | None = None,
    node: str | None = None,
    worker: str | None = None,
    lease_seconds: float | None = None,
    storage: Storage | None = None,
    min_part_size: int | None = None,
) -> Store:
    """Open a store: a manifest (SQLAlchemy URL) and a remote root (fsspec URL).

    The settings are ``config`` (:class:`~uploader.config.StoreConfig`, defaults if None) with
    any keyword argument given here in place of its field: part size, concurrency, verify mode,
    node and worker names, lease length. They are checked before the manifest is opened.
    ``storage`` replaces the backend built from ``remote`` (e.g. a fault-injecting wrapper);
    ``min_part_size`` lowers S3's 5 MiB part minimum for test servers.
    """
    cfg = resolve_config(
        config,
        part_size=part_size,
        concurrency=concurrency,
        verify=verify,
        node=node,
        worker=worker,
        lease_seconds=lease_seconds,
        min_part_size=min_part_size,
    )
    m = Manifest.open(manifest)
    try:
        st = (
            storage
            if storage is not None
            else open_storage(
                remote, storage_options, min_part_size=cfg.min_part_size, retry=cfg.retry
            )
        )
        return Store(m, st, cfg)
    except BaseException:
        m.close()
        raise
