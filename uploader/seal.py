"""The seal of a segment, after its writer checked the end it seals at (``Segment.seal``).

The seal is recorded before any remote call: one atomic PUT for a segment no bigger than a part
with nothing sent yet, else the final parts' checksums first and then the seal with every final
part in one transaction. From there the driver sends, checks, completes and verifies; whatever
stops it, the recovery job finishes a sealed segment. Also the part layout commits and seals
share (:func:`new_parts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from uploader.config import UploadMode
from uploader.digest import Payload, combine_crcs, multipart_etag, read_range
from uploader.driver import DriveResult
from uploader.errors import SegmentFailedError, UsageError, VerificationError
from uploader.futures import CommitResult
from uploader.records import Lease, NewCommit, SegmentRecord
from uploader.states import SegmentState
from uploader.storage.base import MAX_PARTS
from uploader.transport import Counters

if TYPE_CHECKING:
    from uploader.store import Store


def new_parts(
    key: str, start: int, end: int, part_size: int, number: int, *, final: bool
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
            f"segment {key!r} would need {number} parts of {part_size} bytes; S3 allows "
            f"{MAX_PARTS}: use a larger part_size"
        )
    return parts


def seal_single(
    store: Store, key: str, path: str, lease: Lease, seg: SegmentRecord, size: int
) -> CommitResult:
    """Read once, record the seal with the checksums of those bytes, then drive: the same
    bytes are PUT, the object checked, uploaded and verified recorded together."""
    with store.transport.slots:
        payload = read_range(path, 0, size, md5=not seg.by_crc32c)
    [commit] = store.manifest.seal(
        lease,
        [NewCommit(1, 0, size, payload.md5, payload.crc32c)],
        size=size,
        crc32c=payload.crc32c,
        expected_etag=payload.md5,  # None in the crc32c mode: the object's CRC32C proves it
        upload_mode=UploadMode.PUT,
    )
    counters = Counters()
    result = store.driver.drive(lease, fresh={commit.id: payload}, counters=counters, release=True)
    del payload
    return sealed(key, result, counters, size)


def seal_multipart(
    store: Store, key: str, path: str, lease: Lease, seg: SegmentRecord, size: int
) -> CommitResult:
    """Two passes, so that the seal is durable before any remote call.

    The digest pass reads the final parts (in parallel on the part pool, within the slots)
    and keeps only their checksums; then the seal and every final part are recorded in one
    transaction. From there a crash, a kill or a failure nobody looks at leaves a sealed
    segment that the recovery job finishes (a seal recorded part by part as it is sent would
    leave an open segment, which only its writer may seal). Then the driver sends each final
    part (read again and checked), checks every earlier part's local bytes, completes and
    verifies.
    """
    manifest = store.manifest
    commits = manifest.commits(seg.id)
    committed = commits[-1].end if commits else 0
    parts = new_parts(key, committed, size, seg.part_size, len(commits), final=True)
    final = store.transport.digest(path, parts, md5=not seg.by_crc32c)
    # The seal's intent: size, whole-file CRC32C and the multipart ETag to expect.
    all_commits = manifest.seal(
        lease,
        final,
        size=size,
        crc32c=combine_crcs(
            [(c.crc32c, c.size) for c in commits] + [(c.crc32c, c.end - c.start) for c in final]
        ),
        expected_etag=expected_etag([c.md5 for c in commits] + [c.md5 for c in final]),
        upload_mode=UploadMode.MULTIPART,
    )
    counters = Counters()
    fresh: dict[int, Payload | None] = {
        c.id: None for c in all_commits if c.part_number > len(commits)
    }
    result = store.driver.drive(lease, fresh=fresh, counters=counters, release=True)
    return sealed(key, result, counters, size)


def expected_etag(md5s: list[str | None]) -> str | None:
    """The multipart ETag the part MD5s give; None in the crc32c mode (no MD5 was taken: the
    object's composite CRC32C proves it instead)."""
    known = [m for m in md5s if m is not None]
    if len(known) != len(md5s):
        return None
    return multipart_etag(known)


def sealed(key: str, result: DriveResult, counters: Counters, size: int) -> CommitResult:
    if result.state is SegmentState.FAILED:
        raise SegmentFailedError(f"segment {key!r} failed: {result.detail}")
    if not result.verified:
        raise VerificationError(
            f"segment {key!r} is sealed but not verified ({result.state.value}): "
            f"{result.detail}; `uploader recover` finishes it"
        )
    return CommitResult(
        key=key,
        sent_bytes=counters.bytes_sent,
        sent_parts=counters.parts_sent,
        committed=size,
        carried_bytes=0,
        sealed=True,
        verified=True,
        object_etag=result.object_etag,
    )
