"""The state machine of the contract, as data, with pure checks and no I/O.

Commit (one part of a segment's upload):

    pending --> uploaded --> verified
       |    <--    |     <--    |      (back to pending: the remote lost the part or the object)
       v           v            v
     failed      failed       failed
       |                                (failed -> pending: a human fixed the cause; retried)
       +--> pending

Segment:

    open --> sealed --> uploaded --> verified
      |        |  ^         |   ^        |
      |        |  +---------+   |        |   uploaded -> sealed: the object failed verification
      |        |  +-------------|--------+   verified -> sealed: the object drifted at the remote
      v        v            v            v
    failed   failed       failed       failed
      |
      +--> sealed (a seal was recorded) or open (never sealed): ``uploader retry``, after a
           human fixed the cause; audited (who, when, why); the driver then learns again what
           the remote holds (every part back to pending) and checks every local byte again.

* ``pending``: the intent is durable; nothing sent yet, or the outcome is unknown.
* ``uploaded``: the remote acknowledged; what it said (ETag) is stored.
* ``verified``: the completed object was compared with checksums of the local bytes.
* ``failed``: terminal for the uploader, always with a reason; only an explicit retry (a human
  who fixed the cause) leaves it.
* ``unknown`` (segments only): *unknown origin*. An object found under the root by
  ``store.rebuild()`` whose metadata cannot vouch for it (none, malformed, or not matching the
  object's size and ETag). Born so by a rebuild, never by a transition, with no way out: never
  deletable (nothing local is known to match it), never touched by recovery, counted by status.

No commit reaches ``uploaded`` without passing ``pending`` first (intent before action), and nothing
reaches ``verified`` without recorded checksums (see :func:`check_commit_transition`).
"""

from __future__ import annotations

from enum import StrEnum

from uploader.errors import InvalidStateError


class CommitState(StrEnum):
    PENDING = "pending"
    UPLOADED = "uploaded"
    VERIFIED = "verified"
    FAILED = "failed"


class SegmentState(StrEnum):
    OPEN = "open"
    SEALED = "sealed"
    UPLOADED = "uploaded"
    VERIFIED = "verified"
    FAILED = "failed"
    UNKNOWN = "unknown"


COMMIT_TRANSITIONS: frozenset[tuple[CommitState, CommitState]] = frozenset(
    {
        (CommitState.PENDING, CommitState.UPLOADED),
        (CommitState.PENDING, CommitState.FAILED),
        (CommitState.UPLOADED, CommitState.VERIFIED),
        (CommitState.UPLOADED, CommitState.FAILED),
        # The remote no longer holds the part (upload id lost, ETag mismatch): the intent is
        # still ours and the part must be sent again.
        (CommitState.UPLOADED, CommitState.PENDING),
        # The verified object drifted at the remote (vanished, replaced): sent again from the
        # intact local bytes, or failed with the segment when those are gone too.
        (CommitState.VERIFIED, CommitState.PENDING),
        (CommitState.VERIFIED, CommitState.FAILED),
        # A human fixed the cause and asked for a retry: the part's outcome is unknown again.
        (CommitState.FAILED, CommitState.PENDING),
    }
)

SEGMENT_TRANSITIONS: frozenset[tuple[SegmentState, SegmentState]] = frozenset(
    {
        (SegmentState.OPEN, SegmentState.SEALED),
        (SegmentState.OPEN, SegmentState.FAILED),
        (SegmentState.SEALED, SegmentState.UPLOADED),
        (SegmentState.SEALED, SegmentState.FAILED),
        (SegmentState.UPLOADED, SegmentState.VERIFIED),
        (SegmentState.UPLOADED, SegmentState.FAILED),
        # A completed object failed verification: it is uploaded again under a fresh upload.
        (SegmentState.UPLOADED, SegmentState.SEALED),
        # A verified object drifted at the remote (found by verify, the scrub or the deletion
        # gate): uploaded again while the local bytes still match, else failed.
        (SegmentState.VERIFIED, SegmentState.SEALED),
        (SegmentState.VERIFIED, SegmentState.FAILED),
        # ``uploader retry`` (a human fixed the cause): back to sealed when the seal was recorded
        # (size and checksums kept), else back to open for its writer to seal.
        (SegmentState.FAILED, SegmentState.SEALED),
        (SegmentState.FAILED, SegmentState.OPEN),
    }
)

#: Segment states a recovery worker still has work for.
UNFINISHED_SEGMENT_STATES: frozenset[SegmentState] = frozenset(
    {SegmentState.OPEN, SegmentState.SEALED, SegmentState.UPLOADED}
)
#: Segment states a recovery worker leaves alone (a verified one leaves ``verified`` only when
#: its object is found drifted at the remote).
FINISHED_SEGMENT_STATES: frozenset[SegmentState] = frozenset(
    {SegmentState.VERIFIED, SegmentState.FAILED, SegmentState.UNKNOWN}
)
#: States the uploader never leaves by itself (``failed``: only an explicit, audited retry
#: does; ``unknown``: nothing does).
TERMINAL_SEGMENT_STATES: frozenset[SegmentState] = frozenset(
    {SegmentState.FAILED, SegmentState.UNKNOWN}
)
#: Where a retried failed segment goes: sealed if its seal was recorded, else open.
RETRY_SEGMENT_STATES: frozenset[SegmentState] = frozenset({SegmentState.SEALED, SegmentState.OPEN})


def parse_commit_state(value: str) -> CommitState:
    try:
        return CommitState(value)
    except ValueError:
        names = ", ".join(s.value for s in CommitState)
        raise InvalidStateError(f"unknown commit state {value!r}; known states: {names}") from None


def parse_segment_state(value: str) -> SegmentState:
    try:
        return SegmentState(value)
    except ValueError:
        names = ", ".join(s.value for s in SegmentState)
        raise InvalidStateError(f"unknown segment state {value!r}; known states: {names}") from None


def check_commit_transition(
    src: CommitState | str,
    dst: CommitState | str,
    *,
    has_etag: bool = False,
    has_digest: bool = True,
    reason: str | None = None,
) -> None:
    """Raise :class:`InvalidStateError` unless ``src -> dst`` is allowed with what is recorded."""
    s, d = parse_commit_state(str(src)), parse_commit_state(str(dst))
    if (s, d) not in COMMIT_TRANSITIONS:
        raise InvalidStateError(f"commit transition {s.value} -> {d.value} is not allowed")
    if d is CommitState.UPLOADED and not has_etag:
        raise InvalidStateError(
            "a commit becomes 'uploaded' only with the ETag the remote returned"
        )
    if d is CommitState.VERIFIED and not (has_etag and has_digest):
        raise InvalidStateError("a commit becomes 'verified' only with its recorded checksums")
    if d is CommitState.FAILED and not reason:
        raise InvalidStateError("a commit becomes 'failed' only with a reason")


def check_segment_transition(
    src: SegmentState | str,
    dst: SegmentState | str,
    *,
    has_checksum: bool = True,
    reason: str | None = None,
) -> None:
    """Raise :class:`InvalidStateError` unless ``src -> dst`` is allowed with what is recorded."""
    s, d = parse_segment_state(str(src)), parse_segment_state(str(dst))
    if (s, d) not in SEGMENT_TRANSITIONS:
        raise InvalidStateError(f"segment transition {s.value} -> {d.value} is not allowed")
    if d in (SegmentState.SEALED, SegmentState.VERIFIED) and not has_checksum:
        raise InvalidStateError(
            f"a segment becomes {d.value!r} only with its size and checksum recorded"
        )
    if d is SegmentState.FAILED and not reason:
        raise InvalidStateError("a segment becomes 'failed' only with a reason")
