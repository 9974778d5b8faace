"""Restore: write verified objects back to local files, checked, resumable and atomic.

Each verified segment under the prefix goes to ``DIR/<key>``. A file already there with the
segment's size and whole-file CRC32C is skipped (a second run after an interruption redoes only
what is missing). Otherwise the object is streamed through :meth:`Store.open_read` (every part
checked against the manifest) into ``DIR/<dirs>/.<name>.uploader-part``, its whole CRC32C compared
with the manifest's, fsynced, renamed over the final name and the directory fsynced: a file at the
final name is always whole. A kill leaves at most the temporary file, which the next run rewrites.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

import crc32c as _crc32c

from uploader.errors import UploaderError, VerificationError
from uploader.records import SegmentRecord
from uploader.states import SegmentState
from uploader.storage.staged import fsync_dir as _fsync_dir

if TYPE_CHECKING:
    from uploader.store import Store

CHUNK = 4 * 1024 * 1024
RESTORED, SKIPPED, FAILED = "restored", "skipped", "failed"


@dataclass(frozen=True, slots=True)
class RestoredFile:
    key: str
    path: str
    outcome: str
    size: int
    detail: str = ""


@dataclass
class RestoreReport:
    files: list[RestoredFile] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for f in self.files if f.outcome == outcome)

    @property
    def ok(self) -> bool:
        return self.count(FAILED) == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "restored": self.count(RESTORED),
            "skipped": self.count(SKIPPED),
            "failed": self.count(FAILED),
            "files": [
                {
                    "key": f.key,
                    "path": f.path,
                    "outcome": f.outcome,
                    "bytes": f.size,
                    "detail": f.detail,
                }
                for f in self.files
            ],
        }


def file_crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            crc = int(_crc32c.crc32c(block, crc))
    return crc


def copy_checked(store: Store, seg: SegmentRecord, out: BinaryIO) -> int:
    """Stream ``seg``'s object into ``out``; return its CRC32C (compared by the caller)."""
    crc = 0
    with store.open_read(seg.key) as src:
        while block := src.read(CHUNK):
            out.write(block)
            crc = int(_crc32c.crc32c(block, crc))
    return crc


def restore_one(store: Store, seg: SegmentRecord, directory: str) -> RestoredFile:
    dest = os.path.join(directory, *seg.key.split("/"))
    size = seg.size or 0
    if os.path.isfile(dest) and os.path.getsize(dest) == size and file_crc(dest) == seg.crc32c:
        return RestoredFile(seg.key, dest, SKIPPED, size, "present with the right size and CRC32C")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.uploader-part")
    try:
        with open(tmp, "wb") as out:
            crc = copy_checked(store, seg, out)
            out.flush()
            os.fsync(out.fileno())
        if crc != seg.crc32c:
            raise VerificationError(
                f"object {seg.key!r}: whole-file crc32c {crc:08x} read, {seg.crc32c:08x} recorded"
            )
        os.replace(tmp, dest)
        _fsync_dir(parent)
    except (UploaderError, OSError) as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        return RestoredFile(seg.key, dest, FAILED, size, str(exc))
    return RestoredFile(seg.key, dest, RESTORED, size)


def restore(
    store: Store,
    directory: str,
    *,
    prefix: str = "",
    concurrency: int = 4,
    on_file: Callable[[RestoredFile], None] | None = None,
) -> RestoreReport:
    """Restore every verified segment whose key starts with ``prefix`` under ``directory``."""
    segs = [s for s in store.manifest.segments([SegmentState.VERIFIED]) if s.key.startswith(prefix)]
    report = RestoreReport()

    def one(seg: SegmentRecord) -> RestoredFile:
        done = restore_one(store, seg, directory)
        if on_file is not None:
            on_file(done)
        return done

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        report.files.extend(pool.map(one, segs))
    return report
