"""SQLAlchemy models of the manifest: segments, commits (one row per part) and the audit trail.

All times are naive UTC. Constraint names follow one naming convention, so Alembic migrations and
the models cannot disagree about them. Partial indexes cover only unfinished rows, so finding work
stays cheap when millions of rows are verified.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from uploader.states import CommitState, SegmentState

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT on PostgreSQL; INTEGER on SQLite so that it is the rowid alias and autoincrements.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def _in(column: str, values: Iterable[str]) -> str:
    quoted = ", ".join(f"'{v}'" for v in values)
    return f"{column} IN ({quoted})"


SEGMENT_STATES_SQL = _in("state", [s.value for s in SegmentState])
COMMIT_STATES_SQL = _in("state", [s.value for s in CommitState])
#: The exact predicate of the partial index on unfinished segments; queries repeat it verbatim so
#: that SQLite's planner can prove they imply it.
#: A segment past ``open`` has its size and checksums, but for ``failed`` and ``unknown`` (an
#: object of unknown origin found by a rebuild: its checksums are what nobody knows).
#: A segment in the ``crc32c`` checksum mode has no ETag to expect (no part MD5s were taken):
#: its object is proven by the CRC32C the remote reports (0006).
SEALED_CHECKSUM_SQL = (
    "state IN ('open', 'failed', 'unknown') OR (size IS NOT NULL AND crc32c IS NOT NULL "
    "AND (expected_etag IS NOT NULL OR checksum = 'crc32c'))"
)
CHECKSUM_MODE_SQL = "checksum IN ('md5', 'crc32c')"
UNKNOWN_REASON_SQL = "state <> 'unknown' OR reason IS NOT NULL"
UNFINISHED_SEGMENTS_SQL = "state IN ('open', 'sealed', 'uploaded')"
UNFINISHED_COMMITS_SQL = "state IN ('pending', 'uploaded')"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SegmentRow(Base):
    __tablename__ = "segments"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(1024), nullable=False)
    path: Mapped[str] = mapped_column(Text, nullable=False)
    node: Mapped[str] = mapped_column(String(255), nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    part_size: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: Fixed at seal: total size, whole-file CRC32C, and the ETag the object must have.
    size: Mapped[int | None] = mapped_column(BigInteger)
    crc32c: Mapped[int | None] = mapped_column(BigInteger)
    expected_etag: Mapped[str | None] = mapped_column(String(64))
    #: 'multipart' or 'put' (a segment smaller than a part goes as one atomic PUT).
    upload_mode: Mapped[str | None] = mapped_column(String(16))
    upload_id: Mapped[str | None] = mapped_column(String(1024))
    object_etag: Mapped[str | None] = mapped_column(String(64))
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires: Mapped[datetime | None] = mapped_column(DateTime())
    #: The lease holder as a process (see :mod:`uploader.holders`): its node, pid, start time
    #: (clock ticks after boot) and pid space (boot id and pid namespace). A worker on the same
    #: node and pid space that finds the process gone takes the lease at once (0005).
    lease_node: Mapped[str | None] = mapped_column(String(255))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    lease_started: Mapped[int | None] = mapped_column(BigInteger)
    lease_pid_space: Mapped[str | None] = mapped_column(String(128))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    sealed_at: Mapped[datetime | None] = mapped_column(DateTime())
    verified_at: Mapped[datetime | None] = mapped_column(DateTime())
    #: The local file's identity (st_dev, st_ino) at registration: a file replaced by another
    #: inode is changed bytes, whatever it holds (NULL for rows registered before 0002).
    file_device: Mapped[int | None] = mapped_column(BigInteger)
    file_inode: Mapped[int | None] = mapped_column(BigInteger)
    #: The ETag of an object at the key that the lease holder decided to remove (it failed
    #: verification), recorded before the conditional delete is sent: the intent of the one
    #: destructive remote call, naming the exact object it means.
    remove_etag: Mapped[str | None] = mapped_column(String(64))
    #: When the remote object was last found matching (verify, the scrub, the deletion gate).
    checked_at: Mapped[datetime | None] = mapped_column(DateTime())
    #: What proves the segment's bytes to the remote, fixed at registration for the segment's
    #: whole life (see :class:`uploader.config.ChecksumMode`): 'md5' (part MD5s, Content-MD5,
    #: the multipart ETag; every row before 0006) or 'crc32c' (no MD5: the remote's CRC32C).
    #: A process configured otherwise resumes the segment in its recorded mode, never a weaker one.
    checksum: Mapped[str] = mapped_column(String(8), nullable=False, server_default=text("'md5'"))

    __table_args__ = (
        UniqueConstraint("key"),
        CheckConstraint(SEGMENT_STATES_SQL, name="state"),
        CheckConstraint("part_size > 0", name="part_size"),
        CheckConstraint("size IS NULL OR size >= 0", name="size"),
        CheckConstraint("fence >= 0", name="fence"),
        CheckConstraint("upload_mode IS NULL OR upload_mode IN ('multipart', 'put')", name="mode"),
        CheckConstraint("state <> 'failed' OR reason IS NOT NULL", name="failed_reason"),
        CheckConstraint(SEALED_CHECKSUM_SQL, name="sealed_checksum"),
        CheckConstraint(UNKNOWN_REASON_SQL, name="unknown_reason"),
        CheckConstraint(CHECKSUM_MODE_SQL, name="checksum"),
        Index(
            "ix_segments_unfinished",
            "id",
            sqlite_where=text(UNFINISHED_SEGMENTS_SQL),
            postgresql_where=text(UNFINISHED_SEGMENTS_SQL),
        ),
        Index("ix_segments_state", "state"),
    )


class CommitRow(Base):
    __tablename__ = "commits"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    segment_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("segments.id", ondelete="CASCADE"), nullable=False
    )
    part_number: Mapped[int] = mapped_column(Integer, nullable=False)
    start_offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    end_offset: Mapped[int] = mapped_column(BigInteger, nullable=False)
    #: NULL for a part of a segment in the ``crc32c`` checksum mode (0006).
    md5: Mapped[str | None] = mapped_column(String(32))
    crc32c: Mapped[int] = mapped_column(BigInteger, nullable=False)
    etag: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)

    __table_args__ = (
        UniqueConstraint("segment_id", "part_number"),
        UniqueConstraint("segment_id", "start_offset"),
        CheckConstraint(COMMIT_STATES_SQL, name="state"),
        CheckConstraint("part_number BETWEEN 1 AND 10000", name="part_number"),
        CheckConstraint("start_offset >= 0 AND end_offset >= start_offset", name="range"),
        CheckConstraint("state = 'pending' OR state = 'failed' OR etag IS NOT NULL", name="etag"),
        CheckConstraint("state <> 'failed' OR reason IS NOT NULL", name="failed_reason"),
        Index(
            "ix_commits_unfinished",
            "segment_id",
            sqlite_where=text(UNFINISHED_COMMITS_SQL),
            postgresql_where=text(UNFINISHED_COMMITS_SQL),
        ),
    )


class EventRow(Base):
    """The audit trail: one row per successful state transition."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(), nullable=False)
    segment_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("segments.id", ondelete="CASCADE"), nullable=False
    )
    commit_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("commits.id", ondelete="CASCADE")
    )
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16), nullable=False)
    worker: Mapped[str] = mapped_column(String(255), nullable=False)
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index("ix_events_segment_id", "segment_id", "id"),)
