"""A broker's commits as a pipeline: what keeps the remote busy while the appends go on.

* A part takes one of the store's slots only to be sent: the next part is read and recorded
  ``pending`` while every slot is busy, so a slot freed goes to a part already recorded.
* The parts one commit sent are written ``uploaded`` in one transaction once they are all
  answered (not one per part, in the slot); until then they count as in flight, so a commit
  running meanwhile does not take them for failed sends.
* Commits asked before a seal (a broker that does not await its commits seals while most are
  queued) answer from what the writer recorded, not with one manifest read each.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory
from tests.cli.outage_helpers import wait_for
from uploader.digest import crc32c_of
from uploader.driver import Driver
from uploader.errors import (
    SegmentSealedError,
    StaleStateError,
    UsageError,
    WorkInterruptedError,
)
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit
from uploader.states import CommitState
from uploader.storage import open_storage
from uploader.storage.faults import Fault, FaultyStorage

pytestmark = pytest.mark.parametrize("remote", ["file"], indirect=True)


def _writer(
    make_store: StoreFactory, tmp_path: Path, **kwargs: Any
) -> tuple[uploader.Store, uploader.Segment, Path]:
    """A store (``kwargs`` for it) and its writer of ``log/0``, an empty local file."""
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store(**kwargs)
    return store, store.segment("log/0", path), path


def _states(store: uploader.Store) -> list[CommitState]:
    """The states of ``log/0``'s parts, in order."""
    record = store.manifest.segment("log/0")
    assert record is not None
    return [c.state for c in store.manifest.commits(record.id)]


def _append(path: Path, n: int, byte: bytes = b"a") -> None:
    with path.open("ab") as f:
        f.write(byte * n)


def _counted(monkeypatch: pytest.MonkeyPatch, cls: type, name: str) -> list[str]:
    """Count calls of ``cls.name`` (by the calling thread's name)."""
    calls: list[str] = []
    original: Callable[..., Any] = getattr(cls, name)

    def counted(self: Any, *a: Any, **k: Any) -> Any:
        calls.append(threading.current_thread().name)
        return original(self, *a, **k)

    monkeypatch.setattr(cls, name, counted)
    return calls


def _gated(
    monkeypatch: pytest.MonkeyPatch, cls: type, name: str
) -> tuple[threading.Event, threading.Event]:
    """The first call of ``cls.name`` waits for the returned gate; ``entered`` is set when it
    waits."""
    gate, entered = threading.Event(), threading.Event()
    original: Callable[..., Any] = getattr(cls, name)

    def held(self: Any, *a: Any, **k: Any) -> Any:
        if not entered.is_set():
            entered.set()
            assert gate.wait(60), "the test never opened the gate"
        return original(self, *a, **k)

    monkeypatch.setattr(cls, name, held)
    return gate, entered


def test_the_next_part_is_recorded_while_every_slot_is_sending(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path,
) -> None:  # fmt: skip
    url, options = remote
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="upload_part", kind="hang", times=1))  # part 1 holds the only slot
    store, seg, path = _writer(make_store, tmp_path, storage=faulty, concurrency=1)
    _append(path, 3 * PART)
    fut = seg.commit()
    try:
        # Part 2 is read and recorded while part 1 is still being sent; it waits for the slot
        # (part 3 is recorded only once part 2 has one: recording stays one part ahead).
        wait_for(lambda: len(_states(store)) == 2, "part 2 recorded")
        states = _states(store)
        assert states == [CommitState.PENDING] * 2
        assert not fut.done()
    finally:
        faulty.release()
    res = fut.result(timeout=60)
    assert (res.committed, res.sent_parts) == (3 * PART, 3)
    states = _states(store)
    assert states == [CommitState.UPLOADED] * 3
    assert seg.seal().result(timeout=60).verified


def test_a_commits_parts_are_written_uploaded_at_once_and_stay_in_flight_until_then(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, seg, path = _writer(make_store, tmp_path)
    writes = _counted(monkeypatch, Manifest, "parts_uploaded")
    gate, entered = _gated(monkeypatch, Manifest, "parts_uploaded")
    drives = _counted(monkeypatch, Driver, "drive")
    _append(path, 3 * PART + 5)
    first = seg.commit()
    assert entered.wait(60)  # all three answered; their write waits at the gate
    states = _states(store)
    assert states == [CommitState.PENDING] * 3
    # A commit meanwhile sees three pending parts: in flight, not failed sends to drive.
    _append(path, 7)
    second = seg.commit()
    res = second.result(timeout=60)
    assert (res.committed, res.sent_parts, res.carried_bytes) == (3 * PART, 0, 12)
    assert drives == []
    gate.set()
    assert first.result(timeout=60).sent_parts == 3
    assert len(writes) == 1  # one transaction for the three parts
    states = _states(store)
    assert states == [CommitState.UPLOADED] * 3
    assert seg.seal().result(timeout=60).verified


def test_commits_queued_before_a_seal_do_not_each_read_the_manifest(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, seg, path = _writer(make_store, tmp_path)
    gate, entered = _gated(monkeypatch, Manifest, "add_commits")
    _append(path, PART + 1)
    futures = [seg.commit()]  # records part 1 at the gate: the commits below queue behind it
    assert entered.wait(60)
    for _ in range(10):
        _append(path, 1)
        futures.append(seg.commit())
    sealed = seg.seal()  # asked while the ten commits are queued
    reads = _counted(monkeypatch, Manifest, "pending_commits")
    gate.set()
    results = [f.result(timeout=60) for f in futures]
    assert sealed.result(timeout=60).verified
    assert [r.committed for r in results] == [PART] * 11
    # The first queued commit may read (the part in flight left nothing to answer from yet);
    # the rest answer from it. Before: every one of the ten read the manifest.
    assert len(reads) <= 2, reads


def test_a_commit_that_finishes_late_does_not_move_the_committed_end_back(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, seg, path = _writer(make_store, tmp_path)
    gate, entered = _gated(monkeypatch, Manifest, "parts_uploaded")
    _append(path, PART + 1)
    first = seg.commit()  # part 1: its acknowledgement's write waits at the gate
    assert entered.wait(60)
    _append(path, PART)
    assert seg.commit().result(timeout=60).committed == 2 * PART  # part 2, done first
    gate.set()
    assert first.result(timeout=60).committed == PART  # finished last, with its older view
    # The committed end is 2 parts: an end below it is refused, as the manifest would.
    with pytest.raises(UsageError, match="below"):
        seg.commit(upto=PART + 5)
    assert seg.commit().result(timeout=60).committed == 2 * PART
    assert seg.seal().result(timeout=60).verified


def test_acknowledgements_not_written_make_the_next_commit_drive_the_parts(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, seg, path = _writer(make_store, tmp_path)
    original = Manifest.parts_uploaded
    failures = [RuntimeError("the manifest refused the write")]

    def flaky(self: Manifest, *a: Any, **k: Any) -> None:
        if failures:
            raise failures.pop()
        original(self, *a, **k)

    monkeypatch.setattr(Manifest, "parts_uploaded", flaky)
    drives = _counted(monkeypatch, Driver, "drive")
    _append(path, 2 * PART)
    with pytest.raises(RuntimeError, match="refused the write"):
        seg.commit().result(timeout=60)
    assert _states(store) == [CommitState.PENDING] * 2
    _append(path, 3)  # no whole part: but two pending parts no job is sending
    res = seg.commit().result(timeout=60)
    assert len(drives) == 1 and res.committed == 2 * PART
    assert _states(store) == [CommitState.UPLOADED] * 2
    assert seg.seal().result(timeout=60).verified


def test_acknowledgements_for_an_upload_reset_meanwhile_are_refused(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"x" * PART)
    store = make_store()
    store.segment("log/0", path)
    record = store.manifest.segment("log/0")
    assert record is not None
    lease = store.keeper.get(record.id)
    assert lease is not None
    m = store.manifest
    m.set_upload(lease, "upload-1", "multipart")
    digest = hashlib.md5(b"x" * PART).hexdigest()
    [commit] = m.add_commits(lease, [NewCommit(1, 0, PART, digest, crc32c_of(b"x" * PART))])
    m.set_upload(lease, "upload-2", "multipart")  # a drive reset the upload meanwhile
    with pytest.raises(StaleStateError, match="upload-1"):
        m.parts_uploaded(lease, [(commit, digest)], upload_id="upload-1")
    assert [c.state for c in m.commits(record.id)] == [CommitState.PENDING]
    m.parts_uploaded(lease, [(commit, digest)], upload_id="upload-2")
    assert [c.state for c in m.commits(record.id)] == [CommitState.UPLOADED]
    # Written again (a transaction whose answer was lost, tried again with later acks): the
    # same ETag is no news; another one is refused.
    [second] = m.add_commits(lease, [NewCommit(2, PART, 2 * PART, digest, crc32c_of(b"x" * PART))])
    m.parts_uploaded(lease, [(commit, digest), (second, digest)], upload_id="upload-2")
    assert [c.state for c in m.commits(record.id)] == [CommitState.UPLOADED] * 2
    audited = [e for e in m.events(record.id) if e.commit_id == commit.id]
    assert [(e.from_state, e.to_state) for e in audited][-1] == ("pending", "uploaded")
    assert sum(e.to_state == "uploaded" for e in audited) == 1  # not moved twice
    other = hashlib.md5(b"y").hexdigest()
    with pytest.raises(StaleStateError):
        m.parts_uploaded(lease, [(commit, other)], proven=frozenset({commit.id}))


def test_an_interrupted_store_starts_no_part_of_a_commit(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store, seg, path = _writer(make_store, tmp_path)
    _append(path, PART)
    store.stop_sending()
    with pytest.raises(WorkInterruptedError):
        seg.commit().result(timeout=60)
    # Recorded before it would have been sent: left pending for recovery, nothing sent.
    assert _states(store) == [CommitState.PENDING]


def test_a_commit_asked_after_the_seal_is_refused_even_while_the_seal_is_queued(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, seg, path = _writer(make_store, tmp_path)
    _append(path, PART + 1)
    assert seg.commit().result(timeout=60).committed == PART  # the writer knows its segment now
    gate, entered = _gated(monkeypatch, Manifest, "add_commits")
    _append(path, PART)
    first = seg.commit()  # part 2 waits at the gate: the seal and the commit below queue
    assert entered.wait(60)
    sealed = seg.seal()
    late = seg.commit()  # asked after the seal: it runs after it, and must not answer "open"
    gate.set()
    assert first.result(timeout=60).committed == 2 * PART
    assert sealed.result(timeout=60).verified
    # Refused as a commit after the seal (not as a lease lost to another worker), never
    # answered from what the writer knew before the seal.
    with pytest.raises(SegmentSealedError, match="already verified; commit after seal"):
        late.result(timeout=60)
