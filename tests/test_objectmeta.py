"""``objectmeta.check``: what ties a record to an object, what refuses it, and what leaves it to the
bytes (``Unproven``: rebuild reads the object back). Pure: no remote, no manifest."""

from __future__ import annotations

import dataclasses
import random

import pytest

from uploader import objectmeta
from uploader.digest import checksum, combine_crcs, crc32c_b64, multipart_etag
from uploader.objectmeta import ObjectRecord, PartInfo, Unproven, Unusable
from uploader.storage.base import ObjectInfo

PART = 1000


def _record(data: bytes, *, crc32c_mode: bool = False) -> ObjectRecord:
    parts = []
    for i, start in enumerate(range(0, len(data), PART)):
        chunk = data[start : start + PART]
        md5, crc = checksum(chunk)
        parts.append(PartInfo(i + 1, start, start + len(chunk), None if crc32c_mode else md5, crc))
    etag = None if crc32c_mode else multipart_etag([p.md5 or "" for p in parts])
    return ObjectRecord(
        key="k",
        size=len(data),
        part_size=PART,
        crc32c=combine_crcs([(p.crc32c, p.end - p.start) for p in parts]),
        etag=etag,
        mode="multipart",
        node="n",
        path="/p",
        parts=tuple(parts),
        source="record",
        checksum=objectmeta.CRC32C_RECORD if crc32c_mode else "md5",
    )


def _composite(rec: ObjectRecord) -> str:
    """The COMPOSITE CRC32C S3 reports for a multipart object with the record's parts."""
    joined = b"".join(p.crc32c.to_bytes(4, "big") for p in rec.parts)
    return f"{crc32c_b64(checksum(joined)[1])}-{len(rec.parts)}"


DATA = random.Random(3).randbytes(2 * PART + 17)


def test_the_md5_mode_is_tied_by_the_etag_the_part_md5s_give() -> None:
    rec = _record(DATA)
    assert objectmeta.check(rec, ObjectInfo("k", len(DATA), rec.etag), {}) == rec
    # A CRC32C reported as well, and the parts': still the record's object.
    info = ObjectInfo("k", len(DATA), rec.etag, checksum=_composite(rec))
    assert objectmeta.check(rec, info, {}) == rec


@pytest.mark.parametrize("etag", ["0123456789abcdef0123456789abcdef", "opaque-kms-etag", None])
def test_another_etag_or_none_leaves_a_whole_record_to_the_bytes(etag: str | None) -> None:
    rec = _record(DATA)
    with pytest.raises(Unproven) as caught:
        objectmeta.check(rec, ObjectInfo("k", len(DATA), etag), {})
    assert caught.value.record == rec


def test_the_crc32c_mode_is_tied_by_the_reported_crc32c_or_left_to_the_bytes() -> None:
    rec = _record(DATA, crc32c_mode=True)
    reported = ObjectInfo("k", len(DATA), "any-etag", checksum=_composite(rec))
    assert objectmeta.check(rec, reported, {}) == rec
    with pytest.raises(Unproven):
        objectmeta.check(rec, ObjectInfo("k", len(DATA), "any-etag"), {})


@pytest.mark.parametrize("crc32c_mode", [False, True])
def test_what_contradicts_the_record_refuses_it_and_is_never_left_to_the_bytes(
    crc32c_mode: bool,
) -> None:
    rec = _record(DATA, crc32c_mode=crc32c_mode)
    other = _record(DATA[::-1], crc32c_mode=crc32c_mode)
    cases = {
        "size": (rec, ObjectInfo("k", len(DATA) + 1, rec.etag)),
        # The remote checksummed other bytes (whatever the ETag says).
        "reported crc32c": (rec, ObjectInfo("k", len(DATA), rec.etag, checksum=_composite(other))),
        "whole-file crc32c": (dataclasses.replace(rec, crc32c=rec.crc32c ^ 1), None),
        "gap": (
            dataclasses.replace(
                rec,
                parts=(
                    rec.parts[0],
                    dataclasses.replace(rec.parts[1], start=PART + 1),
                    *rec.parts[2:],
                ),
            ),
            None,
        ),
    }
    if not crc32c_mode:
        cases["record's own etag"] = (dataclasses.replace(rec, etag=other.etag), None)
    for what, (record, info) in cases.items():
        with pytest.raises(Unusable) as caught:
            objectmeta.check(record, info or ObjectInfo("k", len(DATA), "whatever"), {})
        assert not isinstance(caught.value, Unproven), what
    digest = {objectmeta.P + "crc32c": f"{rec.crc32c ^ 1:08x}"}
    with pytest.raises(Unusable) as caught:
        objectmeta.check(rec, ObjectInfo("k", len(DATA), "whatever"), digest)
    assert not isinstance(caught.value, Unproven)
