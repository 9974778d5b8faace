"""Typed, frozen records at the boundaries: what the manifest returns, never ORM objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from uploader.states import CommitState, SegmentState

#: How a watcher's format problem starts in a segment's ``last_error``.
FORMAT_PROBLEM = "format problem: "


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    id: int
    key: str
    path: str
    node: str
    state: SegmentState
    part_size: int
    size: int | None
    crc32c: int | None
    expected_etag: str | None
    upload_mode: str | None
    upload_id: str | None
    object_etag: str | None
    fence: int
    lease_owner: str | None
    lease_expires: datetime | None
    attempts: int
    last_error: str | None
    reason: str | None
    created_at: datetime
    updated_at: datetime
    sealed_at: datetime | None
    verified_at: datetime | None
    file_device: int | None = None
    file_inode: int | None = None
    remove_etag: str | None = None
    checked_at: datetime | None = None
    #: 'md5' or 'crc32c': what proves this segment's bytes (see ``uploader.config.ChecksumMode``).
    checksum: str = "md5"

    @property
    def by_crc32c(self) -> bool:
        """No part MD5s: parts and object are proven by the remote's CRC32C."""
        return self.checksum == "crc32c"


@dataclass(frozen=True, slots=True)
class CommitRecord:
    id: int
    segment_id: int
    part_number: int
    start: int
    end: int
    md5: str | None  # None in the crc32c checksum mode
    crc32c: int
    etag: str | None
    state: CommitState
    attempts: int
    last_error: str | None
    reason: str | None

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Progress:
    """A segment's row and how far its commits reach, read together in one query."""

    segment: SegmentRecord
    committed: int  # end offset of the last recorded part (0 if none)
    parts: int  # number of the last recorded part (0 if none)


@dataclass(frozen=True, slots=True)
class NewCommit:
    """A part about to be recorded as ``pending``: its range and the checksums of its bytes."""

    part_number: int
    start: int
    end: int
    md5: str | None  # None in the crc32c checksum mode
    crc32c: int


@dataclass(frozen=True, slots=True)
class SmallSeal:
    """A new segment no bigger than a part, to be registered and sealed as one PUT by a group
    commit: its file, the size it is sealed at and the checksums of those bytes."""

    key: str
    path: str
    size: int
    md5: str | None  # None in the crc32c checksum mode
    crc32c: int
    identity: tuple[int, int] | None = None  # (device, inode) of the file
    checksum: str = "md5"  # the segment's checksum mode, recorded with it


@dataclass(frozen=True, slots=True)
class PutProven:
    """A single PUT acknowledged and its object checked: what ``put_verified`` would write."""

    lease: Lease
    commit: CommitRecord
    detail: str
    object_etag: str


@dataclass(frozen=True, slots=True)
class PutFailed:
    """A single PUT that failed: what ``commit_attempt_failed`` would write."""

    lease: Lease
    commit: CommitRecord
    error: str


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    at: datetime
    segment_id: int
    commit_id: int | None
    from_state: str | None
    to_state: str
    worker: str
    fence: int
    detail: str | None


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to change a segment's rows: valid while ``fence`` is current and not expired."""

    segment_id: int
    key: str
    owner: str
    fence: int
    expires: datetime


@dataclass(frozen=True, slots=True)
class Status:
    """Counts per state, bytes not yet verified, age of the oldest unverified segment."""

    segments: dict[str, int] = field(default_factory=dict)
    commits: dict[str, int] = field(default_factory=dict)
    commit_bytes: dict[str, int] = field(default_factory=dict)
    unverified_bytes: int = 0
    oldest_unverified_age: float | None = None  # seconds
    #: Seconds since the oldest segment that is sealed but not verified was sealed (open
    #: segments left out: a quiet writer's open file is not stuck); None if there is none.
    oldest_sealed_age: float | None = None
    failed: tuple[tuple[str, str], ...] = ()  # (key, reason)
    #: (key, reason) of objects of unknown origin found by a rebuild (never deletable).
    unknown: tuple[tuple[str, str], ...] = ()
    #: (key, why) of open segments whose local file vanished or shrank below the committed end:
    #: filled by whoever can stat this node's files (``Store.status``, ``uploader status``).
    stalled: tuple[tuple[str, str], ...] = ()
    #: (key, last error) of unfinished segments whose last attempt failed (the first 100).
    errors: tuple[tuple[str, str], ...] = ()

    @property
    def format_problems(self) -> tuple[tuple[str, str], ...]:
        """Unfinished segments whose file cannot be read past a point (a corrupt record chain)."""
        return tuple((k, e) for k, e in self.errors if e.startswith(FORMAT_PROBLEM))

    @property
    def all_verified(self) -> bool:
        return (
            not self.failed
            and not self.stalled
            and all(n == 0 for s, n in self.segments.items() if s != SegmentState.VERIFIED.value)
        )
