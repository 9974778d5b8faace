"""No blind destructive remote call, and nothing the retry layer gave up on still in flight.

Conditional deletes on every backend, the proved ``conditional_delete`` capability, ETags that
appear only with the bytes they describe (staged backend), late stale parts, attempts that never
overlap, and S3 deadlines that really cancel. Tests wait for events, never sleep.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from tests.api.conftest import remote_bytes
from tests.conftest import TEST_MIN_PART_SIZE, remote_fs, s3_options
from tests.storage.conftest import payload
from uploader.digest import multipart_etag
from uploader.errors import (
    NoSuchUploadError,
    ObjectExistsError,
    PreconditionFailedError,
    RetryableStorageError,
    StorageError,
    StorageTimeoutError,
)
from uploader.storage import (
    Expected,
    Fault,
    FaultyStorage,
    RetryingStorage,
    RetryPolicy,
    Storage,
    open_storage,
)
from uploader.storage.s3 import S3Storage
from uploader.storage.staged import StagedStorage

PART = TEST_MIN_PART_SIZE


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _inner(storage: Storage) -> Any:
    return getattr(storage, "inner", storage)


# --- the contract: delete_if_match and conditional_delete, every backend ------------------------


def test_delete_if_match_names_the_exact_object(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    data = b"the object we mean"
    info = storage.put("d/one", payload(data))
    assert info.etag == _md5(data)
    with pytest.raises(PreconditionFailedError, match="d/one") as err:
        storage.delete_if_match("d/one", _md5(b"another object"))
    assert not err.value.retryable
    assert err.value.found == info.etag and err.value.etag == _md5(b"another object")
    assert info.etag in str(err.value) and _md5(b"another object") in str(err.value)
    assert remote_bytes(remote, "d/one") == data  # intact, byte for byte
    storage.delete_if_match("d/one", info.etag.upper())  # normalised like head() reports it
    assert storage.head("d/one") is None
    assert remote_bytes(remote, "d/one") is None
    storage.delete_if_match("d/one", info.etag)  # absent: nothing to do


def test_delete_if_match_of_a_multipart_object(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    blobs = [b"a" * PART, b"b" * 10]
    upload_id = storage.start_upload("d/multi")
    refs = [
        storage.upload_part("d/multi", upload_id, i, payload(b)) for i, b in enumerate(blobs, 1)
    ]
    info = storage.complete("d/multi", upload_id, refs)
    assert info.etag == multipart_etag([r.etag for r in refs])
    # The MD5 of the whole bytes is not the object's ETag: refused.
    with pytest.raises(PreconditionFailedError):
        storage.delete_if_match("d/multi", _md5(b"".join(blobs)))
    assert remote_bytes(remote, "d/multi") == b"".join(blobs)
    storage.delete_if_match("d/multi", info.etag)
    assert storage.head("d/multi") is None


def test_conditional_delete_is_proved_and_the_probe_leaves_nothing(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    assert storage.conditional_delete() is True
    assert storage.conditional_delete() is True  # cached
    url, options = remote
    fs, root = remote_fs(url, options)
    fs.invalidate_cache()
    left = [p for p in fs.find(root) if "/probe/" in p] if fs.exists(root) else []
    assert left == []


def test_the_probe_runs_once_per_instance(s3_remote: tuple[str, dict[str, Any]]) -> None:
    url, options = s3_remote
    st = S3Storage(url, options, min_part_size=PART)
    calls: list[str] = []
    real = st._request

    def counting(op: str, **kwargs: Any) -> Any:
        calls.append(op)
        return real(op, **kwargs)

    st._request = counting  # type: ignore[method-assign]
    assert st.conditional_delete() and st.conditional_delete()
    assert calls.count("put_object") == 1


def _bucket_keys(moto_endpoint: str, bucket: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_a_server_that_ignores_if_match_is_found_out(moto_endpoint: str, s3_bucket: str) -> None:
    st = S3Storage(f"s3://{s3_bucket}/root", s3_options(moto_endpoint), min_part_size=PART)
    real = st._request

    def ignoring(op: str, **kwargs: Any) -> Any:  # like Ceph RGW versions that drop If-Match
        kwargs.pop("IfMatch", None)
        return real(op, **kwargs)

    st._request = ignoring  # type: ignore[method-assign]
    assert st.conditional_delete() is False
    assert _bucket_keys(moto_endpoint, s3_bucket) == []  # the probe object is gone too


def test_a_server_that_refuses_the_wrong_etag_but_keeps_the_right_one_fails_the_probe(
    moto_endpoint: str, s3_bucket: str
) -> None:
    st = S3Storage(f"s3://{s3_bucket}/root", s3_options(moto_endpoint), min_part_size=PART)
    real = st._request
    seen: list[str] = []

    def never_deletes(op: str, **kwargs: Any) -> Any:
        if op == "delete_object" and not seen:
            seen.append(op)
            return real(op, **kwargs)  # the wrong-ETag delete: refused (412) as it should
        if op == "delete_object":
            seen.append(op)
            return {}  # acknowledges the right-ETag delete without deleting
        return real(op, **kwargs)

    st._request = never_deletes  # type: ignore[method-assign]
    assert st.conditional_delete() is False
    st._request = real  # type: ignore[method-assign]
    assert len(_bucket_keys(moto_endpoint, s3_bucket)) == 1  # such a server keeps it: we tried


def test_a_transport_failure_during_the_probe_raises_and_is_not_cached(
    s3_remote: tuple[str, dict[str, Any]],
) -> None:
    url, options = s3_remote
    st = S3Storage(url, options, min_part_size=PART)
    real = st._request
    blips = [RetryableStorageError("injected: connection reset")]

    def blip(op: str, **kwargs: Any) -> Any:
        if op == "delete_object" and blips:
            raise blips.pop()
        return real(op, **kwargs)

    st._request = blip  # type: ignore[method-assign]
    with pytest.raises(RetryableStorageError, match="connection reset"):
        st.conditional_delete()
    assert st.conditional_delete() is True  # asked again, not a cached False


# --- staged: the ETag becomes visible with the bytes it describes -------------------------------


@pytest.fixture
def staged(storage: Storage) -> Iterator[StagedStorage]:
    inner = _inner(storage)
    if not isinstance(inner, StagedStorage):
        pytest.skip("staged backends only")
    yield inner


class Killed(BaseException):
    """The writer process dies here."""


def _write_foreign(st: StagedStorage, key: str, data: bytes) -> None:
    """Another party writes the key with plain file writes (no exclusivity, no sidecar)."""
    path = st._obj(key)
    if st.local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    else:
        st.fs.pipe_file(path, data)


def _multipart(st: StagedStorage, key: str, blobs: list[bytes]) -> tuple[str, list[Any], Expected]:
    upload_id = st.start_upload(key)
    refs = [st.upload_part(key, upload_id, i, payload(b)) for i, b in enumerate(blobs, 1)]
    expected = Expected(size=sum(map(len, blobs)), etag=multipart_etag([r.etag for r in refs]))
    return upload_id, refs, expected


def test_killed_before_publish_then_a_foreign_object_gets_no_etag_of_ours(
    staged: StagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [b"o" * PART, b"u" * 100]
    upload_id, refs, expected = _multipart(staged, "k/seg", blobs)

    def killed(tmp: str, key: str) -> bool:
        raise Killed  # after the sidecar was written, before the link

    monkeypatch.setattr(staged, "_publish", killed)
    with pytest.raises(Killed):
        staged.complete("k/seg", upload_id, refs, expected)
    monkeypatch.undo()
    foreign = b"f" * expected.size  # the same size, other bytes
    _write_foreign(staged, "k/seg", foreign)
    info = staged.head("k/seg")
    assert info is not None and info.size == expected.size
    assert info.etag == _md5(foreign) != expected.etag
    with pytest.raises(ObjectExistsError, match="k/seg"):
        staged.complete("k/seg", upload_id, refs, expected)
    assert staged.read("k/seg", 0, 10) == foreign[:10]


def test_killed_before_publish_of_a_put_then_a_foreign_object(
    staged: StagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = b"our small segment"

    def killed(tmp: str, key: str) -> bool:
        raise Killed

    monkeypatch.setattr(staged, "_publish", killed)
    with pytest.raises(Killed):
        staged.put("k/small", payload(ours))
    monkeypatch.undo()
    foreign = b"X" * len(ours)
    _write_foreign(staged, "k/small", foreign)
    info = staged.head("k/small")
    assert info is not None and info.etag == _md5(foreign)
    with pytest.raises(ObjectExistsError):
        staged.put("k/small", payload(ours))


def test_a_foreign_object_appearing_before_the_link_is_not_taken_for_ours(
    staged: StagedStorage, monkeypatch: pytest.MonkeyPatch
) -> None:
    blobs = [b"p" * PART, b"q" * 50]
    upload_id, refs, expected = _multipart(staged, "k/race", blobs)
    foreign = b"r" * expected.size
    publish = staged._publish

    def racing(tmp: str, key: str) -> bool:
        _write_foreign(staged, key, foreign)  # between assembly (and sidecar) and the link
        return publish(tmp, key)

    monkeypatch.setattr(staged, "_publish", racing)
    with pytest.raises(ObjectExistsError, match="k/race"):
        staged.complete("k/race", upload_id, refs, expected)
    monkeypatch.undo()
    info = staged.head("k/race")
    assert info is not None and info.etag == _md5(foreign)
    assert staged.read("k/race", 0, 5) == foreign[:5]


def test_a_published_object_rewritten_in_place_loses_our_etag(staged: StagedStorage) -> None:
    blobs = [b"s" * PART, b"t" * 10]
    upload_id, refs, expected = _multipart(staged, "k/rewritten", blobs)
    assert staged.complete("k/rewritten", upload_id, refs, expected).etag == expected.etag
    head = staged.head("k/rewritten")
    assert head is not None and head.etag == expected.etag  # ours, from the sidecar
    foreign = b"z" * expected.size
    _write_foreign(staged, "k/rewritten", foreign)
    head = staged.head("k/rewritten")
    assert head is not None and head.etag == _md5(foreign)


@pytest.mark.parametrize("after", ["abort", "complete"])
def test_a_late_part_does_not_recreate_its_upload(
    staged: StagedStorage, monkeypatch: pytest.MonkeyPatch, after: str
) -> None:
    blobs = [b"l" * PART, b"m" * 10]
    upload_id, refs, expected = _multipart(staged, "k/late", blobs)
    write_new = staged._write_new

    def stale_writer(path: str, *args: Any, **kwargs: Any) -> Any:
        out = write_new(path, *args, **kwargs)
        monkeypatch.undo()  # once: the upload ends while the stale part is being written
        if after == "abort":
            staged.abort("k/late", upload_id)
        else:
            staged.complete("k/late", upload_id, refs, expected)
        return out

    monkeypatch.setattr(staged, "_write_new", stale_writer)
    with pytest.raises(NoSuchUploadError, match="k/late"):
        staged.upload_part("k/late", upload_id, 1, payload(b"n" * PART))
    staged.fs.invalidate_cache()
    assert not staged.fs.exists(staged._upload_dir(upload_id))
    tmp = staged._p(".uploader", "tmp")
    assert not staged.fs.exists(tmp) or staged.fs.ls(tmp) == []
    assert staged.list_uploads() == []
    # And a plain late call after the end is refused without leaving anything either.
    with pytest.raises(NoSuchUploadError):
        staged.upload_part("k/late", upload_id, 2, payload(b"o" * 10))
    assert not staged.fs.exists(staged._upload_dir(upload_id))


def test_compare_and_unlink_puts_a_non_matching_object_back_whole(staged: StagedStorage) -> None:
    blobs = [b"c" * PART, b"d" * 10]
    upload_id, refs, expected = _multipart(staged, "k/keep", blobs)
    staged.complete("k/keep", upload_id, refs, expected)
    with pytest.raises(PreconditionFailedError):
        staged.delete_if_match("k/keep", _md5(b"".join(blobs)))
    head = staged.head("k/keep")
    assert head is not None and head.etag == expected.etag  # same file back, sidecar still valid
    aside = staged._p(".uploader", "aside")
    staged.fs.invalidate_cache()
    assert not staged.fs.exists(aside) or staged.fs.ls(aside) == []


# --- the retry layer: one attempt at a time ------------------------------------------------------


class _Recorder:
    """A fake remote whose first head hangs past the retry deadline, recording each attempt."""

    url = "fake://"
    min_part_size = 1

    def __init__(self, hang: float) -> None:
        self.hang = hang
        self.spans: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def head(self, key: str) -> None:
        start = time.monotonic()
        try:
            if not self.spans:
                threading.Event().wait(self.hang)  # a request the transport cannot cut
                raise StorageTimeoutError("answered too late")
        finally:
            with self.lock:
                self.spans.append((start, time.monotonic()))


def test_attempts_never_overlap() -> None:
    fake = _Recorder(hang=0.3)
    retrying = RetryingStorage(fake, RetryPolicy(attempts=3, base=0.001, deadline=0.05))  # type: ignore[arg-type]
    assert retrying.head("x") is None
    assert len(fake.spans) == 2 and retrying.retries == 1
    (_s1, e1), (s2, _e2) = fake.spans
    assert e1 <= s2, "the retry was sent while the first attempt was still running"


class _Blackhole:
    """A TCP server on 127.0.0.1 that accepts and never answers; records each connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed: list[threading.Event] = []
        self.overlapped = False
        self.accepted = threading.Semaphore(0)  # released once per accepted connection
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            previous = self.closed[-1] if self.closed else None
            done = threading.Event()
            self.closed.append(done)
            self.accepted.release()
            threading.Thread(target=self._drain, args=(conn, done), daemon=True).start()
            if previous is not None and not previous.wait(2.0):
                self.overlapped = True  # the previous attempt's connection is still open

    @staticmethod
    def _drain(conn: socket.socket, done: threading.Event) -> None:
        with conn:
            while True:
                try:
                    if not conn.recv(65536):
                        break
                except OSError:
                    break
        done.set()

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def test_the_s3_deadline_cancels_a_request_that_never_answers() -> None:
    hole = _Blackhole()
    try:
        st = open_storage(
            "s3://bucket/root",
            s3_options(f"http://127.0.0.1:{hole.port}"),
            min_part_size=PART,
            retry=RetryPolicy(attempts=3, base=0.001, cap=0.001, deadline=0.5),
        )
        started = time.monotonic()
        with pytest.raises(StorageTimeoutError, match="cancelled"):
            st.head("k")
        took = time.monotonic() - started
        # Three attempts of about the deadline each: not cut short, and not hung (the upper
        # bound is loose: a loaded machine is slow, a hang is forever).
        assert 1.4 <= took < 30.0, took
        # Each attempt that reached the server came after the previous one's connection was
        # closed (no overlap, checked by the server); on a loaded machine an attempt can be cut
        # at its deadline before it even connects, so between one and three reached it.
        reached = sum(1 for _ in range(3) if hole.accepted.acquire(timeout=5))
        assert 1 <= reached <= 3 and not hole.accepted.acquire(timeout=0.5)  # never a fourth
        assert len(hole.closed) == reached
        assert not hole.overlapped
        # The last attempt's connection was closed before the error reached us.
        assert hole.closed[-1].wait(2.0)
        st.close()
    finally:
        hole.close()


def test_with_the_endpoint_down_a_call_makes_exactly_the_policy_attempts() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    st = open_storage(
        "s3://bucket/root",
        s3_options(f"http://127.0.0.1:{port}"),
        min_part_size=PART,
        retry=RetryPolicy(attempts=3, base=0.001, cap=0.001),
    )
    s3 = _inner(st)
    assert isinstance(s3, S3Storage)
    from fsspec.asyn import sync

    client = sync(s3.fs.loop, s3.fs.set_session)
    sent: list[str] = []
    client.meta.events.register("before-send.s3", lambda **kw: sent.append("x"))
    with pytest.raises(RetryableStorageError):
        st.head("k")
    assert len(sent) == 3
    assert st.retries == 2  # type: ignore[attr-defined]


def test_botocore_retries_are_off_whatever_the_user_configured() -> None:
    st = S3Storage(
        "s3://bucket/prefix",
        {
            "key": "k",
            "secret": "s",
            "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 9}},
        },
    )
    assert st.fs.config_kwargs["retries"] == {"mode": "standard", "total_max_attempts": 1}


# --- faults: a late request ----------------------------------------------------------------------


def test_a_late_call_times_out_for_the_caller_and_lands_after_release(
    storage: Storage, remote: tuple[str, dict[str, Any]]
) -> None:
    faulty = FaultyStorage(storage, [Fault(op="put", kind="late", times=1)])
    with pytest.raises(StorageTimeoutError, match="late"):
        faulty.put("late/obj", payload(b"held in the network"))
    assert storage.head("late/obj") is None  # not applied yet
    assert not faulty.wait_applied(0.05)
    faulty.release()
    assert faulty.wait_applied(10)
    assert faulty.late[0].error is None
    assert remote_bytes(remote, "late/obj") == b"held in the network"
    assert faulty.injected == [("put", "before", "late")]


def test_a_late_delete_cannot_remove_the_object_published_after_it(storage: Storage) -> None:
    # The retry layer gave up on a conditional delete that is still in the network; the object
    # is replaced meanwhile; when the late delete lands it names the old ETag and is refused.
    old = storage.put("late/key", payload(b"old bytes"))
    assert old.etag is not None
    faulty = FaultyStorage(storage, [Fault(op="delete_if_match", kind="late", times=1)])
    with pytest.raises(StorageTimeoutError):
        faulty.delete_if_match("late/key", old.etag)
    # Someone else (who may) removes and republishes in between.
    storage.delete_if_match("late/key", old.etag)
    new = storage.put("late/key", payload(b"new bytes"))
    faulty.release()
    assert faulty.wait_applied(10)
    assert isinstance(faulty.late[0].error, PreconditionFailedError)
    assert storage.head("late/key") == new


def test_late_faults_only_before_the_remote() -> None:
    with pytest.raises(ValueError, match="before"):
        Fault(op="put", kind="late", when="after")
    assert issubclass(PreconditionFailedError, StorageError)
