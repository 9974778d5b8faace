"""``listed_proof.md5_proven``: a crc32c-mode part listed without a checksum is proven only by
the MD5 of the local bytes whose CRC32C is the recorded one being the listed ETag."""

from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

from tests.records import segment_record
from uploader.digest import crc32c_of
from uploader.listed_proof import md5_proven
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState
from uploader.storage.base import PartRef

PART = 100


def _md5(b: bytes) -> str:
    return hashlib.md5(b, usedforsecurity=False).hexdigest()


def _setup(tmp_path: Path) -> tuple[SegmentRecord, list[CommitRecord], bytes]:
    data = random.Random(3).randbytes(3 * PART)
    path = tmp_path / "seg"
    path.write_bytes(data)
    seg = segment_record(
        path=str(path),
        part_size=PART,
        size=3 * PART,
        crc32c=crc32c_of(data),
        upload_id="u",
        checksum="crc32c",
    )
    commits = [
        CommitRecord(
            id=i + 1,
            segment_id=1,
            part_number=i + 1,
            start=i * PART,
            end=(i + 1) * PART,
            md5=None,
            crc32c=crc32c_of(data[i * PART : (i + 1) * PART]),
            etag=None,
            state=CommitState.PENDING,
            attempts=0,
            last_error=None,
            reason=None,
        )
        for i in range(3)
    ]
    return seg, commits, data


def _listed(data: bytes, **kw: object) -> dict[int, PartRef]:
    parts = {n: PartRef(n, _md5(data[(n - 1) * PART : n * PART]), PART) for n in (1, 2, 3)}
    return {n: dataclasses.replace(p, **kw) for n, p in parts.items()}  # type: ignore[arg-type]


def test_parts_listed_with_our_bytes_md5_are_proven(tmp_path: Path) -> None:
    seg, commits, data = _setup(tmp_path)
    listed = _listed(data)
    assert md5_proven(seg, commits, listed) == {n: p.etag for n, p in listed.items()}


def test_nothing_else_is_proven(tmp_path: Path) -> None:
    seg, commits, data = _setup(tmp_path)
    # Listed with a CRC32C: that decides (the plan compares it), no local read is needed.
    assert md5_proven(seg, commits, _listed(data, crc32c=1)) == {}
    # Another size, another ETag (SSE-KMS), a multipart-looking or empty ETag.
    assert md5_proven(seg, commits, _listed(data, size=PART - 1)) == {}
    for etag in ("f" * 32, f"{'a' * 32}-2", ""):
        assert md5_proven(seg, commits, _listed(data, etag=etag)) == {}
    # Not listed at all.
    assert md5_proven(seg, commits, {}) == {}
    # Uploaded parts (their acknowledgement proved them) and md5-mode parts are not this proof's.
    uploaded = [dataclasses.replace(c, state=CommitState.UPLOADED, etag="e") for c in commits]
    assert md5_proven(seg, uploaded, _listed(data)) == {}
    md5_mode = [dataclasses.replace(c, md5="0" * 32) for c in commits]
    assert md5_proven(seg, md5_mode, _listed(data)) == {}


def test_local_bytes_that_are_not_the_recorded_ones_prove_nothing(tmp_path: Path) -> None:
    seg, commits, data = _setup(tmp_path)
    listed = _listed(data)
    # Part 2's local bytes changed since they were recorded; the remote holds what the listing
    # says, which matches neither the record nor (now) the file: no proof from them.
    changed = bytearray(data)
    changed[PART + 7] ^= 0xFF
    Path(seg.path).write_bytes(bytes(changed))
    listed[2] = PartRef(2, _md5(bytes(changed[PART : 2 * PART])), PART)
    assert sorted(md5_proven(seg, commits, listed)) == [1, 3]
    # Truncated within part 3, then gone: unreadable bytes prove nothing and raise nothing.
    Path(seg.path).write_bytes(bytes(changed[: 2 * PART + 10]))
    assert sorted(md5_proven(seg, commits, listed)) == [1]
    Path(seg.path).unlink()
    assert md5_proven(seg, commits, listed) == {}
