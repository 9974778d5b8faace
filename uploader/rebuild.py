"""Rebuild: recreate the manifest's rows from the objects under the remote root.

For the disaster every operator plans for: the manifest database is lost (or a new one must learn
what a bucket holds). Each object under the prefix (the hidden ``.uploader/`` excluded) is looked
at with one HEAD (its size, ETag and metadata) and, when its metadata does not hold every part,
one GET of its record sidecar (see :mod:`uploader.objectmeta`). Then:

* **a record that provably describes the object** (:func:`uploader.objectmeta.check`: size as
  the remote reports it, parts contiguous, their CRC32Cs combining to the whole-file CRC32C; tied
  to the object by its ETag, which the parts' MD5s give, or in the crc32c mode by the CRC32C the
  remote reports; where neither can tie it, by its bytes read back part by part, see
  :func:`read_record`): a ``verified`` segment row with its parts, node and path of origin, in
  one transaction with its audit event;
* **anything else** (a foreign object, metadata missing or malformed, a record that does not
  match the object, a record naming a node longer than the manifest holds): a row in state
  ``unknown`` (unknown origin) whose reason says why. Never deletable, never touched by
  recovery, counted by ``status``;
* **a key the manifest already has**: compared, never overwritten. A difference is reported and
  audited on that row (an event from its state to the same state); a match writes nothing, so a
  second rebuild changes nothing.

Rebuild never writes, rewrites or deletes a remote object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from uploader import objectmeta
from uploader.config import MAX_NAME_CHARS
from uploader.digest import normalize_etag
from uploader.errors import InvalidKeyError, StorageError
from uploader.keys import validate_key
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import SEGMENTS
from uploader.objectmeta import ObjectRecord, Unproven, Unusable
from uploader.readback import first_differing
from uploader.records import NewCommit, SegmentRecord
from uploader.states import SegmentState
from uploader.storage.base import ObjectInfo, Storage

log = logging.getLogger("uploader")

#: Outcomes of one object.
CREATED = "created"  # a verified row was created from the object's record
UNKNOWN = "unknown"  # a row of unknown origin was created
MATCHED = "matched"  # the manifest already had the key, and it agrees with the object
DIFFERS = "differs"  # the manifest already had the key, and it does not agree (reported)
SKIPPED = "skipped"  # gone meanwhile, or a name no segment key can have


@dataclass(frozen=True, slots=True)
class RebuiltObject:
    key: str
    outcome: str
    detail: str


@dataclass
class RebuildReport:
    objects: list[RebuiltObject] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for o in self.objects if o.outcome == outcome)

    @property
    def ok(self) -> bool:
        """No object of unknown origin and no row that disagrees with its object."""
        return self.count(UNKNOWN) == 0 and self.count(DIFFERS) == 0

    def as_dict(self) -> dict[str, object]:
        return {
            "created": self.count(CREATED),
            "unknown": self.count(UNKNOWN),
            "matched": self.count(MATCHED),
            "differs": self.count(DIFFERS),
            "skipped": self.count(SKIPPED),
            "objects": [
                {"key": o.key, "outcome": o.outcome, "detail": o.detail} for o in self.objects
            ],
        }


#: How a record was tied to its object by its bytes (see :func:`read_record`).
READ_BACK = "read back"


def read_record(
    storage: Storage, key: str, info: ObjectInfo, md: dict[str, str]
) -> tuple[ObjectRecord, str]:
    """The record that provably describes the object, and how the bytes proved it (``''``: the
    remote's ETag or CRC32C did; :data:`READ_BACK`: they were read back); or Unusable saying
    why there is none.

    Where what the remote reports cannot tie a consistent record to the object (an ETag that is
    not the MD5 form: s3rver's multipart objects, SSE-KMS; no CRC32C reported in the crc32c
    mode), the object is read back, one part at a time, and vouched for only if every part's
    bytes are the record's: as the driver proves such an object before ``verified``."""
    reasons: list[str] = []
    try:
        md = objectmeta.fields(md)  # one entry per field, whichever format wrote it
    except Unusable as exc:
        # Unreadable, it vouches for nothing: as for an object without metadata, only the
        # record sidecar its ETag names may, tied to it as always.
        reasons.append(str(exc))
        md = {}
    else:
        try:
            inline = objectmeta.parse_metadata(key, md)
            if inline is not None:
                return _tied(storage, key, inline, info, md)
        except Unusable as exc:
            if not md:
                raise Unusable("the object has no uploader metadata") from None
            reasons.append(str(exc))
    ours = objectmeta.P + "format" in md  # written by us: its sidecars may be looked for
    crc32c_mode = md.get(objectmeta.P + "checksum") == objectmeta.CRC32C_RECORD
    tag = objectmeta.CRC32C_RECORD if crc32c_mode else normalize_etag(info.etag)
    names = [] if tag is None else [objectmeta.record_name(key, tag)]
    # The crc32c mode's sidecar has one name. An ETag names at most one; where that one does not
    # tie the record, the ETag may not be the MD5 form sidecars are named by (SSE-KMS, s3rver):
    # every sidecar of the key is then a candidate (each names the ETag one completion was to
    # have; only the bytes tell which is this object's). Never for an object we did not write.
    listed = crc32c_mode or not ours
    found = 0
    i = 0
    while i < len(names) or not listed:
        if i == len(names):
            listed = True
            prefix = objectmeta.record_prefix(key)
            names += [n for n in storage.list_hidden(prefix) if n not in names]
            continue
        name = names[i]
        i += 1
        body = storage.read_hidden(name)
        if body is None:
            continue
        found += 1
        try:
            return _tied(storage, key, objectmeta.parse_record(key, body), info, md)
        except Unusable as exc:
            reasons.append(f"record sidecar {objectmeta.record_tag(name)}: {exc}")
    if not found:
        looked = " (none among the key's sidecars)" if listed and not crc32c_mode and ours else ""
        reasons.append(
            f"no record sidecar for {tag}{looked}"
            if tag is not None
            else f"the remote reports no ETag{looked}"
        )
    raise Unusable("; ".join(reasons))


def _tied(
    storage: Storage, key: str, rec: ObjectRecord, info: ObjectInfo, md: dict[str, str]
) -> tuple[ObjectRecord, str]:
    """``rec`` checked against the object (:func:`objectmeta.check`), read back if only its bytes
    can tie them."""
    try:
        return objectmeta.check(rec, info, md), ""
    except Unproven as exc:
        parts = [(p.start, p.end, p.md5, p.crc32c) for p in exc.record.parts]
        i = first_differing(storage, key, parts, info)
        if i is None:
            return exc.record, READ_BACK
        p = exc.record.parts[i]
        raise Unusable(
            f"{exc}, and its bytes read back differ from the record's: part {p.number} "
            f"[{p.start}, {p.end})"
        ) from None


def _compare(manifest: Manifest, seg: SegmentRecord, rec: ObjectRecord | None, why: str) -> str:
    """'' if the row agrees with the object's record, else what differs."""
    if rec is None:
        if seg.state is SegmentState.UNKNOWN:
            return ""
        return f"the manifest has it {seg.state.value}, the object cannot be vouched for ({why})"
    if seg.state is SegmentState.UNKNOWN:
        return f"the manifest has it of unknown origin, the object's {rec.source} vouches for it"
    diffs = []
    for name, ours, theirs in (
        ("size", seg.size, rec.size),
        ("crc32c", seg.crc32c, rec.crc32c),
        ("etag", seg.expected_etag, rec.etag),
    ):
        if ours is not None and ours != theirs:
            diffs.append(f"{name} {ours} in the manifest, {theirs} in the object's {rec.source}")
    if seg.state is SegmentState.VERIFIED and not diffs:
        commits = [
            (c.part_number, c.start, c.end, c.md5, c.crc32c) for c in manifest.commits(seg.id)
        ]
        held = [(p.number, p.start, p.end, p.md5, p.crc32c) for p in rec.parts]
        if commits != held:
            diffs.append("the parts differ")
    return "; ".join(diffs)


#: The manifest's ETag columns (``VARCHAR(64)``).
ETAG_CHARS: int = getattr(SEGMENTS.c.object_etag.type, "length", None) or 64


def _fits(etag: str | None) -> str | None:
    """The remote's ETag if the manifest's column holds it (64 characters), else None: an
    opaque ETag longer than that is named in the row's detail, not stored (PostgreSQL would
    refuse it mid-transaction and stop the rebuild)."""
    return etag if etag is None or len(etag) <= ETAG_CHARS else None


def rebuild_one(
    manifest: Manifest, storage: Storage, key: str, *, worker: str, part_size: int
) -> RebuiltObject:
    try:
        validate_key(key)
    except InvalidKeyError as exc:
        return RebuiltObject(key, SKIPPED, f"not a segment key: {exc}")
    found = storage.head_metadata(key)
    if found is None:
        return RebuiltObject(key, SKIPPED, "gone meanwhile")
    info, md = found
    rec: ObjectRecord | None
    try:
        (rec, how), why = read_record(storage, key, info, md), ""
    except Unusable as exc:
        rec, how, why = None, "", str(exc)
    if rec is not None and len(rec.node) > MAX_NAME_CHARS:
        # An earlier version took such a name (SQLite does not enforce VARCHAR(255)); the
        # manifest cannot hold it (PostgreSQL refuses it mid-transaction), and a row under a
        # cut name would be another node's. Kept, never deletable, reported.
        why = (
            f"its {rec.source} vouches for it, but names node {rec.node[:40]!r}... "
            f"({len(rec.node)} characters), longer than the {MAX_NAME_CHARS} the manifest holds"
        )
        rec, how = None, ""
    existing = manifest.segment(key)
    if existing is None:
        if rec is not None:
            proof = f"etag {rec.etag}" if rec.etag is not None else "its CRC32C"
            if how:
                proof += f", every part's bytes {how}"
            detail = (
                f"rebuilt from the object's {rec.source}: {rec.size} bytes, {proof}, "
                f"crc32c {rec.crc32c:08x}, {len(rec.parts)} parts, from {rec.node}:{rec.path}"
            )
            row = manifest.rebuilt(
                key,
                state=SegmentState.VERIFIED,
                path=rec.path,
                node=rec.node,
                part_size=rec.part_size,
                size=rec.size,
                crc32c=rec.crc32c,
                etag=rec.etag,
                object_etag=_fits(info.etag),
                checksum=rec.checksum,
                upload_mode=rec.mode,
                parts=[NewCommit(p.number, p.start, p.end, p.md5, p.crc32c) for p in rec.parts],
                worker=worker,
                detail=detail,
            )
            outcome = CREATED
        else:
            detail = (
                f"unknown origin (found by rebuild, {info.size} bytes, etag {info.etag}): {why}"
            )
            row = manifest.rebuilt(
                key,
                state=SegmentState.UNKNOWN,
                path="",
                node="",
                part_size=part_size,
                size=info.size,
                crc32c=None,
                etag=_fits(info.etag),
                upload_mode=None,
                parts=[],
                worker=worker,
                detail=detail,
            )
            outcome = UNKNOWN
        if row is not None:
            return RebuiltObject(key, outcome, detail)
        existing = manifest.segment(key)  # registered meanwhile: compare with it instead
        if existing is None:
            return RebuiltObject(key, SKIPPED, "row inserted and removed meanwhile")
    diff = _compare(manifest, existing, rec, why)
    if not diff:
        return RebuiltObject(key, MATCHED, f"already in the manifest ({existing.state.value})")
    detail = f"rebuild: the manifest row ({existing.state.value}) differs from the object: {diff}"
    manifest.rebuild_compared(existing.id, worker, detail)
    log.warning("segment %r: %s", key, detail)
    return RebuiltObject(key, DIFFERS, detail)


def rebuild(
    manifest: Manifest,
    storage: Storage,
    *,
    prefix: str = "",
    worker: str,
    part_size: int,
    concurrency: int = 4,
    on_object: Callable[[RebuiltObject], None] | None = None,
) -> RebuildReport:
    """Rebuild rows for every object under ``prefix`` (see the module's docstring)."""
    keys = storage.list_objects(prefix)
    report = RebuildReport()

    def one(key: str) -> RebuiltObject:
        try:
            out = rebuild_one(manifest, storage, key, worker=worker, part_size=part_size)
        except StorageError as exc:
            out = RebuiltObject(key, SKIPPED, f"remote error, not rebuilt: {exc}")
        if on_object is not None:
            on_object(out)
        return out

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        report.objects.extend(pool.map(one, keys))
    return report
