"""Reading back (whole, by ranges, corrupted parts named) and rebuilding a lost manifest from the
objects' metadata, on SQLite and PostgreSQL, S3 (moto), file:// and memory://."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.conftest import remote_fs
from uploader import objectmeta
from uploader.digest import crc32c_b64, crc32c_of
from uploader.manifest import db

Remote = tuple[str, dict[str, Any]]


def _put_remote(
    remote: Remote, key: str, data: bytes, metadata: dict[str, str] | None = None
) -> None:
    """Write bytes at ``key`` behind the uploader's back (a foreign writer, a damaged server),
    with S3 user ``metadata`` if given."""
    url, options = remote
    fs, root = remote_fs(url, options)
    fs.pipe_file(f"{root.rstrip('/')}/{key}", data, **({"Metadata": metadata} if metadata else {}))
    fs.invalidate_cache()


def _multipart_remote(
    remote: Remote, key: str, data: bytes, metadata: dict[str, str], *, crc32c: bool
) -> None:
    """A multipart upload of ``data`` in parts of ``PART`` behind the uploader's back, with S3
    user ``metadata`` (and each part's CRC32C, declared, where ``crc32c``), as an older version
    of ours wrote it."""
    url, options = remote
    fs, root = remote_fs(url, options)
    bucket, _, prefix = f"{root.rstrip('/')}/{key}".partition("/")
    extra: dict[str, Any] = {"ChecksumAlgorithm": "CRC32C"} if crc32c else {}
    up = fs.call_s3(
        "create_multipart_upload", Bucket=bucket, Key=prefix, Metadata=metadata, **extra
    )
    parts = []
    for number, start in enumerate(range(0, len(data), PART), 1):
        body = data[start : start + PART]
        sums = {"ChecksumCRC32C": crc32c_b64(crc32c_of(body))} if crc32c else {}
        out = fs.call_s3(
            "upload_part",
            Bucket=bucket,
            Key=prefix,
            UploadId=up["UploadId"],
            PartNumber=number,
            Body=body,
            **extra,
            **sums,
        )
        parts.append({"PartNumber": number, "ETag": out["ETag"], **sums})
    fs.call_s3(
        "complete_multipart_upload",
        Bucket=bucket,
        Key=prefix,
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    fs.invalidate_cache()


def _ship(
    store: uploader.Store, tmp_path: Path, key: str, data: bytes, *, commit_first: bool = False
) -> None:
    path = tmp_path / key.replace("/", "_")
    if commit_first:
        # Parts sent before the seal: the multipart upload starts when the size is not known.
        path.write_bytes(data[: 2 * PART])
        seg = store.segment(key, path)
        seg.commit().result(timeout=60)
        with open(path, "ab") as f:
            f.write(data[2 * PART :])
    else:
        path.write_bytes(data)
        seg = store.segment(key, path)
    assert seg.seal().result(timeout=60).verified


SIZES = [1, PART - 1, PART, PART + 1, 3 * PART + 7]


def test_read_back_whole_and_by_ranges(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store()
    rng = random.Random(7)
    blobs = {f"rb/{i}": rng.randbytes(size) for i, size in enumerate(SIZES)}
    for key, data in blobs.items():
        _ship(store, tmp_path, key, data)
    for key, data in blobs.items():
        with store.open_read(key) as f:
            assert f.read() == data
            assert f.checked_parts == set(range(1, len(data) // PART + 2)) - (
                {len(data) // PART + 1} if len(data) % PART == 0 else set()
            )
            assert f.unchecked_bytes == 0
            for _ in range(20):
                start = rng.randrange(0, len(data) + 1)
                end = rng.randrange(start, len(data) + 1)
                f.seek(start)
                assert f.tell() == start
                assert f.read(end - start) == data[start:end]
                rr = store.read(key, start, end)
                assert rr.data == data[start:end]
                # Whatever is not inside a part covered completely is reported unchecked.
                covered = [
                    (n * PART, min((n + 1) * PART, len(data)))
                    for n in range(len(data) // PART + 1)
                    if start <= n * PART
                    and min((n + 1) * PART, len(data)) <= end
                    and n * PART < len(data)
                ]
                assert list(rr.checked_parts) == [s // PART + 1 for s, _ in covered]
                unchecked = sum(hi - lo for lo, hi in rr.unchecked)
                assert unchecked == (end - start) - sum(e - s for s, e in covered)
            f.seek(-1, io.SEEK_END)
            assert f.read(5) == data[-1:]
            f.seek(0)
            buf = bytearray(min(len(data), PART + 3))
            assert f.readinto(buf) > 0
            assert bytes(buf[:1]) == data[:1]


def test_a_corrupted_part_is_named(
    make_store: StoreFactory, remote: Remote, tmp_path: Path
) -> None:
    store = make_store()
    data = random.Random(3).randbytes(3 * PART + 7)
    _ship(store, tmp_path, "bad/0", data, commit_first=True)
    damaged = bytearray(data)
    damaged[PART + 10] ^= 0xFF  # inside part 2, same size: only the part's CRC32C can tell
    _put_remote(remote, "bad/0", bytes(damaged))
    assert remote_bytes(remote, "bad/0") == bytes(damaged)

    with store.open_read("bad/0") as f:
        assert f.read(PART) == data[:PART]  # part 1 is intact and checked
        with pytest.raises(uploader.CorruptObjectError) as err:
            f.read(10)
    e = err.value
    assert (e.key, e.part, e.start, e.end) == ("bad/0", 2, PART, 2 * PART)
    assert "part 2" in str(e) and f"[{PART}, {2 * PART})" in str(e)
    with pytest.raises(uploader.CorruptObjectError):
        store.read("bad/0", PART, 2 * PART)
    # A range inside the damaged part cannot check it: it says so rather than vouch for it.
    rr = store.read("bad/0", PART + 5, PART + 20)
    assert rr.unchecked == ((PART + 5, PART + 20),) and not rr.fully_checked
    assert store.read("bad/0", 2 * PART, 3 * PART + 7).data == data[2 * PART :]


def test_reading_an_unverified_key_is_refused(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store()
    path = tmp_path / "open"
    path.write_bytes(b"x" * (2 * PART))
    seg = store.segment("open/0", path)
    seg.commit().result(timeout=60)
    with pytest.raises(uploader.UnverifiedObjectError, match="open/0"):
        store.open_read("open/0")
    with pytest.raises(uploader.UsageError, match="not in the manifest"):
        store.read("nothing/here", 0, 1)


def _wipe(manifest_url: str) -> None:
    """The manifest is lost: every row gone (the schema stays, as after `uploader db upgrade`)."""
    engine = db.create_manifest_engine(manifest_url)
    try:
        with engine.begin() as conn:
            for table in ("events", "commits", "segments"):
                conn.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()


def _rows(store: uploader.Store) -> dict[str, tuple[Any, ...]]:
    out = {}
    for seg in store.manifest.segments():
        parts = tuple(
            (c.part_number, c.start, c.end, c.md5, c.crc32c, c.state.value)
            for c in store.manifest.commits(seg.id)
        )
        out[seg.key] = (
            seg.state.value,
            seg.size,
            seg.crc32c,
            seg.expected_etag,
            seg.upload_mode,
            seg.node,
            seg.path,
            seg.part_size,
            parts,
        )
    return out


def test_rebuild_into_an_empty_manifest(
    make_store: StoreFactory, remote: Remote, manifest_url: str, tmp_path: Path
) -> None:
    store = make_store()
    rng = random.Random(11)
    shipped = {
        "r/put": (rng.randbytes(100), False),
        "r/one-part": (rng.randbytes(PART), False),
        "r/sealed-multipart": (rng.randbytes(3 * PART + 1), False),
        "r/committed-first": (rng.randbytes(4 * PART + 9), True),
        # 50 parts: the per-part list does not fit S3's 2 KB of metadata.
        "r/many-parts": (rng.randbytes(50 * PART), False),
    }
    for key, (data, first) in shipped.items():
        _ship(store, tmp_path, key, data, commit_first=first)
    before = _rows(store)
    deletable_before = sorted(s.key for s in store.deletable())
    assert deletable_before == sorted(shipped)
    _put_remote(remote, "r/foreign", b"written by someone else")
    store.close()

    _wipe(manifest_url)
    store = make_store()
    assert store.manifest.segments() == []
    report = store.rebuild(prefix="r/")
    assert report.as_dict()["created"] == len(shipped), report.as_dict()
    assert report.as_dict()["unknown"] == 1
    assert not report.ok
    sources = {o.key: o.detail for o in report.objects}
    assert "object's metadata" in sources["r/put"]
    assert "object's metadata" in sources["r/sealed-multipart"]
    assert "object's record" in sources["r/committed-first"]  # started before its size existed
    many = store.manifest.segment("r/many-parts")
    assert many is not None
    # 50 parts' "md5:crc32c" are too long for the metadata; in the crc32c mode ("-:crc32c") they
    # fit. (The crc32c mode's record sidecar: r/committed-first.)
    where = "object's record" if many.checksum == "md5" else "object's metadata"
    assert where in sources["r/many-parts"]

    after = _rows(store)
    foreign = after.pop("r/foreign")
    assert after == before  # the same verified rows: size, crc, etag, parts, origin
    assert foreign[0] == "unknown" and foreign[1] == len(b"written by someone else")
    assert sorted(s.key for s in store.deletable()) == deletable_before  # never the foreign one
    status = store.status()
    assert status.segments["verified"] == len(shipped) and status.segments["unknown"] == 1
    assert [k for k, _ in status.unknown] == ["r/foreign"] and not status.all_verified
    # The audit trail says where each row came from.
    for seg in store.manifest.segments():
        [event] = store.manifest.events(seg.id)
        assert event.from_state is None and event.to_state == seg.state.value
        assert event.detail is not None and (
            event.detail.startswith("rebuilt from") or event.detail.startswith("unknown origin")
        )
    # Reads are checked against the rebuilt rows; recovery leaves the foreign object alone.
    for key, (data, _first) in shipped.items():
        with store.open_read(key) as f:
            assert f.read() == data
    with pytest.raises(uploader.UnverifiedObjectError):
        store.open_read("r/foreign")
    with store.open_read("r/foreign", allow_unverified=True) as f:
        assert f.read() == b"written by someone else"
        assert f.unchecked_bytes == len(b"written by someone else")
    store.recover()
    assert store.manifest.segment("r/foreign").state is uploader.SegmentState.UNKNOWN  # type: ignore[union-attr]

    # Twice changes nothing: every row compared, none written, no event added.
    events = len(store.manifest.events())
    again = store.rebuild(prefix="r/")
    assert again.as_dict()["matched"] == len(shipped) + 1, again.as_dict()
    assert _rows(store) == {**before, "r/foreign": foreign}
    assert len(store.manifest.events()) == events


def test_rebuild_into_a_partial_manifest_compares(
    make_store: StoreFactory, manifest_url: str, tmp_path: Path
) -> None:
    store = make_store()
    rng = random.Random(5)
    _ship(store, tmp_path, "p/a", rng.randbytes(2 * PART + 3))
    _ship(store, tmp_path, "p/b", rng.randbytes(PART + 1))
    before = _rows(store)
    store.close()
    engine = db.create_manifest_engine(manifest_url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM events"))
        conn.execute(
            text("DELETE FROM commits WHERE segment_id = (SELECT id FROM segments WHERE key='p/a')")
        )
        conn.execute(text("DELETE FROM segments WHERE key = 'p/a'"))
        conn.execute(text("UPDATE segments SET crc32c = crc32c + 1 WHERE key = 'p/b'"))
    engine.dispose()

    store = make_store()
    report = store.rebuild()
    outcomes = {o.key: o.outcome for o in report.objects}
    assert outcomes == {"p/a": "created", "p/b": "differs"}
    rows = _rows(store)
    assert rows["p/a"] == before["p/a"]
    assert rows["p/b"][2] == before["p/b"][2] + 1  # compared, never overwritten
    b = store.manifest.segment("p/b")
    assert b is not None
    [event] = store.manifest.events(b.id)
    assert event.from_state == event.to_state == "verified"
    assert event.detail is not None and "crc32c" in event.detail


def test_rebuild_refuses_metadata_that_does_not_match_the_bytes(
    make_store: StoreFactory, remote: Remote, manifest_url: str, tmp_path: Path
) -> None:
    """Metadata copied onto other bytes (same size) does not vouch for them: unknown origin."""
    if not remote[0].startswith("s3://"):
        pytest.skip("forging metadata needs S3 user metadata; staged metadata is identity-bound")
    store = make_store()
    data = random.Random(9).randbytes(1000)
    _ship(store, tmp_path, "forged/0", data)
    found = store.storage.head_metadata("forged/0")
    assert found is not None
    _info, md = found
    assert md["uploader-format"] == "2" and "uploader-parts" in objectmeta.fields(md)
    store.close()
    _put_remote(remote, "forged/0", bytes(1000), md)
    _wipe(manifest_url)
    store = make_store()
    [obj] = store.rebuild().objects
    # What ties a record to bytes: the ETag (md5 mode), or the CRC32C the remote reports for
    # the object (crc32c mode: the forger's PUT declared none).
    assert obj.outcome == "unknown", obj
    assert "ETag" in obj.detail or "reports no CRC32C" in obj.detail, obj


@pytest.mark.parametrize("checksum", ["auto", "md5"])
def test_rebuild_reads_objects_written_with_format_1_metadata(
    make_store: StoreFactory, remote: Remote, manifest_url: str, tmp_path: Path, checksum: str
) -> None:
    """Objects shipped before the metadata's format 2 (one ``uploader-<field>`` entry per field)
    are rebuilt from their metadata as before."""
    if not remote[0].startswith("s3://"):
        pytest.skip("writing format-1 metadata by hand needs S3 user metadata")
    store = make_store(checksum=checksum)
    rng = random.Random(12)
    shipped = {
        "old/put": rng.randbytes(100),
        "old/one-part": rng.randbytes(PART),
        "old/multipart": rng.randbytes(3 * PART + 5),
    }
    for key, data in shipped.items():
        _ship(store, tmp_path, key, data)
    before = _rows(store)
    for key, data in shipped.items():
        found = store.storage.head_metadata(key)
        assert found is not None
        md = objectmeta.fields(found[1])
        assert md.pop(objectmeta.P + "format") == "2"
        old = {objectmeta.P + "format": "1", **md}  # as format 1 wrote it, the same bytes
        if len(data) <= PART:
            _put_remote(remote, key, data, old)
        else:
            # The same parts again (the same ETag, or CRC32C), under format-1 metadata.
            rec = store.manifest.segment(key)
            assert rec is not None
            _multipart_remote(remote, key, data, old, crc32c=rec.by_crc32c)
        again = store.storage.head_metadata(key)
        assert again is not None and again[1] == old
        assert (again[0].size, again[0].etag) == (found[0].size, found[0].etag)  # the same bytes
    store.close()
    _wipe(manifest_url)
    store = make_store(checksum=checksum)
    report = store.rebuild(prefix="old/")
    assert report.as_dict()["created"] == len(shipped), report.as_dict()
    assert all("object's metadata" in o.detail for o in report.objects), report.as_dict()
    assert _rows(store) == before


def test_rebuild_names_metadata_it_cannot_read_and_vouches_for_nothing(
    make_store: StoreFactory, remote: Remote, manifest_url: str, tmp_path: Path
) -> None:
    if not remote[0].startswith("s3://"):
        pytest.skip("writing metadata by hand needs S3 user metadata")
    store = make_store()
    data = random.Random(13).randbytes(100)
    _ship(store, tmp_path, "bad/0", data)
    store.close()
    _put_remote(remote, "bad/0", data, {objectmeta.P + "format": "2", objectmeta.RECORD: "size"})
    _wipe(manifest_url)
    store = make_store()
    [obj] = store.rebuild(prefix="bad/").objects
    assert obj.outcome == "unknown", obj
    assert "'uploader-record' is malformed" in obj.detail, obj
