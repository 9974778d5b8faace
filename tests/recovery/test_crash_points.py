"""A crash at every step of a seal, then recovery: the object ends verified and byte-identical.

Two kinds of crash are injected:

* between manifest transitions: the Nth write to the manifest commits, then the process "dies"
  (a ``Crash`` that nothing catches unwinds the writer; the store is abandoned, leases held);
* at every remote call: the call fails before it reaches the remote, or after the remote applied
  it (the response is lost), then the process dies.

A new store (another worker, its clock past the dead writer's lease) recovers; nothing else.
Run on every backend, Ceph RGW included (with the SQLite manifest there: see tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import pytest

import uploader
from tests.api.conftest import PART, remote_bytes, visible_keys
from tests.conftest import REMOTES_WITH_RGW, make_remote
from uploader.manifest.repo import Manifest, utcnow
from uploader.storage import Fault, FaultyStorage, open_storage

#: Manifest methods that write (each one transaction).
WRITES = (
    "register_leased",
    "acquire",
    "put_done",
    "put_verified",
    "release",
    "add_commits",
    "seal",
    "set_upload",
    "commit_uploaded",
    "commit_attempt_failed",
    "record_error",
    "segment_uploaded",
    "segment_verified",
)
#: Remote calls a seal makes.
REMOTE_OPS = ("start_upload", "upload_part", "list_parts", "complete", "put", "head")
MULTIPART_OPS = ("start_upload", "upload_part", "list_parts", "complete")


@pytest.fixture(params=REMOTES_WITH_RGW)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """Every backend, Ceph RGW included: a real S3 implementation that answers differently."""
    params = getattr(request.node, "callspec", None)
    given = params.params if params is not None else {}
    if request.param == "rgw" and given.get("size") == 10 and given.get("op") in MULTIPART_OPS:
        # Kept short on RGW: a one-part segment goes as a single PUT, the fault never fires.
        pytest.skip("a one-part segment makes no multipart call: nothing to learn about RGW")
    return make_remote(request, request.param, tmp_path)


class Crash(BaseException):
    """The process dies here: not an Exception, so no handler in the library catches it."""


@pytest.fixture
def crash_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], list[str]]]:
    """Arm a crash right after the Nth manifest write (counted across every Manifest)."""
    state: dict[str, Any] = {"armed": None, "count": 0, "log": []}

    def wrap(name: str) -> None:
        original = getattr(Manifest, name)

        def method(self: Manifest, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            state["count"] += 1
            state["log"].append(name)
            if state["armed"] is not None and state["count"] == state["armed"]:
                state["armed"] = None
                raise Crash(f"crash after manifest write #{state['count']} ({name})")
            return result

        monkeypatch.setattr(Manifest, name, method)

    for name in WRITES:
        wrap(name)

    def arm(n: int) -> list[str]:
        log: list[str] = []
        state["armed"], state["count"], state["log"] = n, 0, log
        return log

    yield arm


def _write_segment(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _recover(manifest_url: str, remote: tuple[str, dict[str, Any]]) -> uploader.RecoveryReport:
    url, options = remote
    store = uploader.open(
        manifest_url, url, storage_options=dict(options), part_size=PART, min_part_size=PART
    )
    # Another worker, later: the dead writer's lease has expired by its clock.
    store.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    try:
        report = store.recover()
        # A second pass finds nothing to do (idempotent).
        again = store.recover()
        assert again.resumed == 0, again
        # An upload started but never recorded (crash in between) is an orphan: swept.
        store.sweep(older_than=0)
        assert store.storage.list_uploads() == []
        return report
    finally:
        store.close()


def _check(manifest_url: str, remote: tuple[str, dict[str, Any]], key: str, data: bytes) -> None:
    assert remote_bytes(remote, key) == data
    m = Manifest.open(manifest_url)
    try:
        rec = m.segment(key)
        assert rec is not None and rec.state is uploader.SegmentState.VERIFIED, rec
        assert {c.state for c in m.commits(rec.id)} == {uploader.CommitState.VERIFIED}
    finally:
        m.close()
    assert key in visible_keys(remote)


def _writer(
    manifest_url: str, remote: tuple[str, dict[str, Any]], storage: Any = None
) -> uploader.Store:
    url, options = remote
    return uploader.open(
        manifest_url,
        url,
        storage_options=dict(options),
        part_size=PART,
        min_part_size=PART,
        storage=storage,
    )


@pytest.mark.parametrize("size", [10, 2 * PART + 5])
def test_crash_after_every_manifest_write(
    manifest_url: str,
    at_head: None,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    crash_writes: Callable[[int], list[str]],
    size: int,
) -> None:
    n = 1
    while True:
        key = f"crash/{size}/{n:03d}"
        path = tmp_path / f"seg-{n}"
        data = _write_segment(path, size, n)
        log = crash_writes(n)
        store = _writer(manifest_url, remote)
        crashed = False
        try:
            seg = store.segment(key, path)
            seg.commit().result(timeout=60)
            seg.seal().result(timeout=60)
        except Crash:
            crashed = True
        finally:
            store.abandon()
        crash_writes(0)  # disarm before recovering
        if not crashed:
            assert n > 3, f"too few crash points reached: {log}"
            break
        if uploader.SegmentState.OPEN.value == _state(manifest_url, key):
            # The writer died before sealing: a restarted writer seals it (recovery never seals
            # what it does not own), then recovery finishes anything left.
            _reseal(manifest_url, remote, key, path)
        _recover(manifest_url, remote)
        _check(manifest_url, remote, key, data)
        n += 1


def _state(manifest_url: str, key: str) -> str | None:
    m = Manifest.open(manifest_url)
    try:
        rec = m.segment(key)
        return None if rec is None else rec.state.value
    finally:
        m.close()


def _reseal(manifest_url: str, remote: tuple[str, dict[str, Any]], key: str, path: Path) -> None:
    store = _writer(manifest_url, remote)
    store.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    try:
        seg = store.segment(key, path)
        with contextlib.suppress(uploader.UploaderError):  # recovery below finishes it
            seg.seal().result(timeout=60)
    finally:
        store.close()


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("op", REMOTE_OPS)
@pytest.mark.parametrize("size", [10, 2 * PART + 5])
def test_fault_at_every_remote_call_then_crash(
    manifest_url: str,
    at_head: None,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    op: str,
    when: Literal["before", "after"],
    size: int,
) -> None:
    url, options = remote
    key = f"fault/{op}/{when}"
    path = tmp_path / "seg"
    data = _write_segment(path, size, 1)
    inner = open_storage(url, dict(options), min_part_size=PART)
    faulty = FaultyStorage(inner)
    faulty.add(Fault(op=op, when=when, error=lambda: Crash(f"crash at {op} ({when})")))
    store = _writer(manifest_url, remote, storage=faulty)
    try:
        seg = store.segment(key, path)
        with contextlib.suppress(Crash):
            seg.seal().result(timeout=60)
    finally:
        store.abandon()
    if size == 10 and op in MULTIPART_OPS:
        assert not faulty.injected, "a one-part segment goes as a single PUT"
    _recover(manifest_url, remote)
    _check(manifest_url, remote, key, data)
