"""Bad input is refused with a clear error naming what is wrong, and nothing is written:
not a segment, not a commit, not an audit row. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from tests.conftest import md5
from uploader.digest import checksum
from uploader.errors import (
    InvalidKeyError,
    InvalidRangeError,
    InvalidStateError,
    KeyConflictError,
    SegmentSealedError,
    StaleStateError,
    UsageError,
)
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import COMMITS as C
from uploader.manifest.rowmap import EVENTS as E
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.records import Lease, NewCommit
from uploader.states import CommitState, SegmentState


def part(number: int, start: int, end: int) -> NewCommit:
    md5, crc = checksum(b"x" * max(0, end - start))
    return NewCommit(number, start, end, md5, crc)


def snapshot(m: Manifest) -> tuple[Any, ...]:
    with m.engine.connect() as conn:
        return (
            [tuple(r) for r in conn.execute(select(S).order_by(S.c.id))],
            [tuple(r) for r in conn.execute(select(C).order_by(C.c.id))],
            [tuple(r) for r in conn.execute(select(E).order_by(E.c.id))],
        )


def open_segment(m: Manifest, key: str = "log/0001") -> Lease:
    m.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
    return m.acquire(key, "w")


# --- unknown state names -------------------------------------------------------------------------


def test_unknown_state_names_are_refused(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    [c] = manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)

    with pytest.raises(InvalidStateError, match="'bogus'"):
        manifest.segments(states=["bogus"])
    with pytest.raises(InvalidStateError, match="unknown segment state 'opened'"):
        manifest.transition_segment(lease, "opened", "sealed")
    with pytest.raises(InvalidStateError, match="unknown segment state 'Sealed'"):
        manifest.transition_segment(lease, "open", "Sealed")
    with pytest.raises(InvalidStateError, match="unknown commit state 'acked'"):
        manifest.transition_commit(lease, c.id, "pending", "acked", etag=c.md5)
    with pytest.raises(InvalidStateError, match="unknown commit state 'PENDING'"):
        manifest.transition_commit(lease, c.id, "PENDING", "uploaded", etag=c.md5)
    assert snapshot(manifest) == before
    # Known names as strings are fine.
    assert [s.key for s in manifest.segments(states=["open", SegmentState.SEALED])] == ["log/0001"]


def test_schema_refuses_unknown_states_too(manifest: Manifest) -> None:
    """The CHECK constraints hold even for writes that bypass the library."""
    lease = open_segment(manifest)
    [c] = manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:
        conn.execute(update(S).where(S.c.id == lease.segment_id).values(state="bogus"))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:
        conn.execute(update(C).where(C.c.id == c.id).values(state="done"))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:  # uploaded needs an ETag
        conn.execute(update(C).where(C.c.id == c.id).values(state="uploaded"))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:  # failed needs a reason
        conn.execute(update(S).where(S.c.id == lease.segment_id).values(state="failed"))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:  # sealed needs checksums
        conn.execute(update(S).where(S.c.id == lease.segment_id).values(state="sealed"))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:
        conn.execute(update(C).where(C.c.id == c.id).values(start_offset=-1))
    with pytest.raises(IntegrityError), manifest.engine.begin() as conn:
        conn.execute(
            insert(C).values(
                segment_id=lease.segment_id,
                part_number=2,
                start_offset=0,  # the same start as part 1
                end_offset=4,
                md5=c.md5,
                crc32c=0,
                state="pending",
                created_at=manifest.clock(),
                updated_at=manifest.clock(),
            )
        )
    assert snapshot(manifest) == before


@pytest.mark.parametrize("reason", [None, ""])
def test_failed_without_a_reason_is_refused(manifest: Manifest, reason: str | None) -> None:
    lease = open_segment(manifest)
    [c] = manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    with pytest.raises(InvalidStateError, match="reason"):
        manifest.transition_segment(lease, "open", "failed", reason=reason)
    with pytest.raises(InvalidStateError, match="reason"):
        manifest.transition_commit(lease, c.id, "pending", "failed", reason=reason)
    with pytest.raises(InvalidStateError, match="reason"):
        manifest.fail_segment(lease, reason or "")
    assert snapshot(manifest) == before


def test_sealed_without_checksums_is_refused(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    with pytest.raises(InvalidStateError, match="size and checksum"):
        manifest.transition_segment(lease, "open", "sealed")
    assert snapshot(manifest) == before


def test_uploaded_needs_the_acknowledged_etag(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    [c] = manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    with pytest.raises(InvalidStateError, match="ETag"):
        manifest.transition_commit(lease, c.id, "pending", "uploaded")
    with pytest.raises(InvalidStateError, match="not allowed"):
        manifest.transition_commit(lease, c.id, "pending", "verified", etag=c.md5)
    assert snapshot(manifest) == before


# --- keys ---------------------------------------------------------------------------------------


def test_same_key_for_another_path_is_refused(manifest: Manifest) -> None:
    first = manifest.register("log/0001", "/data/a", node="n1", part_size=4, worker="w")
    before = snapshot(manifest)
    with pytest.raises(KeyConflictError) as info:
        manifest.register("log/0001", "/data/b", node="n1", part_size=4, worker="w")
    message = str(info.value)
    assert "'log/0001'" in message and "'/data/a'" in message and "'/data/b'" in message
    assert isinstance(info.value, UsageError)
    assert snapshot(manifest) == before
    # Also once the segment has moved on, and from another node.
    lease = manifest.acquire("log/0001", "w")
    manifest.seal(
        lease, [part(1, 0, 4)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put"
    )
    before = snapshot(manifest)
    with pytest.raises(KeyConflictError, match="sealed"):
        manifest.register("log/0001", "/data/c", node="n2", part_size=4, worker="w")
    assert snapshot(manifest) == before
    assert manifest.segment_by_id(first.id).path == first.path


def test_same_key_same_path_is_idempotent(manifest: Manifest) -> None:
    first = manifest.register("log/0001", "/data/a", node="n1", part_size=4, worker="w")
    before = snapshot(manifest)
    again = manifest.register("log/0001", "/data/a", node="n1", part_size=4, worker="w2")
    assert again == first
    assert snapshot(manifest) == before  # no second row, no second "registered" event
    assert len(manifest.segments()) == 1
    assert [(e.from_state, e.to_state) for e in manifest.events()] == [(None, "open")]


BAD_KEYS = [
    "",
    "..",
    "../escape",
    "a/../../b",
    "a/..",
    ".",
    "./a",
    "/absolute/key",
    "a//b",
    "a/b/",
    "a\nb",
    "a\x00b",
    "a\tb",
    "a\x7fb",
    "a\u202eb",  # a bidi override: a format character
    "a\\b",
    ".uploader/staged",
    "k" * 1025,
    "é" * 513,  # 1026 bytes in UTF-8
]


def test_invalid_keys_are_refused_naming_the_key(manifest: Manifest) -> None:
    before = snapshot(manifest)
    for key in BAD_KEYS:
        with pytest.raises(InvalidKeyError) as info:
            manifest.register(key, "/data/x", node="n1", part_size=4, worker="w")
        message = str(info.value)
        if key == "":
            assert "empty" in message
        elif len(key.encode()) > 1024:
            assert repr(key[:40]) in message and "1024" in message, key
        else:
            assert repr(key) in message, key
        assert isinstance(info.value, UsageError) and info.value.exit_code == 2
        assert snapshot(manifest) == before, f"{key!r} was refused but something was written"


def test_longest_key_is_accepted(manifest: Manifest) -> None:
    key = "a/" + "k" * 1022
    assert len(key.encode()) == 1024
    seg = manifest.register(key, "/data/long", node="n1", part_size=4, worker="w")
    assert manifest.segment(key) == seg


@pytest.mark.parametrize("part_size", [0, -1, -(2**40)])
def test_part_size_must_be_positive(manifest: Manifest, part_size: int) -> None:
    before = snapshot(manifest)
    with pytest.raises(UsageError, match=rf"'log/0001'.*{part_size}"):
        manifest.register("log/0001", "/data/a", node="n1", part_size=part_size, worker="w")
    assert snapshot(manifest) == before


# --- commit ranges ------------------------------------------------------------------------------

RANGE_CASES = [
    ("overlaps", [part(2, 2, 6)], "overlaps"),
    ("starts again at zero", [part(2, 0, 4)], "overlaps"),
    ("gap", [part(2, 5, 9)], "leaves a gap"),
    ("skipped part number", [part(3, 4, 8)], "does not follow part 1"),
    ("repeated part number", [part(1, 4, 8)], "does not follow part 1"),
    ("part number zero", [part(0, 4, 8)], "does not follow part 1"),
    ("negative start", [part(2, -4, 4)], "invalid byte range"),
    ("end before start", [part(2, 4, 2)], "invalid byte range"),
    ("negative end", [part(2, 4, -8)], "invalid byte range"),
    ("good then gap", [part(2, 4, 8), part(3, 9, 12)], "leaves a gap"),
    ("good then overlap", [part(2, 4, 8), part(3, 7, 12)], "overlaps"),
    ("good then wrong number", [part(2, 4, 8), part(2, 8, 12)], "does not follow part 2"),
]


def test_bad_commit_ranges_are_refused_and_nothing_is_written(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    for name, parts, pattern in RANGE_CASES:
        with pytest.raises(InvalidRangeError, match=pattern) as info:
            manifest.add_commits(lease, parts)
        assert "'log/0001'" in str(info.value), name
        assert snapshot(manifest) == before, f"{name}: refused but written"
    # The same checks guard the final commit of a seal.
    for name, parts, pattern in RANGE_CASES:
        with pytest.raises(InvalidRangeError, match=pattern):
            manifest.seal(
                lease, parts, size=12, crc32c=1, expected_etag="e" * 32, upload_mode="multipart"
            )
        assert snapshot(manifest) == before, f"seal {name}: refused but written"
    # And the right next part is accepted.
    manifest.add_commits(lease, [part(2, 4, 8), part(3, 8, 12)])
    assert [(c.part_number, c.start, c.end) for c in manifest.commits(lease.segment_id)] == [
        (1, 0, 4),
        (2, 4, 8),
        (3, 8, 12),
    ]


def test_first_part_must_start_at_zero_with_number_one(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    before = snapshot(manifest)
    with pytest.raises(InvalidRangeError, match="leaves a gap"):
        manifest.add_commits(lease, [part(1, 4, 8)])
    with pytest.raises(InvalidRangeError, match="does not follow part 0"):
        manifest.add_commits(lease, [part(2, 0, 4)])
    assert snapshot(manifest) == before


@pytest.mark.parametrize("size", [-1, 3, 5])
def test_seal_size_must_match_the_commits(manifest: Manifest, size: int) -> None:
    lease = open_segment(manifest)
    manifest.add_commits(lease, [part(1, 0, 4)])
    before = snapshot(manifest)
    with pytest.raises(InvalidRangeError, match=str(size)) as info:
        manifest.seal(lease, [], size=size, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    assert "'log/0001'" in str(info.value)
    assert snapshot(manifest) == before
    assert manifest.segment_by_id(lease.segment_id).state is SegmentState.OPEN


# --- after the seal -----------------------------------------------------------------------------


def test_commits_after_seal_are_refused(manifest: Manifest) -> None:
    lease = open_segment(manifest)
    manifest.add_commits(lease, [part(1, 0, 4)])
    manifest.seal(
        lease, [part(2, 4, 6)], size=6, crc32c=1, expected_etag="e" * 32, upload_mode="multipart"
    )
    before = snapshot(manifest)
    with pytest.raises(SegmentSealedError, match="'log/0001' is sealed"):
        manifest.add_commits(lease, [part(3, 6, 10)])
    with pytest.raises(SegmentSealedError, match="'log/0001' is already sealed"):
        manifest.seal(lease, [], size=6, crc32c=1, expected_etag="e" * 32, upload_mode="multipart")
    with pytest.raises(SegmentSealedError):
        manifest.add_commits(lease, [])  # even an empty batch: the segment takes no more commits
    assert snapshot(manifest) == before
    assert [c.state for c in manifest.commits(lease.segment_id)] == [CommitState.PENDING] * 2


# --- gaps in the manifest's guards (see the reasons) ---------------------------------------------


def _sealed_with_pending_part(m: Manifest) -> Lease:
    lease = open_segment(m)
    m.seal(lease, [part(1, 0, 4)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    return lease


def test_segment_cannot_be_uploaded_while_a_part_is_pending(manifest: Manifest) -> None:
    lease = _sealed_with_pending_part(manifest)
    before = snapshot(manifest)
    with pytest.raises((InvalidStateError, StaleStateError)):
        manifest.segment_uploaded(lease, "e" * 32)
    assert snapshot(manifest) == before


def test_verifying_through_transition_segment_verifies_every_commit(manifest: Manifest) -> None:
    lease = _sealed_with_pending_part(manifest)
    before = snapshot(manifest)
    with pytest.raises(InvalidStateError, match="parts 1 are not uploaded"):
        manifest.transition_segment(lease, "sealed", "uploaded")
    assert snapshot(manifest) == before
    [commit] = manifest.commits(lease.segment_id)
    manifest.commit_uploaded(lease, commit, md5(commit))
    manifest.transition_segment(lease, "sealed", "uploaded")
    manifest.transition_segment(lease, "uploaded", "verified")
    assert {c.state.value for c in manifest.commits(lease.segment_id)} == {"verified"}
