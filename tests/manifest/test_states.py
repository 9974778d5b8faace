"""The state machine as data and its pure checks: no database, no I/O.

The allowed transitions are written out here from the contract (DESIGN.md, "States") rather than
read back from ``uploader.states``, so that a change to the tables has to be a change to the tests.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uploader.errors import InvalidStateError, StateError, UsageError
from uploader.manifest.models import (
    COMMIT_STATES_SQL,
    SEGMENT_STATES_SQL,
    UNFINISHED_COMMITS_SQL,
    UNFINISHED_SEGMENTS_SQL,
)
from uploader.states import (
    COMMIT_TRANSITIONS,
    FINISHED_SEGMENT_STATES,
    RETRY_SEGMENT_STATES,
    SEGMENT_TRANSITIONS,
    TERMINAL_SEGMENT_STATES,
    UNFINISHED_SEGMENT_STATES,
    CommitState,
    SegmentState,
    check_commit_transition,
    check_segment_transition,
    parse_commit_state,
    parse_segment_state,
)

# --- the contract, spelled out ------------------------------------------------------------------

COMMIT_ALLOWED = {
    ("pending", "uploaded"),
    ("pending", "failed"),
    ("uploaded", "verified"),
    ("uploaded", "failed"),
    ("uploaded", "pending"),  # the remote lost the part: the intent stays, the part is re-sent
    ("verified", "pending"),  # the verified object drifted at the remote: sent again
    ("verified", "failed"),  # drifted, and the local bytes are gone too
    ("failed", "pending"),  # `uploader retry`: a human fixed the cause; sent again or reused
}
SEGMENT_ALLOWED = {
    ("open", "sealed"),
    ("open", "failed"),
    ("sealed", "uploaded"),
    ("sealed", "failed"),
    ("uploaded", "verified"),
    ("uploaded", "failed"),
    ("uploaded", "sealed"),  # the completed object failed verification: upload it again
    ("verified", "sealed"),  # the verified object drifted at the remote: upload it again
    ("verified", "failed"),  # drifted, and the local bytes are gone too
    ("failed", "sealed"),  # `uploader retry` of a segment whose seal was recorded
    ("failed", "open"),  # `uploader retry` of a segment never sealed: its writer seals it
}
COMMIT_PAIRS = list(itertools.product([s.value for s in CommitState], repeat=2))
SEGMENT_PAIRS = list(itertools.product([s.value for s in SegmentState], repeat=2))


def _check_commit(src: str | CommitState, dst: str | CommitState) -> None:
    """The check with everything a transition to ``dst`` may need, so only the table decides."""
    reason = "why" if str(dst) == "failed" else None
    check_commit_transition(src, dst, has_etag=True, has_digest=True, reason=reason)


def test_state_names_are_the_contracts() -> None:
    assert [s.value for s in CommitState] == ["pending", "uploaded", "verified", "failed"]
    assert [s.value for s in SegmentState] == [
        "open",
        "sealed",
        "uploaded",
        "verified",
        "failed",
        "unknown",  # unknown origin: born by a rebuild, no transition in or out
    ]


def test_transition_tables_are_exactly_the_contracts() -> None:
    assert {(a.value, b.value) for a, b in COMMIT_TRANSITIONS} == COMMIT_ALLOWED
    assert {(a.value, b.value) for a, b in SEGMENT_TRANSITIONS} == SEGMENT_ALLOWED


@pytest.mark.parametrize(("src", "dst"), COMMIT_PAIRS)
def test_commit_transition_allowed_or_refused(src: str, dst: str) -> None:
    if (src, dst) in COMMIT_ALLOWED:
        _check_commit(src, dst)
        _check_commit(CommitState(src), CommitState(dst))
    else:
        with pytest.raises(InvalidStateError, match=f"{src} -> {dst} is not allowed"):
            _check_commit(src, dst)


@pytest.mark.parametrize(("src", "dst"), SEGMENT_PAIRS)
def test_segment_transition_allowed_or_refused(src: str, dst: str) -> None:
    reason = "why" if dst == "failed" else None
    if (src, dst) in SEGMENT_ALLOWED:
        check_segment_transition(src, dst, has_checksum=True, reason=reason)
        check_segment_transition(SegmentState(src), SegmentState(dst), reason=reason)
    else:
        with pytest.raises(InvalidStateError, match=f"{src} -> {dst} is not allowed"):
            check_segment_transition(src, dst, has_checksum=True, reason=reason)


def test_no_commit_transition_skips_pending() -> None:
    """Intent before action: ``uploaded`` is reached only from ``pending``, ``verified`` only
    from ``uploaded``; nothing goes from ``pending`` straight to ``verified``."""
    for src in CommitState:
        for dst in (CommitState.UPLOADED, CommitState.VERIFIED):
            allowed_src = (
                CommitState.PENDING if dst is CommitState.UPLOADED else CommitState.UPLOADED
            )
            if src is allowed_src:
                continue
            with pytest.raises(InvalidStateError):
                check_commit_transition(src, dst, has_etag=True, has_digest=True)
    # The only ways back into pending: a part, or a verified object, the remote lost; or a
    # failed part a human retried.
    into_pending = {a for a, b in COMMIT_TRANSITIONS if b is CommitState.PENDING}
    assert into_pending == {CommitState.UPLOADED, CommitState.VERIFIED, CommitState.FAILED}


def test_failed_is_left_only_by_a_retry() -> None:
    """``failed`` is terminal for the uploader: the only ways out are the retry's (a failed part
    back to ``pending``; a failed segment back to ``sealed`` or ``open``), never straight to
    ``uploaded`` or ``verified``: the driver must learn and check everything again."""
    for dst in CommitState:
        if dst is CommitState.PENDING:
            check_commit_transition(CommitState.FAILED, dst)
            continue
        with pytest.raises(InvalidStateError):
            check_commit_transition(CommitState.FAILED, dst, has_etag=True, reason="r")
    for seg_dst in SegmentState:
        for seg_src in TERMINAL_SEGMENT_STATES:
            if seg_src is SegmentState.FAILED and seg_dst in RETRY_SEGMENT_STATES:
                check_segment_transition(seg_src, seg_dst, has_checksum=True)
                continue
            # ``unknown`` (an object of unknown origin found by a rebuild) has no way out.
            with pytest.raises(InvalidStateError):
                check_segment_transition(seg_src, seg_dst, reason="r")
    assert {SegmentState.SEALED, SegmentState.OPEN} == RETRY_SEGMENT_STATES
    with pytest.raises(InvalidStateError, match="size and checksum"):
        check_segment_transition("failed", "sealed", has_checksum=False)


def test_commit_uploaded_needs_the_etag() -> None:
    with pytest.raises(InvalidStateError, match="ETag"):
        check_commit_transition("pending", "uploaded", has_etag=False)
    check_commit_transition("pending", "uploaded", has_etag=True)


@pytest.mark.parametrize(("has_etag", "has_digest"), [(False, True), (True, False), (False, False)])
def test_commit_verified_needs_recorded_checksums(has_etag: bool, has_digest: bool) -> None:
    with pytest.raises(InvalidStateError, match="checksums"):
        check_commit_transition("uploaded", "verified", has_etag=has_etag, has_digest=has_digest)


def test_commit_verified_with_checksums() -> None:
    check_commit_transition("uploaded", "verified", has_etag=True, has_digest=True)


@pytest.mark.parametrize(("src", "dst"), [("open", "sealed"), ("uploaded", "verified")])
def test_segment_sealed_or_verified_needs_checksum(src: str, dst: str) -> None:
    with pytest.raises(InvalidStateError, match="size and checksum"):
        check_segment_transition(src, dst, has_checksum=False)
    check_segment_transition(src, dst, has_checksum=True)


@pytest.mark.parametrize("reason", [None, ""])
def test_failed_always_carries_a_reason(reason: str | None) -> None:
    for src in ("pending", "uploaded"):
        with pytest.raises(InvalidStateError, match="reason"):
            check_commit_transition(src, "failed", has_etag=True, reason=reason)
    for seg_src in ("open", "sealed", "uploaded"):
        with pytest.raises(InvalidStateError, match="reason"):
            check_segment_transition(seg_src, "failed", reason=reason)


@pytest.mark.parametrize("name", ["done", "Pending", "PENDING", " pending", "pending ", "", "open"])
def test_unknown_commit_state_names_the_value(name: str) -> None:
    with pytest.raises(InvalidStateError) as info:
        parse_commit_state(name)
    assert repr(name) in str(info.value)
    assert "pending, uploaded, verified, failed" in str(info.value)
    with pytest.raises(InvalidStateError, match="unknown commit state"):
        check_commit_transition("pending", name, has_etag=True)
    with pytest.raises(InvalidStateError, match="unknown commit state"):
        check_commit_transition(name, "pending", has_etag=True)


@pytest.mark.parametrize("name", ["closed", "Open", "SEALED", "pending", "", "verified\n"])
def test_unknown_segment_state_names_the_value(name: str) -> None:
    with pytest.raises(InvalidStateError) as info:
        parse_segment_state(name)
    assert repr(name) in str(info.value)
    assert "open, sealed, uploaded, verified, failed" in str(info.value)
    with pytest.raises(InvalidStateError, match="unknown segment state"):
        check_segment_transition("open", name)
    with pytest.raises(InvalidStateError, match="unknown segment state"):
        check_segment_transition(name, "sealed")


@given(st.text(max_size=20))
def test_parse_accepts_exactly_the_state_names(name: str) -> None:
    for parse, enum in ((parse_commit_state, CommitState), (parse_segment_state, SegmentState)):
        if name in {s.value for s in enum}:
            assert parse(name) is enum(name)
        else:
            with pytest.raises(InvalidStateError) as info:
                parse(name)
            assert repr(name) in str(info.value)


def test_invalid_state_is_a_state_error_not_a_usage_error() -> None:
    """A state error can be raised mid-recovery, so it is not a UsageError (whose promise is that
    nothing was recorded or sent); the CLI still exits 2 for it (someone has to look)."""
    assert issubclass(InvalidStateError, StateError)
    assert not issubclass(InvalidStateError, UsageError)
    assert InvalidStateError("x").exit_code == 2


def test_unfinished_states_match_the_sql_predicates() -> None:
    """The partial index predicates list exactly the states a worker still has work for."""
    quoted = ", ".join(f"'{s}'" for s in ("open", "sealed", "uploaded"))
    assert f"state IN ({quoted})" == UNFINISHED_SEGMENTS_SQL
    assert {s.value for s in UNFINISHED_SEGMENT_STATES} == {"open", "sealed", "uploaded"}
    assert set(SegmentState) == UNFINISHED_SEGMENT_STATES | FINISHED_SEGMENT_STATES
    assert {SegmentState.FAILED, SegmentState.UNKNOWN} == TERMINAL_SEGMENT_STATES
    assert not any(SegmentState.UNKNOWN in pair for pair in SEGMENT_TRANSITIONS)
    assert not UNFINISHED_SEGMENT_STATES & TERMINAL_SEGMENT_STATES
    assert UNFINISHED_COMMITS_SQL == "state IN ('pending', 'uploaded')"
    for state in SegmentState:
        assert f"'{state.value}'" in SEGMENT_STATES_SQL
    for cstate in CommitState:
        assert f"'{cstate.value}'" in COMMIT_STATES_SQL
