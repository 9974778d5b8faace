"""``objectmeta.check``: what ties a record to an object, what refuses it, and what leaves it to the
bytes (``Unproven``: rebuild reads the object back). Pure: no remote, no manifest."""

from __future__ import annotations

import dataclasses
import random
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.records import segment_record
from uploader import objectmeta
from uploader.config import StoreConfig
from uploader.digest import checksum, combine_crcs, crc32c_b64, multipart_etag
from uploader.errors import UsageError
from uploader.objectmeta import ObjectRecord, PartInfo, Unproven, Unusable
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState
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


# -- the object metadata's formats -------------------------------------------------------------


def _sealed(
    data: bytes,
    *,
    part_size: int = PART,
    node: str = "n",
    path: str = "/p",
    crc32c_mode: bool = False,
) -> tuple[SegmentRecord, list[CommitRecord]]:
    """A sealed segment's row and its part rows, as the manifest holds them."""
    rec = _record(data, crc32c_mode=crc32c_mode) if part_size == PART else None
    parts = list(rec.parts) if rec is not None else []
    if rec is None:
        for i, start in enumerate(range(0, len(data), part_size)):
            md5, crc = checksum(data[start : start + part_size])
            end = min(start + part_size, len(data))
            parts.append(PartInfo(i + 1, start, end, None if crc32c_mode else md5, crc))
    commits = [
        CommitRecord(
            p.number,
            1,
            p.number,
            p.start,
            p.end,
            p.md5,
            p.crc32c,
            None,
            CommitState.PENDING,
            0,
            None,
            None,
        )
        for p in parts
    ]
    etag = None
    if not crc32c_mode:
        md5s = [p.md5 or "" for p in parts]
        etag = md5s[0] if len(parts) == 1 else multipart_etag(md5s)
    seg = segment_record(
        path=path,
        node=node,
        part_size=part_size,
        size=len(data),
        crc32c=combine_crcs([(p.crc32c, p.end - p.start) for p in parts]),
        expected_etag=etag,
        upload_mode="put" if len(parts) == 1 else "multipart",
        checksum="crc32c" if crc32c_mode else "md5",
    )
    return seg, commits


def _format_1(md: dict[str, str]) -> dict[str, str]:
    """What format 1 wrote for the same segment: one entry per field."""
    flat = objectmeta.fields(md)
    flat[objectmeta.P + "format"] = "1"
    return flat


@pytest.mark.parametrize("crc32c_mode", [False, True])
@pytest.mark.parametrize("size", [17, 3 * PART + 5])
def test_format_2_holds_every_field_in_two_entries_and_reads_as_format_1(
    size: int, crc32c_mode: bool
) -> None:
    seg, commits = _sealed(DATA[:size], crc32c_mode=crc32c_mode)
    md = objectmeta.object_metadata(seg, commits)
    assert sorted(md) == [objectmeta.P + "format", objectmeta.RECORD]
    assert md[objectmeta.P + "format"] == "2"
    rec = objectmeta.parse_metadata("k", objectmeta.fields(md))
    assert rec is not None
    # Format 1's entries for the same segment give the same record, and so do old objects.
    assert objectmeta.parse_metadata("k", _format_1(md)) == rec
    assert (rec.size, rec.crc32c, rec.etag, rec.mode) == (
        seg.size,
        seg.crc32c,
        seg.expected_etag,
        seg.upload_mode,
    )
    assert [(p.start, p.end, p.md5, p.crc32c) for p in rec.parts] == [
        (c.start, c.end, c.md5, c.crc32c) for c in commits
    ]


_AWKWARD = st.text(alphabet=st.sampled_from("%&=+;:/ aé中4"), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    node=st.one_of(st.text(min_size=1, max_size=40), _AWKWARD),
    path=st.one_of(st.text(min_size=1, max_size=200), _AWKWARD),
)
@example(node="%41", path="/p/%7e&a=1+2;b:c")
def test_any_node_and_path_come_back_as_written(node: str, path: str) -> None:
    """``&``, ``=``, ``%``, ``+``, ``;`` and any Unicode in a node or path cannot break the record
    entry apart or change what it says."""
    seg, commits = _sealed(DATA[:100], node=node, path=path)
    md = objectmeta.object_metadata(seg, commits)
    assert md[objectmeta.RECORD].isascii()
    rec = objectmeta.parse_metadata("k", objectmeta.fields(md))
    assert rec is not None and (rec.node, rec.path) == (node, path)


def test_what_does_not_fit_2_kb_goes_to_the_record_sidecar_and_the_rest_stays() -> None:
    many = random.Random(4).randbytes(60 * 100)
    seg, commits = _sealed(many, part_size=100)
    md = objectmeta.object_metadata(seg, commits)
    assert sum(len(k) + len(v) for k, v in md.items()) <= objectmeta.METADATA_LIMIT
    flat = objectmeta.fields(md)
    assert objectmeta.P + "parts" not in flat and objectmeta.P + "parts-sha256" in flat
    assert objectmeta.parse_metadata("k", flat) is None  # the sidecar holds the parts
    seg, commits = _sealed(DATA[:100], path="/" + "d" * 3000)
    md, record_first = objectmeta.put_metadata(seg, commits[0])
    assert sum(len(k) + len(v) for k, v in md.items()) <= objectmeta.METADATA_LIMIT
    assert objectmeta.P + "path" not in objectmeta.fields(md) and record_first


@pytest.mark.parametrize(
    ("record", "says"),
    [
        (None, "has no"),
        ("size", "malformed"),
        ("size=1&size=2", "twice"),
        ("format=1", "twice"),
    ],
)
def test_a_record_entry_that_cannot_be_read_vouches_for_nothing(
    record: str | None, says: str
) -> None:
    md = {objectmeta.P + "format": "2"}
    if record is not None:
        md[objectmeta.RECORD] = record
    with pytest.raises(Unusable, match=says):
        objectmeta.fields(md)


def test_a_format_this_code_does_not_read_is_named() -> None:
    with pytest.raises(Unusable, match="'3', this code reads 1 and 2"):
        objectmeta.parse_metadata("k", objectmeta.fields({objectmeta.P + "format": "3"}))


def test_a_non_ascii_path_takes_what_format_1_took_of_the_2_kb() -> None:
    """Each byte of a non-ASCII path is percent-encoded once (3 bytes), as format 1 did."""
    seg, commits = _sealed(DATA[:100], path="/" + "中" * 150)
    md, record_first = objectmeta.put_metadata(seg, commits[0])
    size = sum(len(k.encode()) + len(v.encode()) for k, v in md.items())
    assert size <= objectmeta.METADATA_LIMIT
    flat = objectmeta.fields(md)
    assert objectmeta.P + "path" in flat and objectmeta.P + "parts" in flat and not record_first
    assert md[objectmeta.RECORD].count("%E4%B8%AD") == 150  # once, not %25E4...


_NODE_CHARS = st.sampled_from("%&=+ aé中😀\x7f")


@settings(max_examples=200, deadline=None)
@given(
    node=st.one_of(st.text(max_size=255), st.text(_NODE_CHARS, max_size=255)),
    long_path=st.booleans(),
)
@example(node="😀" * 128, long_path=False)  # 1,536 bytes percent-encoded: the most a store takes
@example(node="é" * 255, long_path=False)  # every 255-character name in a two-byte script fits
@example(node="中" * 170, long_path=False)
@example(node="中" * 170, long_path=True)
@example(node="中" * 255, long_path=True)  # 2,295 bytes: refused
def test_every_node_name_a_store_takes_fits_the_2_kb_with_what_a_rebuild_needs(
    node: str, long_path: bool
) -> None:
    """A store refuses a node name that could crowd out the fields a rebuild needs (size, ETag,
    checksums: a path too long to fit goes to the record sidecar, and the parts with it); any
    other is written with them, the longest values of each included."""
    try:
        StoreConfig(node=node).check()
    except UsageError:
        return
    path = "/" + "中" * 1000 if long_path else "/data/commitlog/00000000001073741824"
    seg, commits = _sealed(DATA[:100], node=node, path=path)
    huge = 5 * 1024**4  # the longest size S3 takes, as if it were one part
    seg = dataclasses.replace(
        seg, size=huge, part_size=5 * 1024**3, expected_etag=f'"{"f" * 32}-10000"'
    )
    md, record_first = objectmeta.put_metadata(seg, dataclasses.replace(commits[0], end=huge))
    assert (
        sum(len(k.encode()) + len(v.encode()) for k, v in md.items()) <= objectmeta.METADATA_LIMIT
    )
    flat = objectmeta.fields(md)
    assert flat[objectmeta.P + "node"] == quote(node, safe="")
    for field in ("size", "crc32c", "etag", "parts-sha256", "part-size", "mode"):
        assert objectmeta.P + field in flat
    # A path of a usual length, and the part list, fit beside any node a store takes.
    assert record_first is long_path
    assert objectmeta.metadata_complete(flat) is not long_path
