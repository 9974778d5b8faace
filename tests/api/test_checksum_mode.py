"""The checksum mode (``checksum=`` auto | md5 | crc32c), recorded per segment.

On moto (which keeps and echoes CRC32C, and checks neither Content-MD5 nor checksums) and through
:mod:`tests.limited_s3`'s proxy in front of it (a remote without additional checksums, or one whose
HEAD reports none), on SQLite and PostgreSQL. A crc32c-mode segment takes no MD5 at all; an
md5-mode one is exactly what it was; a segment resumed by a process configured otherwise keeps the
mode (and the proof) it was registered with.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART
from tests.conftest import migrate, s3_options
from tests.limited_s3 import LimitedS3, limited_s3
from uploader import CommitState, SegmentState
from uploader.digest import multipart_etag
from uploader.errors import UsageError
from uploader.manifest.core import utcnow
from uploader.storage import Fault, FaultyStorage, open_storage

SIZE = 3 * PART + 17  # three whole parts and a tail: multipart
SMALL = PART // 2  # one PUT


@pytest.fixture
def moto(moto_endpoint: str, s3_bucket: str) -> tuple[str, dict[str, Any]]:
    return f"s3://{s3_bucket}/root", s3_options(moto_endpoint)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any MD5 of part bytes taken by the library fails the test (the crc32c mode takes none)."""

    def refuse(data: bytes) -> tuple[str, int]:
        raise AssertionError("an MD5 of part bytes was taken in the crc32c mode")

    monkeypatch.setattr("uploader.digest.checksum", refuse)
    monkeypatch.setattr("uploader.readback.checksum", refuse)


def _open(manifest_url: str, remote: tuple[str, dict[str, Any]], **kwargs: Any) -> uploader.Store:
    url, options = remote
    kwargs.setdefault("part_size", PART)
    kwargs.setdefault("min_part_size", PART)
    return uploader.open(manifest_url, url, storage_options=dict(options), **kwargs)


@contextlib.contextmanager
def _proxied(
    moto_endpoint: str, bucket: str, checksums: Any
) -> Iterator[tuple[LimitedS3, tuple[str, dict[str, Any]]]]:
    with limited_s3(moto_endpoint, checksums=checksums) as proxy:
        yield proxy, (f"s3://{bucket}/root", s3_options(proxy.url))


def _data(path: Path, size: int, seed: int) -> bytes:
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def _seal(store: uploader.Store, key: str, path: Path) -> None:
    result = store.segment(key, path).seal().result(timeout=120)
    assert result.sealed and result.verified


def _remote_bytes(store: uploader.Store, key: str, size: int) -> bytes:
    return store.storage.read(key, 0, size)


def _events(store: uploader.Store, seg_id: int) -> list[str]:
    return [e.detail or "" for e in store.manifest.events(seg_id)]


@pytest.mark.parametrize("size", [SIZE, SMALL])
def test_auto_on_a_remote_that_keeps_crc32c_takes_no_md5(
    manifest_url: str, moto: tuple[str, dict[str, Any]], tmp_path: Path, no_md5: None, size: int
) -> None:
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, size, size)
    with _open(manifest_url, moto) as store:
        assert store.config.checksum is uploader.ChecksumMode.AUTO
        _seal(store, "crc/a", path)
        assert _remote_bytes(store, "crc/a", size) == data
        rec = store.manifest.segment("crc/a")
        assert rec is not None and rec.state is SegmentState.VERIFIED
        assert rec.checksum == "crc32c" and rec.expected_etag is None
        commits = store.manifest.commits(rec.id)
        assert [c.md5 for c in commits] == [None] * len(commits)
        assert {c.state for c in commits} == {CommitState.VERIFIED}
        assert all(c.etag for c in commits) or rec.upload_mode == "put"
        assert any("the object's CRC32C" in d for d in _events(store, rec.id))
        # verify (one HEAD) proves it again by its checksum; deep reads it back (CRC32C only).
        for deep in (False, True):
            report = store.verify(keys=["crc/a"], deep=deep)
            assert report.ok and len(report.checks) == 1


def test_md5_setting_is_todays_behaviour(
    manifest_url: str, moto: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 1)
    with _open(manifest_url, moto, checksum="md5") as store:
        _seal(store, "md5/a", path)
        assert _remote_bytes(store, "md5/a", SIZE) == data
        rec = store.manifest.segment("md5/a")
        assert rec is not None and rec.state is SegmentState.VERIFIED and rec.checksum == "md5"
        commits = store.manifest.commits(rec.id)
        md5s = [c.md5 for c in commits]
        assert all(isinstance(m, str) and len(m) == 32 for m in md5s)
        assert rec.expected_etag == multipart_etag([str(m) for m in md5s])
        assert rec.object_etag == rec.expected_etag


def test_a_remote_without_crc32c_gets_md5_and_refuses_crc32c(
    manifest_url: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 2)
    with _proxied(moto_endpoint, s3_bucket, "none") as (_proxy, remote):
        with _open(manifest_url, remote) as store:
            _seal(store, "auto/a", path)  # auto: never weaker than md5 where CRC32C is missing
            rec = store.manifest.segment("auto/a")
            assert rec is not None and rec.checksum == "md5" and rec.expected_etag is not None
            assert rec.state is SegmentState.VERIFIED
            assert _remote_bytes(store, "auto/a", SIZE) == data
        with _open(manifest_url, remote, checksum="crc32c") as store:
            with pytest.raises(UsageError, match="did not prove that it keeps"):
                store.segment("crc/refused", path)
            assert store.manifest.segment("crc/refused") is None  # nothing recorded


def test_the_probe_is_recorded_at_the_remote_for_the_next_process(
    moto_endpoint: str, s3_bucket: str
) -> None:
    with _proxied(moto_endpoint, s3_bucket, "kept") as (proxy, (url, options)):
        first = open_storage(url, dict(options), min_part_size=PART)
        assert uploader.storage.base.keeps_crc32c(first)
        assert uploader.storage.base.keeps_crc32c(first)  # cached: no second probe
        assert proxy.count("PutObject", "crc32c") == 1
        heads = proxy.count("HeadObject", "crc32c")
        second = open_storage(url, dict(options), min_part_size=PART)
        assert uploader.storage.base.keeps_crc32c(second)
        # A new instance proves it again with one HEAD of the recorded probe object: no PUT.
        assert proxy.count("PutObject", "crc32c") == 1
        assert proxy.count("HeadObject", "crc32c") == heads + 1
    with _proxied(moto_endpoint, s3_bucket, "none") as (proxy, (url, options)):
        # The same bucket behind a remote that keeps no checksum: the record cannot lie (the
        # HEAD reports no CRC32C), so it is probed again and found missing.
        third = open_storage(url, dict(options), min_part_size=PART)
        assert not uploader.storage.base.keeps_crc32c(third)


def test_an_object_whose_head_reports_no_checksum_is_read_back(
    manifest_url: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 3)
    with (
        _proxied(moto_endpoint, s3_bucket, "unreported") as (proxy, remote),
        _open(manifest_url, remote) as store,
    ):
        _seal(store, "crc/unreported", path)
        rec = store.manifest.segment("crc/unreported")
        assert rec is not None and rec.checksum == "crc32c"
        assert rec.state is SegmentState.VERIFIED
        # Never accepted on its size alone: the bytes were read back and compared.
        assert proxy.count("GetObject", "crc/unreported") >= 1
        assert any("bytes read back" in d for d in _events(store, rec.id))
        assert _remote_bytes(store, "crc/unreported", SIZE) == data


@pytest.mark.parametrize(("first", "then"), [("md5", "crc32c"), ("crc32c", "md5")])
def test_a_segment_resumed_in_the_other_mode_keeps_its_own(
    manifest_url: str, moto: tuple[str, dict[str, Any]], tmp_path: Path, first: str, then: str
) -> None:
    """Committed by a writer in one mode, sealed by a writer configured with the other."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 4)
    key = f"mixed/{first}"
    with _open(manifest_url, moto, checksum=first) as store:
        result = store.segment(key, path).commit(upto=2 * PART).result(timeout=60)
        assert result.committed == 2 * PART
    with _open(manifest_url, moto, checksum=then) as store:
        _seal(store, key, path)
        rec = store.manifest.segment(key)
        assert rec is not None and rec.state is SegmentState.VERIFIED
        assert rec.checksum == first
        commits = store.manifest.commits(rec.id)
        assert len(commits) == 4
        if first == "md5":
            assert all(c.md5 is not None for c in commits)
            assert rec.expected_etag == multipart_etag([str(c.md5) for c in commits])
        else:
            assert all(c.md5 is None for c in commits) and rec.expected_etag is None
        assert _remote_bytes(store, key, SIZE) == data


class Crash(BaseException):
    """The writer dies here (nothing in the library catches it)."""


@pytest.mark.parametrize(("first", "then"), [("crc32c", "md5"), ("md5", "crc32c")])
def test_recovery_in_the_other_mode_reuses_parts_by_the_segments_proof(
    manifest_url: str, moto: tuple[str, dict[str, Any]], tmp_path: Path, first: str, then: str
) -> None:
    """A writer dies before Complete; recovery, configured with the other mode, lists the parts
    and reuses them by the segment's own proof (CRC32C and size, or MD5), sends nothing again."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 5)
    key = f"crash/{first}"
    url, options = moto
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="complete", error=lambda: Crash("writer dies before complete")))
    store = _open(manifest_url, moto, checksum=first, storage=faulty)
    try:
        with contextlib.suppress(Crash):
            store.segment(key, path).seal().result(timeout=60)
    finally:
        store.abandon()
    with _open(manifest_url, moto, checksum=then) as worker:
        worker.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
        report = worker.recover()
        assert report.verified == (key,), report
        assert report.bytes_sent == 0 and report.bytes_reused == SIZE, report
        rec = worker.manifest.segment(key)
        assert rec is not None and rec.state is SegmentState.VERIFIED and rec.checksum == first
        assert _remote_bytes(worker, key, SIZE) == data


def _die_after_the_first_part(
    manifest_url: str, remote: tuple[str, dict[str, Any]], path: Path, key: str
) -> None:
    """The writer dies right after the remote took part 2, before recording it."""
    url, options = remote
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="upload_part", when="after", after_calls=1, error=lambda: Crash("dies")))
    store = _open(manifest_url, remote, concurrency=1, storage=faulty)
    try:
        with contextlib.suppress(Crash):
            store.segment(key, path).seal().result(timeout=60)
    finally:
        store.abandon()


def test_a_crc32c_part_that_arrived_unrecorded_is_proven_by_the_md5_of_the_local_bytes(
    manifest_url: str, moto: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """moto lists no part CRC32C: recovery reads the listed parts' local bytes (their CRC32C the
    recorded one) and adopts each part whose listed ETag is their MD5 instead of sending it
    again; the object ends verified and byte-identical."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 6)
    _die_after_the_first_part(manifest_url, moto, path, "arrived/a")
    with _open(manifest_url, moto) as worker:
        worker.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
        rec = worker.manifest.segment("arrived/a")
        assert rec is not None and rec.checksum == "crc32c"
        pending = [c for c in worker.manifest.commits(rec.id) if c.state is CommitState.PENDING]
        assert pending, "the crash left no part pending: nothing to prove"
        listed = worker.storage.list_parts("arrived/a", rec.upload_id or "")
        assert listed and all(p.crc32c is None for p in listed)  # moto: no part checksums
        held = {p.number for p in listed}
        # A part the upload holds is pending in the manifest: what this test is about.
        assert held & {c.part_number for c in pending}, (held, pending)
        report = worker.recover()
        assert report.verified == ("arrived/a",), report
        # Every part the upload held is kept (uploaded ones by their acknowledgement, pending
        # ones by their MD5); only what it did not hold is sent.
        assert report.parts_reused == len(held), (held, report)
        assert report.parts_sent == 4 - len(held), (held, report)
        assert _remote_bytes(worker, "arrived/a", SIZE) == data


def test_a_crc32c_part_whose_listed_etag_is_no_md5_is_sent_again(
    manifest_url: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Under SSE-KMS a part's ETag is no MD5 of its bytes (the proxy makes them opaque): nothing
    proves the listed pending parts, so they are sent again, never adopted unproven."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 7)
    with limited_s3(moto_endpoint, etags="opaque") as proxy:
        remote = (f"s3://{s3_bucket}/root", s3_options(proxy.url))
        _die_after_the_first_part(manifest_url, remote, path, "kms/a")
        with _open(manifest_url, remote) as worker:
            worker.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
            rec = worker.manifest.segment("kms/a")
            assert rec is not None and rec.checksum == "crc32c"
            commits = worker.manifest.commits(rec.id)
            uploaded = sum(c.state is CommitState.UPLOADED for c in commits)
            assert uploaded < 4, "the crash left no part pending: nothing to prove"
            report = worker.recover()
            assert report.verified == ("kms/a",), report
            # The uploaded parts are kept by the ETag they were acknowledged with; every pending
            # one is sent again, though the upload held some of them.
            assert (report.parts_reused, report.parts_sent) == (uploaded, 4 - uploaded), report
            assert _remote_bytes(worker, "kms/a", SIZE) == data


def test_a_lost_completion_is_adopted_by_its_crc32c_without_reading_it_back(
    manifest_url: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """Complete reached the remote, its answer did not: recovery finds the object, whose
    reported CRC32C is the one of the recorded parts, and adopts it; nothing is read back,
    sent again or deleted."""
    migrate(manifest_url)
    path = tmp_path / "seg"
    data = _data(path, SIZE, 7)
    with _proxied(moto_endpoint, s3_bucket, "kept") as (proxy, remote):
        url, options = remote
        faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
        faulty.add(Fault(op="complete", when="after"))
        with _open(manifest_url, remote, storage=faulty) as writer:
            assert writer.segment("lost/a", path).seal().exception(timeout=60) is not None
        with _open(manifest_url, remote) as store:
            report = store.recover()
            assert report.verified == ("lost/a",), report
            assert report.parts_sent == 0
            # The writer's, and recovery's (the upload is unknown by then: the object is looked at).
            assert proxy.count("CompleteMultipartUpload", "lost/a") == 2
            assert proxy.count("GetObject", "lost/a") == 0
            assert proxy.count("DeleteObject") == 0
            rec = store.manifest.segment("lost/a")
            assert rec is not None and rec.checksum == "crc32c"
            assert _remote_bytes(store, "lost/a", SIZE) == data


def test_registering_never_waits_for_an_unreachable_remote(
    manifest_url: str, at_head: None, tmp_path: Path
) -> None:
    """``auto`` cannot learn whether a remote it cannot reach keeps CRC32C: the segment is
    registered in md5 (which every remote proves) instead of failing; ``crc32c`` asked for
    explicitly cannot be honoured, and says so before anything is recorded."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # closed when the block ends: nothing listens there
    remote = ("s3://bucket-unreachable/root", s3_options(f"http://127.0.0.1:{port}"))
    path = tmp_path / "seg"
    path.write_bytes(b"x" * 100)
    with _open(manifest_url, remote) as store:
        seg = store.segment("down/0", path)
        rec = store.manifest.segment("down/0")
        assert rec is not None and rec.checksum == "md5" and seg.state is SegmentState.OPEN
    with _open(manifest_url, remote, checksum="crc32c") as strict:
        with pytest.raises(uploader.StorageError, match="crc32c"):
            strict.segment("down/1", path)
        assert strict.manifest.segment("down/1") is None
