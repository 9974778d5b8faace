"""``Store.ship_many``: the group commit of small segments.

Its rows, states and audit events are those of ``store.segment(key, path).seal()``; a batch's
intents and its outcomes are one transaction each; a fault at any segment's PUT, or a crash
between the two transactions, leaves what recovery finishes (bytes compared); a segment another
process holds is reported, not taken. Every manifest (SQLite, PostgreSQL), every remote.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from uploader import group
from uploader.errors import (
    InvalidKeyError,
    KeyConflictError,
    LeaseLostError,
    LocalFileError,
    SegmentBusyError,
    StorageError,
    UsageError,
    WorkInterruptedError,
)
from uploader.manifest.repo import Manifest, utcnow
from uploader.manifest.rowmap import SEGMENTS
from uploader.storage import Fault, FaultyStorage, base, open_storage


class Crash(BaseException):
    """The process dies here: no handler in the library catches it."""


def _files(directory: Path, sizes: list[int], seed: int = 7) -> list[tuple[Path, bytes]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    for i, size in enumerate(sizes):
        data = rng.randbytes(size)
        path = directory / f"{i:04d}"
        path.write_bytes(data)
        out.append((path, data))
    return out


def _story(m: Manifest, key: str, root: Path) -> dict[str, Any]:
    """A segment's row, parts and audit trail, without what differs between two shippings of the
    same bytes (ids, times, the worker's name, the directory)."""
    rec = m.segment(key)
    assert rec is not None
    parts = {c.id: c.part_number for c in m.commits(rec.id)}
    return {
        "row": (
            rec.state,
            rec.size,
            rec.crc32c,
            rec.expected_etag,
            rec.upload_mode,
            rec.upload_id,
            rec.object_etag,
            rec.fence,
            rec.lease_owner,
            rec.lease_expires,
            rec.attempts,
            rec.last_error,
            rec.reason,
            rec.verified_at is not None,
            rec.sealed_at is not None,
            rec.file_inode is not None,
        ),
        "parts": [
            (c.part_number, c.start, c.end, c.md5, c.crc32c, c.etag, c.state, c.attempts)
            for c in m.commits(rec.id)
        ],
        "events": [
            (
                None if e.commit_id is None else parts[e.commit_id],
                e.from_state,
                e.to_state,
                e.fence,
                (e.detail or "").replace(str(root), "<dir>"),
            )
            for e in m.events(rec.id)
        ],
    }


def test_rows_states_events_as_one_at_a_time(make_store: StoreFactory, tmp_path: Path) -> None:
    sizes = [0, 1, 1000, PART // 3, PART]  # empty, tiny, and exactly one part
    one = _files(tmp_path / "one", sizes)
    many = _files(tmp_path / "many", sizes)
    store = make_store()
    singles = [store.segment(f"one/{p.name}", p).seal() for p, _ in one]
    assert all(f.result(timeout=60).verified for f in singles)
    results = [
        f.result(timeout=60) for f in store.ship_many([(f"many/{p.name}", p) for p, _ in many])
    ]
    for (_p, data), res, single in zip(many, results, singles, strict=True):
        assert res == dataclasses.replace(single.result(), key=res.key)
        assert res.verified and res.committed == len(data)
    for (p, _), (q, _) in zip(one, many, strict=True):
        a = _story(store.manifest, f"one/{p.name}", tmp_path / "one")
        b = _story(store.manifest, f"many/{q.name}", tmp_path / "many")
        assert a == b
        assert [e[2] for e in b["events"]] == [
            "open",
            "pending",
            "sealed",
            "uploaded",
            "uploaded",
            "verified",
            "verified",
        ]


def test_a_batch_is_two_transactions(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _files(tmp_path / "seg", [100 + i for i in range(12)])
    store = make_store(lease_seconds=600)  # no heartbeat write during the test
    writes: list[str] = []
    original = Manifest._write

    def counted(self: Manifest) -> Any:
        writes.append("write")
        return original(self)

    monkeypatch.setattr(Manifest, "_write", counted)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    assert all(f.result(timeout=60).verified for f in futures)
    assert writes == ["write", "write"]  # the intents, then the outcomes, of all twelve
    monkeypatch.setattr(group, "BATCH", 5)
    writes.clear()
    more = _files(tmp_path / "more", [50] * 12, seed=8)
    futures = store.ship_many([(f"more/{p.name}", p) for p, _ in more])
    assert all(f.result(timeout=60).verified for f in futures)
    assert len(writes) == 6  # three batches (5, 5, 2), two transactions each


def test_the_next_batch_is_registered_while_the_last_ones_puts_are_out(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The group commit's pipeline: batch 2's intents are written while batch 1's PUTs are held
    back (they go only once batch 2 is registered; a group that waited for batch 1 first would
    never register batch 2 and the held PUTs would give up), and batch 2's PUTs go out while
    batch 1's outcomes are held back (the remote is not left waiting for them); a batch is
    registered only once the PUTs of the one two before it are answered (at most two batches'
    bytes held)."""
    monkeypatch.setattr(group, "BATCH", 3)
    files = _files(tmp_path / "seg", [40 + i for i in range(7)])  # batches of 3, 3, 1
    store = make_store()
    order: list[str] = []
    second_registered, second_sent = threading.Event(), threading.Event()
    intents, settle, send = Manifest.seal_small_many, Manifest.settle_puts, base.put_many

    def registering(self: Manifest, items: Any, **kwargs: Any) -> Any:
        order.append(f"intents {len(items)}")
        rows = intents(self, items, **kwargs)
        if sum(what.startswith("intents") for what in order) == 2:
            second_registered.set()
        return rows

    def sending(storage: Any, items: Any, **kwargs: Any) -> Any:
        if not order.count("puts"):
            assert second_registered.wait(timeout=60), "batch 2 was not registered meanwhile"
        order.append("puts")
        try:
            return send(storage, items, **kwargs)
        finally:
            order.append("answered")
            if order.count("answered") == 2:
                second_sent.set()

    def settling(self: Manifest, proven: Any, failed: Any) -> Any:
        if not order.count("outcomes"):
            assert second_sent.wait(timeout=60), "batch 2's PUTs waited for batch 1's outcomes"
        order.append("outcomes")
        return settle(self, proven, failed)

    monkeypatch.setattr(Manifest, "seal_small_many", registering)
    monkeypatch.setattr(Manifest, "settle_puts", settling)
    monkeypatch.setattr(group, "put_many", sending)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    assert all(f.result(timeout=60).verified for f in futures)
    assert order[:3] == ["intents 3", "intents 3", "puts"]
    sends = [i for i, what in enumerate(order) if what == "puts"]
    answered = [i for i, what in enumerate(order) if what == "answered"]
    outcomes = [i for i, what in enumerate(order) if what == "outcomes"]
    assert len(sends) == len(answered) == len(outcomes) == 3
    assert sends[1] < outcomes[0]  # batch 2 went out while batch 1's outcomes were held
    assert order.index("intents 1") > answered[0]  # batch 3 read once batch 1 was answered
    assert all(answered[k] < sends[k + 1] for k in range(2))  # one batch's PUTs at a time


def _later(store: uploader.Store) -> uploader.Store:
    """Another worker, later: a dead writer's leases have expired by its clock."""
    store.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    return store


def _all_verified(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    files: list[tuple[Path, bytes]],
    prefix: str,
) -> None:
    store = _later(make_store())
    report = store.recover()
    assert report.ok, report
    assert store.recover().resumed == 0  # nothing left: idempotent
    for p, data in files:
        rec = store.manifest.segment(f"{prefix}{p.name}")
        assert rec is not None and rec.state is uploader.SegmentState.VERIFIED, rec
        assert {c.state for c in store.manifest.commits(rec.id)} == {uploader.CommitState.VERIFIED}
        assert remote_bytes(remote, f"{prefix}{p.name}") == data


@pytest.mark.parametrize("when", ["before", "after"])
def test_fault_at_the_kth_put_then_recover(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    when: str,
) -> None:
    url, options = remote
    files = _files(tmp_path / "seg", [300 + i for i in range(8)])
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(
        Fault(
            op="put",
            when=when,  # type: ignore[arg-type]
            after_calls=3,
            times=1,
            error=lambda: StorageError("injected: the 4th PUT fails"),
        )
    )
    store = make_store(storage=faulty, concurrency=1)  # one at a time: the 4th is the 4th
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    outcomes: list[bool | str] = []
    for f in futures:
        try:
            outcomes.append(f.result(timeout=60).verified)
        except StorageError as exc:
            outcomes.append(str(exc))
    assert len(faulty.injected) == 1
    assert outcomes == [True] * 3 + ["injected: the 4th PUT fails"] + [True] * 4
    # The failure is in the manifest (invariant 5), written with the batch's outcomes.
    failed = store.manifest.segment(f"seg/{files[3][0].name}")
    assert failed is not None and failed.state is uploader.SegmentState.SEALED
    assert failed.lease_owner is None  # given back: recovery claims it at once
    [part] = store.manifest.commits(failed.id)
    assert part.state is uploader.CommitState.PENDING and part.attempts == 1
    assert part.last_error is not None and "injected" in part.last_error
    store.close()
    _all_verified(make_store, remote, files, "seg/")


def test_crash_between_intents_and_outcomes_then_recover(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = _files(tmp_path / "seg", [200 + i for i in range(6)])
    store = make_store()

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash("the process dies before the outcomes are written")

    monkeypatch.setattr(Manifest, "settle_puts", crash)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    for f in futures:
        assert isinstance(f.exception(timeout=60), Crash)
    store.abandon()
    monkeypatch.undo()
    m = Manifest.open(store.manifest.url)
    try:
        # The intents are durable: every segment sealed, its part pending, its bytes at the key.
        for p, data in files:
            rec = m.segment(f"seg/{p.name}")
            assert rec is not None and rec.state is uploader.SegmentState.SEALED
            assert [c.state for c in m.commits(rec.id)] == [uploader.CommitState.PENDING]
            assert remote_bytes(remote, f"seg/{p.name}") == data
    finally:
        m.close()
    _all_verified(make_store, remote, files, "seg/")


def test_a_lease_taken_over_before_the_outcomes_refuses_that_segment_alone(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The outcomes of a batch are written set-based when every segment is still ours; one
    segment whose lease was taken over meanwhile (its fence moved) turns that write back, and
    the batch is written one segment at a time instead: the others verified, that one refused
    and left to its new holder (here: recovery, once the lease is free)."""
    files = _files(tmp_path / "seg", [300 + i for i in range(5)])
    store = make_store()
    stolen = f"seg/{files[2][0].name}"
    original = Manifest.settle_puts

    def take_over_then_settle(self: Manifest, *args: Any, **kwargs: Any) -> Any:
        with self.engine.begin() as conn:
            conn.execute(
                update(SEGMENTS)
                .where(SEGMENTS.c.key == stolen)
                .values(fence=SEGMENTS.c.fence + 1, lease_owner="another-worker")
            )
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Manifest, "settle_puts", take_over_then_settle)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    for (p, _), f in zip(files, futures, strict=True):
        if f"seg/{p.name}" == stolen:
            assert isinstance(f.exception(timeout=60), LeaseLostError)
        else:
            assert f.result(timeout=60).verified
    monkeypatch.undo()
    rec = store.manifest.segment(stolen)
    assert rec is not None and rec.state is uploader.SegmentState.SEALED
    assert rec.lease_owner == "another-worker"
    # The other worker goes away and gives its lease back: recovery finishes the segment.
    with store.manifest.engine.begin() as conn:
        conn.execute(
            update(SEGMENTS)
            .where(SEGMENTS.c.key == stolen)
            .values(lease_owner=None, lease_expires=None)
        )
    store.close()
    _all_verified(make_store, remote, files, "seg/")


def test_crash_after_the_intents_before_any_put(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = _files(tmp_path / "seg", [64, 65, 66])
    store = make_store()
    original = Manifest.seal_small_many

    def then_crash(self: Manifest, *args: Any, **kwargs: Any) -> Any:
        original(self, *args, **kwargs)
        raise Crash("the process dies right after the intents")

    monkeypatch.setattr(Manifest, "seal_small_many", then_crash)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    for f in futures:
        assert isinstance(f.exception(timeout=60), Crash)
    store.abandon()
    monkeypatch.undo()
    for p, _ in files:
        assert remote_bytes(remote, f"seg/{p.name}") is None  # nothing was sent
    _all_verified(make_store, remote, files, "seg/")


def test_interrupted_before_the_batch_is_sent(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Told to stop (SIGINT) once the intents are written, just as the batch's PUTs go: none is
    sent, each item says so, its lease is given back, and recovery finishes every segment."""
    files = _files(tmp_path / "seg", [70, 71, 72])
    store = make_store()
    original = base.put_many

    def stop_first(*args: Any, **kwargs: Any) -> Any:
        store.transport.stop.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(group, "put_many", stop_first)
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    for f in futures:
        error = f.exception(timeout=60)
        assert isinstance(error, WorkInterruptedError) and "uploader recover" in str(error)
    for p, _ in files:
        rec = store.manifest.segment(f"seg/{p.name}")
        assert rec is not None and rec.state is uploader.SegmentState.SEALED
        assert rec.lease_owner is None  # given back: a recovery worker claims it at once
        assert remote_bytes(remote, f"seg/{p.name}") is None
    store.abandon()
    monkeypatch.undo()
    _all_verified(make_store, remote, files, "seg/")


def test_deep_verification_reads_every_object_back(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With ``verify="deep"`` every object of a batch is read back before it is verified, as a
    seal alone does, even where the PUT's own answer proved it."""
    files = _files(tmp_path / "seg", [0, 10, 3000, PART])
    store = make_store(verify="deep")
    reads: list[str] = []
    original = store.storage.read

    def read(key: str, start: int, end: int) -> bytes:
        reads.append(key)
        return original(key, start, end)

    monkeypatch.setattr(store.storage, "read", read)
    results = [
        f.result(timeout=60) for f in store.ship_many([(f"d/{p.name}", p) for p, _ in files])
    ]
    assert all(r.verified for r in results)
    # Every non-empty object read back (an empty one has no byte to read).
    assert set(reads) >= {f"d/{p.name}" for p, data in files if data}
    for p, data in files:
        assert remote_bytes(remote, f"d/{p.name}") == data


def test_a_segment_another_process_holds_is_reported_not_taken(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    files = _files(tmp_path / "seg", [100, 101, 102, 103])
    other = make_store(worker="other-process", node="elsewhere")
    held = other.segment(f"seg/{files[1][0].name}", files[1][0])
    before = held.record
    store = make_store()
    futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    busy = futures[1].exception(timeout=60)
    assert isinstance(busy, SegmentBusyError), busy
    for i in (0, 2, 3):
        assert futures[i].result(timeout=60).verified
    after = held.record
    assert after.state is uploader.SegmentState.OPEN
    assert (after.lease_owner, after.fence) == ("other-process", before.fence)
    # Its holder still ships it.
    assert held.seal().result(timeout=60).verified


def test_bad_items(make_store: StoreFactory, tmp_path: Path) -> None:
    files = _files(tmp_path / "seg", [10, 11])
    store = make_store()
    with pytest.raises(UsageError):
        store.ship_many([("seg/a", files[0][0]), ("seg/a", files[1][0])])
    with pytest.raises(InvalidKeyError):
        store.ship_many([("../a", files[0][0])])
    assert store.manifest.segment("seg/a") is None  # nothing recorded
    missing, present = store.ship_many(
        [("seg/missing", tmp_path / "nope"), ("seg/present", files[0][0])]
    )
    assert isinstance(missing.exception(timeout=60), LocalFileError)
    assert present.result(timeout=60).verified
    assert store.manifest.segment("seg/missing") is None
    # A key registered before for another file is refused for that item alone.
    (clash,) = store.ship_many([("seg/present", files[1][0])])
    assert isinstance(clash.exception(timeout=60), KeyConflictError)


def test_bigger_files_take_the_one_at_a_time_seal(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    files = _files(tmp_path / "seg", [10, 2 * PART + 3, 20])
    store = make_store()
    results = [
        f.result(timeout=120) for f in store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
    ]
    assert [r.sent_parts for r in results] == [1, 3, 1]
    for p, data in files:
        assert remote_bytes(remote, f"seg/{p.name}") == data
    rec = store.manifest.segment(f"seg/{files[1][0].name}")
    assert rec is not None and rec.upload_mode == "multipart"


def test_watcher_seals_files_found_rolled_with_one_group_commit(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from uploader.watch import Watcher

    files = _files(tmp_path / "log", [1000 + i for i in range(5)])  # 0000 .. 0004
    calls: list[int] = []
    original = Manifest.seal_small_many

    def counted(self: Manifest, items: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        return original(self, items, **kwargs)

    monkeypatch.setattr(Manifest, "seal_small_many", counted)
    store = make_store()
    watcher = Watcher(store, tmp_path / "log", key_prefix="log/")
    report = watcher.tick()
    rolled = [f"log/{p.name}" for p, _ in files[:-1]]
    assert calls == [4]  # the four rolled files in one batch; the newest stays open
    assert sorted(report.sealed) == rolled and report.errors == []
    newest = store.manifest.segment(f"log/{files[-1][0].name}")
    assert newest is not None and newest.state is uploader.SegmentState.OPEN
    for p, data in files[:-1]:
        assert remote_bytes(remote, f"log/{p.name}") == data
    # A new file rolls the newest: it is sealed by its own writer path, nothing sent twice.
    (tmp_path / "log" / "0005").write_bytes(b"next")
    again = watcher.tick()
    assert again.sealed == [f"log/{files[-1][0].name}"] and calls == [4]
    assert remote_bytes(remote, f"log/{files[-1][0].name}") == files[-1][1]
