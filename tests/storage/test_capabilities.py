"""Remotes that lack a feature: 405/501 are named and never retried; PUT never overwrites where
If-None-Match is ignored. Real botocore and s3fs against moto, through :mod:`tests.limited_s3`."""

from __future__ import annotations

import uuid
from typing import Any

import boto3
import pytest

from tests.conftest import TEST_MIN_PART_SIZE, s3_options
from tests.limited_s3 import limited_s3
from tests.storage.conftest import payload
from uploader.errors import (
    NoSuchUploadError,
    ObjectExistsError,
    RetryableStorageError,
    UnsupportedOperationError,
)
from uploader.storage import RetryPolicy, open_storage
from uploader.storage.base import Storage
from uploader.storage.errors_map import translate

FAST = RetryPolicy(attempts=4, base=0.0, cap=0.0, deadline=30.0)


def _storage(endpoint: str, bucket: str) -> Storage:
    return open_storage(
        f"s3://{bucket}/root", s3_options(endpoint), min_part_size=TEST_MIN_PART_SIZE, retry=FAST
    )


def _client(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint, **_creds())


def _creds() -> dict[str, str]:
    return {
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
        "region_name": "us-east-1",
    }


@pytest.mark.parametrize(
    ("code", "status", "op", "name"),
    [
        ("MethodNotAllowed", 405, "list_parts", "ListParts"),
        ("NotImplemented", 501, "list_multipart_uploads", "ListMultipartUploads"),
        ("", 501, "abort_multipart_upload", "AbortMultipartUpload"),
        ("", 405, "complete_multipart_upload", "CompleteMultipartUpload"),
    ],
)
def test_405_and_501_mean_not_supported(code: str, status: int, op: str, name: str) -> None:
    from botocore.exceptions import ClientError

    exc = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, op)
    err = translate(exc, op=op, bucket="bkt", key="seg/1")
    assert isinstance(err, UnsupportedOperationError)
    assert err.op == name and not err.retryable
    assert f"does not support {name}" in str(err) and "seg/1" in str(err)


def test_unsupported_calls_are_named_and_tried_once(moto_endpoint: str, s3_bucket: str) -> None:
    refuse = {"ListParts": 405, "AbortMultipartUpload": 405, "ListMultipartUploads": 501}
    with limited_s3(moto_endpoint, refuse=refuse) as proxy:
        st = _storage(proxy.url, s3_bucket)
        upload = st.start_upload("k")
        with pytest.raises(UnsupportedOperationError, match="does not support ListParts") as a:
            st.list_parts("k", upload)
        assert a.value.op == "ListParts"
        with pytest.raises(UnsupportedOperationError) as b:
            st.abort("k", upload)
        assert b.value.op == "AbortMultipartUpload"
        with pytest.raises(UnsupportedOperationError, match="ListMultipartUploads") as c:
            st.list_uploads()
        assert c.value.op == "ListMultipartUploads" and "worth retrying" not in str(c.value)
        # Each reached the server once: the retry layer (4 attempts) did not try again.
        assert proxy.count("ListParts") == 1
        assert proxy.count("AbortMultipartUpload") == 1
        assert proxy.count("ListMultipartUploads") == 1


def test_a_5xx_that_no_listing_can_confirm_stays_a_server_error(
    moto_endpoint: str, s3_bucket: str
) -> None:
    """A 500 on a call naming an upload is "unknown upload" only when a listing shows it gone;
    a remote that cannot list uploads proves nothing, so the 500 stays retryable."""
    with limited_s3(moto_endpoint, refuse={"ListParts": 500, "ListMultipartUploads": 501}) as p:
        st = _storage(p.url, s3_bucket)
        upload = st.start_upload("k")
        with pytest.raises(RetryableStorageError) as info:
            st.list_parts("k", upload)
        assert not isinstance(info.value, NoSuchUploadError)
        assert p.count("ListParts") == FAST.attempts


def test_put_never_overwrites_where_if_none_match_is_ignored(
    moto_endpoint: str, s3_bucket: str
) -> None:
    key = f"k-{uuid.uuid4().hex[:6]}"
    _client(moto_endpoint).put_object(Bucket=s3_bucket, Key=f"root/{key}", Body=b"foreign")
    with limited_s3(moto_endpoint, ignore_if_none_match=True) as proxy:
        st = _storage(proxy.url, s3_bucket)
        with pytest.raises(ObjectExistsError, match="refusing to overwrite"):
            st.put(key, payload(b"ours, not theirs"))
        assert proxy.count("PutObject") == 0  # the HEAD said enough
        # Our own object (a PUT whose response was lost) is accepted as it is.
        mine = payload(b"mine")
        st.put("mine", mine)
        info = st.put("mine", mine)
        assert info.etag == mine.md5 and proxy.count("PutObject") == 1
    body = _client(moto_endpoint).get_object(Bucket=s3_bucket, Key=f"root/{key}")["Body"].read()
    assert body == b"foreign"


def test_the_proxy_really_ignores_if_none_match(moto_endpoint: str, s3_bucket: str) -> None:
    """The test above proves something only if a bare conditional PUT does overwrite here."""
    with limited_s3(moto_endpoint, ignore_if_none_match=True) as proxy:
        client = _client(proxy.url)
        client.put_object(Bucket=s3_bucket, Key="x", Body=b"one")
        client.put_object(Bucket=s3_bucket, Key="x", Body=b"two", IfNoneMatch="*")
        assert client.get_object(Bucket=s3_bucket, Key="x")["Body"].read() == b"two"
