"""The multipart rules of S3, enforced by every backend ourselves (moto and local disks do not)."""

from __future__ import annotations

from collections.abc import Sequence

from uploader.digest import checksum_matches, multipart_etag, normalize_etag
from uploader.errors import PartRuleError
from uploader.storage.base import MAX_PART_SIZE, MAX_PARTS, Expected, ObjectInfo, PartRef


def check_part_number(key: str, number: int) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_PARTS:
        raise PartRuleError(
            f"{key!r}: part number {number!r} is out of range; part numbers are 1..{MAX_PARTS}"
        )


def check_part_size(key: str, number: int, size: int) -> None:
    if size > MAX_PART_SIZE:
        raise PartRuleError(
            f"{key!r}: part {number} is {size} bytes; a part may be at most {MAX_PART_SIZE} bytes"
        )


def check_parts(key: str, parts: Sequence[PartRef], min_part_size: int) -> None:
    """Raise :class:`PartRuleError` unless ``parts`` can complete an object.

    Parts must be 1..10,000 in strictly ascending order, at most 10,000 of them, and each but the
    last between ``min_part_size`` and 5 GiB. Sizes of -1 (unknown) are not checked.
    """
    if not parts:
        raise PartRuleError(f"{key!r}: cannot complete an upload without parts")
    if len(parts) > MAX_PARTS:
        raise PartRuleError(
            f"{key!r}: {len(parts)} parts given; an object may have at most {MAX_PARTS} parts"
        )
    previous = 0
    last = len(parts) - 1
    for i, part in enumerate(parts):
        check_part_number(key, part.number)
        if part.number <= previous:
            raise PartRuleError(
                f"{key!r}: part {part.number} follows part {previous}; parts must be completed "
                "in strictly ascending order"
            )
        previous = part.number
        if part.size >= 0:
            check_part_size(key, part.number, part.size)
            if i != last and part.size < min_part_size:
                raise PartRuleError(
                    f"{key!r}: part {part.number} is {part.size} bytes; every part but the last "
                    f"must be at least {min_part_size} bytes"
                )


def object_etag(parts: Sequence[PartRef]) -> str:
    """The ETag of the object completed from ``parts`` (S3 semantics)."""
    return multipart_etag([p.etag for p in parts])


def expected_of(parts: Sequence[PartRef]) -> Expected | None:
    """What completing ``parts`` yields, when every part's size is known."""
    if not parts or any(p.size < 0 for p in parts):
        return None
    return Expected(size=sum(p.size for p in parts), etag=object_etag(parts))


def matches(info: ObjectInfo | None, expected: Expected | None) -> bool:
    """Whether the object ``info`` is the one ``expected`` describes: size, and the ETag or
    (``crc32c`` mode) the CRC32C the remote reports for it."""
    if info is None or expected is None or info.size != expected.size:
        return False
    if expected.parts is not None:
        # No MD5 was taken: only the remote's checksum of the object can tie it to our parts.
        return info.checksum is not None and checksum_matches(
            info.checksum, expected.parts, multipart=expected.multipart
        )
    if info.etag is None or expected.etag is None:
        return False
    return info.etag == normalize_etag(expected.etag)
