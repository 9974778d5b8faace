"""Reading objects back, every whole part checked against the manifest as it passes.

:class:`ObjectReader` is the seekable binary file ``store.open_read(key)`` returns. It streams the
object in windows that are exactly the segment's recorded parts: each window is fetched with one
ranged GET and its CRC32C compared with the part's recorded CRC32C before a single byte of it is
handed out; a difference raises :class:`~uploader.errors.CorruptObjectError` naming the key, the
part and its byte range. At most one window is held in memory.

:func:`read_range` serves ``store.read(key, start, end)``: only the asked bytes are fetched, so a
part is checked only if the range covers it completely; :class:`RangeRead` says which bytes could
not be checked. (Bytes of an object with no recorded parts, read with ``allow_unverified``, are
all unchecked.)

:func:`readable` is the manifest's consent first: a segment that is not ``verified`` is refused
unless ``allow_unverified``, and the object at the key must have the recorded size.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from uploader.digest import checksum, crc32c_of
from uploader.errors import (
    CorruptObjectError,
    ObjectChangedError,
    UnverifiedObjectError,
    UsageError,
    VerificationError,
)
from uploader.records import CommitRecord
from uploader.states import SegmentState
from uploader.storage.base import ObjectInfo, Storage

if TYPE_CHECKING:
    from uploader.manifest.repo import Manifest


@dataclass(frozen=True, slots=True)
class Window:
    start: int
    end: int
    part: int | None  # part number whose recorded CRC32C checks it; None: nothing to check with
    crc32c: int | None


@dataclass(frozen=True, slots=True)
class RangeRead:
    """The bytes ``[start, end)`` of ``key`` and the sub-ranges no recorded part could check."""

    key: str
    start: int
    end: int
    data: bytes
    unchecked: tuple[tuple[int, int], ...]
    checked_parts: tuple[int, ...]

    @property
    def fully_checked(self) -> bool:
        return not self.unchecked


def windows(size: int, part_size: int, commits: Sequence[CommitRecord]) -> list[Window]:
    """Windows covering ``[0, size)``: the recorded parts, and part-sized unchecked windows where
    no part is recorded (an object read with ``allow_unverified``)."""
    out: list[Window] = []
    pos = 0
    step = max(1, part_size)

    def gap(upto: int) -> None:
        nonlocal pos
        while pos < upto:
            stop = min(pos + step, upto)
            out.append(Window(pos, stop, None, None))
            pos = stop

    for c in sorted(commits, key=lambda c: c.start):
        if c.start < pos or c.end > size or c.end <= c.start:
            continue
        gap(c.start)
        out.append(Window(c.start, c.end, c.part_number, c.crc32c))
        pos = c.end
    gap(size)
    return out


def _same_object(seen: ObjectInfo, now: ObjectInfo | None) -> bool:
    """Whether ``now`` describes the object ``seen`` did (a checksum only where both report
    one: ``seen`` may be a PUT's answer, which echoes it where a HEAD may not)."""
    if now is None or (now.size, now.etag) != (seen.size, seen.etag):
        return False
    return seen.checksum is None or now.checksum is None or seen.checksum == now.checksum


#: A recorded part to compare with the object's bytes: its range, its MD5 (None in the crc32c
#: mode: CRC32C only) and its CRC32C.
Recorded = tuple[int, int, str | None, int]


def first_differing(
    storage: Storage, key: str, parts: Sequence[Recorded], seen: ObjectInfo | None = None
) -> int | None:
    """Read the object at ``key`` back one recorded part at a time (at most one part in memory):
    the index of the first part whose bytes are not the recorded ones (length, MD5 where one is
    recorded, CRC32C), or None when every part is as recorded.

    ``seen`` is what the caller's HEAD said of the object, the one whose bytes it means to judge:
    the key is looked at again after the reads, and if the object there is not ``seen`` any more
    (another ETag, size or checksum) the reads may have spanned two objects and prove nothing of
    either (:class:`ObjectChangedError`, whatever they found). Where the remote reports neither
    an ETag nor a checksum, only the size can tell: a replacement of the same size goes unseen."""
    found: int | None = None
    for i, (start, end, md5, crc) in enumerate(parts):
        data = storage.read(key, start, end)
        if len(data) != end - start:
            found = i
        elif md5 is None:
            if crc32c_of(data) != crc:
                found = i
        elif checksum(data) != (md5, crc):
            found = i
        del data
        if found is not None:
            break
    if seen is not None:
        now = storage.head(key)
        if not _same_object(seen, now):
            after = "no object" if now is None else f"{now.size} bytes, etag {now.etag}"
            raise ObjectChangedError(
                f"object {key!r} changed while it was read back ({seen.size} bytes, etag "
                f"{seen.etag} before the reads; {after} after them): its bytes prove nothing, "
                "it is looked at again on the next attempt"
            )
    return found


def _check(key: str, w: Window, data: bytes) -> None:
    if len(data) != w.end - w.start:
        raise CorruptObjectError(
            key,
            w.part or 0,
            w.start,
            w.end,
            f"the remote returned {len(data)} bytes for this range of {w.end - w.start}",
        )
    if w.crc32c is None:
        return
    crc = crc32c_of(data)
    if crc != w.crc32c:
        raise CorruptObjectError(
            key, w.part or 0, w.start, w.end, f"crc32c {crc:08x} read, {w.crc32c:08x} recorded"
        )


class ObjectReader(io.RawIOBase):
    """A seekable, read-only binary file over one remote object (see the module's docstring)."""

    def __init__(self, storage: Storage, key: str, size: int, parts: list[Window]) -> None:
        super().__init__()
        self._storage = storage
        self.key = key
        self.size = size
        self._windows = parts
        self._starts = [w.start for w in parts]
        self._pos = 0
        self._held: tuple[Window, bytes] | None = None
        #: Bytes handed out that no recorded part could check (objects of unknown origin).
        self.unchecked_bytes = 0
        #: Part numbers fetched and found equal to the manifest.
        self.checked_parts: set[int] = set()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._checkClosed()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._checkClosed()
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise UsageError(f"object {self.key!r}: negative seek position {pos}")
        self._pos = pos
        return pos

    def _window(self, pos: int) -> tuple[Window, bytes]:
        if self._held is not None and self._held[0].start <= pos < self._held[0].end:
            return self._held
        self._held = None  # one window in memory at a time
        w = self._windows[bisect.bisect_right(self._starts, pos) - 1]
        data = self._storage.read(self.key, w.start, w.end)
        _check(self.key, w, data)
        if w.part is not None:
            self.checked_parts.add(w.part)
        self._held = (w, data)
        return self._held

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        self._checkClosed()
        if self._pos >= self.size or len(buffer) == 0:
            return 0
        w, data = self._window(self._pos)
        off = self._pos - w.start
        n = min(len(buffer), len(data) - off)
        memoryview(buffer)[:n] = data[off : off + n]
        if w.part is None:
            self.unchecked_bytes += n
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes (all that is left for -1 or None); fewer only at the end."""
        self._checkClosed()
        left = max(0, self.size - self._pos)
        want = left if size is None or size < 0 else min(size, left)
        out = bytearray(want)
        got = 0
        view = memoryview(out)
        while got < want:
            n = self.readinto(view[got:])
            if n == 0:
                break
            got += n
        del view
        return bytes(out[:got])

    def readall(self) -> bytes:
        return self.read(-1)

    def close(self) -> None:
        self._held = None
        super().close()


def read_range(
    storage: Storage, key: str, size: int, parts: list[Window], start: int, end: int
) -> RangeRead:
    """Bytes ``[start, end)``, each part the range covers completely checked (see the module)."""
    if start < 0 or end < start or end > size:
        raise UsageError(f"object {key!r}: range [{start}, {end}) is not within its {size} bytes")
    chunks: list[bytes] = []
    unchecked: list[tuple[int, int]] = []
    checked: list[int] = []
    for w in parts:
        lo, hi = max(start, w.start), min(end, w.end)
        if lo >= hi:
            continue
        data = storage.read(key, lo, hi)
        if (lo, hi) == (w.start, w.end):
            _check(key, w, data)
            if w.part is not None:
                checked.append(w.part)
            else:
                unchecked.append((lo, hi))
        else:
            if len(data) != hi - lo:
                raise CorruptObjectError(
                    key, w.part or 0, lo, hi, f"the remote returned {len(data)} bytes"
                )
            unchecked.append((lo, hi))
        chunks.append(data)
    merged: list[tuple[int, int]] = []
    for lo, hi in unchecked:
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return RangeRead(key, start, end, b"".join(chunks), tuple(merged), tuple(checked))


def readable(
    manifest: Manifest, storage: Storage, key: str, allow_unverified: bool
) -> tuple[int, list[Window]]:
    """The object's size and its windows (recorded parts), after the manifest's consent."""
    seg = manifest.segment(key)
    if seg is None:
        raise UsageError(f"segment {key!r} is not in the manifest {manifest.url}")
    if seg.state is not SegmentState.VERIFIED and not allow_unverified:
        raise UnverifiedObjectError(
            f"segment {key!r} is {seg.state.value}, not verified: its object is not known to "
            "hold the segment's bytes; reading it is refused (allow_unverified=True, "
            "`uploader get --allow-unverified`, reads it anyway)"
        )
    info = storage.head(key)
    if info is None:
        raise VerificationError(
            f"segment {key!r} ({seg.state.value}): no object at the key under {storage.url}"
        )
    if seg.size is not None and info.size != seg.size:
        raise VerificationError(
            f"segment {key!r}: the object has {info.size} bytes, the manifest records "
            f"{seg.size}; it is not the object that was verified"
        )
    commits = [] if seg.state is SegmentState.UNKNOWN else manifest.commits(seg.id)
    return info.size, windows(info.size, seg.part_size, commits)
