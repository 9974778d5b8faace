"""Storage backends behind one interface; see :mod:`uploader.storage.base`."""

from __future__ import annotations

from typing import Any

from uploader.errors import UsageError
from uploader.storage.base import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    Expected,
    ObjectInfo,
    PartRef,
    Storage,
    UploadRef,
)
from uploader.storage.faults import Fault, FaultyStorage
from uploader.storage.retry import RetryingStorage, RetryNotice, RetryPolicy

S3_SCHEMES = ("s3", "s3a")


def open_storage(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    min_part_size: int | None = None,
    retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
) -> Storage:
    """The backend for ``url``: native multipart on S3, staged parts on any other filesystem.

    Wrapped in :class:`RetryingStorage` unless ``retry`` is None; the policy's ``deadline``
    becomes S3's per-request timeout (the transport cancels a late request and awaits the
    cancellation). ``min_part_size`` lowers S3's 5 MiB minimum for servers configured otherwise
    (tests).
    """
    if "://" not in url:
        raise UsageError(
            f"remote {url!r} has no scheme; use e.g. s3://bucket/prefix or file:///path"
        )
    scheme = url.split("://", 1)[0].lower()
    minimum = MIN_PART_SIZE if min_part_size is None else min_part_size
    storage: Storage
    if scheme in S3_SCHEMES:
        from uploader.storage.s3 import S3Storage

        storage = S3Storage(
            url,
            storage_options,
            min_part_size=minimum,
            request_timeout=None if retry is None else retry.deadline,
        )
    else:
        from uploader.storage.staged import StagedStorage

        storage = StagedStorage(url, storage_options, min_part_size=minimum)
    return storage if retry is None else RetryingStorage(storage, retry)


__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "Expected",
    "Fault",
    "FaultyStorage",
    "ObjectInfo",
    "PartRef",
    "RetryNotice",
    "RetryPolicy",
    "RetryingStorage",
    "Storage",
    "UploadRef",
    "open_storage",
]
