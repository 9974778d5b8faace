"""Rebuilding a lost manifest where the remote's word cannot tie a record to an object: an ETag
that is not the MD5 form (s3rver's plain MD5 for multipart objects, SSE-KMS's opaque strings), or
no CRC32C reported for a crc32c-mode object. The record is then proven by the object's bytes, read
back part by part, as the driver proves such an object before ``verified`` (never by the ETag
alone, and never judged foreign for it alone). On SQLite and PostgreSQL, through
``tests/limited_s3.py``'s proxy in front of moto."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART
from tests.api.test_readback import _rows, _ship, _wipe
from tests.conftest import s3_options
from tests.limited_s3 import limited_s3

#: What each remote changes (tests/limited_s3.py). s3rver keeps no additional checksum (the md5
#: mode) and gives a multipart object the plain MD5 of its bytes as ETag; an SSE-KMS bucket gives
#: opaque ETags and keeps CRC32C (the crc32c mode: its ETags are never asked to prove anything).
REMOTES: dict[str, dict[str, Any]] = {
    "s3rver": {
        "refuse": {"ListParts": 405, "AbortMultipartUpload": 405, "ListMultipartUploads": 501},
        "ignore_if_none_match": True,
        "etags": "plain-md5",
        "checksums": "none",
    },
    "kms": {"etags": "opaque"},
}
MODE = {"s3rver": "md5", "kms": "crc32c"}


@contextmanager
def _stores(manifest_url: str, bucket: str, endpoint: str) -> Iterator[Any]:
    opened: list[uploader.Store] = []

    def open_store() -> uploader.Store:
        store = uploader.open(
            manifest_url,
            f"s3://{bucket}/root",
            storage_options=s3_options(endpoint),
            part_size=PART,
            min_part_size=PART,
            concurrency=4,
        )
        opened.append(store)
        return store

    try:
        yield open_store
    finally:
        for store in opened:
            if not store.closed:
                store.close()


def _forge(moto_client: Any, bucket: str, store: uploader.Store, of: str, key: str) -> None:
    """Another writer's bytes (same size) under a copy of ``of``'s metadata, written straight
    to moto."""
    found = store.storage.head_metadata(of)
    assert found is not None
    info, md = found
    moto_client.put_object(
        Bucket=bucket,
        Key=f"root/{key}",
        Body=bytes(info.size),
        Metadata={k.removeprefix("x-amz-meta-"): v for k, v in md.items()},
    )


@pytest.mark.parametrize("kind", REMOTES)
def test_rebuild_proves_by_the_bytes_what_the_etag_cannot(
    kind: str,
    at_head: None,
    manifest_url: str,
    moto_endpoint: str,
    moto_client: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    rng = random.Random(21)
    shipped = {
        "r/put": (rng.randbytes(1000), False),
        "r/sealed-multipart": (rng.randbytes(2 * PART + 77), False),
        "r/committed-first": (rng.randbytes(3 * PART + 5), True),  # its record: the sidecar
        "r/many-parts": (rng.randbytes(40 * PART), False),  # too many parts for the metadata
    }
    with (
        limited_s3(moto_endpoint, **REMOTES[kind]) as proxy,
        _stores(manifest_url, s3_bucket, proxy.url) as open_store,
    ):
        store = open_store()
        for key, (data, first) in shipped.items():
            _ship(store, tmp_path, key, data, commit_first=first)
        assert {s.key: s.checksum for s in store.manifest.segments()} == dict.fromkeys(
            shipped, MODE[kind]
        )
        _forge(moto_client, s3_bucket, store, "r/sealed-multipart", "r/forged")
        before = _rows(store)
        store.close()

        _wipe(manifest_url)
        store = open_store()
        gets = proxy.count("GetObject")
        report = store.rebuild(prefix="r/")
        outcomes = {o.key: o.outcome for o in report.objects}
        assert outcomes == {**dict.fromkeys(shipped, "created"), "r/forged": "unknown"}, [
            (o.key, o.detail) for o in report.objects
        ]
        details = {o.key: o.detail for o in report.objects}
        for key in shipped:
            if kind == "kms" or key == "r/put":
                # The CRC32C the remote reports (kms), or a single PUT's ETag, which is its MD5
                # on s3rver, proves the object: nothing is read.
                assert "read back" not in details[key], details[key]
            else:
                assert "read back" in details[key], details[key]
        # The forger's copy: the s3rver ETag is not the record's, and the KMS remote reports no
        # CRC32C (the forger declared none): neither contradicts the record; its bytes do.
        assert "read back" in details["r/forged"], details["r/forged"]
        assert ("ETag" if kind == "s3rver" else "CRC32C") in details["r/forged"]
        assert proxy.count("GetObject") > gets  # the bytes were read

        after = _rows(store)
        forged = after.pop("r/forged")
        assert after == {k: v for k, v in before.items() if k != "r/forged"}
        assert forged[0] == "unknown"
        for key, (data, _first) in shipped.items():
            with store.open_read(key) as f:
                assert f.read() == data
        assert store.verify().ok
        # Twice: every row compared with its object (read back again), none written.
        again = store.rebuild(prefix="r/")
        assert again.as_dict()["matched"] == len(shipped) + 1, again.as_dict()


def test_rebuild_proves_crc32c_records_by_the_bytes_where_no_checksum_is_reported(
    at_head: None,
    manifest_url: str,
    moto_endpoint: str,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """Objects uploaded in the crc32c mode, rebuilt through a remote that reports no CRC32C for
    them (moved to another server, a proxy that drops it): their bytes tie them to their
    records."""
    rng = random.Random(22)
    shipped = {
        "c/put": (rng.randbytes(1000), False),
        "c/multipart": (rng.randbytes(2 * PART + 77), False),
        "c/committed-first": (rng.randbytes(3 * PART + 5), True),
    }
    with _stores(manifest_url, s3_bucket, moto_endpoint) as open_store:
        store = open_store()
        for key, (data, first) in shipped.items():
            _ship(store, tmp_path, key, data, commit_first=first)
        assert {s.checksum for s in store.manifest.segments()} == {"crc32c"}
        before = _rows(store)
        store.close()
    _wipe(manifest_url)
    with (
        limited_s3(moto_endpoint, checksums="unreported") as proxy,
        _stores(manifest_url, s3_bucket, proxy.url) as open_store,
    ):
        store = open_store()
        report = store.rebuild(prefix="c/")
        assert {o.key: o.outcome for o in report.objects} == dict.fromkeys(shipped, "created"), [
            (o.key, o.detail) for o in report.objects
        ]
        assert all("read back" in o.detail for o in report.objects), report.objects
        assert _rows(store) == before
