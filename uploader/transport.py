"""The transport: moving one segment's bytes, and nothing else.

It reads local bytes (checking them against the checksums recorded for them), sends parts and
objects on a bounded pool, and returns what the remote said. It never writes the manifest and
never decides what to do next: that is :mod:`uploader.driver`'s one job.

``slots`` bounds the parts in flight at once across every segment of a store. On S3 none of them
is held whole: the digest pass and the send read the file a few hundred KiB at a time
(:mod:`uploader.part_stream`); backends that write whole parts hold at most ``concurrency`` of
them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, TypeVar

import crc32c as _crc32c

from uploader.digest import Payload, digest_range, stat_file
from uploader.errors import LocalFileError, WorkInterruptedError
from uploader.records import CommitRecord, NewCommit, SegmentRecord
from uploader.storage.base import PartRef, Storage

T = TypeVar("T")

#: Read size of the whole-file check: big enough for sequential throughput, small in memory.
CHECK_CHUNK = 4 * 1024 * 1024


def recorded_payload(path: str, commit: CommitRecord) -> Payload:
    """A recorded part to send again, its bytes left in the file: they are read as they are sent
    and checked against the recorded CRC32C then (:mod:`uploader.part_stream`; LocalFileError if
    they changed or vanished, and the part is not recorded uploaded).

    Only the CRC32C is recomputed (hardware, ~15 GB/s, against ~0.7 GB/s for MD5): the recorded
    MD5 goes out as ``Content-MD5`` and must come back as the part's ETag, so the remote checks
    the MD5 of the bytes it actually received, and a change that slipped past the CRC would still
    keep the part from becoming ``uploaded``. In the crc32c mode (no MD5 recorded) the CRC32C
    goes out instead and must be echoed.
    """
    return Payload(
        path=path,
        start=commit.start,
        end=commit.end,
        data=None,
        md5=commit.md5,
        crc32c=commit.crc32c,
    )


def file_identity(path: str) -> tuple[int, int]:
    """(device, inode) of a local file: a file replaced by another is changed bytes."""
    st = stat_file(path)
    return st.st_dev, st.st_ino


def check_local(seg: SegmentRecord, commits: Sequence[CommitRecord], skip: set[int]) -> None:
    """The whole-file check before ``verified``: the file is the one registered, it still holds
    the sealed size, and every part's bytes (but those in ``skip``, read and checked by this
    drive already) have the CRC32C recorded for them. Raises LocalFileError naming the first
    difference. Reads sequentially, a few MiB at a time, CRC32C only."""
    path = seg.path
    st = stat_file(path)
    if seg.file_inode is not None and (st.st_dev, st.st_ino) != (seg.file_device, seg.file_inode):
        raise LocalFileError(
            f"{path}: local file of segment {seg.key!r} was replaced by another file (inode "
            f"{seg.file_inode} registered, {st.st_ino} now); its bytes are not the ones committed"
        )
    size = seg.size if seg.size is not None else (commits[-1].end if commits else 0)
    if st.st_size < size:
        raise LocalFileError(
            f"{path}: local file of segment {seg.key!r} has {st.st_size} bytes, fewer than the "
            f"{size} committed; it was truncated"
        )
    todo = [c for c in commits if c.part_number not in skip]
    if not todo:
        return
    try:
        with open(path, "rb") as f:
            for c in todo:
                f.seek(c.start)
                crc = 0
                left = c.end - c.start
                while left:
                    block = f.read(min(CHECK_CHUNK, left))
                    if not block:
                        raise LocalFileError(
                            f"{path}: local file of segment {seg.key!r} ends inside part "
                            f"{c.part_number} [{c.start}, {c.end}); it was truncated"
                        )
                    crc = int(_crc32c.crc32c(block, crc))
                    left -= len(block)
                if crc != c.crc32c:
                    raise LocalFileError(
                        f"{path}: bytes [{c.start}, {c.end}) of segment {seg.key!r} (part "
                        f"{c.part_number}) changed after they were committed (crc32c "
                        f"{c.crc32c} recorded, {crc} now); the remote copy would differ from "
                        "the local file"
                    )
    except FileNotFoundError:
        raise LocalFileError(f"{path}: local file of segment {seg.key!r} is missing") from None
    except LocalFileError:
        raise
    except OSError as exc:
        raise LocalFileError(
            f"{path}: cannot read local file: {exc.strerror or exc}", retryable=True
        ) from None


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

    def add(self, other: Counters) -> None:
        with self.lock:
            self.bytes_sent += other.bytes_sent
            self.parts_sent += other.parts_sent
            self.bytes_reused += other.bytes_reused
            self.parts_reused += other.parts_reused


class Transport:
    """Sends parts and objects on a bounded pool; returns what the remote said."""

    def __init__(self, storage: Storage, *, concurrency: int) -> None:
        self.storage = storage
        self.pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="uploader-part")
        self.slots = threading.BoundedSemaphore(concurrency)
        #: Set by :meth:`Store.interrupt`: no new part starts; those in flight finish.
        self.stop = threading.Event()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    def in_slot(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """Take a slot, then run ``task`` on the pool; the slot is given back when it is done.

        Once :attr:`stop` is set no new task starts (:class:`WorkInterruptedError`); the caller
        waits for those already running, which record what the remote said."""
        self.take_slot()
        return self.submit_held(task, *args)

    def take_slot(self) -> None:
        """Take a slot for a part about to be sent (:class:`WorkInterruptedError` once
        :attr:`stop` is set); the caller hands it to :meth:`submit_held`."""
        self._check_stop()
        self.slots.acquire()
        if self.stop.is_set():
            self.slots.release()
            self._check_stop()

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise WorkInterruptedError("interrupted: no new part is started")

    def submit_held(self, task: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``task`` on the pool for a caller that already holds a slot (released when done,
        or here if the submission itself fails)."""

        def run() -> T:
            try:
                return task(*args)
            finally:
                self.slots.release()

        try:
            return self.pool.submit(run)
        except BaseException:
            self.slots.release()
            raise

    def digest(
        self, path: str, parts: Sequence[tuple[int, int, int]], *, md5: bool = True
    ) -> list[NewCommit]:
        """The digest pass: CRC32C (and MD5 unless ``md5`` is False: the crc32c checksum mode)
        of each ``(number, start, end)`` part of ``path``.

        Parts are read and hashed in parallel on the pool (hashing releases the GIL), each
        within a slot, a few hundred KiB at a time: only the checksums are kept.
        """
        futures: list[Future[NewCommit]] = []
        try:
            for number, start, end in parts:
                futures.append(self.in_slot(_digest_one, path, number, start, end, md5))
        finally:
            wait(futures)
        return [f.result() for f in futures]

    def send_part(
        self, seg: SegmentRecord, upload_id: str, commit: CommitRecord, payload: Payload | None
    ) -> PartRef:
        """Send one part (read from the file as it is sent, and checked, when no ``payload`` is
        given)."""
        if payload is None:
            payload = recorded_payload(seg.path, commit)
        return self.storage.upload_part(seg.key, upload_id, commit.part_number, payload)


def _digest_one(path: str, number: int, start: int, end: int, md5: bool) -> NewCommit:
    payload = digest_range(path, start, end, md5=md5)
    return NewCommit(number, start, end, payload.md5, payload.crc32c)


def wait_all(futures: Sequence[Future[Any]]) -> None:
    """Wait for every future; then raise the first failure, if any."""
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
