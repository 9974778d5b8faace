"""The Complete probe (does the remote honour If-None-Match on CompleteMultipartUpload?) runs in
the background from the first upload a store starts, so the first Complete does not wait for its
requests; a probe that fails learns nothing and Complete probes again. moto and Ceph RGW."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART
from tests.conftest import TEST_MIN_PART_SIZE, make_remote, s3_options
from tests.limited_s3 import limited_s3
from tests.storage.conftest import payload
from uploader.storage import open_storage
from uploader.storage.base import PartRef, prepare_complete
from uploader.storage.s3 import S3Storage


def _s3(storage: Any) -> S3Storage:
    while not isinstance(storage, S3Storage):
        storage = storage.inner
    return storage


def _probe_ended(s3: S3Storage) -> None:
    """Wait for the event "the background probe started by prepare_complete has ended"."""
    probe = s3._complete_probe
    assert probe is not None, "prepare_complete started no probe"
    probe.join(timeout=60)
    assert not probe.is_alive()


def _calls(s3: S3Storage, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The S3 operations ``s3`` sends from now on, by name."""
    seen: list[str] = []
    call, call_upload, head = s3._call, s3._call_upload, s3.head

    def spy(op: str, *a: Any, **k: Any) -> Any:
        seen.append(op)
        return call(op, *a, **k)

    def spy_upload(op: str, *a: Any, **k: Any) -> Any:
        seen.append(op)
        return call_upload(op, *a, **k)

    def spy_head(key: str) -> Any:
        seen.append("head")
        return head(key)

    monkeypatch.setattr(s3, "_call", spy)
    monkeypatch.setattr(s3, "head", spy_head)
    monkeypatch.setattr(s3, "_call_upload", spy_upload)
    return seen


@pytest.mark.parametrize("server", ["s3", "rgw"])
def test_the_probe_runs_in_the_background_and_complete_does_not_repeat_it(
    server: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, options = make_remote(request, server, tmp_path)
    storage = open_storage(url, options, min_part_size=TEST_MIN_PART_SIZE)
    s3 = _s3(storage)
    try:
        key = f"seg/{uuid.uuid4().hex}"
        upload = storage.start_upload(key)
        prepare_complete(storage)
        probe = s3._complete_probe
        prepare_complete(storage)  # a second upload starts no second probe
        assert s3._complete_probe is probe
        _probe_ended(s3)
        # moto refuses a conditional Complete over an existing object; Ceph RGW ignores it.
        assert s3._conditional_complete is (server == "s3")
        data = [bytes([i]) * TEST_MIN_PART_SIZE for i in range(2)]
        parts: list[PartRef] = [
            storage.upload_part(key, upload, n + 1, payload(d, n * TEST_MIN_PART_SIZE))
            for n, d in enumerate(data)
        ]
        seen = _calls(s3, monkeypatch)
        info = storage.complete(key, upload, parts)
        assert info.size == 2 * TEST_MIN_PART_SIZE
        # No probe request (a put_object or a second upload) in the Complete; where the
        # condition is ignored, one HEAD before it.
        assert "put_object" not in seen and "create_multipart_upload" not in seen, seen
        assert seen.count("complete_multipart_upload") == 1, seen
        assert seen.count("head") == (1 if server == "s3" else 2), seen
    finally:
        storage.close()


def test_a_probe_that_fails_learns_nothing_and_raises_nowhere() -> None:
    # Nothing listens on port 9 of the loopback: every request fails at once.
    storage = open_storage("s3://bucket/root", s3_options("http://127.0.0.1:9"))
    s3 = _s3(storage)
    try:
        prepare_complete(storage)
        _probe_ended(s3)
        assert s3._conditional_complete is None  # Complete will probe again
    finally:
        storage.close()


def test_a_store_starts_the_probe_before_its_first_complete(
    tmp_path: Path,
    moto_endpoint: str,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events: list[str] = []
    prepare, complete = S3Storage.prepare_complete, S3Storage.complete

    def spy_prepare(self: S3Storage) -> None:
        events.append("prepare")
        prepare(self)

    def spy_complete(self: S3Storage, *a: Any, **k: Any) -> Any:
        events.append("complete")
        return complete(self, *a, **k)

    monkeypatch.setattr(S3Storage, "prepare_complete", spy_prepare)
    monkeypatch.setattr(S3Storage, "complete", spy_complete)
    path = tmp_path / "segment"
    data = bytes(range(256)) * (3 * PART // 256) + b"tail"
    path.write_bytes(data)
    with uploader.open(
        f"sqlite:///{tmp_path / 'm.db'}",
        f"s3://{s3_bucket}/root",
        storage_options=s3_options(moto_endpoint),
        part_size=PART,
        min_part_size=PART,
    ) as store:
        result = store.segment("seg/0", path).seal().result()
    assert result.verified
    assert events == ["prepare", "complete"], events


def test_a_probe_upload_is_never_listed_so_sweep_leaves_it_to_its_probe(
    moto_endpoint: str, s3_bucket: str, moto_client: Any
) -> None:
    """A probe running in the background has an upload of its own under ``.uploader/probe/``;
    ``list_uploads`` never lists it, so the sweep's orphan pass cannot abort it under the probe
    (only its own pass for old probe uploads does, past the cutoff: tests/api/test_sweep.py)."""
    storage = open_storage(f"s3://{s3_bucket}/root", s3_options(moto_endpoint))
    try:
        probe = moto_client.create_multipart_upload(
            Bucket=s3_bucket, Key="root/.uploader/probe/0123"
        )["UploadId"]
        other = storage.start_upload("seg/1")
        assert [(u.key, u.upload_id) for u in storage.list_uploads()] == [("seg/1", other)]
        # Still there: only its probe aborts it.
        listed = moto_client.list_multipart_uploads(Bucket=s3_bucket)["Uploads"]
        assert probe in {u["UploadId"] for u in listed}
    finally:
        storage.close()


def test_a_server_error_in_the_probe_learns_nothing(moto_endpoint: str, s3_bucket: str) -> None:
    """A 5xx on the probe's own Complete is a blip, not an answer: the probe's upload is still
    listed (so the error stays retryable) and nothing is learned; Complete probes again."""
    with limited_s3(moto_endpoint, refuse={"CompleteMultipartUpload": 500}) as proxy:
        storage = open_storage(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        s3 = _s3(storage)
        try:
            prepare_complete(storage)
            _probe_ended(s3)
            assert "CompleteMultipartUpload" in proxy.calls  # the probe's, refused
            assert s3._conditional_complete is None
        finally:
            storage.close()


def test_a_second_upload_does_not_wait_for_the_running_probe(
    moto_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(f"s3://{s3_bucket}/root", s3_options(moto_endpoint))
    s3 = _s3(storage)
    probing, release = threading.Event(), threading.Event()

    def slow_probe(op: str) -> bool:
        probing.set()
        assert release.wait(timeout=60)
        return True

    monkeypatch.setattr(s3, "_probe_conditional_write", slow_probe)
    try:
        prepare_complete(storage)
        assert probing.wait(timeout=60)  # the probe runs and holds its lock
        second = threading.Thread(target=prepare_complete, args=(storage,))
        second.start()
        second.join(timeout=30)
        assert not second.is_alive(), "the second upload waited for the probe"
        release.set()
        _probe_ended(s3)
        assert s3._conditional_complete is True
    finally:
        release.set()
        storage.close()
