"""The acknowledgement book alone: when it writes, what it counts as written, what a failed write
leaves (pure logic, no manifest)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from uploader.acks import Ack, AckBook
from uploader.records import CommitRecord
from uploader.states import CommitState


def _ack(n: int) -> Ack:
    commit = CommitRecord(
        id=n, segment_id=1, part_number=n, start=0, end=1, md5=None, crc32c=0, etag=None,
        state=CommitState.PENDING, attempts=0, last_error=None, reason=None,
    )  # fmt: skip
    return Ack(commit, f"etag-{n}", proven=False)


def test_writes_only_a_full_chunk_between_submissions_and_the_rest_at_the_end() -> None:
    writes: list[list[int]] = []
    book = AckBook(lambda acks: writes.append([a.commit.id for a in acks]), chunk=3)
    for n in (1, 2):
        book.add(_ack(n))
    book.write_due()
    assert writes == [] and book.written == frozenset()  # two waiting: not a chunk yet
    book.add(_ack(3))
    book.write_due()
    assert writes == [[1, 2, 3]] and book.written == {1, 2, 3}
    book.add(_ack(4))
    book.write_due()
    book.write_rest()
    book.write_rest()  # nothing waiting: no empty write
    assert writes == [[1, 2, 3], [4]] and book.written == {1, 2, 3, 4}


def test_a_failed_write_keeps_its_acks_waiting_and_not_written() -> None:
    writes: list[list[int]] = []
    fail = [True]

    def write(acks: Sequence[Ack]) -> None:
        if fail[0]:
            raise OSError("manifest unreachable")
        writes.append([a.commit.id for a in acks])

    book = AckBook(write, chunk=2)
    book.add(_ack(1))
    book.add(_ack(2))
    with pytest.raises(OSError):
        book.write_due()
    assert book.written == frozenset()
    book.add(_ack(3))
    fail[0] = False
    book.write_rest()
    assert writes == [[1, 2, 3]] and book.written == {1, 2, 3}
