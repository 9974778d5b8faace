"""CRC32C additional checksums and the requests each write costs, on moto (keeps CRC32C) and
Ceph RGW 16 (keeps none, refuses part checksums on Complete, ignores If-None-Match on Complete).

Real botocore and s3fs; request counts through :mod:`tests.limited_s3`'s proxy in front of moto.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from tests.conftest import TEST_MIN_PART_SIZE, make_remote, md5, s3_options
from tests.limited_s3 import limited_s3
from tests.storage.conftest import payload
from uploader.digest import Payload, checksum_matches, composite_crc32c, crc32c_b64
from uploader.errors import StorageError, UsageError
from uploader.storage.base import PartRef
from uploader.storage.s3 import S3Storage

PART = TEST_MIN_PART_SIZE


def _s3(url: str, options: dict[str, Any], **extra: Any) -> S3Storage:
    return S3Storage(url, {**options, **extra}, min_part_size=PART)


@pytest.fixture(params=["s3", "rgw"])
def s3_kind(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, str, dict[str, Any]]:
    url, options = make_remote(request, request.param, tmp_path)
    return request.param, url, options


def _multipart(st: S3Storage, key: str, blobs: list[bytes]) -> list[PartRef]:
    upload_id = st.start_upload(key)
    refs = []
    start = 0
    for n, blob in enumerate(blobs, 1):
        p = payload(blob, start)
        ref = st.upload_part(key, upload_id, n, p)
        refs.append(PartRef(ref.number, ref.etag, ref.size, crc32c=p.crc32c))
        start += len(blob)
    st.complete(key, upload_id, refs)
    return refs


def test_multipart_object_reports_the_composite_crc32c_of_its_parts(
    s3_kind: tuple[str, str, dict[str, Any]],
) -> None:
    kind, url, options = s3_kind
    st = _s3(url, options)
    blobs = [b"a" * PART, b"b" * PART, b"tail"]
    refs = _multipart(st, "mp", blobs)
    info = st.head("mp")
    assert info is not None and info.size == sum(map(len, blobs))
    crcs = [r.crc32c for r in refs if r.crc32c is not None]
    if kind == "s3":
        # moto keeps CRC32C: the upload echoed the algorithm, HEAD gives the composite
        # (without AWS's "-N").
        assert st.crc32c is True
        assert info.checksum == composite_crc32c(crcs).split("-")[0]
        assert checksum_matches(info.checksum, [(c, 1) for c in crcs], multipart=True)
    else:
        # RGW 16 keeps none: learned from CreateMultipartUpload, and Complete went without the
        # part checksums it would refuse (InvalidPart).
        assert st.crc32c is False and info.checksum is None
        assert st.conditional_complete() is False  # RGW ignores If-None-Match on Complete


def test_single_put_echoes_its_crc32c_and_needs_no_head(
    s3_kind: tuple[str, str, dict[str, Any]],
) -> None:
    kind, url, options = s3_kind
    st = _s3(url, options)
    p = payload(b"small segment bytes")
    info = st.put("small", p)
    assert info.etag == p.md5
    if kind == "s3":
        assert info.checksum == crc32c_b64(p.crc32c) and info.proven
        head = st.head("small")
        assert head is not None and head.checksum == info.checksum
    else:
        # RGW keeps no CRC32C: its ETag, the MD5 it checked against Content-MD5, proves it.
        assert info.checksum is None and info.proven and st.crc32c is False


def test_a_put_whose_etag_is_not_its_md5_is_not_proven(s3_bucket: str, moto_endpoint: str) -> None:
    """SSE-KMS: the ETag is some other string, so the response proves nothing about the bytes
    (in the md5 mode) and the caller checks the object with a HEAD."""
    with limited_s3(moto_endpoint, etags="opaque", checksums="none") as proxy:
        st = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url), checksum="md5")
        p = payload(b"one put")
        info = st.put("one", p)
        assert info.etag != p.md5 and info.checksum is None and not info.proven


def test_checksum_md5_sends_no_crc32c(s3_bucket: str, moto_endpoint: str) -> None:
    st = _s3(f"s3://{s3_bucket}/root", s3_options(moto_endpoint), checksum="md5")
    _multipart(st, "mp", [b"a" * PART, b"z"])
    p = payload(b"one put")
    put = st.put("one", p)
    # No CRC32C: the ETag (the MD5, checked against Content-MD5) proves the PUT.
    assert st.crc32c is False and put.checksum is None and put.proven and put.etag == p.md5
    for key in ("mp", "one"):
        info = st.head(key)
        assert info is not None and info.checksum is None


def test_checksum_option_is_checked(s3_bucket: str, moto_endpoint: str) -> None:
    with pytest.raises(UsageError, match=r"checksum='sha1'.*auto, crc32c, md5"):
        _s3(f"s3://{s3_bucket}/root", s3_options(moto_endpoint), checksum="sha1")


def test_checksum_crc32c_on_a_remote_without_it_is_an_error_naming_the_option(
    request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    url, options = make_remote(request, "rgw", tmp_path)
    st = _s3(url, options, checksum="crc32c")
    with pytest.raises(StorageError, match="checksum='md5'"):
        st.start_upload("k")


def test_a_part_whose_bytes_are_not_its_crc32c_is_refused(
    s3_bucket: str, moto_endpoint: str
) -> None:
    """A part sent with the recorded CRC32C and other bytes (damaged on the way, past an MD5 that
    was taken of them): AWS refuses the part (BadDigest); moto takes it and checksums the bytes
    it holds, so the object's CRC32C is not the one of the recorded parts and the object is never
    taken for them (the plan's checksum_ok)."""
    st = _s3(f"s3://{s3_bucket}/root", s3_options(moto_endpoint))
    key = f"bad-{uuid.uuid4().hex[:6]}"
    upload_id = st.start_upload(key)
    good = payload(b"p" * PART)
    damaged = payload(b"q" + b"p" * (PART - 1))
    lying = Payload(good.path, 0, PART, damaged.data, damaged.md5, good.crc32c)
    last = payload(b"end", PART)
    try:
        st.upload_part(key, upload_id, 1, lying)
    except StorageError:
        return  # refused by the remote: nothing was stored as that part
    st.upload_part(key, upload_id, 2, last)
    refs = [
        PartRef(1, md5(damaged), PART, crc32c=good.crc32c),
        PartRef(2, md5(last), 3, crc32c=last.crc32c),
    ]
    info = st.complete(key, upload_id, refs)
    assert info.checksum is not None
    recorded = [(good.crc32c, PART), (last.crc32c, 3)]
    assert not checksum_matches(info.checksum, recorded, multipart=True)
    # ... while the same check accepts the bytes the remote really holds.
    held = [(damaged.crc32c, PART), (last.crc32c, 3)]
    assert checksum_matches(info.checksum, held, multipart=True)


def test_requests_per_write(s3_bucket: str, moto_endpoint: str) -> None:
    """After the once-per-instance probes: a multipart upload costs one HEAD (after Complete,
    for the checksum); a single PUT none (its response proves it)."""
    with limited_s3(moto_endpoint) as proxy:
        st = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        _multipart(st, "mp", [b"a" * PART, b"b" * PART, b"c"])
        st.put("one", payload(b"one put"))
        assert proxy.count("HeadObject", "mp") == 1
        assert proxy.count("CompleteMultipartUpload", "mp") == 1
        assert proxy.count("UploadPart", "mp") == 3
        assert proxy.count("HeadObject", "one") == 0
        assert proxy.count("PutObject", "one") == 1


def test_requests_where_if_none_match_is_ignored(s3_bucket: str, moto_endpoint: str) -> None:
    """The probes see the condition ignored: every PUT and Complete is preceded by a HEAD, and
    the PUT is checked with a HEAD of its own afterwards (by the driver), as before."""
    with limited_s3(moto_endpoint, ignore_if_none_match=True) as proxy:
        st = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        _multipart(st, "mp", [b"a" * PART, b"c"])
        info = st.put("one", payload(b"one put"))
        assert not st.conditional_put() and not st.conditional_complete()
        assert not info.proven
        assert proxy.count("HeadObject", "mp") == 2  # before Complete, and after it
        assert proxy.count("HeadObject", "one") == 1  # before the PUT
        assert proxy.count("DeleteObject") == 0  # the probes' objects are their own


def test_an_upload_resumed_by_a_fresh_instance_completes(
    s3_kind: tuple[str, str, dict[str, Any]],
) -> None:
    """A new process does not know yet whether the remote keeps CRC32C: it completes with the
    part checksums (an upload started with CRC32C declared needs them) and, where the remote
    refuses them (RGW: InvalidPart), once more with the ETags alone."""
    kind, url, options = s3_kind
    first = _s3(url, options)
    upload_id = first.start_upload("resumed")
    blobs = [b"r" * PART, b"end"]
    refs = []
    for n, blob in enumerate(blobs, 1):
        p = payload(blob, (n - 1) * PART)
        ref = first.upload_part("resumed", upload_id, n, p)
        refs.append(PartRef(n, ref.etag, ref.size, crc32c=p.crc32c))
    fresh = _s3(url, options)
    assert fresh.crc32c is None
    info = fresh.complete("resumed", upload_id, refs)
    assert info.size == PART + 3
    if kind == "s3":
        assert info.checksum is not None
        parts = [(r.crc32c or 0, r.size) for r in refs]
        assert checksum_matches(info.checksum, parts, multipart=True)
    else:
        assert info.checksum is None


def _crc_only(data: bytes, start: int = 0) -> Payload:
    """A crc32c-mode payload: no MD5 was taken."""
    p = payload(data, start)
    return Payload(p.path, p.start, p.end, p.data, None, p.crc32c)


def test_keeps_crc32c_is_probed_once_per_instance(
    s3_kind: tuple[str, str, dict[str, Any]],
) -> None:
    kind, url, options = s3_kind
    st = _s3(url, options)
    assert st.keeps_crc32c() is (kind == "s3")  # RGW 16 keeps no CRC32C
    assert st.keeps_crc32c() is (kind == "s3")
    assert _s3(url, options, checksum="md5").keeps_crc32c() is False  # never asks


def test_crc32c_mode_part_is_proven_by_its_echoed_crc32c_and_listed_with_it(
    s3_bucket: str, moto_endpoint: str
) -> None:
    st = _s3(f"s3://{s3_bucket}/root", s3_options(moto_endpoint))
    assert st.keeps_crc32c()
    upload_id = st.start_upload("crc")
    first, last = _crc_only(b"c" * PART), _crc_only(b"tail", PART)
    refs = [st.upload_part("crc", upload_id, n, p) for n, p in ((1, first), (2, last))]
    assert [r.proven_by_checksum for r in refs] == [True, True]
    assert [r.crc32c for r in refs] == [first.crc32c, last.crc32c]
    listed = st.list_parts("crc", upload_id)
    # AWS lists each part's CRC32C (what a crc32c-mode part is reused by, with its size); moto
    # lists none, so there such a part is never reused from a listing: it is sent again.
    assert [(p.number, p.size, p.crc32c) for p in listed] == [(1, PART, None), (2, 4, None)]
    info = st.complete("crc", upload_id, refs)
    assert info.checksum is not None
    assert checksum_matches(info.checksum, [(first.crc32c, PART), (last.crc32c, 4)], multipart=True)


@pytest.mark.parametrize("op", ["upload_part", "put"])
def test_crc32c_mode_bytes_that_are_not_the_checksummed_ones_are_never_sent(
    s3_bucket: str, moto_endpoint: str, op: str
) -> None:
    """Without an MD5 the CRC32C header is a body's only proof, and moto echoes it whatever bytes
    arrive: our code takes the body's CRC32C again and refuses to send a body that differs."""
    with limited_s3(moto_endpoint) as proxy:
        st = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        good = _crc_only(b"g" * PART)
        assert good.data is not None  # held bytes (a streamed body is checked by its reader)
        lying = Payload(good.path, 0, PART, b"h" + good.data[1:], None, good.crc32c)
        if op == "upload_part":
            upload_id = st.start_upload("lie")
            with pytest.raises(StorageError, match=r"not the .* recorded for them") as exc:
                st.upload_part("lie", upload_id, 1, lying)
            assert st.list_parts("lie", upload_id) == []
            assert proxy.count("UploadPart", "lie") == 0
        else:
            with pytest.raises(StorageError, match=r"not the .* recorded for them") as exc:
                st.put("lie", lying)
            assert st.head("lie") is None
            assert proxy.count("PutObject", "lie") == 0
        assert exc.value.retryable  # the next attempt reads the file again and checks it


def test_crc32c_mode_part_without_its_crc32c_echoed_does_not_count(
    s3_bucket: str, moto_endpoint: str
) -> None:
    """A remote that keeps no checksum (the proxy drops them) cannot prove a crc32c-mode part:
    the send fails instead of returning an acknowledgement."""
    with limited_s3(moto_endpoint, checksums="none") as proxy:
        st = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        upload_id = st.start_upload("unproven")  # learns that CRC32C is not kept
        with pytest.raises(StorageError, match="crc32c checksum mode"):
            st.upload_part("unproven", upload_id, 1, _crc_only(b"u" * PART))
        # An instance that has not learned it yet sends the part with its CRC32C; no echo comes
        # back (the proxy drops it), so the part is not acknowledged.
        fresh = _s3(f"s3://{s3_bucket}/root", s3_options(proxy.url))
        with pytest.raises(StorageError, match="acknowledged CRC32C none"):
            fresh.upload_part("unproven", upload_id, 1, _crc_only(b"u" * PART))


def test_a_small_segment_needs_no_head_on_either_server(
    s3_kind: tuple[str, str, dict[str, Any]], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shipped by a store: one conditional PUT whose response proves the object (moto: its
    CRC32C echoed; Ceph RGW, md5 mode: its ETag is the MD5), so the segment is verified with no
    HEAD of its key; the object holds the bytes."""
    import uploader

    kind, url, options = s3_kind
    heads: list[str] = []
    head = S3Storage.head

    def spy(self: S3Storage, key: str) -> Any:
        heads.append(key)
        return head(self, key)

    monkeypatch.setattr(S3Storage, "head", spy)
    path = tmp_path / "small"
    path.write_bytes(b"a small segment" * 100)
    with uploader.open(
        f"sqlite:///{tmp_path / 'm.db'}", url, storage_options=dict(options)
    ) as store:
        result = store.segment("small/0", path).seal().result(timeout=60)
        assert result.verified
        seg = store.manifest.segment("small/0")
        assert seg is not None and seg.checksum == ("crc32c" if kind == "s3" else "md5")
        assert store.storage.read("small/0", 0, 1500) == path.read_bytes()
    assert "small/0" not in heads, heads
