"""A seal's parts: what the remote acknowledged is written in one transaction once they are all
sent, not one per part; a crash between a part's acknowledgement and that write costs a re-check
(the next drive lists the upload and adopts the part), never a loss, and no second send where
the listing proves the part (its MD5 ETag; its CRC32C in the crc32c mode, which moto's ListParts
does not show: there the parts are sent again). Every manifest (SQLite, PostgreSQL), every remote.
"""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes, visible_keys
from uploader.manifest.repo import Manifest, utcnow


class Crash(BaseException):
    """The process dies here: no handler in the library catches it."""


SIZE = 3 * PART + 5  # four parts


def _segment(tmp_path: Path) -> tuple[Path, bytes]:
    data = random.Random(5).randbytes(SIZE)
    path = tmp_path / "seg"
    path.write_bytes(data)
    return path, data


def test_a_seal_writes_its_parts_acks_at_once(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _data = _segment(tmp_path)
    calls: list[int] = []
    original = Manifest.parts_uploaded

    def counted(self: Manifest, lease: Any, acks: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(len(acks))
        original(self, lease, acks, *args, **kwargs)

    monkeypatch.setattr(Manifest, "parts_uploaded", counted)
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

    def crash(*args: Any, **kwargs: Any) -> None:
        raise Crash("the process dies after the parts were acknowledged, before they are written")

    monkeypatch.setattr(Manifest, "parts_uploaded", crash)
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
    if not by_crc32c:
        # The re-check: the upload listed, every part adopted with its recorded MD5, none sent
        # again.
        assert (report.parts_reused, report.parts_sent) == (4, 0), report
    else:
        # No MD5 was taken: a listed part is adopted only by the CRC32C the listing shows, which
        # moto's does not; whatever was not proven is sent again (never adopted unproven).
        assert report.parts_reused + report.parts_sent == 4, report
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
    written: list[int] = []

    def crash(self: Manifest, lease: Any, acks: Any, *args: Any, **kwargs: Any) -> None:
        written.append(len(acks))
        raise Crash("the process dies after the parts were acknowledged, before they are written")

    monkeypatch.setattr(Manifest, "parts_uploaded", crash)
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
