"""Rebuilding a lost manifest where the remote's word cannot tie a record to an object: an ETag
that is not the MD5 form (s3rver's plain MD5 for multipart objects, SSE-KMS's opaque strings), or
no CRC32C reported for a crc32c-mode object. The record is then proven by the object's bytes, read
back part by part, as the driver proves such an object before ``verified`` (never by the ETag
alone, and never judged foreign for it alone). On SQLite and PostgreSQL, through
``tests/limited_s3.py``'s proxy in front of moto."""

from __future__ import annotations

import dataclasses
import json
import random
import uuid
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
from uploader import objectmeta
from uploader.errors import ObjectChangedError
from uploader.objectmeta import Unusable
from uploader.rebuild import READ_BACK, read_record
from uploader.storage.base import ObjectInfo

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


# --- which record sidecars are looked at, and how many requests that costs ----------------------

SIZE = 3 * PART + 5  # committed before its size existed: its record is in the sidecar only


class _Counting:
    """A storage whose calls are counted (everything else passes through)."""

    def __init__(self, inner: Any, head: ObjectInfo | None = None) -> None:
        self._inner = inner
        self._head = head  # what HEAD reports instead, as the remote being played would
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name == "head" and self._head is not None:
            attr = lambda _key: self._head  # noqa: E731
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


@dataclasses.dataclass
class _Shipped:
    store: uploader.Store
    sidecar: str  # its name under .uploader/
    record: bytes

    def found(self, key: str = "k") -> tuple[ObjectInfo, dict[str, str]]:
        found = self.store.storage.head_metadata(key)
        assert found is not None
        return found


def _ship_into(
    manifest_url: str,
    root: str,
    options: dict[str, Any],
    path: Path,
    data: bytes,
    checksum: str,
    tmp: Path,
) -> _Shipped:
    """``data`` shipped as key ``k`` from ``path`` into ``root``, committed before it was sealed
    (so its metadata lacks the parts), in its own manifest."""
    sqlite = f"sqlite:///{tmp / (uuid.uuid4().hex + '.db')}"
    store = uploader.open(
        sqlite if root.endswith("-a") else manifest_url,
        root,
        storage_options=dict(options),
        part_size=PART,
        min_part_size=PART,
        checksum=checksum,
    )
    path.write_bytes(data[: 2 * PART])
    seg = store.segment("k", path)
    seg.commit().result(timeout=60)
    path.write_bytes(data)
    assert seg.seal().result(timeout=60).verified
    rec = store.manifest.segment("k")
    assert rec is not None and rec.checksum == checksum
    name = objectmeta.record_name("k", rec.expected_etag or objectmeta.CRC32C_RECORD)
    body = store.storage.read_hidden(name)
    assert body is not None
    return _Shipped(store, name, body)


@pytest.fixture
def two_roots(
    at_head: None, manifest_url: str, moto_endpoint: str, s3_bucket: str, tmp_path: Path
) -> Iterator[Any]:
    """Ship ``k`` into a throwaway root (``-a``, its own SQLite manifest: only its sidecar is
    wanted) and into the test's root (this test's manifest), from the same path, on moto (which
    keeps CRC32C: both checksum modes)."""
    base = f"s3://{s3_bucket}/root"
    shipped: list[_Shipped] = []

    def ship(which: str, data: bytes, checksum: str = "md5") -> _Shipped:
        one = _ship_into(
            manifest_url,
            f"{base}-{which}",
            s3_options(moto_endpoint),
            tmp_path / "k.log",
            data,
            checksum,
            tmp_path,
        )
        shipped.append(one)
        return one

    yield ship
    for one in shipped:
        one.store.close()


def _opaque(info: ObjectInfo, **changes: Any) -> ObjectInfo:
    """The object as an SSE-KMS remote reports it: an ETag that is no MD5."""
    return dataclasses.replace(info, etag="0paque0kms0etag", **changes)


def test_listed_sidecars_are_tried_until_the_bytes_tie_one(two_roots: Any) -> None:
    rng = random.Random(31)
    stale = two_roots("a", rng.randbytes(SIZE))  # another upload of k, same path, other bytes
    ours = two_roots("b", rng.randbytes(SIZE))
    # The stale record, under a name that sorts first among k's sidecars.
    first = objectmeta.record_prefix("k") + "00000000000000000000000000000000-4.json"
    ours.store.storage.write_hidden(first, stale.record)
    # A malformed one (a part MD5 that is no hex): refused like any unusable record.
    doc = json.loads(stale.record)
    doc["parts"][0][3] = None
    ours.store.storage.write_hidden(
        objectmeta.record_prefix("k") + "11111111111111111111111111111111-4.json",
        json.dumps(doc).encode(),
    )
    info, md = ours.found()
    # moto reports the object's CRC32C: the stale record's parts are refused by it unread. A
    # remote that reports none (s3rver) leaves the stale one to its bytes: its first part differs.
    for reported, stale_reads in ((_opaque(info), 0), (_opaque(info, checksum=None), 1)):
        counted = _Counting(ours.store.storage, head=reported)
        rec, how = read_record(counted, "k", reported, md)
        assert how == READ_BACK
        assert rec == objectmeta.parse_record("k", ours.record)
        # Not named by the opaque ETag; then the candidates in order: the stale one, the
        # malformed one (refused unread), ours, read back whole (4 parts).
        assert counted.calls[:2] == ["read_hidden", "list_hidden"]
        assert counted.calls.count("list_hidden") == 1
        assert counted.calls.count("read_hidden") == 4
        assert counted.calls.count("read") == stale_reads + 4


def test_a_sidecar_named_by_the_etag_is_taken_without_listing(two_roots: Any) -> None:
    ours = two_roots("b", random.Random(32).randbytes(SIZE))
    info, md = ours.found()
    counted = _Counting(ours.store.storage)
    rec, how = read_record(counted, "k", info, md)
    assert (rec, how) == (objectmeta.parse_record("k", ours.record), "")
    assert counted.calls == ["read_hidden"]


def test_the_crc32c_mode_reads_its_one_sidecar_and_never_lists(two_roots: Any) -> None:
    ours = two_roots("b", random.Random(33).randbytes(SIZE), checksum="crc32c")
    info, md = ours.found()
    unreported = _opaque(info, checksum=None)
    counted = _Counting(ours.store.storage, head=unreported)
    rec, how = read_record(counted, "k", unreported, md)
    assert (rec, how) == (objectmeta.parse_record("k", ours.record), READ_BACK)
    assert "list_hidden" not in counted.calls


def test_a_sidecar_of_another_mode_never_vouches_for_the_object(
    two_roots: Any, moto_client: Any, s3_bucket: str
) -> None:
    """An md5-mode object and a crc32c-mode sidecar of the same key, path and bytes: the record
    contradicts the object's metadata (its mode), so the CRC32C alone never proves this object."""
    data = random.Random(34).randbytes(SIZE)
    other_mode = two_roots("a", data, checksum="crc32c")
    ours = two_roots("b", data)
    ours.store.storage.write_hidden(other_mode.sidecar, other_mode.record)
    info, md = ours.found()
    # Ours gone, as if never written: only the other mode's sidecar is left to look at.
    moto_client.delete_object(Bucket=s3_bucket, Key=f"root-b/.uploader/{ours.sidecar}")
    with pytest.raises(Unusable, match="checksum mode"):
        read_record(ours.store.storage, "k", _opaque(info), md)


def test_a_foreign_object_with_metadata_of_its_own_costs_no_listing(two_roots: Any) -> None:
    ours = two_roots("b", random.Random(35).randbytes(SIZE))
    info, _md = ours.found()
    counted = _Counting(ours.store.storage)
    with pytest.raises(Unusable, match="no uploader metadata"):
        read_record(counted, "k", _opaque(info), {"mtime": "1700000000"})
    assert "list_hidden" not in counted.calls


def test_rebuild_concludes_nothing_from_bytes_read_across_a_replacement(
    at_head: None,
    manifest_url: str,
    moto_endpoint: str,
    moto_client: Any,
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    """A record proven by the bytes read back (no CRC32C reported), while another writer puts
    an object differing only in the first part right after that part was read: every part read
    matches, but the object at the key is not the one whose bytes were read. The record is not
    tied to it (ObjectChangedError; the rebuild reports a remote error and a rerun looks again)."""
    from tests.api.test_readback_changed import SwapsDuringReadBack, other_writers_bytes

    data = random.Random(23).randbytes(2 * PART + 77)
    key = "c/swapped"
    with _stores(manifest_url, s3_bucket, moto_endpoint) as open_store:
        _ship(open_store(), tmp_path, key, data, commit_first=False)
    other = other_writers_bytes(data)
    with (
        limited_s3(moto_endpoint, checksums="unreported") as proxy,
        _stores(manifest_url, s3_bucket, proxy.url) as open_store,
    ):
        store = open_store()
        found = store.storage.head_metadata(key)
        assert found is not None
        info, md = found
        storage = SwapsDuringReadBack(
            store.storage,
            lambda: moto_client.put_object(Bucket=s3_bucket, Key=f"root/{key}", Body=other),
        )
        storage.armed = True
        with pytest.raises(ObjectChangedError, match="changed while it was read back"):
            read_record(storage, key, info, md)
        assert storage.swapped
