"""Remotes that lack features, end to end through ``store.seal()`` and ``recover()``.

The remote is moto behind :mod:`tests.limited_s3`, which answers like s3rver (405 for ListParts
and AbortMultipartUpload, 501 for ListMultipartUploads, If-None-Match ignored, plain-MD5 ETags for
multipart objects) or like an SSE-KMS bucket (ETags that are no MD5s). Every segment converges to
``verified`` with the local bytes at its key, or fails with the named reason; nothing is uploaded
in a loop and no correct object is deleted.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest

import uploader
from tests.api.conftest import PART
from tests.conftest import migrate, s3_options
from tests.limited_s3 import LimitedS3, limited_s3
from uploader.errors import SegmentFailedError, UnsupportedOperationError, UsageError
from uploader.manifest.repo import utcnow
from uploader.storage import Fault, FaultyStorage, open_storage

S3RVER = {
    "refuse": {"ListParts": 405, "AbortMultipartUpload": 405, "ListMultipartUploads": 501},
    "ignore_if_none_match": True,
    "etags": "plain-md5",
    "checksums": "none",  # s3rver keeps no additional checksums: the md5 mode
}

Opener = Callable[..., uploader.Store]


@pytest.fixture
def s3rver(moto_endpoint: str) -> Iterator[LimitedS3]:
    with limited_s3(moto_endpoint, **S3RVER) as proxy:  # type: ignore[arg-type]
        yield proxy


@pytest.fixture
def kms(moto_endpoint: str) -> Iterator[LimitedS3]:
    with limited_s3(moto_endpoint, etags="opaque") as proxy:
        yield proxy


def _opener(manifest_url: str, bucket: str, endpoint: str) -> Iterator[Opener]:
    migrate(manifest_url)
    opened: list[uploader.Store] = []

    def open_store(*faults: Fault) -> uploader.Store:
        storage = open_storage(f"s3://{bucket}/root", s3_options(endpoint), min_part_size=PART)
        store = uploader.open(
            manifest_url,
            f"s3://{bucket}/root",
            part_size=PART,
            min_part_size=PART,
            storage=FaultyStorage(storage, list(faults)) if faults else storage,
        )
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        if not store.closed:
            store.close()


@pytest.fixture
def on_s3rver(manifest_url: str, s3_bucket: str, s3rver: LimitedS3) -> Iterator[Opener]:
    yield from _opener(manifest_url, s3_bucket, s3rver.url)


@pytest.fixture
def on_kms(manifest_url: str, s3_bucket: str, kms: LimitedS3) -> Iterator[Opener]:
    yield from _opener(manifest_url, s3_bucket, kms.url)


def _object(moto_endpoint: str, bucket: str, key: str) -> bytes:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    body: bytes = client.get_object(Bucket=bucket, Key=f"root/{key}")["Body"].read()
    return body


def _file(tmp_path: Path, name: str, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def _verified(store: uploader.Store, key: str) -> None:
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is uploader.SegmentState.VERIFIED, rec


def test_s3rver_seal_verifies_by_reading_back(
    on_s3rver: Opener, s3rver: LimitedS3, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = on_s3rver()
    big, big_data = _file(tmp_path, "big", 2 * PART + 77)
    small, small_data = _file(tmp_path, "small", 1000, seed=2)
    store.segment("c/big", big).seal().result(timeout=60)
    store.segment("c/small", small).seal().result(timeout=60)
    _verified(store, "c/big")
    _verified(store, "c/small")
    rec = store.manifest.segment("c/big")
    assert rec is not None and rec.object_etag != rec.expected_etag  # the plain MD5
    assert _object(moto_endpoint, s3_bucket, "c/big") == big_data
    assert _object(moto_endpoint, s3_bucket, "c/small") == small_data
    # verify, the scrub and the deletion gate: a correct object is no drift for its ETag alone.
    assert store.verify().ok
    assert {r.key for r in store.deletable()} == {"c/big", "c/small"}
    assert s3rver.count("CompleteMultipartUpload") == 1
    assert s3rver.count("DeleteObject") == 0


def test_s3rver_resume_without_listparts_sends_every_part_under_a_fresh_upload(
    on_s3rver: Opener, s3rver: LimitedS3, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    path, data = _file(tmp_path, "seg", 3 * PART + 5)
    # The writer's seal sends part 1, then loses the connection: parts 2.. stay pending.
    writer = on_s3rver(Fault(op="upload_part", after_calls=1))
    assert writer.segment("r/seg", path).seal().exception(timeout=60) is not None
    rec = writer.manifest.segment("r/seg")
    assert rec is not None and rec.state is uploader.SegmentState.SEALED
    old_upload = rec.upload_id
    writer.close()
    sent_before = s3rver.count("UploadPart")
    report = on_s3rver().recover()
    assert report.verified == ("r/seg",), report
    assert report.parts_sent == 4 and report.parts_reused == 0  # nothing could be listed
    assert s3rver.count("ListParts") == 1  # asked once, not retried
    assert s3rver.count("UploadPart") == sent_before + 4
    assert s3rver.count("AbortMultipartUpload") == 1  # the old upload: refused, harmless
    after = on_s3rver().manifest.segment("r/seg")
    assert after is not None and after.upload_id is None and old_upload is not None
    assert _object(moto_endpoint, s3_bucket, "r/seg") == data
    assert s3rver.count("CompleteMultipartUpload") == 1


def test_s3rver_lost_completion_is_adopted_not_uploaded_again(
    on_s3rver: Opener, s3rver: LimitedS3, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """The completion reached the remote, its answer did not: the object there has a plain-MD5
    ETag, so only its bytes show it is ours. It is adopted; never deleted or sent again."""
    path, data = _file(tmp_path, "seg", 2 * PART + 1)
    writer = on_s3rver(Fault(op="complete", when="after"))
    assert writer.segment("l/seg", path).seal().exception(timeout=60) is not None
    writer.close()
    store = on_s3rver()
    report = store.recover()
    assert report.verified == ("l/seg",), report
    assert report.parts_sent == 0
    assert s3rver.count("CompleteMultipartUpload") == 1
    assert s3rver.count("DeleteObject") == 0 and s3rver.count("PutObject", "l/seg") == 0
    assert _object(moto_endpoint, s3_bucket, "l/seg") == data
    events = [e.detail or "" for e in store.manifest.events(store.manifest.segment("l/seg").id)]  # type: ignore[union-attr]
    assert any("bytes read back" in d for d in events), events


def test_s3rver_single_put_leaves_a_foreign_object_alone(
    on_s3rver: Opener, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.put_object(Bucket=s3_bucket, Key="root/p/seg", Body=b"x" * 1000)  # same size
    path, _ = _file(tmp_path, "seg", 1000)
    store = on_s3rver()
    with pytest.raises(SegmentFailedError, match="not written by this segment"):
        store.segment("p/seg", path).seal().result(timeout=60)
    assert _object(moto_endpoint, s3_bucket, "p/seg") == b"x" * 1000


def test_s3rver_sweep_says_the_remote_cannot_list_uploads(on_s3rver: Opener) -> None:
    with pytest.raises(UnsupportedOperationError, match="cannot list unfinished") as info:
        on_s3rver().sweep()
    assert info.value.op == "ListMultipartUploads" and not info.value.retryable
    assert "worth retrying" not in str(info.value) and "lifecycle" in str(info.value)


def test_kms_etags_verify_by_reading_back(
    on_kms: Opener, kms: LimitedS3, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    store = on_kms()
    big, big_data = _file(tmp_path, "big", 2 * PART + 77)
    small, small_data = _file(tmp_path, "small", 1000, seed=2)
    store.segment("k/big", big).seal().result(timeout=60)
    store.segment("k/small", small).seal().result(timeout=60)
    _verified(store, "k/big")
    _verified(store, "k/small")
    assert store.verify().ok
    assert _object(moto_endpoint, s3_bucket, "k/big") == big_data
    assert _object(moto_endpoint, s3_bucket, "k/small") == small_data
    assert kms.count("DeleteObject") == 0 and kms.count("CompleteMultipartUpload") == 1


def test_kms_parts_are_proven_by_their_crc32c_and_reused_on_resume(
    on_kms: Opener, kms: LimitedS3, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    """SSE-KMS part ETags are no MD5s: each part counts as uploaded because the remote echoed its
    CRC32C, with the ETag the remote gave (complete needs it). A writer that dies before
    complete leaves them uploaded; recovery finds them listed with those very ETags and sends
    nothing again."""
    big, data = _file(tmp_path, "big", 3 * PART + 11, seed=5)

    class Dies(BaseException):
        pass

    writer = on_kms(Fault(op="complete", when="before", error=lambda: Dies("writer dies")))
    with contextlib.suppress(Dies):
        writer.segment("k/resume", big).seal().result(timeout=60)
    writer.abandon()
    parts_before = kms.count("UploadPart")
    assert parts_before == 4
    worker = on_kms()
    worker.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    report = worker.recover()
    assert report.ok and report.parts_sent == 0 and report.parts_reused == 4, report
    assert kms.count("UploadPart") == parts_before  # nothing sent again
    _verified(worker, "k/resume")
    assert _object(moto_endpoint, s3_bucket, "k/resume") == data


def test_a_segment_stuck_on_an_unsupported_call_fails_after_the_bound(
    manifest_url: str, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """CompleteMultipartUpload answers 405: no pass can finish the segment. It stays sealed
    for two passes, then becomes failed naming the call; nothing is published at the key."""
    with limited_s3(moto_endpoint, refuse={"CompleteMultipartUpload": 405}) as proxy:
        opener = _opener(manifest_url, s3_bucket, proxy.url)
        open_store = next(opener)
        store = open_store()
        path, _ = _file(tmp_path, "seg", 2 * PART + 3)
        assert store.segment("s/seg", path).seal().exception(timeout=60) is not None
        states = []
        for _ in range(3):
            report = store.recover()
            states.append(store.manifest.segment("s/seg").state.value)  # type: ignore[union-attr]
        assert states == ["sealed", "sealed", "failed"], states
        [(key, reason)] = report.failed
        assert key == "s/seg"
        assert "does not support CompleteMultipartUpload" in reason
        assert "3 recovery passes" in reason
        assert proxy.count("CompleteMultipartUpload") == 4  # the seal and 3 passes, no retries
        assert store.manifest.segment("s/seg").reason == reason  # type: ignore[union-attr]
        assert store.storage.head("s/seg") is None
        next(opener, None)


def test_ship_many_on_s3rver(
    on_s3rver: Opener,
    s3rver: LimitedS3,
    moto_client: Any,
    moto_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    _ship_many_where_a_puts_answer_proves_less(
        on_s3rver(), s3rver, moto_client, moto_endpoint, s3_bucket, tmp_path
    )
    # Each of the four keys HEADed before its PUT, each of the three objects written after it.
    assert s3rver.count("HeadObject") >= 4 + 3


def test_ship_many_on_kms(
    on_kms: Opener,
    kms: LimitedS3,
    moto_client: Any,
    moto_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    _ship_many_where_a_puts_answer_proves_less(
        on_kms(), kms, moto_client, moto_endpoint, s3_bucket, tmp_path
    )


def _ship_many_where_a_puts_answer_proves_less(
    store: uploader.Store,
    proxy: LimitedS3,
    moto_client: Any,
    moto_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """The group commit sends a batch's PUTs together; each segment is proven as a seal alone
    proves it where the answers prove less than a PUT on AWS (s3rver: no condition, so a HEAD
    before each PUT and one after it; SSE-KMS: no MD5 ETag, the CRC32C echoed),
    and a foreign object is left alone."""
    moto_client.put_object(Bucket=s3_bucket, Key="root/g/2", Body=b"x" * 500)  # someone else's
    files = [_file(tmp_path, str(i), size, seed=i) for i, size in enumerate([0, 1, 500, 4000])]
    futures = store.ship_many([(f"g/{p.name}", p) for p, _ in files])
    for i, ((_p, data), fut) in enumerate(zip(files, futures, strict=True)):
        if i == 2:
            with pytest.raises(SegmentFailedError, match="not written by this segment"):
                fut.result(timeout=60)
            assert _object(moto_endpoint, s3_bucket, "g/2") == b"x" * 500
            continue
        assert fut.result(timeout=60).verified
        _verified(store, f"g/{i}")
        assert _object(moto_endpoint, s3_bucket, f"g/{i}") == data
    assert proxy.count("DeleteObject") == 0


def test_the_stuck_bound_is_the_callers(
    manifest_url: str, s3_bucket: str, moto_endpoint: str, tmp_path: Path
) -> None:
    """``recover(stuck_passes=1)`` fails a segment stuck on an unsupported call in its first
    pass; a bound below one is refused before anything is claimed."""
    with limited_s3(moto_endpoint, refuse={"CompleteMultipartUpload": 405}) as proxy:
        open_store = next(_opener(manifest_url, s3_bucket, proxy.url))
        store = open_store()
        path, _ = _file(tmp_path, "seg", 2 * PART + 3)
        assert store.segment("s/one", path).seal().exception(timeout=60) is not None
        with pytest.raises(UsageError, match="stuck_passes"):
            store.recover(stuck_passes=0)
        report = store.recover(stuck_passes=1)
        [(key, reason)] = report.failed
        assert key == "s/one" and "for 1 recovery pass:" in reason
        assert proxy.count("CompleteMultipartUpload") == 2  # the seal's and one pass's
