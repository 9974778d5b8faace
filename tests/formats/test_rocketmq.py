"""The RocketMQ record-chain reader on hand-built files, and against the producer mid-write."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.formats.producer import CommitLogProducer, blank_head, encode_message
from uploader.formats import Scan, get_format
from uploader.formats import rocketmq as rmq
from uploader.formats.rocketmq import RocketMQFormat

SIZE = 4096
fmt = RocketMQFormat()


def build(
    tmp_path: Path, *chunks: bytes, size: int = SIZE, name: str = "00000000000000000000"
) -> str:
    """A preallocated file of ``size`` bytes holding ``chunks`` from offset 0, zeros after."""
    data = b"".join(chunks)
    assert len(data) <= size
    path = tmp_path / name
    path.write_bytes(data + b"\0" * (size - len(data)))
    return str(path)


def test_constants_are_rocketmq_s() -> None:
    # CommitLog.MESSAGE_MAGIC_CODE = -626843481, MessageDecoder.MESSAGE_MAGIC_CODE_V2 = -626843477,
    # CommitLog.BLANK_MAGIC_CODE = -875286124 (Java ints).
    def as_java(v: int) -> int:
        return int(struct.unpack(">i", struct.pack(">I", v))[0])

    assert as_java(rmq.MESSAGE_MAGIC_CODE) == -626843481
    assert as_java(rmq.MESSAGE_MAGIC_CODE_V2) == -626843477
    assert as_java(rmq.BLANK_MAGIC_CODE) == -875286124
    assert rmq.MIN_MESSAGE_LENGTH == 91
    assert rmq.CRC32_RESERVED_LEN == 20
    # UtilAll.crc32: java.util.zip.CRC32 with the top bit cleared ("123456789" -> 0xCBF43926).
    assert rmq.body_crc(b"123456789") == 0xCBF43926 & 0x7FFFFFFF
    assert get_format("rocketmq").name == "rocketmq"


def test_empty_file_is_not_written(tmp_path: Path) -> None:
    path = build(tmp_path)
    assert fmt.scan(path, 0, rolled=False) == Scan(0, False, None)
    assert not fmt.begun(path)
    rolled = fmt.scan(path, 0, rolled=True)
    assert rolled.valid_end == 0 and not rolled.complete
    assert rolled.problem is not None and "a later file has begun" in rolled.problem


def test_records_then_zeros(tmp_path: Path) -> None:
    a, b = encode_message(b"hello"), encode_message(b"world" * 50, properties=b"KEYS\x01k1")
    path = build(tmp_path, a, b)
    assert fmt.begun(path)
    assert fmt.scan(path, 0, rolled=False) == Scan(len(a) + len(b), False, None)
    assert fmt.scan(path, len(a), rolled=False) == Scan(len(a) + len(b), False, None)


def test_partial_record_at_the_end(tmp_path: Path) -> None:
    a, b = encode_message(b"first"), encode_message(b"x" * 300, properties=b"TAGS\x01t")
    for cut in (1, 4, 6, 8, 20, 100, len(b) - 1):
        path = build(tmp_path, a, b[:cut])
        assert fmt.scan(path, 0, rolled=False) == Scan(len(a), False, None), cut
        late = fmt.scan(path, 0, rolled=True)
        assert late.valid_end == len(a) and not late.complete and late.problem, cut


def test_head_written_body_not_fails_the_crc(tmp_path: Path) -> None:
    """Head and tail written, body still zeros: only the BODYCRC can tell."""
    rec = bytearray(encode_message(b"\x01" * 200, properties=b"KEYS\x01k"))
    body_at = rmq.SYSFLAG_AT + 4 + 8 + 8 + 8 + 8 + 4 + 8 + 4
    rec[body_at : body_at + 200] = b"\0" * 200
    path = build(tmp_path, bytes(rec))
    assert fmt.scan(path, 0, rolled=False) == Scan(0, False, None)
    problem = fmt.scan(path, 0, rolled=True).problem
    assert problem is not None and "BODYCRC" in problem


def test_tail_not_written_is_incomplete(tmp_path: Path) -> None:
    """Body (and its CRC) complete, the properties' last bytes not yet there."""
    rec = encode_message(b"body", properties=b"KEYS\x01key-1\x02TAGS\x01tagA")
    path = build(tmp_path, rec[:-3])
    assert fmt.scan(path, 0, rolled=False) == Scan(0, False, None)


def test_blank_end_is_complete_whatever_the_filler(tmp_path: Path) -> None:
    a = encode_message(b"m" * 100)
    for filler in (b"\0", b"\xff", b"\x5a"):
        rest = SIZE - len(a)
        path = build(tmp_path, a, blank_head(rest), filler * (rest - 8))
        assert fmt.scan(path, 0, rolled=False) == Scan(SIZE, True, None)
        assert fmt.scan(path, len(a), rolled=True) == Scan(SIZE, True, None)


def test_blank_that_does_not_reach_the_end_is_corrupt(tmp_path: Path) -> None:
    a = encode_message(b"m")
    path = build(tmp_path, a, blank_head(100))
    scan = fmt.scan(path, 0, rolled=False)
    assert scan.valid_end == len(a) and not scan.complete
    assert scan.problem is not None and "BLANK" in scan.problem


def test_exact_fill_is_complete(tmp_path: Path) -> None:
    a = encode_message(b"a" * 10)
    b = encode_message(b"b" * 20)
    path = build(tmp_path, a, b, size=len(a) + len(b))
    assert fmt.scan(path, 0, rolled=False) == Scan(len(a) + len(b), True, None)
    assert fmt.scan(path, 0, rolled=True) == Scan(len(a) + len(b), True, None)


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("born_v6", [False, True])
@pytest.mark.parametrize("store_v6", [False, True])
def test_v1_v2_and_ipv6_hosts(tmp_path: Path, v2: bool, born_v6: bool, store_v6: bool) -> None:
    topic = b"T" * (200 if v2 else 20)
    recs = [
        encode_message(b"body%d" % i, topic=topic, v2=v2, born_v6=born_v6, store_v6=store_v6)
        for i in range(3)
    ]
    path = build(tmp_path, *recs)
    assert fmt.scan(path, 0, rolled=False) == Scan(sum(map(len, recs)), False, None)
    # The same bytes read with the other version's layout do not add up: the version matters.
    other = bytearray(recs[0])
    magic = rmq.MESSAGE_MAGIC_CODE if v2 else rmq.MESSAGE_MAGIC_CODE_V2
    other[4:8] = struct.pack(">I", magic)
    path = build(tmp_path, bytes(other))
    assert fmt.scan(path, 0, rolled=False).valid_end == 0


def test_property_crc_is_checked_when_present(tmp_path: Path) -> None:
    rec = encode_message(b"payload", properties=b"KEYS\x01k", property_crc=True)
    path = build(tmp_path, rec)
    assert fmt.scan(path, 0, rolled=False).valid_end == len(rec)
    # A field outside the body (QUEUEOFFSET) differs: only the property CRC can tell.
    bad = bytearray(rec)
    bad[20] ^= 0x01
    path = build(tmp_path, bytes(bad))
    scan = fmt.scan(path, 0, rolled=True)
    assert scan.valid_end == 0 and scan.problem is not None and "__CRC32#" in scan.problem


def test_corrupt_magic_is_a_problem_even_while_written(tmp_path: Path) -> None:
    a = encode_message(b"ok")
    bad = bytearray(encode_message(b"bad"))
    bad[4:8] = struct.pack(">I", 0xDEADBEEF)
    path = build(tmp_path, a, bytes(bad))
    scan = fmt.scan(path, 0, rolled=False)
    assert scan.valid_end == len(a) and not scan.complete
    assert scan.problem is not None and "unknown MAGICCODE 0xdeadbeef" in scan.problem


def test_half_written_magic_is_waited_for(tmp_path: Path) -> None:
    rec = encode_message(b"x")
    path = build(tmp_path, rec[:6])  # TOTALSIZE and half the MAGICCODE
    assert fmt.scan(path, 0, rolled=False) == Scan(0, False, None)


def test_totalsize_past_the_end_is_a_problem(tmp_path: Path) -> None:
    a = encode_message(b"ok")
    bad = bytearray(encode_message(b"bad"))
    bad[0:4] = struct.pack(">i", SIZE)  # from offset len(a), SIZE bytes do not fit
    path = build(tmp_path, a, bytes(bad))
    scan = fmt.scan(path, 0, rolled=False)
    assert scan.valid_end == len(a)
    assert scan.problem is not None and "past the file's end" in scan.problem


@pytest.mark.parametrize("total", [8, 90, -5])
def test_totalsize_below_a_message_is_a_problem(tmp_path: Path, total: int) -> None:
    bad = bytearray(encode_message(b"bad"))
    bad[0:4] = struct.pack(">i", total)
    scan = fmt.scan(build(tmp_path, bytes(bad)), 0, rolled=False)
    assert scan.valid_end == 0 and scan.problem is not None


def test_fewer_bytes_left_than_a_head_is_a_problem(tmp_path: Path) -> None:
    a = encode_message(b"a")
    path = build(tmp_path, a, size=len(a) + 5)
    scan = fmt.scan(path, 0, rolled=True)
    assert scan.valid_end == len(a) and scan.problem is not None


def test_reads_in_windows_not_the_whole_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A big record is read whole; otherwise no read is bigger than the window."""
    monkeypatch.setattr(rmq, "WINDOW", 1024)
    reads: list[int] = []
    real = os.pread

    def pread(fd: int, n: int, pos: int) -> bytes:
        reads.append(n)
        return real(fd, n, pos)

    monkeypatch.setattr(os, "pread", pread)
    small = [encode_message(b"s" * 50) for _ in range(30)]
    big = encode_message(b"B" * 5000)
    size = 64 * 1024
    path = build(tmp_path, *small, big, size=size)
    expect = sum(map(len, small)) + len(big)
    assert fmt.scan(path, 0, rolled=False).valid_end == expect
    assert max(reads) == len(big)
    assert sum(reads) < 3 * expect  # not the 64 KiB of the file


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    seed=st.integers(0, 2**32 - 1),
    messages=st.integers(0, 60),
    head_cut=st.one_of(st.just(8), st.integers(0, 8)),
    missing=st.one_of(st.integers(0, 40), st.integers(0, 5000)),
)
def test_never_valid_past_what_the_producer_completely_wrote(
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    messages: int,
    head_cut: int,
    missing: int,
) -> None:
    """The producer writes ``messages`` records, then the next one only partly (a prefix of its
    head, and the rest but its last ``missing`` bytes, as a forward copy racing the reader shows
    it). The reader
    says: every complete file complete, and the current one valid exactly through the complete
    records (or through the partial one only when all its bytes are already final)."""
    d = tmp_path_factory.mktemp("log")
    producer = CommitLogProducer(d, file_size=16 * 1024, seed=seed, max_body=2000)
    try:
        for _ in range(messages):
            producer.write_one()
        record = producer.next_record()
        rest_cut = max(0, len(record) - 8 - missing)
        start = producer.write_partial(record, head_cut, rest_cut)
    finally:
        producer.close()
    names = producer.names
    for name in names[:-1]:  # files before the current one ended with a BLANK
        path = str(d / name)
        assert fmt.scan(path, 0, rolled=True) == Scan(producer.file_size, True, None)
    path = str(d / producer.current)
    written = producer.written[producer.current]
    scan = fmt.scan(path, 0, rolled=False)
    assert scan.problem is None and not scan.complete
    on_disk = Path(path).read_bytes()
    if head_cut == 8 and rest_cut == len(record) - 8:
        assert scan.valid_end == start + len(record)
    elif scan.valid_end != written:
        # Only if the bytes still missing are zeros in the record too (nothing left to write).
        assert scan.valid_end == start + len(record)
        assert on_disk[start : scan.valid_end] == record
    # Resuming from any record boundary gives the same answer.
    for offset, _length in producer.records[producer.current][-3:]:
        assert fmt.scan(path, offset, rolled=False) == scan
