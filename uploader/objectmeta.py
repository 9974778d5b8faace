"""What an object says about itself: the metadata written with its upload, and the record sidecar.

A lost manifest must be rebuildable from the remote alone (``store.rebuild()``), so every object
carries what the manifest knows of it, written with the upload itself:

* **Object metadata** (S3 user metadata; staged backends: inside the ETag sidecar named by the
  object file's identity, published with the bytes), set where the upload starts:
  ``create_multipart_upload`` or the single PUT. Format 2 (:data:`METADATA_FORMAT`) writes two
  entries, ``uploader-format: 2`` and ``uploader-record``, the fields URL-encoded in one value
  (``part-size=...&node=...``): each header costs the server and the signature (ten cost a small
  PUT about 5% on RGW). Format 1, one ``uploader-<field>`` entry per field, is still read
  (:func:`fields`). It always holds the part size and the node and path of origin. The size,
  whole-file CRC32C, expected ETag and the per-part list (``md5:crc32c`` per part, with its
  SHA-256) are added when they are known at that moment: always for a PUT, and for a multipart
  upload started after the seal was recorded. The parts of a multipart upload started by an
  earlier ``commit()`` are sent before the file's final size exists, so its metadata cannot hold
  them (S3 cannot change an object's metadata without rewriting it: ``CopyObject`` replaces the
  object, which we never do).
* **The record sidecar** ``.uploader/records/<h[:2]>/<h>.<etag>.json`` (``h``: SHA-256 of the key,
  ``etag``: the ETag the completed object must have): the segment's full manifest record (size,
  part size, CRC32C, mode, node, path, and every part's range, MD5 and CRC32C). The driver writes
  it right before every ``complete``, and before a PUT whose metadata did not fit S3's 2 KB. Named
  by the ETag, it describes exactly the bytes that ETag stands for; a stale one (a completion that
  never happened) names an ETag no object has, and is never read.

Rebuild trusts neither blindly: a record is used only if the object's size (as the remote reports
it) is what the record says, the parts cover ``[0, size)`` without gaps, their MD5s give the
record's ETag, their CRC32Cs combine to the whole-file CRC32C, and the object's ETag is that ETag.
Where the ETag is another (s3rver's plain MD5 of a multipart object, SSE-KMS) or missing, the
record is :class:`Unproven`: only the object's bytes, read back, can tie it (rebuild does). A
record whose bytes differ, or that does not hold together, leaves an object of unknown origin.

The crc32c checksum mode (no part MD5s, no ETag to expect): the metadata says
``checksum=crc32c`` (format 1: ``uploader-checksum: crc32c``) and has no ``etag``; each part is
``-:crc32c``; the record sidecar is ``<h>.crc32c.json`` (no ETag to name it by). Such a record
is tied by the CRC32C the remote reports for the object (HEAD with ``ChecksumMode``) being the one
its parts give; a remote that reports none leaves it :class:`Unproven`. A CRC32C reported that is
not the parts' refuses the record in either mode: the remote checksummed other bytes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode

from uploader.digest import checksum_matches, combine_crcs, multipart_etag, normalize_etag
from uploader.records import CommitRecord, SegmentRecord
from uploader.storage.base import ObjectInfo

#: The record sidecar's format.
FORMAT = 1
#: The object metadata's format written (every field in :data:`RECORD`), and those read.
METADATA_FORMAT = 2
READ_FORMATS = ("1", "2")
#: S3 limits user-defined metadata (names and values, UTF-8) to 2 KB per object.
METADATA_LIMIT = 2048
P = "uploader-"
#: The format-2 entry that holds every field, URL-encoded (``part-size=...&node=...``).
RECORD = P + "record"
#: Characters the fields' values keep as they are in :data:`RECORD` (the part list's ``:``/``;``,
#: a path's ``/``): fewer bytes of S3's 2 KB. ``&``, ``=``, ``%`` and ``+`` are always encoded.
_KEPT = "/:;"
#: Fields format 1 holds ``quote``d (with the characters each keeps); format 2 as they are, encoded
#: once by the record entry (twice, a non-ASCII byte would take 5 bytes of S3's 2 KB, not 3).
_QUOTED = {P + "node": "", P + "path": "/"}


@dataclass(frozen=True, slots=True)
class PartInfo:
    number: int
    start: int
    end: int
    md5: str | None  # None in the crc32c checksum mode
    crc32c: int


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    """What an object's metadata or record sidecar says about it (validated against the object)."""

    key: str
    size: int
    part_size: int
    crc32c: int
    etag: str | None  # None in the crc32c checksum mode
    mode: str  # 'put' or 'multipart'
    node: str
    path: str
    parts: tuple[PartInfo, ...]
    source: str  # 'metadata' or 'record'
    checksum: str = "md5"  # the segment's checksum mode


#: What names a crc32c-mode record sidecar in place of an ETag.
CRC32C_RECORD = "crc32c"


def record_name(key: str, etag: str) -> str:
    """The record sidecar's name under the hidden prefix ``.uploader/`` (``etag``: the ETag the
    object must have, or :data:`CRC32C_RECORD` in the crc32c mode)."""
    return f"{record_prefix(key)}{etag}.json"


def record_prefix(key: str) -> str:
    """What every record sidecar of ``key`` is named with first (whatever ETag names it)."""
    h = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"records/{h[:2]}/{h}."


def _agrees_with_metadata(rec: ObjectRecord, md: Mapping[str, str]) -> None:
    """The origin the object's metadata states (part size, mode; the path if it fitted) must be
    the record's: a sidecar written for another upload never vouches for it. Not the node (a
    machine, not the bytes): one renamed mid-upload is the old in the metadata, the new in the
    record (``uploader db rename-node``); a rebuild takes the record's."""
    if P + "format" not in md:
        return
    mode = CRC32C_RECORD if md.get(P + "checksum") == CRC32C_RECORD else "md5"
    for field, ours, theirs in (
        ("checksum mode", rec.checksum, mode),
        ("part size", str(rec.part_size), md.get(P + "part-size")),
        ("mode", rec.mode, md.get(P + "mode")),
        ("path", rec.path, None if P + "path" not in md else unquote(md[P + "path"])),
    ):
        if theirs is not None and ours != theirs:
            raise Unusable(
                f"record {field} {ours!r} differs from the object's metadata ({theirs!r})"
            )


def record_tag(name: str) -> str:
    """What names a record sidecar (the ETag, or :data:`CRC32C_RECORD`) from its name."""
    return name.rpartition("/")[2].partition(".")[2].removesuffix(".json")


def _parts_text(parts: Sequence[tuple[str | None, int]]) -> str:
    return ";".join(f"{md5 or '-'}:{crc:08x}" for md5, crc in parts)


def _size(md: Mapping[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in md.items())


def sealed_parts(seg: SegmentRecord, commits: Sequence[CommitRecord]) -> bool:
    """Whether the seal is recorded and ``commits`` are all of its parts."""
    return (
        seg.size is not None
        and seg.crc32c is not None
        and (seg.expected_etag is not None or seg.by_crc32c)
        and bool(commits)
        and commits[0].start == 0
        and commits[-1].end == seg.size
    )


def object_metadata(seg: SegmentRecord, commits: Sequence[CommitRecord]) -> dict[str, str]:
    """The metadata to write where the upload starts: what is known of the segment now."""
    return _fields(seg, commits)[1]


def encode(md: Mapping[str, str]) -> dict[str, str]:
    """Format 1's entries (``uploader-<field>``, :func:`fields`) as the format-2 metadata written."""
    pairs = [
        (k.removeprefix(P), unquote(v) if k in _QUOTED else v)
        for k, v in md.items()
        if k != P + "format"
    ]
    return {P + "format": str(METADATA_FORMAT), RECORD: urlencode(pairs, safe=_KEPT)}


def fields(md: Mapping[str, str]) -> dict[str, str]:
    """An object's metadata as format 1's entries (one ``uploader-<field>`` each, as every reader
    here takes it), whichever format wrote it; :class:`Unusable` if a record entry is unreadable."""
    if md.get(P + "format") != "2":
        return dict(md)
    text = md.get(RECORD)
    if text is None:
        raise Unusable(f"object metadata of format 2 has no {RECORD!r} entry")
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=True)
    except ValueError as exc:
        raise Unusable(f"object metadata {RECORD!r} is malformed ({exc})") from None
    out = {k: v for k, v in md.items() if k != RECORD}
    for name, value in pairs:
        if P + name in out:
            raise Unusable(f"object metadata {RECORD!r} gives {name!r} twice")
        safe = _QUOTED.get(P + name)
        out[P + name] = value if safe is None else quote(value, safe=safe)
    return out


def _fields(
    seg: SegmentRecord, commits: Sequence[CommitRecord]
) -> tuple[dict[str, str], dict[str, str]]:
    """What the metadata says of the segment now, as format 1's entries (:func:`fields`) and
    encoded, within S3's 2 KB (encoded again only if an entry must go: this runs per PUT)."""
    md = {
        P + "format": str(METADATA_FORMAT),
        P + "part-size": str(seg.part_size),
        P + "node": quote(seg.node, safe=""),
        P + "path": quote(seg.path, safe="/"),
    }
    if seg.by_crc32c:
        md[P + "checksum"] = CRC32C_RECORD  # (absent: the md5 mode, as every older object)
    if sealed_parts(seg, commits):
        assert seg.size is not None and seg.crc32c is not None
        text = _parts_text([(c.md5, c.crc32c) for c in commits])
        md[P + "size"] = str(seg.size)
        md[P + "crc32c"] = f"{seg.crc32c:08x}"
        if seg.expected_etag is not None:
            md[P + "etag"] = seg.expected_etag
        md[P + "mode"] = seg.upload_mode or "multipart"
        md[P + "parts-sha256"] = hashlib.sha256(text.encode()).hexdigest()
        md[P + "parts"] = text
    encoded = encode(md)
    if P + "parts" in md and _size(encoded) > METADATA_LIMIT:
        del md[P + "parts"]  # the record sidecar holds them
        encoded = encode(md)
    if _size(encoded) > METADATA_LIMIT:
        del md[P + "path"]  # a very long path: the record sidecar holds it
        encoded = encode(md)
    return md, encoded


def metadata_complete(md: Mapping[str, str]) -> bool:
    """Whether the metadata alone is enough to rebuild the segment (no sidecar needed)."""
    return all(P + k in md for k in ("size", "parts", "path", "node"))


def put_metadata(seg: SegmentRecord, commit: CommitRecord) -> tuple[dict[str, str], bool]:
    """A single PUT's object metadata, and whether the record sidecar must be written before
    the PUT (the seal's record did not fit S3's 2 KB of metadata)."""
    md, encoded = _fields(seg, [commit])
    return encoded, not metadata_complete(md) and sealed_parts(seg, [commit])


def record_json(seg: SegmentRecord, commits: Sequence[CommitRecord]) -> bytes:
    """The full manifest record of a sealed segment, for the record sidecar."""
    return json.dumps(
        {
            "format": FORMAT,
            "key": seg.key,
            "size": seg.size,
            "part_size": seg.part_size,
            "crc32c": seg.crc32c,
            "etag": seg.expected_etag,
            "mode": seg.upload_mode,
            "node": seg.node,
            "path": seg.path,
            "parts": [[c.part_number, c.start, c.end, c.md5, c.crc32c] for c in commits],
            **({"checksum": CRC32C_RECORD} if seg.by_crc32c else {}),
        },
        sort_keys=True,
    ).encode()


class Unusable(Exception):
    """The metadata or record cannot vouch for the object (the message says why)."""


class Unproven(Unusable):
    """A whole, consistent record that what the remote reports neither contradicts nor ties to the
    object (see :func:`check`): it vouches for the object only if the object's bytes, read back
    part by part, are the record's parts."""

    def __init__(self, record: ObjectRecord, why: str) -> None:
        super().__init__(why)
        self.record = record


_MD5 = re.compile(r"[0-9a-f]{32}")


def _md5(value: object) -> str:
    """A part's MD5 as records hold it (32 lowercase hex digits), or ValueError."""
    text = str(value)
    if not _MD5.fullmatch(text):
        raise ValueError(f"part MD5 {text!r} is not 32 hex digits")
    return text


def _from_metadata(key: str, md: Mapping[str, str]) -> ObjectRecord:
    try:
        size = int(md[P + "size"])
        part_size = int(md[P + "part-size"])
        parts: list[PartInfo] = []
        by_crc = md.get(P + "checksum") == CRC32C_RECORD
        for i, item in enumerate(md[P + "parts"].split(";")):
            md5, crc = item.split(":")
            start = i * part_size
            parts.append(
                PartInfo(
                    i + 1,
                    start,
                    min(start + part_size, size),
                    None if by_crc else _md5(md5),
                    int(crc, 16),
                )
            )
        return ObjectRecord(
            key=key,
            size=size,
            part_size=part_size,
            crc32c=int(md[P + "crc32c"], 16),
            etag=None if by_crc else md[P + "etag"],
            checksum=CRC32C_RECORD if by_crc else "md5",
            mode=md[P + "mode"],
            node=unquote(md[P + "node"]),
            path=unquote(md[P + "path"]),
            parts=tuple(parts),
            source="metadata",
        )
    except (KeyError, ValueError) as exc:
        raise Unusable(f"object metadata is malformed ({exc!r})") from None


def _from_record(key: str, body: bytes) -> ObjectRecord:
    try:
        doc = json.loads(body)
        if doc["format"] != FORMAT:
            raise Unusable(f"record sidecar has format {doc['format']!r}, this code reads {FORMAT}")
        if doc["key"] != key:
            raise Unusable(f"record sidecar names key {doc['key']!r}")
        by_crc = doc.get("checksum") == CRC32C_RECORD
        return ObjectRecord(
            key=key,
            size=int(doc["size"]),
            part_size=int(doc["part_size"]),
            crc32c=int(doc["crc32c"]),
            etag=None if by_crc else str(doc["etag"]),
            mode=str(doc["mode"]),
            node=str(doc["node"]),
            path=str(doc["path"]),
            parts=tuple(
                PartInfo(int(n), int(s), int(e), None if by_crc else _md5(m), int(c))
                for n, s, e, m, c in doc["parts"]
            ),
            source="record",
            checksum=CRC32C_RECORD if by_crc else "md5",
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise Unusable(f"record sidecar is malformed ({exc!r})") from None


def check(rec: ObjectRecord, info: ObjectInfo, md: Mapping[str, str]) -> ObjectRecord:
    """``rec`` if it provably describes the object ``info``; else :class:`Unusable` naming the
    difference, or :class:`Unproven` when the record is whole and consistent and nothing the
    remote reports contradicts it, but nothing it reports ties it to the object either (an ETag
    that is not the one the part MD5s give, no CRC32C reported): only the bytes can tell."""
    if rec.size != info.size:
        raise Unusable(f"the object has {info.size} bytes, its record says {rec.size}")
    if rec.mode not in ("put", "multipart") or not rec.parts:
        raise Unusable(f"record has mode {rec.mode!r} and {len(rec.parts)} parts")
    pos = 0
    for i, p in enumerate(rec.parts):
        if p.number != i + 1 or p.start != pos or p.end < p.start:
            raise Unusable(f"record part {p.number} [{p.start}, {p.end}) leaves a gap or overlaps")
        pos = p.end
    if pos != rec.size:
        raise Unusable(f"record parts end at {pos}, the object has {rec.size} bytes")
    want = None
    if rec.checksum != CRC32C_RECORD:
        md5s = [p.md5 or "" for p in rec.parts]
        want = md5s[0] if rec.mode == "put" else multipart_etag(md5s)
        if want != rec.etag:
            raise Unusable(f"record's parts give the ETag {want}, the record says {rec.etag}")
    if combine_crcs([(p.crc32c, p.end - p.start) for p in rec.parts]) != rec.crc32c:
        raise Unusable("record parts' CRC32Cs do not combine to its whole-file CRC32C")
    digest = md.get(P + "parts-sha256")
    text = _parts_text([(p.md5, p.crc32c) for p in rec.parts])
    if digest is not None and digest != hashlib.sha256(text.encode()).hexdigest():
        raise Unusable("record parts differ from the digest in the object's metadata")
    for field, value in (("size", str(rec.size)), ("crc32c", f"{rec.crc32c:08x}")):
        if P + field in md and md[P + field] != value:
            raise Unusable(f"record {field} differs from the object's metadata")
    _agrees_with_metadata(rec, md)
    parts = [(p.crc32c, p.end - p.start) for p in rec.parts]
    if info.checksum is not None and not checksum_matches(
        info.checksum, parts, multipart=rec.mode != "put"
    ):
        # The remote checksummed other bytes than the record's parts: never its object.
        raise Unusable(
            f"the object's CRC32C {info.checksum} is not the one its record's parts give; it is "
            "not the object the record describes"
        )
    if rec.checksum == CRC32C_RECORD:
        if info.checksum is None:
            raise Unproven(
                rec,
                "the record is in the crc32c mode (no part MD5s) and the remote reports no "
                "CRC32C for the object",
            )
        return rec
    etag = normalize_etag(info.etag)
    if etag is None:
        raise Unproven(rec, "the remote reports no ETag for the object")
    if etag != want:
        raise Unproven(
            rec, f"the object's ETag {etag} is not the one its record's parts give ({want})"
        )
    return rec


def parse_metadata(key: str, md: Mapping[str, str]) -> ObjectRecord | None:
    """The record held by the metadata alone (``md`` as :func:`fields` gives it), or None if it
    needs the record sidecar."""
    if md.get(P + "format") is None:
        raise Unusable("no uploader metadata")
    if md[P + "format"] not in READ_FORMATS:
        raise Unusable(
            f"metadata format {md[P + 'format']!r}, this code reads {' and '.join(READ_FORMATS)}"
        )
    return _from_metadata(key, md) if metadata_complete(md) else None


def parse_record(key: str, body: bytes) -> ObjectRecord:
    return _from_record(key, body)
