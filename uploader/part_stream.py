"""A part's body read from the local file as it is sent, checked against its checksums.

A part's checksums are taken before its request (``Content-MD5`` and ``x-amz-checksum-crc32c``
are headers), in a first streaming pass (:func:`uploader.digest.digest_range`); its bytes are not
kept. The request then reads them from the file again through :class:`RangeReader`: seekable and
of known length (what botocore and aiohttp need for ``Content-Length`` and for re-sending), it
hands out at most a few hundred KiB at a time and re-computes the CRC32C of exactly the bytes it
hands out. Bytes that differ from the checksummed ones (the file rewritten between the two passes)
are caught at the last read: that block is withheld, so the request cannot complete, and the
caller raises :class:`LocalFileError` naming the key, the file, the part and the range: the part
is never recorded ``uploaded``. A remote that checks ``Content-MD5`` would refuse such a body
too; moto checks nothing, so this check is what makes it safe there.

Re-sends rewind: botocore seeks the body to 0 before a retry and aiohttp seeks back to where it
started when it re-sends a PUT on a dropped connection. A rewind to the start resets the running
CRC, so every pass is checked on its own. Seeks that would make a pass skip bytes (anywhere but
the start, the end of what was checked, or the end for sizing) are refused: the check could not
vouch for what such a pass hands out.

Backends that write whole parts (the staged ones) read them with :func:`part_bytes`, checked the
same way before they are written.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator

import crc32c as _crc32c

from uploader.digest import Payload, crc32c_of, local_file_errors, read_bytes
from uploader.errors import LocalFileError, StorageError


def _changed(path: str, key: str, number: int, payload: Payload, crc: int) -> LocalFileError:
    return LocalFileError(
        f"{path}: bytes [{payload.start}, {payload.end}) of segment {key!r} (part {number}) "
        f"changed after they were committed (crc32c {payload.crc32c} recorded, {crc} read for "
        "sending); the part is not sent whole nor recorded uploaded; the local file must not "
        "be rewritten before it is verified"
    )


class RangeReader(io.RawIOBase):
    """``payload.path[start:end)`` as a read-only stream whose bytes are checked as handed out.

    ``failure`` is set (and raised by every later read) once the bytes read differ from the
    checksummed ones or the file ends early: sticky, since no later pass can undo what an
    earlier one saw. :meth:`check_sent` says whether the last pass handed out the whole range
    with the recorded CRC32C. Reads may come from aiohttp's executor threads while a cancelled
    request unwinds: a lock keeps them apart from :meth:`close`.
    """

    def __init__(self, payload: Payload, *, key: str, number: int) -> None:
        super().__init__()
        self._payload = payload
        self._key = key
        self._number = number
        self._size = payload.end - payload.start
        self._lock = threading.Lock()
        self._pos = 0  # offset within the range of the next read
        self._crc = 0  # CRC32C of [0, _checked) as handed out in this pass
        self._checked = 0
        self.failure: LocalFileError | None = None
        path = payload.path
        with local_file_errors(path):
            self._fd: int | None = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        size = os.fstat(self._fd).st_size
        if size < payload.end:
            os.close(self._fd)
            self._fd = None
            raise LocalFileError(
                f"{path}: local file is shorter ({size} bytes) than the committed range "
                f"[{payload.start}, {payload.end}) of segment {key!r} (part {number})"
            )

    # --- what botocore and aiohttp ask of a body ------------------------------------------------

    def __len__(self) -> int:
        # botocore sizes a body with len() first (Content-Length); fileno() stays unsupported
        # (io's default) so that aiohttp does not size it from the whole file's fstat.
        return self._size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        with self._lock:
            base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
            target = base + offset
            if target == 0:
                self._crc = self._checked = 0  # a new pass: checked on its own
            elif target not in (self._checked, self._size):
                raise io.UnsupportedOperation(
                    f"part {self._number} of {self._key!r}: a seek to {target} would skip bytes "
                    "the checksum check has not seen; only the start, the end of the checked "
                    "bytes or the end can be sought"
                )
            self._pos = target
            return target

    # typeshed types the buffer as WriteableBuffer (3.12+ Buffer); ours takes what io passes.
    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        with self._lock:
            if self.failure is not None:
                raise self.failure
            if self._fd is None:
                raise ValueError("read of a closed part body")
            left = self._size - self._pos
            if left <= 0 or self._pos != self._checked:
                return b""  # at the end (or sought there for sizing): nothing more to send
            # -1 means "the rest" to io's callers; the HTTP layers ask for bounded blocks.
            want = left if size is None or size < 0 else min(size, left)
            data = self._pread(want)
            crc = int(_crc32c.crc32c(data, self._crc))
            if self._pos + len(data) == self._size and crc != self._payload.crc32c:
                # The last block is withheld: the request cannot complete with these bytes.
                self.failure = _changed(
                    self._payload.path, self._key, self._number, self._payload, crc
                )
                raise self.failure
            self._crc = crc
            self._pos += len(data)
            self._checked = self._pos
            return data

    def _pread(self, want: int) -> bytes:
        assert self._fd is not None
        where = self._payload.start + self._pos
        blocks: list[bytes] = []
        got = 0
        try:
            while got < want:
                block = os.pread(self._fd, want - got, where + got)
                if not block:
                    break
                blocks.append(block)
                got += len(block)
        except OSError as exc:
            self.failure = LocalFileError(
                f"{self._payload.path}: cannot read local file: {exc.strerror or exc}",
                retryable=True,
            )
            raise self.failure from None
        if got < want:
            self.failure = LocalFileError(
                f"{self._payload.path}: local file of segment {self._key!r} ends inside part "
                f"{self._number} [{self._payload.start}, {self._payload.end}); it was truncated"
            )
            raise self.failure
        return blocks[0] if len(blocks) == 1 else b"".join(blocks)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()

    def check_sent(self) -> None:
        """After the remote acknowledged the body: the last pass must have handed out the whole
        range, checked. Raises the failure seen, if any."""
        if self.failure is not None:
            raise self.failure
        if self._checked != self._size:
            # Acknowledged without the whole range read through the check: nothing proves
            # what the remote holds is our part.
            raise StorageError(
                f"part {self._number} of {self._key!r}: the request ended after "
                f"{self._checked} of {self._size} bytes were read from the file; not recorded",
                retryable=True,
            )


@contextlib.contextmanager
def streamed(payload: Payload, *, key: str, number: int) -> Iterator[RangeReader]:
    """A :class:`RangeReader` over the payload for one request: a failure it saw replaces
    whatever the HTTP layer made of it, and a request that returns is checked with
    :meth:`RangeReader.check_sent`."""
    reader = RangeReader(payload, key=key, number=number)
    try:
        yield reader
    except BaseException:
        reader.close()
        if reader.failure is not None:
            raise reader.failure from None
        raise
    reader.close()
    reader.check_sent()


def part_bytes(payload: Payload, *, key: str, number: int) -> bytes:
    """The payload's bytes whole (backends that write whole parts): those held, else read from
    the file and checked against the recorded CRC32C (:class:`LocalFileError` if they changed)."""
    if payload.data is not None:
        return payload.data
    data = read_bytes(payload.path, payload.start, payload.end)
    crc = crc32c_of(data)
    if crc != payload.crc32c:
        raise _changed(payload.path, key, number, payload, crc)
    return data


__all__ = ["RangeReader", "part_bytes", "streamed"]
