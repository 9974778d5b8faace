"""The one decision, case by case: ``plan.next_step`` is pure, so every row of the decision table
is checked here without a database or a remote."""

from __future__ import annotations

import dataclasses

import pytest

from tests.records import segment_record
from uploader.digest import multipart_etag
from uploader.plan import Act, Position, next_step
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState, SegmentState
from uploader.storage.base import ObjectInfo, PartRef

MD5S = ["a" * 32, "b" * 32, "c" * 32]
EXPECTED = multipart_etag(MD5S)


def seg(state: SegmentState, **kw: object) -> SegmentRecord:
    base = {"size": 30, "crc32c": 1, "expected_etag": EXPECTED, "upload_id": "u"}
    return segment_record(state=state, **{**base, **kw})


def commits(*states: CommitState) -> list[CommitRecord]:
    return [
        CommitRecord(
            id=i + 1,
            segment_id=1,
            part_number=i + 1,
            start=10 * i,
            end=10 * (i + 1),
            md5=MD5S[i],
            crc32c=i,
            etag=MD5S[i] if s is not CommitState.PENDING else None,
            state=s,
            attempts=0,
            last_error=None,
            reason=None,
        )
        for i, s in enumerate(states)
    ]


P, U = CommitState.PENDING, CommitState.UPLOADED
GOOD = ObjectInfo("k", 30, EXPECTED)
FOREIGN = ObjectInfo("k", 30, "f" * 32)
#: What reading FOREIGN back found (same size, another ETag: only its bytes can tell).
DIFFERS = "bytes [0, 10) (part 1) differ from the local bytes"


def held(*numbers: int) -> dict[int, PartRef]:
    return {n: PartRef(n, MD5S[n - 1], 10) for n in numbers}


@pytest.mark.parametrize(
    ("position", "act"),
    [
        # Resuming: nothing is trusted before it is learned.
        (Position(seg(SegmentState.SEALED), commits(U, P, P)), Act.LIST_PARTS),
        # A part that arrived before the crash is reused, not sent again.
        (Position(seg(SegmentState.SEALED), commits(U, P, P), True, held(1, 2)), Act.ADOPT_PARTS),
        # An uploaded part the remote lost goes back to pending.
        (Position(seg(SegmentState.SEALED), commits(U, U, P), True, held(2)), Act.UNSEND_PARTS),
        (Position(seg(SegmentState.SEALED), commits(U, U, P), True, held(1, 2)), Act.SEND),
        # Parts the caller just recorded need no listing.
        (
            Position(seg(SegmentState.SEALED), commits(U, P, P), fresh=frozenset({2, 3})),
            Act.SEND,
        ),
        # The upload is gone: was it completed before the crash?
        (Position(seg(SegmentState.SEALED), commits(U, P, P), True, None), Act.HEAD),
        (
            Position(seg(SegmentState.SEALED), commits(U, P, P), True, None, True, GOOD),
            Act.ADOPT_OBJECT,
        ),
        (
            Position(seg(SegmentState.SEALED), commits(U, P, P), True, None, True, FOREIGN),
            Act.DEEP_READ,
        ),
        (
            Position(
                seg(SegmentState.SEALED),
                commits(U, P, P),
                True,
                None,
                True,
                FOREIGN,
                read_back_differs=DIFFERS,
            ),
            Act.FAIL,
        ),
        # Its ETag is not the part MD5s' (s3rver, SSE-KMS) but its bytes are ours: adopted.
        (
            Position(
                seg(SegmentState.SEALED),
                commits(U, P, P),
                True,
                None,
                True,
                FOREIGN,
                deep_checked=True,
            ),
            Act.ADOPT_OBJECT,
        ),
        (
            Position(seg(SegmentState.SEALED), commits(U, U, U), object_known=True, obj=FOREIGN),
            Act.DEEP_READ,
        ),
        (
            Position(seg(SegmentState.SEALED), commits(U, P, P), True, None, True, None),
            Act.RESET_UPLOAD,
        ),
        # On another node the lost upload is left as it is: resetting it would only lead to a
        # re-send from a file that is not there (the owning node's worker does it).
        (
            Position(
                seg(SegmentState.SEALED), commits(U, P, P), True, None, True, None, local_here=False
            ),
            Act.BLOCK,
        ),
        (Position(seg(SegmentState.OPEN), commits(U, P), True, {}, local_here=False), Act.BLOCK),
        # Every part uploaded: the local bytes are checked before anything is published.
        (Position(seg(SegmentState.SEALED), commits(U, U, U)), Act.CHECK_LOCAL),
        (Position(seg(SegmentState.SEALED), commits(U, U, U), local_checked=True), Act.COMPLETE),
        # Another node's worker completes, but never verifies.
        (Position(seg(SegmentState.SEALED), commits(U, U, U), local_here=False), Act.COMPLETE),
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=GOOD,
                local_here=False,
            ),
            Act.BLOCK,
        ),
        (
            Position(seg(SegmentState.UPLOADED), commits(U, U, U), object_known=True, obj=GOOD),
            Act.CHECK_LOCAL,
        ),
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=GOOD,
                local_checked=True,
            ),
            Act.VERIFY,
        ),
        # A bad object: learn whether the remote honours conditional deletes, then record the
        # intent naming its ETag; without the capability it is left alone.
        (
            Position(seg(SegmentState.UPLOADED), commits(U, U, U), object_known=True, obj=FOREIGN),
            Act.DEEP_READ,
        ),
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=FOREIGN,
                read_back_differs=DIFFERS,
            ),
            Act.PROBE,
        ),
        # Read back and equal: verified whatever the ETag says; never removed for its ETag.
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=FOREIGN,
                deep_checked=True,
                local_checked=True,
                conditional_delete=True,
            ),
            Act.VERIFY,
        ),
        # Read back (verify="deep") and different although the ETag is the seal's.
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=GOOD,
                read_back_differs=DIFFERS,
                conditional_delete=True,
            ),
            Act.FAIL,
        ),
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=FOREIGN,
                read_back_differs=DIFFERS,
                conditional_delete=True,
            ),
            Act.REUPLOAD,
        ),
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=FOREIGN,
                read_back_differs=DIFFERS,
                conditional_delete=False,
            ),
            Act.FAIL,
        ),
        # Same ETag, other size: a conditional delete could not tell it from a good upload.
        (
            Position(
                seg(SegmentState.UPLOADED),
                commits(U, U, U),
                object_known=True,
                obj=ObjectInfo("k", 31, EXPECTED),
                conditional_delete=True,
            ),
            Act.FAIL,
        ),
        # The recorded intent is carried out only on the object it names.
        (
            Position(
                seg(SegmentState.SEALED, remove_etag="f" * 32, upload_id=None),
                commits(P, P, P),
                object_known=True,
                obj=FOREIGN,
                conditional_delete=True,
            ),
            Act.REMOVE,
        ),
        (
            Position(
                seg(SegmentState.SEALED, remove_etag="f" * 32, upload_id=None),
                commits(P, P, P),
                object_known=True,
                obj=GOOD,
                conditional_delete=True,
            ),
            Act.FORGET_REMOVE,
        ),
        # A remote without ListParts: a fresh upload, every part sent again; not while a
        # writer's send is in flight (its acknowledgement would land on a reset part).
        (
            Position(
                seg(SegmentState.SEALED),
                commits(U, P, P),
                True,
                None,
                True,
                None,
                parts_listable=False,
            ),
            Act.RESET_UPLOAD,
        ),
        (
            Position(seg(SegmentState.OPEN), commits(U, P), True, None, parts_listable=False),
            Act.RESET_UPLOAD,
        ),
        (
            Position(
                seg(SegmentState.OPEN),
                commits(U, P, P),
                True,
                None,
                parts_listable=False,
                inflight=frozenset({3}),
            ),
            Act.BLOCK,
        ),
        # Open segments: pending whole parts only; the writer seals.
        (Position(seg(SegmentState.OPEN, upload_id=None), commits(U, U)), Act.DONE),
        (
            Position(seg(SegmentState.OPEN, upload_id=None), commits(P), fresh=frozenset({1})),
            Act.START_UPLOAD,
        ),
        (
            Position(seg(SegmentState.OPEN), commits(U, P), inflight=frozenset({2})),
            Act.DONE,
        ),
        (Position(seg(SegmentState.VERIFIED), commits(U, U, U)), Act.DONE),
    ],
)
def test_next_step(position: Position, act: Act) -> None:
    assert next_step(position).act is act


def test_the_vanished_object_is_uploaded_again_then_failed_after_the_bound() -> None:
    p = Position(seg(SegmentState.UPLOADED), commits(U, U, U), object_known=True, obj=None)
    assert next_step(p).act is Act.REUPLOAD
    assert next_step(dataclasses.replace(p, reuploads=3)).act is Act.FAIL


def test_single_put() -> None:
    one = [dataclasses.replace(commits(P)[0], md5=EXPECTED[:32])]
    s = seg(SegmentState.SEALED, upload_mode="put", expected_etag=EXPECTED[:32], size=10)
    assert next_step(Position(s, one, fresh=frozenset({1}))).act is Act.PUT
    assert next_step(Position(s, one)).act is Act.HEAD  # resuming: look first
    mine = ObjectInfo("k", 10, EXPECTED[:32])
    assert next_step(Position(s, one, object_known=True, obj=mine)).act is Act.CHECK_LOCAL
    checked = Position(s, one, object_known=True, obj=mine, local_checked=True)
    assert next_step(checked).act is Act.VERIFY_PUT
    other = ObjectInfo("k", 10, "f" * 32)
    assert next_step(Position(s, one, object_known=True, obj=other)).act is Act.DEEP_READ
    differs = Position(s, one, object_known=True, obj=other, read_back_differs=DIFFERS)
    assert next_step(differs).act is Act.FAIL
    assert "read back" in next_step(differs).reason
    kms = Position(s, one, object_known=True, obj=other, deep_checked=True, local_checked=True)
    assert next_step(kms).act is Act.VERIFY_PUT
    assert next_step(Position(s, one, object_known=True, obj=FOREIGN)).act is Act.FAIL  # size


# --- the object's CRC32C, where the remote reports one -----------------------------------------


def test_an_object_whose_reported_crc32c_is_the_composite_of_the_parts_is_verified() -> None:
    from uploader.digest import combine_crcs, composite_crc32c, crc32c_b64

    cs = commits(U, U, U)
    composite = composite_crc32c([0, 1, 2])
    full = crc32c_b64(combine_crcs([(0, 10), (1, 10), (2, 10)]))
    for reported in (composite, composite.split("-")[0], full):  # AWS, moto, FULL_OBJECT
        obj = dataclasses.replace(GOOD, checksum=reported)
        p = Position(seg(SegmentState.UPLOADED), cs, object_known=True, obj=obj, local_checked=True)
        assert next_step(p).act is Act.VERIFY, reported


def test_a_reported_crc32c_that_is_not_the_parts_is_never_verified() -> None:
    """The ETag matches, the remote's checksum does not (a part's checksum corrupted on the way,
    or a remote that checksummed other bytes): refused, and, as it cannot be named apart from a
    good object for removal, left alone."""
    from uploader.digest import composite_crc32c

    bad = dataclasses.replace(GOOD, checksum=composite_crc32c([0, 1, 3]))
    cs = commits(U, U, U)
    uploaded = Position(
        seg(SegmentState.UPLOADED), cs, object_known=True, obj=bad, local_checked=True
    )
    step = next_step(uploaded)
    assert step.act is Act.FAIL and "crc32c" in step.reason
    # Found at the key before this segment published anything: foreign, left alone.
    sealed = Position(
        seg(SegmentState.SEALED), cs, parts_known=True, parts=None, object_known=True, obj=bad
    )
    step = next_step(sealed)
    assert step.act is Act.FAIL and "left alone" in step.reason


# --- the crc32c checksum mode: no MD5s, the remote's CRC32C is the proof -----------------------


def crc_seg(state: SegmentState, **kw: object) -> SegmentRecord:
    return seg(state, checksum="crc32c", expected_etag=None, **kw)


def crc_commits(*states: CommitState) -> list[CommitRecord]:
    return [
        dataclasses.replace(c, md5=None, etag="e" * 32 if c.etag else None)
        for c in commits(*states)
    ]


def test_crc32c_mode_reuses_a_listed_part_only_with_its_crc32c_and_size() -> None:
    s, cs = crc_seg(SegmentState.SEALED), crc_commits(U, P, P)

    def listed(crc: int | None, size: int = 10) -> dict[int, PartRef]:
        # Part 1 (uploaded) listed as recorded; part 2 as given.
        return {1: PartRef(1, "e" * 32, 10, crc32c=0), 2: PartRef(2, "e" * 32, size, crc32c=crc)}

    same = next_step(Position(s, cs, True, listed(1)))
    assert same.act is Act.ADOPT_PARTS and [c.part_number for c in same.commits] == [2]
    assert "CRC32C and size" in same.reason
    # Another CRC32C, another size, or none listed (moto lists none): sent again.
    for parts in (listed(7), listed(1, size=9), listed(None)):
        step = next_step(Position(s, cs, True, parts))
        assert step.act is Act.SEND and [c.part_number for c in step.commits] == [2, 3]
    # An MD5 (the md5 mode's proof) listed for it proves nothing here.
    md5_only = {**listed(1), 2: held(2)[2]}
    assert next_step(Position(s, cs, True, md5_only)).act is Act.SEND
    # An uploaded part (proven by its echo when acknowledged) listed without a checksum (moto)
    # is kept by the very ETag it was acknowledged with; with another ETag it is sent again.
    bare = {1: PartRef(1, "e" * 32, 10)}
    assert next_step(Position(s, cs, True, bare)).act is Act.SEND
    other = {1: PartRef(1, "f" * 32, 10)}
    assert next_step(Position(s, cs, True, other)).act is Act.UNSEND_PARTS


def test_crc32c_mode_reuses_a_pending_part_listed_without_a_checksum_only_md5_proven() -> None:
    """Where the listing shows no part checksum (moto), a pending crc32c-mode part is adopted
    only where the driver proved the listed ETag to be the MD5 of the local bytes."""
    s, cs = crc_seg(SegmentState.SEALED), crc_commits(U, P, P)
    bare = {1: PartRef(1, "e" * 32, 10), 2: PartRef(2, "d" * 32, 10)}
    proven = next_step(Position(s, cs, True, bare, md5_proven={2: "d" * 32}))
    assert proven.act is Act.ADOPT_PARTS and [c.part_number for c in proven.commits] == [2]
    assert "MD5 of the local bytes" in proven.reason  # the audit trail names the proof
    # Proven for another ETag than the one listed now, for another part, or nothing proven.
    for md5s in ({2: "c" * 32}, {3: "d" * 32}, {}, None):
        step = next_step(Position(s, cs, True, bare, md5_proven=md5s))
        assert step.act is Act.SEND and [c.part_number for c in step.commits] == [2, 3], md5s
    # A listed CRC32C decides where there is one: another one is not overruled by an MD5.
    crc = {**bare, 2: PartRef(2, "d" * 32, 10, crc32c=7)}
    step = next_step(Position(s, cs, True, crc, md5_proven={2: "d" * 32}))
    assert step.act is Act.SEND and [c.part_number for c in step.commits] == [2, 3]


def test_crc32c_mode_object_is_proven_by_its_checksum_never_by_its_etag_alone() -> None:
    from uploader.digest import composite_crc32c

    cs = crc_commits(U, U, U)
    s = crc_seg(SegmentState.UPLOADED)
    good = ObjectInfo("k", 30, "0" * 32 + "-3", checksum=composite_crc32c([0, 1, 2]))
    p = Position(s, cs, object_known=True, obj=good, local_checked=True)
    assert next_step(p).act is Act.VERIFY
    # The checksum absent: never accepted as is; the bytes are read back.
    bare = dataclasses.replace(good, checksum=None)
    step = next_step(dataclasses.replace(p, obj=bare))
    assert step.act is Act.DEEP_READ and "no CRC32C" in step.reason
    read = next_step(dataclasses.replace(p, obj=bare, deep_checked=True))
    assert read.act is Act.VERIFY
    # Another checksum: not ours, whatever its ETag.
    bad = dataclasses.replace(good, checksum=composite_crc32c([0, 1, 3]))
    assert next_step(dataclasses.replace(p, obj=bad)).act is not Act.VERIFY
    # Found at the key of a sealed segment whose upload is gone: adopted only by its checksum.
    sealed = Position(crc_seg(SegmentState.SEALED), cs, True, None, True, good)
    assert next_step(sealed).act is Act.ADOPT_OBJECT
    assert next_step(dataclasses.replace(sealed, obj=bare)).act is Act.DEEP_READ
