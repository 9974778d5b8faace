"""Checksums of local bytes: taken as a part is read, before it is sent.

* part MD5 (hex): what S3 returns as a part ETag, and what it checks against ``Content-MD5``;
* part CRC32C: a second, independent checksum of the same bytes;
* multipart ETag: ``md5(concat(part md5 bytes)) + "-" + number of parts``; a single PUT's ETag is
  the MD5 of the object. Verification compares it with one HEAD, no download;
* whole-file CRC32C: combined from the part CRCs (no second read of the file).

A part bound for S3 is not held in memory: :func:`digest_range` takes its checksums in one
streaming pass (a :data:`STREAM_CHUNK` buffer reused), and its body is read from the file again
as it is sent (:mod:`uploader.part_stream`), checked against those checksums.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import crc32c as _crc32c

from uploader.errors import LocalFileError, StorageError

#: Read size of the streaming passes: a few of these per part in flight, never a whole part.
STREAM_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Payload:
    """The bytes of one part, ``path[start:end]``, with their checksums.

    ``data`` holds them when they were read whole (a small segment's single PUT); None when they
    stay in the file and are read again as they are sent, checked against ``crc32c``
    (:func:`uploader.part_stream.part_bytes` for backends that want them whole)."""

    path: str
    start: int
    end: int
    #: None: the bytes stay in the file and are streamed from it when sent (checked against
    #: ``crc32c`` as they go; see uploader.part_stream).
    data: bytes | None
    #: Hex; None for a segment in the ``crc32c`` checksum mode, where the remote's echo of the
    #: part's CRC32C proves it and no MD5 is taken (1.4 s of client CPU per GiB).
    md5: str | None
    crc32c: int

    @property
    def size(self) -> int:
        return self.end - self.start


def crc32c_of(data: bytes) -> int:
    return int(_crc32c.crc32c(data))


def checksum(data: bytes) -> tuple[str, int]:
    return hashlib.md5(data, usedforsecurity=False).hexdigest(), crc32c_of(data)


@contextlib.contextmanager
def local_file_errors(path: str, doing: str = "read") -> Iterator[None]:
    """OS errors on a local file as :class:`LocalFileError`: missing is terminal (its bytes are
    gone), any other is retryable. Our own ``LocalFileError`` passes through unchanged."""
    try:
        yield
    except FileNotFoundError:
        raise LocalFileError(
            f"{path}: local file is missing; its bytes were not yet verified remotely"
        ) from None
    except OSError as exc:
        raise LocalFileError(
            f"{path}: cannot {doing} local file: {exc.strerror or exc}", retryable=True
        ) from None


def read_bytes(path: str, start: int, end: int) -> bytes:
    """Read ``[start, end)`` of a local file, all of it. Raises :class:`LocalFileError`."""
    if start < 0 or end < start:
        raise LocalFileError(f"{path}: invalid byte range [{start}, {end})")
    with local_file_errors(path), open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
        # The file's real size for the message (start + len(data) is not it when the file
        # ends before start).
        size = os.fstat(f.fileno()).st_size if len(data) != end - start else -1
    if len(data) != end - start:
        raise LocalFileError(
            f"{path}: local file is shorter ({size} bytes) than the committed "
            f"range [{start}, {end})"
        )
    return data


def read_range(path: str, start: int, end: int, *, md5: bool = True) -> Payload:
    """Read ``[start, end)`` of a local file and take its checksums (the digest pass): CRC32C,
    and MD5 unless ``md5`` is False (a segment in the ``crc32c`` checksum mode)."""
    data = read_bytes(path, start, end)
    if not md5:
        return Payload(path=path, start=start, end=end, data=data, md5=None, crc32c=crc32c_of(data))
    digest, crc = checksum(data)
    return Payload(path=path, start=start, end=end, data=data, md5=digest, crc32c=crc)


def digest_range(path: str, start: int, end: int, *, md5: bool = True) -> Payload:
    """The checksums of ``[start, end)`` of a local file, read in :data:`STREAM_CHUNK` blocks into
    one reused buffer (the digest pass of a part that is streamed when sent): no copy of the
    part is kept, the returned payload holds none. Raises :class:`LocalFileError` like
    :func:`read_bytes`. No MD5 unless ``md5`` (the crc32c checksum mode takes none)."""
    if start < 0 or end < start:
        raise LocalFileError(f"{path}: invalid byte range [{start}, {end})")
    md5_of = hashlib.md5(usedforsecurity=False) if md5 else None
    crc = 0
    buf = memoryview(bytearray(max(1, min(STREAM_CHUNK, end - start))))
    with local_file_errors(path), open(path, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left:
            n = f.readinto(buf[: min(len(buf), left)])
            if not n:
                size = os.fstat(f.fileno()).st_size
                raise LocalFileError(
                    f"{path}: local file is shorter ({size} bytes) than the committed "
                    f"range [{start}, {end})"
                )
            # Both release the GIL on blocks this size: parts hash in parallel.
            if md5_of is not None:
                md5_of.update(buf[:n])
            crc = int(_crc32c.crc32c(buf[:n], crc))
            left -= n
    digest = None if md5_of is None else md5_of.hexdigest()
    return Payload(path=path, start=start, end=end, data=None, md5=digest, crc32c=crc)


def stat_file(path: str) -> os.stat_result:
    """``stat`` a local file: missing is terminal (its bytes are gone), any other error is not."""
    with local_file_errors(path, "stat"):
        return os.stat(path)


def file_size(path: str) -> int:
    return stat_file(path).st_size


def multipart_etag(part_md5s: Sequence[str]) -> str:
    """The ETag S3 gives an object completed from parts with these MD5s (hex, in order)."""
    joined = b"".join(bytes.fromhex(m) for m in part_md5s)
    return f"{hashlib.md5(joined, usedforsecurity=False).hexdigest()}-{len(part_md5s)}"


def normalize_etag(etag: str | None) -> str | None:
    """Strip the quotes S3 puts around ETags, and lower-case them."""
    if etag is None:
        return None
    return etag.strip().strip('"').lower()


# --- CRC32C combination (zlib 1.2.12's crc32_combine, for the Castagnoli polynomial) -----------
#
# In the reflected bit order a CRC register is a polynomial over GF(2); appending n zero bytes to
# the message multiplies the register by x^(8n) modulo the polynomial. So
# crc(A + B) = crc(A) * x^(8 len(B)) mod P  xor  crc(B): one multiplication by a power of x, which
# is built from the table of x^(2^k) mod P below (one product per set bit of the length), instead
# of squaring 32x32 GF(2) matrices for every bit (the old method: ~1.7 ms per 8 MiB part).

_POLY = 0x82F63B78  # reflected Castagnoli
_ONE = 0x80000000  # x^0 in the reflected order


def _multmodp(a: int, b: int) -> int:
    """``a * b mod P`` for polynomials in the reflected order."""
    m = _ONE
    product = 0
    while True:
        if a & m:
            product ^= b
            if (a & (m - 1)) == 0:
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> tuple[int, ...]:
    """``x^(2^k) mod P`` for k = 0..31."""
    p = _ONE >> 1  # x^1
    table = [p]
    for _ in range(31):
        p = _multmodp(p, p)
        table.append(p)
    return tuple(table)


_X2N = _x2n_table()


def _x8nmodp(n: int) -> int:
    """``x^(8 n) mod P``: the operator that appends ``n`` zero bytes."""
    p = _ONE
    k = 3  # 8 n = n * 2^3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32c_combine(crc1: int, crc2: int, len2: int) -> int:
    """CRC32C of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    if len2 <= 0:
        return crc1
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2


def combine_crcs(parts: Sequence[tuple[int, int]]) -> int:
    """Whole-object CRC32C from ``(crc32c, size)`` of consecutive parts."""
    if not parts:
        return 0
    # The CRC of the first part is the CRC of the prefix so far: combining it with an empty
    # prefix would only spend a GF(2) matrix product on the identity.
    crc = parts[0][0]
    for part_crc, size in parts[1:]:
        crc = crc32c_combine(crc, part_crc, size)
    return crc


# --- CRC32C as S3's additional checksums name it ------------------------------------------------


def crc32c_b64(crc: int) -> str:
    """A CRC32C as S3's ``x-amz-checksum-crc32c`` carries it: base64 of the big-endian value."""
    return base64.b64encode(crc.to_bytes(4, "big")).decode("ascii")


def crc32c_from_b64(value: object) -> int | None:
    """The CRC32C an ``x-amz-checksum-crc32c`` value names, or None (absent, or not one)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        return None
    return int.from_bytes(raw, "big") if len(raw) == 4 else None


def check_body_crc32c(op: str, key: str, number: int, payload: Payload) -> None:
    """Refuse to send a crc32c-mode body whose bytes are not the ones checksummed.

    Without an MD5, the CRC32C header is the only proof a body carries; a server that does not
    check it (moto) would echo it whatever bytes arrived. Hardware CRC32C: ~0.07 s per GiB.
    A streamed body (no bytes held) is checked by its reader as it is sent instead, which
    withholds the last block of bytes that differ (uploader.part_stream).
    """
    if payload.data is None:
        return
    actual = crc32c_of(payload.data)
    if actual != payload.crc32c:
        raise StorageError(
            f"{op} of {key!r} part {number}: the bytes to send have CRC32C {actual}, not the "
            f"{payload.crc32c} recorded for them; not sent (read again and checked next time)",
            retryable=True,
        )


def composite_crc32c(part_crcs: Sequence[int]) -> str:
    """The COMPOSITE checksum S3 gives an object completed from parts with these CRC32Cs (in
    order): the CRC32C of their concatenated big-endian values, base64, then ``-N``."""
    joined = b"".join(c.to_bytes(4, "big") for c in part_crcs)
    return f"{crc32c_b64(crc32c_of(joined))}-{len(part_crcs)}"


def checksum_matches(reported: str, parts: Sequence[tuple[int, int]], *, multipart: bool) -> bool:
    """Whether the CRC32C a remote reports for an object is the one of these ``(crc32c, size)``
    parts. A multipart object's is COMPOSITE (``<b64>-N``; moto leaves the ``-N`` off) or, where
    the upload was FULL_OBJECT, the whole object's; a single PUT's is the object's own."""
    value = reported.strip()
    if not multipart:
        return len(parts) == 1 and value == crc32c_b64(parts[0][0])
    composite = composite_crc32c([c for c, _ in parts])
    if value in (composite, composite.rsplit("-", 1)[0]):
        return True
    return value == crc32c_b64(combine_crcs(parts))
