"""S3 storages share one aiobotocore session (botocore's model and endpoint data parsed once per
process), never one client: each keeps its own credentials and options. Checked on Ceph RGW,
which, unlike moto, refuses a wrong secret."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, rgw_options
from uploader.errors import StorageError
from uploader.storage import open_storage
from uploader.storage.s3 import S3Storage


def _open(bucket: str, options: dict[str, Any]) -> S3Storage:
    st = open_storage(f"s3://{bucket}/s", options, min_part_size=TEST_MIN_PART_SIZE, retry=None)
    assert isinstance(st, S3Storage)
    return st


def test_storages_share_the_session_not_the_credentials(rgw_bucket: str) -> None:
    good = _open(rgw_bucket, rgw_options())
    bad = _open(rgw_bucket, {**rgw_options(), "secret": "not-the-secret-0000000000000000000000"})
    try:
        assert good.fs.session is bad.fs.session  # one parse of botocore's data
        assert good.head("absent") is None  # the right secret: an answer
        with pytest.raises(StorageError, match=r"(?i)signature|denied|forbidden|403"):
            bad.head("absent")  # the wrong one is refused: its client signs with its own
        assert good.head("absent") is None  # and did not spoil the other's
    finally:
        good.close()
        bad.close()


def test_a_named_profile_keeps_a_session_of_its_own(rgw_bucket: str) -> None:
    """A profile is a session setting: s3fs makes that session, it is not shared."""
    plain = _open(rgw_bucket, rgw_options())
    profiled = S3Storage(
        f"s3://{rgw_bucket}/s",
        {**rgw_options(), "profile": "default"},
        min_part_size=TEST_MIN_PART_SIZE,
    )
    try:
        assert profiled.fs.session is not plain.fs.session
    finally:
        plain.close()
        profiled.close()
