"""A lost upload: every part was sent, then the multipart upload vanished remotely (aborted by a
lifecycle rule, or by an operator) before it was completed.

The segment's bytes are still in the local file, so the upload is started afresh and the segment
ends verified, in one recovery pass (or within the writer's own seal). Each server says "unknown
upload" its own way (moto: NoSuchUpload; Ceph RGW: 404 NoSuchKey on ListParts, 500 "already in
progress" on Complete): none of them may leave recovery retrying the lost upload forever.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, remote_bytes
from tests.conftest import REMOTES_WITH_RGW, make_remote
from uploader.manifest.repo import Manifest, utcnow
from uploader.storage import Expected, Fault, FaultyStorage, ObjectInfo, PartRef, open_storage

SIZE = 2 * PART + 5  # three parts: a multipart upload


@pytest.fixture(params=REMOTES_WITH_RGW)
def remote(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    return make_remote(request, request.param, tmp_path)


class Crash(BaseException):
    """The writer dies here (nothing in the library catches it)."""


class AbortedBeforeComplete:
    """The remote aborts the upload (a lifecycle rule) just before the first complete arrives."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.aborted: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def complete(
        self,
        key: str,
        upload_id: str,
        parts: Sequence[PartRef],
        expected: Expected | None = None,
    ) -> ObjectInfo:
        if not self.aborted:
            self.inner.abort(key, upload_id)
            self.aborted.append(upload_id)
        info: ObjectInfo = self.inner.complete(key, upload_id, parts, expected)
        return info


def _segment(manifest_url: str, key: str) -> Any:
    m = Manifest.open(manifest_url)
    try:
        return m.segment(key)
    finally:
        m.close()


def _store(manifest_url: str, remote: tuple[str, dict[str, Any]], **kwargs: Any) -> uploader.Store:
    url, options = remote
    return uploader.open(
        manifest_url,
        url,
        storage_options=dict(options),
        part_size=PART,
        min_part_size=PART,
        **kwargs,
    )


@pytest.mark.parametrize("sent", ["all-parts", "one-part"])
def test_upload_lost_after_the_writer_died_is_recovered(
    manifest_url: str, at_head: None, remote: tuple[str, dict[str, Any]], tmp_path: Path, sent: str
) -> None:
    url, options = remote
    key = f"lost/{sent}"
    path = tmp_path / "seg"
    data = random.Random(11).randbytes(SIZE)
    path.write_bytes(data)
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    if sent == "all-parts":
        faulty.add(Fault(op="complete", error=lambda: Crash("writer dies before complete")))
    else:
        faulty.add(
            Fault(op="upload_part", after_calls=1, error=lambda: Crash("writer dies mid-upload"))
        )
    writer = _store(manifest_url, remote, storage=faulty, concurrency=1)
    try:
        with contextlib.suppress(Crash):
            writer.segment(key, path).seal().result(timeout=60)
    finally:
        writer.abandon()
    assert faulty.injected, "the writer must die mid-upload"
    rec = _segment(manifest_url, key)
    assert rec is not None and rec.upload_id is not None, rec
    lost_id = rec.upload_id
    # The remote loses the upload (a lifecycle rule aborts it) with its parts.
    remote_storage = open_storage(url, dict(options), min_part_size=PART)
    try:
        assert [u.upload_id for u in remote_storage.list_uploads()] == [lost_id]
        remote_storage.abort(key, lost_id)
        assert remote_storage.list_uploads() == []
    finally:
        remote_storage.close()

    worker = _store(manifest_url, remote)
    worker.manifest.clock = lambda: utcnow() + timedelta(minutes=10)  # the writer's lease expired
    try:
        report = worker.recover()
        assert report.verified == (key,), report  # one pass, not a ListParts retried forever
        assert report.bytes_sent == SIZE, report  # every part re-sent under a fresh upload
        assert worker.recover().resumed == 0
        assert worker.storage.list_uploads() == []
    finally:
        worker.close()
    assert remote_bytes(remote, key) == data
    rec = _segment(manifest_url, key)
    assert rec.state is uploader.SegmentState.VERIFIED and rec.upload_id != lost_id, rec


def test_upload_lost_under_a_live_writer_is_started_again(
    manifest_url: str, at_head: None, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, options = remote
    key = "lost/live"
    path = tmp_path / "seg"
    data = random.Random(12).randbytes(SIZE)
    path.write_bytes(data)
    storage = AbortedBeforeComplete(open_storage(url, dict(options), min_part_size=PART))
    store = _store(manifest_url, remote, storage=storage)
    try:
        with contextlib.suppress(uploader.UploaderError):
            store.segment(key, path).seal().result(timeout=60)
        assert len(storage.aborted) == 1
        rec = _segment(manifest_url, key)
        if rec.state is not uploader.SegmentState.VERIFIED:
            # The seal gave the segment back: the next recovery pass finishes it.
            report = store.recover()
            assert report.verified == (key,), report
        assert store.storage.list_uploads() == []
    finally:
        store.close()
    assert remote_bytes(remote, key) == data
    rec = _segment(manifest_url, key)
    assert rec.state is uploader.SegmentState.VERIFIED and rec.upload_id != storage.aborted[0], rec
