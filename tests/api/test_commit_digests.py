"""A commit that covers several whole parts (a writer catching up) records and sends them in order,
each row with the checksums of its own range; a file cut short under it fails that commit with
the file named, leaves every slot free and loses nothing recorded."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory, remote_bytes
from uploader.digest import Payload, digest_range
from uploader.errors import LocalFileError
from uploader.states import CommitState


def test_a_catching_up_commit_sends_every_part_in_order(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    data = random.Random(3).randbytes(5 * PART + 123)
    path.write_bytes(data)
    store = make_store(concurrency=2)
    seg = store.segment("catch-up/0", path)
    res = seg.commit().result(timeout=120)
    assert (res.committed, res.sent_parts) == (5 * PART, 5)
    record = store.manifest.segment("catch-up/0")
    assert record is not None
    commits = store.manifest.commits(record.id)
    assert [(c.part_number, c.start, c.end) for c in commits] == [
        (n + 1, n * PART, (n + 1) * PART) for n in range(5)
    ]
    for c in commits:
        # Each row's checksums are those of its own range.
        want = digest_range(str(path), c.start, c.end, md5=c.md5 is not None)
        assert (c.crc32c, c.md5) == (want.crc32c, want.md5)
        assert c.state is CommitState.UPLOADED
    assert seg.seal().result(timeout=120).verified
    assert remote_bytes(remote, "catch-up/0") == data


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_file_cut_short_under_a_catching_up_commit(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seg"
    data = random.Random(4).randbytes(4 * PART)
    path.write_bytes(data)
    store = make_store(concurrency=2)
    seg = store.segment("cut/0", path)
    real = digest_range

    def cutting(p: str, start: int, end: int, *, md5: bool = True) -> Payload:
        # The digest of the third part finds the file cut to two parts and a half.
        if start == 2 * PART:
            os.truncate(path, 2 * PART + PART // 2)
        return real(p, start, end, md5=md5)

    monkeypatch.setattr("uploader.segment.digest_range", cutting)
    with pytest.raises(LocalFileError, match=re.escape(str(path))):
        seg.commit().result(timeout=120)
    record = store.manifest.segment("cut/0")
    assert record is not None
    commits = store.manifest.commits(record.id)
    # What was recorded before the cut is whole and in order; nothing past it.
    assert [(c.part_number, c.start, c.end) for c in commits] == [(1, 0, PART), (2, PART, 2 * PART)]
    # Every slot is free again: a new commit can take them all.
    slots = store.transport.slots
    assert all(slots.acquire(blocking=False) for _ in range(2))
    for _ in range(2):
        slots.release()
