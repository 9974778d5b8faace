"""No blind destructive remote call: removing an object that failed verification names it exactly.

The setup: a segment whose parts are all uploaded and whose completion is recorded (``uploaded``),
while the object at its key is not the one the seal describes (same size, other bytes: another
ETag). Recovery records the intent to remove exactly that object (its ETag), removes it
conditionally, uploads again and verifies. A stale copy of that remove (a worker frozen right
before sending it, or a request the retry layer gave up on that lands late) must not touch the
verified object that replaced it.
"""

from __future__ import annotations

import random
import signal
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.conftest import remote_fs
from uploader.errors import SegmentFailedError
from uploader.storage import Fault, FaultyStorage, open_storage


def _write_foreign(remote: tuple[str, dict[str, Any]], key: str, data: bytes) -> None:
    url, options = remote
    fs, root = remote_fs(url, options)
    target = f"{root.rstrip('/')}/{key}"
    fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(target, data)
    fs.invalidate_cache()


def uploaded_with_a_bad_object(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path, key: str
) -> tuple[Path, bytes]:
    """A segment ``uploaded`` in the manifest, with other bytes of the same size at its key."""
    url, options = remote
    path = tmp_path / "seg"
    data = random.Random(5).randbytes(2 * PART + 77)
    path.write_bytes(data)
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="complete"))  # the writer's completion never reaches the remote
    writer = make_store(storage=faulty)
    seg = writer.segment(key, path)
    assert seg.seal().exception(timeout=60) is not None
    rec = writer.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.SEALED
    writer.close()
    # Someone completes it behind our back with other bytes: recorded as uploaded, bad at the key.
    _write_foreign(remote, key, bytes(b ^ 0x5A for b in data))
    fixer = make_store()
    lease = fixer.manifest.acquire(key, "test-fixer", 30)
    fixer.manifest.segment_uploaded(lease, "0" * 32)
    fixer.manifest.release(lease)
    fixer.close()
    return path, data


class HoldDelete:
    """A storage whose conditional deletes wait at the door until the test lets them through,
    as a worker frozen (GC pause, SIGSTOP) right before sending its delete would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.go = threading.Event()
        self.outcomes: list[str] = []

    def delete_if_match(self, key: str, etag: str) -> None:
        self.entered.set()
        assert self.go.wait(120)
        try:
            self.inner.delete_if_match(key, etag)
        except Exception as exc:
            self.outcomes.append(type(exc).__name__)
            raise
        self.outcomes.append("deleted")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _ahead(store: uploader.Store, seconds: float) -> None:
    clock = store.manifest.clock
    store.manifest.clock = lambda: clock() + timedelta(seconds=seconds)


def test_a_worker_frozen_before_its_delete_cannot_remove_the_verified_object(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    key = "nb/frozen"
    _path, data = uploaded_with_a_bad_object(make_store, remote, tmp_path, key)
    url, options = remote
    held = HoldDelete(open_storage(url, dict(options), min_part_size=PART))
    frozen = make_store(storage=held)
    reports: list[uploader.RecoveryReport] = []
    t = threading.Thread(target=lambda: reports.append(frozen.recover()))
    t.start()
    try:
        assert held.entered.wait(60)  # intent recorded, about to delete the bad object
        rec = frozen.manifest.segment(key)
        assert rec is not None and rec.remove_etag is not None
        bad_etag = rec.remove_etag
        # Another worker whose manifest clock is past the frozen worker's lease takes over.
        other = make_store()
        _ahead(other, 300)
        report = other.recover()
        assert report.verified == (key,), report
        assert remote_bytes(remote, key) == data
    finally:
        held.go.set()  # the frozen worker wakes up and sends its stale delete
        t.join(120)
    assert held.outcomes == ["PreconditionFailedError"]  # conditional on the bad object's ETag
    assert remote_bytes(remote, key) == data
    [outcome] = reports[0].outcomes
    assert outcome.lost and key not in reports[0].verified
    rec = other.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.VERIFIED
    assert rec.remove_etag is None
    assert bad_etag != rec.expected_etag


def test_a_bad_object_is_removed_exactly_and_replaced(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    key = "nb/plain"
    _path, data = uploaded_with_a_bad_object(make_store, remote, tmp_path, key)
    store = make_store()
    report = store.recover()
    assert report.verified == (key,), report
    assert remote_bytes(remote, key) == data
    rec = store.manifest.segment(key)
    assert rec is not None
    intents = [
        e.detail or ""
        for e in store.manifest.events(rec.id)
        if (e.from_state, e.to_state, e.commit_id) == ("uploaded", "sealed", None)
    ]
    assert len(intents) == 1 and "removing exactly that object" in intents[0]


def test_without_conditional_deletes_the_object_is_left_alone(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    key = "nb/unconditional"
    _path, data = uploaded_with_a_bad_object(make_store, remote, tmp_path, key)
    url, options = remote

    class NoConditions:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.deletes = 0

        def conditional_delete(self) -> bool:
            return False

        def delete_if_match(self, key: str, etag: str) -> None:
            self.deletes += 1
            raise AssertionError("a remote without conditional deletes must not be asked")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    storage = NoConditions(open_storage(url, dict(options), min_part_size=PART))
    store = make_store(storage=storage)
    report = store.recover()
    [(failed_key, reason)] = report.failed
    assert failed_key == key and "does not match the local bytes" in reason
    assert "conditional deletes" in reason
    assert storage.deletes == 0
    assert remote_bytes(remote, key) == bytes(b ^ 0x5A for b in data)  # left alone
    assert key not in {r.key for r in store.deletable()}


def test_a_delete_held_in_the_network_past_the_deadline_cannot_remove_the_verified_object(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The first delete times out at the caller but is applied to the remote later (held in the
    network); the retry layer tries again, the re-upload is verified; then the late delete lands."""
    from uploader.storage.retry import RetryingStorage, RetryPolicy

    key = "nb/late"
    _path, data = uploaded_with_a_bad_object(make_store, remote, tmp_path, key)
    url, options = remote
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART, retry=None))
    faulty.add(Fault(op="delete_if_match", kind="late", times=1))
    storage = RetryingStorage(faulty, RetryPolicy(attempts=3, base=0.0, cap=0.0))
    store = make_store(storage=storage)
    report = store.recover()
    assert report.verified == (key,), report
    assert remote_bytes(remote, key) == data
    assert ("delete_if_match", "before", "late") in faulty.injected
    faulty.release()  # the held request reaches the remote now
    assert faulty.wait_applied(60)
    assert remote_bytes(remote, key) == data
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.VERIFIED


@pytest.mark.parametrize("size", [1000, 2 * PART + 5])
def test_a_foreign_object_at_the_key_is_never_verified_by_the_seal(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path, size: int
) -> None:
    """Another party's object of the same size appears at the key before the seal publishes."""
    key = f"nb/foreign-{size}"
    path = tmp_path / "seg"
    data = random.Random(size).randbytes(size)
    path.write_bytes(data)
    foreign = bytes(b ^ 0x33 for b in data)
    store = make_store()
    seg = store.segment(key, path)
    _write_foreign(remote, key, foreign)
    with pytest.raises(SegmentFailedError, match="does not match the local bytes"):
        seg.seal().result(timeout=60)
    assert remote_bytes(remote, key) == foreign  # left alone
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.FAILED
    assert not store.deletable()


def test_a_foreign_object_after_the_writer_died_is_never_verified_by_recovery(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The writer dies before publishing (its completion never happened); then another party
    writes an object of the same size at the key: recovery must not adopt it."""
    url, options = remote
    key = "nb/foreign-after-crash"
    path = tmp_path / "seg"
    data = random.Random(8).randbytes(2 * PART + 9)
    path.write_bytes(data)
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="complete"))
    writer = make_store(storage=faulty)
    assert writer.segment(key, path).seal().exception(timeout=60) is not None
    writer.close()
    foreign = bytes(b ^ 0x44 for b in data)
    _write_foreign(remote, key, foreign)
    store = make_store()
    report = store.recover()
    assert not report.verified
    [(failed_key, reason)] = report.failed
    assert failed_key == key and "does not match the local bytes" in reason
    assert remote_bytes(remote, key) == foreign


def test_a_worker_process_sigstopped_before_its_delete_cannot_remove_the_verified_object(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    manifest_url: str,
    tmp_path: Path,
) -> None:
    """The same race with a real process: SIGSTOP (heartbeat and all) right before the delete,
    past its lease, while another worker re-uploads and verifies; then SIGCONT."""
    import json
    import os
    import subprocess
    import sys

    if remote[0].startswith("memory://"):
        pytest.skip("a memory:// remote lives inside one process; the S3 and file cases run")
    key = "nb/sigstop"
    _path, data = uploaded_with_a_bad_object(make_store, remote, tmp_path, key)
    url, options = remote
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.api.frozen_worker",
            manifest_url,
            url,
            json.dumps(options),
            str(PART),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        _pid, status = os.waitpid(proc.pid, os.WUNTRACED)  # the event: the worker stopped
        assert os.WIFSTOPPED(status), proc.communicate()
        other = make_store()
        rec = other.manifest.segment(key)
        assert rec is not None and rec.remove_etag is not None  # its intent was recorded
        _ahead(other, 300)  # past the frozen worker's lease, by the manifest's clock
        report = other.recover()
        assert report.verified == (key,), report
        assert remote_bytes(remote, key) == data
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    frozen = json.loads(out)
    [seg] = frozen["segments"]
    assert seg["lost"] and frozen["verified"] == [], frozen
    assert remote_bytes(remote, key) == data  # its stale delete removed nothing
    rec = other.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.VERIFIED
