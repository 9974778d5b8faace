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

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory
from tests.cli.outage_helpers import wait_for
from uploader.driver import Driver
from uploader.manifest.repo import Manifest
from uploader.states import CommitState
from uploader.storage import open_storage
from uploader.storage.faults import Fault, FaultyStorage

pytestmark = pytest.mark.parametrize("remote", ["file"], indirect=True)


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
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store(storage=faulty, concurrency=1)
    seg = store.segment("log/0", path)
    record = store.manifest.segment("log/0")
    assert record is not None
    _append(path, 3 * PART)
    fut = seg.commit()
    try:
        # Part 2 is read and recorded while part 1 is still being sent; it waits for the slot
        # (part 3 is recorded only once part 2 has one: recording stays one part ahead).
        wait_for(lambda: len(store.manifest.commits(record.id)) == 2, "part 2 recorded")
        states = [c.state for c in store.manifest.commits(record.id)]
        assert states == [CommitState.PENDING] * 2
        assert not fut.done()
    finally:
        faulty.release()
    res = fut.result(timeout=60)
    assert (res.committed, res.sent_parts) == (3 * PART, 3)
    states = [c.state for c in store.manifest.commits(record.id)]
    assert states == [CommitState.UPLOADED] * 3
    assert seg.seal().result(timeout=60).verified


def test_a_commits_parts_are_written_uploaded_at_once_and_stay_in_flight_until_then(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store()
    seg = store.segment("log/0", path)
    record = store.manifest.segment("log/0")
    assert record is not None
    writes = _counted(monkeypatch, Manifest, "parts_uploaded")
    gate, entered = _gated(monkeypatch, Manifest, "parts_uploaded")
    drives = _counted(monkeypatch, Driver, "drive")
    _append(path, 3 * PART + 5)
    first = seg.commit()
    assert entered.wait(60)  # all three answered; their write waits at the gate
    states = [c.state for c in store.manifest.commits(record.id)]
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
    states = [c.state for c in store.manifest.commits(record.id)]
    assert states == [CommitState.UPLOADED] * 3
    assert seg.seal().result(timeout=60).verified


def test_commits_queued_before_a_seal_do_not_each_read_the_manifest(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"")
    store = make_store()
    seg = store.segment("log/0", path)
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
