"""Bad input and refusals: clear errors naming the key or bucket, never a secret."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, s3_options
from tests.storage.conftest import payload
from uploader.errors import (
    AccessDeniedError,
    InvalidKeyError,
    NoSuchBucketError,
    RetryableStorageError,
    StorageError,
    StorageTimeoutError,
    UsageError,
)
from uploader.keys import validate_key
from uploader.storage import open_storage
from uploader.storage.errors_map import translate

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("key", "why"),
    [
        ("../up", r"\.\."),
        ("a/../b", r"\.\."),
        ("/abs", "absolute"),
        ("a//b", "empty"),
        ("", "empty"),
        ("bell\x07", "control"),
        ("nl\nx", "control"),
        ("x" * 1025, "1024"),
    ],
)
def test_bad_keys_are_refused_with_the_reason(key: str, why: str) -> None:
    with pytest.raises(InvalidKeyError, match=why) as info:
        validate_key(key)
    assert info.value.exit_code == 2
    if key and len(key) < 50 and key.isprintable():
        assert key in str(info.value)


def test_missing_bucket_names_the_bucket(moto_endpoint: str) -> None:
    st = open_storage(
        "s3://no-such-bucket-here/p", s3_options(moto_endpoint), min_part_size=TEST_MIN_PART_SIZE
    )
    with pytest.raises(NoSuchBucketError, match="no-such-bucket-here") as info:
        st.put("k", payload(b"x"))
    assert not info.value.retryable
    with pytest.raises(NoSuchBucketError, match="no-such-bucket-here"):
        st.start_upload("k")


def test_missing_local_root_is_a_clear_error(tmp_path: Any) -> None:
    with pytest.raises(NoSuchBucketError, match="does not exist"):
        open_storage(f"file://{tmp_path}/absent")


def test_unknown_or_malformed_remote_urls() -> None:
    with pytest.raises(UsageError, match="no scheme"):
        open_storage("just/a/path")
    with pytest.raises(UsageError, match="credentials"):
        open_storage(f"s3://AKIA:{SECRET}@bucket/prefix")


def _client_error(code: str, status: int, message: str = "") -> Exception:
    from botocore.exceptions import ClientError

    error: Exception = ClientError(
        {
            "Error": {"Code": code, "Message": message},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        "PutObject",
    )
    return error


def test_wrong_credentials_never_leak_the_secret() -> None:
    exc = _client_error(
        "SignatureDoesNotMatch", 403, f"The request signature ... StringToSign {SECRET}"
    )
    err = translate(exc, op="put", bucket="b", key="k")
    assert isinstance(err, AccessDeniedError)
    assert not err.retryable
    assert SECRET not in str(err) and SECRET not in repr(err)
    assert "'k'" in str(err) and "'b'" in str(err)


def test_wrong_credentials_against_the_server(moto_endpoint: str, s3_bucket: str) -> None:
    """moto accepts any credentials unless told otherwise: inject the server's refusal."""
    from uploader.storage import Fault, FaultyStorage

    def denied() -> BaseException:
        err = translate(
            _client_error("InvalidAccessKeyId", 403, SECRET), op="put", bucket=s3_bucket, key="k"
        )
        assert err is not None
        return err

    options = s3_options(moto_endpoint) | {"secret": SECRET}
    st = FaultyStorage(
        open_storage(f"s3://{s3_bucket}/p", options, min_part_size=TEST_MIN_PART_SIZE),
        [Fault(op="put", error=denied)],
    )
    with pytest.raises(AccessDeniedError) as info:
        st.put("k", payload(b"x"))
    assert SECRET not in str(info.value)
    assert SECRET not in st.url


@pytest.mark.parametrize(
    ("code", "status", "kind", "retryable"),
    [
        ("SlowDown", 503, RetryableStorageError, True),
        ("InternalError", 500, RetryableStorageError, True),
        ("ServiceUnavailable", 503, RetryableStorageError, True),
        ("RequestTimeout", 400, StorageTimeoutError, True),
        ("", 502, RetryableStorageError, True),
        ("AccessDenied", 403, AccessDeniedError, False),
        ("NoSuchBucket", 404, NoSuchBucketError, False),
        ("InvalidArgument", 400, StorageError, False),
        ("MalformedXML", 400, StorageError, False),
    ],
)
def test_translation_marks_what_is_worth_retrying(
    code: str, status: int, kind: type[StorageError], retryable: bool
) -> None:
    err = translate(_client_error(code, status), op="upload_part", bucket="bkt", key="seg/1")
    assert type(err) is kind
    assert err.retryable is retryable
    assert "seg/1" in str(err) and "bkt" in str(err)


def test_transport_failures_are_retryable() -> None:
    err = translate(ConnectionResetError(104, "reset"), op="put", bucket="b", key="k")
    assert isinstance(err, StorageError) and err.retryable
    err = translate(TimeoutError(), op="put", bucket="b", key="k")
    assert isinstance(err, StorageTimeoutError) and err.retryable
    assert translate(ValueError("a bug"), op="put", bucket="b", key="k") is None
