"""What the remote acknowledged for a seal's or a commit's parts is written in chunks of
``uploader.acks.CHUNK`` while parts are submitted and the rest once they are all sent, never one
transaction per part; a crash between a part's acknowledgement and its write costs a re-check (the
next drive lists the upload and adopts the part), never a loss, and no second send where the
listing proves the part (its MD5 ETag; its CRC32C in the crc32c mode, or where the listing shows
none, as moto's, its ETag being the MD5 of the local bytes). A crash late in a long drive costs only the parts whose
chunk was not written yet. Every manifest (SQLite, PostgreSQL), every remote.
"""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes, visible_keys
from uploader.acks import CHUNK
from uploader.manifest.repo import Manifest, utcnow


class Crash(BaseException):
    """The process dies here: no handler in the library catches it."""


SIZE = 3 * PART + 5  # four parts


def _segment(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(5).randbytes(SIZE)
    path = tmp_path / "seg"
    path.write_bytes(data)
    return path, data


def _count_writes(monkeypatch: pytest.MonkeyPatch, crash_after: int | None = None) -> list[int]:
    """The size of each ``parts_uploaded`` write; with ``crash_after``, the process dies at the
    write after that many."""
    calls: list[int] = []
    original = Manifest.parts_uploaded

    def counted(self: Manifest, lease: Any, acks: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(len(acks))
        if crash_after is not None and len(calls) > crash_after:
            raise Crash("the process dies after parts were acknowledged, before their write")
        original(self, lease, acks, *args, **kwargs)

    monkeypatch.setattr(Manifest, "parts_uploaded", counted)
    return calls


def test_a_seal_writes_its_parts_acks_at_once(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _data = _segment(tmp_path)
    calls = _count_writes(monkeypatch)
    store = make_store()
    result = store.segment("acks/seg", path).seal().result(timeout=120)
    assert result.verified and result.sent_parts == 4
    assert calls == [4]  # one write for the four acknowledged parts


@pytest.mark.parametrize("checksum", ["md5", "auto"])
def test_crash_between_the_acks_and_their_write_costs_a_recheck(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    checksum: str,
) -> None:
    path, data = _segment(tmp_path)

    _count_writes(monkeypatch, crash_after=0)
    store = make_store(checksum=checksum)
    with pytest.raises(Crash):
        store.segment("acks/seg", path).seal().result(timeout=120)
    store.abandon()
    monkeypatch.undo()
    rec = Manifest.open(store.manifest.url)
    try:
        seg = rec.segment("acks/seg")
        assert seg is not None and seg.state is uploader.SegmentState.SEALED
        assert {c.state for c in rec.commits(seg.id)} == {uploader.CommitState.PENDING}
        by_crc32c = seg.checksum == "crc32c"
    finally:
        rec.close()
    assert "acks/seg" not in visible_keys(remote)  # nothing published before its parts are
    later = make_store(checksum=checksum)
    later.manifest.clock = lambda: utcnow() + timedelta(minutes=10)  # the lease has expired
    report = later.recover()
    assert report.ok and report.verified == ("acks/seg",), report
    # The re-check: the upload listed, every part adopted, none sent again. With its recorded
    # MD5; in the crc32c mode (moto, whose listing shows no part checksums) by the listed ETag
    # being the MD5 of the local bytes whose CRC32C is the recorded one.
    assert (report.parts_reused, report.parts_sent) == (4, 0), (by_crc32c, report)
    assert remote_bytes(remote, "acks/seg") == data


def test_a_commits_acks_are_one_write_and_a_crash_before_it_costs_a_recheck(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commit path (a broker's appends): its parts' acknowledgements are written once all
    are answered; a crash before that write leaves them ``pending``, and recovery adopts them
    from the listing instead of sending them again (MD5 mode: the listing proves each part)."""
    data = random.Random(6).randbytes(3 * PART + 9)
    path = tmp_path / "seg"
    path.write_bytes(data)
    written = _count_writes(monkeypatch, crash_after=0)
    store = make_store(checksum="md5")
    with pytest.raises(Crash):
        store.segment("acks/commit", path).commit().result(timeout=120)
    assert written == [3]  # one write for the three parts, attempted once they were all sent
    store.abandon()
    monkeypatch.undo()
    later = make_store(checksum="md5")
    later.manifest.clock = lambda: utcnow() + timedelta(minutes=10)  # the lease has expired
    seg = later.manifest.segment("acks/commit")
    assert seg is not None and seg.state is uploader.SegmentState.OPEN
    assert [c.state for c in later.manifest.commits(seg.id)] == [uploader.CommitState.PENDING] * 3
    report = later.recover()  # the writer is gone: its open segment's pending parts
    assert report.ok, report
    assert (report.parts_reused, report.parts_sent) == (3, 0), report
    writer = later.segment("acks/commit", path)
    assert writer.seal().result(timeout=120).verified
    assert remote_bytes(remote, "acks/commit") == data


LONG = 20  # parts: more than CHUNK plus the slots, so a chunk is written before the last is sent


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_long_seal_writes_its_acks_in_chunks(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = random.Random(7).randbytes(LONG * PART)
    path = tmp_path / "seg"
    path.write_bytes(data)
    calls = _count_writes(monkeypatch)
    store = make_store(concurrency=2)
    result = store.segment("acks/long", path).seal().result(timeout=120)
    assert result.verified and result.sent_parts == LONG
    assert sum(calls) == LONG, calls  # every part written uploaded exactly once
    # The first chunk was written while parts were still being submitted, not at the end.
    assert len(calls) >= 2 and CHUNK <= calls[0] < LONG, calls


@pytest.mark.parametrize("checksum", ["md5", "auto"])
def test_a_crash_late_in_a_long_commit_costs_only_the_unwritten_chunk(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    checksum: str,
) -> None:
    data = random.Random(8).randbytes(LONG * PART + 11)
    path = tmp_path / "seg"
    path.write_bytes(data)
    calls = _count_writes(monkeypatch, crash_after=1)
    store = make_store(checksum=checksum, concurrency=2)
    with pytest.raises(Crash):
        store.segment("acks/long", path).commit().result(timeout=120)
    store.abandon()
    monkeypatch.undo()
    assert calls[0] >= CHUNK, calls  # the first chunk was written before the crash
    later = make_store(checksum=checksum)
    later.manifest.clock = lambda: utcnow() + timedelta(minutes=10)  # the lease has expired
    seg = later.manifest.segment("acks/long")
    assert seg is not None and seg.state is uploader.SegmentState.OPEN
    states = [c.state for c in later.manifest.commits(seg.id)]
    uploaded = states.count(uploader.CommitState.UPLOADED)
    assert uploaded == calls[0], states  # what the crash cost: only the parts after the chunk
    pending = len(states) - uploaded
    report = later.recover()  # the writer is gone: its open segment's pending parts
    assert report.ok, report
    assert report.parts_reused + report.parts_sent == pending, report
    if checksum == "md5":
        # The acknowledged parts (the crashed writes' last attempt held them all) are proven by
        # the listing's MD5 ETags; only the part recorded but never sent goes again.
        assert (report.parts_reused, report.parts_sent) == (calls[-1], pending - calls[-1])
        assert report.parts_sent <= 1, report
    writer = later.segment("acks/long", path)
    assert writer.seal().result(timeout=120).verified
    assert remote_bytes(remote, "acks/long") == data
