"""Where a segment stands and what to do next: the one decision, as a pure function.

:func:`next_step` looks at a :class:`Position` (what the manifest records, what this drive learned
from the remote, what it checked of the local bytes) and names one :class:`Step`. It does no I/O:
:mod:`uploader.driver` observes, executes the step, and asks again, until the segment is
``verified``, ``failed`` with a reason, or blocked for a named reason (litestream's
``Replica.Sync`` computes its position before each step; so does this).

Words:

* **learned**: a remote fact (the parts an upload holds, the object at the key) asked for in this
  drive. Nothing learned in an earlier process is trusted: a recorded ETag says what the remote
  said *then*.
* **fresh**: a part recorded by the caller of this drive and never sent by anyone: there is
  nothing to learn about it before sending it.
* **local check**: every byte of the local file read again and found equal to the CRC32C
  recorded for it, the size and file identity unchanged. Nothing becomes ``verified`` without it.
* **foreign object**: an object at the key that is not the one the seal describes and that this
  segment never decided to remove. It is never deleted or overwritten: the segment fails.
* **proven**: the object at the key is the one the seal describes. Its size and ETag equal the
  seal's (one HEAD) -- or, where the ETag is not the MD5 of the part MD5s (s3rver gives a plain
  MD5 for multipart objects, SSE-KMS an opaque string), its bytes were read back and every part's
  MD5 and CRC32C equal the recorded ones. An ETag alone never makes a correct object foreign, bad
  or due for removal.
* **unlistable**: the remote does not implement ListParts (405/501). Nothing it holds for the
  upload can be learned, so every part is sent again under a fresh upload.

The table of the recovery module's docstring is this function, case by case. :class:`Position`,
:class:`Act` and :class:`Step` are defined in :mod:`uploader.position` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from uploader.config import UploadMode
from uploader.digest import checksum_matches, normalize_etag
from uploader.position import Act, Position, Step
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState, SegmentState
from uploader.storage.base import Expected, ObjectInfo, PartRef
from uploader.storage.rules import matches

# The decision's vocabulary lives in uploader.position; imported from here by the driver and tests.
__all__ = ["Act", "Position", "Step", "checksum_ok", "expected", "next_step", "sealed_proof"]


def expected(seg: SegmentRecord, commits: Sequence[CommitRecord]) -> Expected:
    """What the sealed object must be: its size and the ETag the part MD5s give, or (the crc32c
    mode, no MD5s) the CRC32C the parts give, as the remote must report it."""
    assert seg.size is not None
    if seg.by_crc32c:
        ordered = sorted(commits, key=lambda c: c.part_number)
        return Expected(
            size=seg.size,
            parts=tuple((c.crc32c, c.size) for c in ordered),
            multipart=seg.upload_mode != "put",
        )
    assert seg.expected_etag is not None
    return Expected(size=seg.size, etag=seg.expected_etag)


def _describe(obj: ObjectInfo) -> str:
    crc = f", crc32c {obj.checksum}" if obj.checksum is not None else ""
    return f"{obj.size} bytes, etag {obj.etag}{crc}"


def checksum_ok(obj: ObjectInfo, seg: SegmentRecord, commits: Sequence[CommitRecord]) -> bool:
    """Whether the CRC32C the remote reports for the object (if any) is the one of the recorded
    parts. A remote that reports none proves nothing here (the ETag then does)."""
    if obj.checksum is None:
        return True
    parts = [(c.crc32c, c.size) for c in sorted(commits, key=lambda c: c.part_number)]
    return checksum_matches(obj.checksum, parts, multipart=seg.upload_mode != "put")


def _judge(p: Position) -> bool | None:
    """Whether the object learned at the key is the one the seal describes (see "proven");
    None: only its bytes can tell (same size, an ETag that is not the expected one)."""
    obj = p.obj
    if obj is None or obj.size != p.seg.size or p.read_back_differs is not None:
        return False  # the bytes read back outrank any ETag
    if not checksum_ok(obj, p.seg, p.commits):
        # The remote checksummed other bytes than the recorded parts (or keeps a checksum a
        # reader would see fail): never the seal's object, whatever its ETag says.
        return False
    if p.deep_checked or matches(obj, expected(p.seg, p.commits)):
        return True
    # An ETag that is not the expected one -- or, in the crc32c mode, no checksum reported: never
    # accepted as is, and never judged foreign for that alone. The bytes read back tell.
    return None


def _twin(p: Position) -> Step | None:
    """The object's ETag is the seal's and yet its bytes differ (a deep read): it cannot be
    named apart from a good upload for removal."""
    if (
        p.read_back_differs is None
        or p.obj is None
        or p.obj.etag != normalize_etag(p.seg.expected_etag)
    ):
        return None
    return Step(
        Act.FAIL,
        reason=f"object at key {p.seg.key!r}: {p.read_back_differs} although its ETag "
        "matches; it cannot be named exactly for removal and is left alone",
    )


def _read_back(p: Position) -> Step:
    assert p.obj is not None
    if p.seg.by_crc32c:
        return Step(
            Act.DEEP_READ,
            reason="the remote reports no CRC32C for the object (the seal's proof in the crc32c "
            "mode); its bytes are read back and compared part by part",
        )
    return Step(
        Act.DEEP_READ,
        reason=f"the object's ETag ({p.obj.etag}) is not the one expected from the part MD5s "
        f"({p.seg.expected_etag}); its bytes are read back and compared part by part",
    )


#: Steps that read the local file, or prepare to send its bytes again (a part put back to
#: pending can only be sent from the file). Only a worker on the segment's node takes them:
#: elsewhere the file is not there to read, and a reset it could not follow up would only
#: undo what the manifest knows.
NEEDS_LOCAL = frozenset(
    {
        Act.RESET_UPLOAD,
        Act.UNSEND_PARTS,
        Act.START_UPLOAD,
        Act.SEND,
        Act.PUT,
        Act.CHECK_LOCAL,
        Act.REUPLOAD,
    }
)


def next_step(p: Position) -> Step:
    """The one place that decides a segment's next step."""
    step = _next_step(p)
    if step.act in NEEDS_LOCAL and not p.local_here:
        return Step(
            Act.BLOCK,
            reason=(
                f"next: {step.act.value}{' (' + step.reason + ')' if step.reason else ''}; "
                f"that needs the local file, which is on node {p.seg.node!r}: left as it is "
                "for a worker there"
            ),
        )
    return step


def _next_step(p: Position) -> Step:
    seg = p.seg
    if seg.state in (SegmentState.VERIFIED, SegmentState.FAILED):
        return Step(Act.DONE, reason=seg.state.value)
    pending = tuple(
        c for c in p.commits if c.state is CommitState.PENDING and c.id not in p.inflight
    )
    if seg.state is SegmentState.OPEN:
        if not pending:
            return Step(Act.DONE, reason="open: nothing pending; its writer seals it")
        return _parts(p, pending)
    if seg.state is SegmentState.SEALED:
        if seg.remove_etag is not None:
            return _remove(p, seg.remove_etag)
        if seg.upload_mode == UploadMode.PUT:
            return _sealed_put(p)
        return _sealed_multipart(p, pending)
    return _uploaded(p)


def _parts(p: Position, pending: tuple[CommitRecord, ...]) -> Step:
    """Pending parts: learn what the upload holds, reuse what it has, send the rest."""
    seg = p.seg
    if (
        seg.upload_id is not None
        and not p.parts_known
        and not all(c.id in p.fresh for c in pending)
    ):
        return Step(Act.LIST_PARTS)
    if p.parts_known and p.parts is None:
        if seg.state is SegmentState.SEALED:
            if not p.object_known:
                return Step(Act.HEAD)  # completed before the crash?
            if p.obj is not None:
                return _found(p)
        if not p.parts_listable:
            if p.inflight:
                # Their acknowledgements would land on parts reset for the fresh upload.
                return Step(
                    Act.BLOCK,
                    reason="the remote cannot list the parts of upload "
                    f"{seg.upload_id}; its parts are sent again under a fresh upload once no "
                    "send of this segment is in flight",
                )
            return Step(
                Act.RESET_UPLOAD,
                reason=f"the remote cannot list the parts of upload {seg.upload_id} (ListParts "
                "not supported): every part is sent again under a fresh upload",
            )
        return Step(Act.RESET_UPLOAD, reason=f"upload {seg.upload_id} is unknown to the remote")
    if p.parts_known and p.parts is not None:
        held = tuple(c for c in pending if _held(p.parts, c, p.md5_proven))
        if held:
            md5 = any(c.part_number in (p.md5_proven or {}) for c in held)
            also = "; listed without one: the MD5 of the local bytes" if md5 else ""
            return Step(
                Act.ADOPT_PARTS, held, reason=f"held by the remote with the {_proof(seg)}{also}"
            )
        lost = tuple(
            c for c in p.commits if c.state is CommitState.UPLOADED and not _held(p.parts, c)
        )
        if lost and seg.upload_id is not None:
            return Step(
                Act.UNSEND_PARTS,
                lost,
                reason=f"not held by the remote with the {_proof(seg)}; sending it again",
            )
    if seg.upload_id is None:
        return Step(Act.START_UPLOAD)
    return Step(Act.SEND, pending)


def sealed_proof(seg: SegmentRecord) -> str:
    """What the seal expects of the object besides its size, for messages."""
    if seg.by_crc32c:
        return f"the CRC32C of its parts (whole file {seg.crc32c or 0:08x})"
    return f"etag {seg.expected_etag}"


def _proof(seg: SegmentRecord) -> str:
    return "recorded CRC32C and size" if seg.by_crc32c else "recorded MD5"


def _held(
    parts: Mapping[int, PartRef], c: CommitRecord, md5_proven: Mapping[int, str] | None = None
) -> bool:
    """The remote lists the part with its MD5, or (an uploaded part) with the very ETag it
    acknowledged for our bytes (SSE-KMS ETags are no MD5s; that acknowledgement was proven by
    the part's CRC32C). A crc32c-mode part (no MD5): listed with its size and its CRC32C; or, an
    uploaded part (its CRC32C was echoed when it was acknowledged) where the remote lists no part
    checksums (moto), with the very ETag it acknowledged; a pending one there only where the
    listed ETag is the MD5 of its local bytes (``md5_proven``, :mod:`uploader.listed_proof`)."""
    part = parts.get(c.part_number)
    if part is None:
        return False
    if c.md5 is None:
        if part.size != c.size:
            return False
        if part.crc32c is not None:
            return part.crc32c == c.crc32c
        if c.state is CommitState.UPLOADED:
            return bool(c.etag) and part.etag == c.etag
        proven = (md5_proven or {}).get(c.part_number)
        return proven is not None and proven == normalize_etag(part.etag)
    etag = normalize_etag(part.etag)
    return etag == c.md5 or (c.state is CommitState.UPLOADED and etag == c.etag)


def _found(p: Position) -> Step:
    """A sealed segment found an object at its key before publishing one: adopt it if it is
    the seal's, read it back if only its bytes can tell, else leave it alone and fail."""
    assert p.obj is not None
    verdict = _judge(p)
    if verdict is None:
        return _read_back(p)
    if verdict:
        return Step(Act.ADOPT_OBJECT, tuple(p.commits))
    return _twin(p) or _foreign(p.obj, p.seg, p.read_back_differs)


def _foreign(obj: ObjectInfo, seg: SegmentRecord, differs: str | None = None) -> Step:
    return Step(
        Act.FAIL,
        reason=(
            f"object at key {seg.key!r} does not match the local bytes ({_describe(obj)}; the "
            f"seal expects {seg.size} bytes, {sealed_proof(seg)}"
            f"{'; read back: ' + differs if differs else ''}); it was not written by this "
            "segment and is left alone"
        ),
    )


def _local(p: Position, then: Step) -> Step:
    """``then``, once the local bytes were checked by this drive."""
    if p.local_checked:
        return then
    if not p.local_here:
        return Step(
            Act.BLOCK,
            reason=(
                f"the local bytes are on node {p.seg.node!r}; a worker there checks them "
                "before the segment becomes verified"
            ),
        )
    return Step(Act.CHECK_LOCAL)


def _sealed_put(p: Position) -> Step:
    seg = p.seg
    [commit] = p.commits
    if not p.object_known:
        if commit.state is CommitState.PENDING and commit.id in p.fresh:
            return Step(Act.PUT, (commit,))
        return Step(Act.HEAD)
    if p.obj is None:
        return Step(Act.PUT, (commit,))
    verdict = _judge(p)
    if verdict is None:
        return _read_back(p)
    if not verdict:
        return _twin(p) or _foreign(p.obj, seg, p.read_back_differs)
    if p.deep and not p.deep_checked:
        return Step(Act.DEEP_READ)
    return _local(p, Step(Act.VERIFY_PUT, (commit,)))


def _sealed_multipart(p: Position, pending: tuple[CommitRecord, ...]) -> Step:
    seg = p.seg
    if pending:
        return _parts(p, pending)
    if any(c.state is CommitState.PENDING for c in p.commits):
        return Step(Act.BLOCK, reason="parts are being sent by a writer's commit")
    if p.object_known and p.obj is not None:
        return _found(p)
    if p.parts_known and p.parts is None:
        if not p.object_known:
            return Step(Act.HEAD)
        return Step(Act.RESET_UPLOAD, reason=f"upload {seg.upload_id} is unknown to the remote")
    if p.local_here and not p.local_checked:
        # Checked before the object is published: bytes changed after their commit never
        # become visible at the key.
        return Step(Act.CHECK_LOCAL)
    return Step(Act.COMPLETE, tuple(p.commits))


def _uploaded(p: Position) -> Step:
    seg = p.seg
    if not p.object_known:
        return Step(Act.HEAD)
    if p.obj is None:
        if p.reuploads >= p.max_reuploads:
            return Step(
                Act.FAIL,
                reason=f"the object vanished from key {seg.key!r} {p.reuploads + 1} times",
            )
        return Step(Act.REUPLOAD, reason=f"the object vanished from key {seg.key!r}")
    verdict = _judge(p)
    if verdict is None:
        return _read_back(p)
    twin = _twin(p)
    if twin is not None:
        return twin
    if not verdict:
        bad = _describe(p.obj)
        if p.read_back_differs is not None:
            bad += f"; read back: {p.read_back_differs}"
        if p.reuploads >= p.max_reuploads:
            return Step(
                Act.FAIL,
                reason=f"the object at key {seg.key!r} failed verification {p.reuploads + 1} "
                f"times ({bad}; expected {seg.size} bytes, {sealed_proof(seg)})",
            )
        if p.obj.etag is None or p.obj.etag == normalize_etag(seg.expected_etag):
            # A conditional delete could not tell the bad object from the good one.
            return Step(
                Act.FAIL,
                reason=f"object at key {seg.key!r} does not match the local bytes ({bad}) and "
                "cannot be named exactly for removal; left alone",
            )
        if p.conditional_delete is None:
            return Step(Act.PROBE)
        if not p.conditional_delete:
            return Step(
                Act.FAIL,
                reason=f"object at key {seg.key!r} does not match the local bytes ({bad}); the "
                "remote does not honour conditional deletes, so it is left alone",
            )
        return Step(
            Act.REUPLOAD,
            reason=f"object at key {seg.key!r} does not match the local bytes ({bad}); "
            "removing exactly that object and uploading again",
            etag=p.obj.etag,
        )
    if p.deep and not p.deep_checked:
        return Step(Act.DEEP_READ)
    return _local(p, Step(Act.VERIFY))


def _remove(p: Position, etag: str) -> Step:
    """The intent to remove the object with ``etag`` is recorded: carry it out, conditionally."""
    if not p.object_known:
        return Step(Act.HEAD)
    if p.obj is not None and p.obj.etag == etag:
        if p.conditional_delete is None:
            return Step(Act.PROBE)
        if not p.conditional_delete:
            return Step(
                Act.FAIL,
                reason=f"object at key {p.seg.key!r} (etag {etag}) must be removed but the "
                "remote does not honour conditional deletes; left alone",
            )
        return Step(Act.REMOVE, etag=etag)
    return Step(Act.FORGET_REMOVE, etag=etag)
