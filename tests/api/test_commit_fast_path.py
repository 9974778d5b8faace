"""A commit that adds no whole part answers from what its writer recorded under the same lease,
without reading the manifest; anything that could make that stale (a failed send, a seal, a new
lease) sends the next commit through the manifest again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory
from uploader.manifest.repo import Manifest
from uploader.states import CommitState
from uploader.storage import open_storage
from uploader.storage.faults import Fault, FaultyStorage

READS = ("progress", "pending_commits", "segment_by_id", "commits", "position")


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    calls = dict.fromkeys(READS, 0)
    for name in READS:
        original: Callable[..., Any] = getattr(Manifest, name)

        def counted(self: Manifest, *a: Any, _n: str = name, _f: Any = original, **k: Any) -> Any:
            calls[_n] += 1
            return _f(self, *a, **k)

        monkeypatch.setattr(Manifest, name, counted)
    return calls


def _append(path: Path, n: int, byte: bytes = b"a") -> None:
    with path.open("ab") as f:
        f.write(byte * n)


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_commits_without_a_whole_part_read_nothing(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store()
    seg = store.segment("log/0", path)
    _append(path, PART + 10)
    assert seg.commit().result(timeout=60).committed == PART  # the full path: one part
    calls = _count_reads(monkeypatch)
    for i in range(5):
        _append(path, 10)
        res = seg.commit().result(timeout=60)
        assert (res.committed, res.sent_parts, res.carried_bytes) == (PART, 0, 20 + 10 * i)
    assert calls == dict.fromkeys(READS, 0)  # five commits, no manifest read
    # A whole part appended: the manifest is read and written as before.
    _append(path, PART)
    res = seg.commit().result(timeout=60)
    assert (res.committed, res.sent_parts) == (2 * PART, 1)
    assert calls["progress"] >= 1
    assert seg.seal().result(timeout=60).verified
    # After the seal the answer comes from the manifest (sealed: refused).
    with pytest.raises(Exception, match="already"):
        seg.commit()


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_a_failed_send_makes_the_next_commit_drive_the_resend(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    url, options = remote
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store(storage=faulty)
    seg = store.segment("log/0", path)
    _append(path, PART + 3)
    seg.commit().result(timeout=60)  # the upload exists, part 1 sent
    faulty.add(Fault(op="upload_part", times=1))
    _append(path, PART)
    failed = seg.commit()
    with pytest.raises(Exception):  # noqa: B017 - the injected remote error, whatever its type
        failed.result(timeout=60)
    record = store.manifest.segment("log/0")
    assert record is not None
    states = [c.state for c in store.manifest.commits(record.id)]
    assert states == [CommitState.UPLOADED, CommitState.PENDING]  # intent kept, not sent
    calls = _count_reads(monkeypatch)
    _append(path, 1)  # no whole part added, but a pending part to re-send: the full path
    seg.commit().result(timeout=60)
    assert calls["pending_commits"] >= 1
    states = [c.state for c in store.manifest.commits(record.id)]
    assert states == [CommitState.UPLOADED, CommitState.UPLOADED]
    assert seg.seal().result(timeout=60).verified
