"""One segment of a store: ``commit()`` and ``seal()`` jobs, in order, under the segment's lease.

Jobs of one segment start in the order they were asked for (a commit once the previous job has
recorded its parts, a seal once every earlier job is done). Each records its parts ``pending``
with their checksums before it sends them, so whatever happens to the future the recovery job
finishes what was recorded. A lease lost meanwhile is taken again when it is free (a new fence;
:mod:`uploader.segment_lease`, the base of :class:`Segment` with its ``record``, ``state`` and
``lease``). A commit that adds no whole part answers from what this writer recorded under the
same live lease, without a manifest read (:class:`_Known`). The seal itself is
:mod:`uploader.seal`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from uploader.acks import AckBook
from uploader.digest import digest_range, file_size, stat_file
from uploader.errors import (
    LeaseLostError,
    LocalFileError,
    SegmentFailedError,
    SegmentSealedError,
    UsageError,
)
from uploader.futures import CommitResult, UploadFuture
from uploader.records import Lease, NewCommit, SegmentRecord
from uploader.seal import new_parts, seal_multipart, seal_single
from uploader.segment_lease import SegmentLease
from uploader.states import SegmentState
from uploader.transport import Counters, wait_all

if TYPE_CHECKING:
    from uploader.store import Store

log = logging.getLogger("uploader")


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


class Segment(SegmentLease):
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
        self._sealing = True  # commits asked after this read the manifest (and are refused there)
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
        known = self._known_now(asked_now=True) if what == "commit" else None
        if known is not None:
            seg, committed = known.segment, known.committed
        else:
            progress = self._store.manifest.progress(self._id)
            seg, committed = progress.segment, progress.committed
        if seg.state is not SegmentState.OPEN:
            raise self._not_open(seg, what)
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

    def _known_now(self, *, asked_now: bool = False) -> _Known | None:
        """What the last commit recorded, if it still holds: the same live lease, no failed send
        since, and for a commit being asked now (``asked_now``), no seal asked before it.

        A commit job asked before the seal may still use it: the seal job starts only after
        every earlier job is done, and forgets it first (:meth:`_do_seal`). A broker that does
        not await its commits seals while most of them are queued; they must not each read the
        manifest (they did: one read per append)."""
        known = self._known
        if known is None or (asked_now and self._sealing):
            return None
        lease = self._store.keeper.get(self._id)
        if lease is None or lease.fence != known.fence:
            return None
        return known

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

    def _not_open(self, seg: SegmentRecord, what: str) -> SegmentSealedError | SegmentFailedError:
        if seg.state is SegmentState.FAILED:
            return SegmentFailedError(f"segment {self.key!r} failed: {seg.reason}")
        return SegmentSealedError(
            f"segment {self.key!r} is already {seg.state.value}; {what} after seal is refused "
            "(append to a new segment; `uploader recover` finishes a seal that did not)"
        )

    def _do_commit(self, recorded: threading.Event, upto: int | None) -> CommitResult:
        try:
            return self._with_lease(lambda lease: self._commit_with(lease, recorded, upto))
        except LeaseLostError:
            if self._sealing:  # asked after this writer's seal, which gave the lease back
                seg = self._store.manifest.segment_by_id(self._id)
                if seg.state is not SegmentState.OPEN:
                    raise self._not_open(seg, "commit") from None
            raise

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
        new = new_parts(self.key, committed, end, seg.part_size, progress.parts, final=False)
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
            # that fails from now on clears it again (_record_and_send).
            # Never back: a job that finishes after a later one (its sends were slower) must
            # not put back an older committed end (an end below it would then be accepted).
            old = self._known
            if (
                seg.state is SegmentState.OPEN
                and self._failed_sends == failed_sends
                and (old is None or old.fence != lease.fence or old.committed <= committed)
            ):
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

        Pipelined: part N+1 is read and recorded while part N is in flight; a part takes one of
        the store's slots only to be sent (the digest pass keeps no bytes), so a slot freed goes
        to a part already recorded. What the remote acknowledged is written in chunks between
        submissions and the rest once this job's parts are all done (:mod:`uploader.acks`); the
        job's parts count as in flight until then (a concurrent commit must not drive them as
        failed sends). Returns the end of the recorded bytes.
        """
        store = self._store
        transport = store.transport
        futures: list[Future[None]] = []
        ids: list[int] = []
        book = AckBook(lambda acks: store.driver.record_acks(lease, acks, upload_id))
        committed = parts[0][1]
        done = False
        try:
            for number, start, end in parts:
                payload = digest_range(self.path, start, end, md5=not seg.by_crc32c)
                [commit] = store.manifest.add_commits(
                    lease, [NewCommit(number, start, end, payload.md5, payload.crc32c)]
                )
                committed = end
                ids.append(commit.id)
                with self._lock:
                    self._inflight.add(commit.id)
                book.write_due()  # holding no slot: about to wait for one
                transport.take_slot()  # none once the store is interrupted
                futures.append(
                    transport.submit_held(
                        store.driver.send_acked,
                        lease,
                        seg,
                        upload_id,
                        commit,
                        payload,
                        counters,
                        book,
                    )
                )
                del payload
            done = True
        finally:
            recorded.set()  # the next commit may start recording while these are in flight
            try:
                wait(futures)
                book.write_rest()
            except Exception as exc:
                if done:
                    raise
                # The loop's own error is the one raised; the parts stay pending (driven later).
                log.warning("segment %r: acknowledged parts not written: %s", self.key, exc)
            finally:
                with self._lock:
                    self._inflight.difference_update(ids)
                    # Cut short, or a part without its acknowledgement written (a part recorded
                    # by a transaction whose answer was lost is not even in ``ids``): the next
                    # commit reads the manifest and drives what is pending.
                    written = book.written
                    if not done or any(i not in written for i in ids):
                        self._failed_sends += 1
                        self._known = None
        wait_all(futures)
        return committed

    def _do_seal(self, size: int | None) -> CommitResult:
        with self._lock:
            self._known = None  # from here on the manifest says where the segment stands
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
            return seal_single(self._store, self.key, self.path, lease, seg, end)
        return seal_multipart(self._store, self.key, self.path, lease, seg, end)
