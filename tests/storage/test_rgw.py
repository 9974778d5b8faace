"""What Ceph RGW (Debian's radosgw 16.2) answers differently from moto, and what our S3 layer makes
of it. Each test first pins the server's raw answer (so a change of server shows up here, not as a
mystery elsewhere), then the behaviour callers rely on. Runs only where RGW answers (see
tests/conftest.py); mandatory in CI.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from tests.conftest import TEST_MIN_PART_SIZE, _rgw_client, rgw_options
from tests.storage.conftest import payload
from uploader.digest import multipart_etag
from uploader.errors import NoSuchUploadError, ObjectExistsError, RetryableStorageError
from uploader.storage import Expected, PartRef
from uploader.storage.s3 import S3Storage

PART = TEST_MIN_PART_SIZE


@pytest.fixture
def rgw(rgw_bucket: str) -> Iterator[S3Storage]:
    st = S3Storage(f"s3://{rgw_bucket}/root", rgw_options(), min_part_size=PART)
    try:
        yield st
    finally:
        st.close()


def _raw_error(call: Any) -> tuple[str, int]:
    with pytest.raises(ClientError) as info:
        call()
    response: Any = info.value.response
    return response["Error"]["Code"], response["ResponseMetadata"]["HTTPStatusCode"]


def _sent(st: S3Storage, key: str, seed: int) -> tuple[str, list[PartRef], bytes]:
    rng = random.Random(seed)
    blobs = [rng.randbytes(PART), rng.randbytes(7)]
    upload_id = st.start_upload(key)
    refs = [st.upload_part(key, upload_id, n, payload(b)) for n, b in enumerate(blobs, 1)]
    return upload_id, refs, b"".join(blobs)


def test_an_aborted_upload_is_unknown_to_list_parts_and_complete(rgw: S3Storage) -> None:
    upload_id, refs, _data = _sent(rgw, "lost", 1)
    rgw.abort("lost", upload_id)
    raw = _rgw_client()
    full = "root/lost"
    # RGW: ListParts says 404 NoSuchKey (not NoSuchUpload) ...
    assert _raw_error(lambda: raw.list_parts(Bucket=rgw.bucket, Key=full, UploadId=upload_id)) == (
        "NoSuchKey",
        404,
    )
    # ... and Complete says 500 InternalError ("This multipart completion is already in progress").
    parts = {"Parts": [{"PartNumber": r.number, "ETag": f'"{r.etag}"'} for r in refs]}
    assert _raw_error(
        lambda: raw.complete_multipart_upload(
            Bucket=rgw.bucket, Key=full, UploadId=upload_id, MultipartUpload=parts
        )
    ) == ("InternalError", 500)
    # Both mean "the upload is unknown" to our callers: recovery starts a fresh upload.
    with pytest.raises(NoSuchUploadError, match="lost"):
        rgw.list_parts("lost", upload_id)
    with pytest.raises(NoSuchUploadError, match="lost"):
        rgw.complete("lost", upload_id, refs)
    with pytest.raises(NoSuchUploadError, match="lost"):
        rgw.upload_part("lost", upload_id, 1, payload(b"x" * PART))
    rgw.abort("lost", upload_id)  # aborting again is not an error
    assert rgw.head("lost") is None


def test_a_5xx_for_an_upload_still_listed_stays_a_server_error(rgw: S3Storage) -> None:
    """Only a listing that no longer shows the id turns a 5xx into "unknown upload"."""
    upload_id, refs, _data = _sent(rgw, "busy", 2)
    rgw.conditional_complete()  # the once-per-instance probe, before its requests are faked
    real = rgw._request

    def overloaded(op: str, **kwargs: Any) -> Any:
        if op == "complete_multipart_upload":
            raise ClientError(
                {
                    "Error": {"Code": "InternalError", "Message": "overloaded"},
                    "ResponseMetadata": {"HTTPStatusCode": 500},
                },
                "CompleteMultipartUpload",
            )
        return real(op, **kwargs)

    rgw._request = overloaded  # type: ignore[method-assign]
    with pytest.raises(RetryableStorageError, match="worth retrying"):
        rgw.complete("busy", upload_id, refs)  # RGW still lists the id: worth retrying
    rgw.abort("busy", upload_id)
    with pytest.raises(NoSuchUploadError):
        rgw.complete("busy", upload_id, refs)  # the same 500, the id no longer listed
    rgw._request = real  # type: ignore[method-assign]


def test_complete_answers_an_empty_etag_and_the_head_gives_the_real_one(rgw: S3Storage) -> None:
    upload_id, refs, data = _sent(rgw, "etag", 3)
    raw = _rgw_client()
    parts = {"Parts": [{"PartNumber": r.number, "ETag": f'"{r.etag}"'} for r in refs]}
    out = raw.complete_multipart_upload(
        Bucket=rgw.bucket, Key="root/etag", UploadId=upload_id, MultipartUpload=parts
    )
    assert out.get("ETag", "") == ""  # RGW 16.2: empty on the first complete
    want = multipart_etag([r.etag for r in refs])
    # Completing again (a lost response): RGW answers 200 for the same parts; ours accepts the
    # object it finds, by its real ETag.
    info = rgw.complete("etag", upload_id, refs, Expected(size=len(data), etag=want))
    assert (info.size, info.etag) == (len(data), want)


def test_if_none_match_is_ignored_on_complete_but_our_head_refuses_to_overwrite(
    rgw: S3Storage,
) -> None:
    first, refs1, data1 = _sent(rgw, "cond", 4)
    rgw.complete("cond", first, refs1)
    second, refs2, _data2 = _sent(rgw, "cond", 5)
    raw = _rgw_client()
    # The raw server overwrites despite If-None-Match: * (checked on a scratch key).
    scratch, refs3, _ = _sent(rgw, "scratch", 6)
    rgw.complete("scratch", scratch, refs3)
    again, refs4, data4 = _sent(rgw, "scratch", 7)
    raw.complete_multipart_upload(
        Bucket=rgw.bucket,
        Key="root/scratch",
        UploadId=again,
        MultipartUpload={"Parts": [{"PartNumber": r.number, "ETag": f'"{r.etag}"'} for r in refs4]},
        IfNoneMatch="*",
    )
    assert rgw.read("scratch", 0, len(data4)) == data4  # overwritten
    # Ours looks first: the existing object stays.
    with pytest.raises(ObjectExistsError, match="cond"):
        rgw.complete("cond", second, refs2)
    assert rgw.read("cond", 0, len(data1)) == data1
    rgw.abort("cond", second)
    # PUT honours If-None-Match on RGW.
    with pytest.raises(ObjectExistsError, match="cond"):
        rgw.put("cond", payload(b"other"))
    assert rgw.read("cond", 0, len(data1)) == data1


def test_delete_ignores_if_match_so_the_probe_says_no(rgw: S3Storage) -> None:
    assert rgw.conditional_delete() is False
    assert rgw.list_objects() == []  # and the probe object is gone
