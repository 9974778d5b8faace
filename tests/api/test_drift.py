"""A verified object that drifts at the remote (deleted, replaced) is found, never offered for
deletion, and shipped again from the intact local file; with the local file gone too, failed."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.api.test_no_blind_delete import _write_foreign
from tests.conftest import remote_fs
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import SEGMENTS


def _remove(remote: tuple[str, dict[str, Any]], key: str) -> None:
    url, options = remote
    fs, root = remote_fs(url, options)
    fs.rm(f"{root.rstrip('/')}/{key}")
    fs.invalidate_cache()


@pytest.fixture(params=[1000, 2 * PART + 3])
def shipped(
    request: pytest.FixtureRequest, make_store: StoreFactory, tmp_path: Path
) -> tuple[uploader.Store, str, Path, bytes]:
    size = request.param
    path = tmp_path / "seg"
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    store = make_store()
    key = f"drift/{size}"
    assert store.segment(key, path).seal().result(timeout=60).verified
    return store, key, path, data


def test_a_verified_object_deleted_remotely_is_not_deletable_and_is_shipped_again(
    shipped: tuple[uploader.Store, str, Path, bytes], remote: tuple[str, dict[str, Any]]
) -> None:
    store, key, _path, data = shipped
    _remove(remote, key)
    assert key not in {r.key for r in store.deletable()}  # the gate looked at the object
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.SEALED  # left verified
    report = store.recover()
    assert report.verified == (key,), report
    assert remote_bytes(remote, key) == data
    assert key in {r.key for r in store.deletable()}
    events = [(e.from_state, e.to_state) for e in store.manifest.events(rec.id) if not e.commit_id]
    assert ("verified", "sealed") in events


def test_verify_repairs_an_object_replaced_remotely_by_other_bytes(
    shipped: tuple[uploader.Store, str, Path, bytes], remote: tuple[str, dict[str, Any]]
) -> None:
    store, key, _path, data = shipped
    _write_foreign(remote, key, bytes(b ^ 0x77 for b in data))  # same size, other bytes
    report = store.verify()
    [check] = report.checks
    assert not report.ok and check.key == key and check.problem
    assert "uploaded again" in check.action and check.state == "verified", check
    assert remote_bytes(remote, key) == data
    assert store.verify().ok  # and now it matches


def test_drift_with_the_local_file_gone_fails_the_segment(
    shipped: tuple[uploader.Store, str, Path, bytes], remote: tuple[str, dict[str, Any]]
) -> None:
    store, key, path, _data = shipped
    path.unlink()  # deleted locally, as the gate allowed
    _remove(remote, key)
    report = store.verify()
    [check] = report.checks
    assert check.state == "failed" and "remote object lost and local file gone" in check.action
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.FAILED
    assert rec.reason is not None and "remote object lost and local file gone" in rec.reason
    assert key in {k for k, _ in store.status().failed}


def test_scrub_checks_the_longest_unchecked_first(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    store = make_store()
    keys = []
    for i in range(12):
        p = tmp_path / f"s{i}"
        p.write_bytes(random.Random(i).randbytes(500 + i))
        keys.append(f"scrub/{i:02d}")
        assert store.segment(keys[-1], p).seal().result(timeout=60).verified
    first = store.scrub(limit=5)
    assert [c.key for c in first.checks] == keys[:5] and first.ok
    second = store.scrub(limit=5)
    assert [c.key for c in second.checks] == keys[5:10]  # the unchecked ones come first
    _remove(remote, keys[10])
    third = store.scrub(limit=5)
    assert [c.key for c in third.checks] == [*keys[10:], *keys[:3]]
    assert third.drifted == (keys[10],)
    assert remote_bytes(remote, keys[10]) == (tmp_path / "s10").read_bytes()  # repaired
    rec = store.manifest.segment(keys[0])
    assert rec is not None and rec.checked_at is not None


class _RecordingStop(threading.Event):
    """A stop event whose waits are recorded instead of slept: the scrub's rate, without a clock."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return False


@pytest.mark.parametrize("manifest_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_scrub_of_a_thousand_checks_each_once_finds_drift_and_counts_it(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    from uploader.metrics import Metrics

    store = make_store(concurrency=8)
    items = []
    for i in range(1000):
        p = tmp_path / f"f{i}"
        p.write_bytes(random.Random(i).randbytes(200))
        items.append((f"many/{i:04d}", p))
    # Shipped as a group commit: the scrub, not the shipping, is what this test is about.
    assert all(f.result(timeout=120).verified for f in store.ship_many(items))
    lost = ["many/0007", "many/0500", "many/0999"]
    for key in lost:
        _remove(remote, key)
    metrics = Metrics(store)
    report = store.scrub(limit=1000, on_check=lambda c: metrics.verified_again(c.ok))
    assert sorted(c.key for c in report.checks) == [f"many/{i:04d}" for i in range(1000)]
    assert sorted(report.drifted) == lost
    assert all(remote_bytes(remote, k) == (tmp_path / f"f{int(k[-4:])}").read_bytes() for k in lost)
    collected = {m.name: m.samples[0].value for m in metrics.collect() if m.samples}
    assert collected["uploader_checked"] == 1000 and collected["uploader_drift"] == 3
    # Deep, at 1,000 bytes/s: each 200-byte object costs a fifth of a second of waiting.
    stop = _RecordingStop()
    deep = store.scrub(limit=5, deep=True, rate=1000.0, stop=stop)
    assert deep.ok and len(deep.checks) == 5
    assert len(stop.waits) == 5 and all(0.0 < w <= 0.2 for w in stop.waits)
    assert sum(stop.waits) > 0.5  # the reads themselves are far faster than the rate


def test_verify_of_a_segment_not_yet_verified_says_so_and_is_not_drift(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    p = tmp_path / "open"
    p.write_bytes(b"x" * 100)
    store = make_store()
    store.segment("open/0", p).commit().result(timeout=60)
    report = store.verify(["open/0"])
    [check] = report.checks
    assert not check.ok and not check.drift and report.drifted == ()
    assert check.problem is not None and check.problem.startswith("not verified yet (open)")
    assert store.manifest.segment("open/0").state is uploader.SegmentState.OPEN  # type: ignore[union-attr]


def test_deep_verification_reads_every_part_back_before_verified(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    from uploader.storage import open_storage

    url, options = remote

    class CountingReads:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.reads: list[tuple[int, int]] = []

        def read(self, key: str, start: int, end: int) -> bytes:
            self.reads.append((start, end))
            data: bytes = self.inner.read(key, start, end)
            return data

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    storage = CountingReads(open_storage(url, dict(options), min_part_size=PART))
    store = make_store(storage=storage, verify="deep")
    p = tmp_path / "deep"
    data = random.Random(3).randbytes(2 * PART + 11)
    p.write_bytes(data)
    assert store.segment("deep/0", p).seal().result(timeout=60).verified
    assert storage.reads == [(0, PART), (PART, 2 * PART), (2 * PART, 2 * PART + 11)]
    assert remote_bytes(remote, "deep/0") == data


def test_a_drift_lease_names_this_process_as_its_holder(
    shipped: tuple[uploader.Store, str, Path, bytes],
    remote: tuple[str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`verify` takes the segment's lease to move it out of ``verified``; the lease names this
    process on this node, so a verify killed there is freed at once by the next worker on the
    node (not only when the lease expires), as every other lease is."""
    store, key, _path, _data = shipped
    _remove(remote, key)
    seen: list[tuple[Any, ...]] = []
    original = Manifest.drifted

    def drifted(self: Manifest, lease: Any, *args: Any, **kwargs: Any) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(SEGMENTS.c.lease_node, SEGMENTS.c.lease_pid).where(SEGMENTS.c.key == key)
            ).one()
        seen.append(tuple(row))
        return original(self, lease, *args, **kwargs)

    monkeypatch.setattr(Manifest, "drifted", drifted)
    report = store.verify(repair=False)
    assert not report.ok
    assert seen == [(store.node, os.getpid())]
