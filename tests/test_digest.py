"""CRC32C combination: the whole-object CRC built from part CRCs equals the CRC of the bytes."""

from __future__ import annotations

import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from uploader.digest import combine_crcs, crc32c_combine


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096), st.binary(max_size=4096))
def test_combine_two(a: bytes, b: bytes) -> None:
    assert crc32c_combine(crc32c.crc32c(a), crc32c.crc32c(b), len(b)) == crc32c.crc32c(a + b)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=2048), max_size=12))
def test_combine_parts(parts: list[bytes]) -> None:
    combined = combine_crcs([(crc32c.crc32c(p), len(p)) for p in parts])
    assert combined == (crc32c.crc32c(b"".join(parts)) if parts else 0)


def test_combine_large_lengths() -> None:
    """Lengths with high bits set (multi-GiB parts) use the upper entries of the x^(2^k) table:
    appending n zero bytes is the same as combining with the CRC of n zeros."""
    head = b"segment-uploader"
    for n in (1, 255, 8 * 1024 * 1024, (1 << 20) + 12345):
        zeros = bytes(n)
        assert crc32c_combine(crc32c.crc32c(head), crc32c.crc32c(zeros), n) == crc32c.crc32c(
            head + zeros
        )
