"""Moving one segment's bytes: the data path shared by the writer API and the recovery job.

The order of every step is what makes a crash at any instruction recoverable:

1. the part's range and the checksums of its local bytes are recorded as ``pending``
   (by the caller, before this module sends anything);
2. the bytes are read again and checked against those checksums, then sent;
3. only the ETag the remote acknowledged, equal to the recorded MD5, moves the row to ``uploaded``;
4. the object is completed from the recorded ETags in part order; then ``sealed -> uploaded``;
5. the object's size and ETag (or, deep, its bytes) are compared with the recorded checksums;
   then ``uploaded -> verified``.

A failed send leaves the row ``pending`` with its attempts and last error, so nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

from uploader.digest import (
    Payload,
    checksum,
    combine_crcs,
    crc32c_of,
    normalize_etag,
    read_bytes,
    read_range,
)
from uploader.errors import LocalFileError, UploaderError, VerificationError
from uploader.manifest.repo import Manifest
from uploader.records import CommitRecord, Lease, NewCommit, SegmentRecord
from uploader.states import CommitState
from uploader.storage.base import Expected, ObjectInfo, PartRef, Storage

log = logging.getLogger("uploader")

VERIFY_MODES = ("etag", "deep")

T = TypeVar("T")


def read_checked(path: str, commit: CommitRecord, key: str) -> Payload:
    """Read a recorded part again; LocalFileError if its bytes changed or vanished.

    Only the CRC32C is recomputed (hardware, ~15 GB/s, against ~0.7 GB/s for MD5): the recorded
    MD5 goes out as ``Content-MD5`` and must come back as the part's ETag, so the remote checks
    the MD5 of the bytes it actually received, and a change that slipped past the CRC would still
    keep the part from becoming ``uploaded``.
    """
    data = read_bytes(path, commit.start, commit.end)
    crc = crc32c_of(data)
    if crc != commit.crc32c:
        raise LocalFileError(
            f"{path}: bytes [{commit.start}, {commit.end}) of segment {key!r} (part "
            f"{commit.part_number}) changed since they were committed (crc32c {commit.crc32c} "
            f"recorded, {crc} now); the local file must not be rewritten before it is verified"
        )
    return Payload(
        path=path, start=commit.start, end=commit.end, data=data, md5=commit.md5, crc32c=crc
    )


@dataclass
class Counters:
    """What a piece of work sent; summed into results and reports (updated from part threads)."""

    bytes_sent: int = 0
    parts_sent: int = 0
    bytes_reused: int = 0
    parts_reused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def sent(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_sent += nbytes
            self.parts_sent += 1

    def reused(self, nbytes: int) -> None:
        with self.lock:
            self.bytes_reused += nbytes
            self.parts_reused += 1


class Shipper:
    """Sends recorded parts, completes and verifies objects, on a bounded pool.

    ``slots`` bounds the parts held in memory at once across every segment of a store: peak
    memory stays near ``concurrency x part_size`` whatever the segment sizes.
    """

    def __init__(
        self,
        manifest: Manifest,
        storage: Storage,
        *,
        concurrency: int,
        verify: str = "etag",
    ) -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, not {verify!r}")
        self.manifest = manifest
        self.storage = storage
        self.verify_mode = verify
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="uploader-part")
        self.slots = threading.BoundedSemaphore(concurrency)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    # --- parts ------------------------------------------------------------------------------------

    def ensure_upload(self, lease: Lease, seg: SegmentRecord) -> str:
        """The segment's multipart upload id, started and recorded if there is none yet."""
        if seg.upload_id is not None:
            return seg.upload_id
        upload_id = self.storage.start_upload(seg.key)
        # Started before it is recorded: a crash in between leaves an unreferenced upload, which
        # the sweep aborts (invariant 9); recording first would need an id we do not have yet.
        self.manifest.set_upload(lease, upload_id, "multipart")
        return upload_id

    def submit_part(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commit: CommitRecord,
        counters: Counters,
        payload: Payload | None = None,
    ) -> Future[None]:
        """Send one ``pending`` part on the pool. The caller holds a slot; it is released here.

        Without ``payload`` the bytes are read again and checked against the recorded checksums.
        """
        return self.pool.submit(self._send_one, lease, seg, upload_id, commit, counters, payload)

    def _send_one(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commit: CommitRecord,
        counters: Counters,
        payload: Payload | None,
    ) -> None:
        try:
            if payload is None:
                payload = read_checked(seg.path, commit, seg.key)
            try:
                ref = self.storage.upload_part(seg.key, upload_id, commit.part_number, payload)
            except UploaderError as exc:
                self.manifest.commit_attempt_failed(lease, commit, str(exc))
                raise
            payload = None  # let the part's bytes go before the manifest round trip
            self.manifest.commit_uploaded(lease, commit, normalize_etag(ref.etag) or "")
            counters.sent(commit.size)
        finally:
            self.slots.release()

    @staticmethod
    def wait(futures: Sequence[Future[None]]) -> None:
        """Wait for every part; then raise the first failure, if any."""
        errors = [f.exception() for f in futures]
        for err in errors:
            if err is not None:
                raise err

    def _in_slot(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """Take a slot, then run ``task`` on the pool; the task releases the slot when done
        (the slot is given back here only if the submission itself fails)."""
        self.slots.acquire()
        try:
            return self.pool.submit(task, *args)
        except BaseException:
            self.slots.release()
            raise

    def digest(self, path: str, parts: Sequence[tuple[int, int, int]]) -> list[NewCommit]:
        """The digest pass: MD5 and CRC32C of each ``(number, start, end)`` part of ``path``.

        Parts are read and hashed in parallel on the pool (hashing releases the GIL), each
        within a slot, and their bytes dropped at once: only the checksums are kept.
        """
        futures: list[Future[NewCommit]] = []
        try:
            for number, start, end in parts:
                futures.append(self._in_slot(self._digest_one, path, number, start, end))
        finally:
            wait(futures)
        return [f.result() for f in futures]

    def _digest_one(self, path: str, number: int, start: int, end: int) -> NewCommit:
        try:
            payload = read_range(path, start, end)
            return NewCommit(number, start, end, payload.md5, payload.crc32c)
        finally:
            self.slots.release()

    def submit_pending(
        self,
        lease: Lease,
        seg: SegmentRecord,
        upload_id: str,
        commits: Sequence[CommitRecord],
        counters: Counters,
        futures: list[Future[None]],
    ) -> None:
        """Submit every ``pending`` commit of ``commits`` (re-read and checked), each within a
        slot; their futures are appended to ``futures`` as they go (for the caller to wait on,
        even if a later submission raises)."""
        for commit in commits:
            if commit.state is CommitState.PENDING:
                futures.append(
                    self._in_slot(self._send_one, lease, seg, upload_id, commit, counters, None)
                )

    def send_parts(
        self, lease: Lease, seg: SegmentRecord, upload_id: str, commits: Sequence[CommitRecord]
    ) -> Counters:
        """Send every ``pending`` commit of ``commits`` in parallel; raise the first failure."""
        counters = Counters()
        futures: list[Future[None]] = []
        try:
            self.submit_pending(lease, seg, upload_id, commits, counters, futures)
        finally:
            self.wait(futures)
        return counters

    # --- complete and verify ----------------------------------------------------------------------

    @staticmethod
    def expected(seg: SegmentRecord) -> Expected:
        assert seg.size is not None and seg.expected_etag is not None
        return Expected(size=seg.size, etag=seg.expected_etag)

    def complete(
        self, lease: Lease, seg: SegmentRecord, commits: Sequence[CommitRecord]
    ) -> ObjectInfo:
        """Publish the object from the recorded parts; ``sealed -> uploaded``."""
        assert seg.upload_id is not None
        parts = [PartRef(number=c.part_number, etag=c.etag or "", size=c.size) for c in commits]
        info = self.storage.complete(seg.key, seg.upload_id, parts, self.expected(seg))
        self.manifest.segment_uploaded(lease, normalize_etag(info.etag))
        return info

    def put(
        self,
        lease: Lease,
        seg: SegmentRecord,
        commit: CommitRecord,
        payload: Payload | None = None,
        *,
        record: bool = True,
    ) -> str:
        """A segment smaller than a part: one atomic PUT. Returns the ETag the remote gave.

        With ``record`` the part and the segment become uploaded here; without it the caller
        records that with the verification (:meth:`verify_put`). Without ``payload`` the bytes
        are read again (and checked) within a slot; with it the caller holds the slot.
        """
        acquired = payload is None
        if acquired:
            self.slots.acquire()
        try:
            if payload is None:
                payload = read_checked(seg.path, commit, seg.key)
            try:
                info = self.storage.put(seg.key, payload)
            except UploaderError as exc:
                self.manifest.commit_attempt_failed(lease, commit, str(exc))
                raise
        finally:
            if acquired:
                self.slots.release()
        etag = normalize_etag(info.etag) or commit.md5
        if record:
            self.manifest.put_done(lease, commit, etag)
        return etag

    def check_object(
        self, seg: SegmentRecord, commits: Sequence[CommitRecord], deep: bool
    ) -> str | None:
        """None if the remote object matches the recorded checksums, else what differs."""
        info = self.storage.head(seg.key)
        if info is None:
            return f"no object at {seg.key!r}"
        if info.size != seg.size:
            return f"object {seg.key!r} has {info.size} bytes, expected {seg.size}"
        etag = normalize_etag(info.etag)
        if etag is not None and etag != seg.expected_etag:
            return f"object {seg.key!r} has ETag {etag}, expected {seg.expected_etag}"
        if not deep and etag is not None:
            return None
        # Deep (or a backend that cannot tell the ETag): read it back part by part.
        crcs: list[tuple[int, int]] = []
        for c in commits:
            data = self.storage.read(seg.key, c.start, c.end)
            payload_md5, payload_crc = checksum(data)
            if payload_md5 != c.md5:
                return f"object {seg.key!r} bytes [{c.start}, {c.end}) differ from part {c.part_number}"
            crcs.append((payload_crc, len(data)))
        if combine_crcs(crcs) != seg.crc32c:
            return f"object {seg.key!r} CRC32C differs from the sealed file's"
        return None

    def verify_put(
        self,
        lease: Lease,
        seg: SegmentRecord,
        commit: CommitRecord,
        etag: str,
        *,
        release: bool = False,
    ) -> None:
        """After a PUT nobody recorded yet: check the object, then record ``uploaded`` and
        ``verified`` in one transaction. If the check fails, what the PUT's response said is
        still recorded (``uploaded``) before VerificationError is raised."""
        deep = self.verify_mode == "deep"
        try:
            problem = self.check_object(seg, [commit], deep)
        except UploaderError as exc:
            # The check could not be made (HEAD failed): what the PUT said is still a fact.
            self._put_unverified(lease, commit, etag, f"verify: {exc}")
            raise
        if problem is not None:
            self._put_unverified(lease, commit, etag, problem)
            raise VerificationError(problem)
        self.manifest.put_verified(lease, commit, etag, self._verified_detail(seg), release=release)

    def _put_unverified(self, lease: Lease, commit: CommitRecord, etag: str, error: str) -> None:
        """Record the acknowledged PUT (``uploaded``) and why it is not verified; recovery then
        verifies it again. A lost lease here is the new holder's business."""
        try:
            self.manifest.put_done(lease, commit, etag)
            self.manifest.record_error(lease, error)
        except UploaderError as exc:
            log.warning("could not record the PUT of %r: %s", lease.key, exc)

    def _verified_detail(self, seg: SegmentRecord) -> str:
        how = "deep: bytes read back" if self.verify_mode == "deep" else "size and multipart ETag"
        return f"verified ({how}): {seg.size} bytes, etag {seg.expected_etag}"

    def verify(
        self,
        lease: Lease,
        seg: SegmentRecord,
        commits: Sequence[CommitRecord],
        *,
        release: bool = False,
    ) -> None:
        """``uploaded -> verified`` if the object matches; VerificationError otherwise."""
        deep = self.verify_mode == "deep"
        problem = self.check_object(seg, commits, deep)
        if problem is not None:
            self.manifest.record_error(lease, problem)
            raise VerificationError(problem)
        self.manifest.segment_verified(lease, self._verified_detail(seg), release=release)
