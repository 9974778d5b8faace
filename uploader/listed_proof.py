"""Parts a listing shows without checksums, proven by the MD5 of our local bytes.

A crash between a part's acknowledgement and the write that records it ``uploaded`` leaves the
part ``pending`` while the upload holds it. In the ``crc32c`` checksum mode no MD5 was taken when
the part was read, so the listing proves the part by its CRC32C. A remote that keeps CRC32C on
objects but lists parts without it (moto) would have the part sent again, though it holds it.

The ETag a remote lists for a part is the MD5 of its bytes (S3; not under SSE-KMS or SSE-C,
where the ETag is something else and nothing is proven here). So for such a listed part of the
recorded size, the part's range is read from the local file once: its CRC32C must be the one
recorded (these are the bytes the seal committed) and its MD5 the listed ETag. Then the remote
holds exactly our bytes, by the proof the ``md5`` mode relies on for every part, and the part is
adopted instead of sent again. Anything else (another ETag, the file changed or unreadable, the
file on another node) proves nothing: the part is sent as before.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence

from uploader.digest import digest_range, normalize_etag
from uploader.errors import LocalFileError
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState
from uploader.storage.base import PartRef

log = logging.getLogger("uploader")

_MD5 = re.compile(r"[0-9a-f]{32}")


def md5_proven(
    seg: SegmentRecord, commits: Sequence[CommitRecord], parts: Mapping[int, PartRef]
) -> dict[int, str]:
    """Part number -> listed ETag, for the pending crc32c-mode parts listed without a CRC32C
    whose local bytes (their recorded CRC32C checked) have that ETag as their MD5."""
    proven: dict[int, str] = {}
    for c in commits:
        part = parts.get(c.part_number)
        if (
            c.md5 is not None
            or c.state is not CommitState.PENDING
            or part is None
            or part.crc32c is not None
            or part.size != c.size
        ):
            continue
        etag = normalize_etag(part.etag) or ""
        if not _MD5.fullmatch(etag):
            continue
        try:
            local = digest_range(seg.path, c.start, c.end, md5=True)
        except LocalFileError as exc:
            log.info("segment %r part %d: not proven by its MD5: %s", seg.key, c.part_number, exc)
            continue
        if local.crc32c == c.crc32c and local.md5 == etag:
            proven[c.part_number] = etag
    return proven
