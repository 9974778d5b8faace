"""Verified means verified: bytes that changed after their commit never become ``verified``.

Each case uploads some parts, then changes the local file behind the uploader's back (rewritten
in place, replaced by a new inode, truncated and re-extended with other bytes), then seals, either
through the writer (``seal()``) or, after the writer died, through ``recover()``. The segment must
end ``failed`` with a reason naming what changed, never ``verified``, never ``deletable``, and no
object with the changed bytes may appear at the key.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from uploader.errors import SegmentFailedError
from uploader.watch import Watcher


def rewrite_in_place(path: Path) -> str:
    with path.open("r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 100)
    return "changed after they were committed"


def replace_by_new_inode(path: Path) -> str:
    data = bytearray(path.read_bytes())
    data[PART + 10] ^= 0xFF
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)
    return "replaced by another file"


def replace_same_bytes_new_inode(path: Path) -> str:
    # Even identical bytes under a new inode are not the file that was registered.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(path.read_bytes())
    os.replace(tmp, path)
    return "replaced by another file"


def truncate_and_reextend(path: Path) -> str:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(PART // 2)
        f.seek(PART // 2)
        f.write(random.Random(9).randbytes(size - PART // 2))
    return "changed after they were committed"


CHANGES: dict[str, Callable[[Path], str]] = {
    "rewritten": rewrite_in_place,
    "new-inode": replace_by_new_inode,
    "same-bytes-new-inode": replace_same_bytes_new_inode,
    "truncated-reextended": truncate_and_reextend,
}


def _committed_file(make_store: StoreFactory, tmp_path: Path, key: str) -> tuple[Any, Any, Path]:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(1).randbytes(2 * PART + 1234))
    store = make_store()
    seg = store.segment(key, path)
    result = seg.commit().result(timeout=60)
    assert result.sent_parts == 2  # both whole parts are uploaded before the change
    return store, seg, path


def _assert_failed(store: uploader.Store, key: str, words: str, remote: Any) -> None:
    rec = store.manifest.segment(key)
    assert rec is not None
    assert rec.state is uploader.SegmentState.FAILED, rec
    assert rec.reason is not None and words in rec.reason, rec.reason
    assert key not in {r.key for r in store.deletable()}
    assert remote_bytes(remote, key) is None  # checked before completing: nothing published
    assert all(c.state is not uploader.CommitState.VERIFIED for c in store.manifest.commits(rec.id))


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_bytes_fail_the_writers_seal(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path, change: str
) -> None:
    key = f"rw/{change}"
    store, seg, path = _committed_file(make_store, tmp_path, key)
    words = CHANGES[change](path)
    with pytest.raises(SegmentFailedError, match=words):
        seg.seal().result(timeout=60)
    _assert_failed(store, key, words, remote)


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_changed_bytes_fail_recovery(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path, change: str
) -> None:
    key = f"rw/{change}"
    writer, _seg, path = _committed_file(make_store, tmp_path, key)
    # The writer records its seal, but its first remote call fails and it dies: recovery finishes.
    size = path.stat().st_size
    rec = writer.manifest.segment(key)
    assert rec is not None
    lease = writer.keeper.get(rec.id)
    assert lease is not None
    commits = writer.manifest.commits(rec.id)
    # In the segment's own checksum mode (crc32c where the remote keeps it: no MD5s).
    final = writer.transport.digest(str(path), [(3, 2 * PART, size)], md5=not rec.by_crc32c)
    from uploader.digest import combine_crcs
    from uploader.seal import expected_etag

    writer.manifest.seal(
        lease,
        final,
        size=size,
        crc32c=combine_crcs([(c.crc32c, c.size) for c in commits] + [(final[0].crc32c, 1234)]),
        expected_etag=expected_etag([c.md5 for c in commits] + [final[0].md5]),
        upload_mode="multipart",
    )
    writer.abandon()
    words = CHANGES[change](path)
    worker = make_store()
    # The dead writer's lease is judged expired by the manifest's clock, then the claim succeeds.
    worker.manifest.clock = _ahead(worker.manifest.clock, 60)
    report = worker.recover()
    assert [k for k, _ in report.failed] == [key], report
    assert not report.verified
    _assert_failed(worker, key, words, remote)


def _ahead(clock: Callable[[], Any], seconds: float) -> Callable[[], Any]:
    from datetime import timedelta

    return lambda: clock() + timedelta(seconds=seconds)


def test_watch_on_a_preallocated_file_never_verifies_zeros(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A file created at full size and written in place (RocketMQ's commit log) under the
    default ``append`` format: the zeros it commits are rewritten later, and the seal fails."""
    d = tmp_path / "commitlog"
    d.mkdir()
    first = d / f"{0:020d}"
    first.write_bytes(b"\0" * (3 * PART))  # preallocated
    with first.open("r+b") as f:
        f.write(random.Random(2).randbytes(PART // 3))  # the broker's first messages
    store = make_store()
    watcher = Watcher(store, d, key_prefix="commitlog/")
    report = watcher.tick()
    assert not report.errors, report
    assert report.committed  # whole parts of zeros went out
    with first.open("r+b") as f:  # the broker goes on writing in place
        f.seek(PART // 3)
        f.write(random.Random(3).randbytes(2 * PART))
    (d / f"{3 * PART:020d}").write_bytes(b"\0" * (3 * PART))  # the file rolls
    report = watcher.tick()
    key = f"commitlog/{first.name}"
    assert key in {k for k, _ in report.errors}, report
    _assert_failed(store, key, "changed after they were committed", remote)
