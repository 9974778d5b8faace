"""The part body read from the file as it is sent (:mod:`uploader.part_stream`).

What the HTTP layers do with a body is done here with their own code: botocore sizes it and
rewinds it before a retry (``reset_stream``); aiohttp reads it in blocks on executor threads and,
re-sending a PUT on a dropped connection, seeks back to where it started with the same payload
object. Every pass must hand out the checksummed bytes exactly, or fail before the last block.
"""

from __future__ import annotations

import asyncio
import io
import os
import random
from pathlib import Path

import pytest
from aiobotocore._endpoint_helpers import _IOBaseWrapper
from aiohttp import payload as aiohttp_payload
from botocore.awsrequest import AWSRequest

from uploader.digest import STREAM_CHUNK, checksum, digest_range, read_bytes
from uploader.errors import LocalFileError, StorageError
from uploader.part_stream import RangeReader, part_bytes, streamed

SIZE = 3 * STREAM_CHUNK + 1234
START = 777


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(5).randbytes(START + SIZE + 999))
    return path


def _rewrite(path: Path, at: int) -> None:
    with path.open("r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]))


def _drain(reader: io.RawIOBase, block: int = 65536) -> list[bytes]:
    blocks = []
    while chunk := reader.read(block):
        blocks.append(chunk)
    return blocks


def test_the_digest_pass_matches_the_bytes_and_keeps_none(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    assert payload.data is None
    assert (payload.md5, payload.crc32c) == checksum(read_bytes(str(seg), START, START + SIZE))
    with pytest.raises(LocalFileError, match="shorter"):
        digest_range(str(seg), START, seg.stat().st_size + 1)
    with pytest.raises(LocalFileError, match="missing"):
        digest_range(str(seg) + ".gone", 0, 10)


def test_a_pass_hands_out_the_range_in_bounded_blocks(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=3)
    assert len(reader) == SIZE and reader.seekable() and reader.readable()
    with pytest.raises(OSError):
        reader.fileno()  # aiohttp would size the body from the whole file's fstat
    blocks = _drain(reader)
    assert max(map(len, blocks)) == 65536
    assert b"".join(blocks) == read_bytes(str(seg), START, START + SIZE)
    reader.check_sent()
    reader.close()


def test_a_rewind_resends_identical_bytes_and_is_checked_again(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=1)
    first = b"".join(_drain(reader, 100_000))
    reader.seek(0)
    reader.read(10)
    reader.seek(0)  # an interrupted second pass, then a third from the start
    second = b"".join(_drain(reader, 40_000))
    assert first == second == read_bytes(str(seg), START, START + SIZE)
    reader.check_sent()


def test_a_pass_cut_short_is_not_sent(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=1)
    reader.read(1000)
    with pytest.raises(StorageError, match="1000 of"):
        reader.check_sent()
    with pytest.raises(io.UnsupportedOperation):
        reader.seek(500)  # a pass that skipped bytes could not be vouched for
    # Sizing by seeking to the end and back (botocore's fallback) is allowed.
    assert reader.seek(0, io.SEEK_END) == SIZE
    assert reader.read(10) == b""
    assert reader.seek(1000) == 1000
    assert len(reader.read(10)) == 10


def test_bytes_changed_after_the_digest_withhold_the_last_block(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    _rewrite(seg, START + 10)
    reader = RangeReader(payload, key="log/7", number=4)
    handed: list[bytes] = []
    with pytest.raises(LocalFileError) as caught:
        while chunk := reader.read(65536):
            handed.append(chunk)
    message = str(caught.value)
    for words in ("log/7", str(seg), "part 4", f"[{START}, {START + SIZE})", "changed"):
        assert words in message, message
    assert not caught.value.retryable
    assert sum(map(len, handed)) < SIZE  # the request cannot have carried the whole part
    reader.seek(0)  # a re-send does not clear it: the failure is sticky
    with pytest.raises(LocalFileError):
        reader.read(10)
    with pytest.raises(LocalFileError):
        reader.check_sent()


def test_a_file_truncated_under_the_reader_fails_it(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=2)
    reader.read(1000)
    os.truncate(seg, START + 2000)
    with pytest.raises(LocalFileError, match="truncated"):
        _drain(reader)
    with pytest.raises(LocalFileError, match="shorter"):
        RangeReader(payload, key="k", number=2)


def test_streamed_raises_the_readers_failure_not_the_http_layers(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    _rewrite(seg, START + SIZE - 1)
    with pytest.raises(LocalFileError, match="part 9"), streamed(payload, key="k", number=9) as r:
        try:
            _drain(r)
        except LocalFileError as exc:  # what aiohttp does with it
            raise ConnectionError("Failed to send bytes into the underlying connection") from exc


def test_part_bytes_checks_what_it_reads(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    assert part_bytes(payload, key="k", number=1) == read_bytes(str(seg), START, START + SIZE)
    _rewrite(seg, START)
    with pytest.raises(LocalFileError, match="changed after they were committed"):
        part_bytes(payload, key="k", number=1)


class _Collect:
    """aiohttp's StreamWriter as IOBasePayload uses it: what was written, block by block."""

    def __init__(self) -> None:
        self.blocks: list[bytes] = []

    async def write(self, chunk: bytes) -> None:
        self.blocks.append(bytes(chunk))


def test_aiohttp_resending_the_same_payload_sends_identical_checked_bytes(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=1)
    body = aiohttp_payload.get_payload(_IOBaseWrapper(reader))  # as aiobotocore hands it over
    assert isinstance(body, aiohttp_payload.IOBasePayload)

    async def send_twice() -> tuple[_Collect, _Collect]:
        first, second = _Collect(), _Collect()
        await body.write_with_length(first, SIZE)  # type: ignore[arg-type]
        await body.write_with_length(second, SIZE)  # type: ignore[arg-type]
        return first, second

    first, second = asyncio.run(send_twice())
    expected = read_bytes(str(seg), START, START + SIZE)
    assert b"".join(first.blocks) == b"".join(second.blocks) == expected
    assert max(map(len, first.blocks)) <= STREAM_CHUNK
    reader.check_sent()


def test_botocore_sizes_and_rewinds_the_body(seg: Path) -> None:
    payload = digest_range(str(seg), START, START + SIZE)
    reader = RangeReader(payload, key="k", number=1)
    prepared = AWSRequest(method="PUT", url="http://example.invalid/b/k", data=reader).prepare()
    assert prepared.headers["Content-Length"] == str(SIZE)
    first = b"".join(_drain(reader))
    prepared.reset_stream()  # before a retry of the same request
    assert b"".join(_drain(reader)) == first
    reader.check_sent()
