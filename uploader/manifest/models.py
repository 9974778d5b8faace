"""The manifest's tables as SQLAlchemy Core: segments, commits (one row per part) and the audit
trail.

All times are naive UTC. Constraint names follow one naming convention, so Alembic migrations and
the tables cannot disagree about them. Partial indexes cover only unfinished rows, so finding work
stays cheap when millions of rows are verified.

Core ``Table``s, not ORM classes: the manifest runs Core statements only (guarded UPDATEs, multi-row
INSERTs), and ``sqlalchemy.orm`` alone costs ~6 MiB of resident memory and a fifth of a second of
import in every process that opens a store.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

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


#: The one MetaData of the manifest (Alembic's ``target_metadata``; the drift test compares it).
METADATA = MetaData(naming_convention=NAMING_CONVENTION)

SEGMENTS = Table(
    "segments",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("key", String(1024), nullable=False),
    Column("path", Text, nullable=False),
    Column("node", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("part_size", BigInteger, nullable=False),
    # Fixed at seal: total size, whole-file CRC32C, and the ETag the object must have.
    Column("size", BigInteger),
    Column("crc32c", BigInteger),
    Column("expected_etag", String(64)),
    # 'multipart' or 'put' (a segment smaller than a part goes as one atomic PUT).
    Column("upload_mode", String(16)),
    Column("upload_id", String(1024)),
    Column("object_etag", String(64)),
    Column("fence", BigInteger, nullable=False, server_default=text("0")),
    Column("lease_owner", String(255)),
    Column("lease_expires", DateTime()),
    # The lease holder as a process (see uploader.holders): its node, pid, start time (clock
    # ticks after boot) and pid space (boot id and pid namespace). A worker on the same node and
    # pid space that finds the process gone takes the lease at once (0005).
    Column("lease_node", String(255)),
    Column("lease_pid", Integer),
    Column("lease_started", BigInteger),
    Column("lease_pid_space", String(128)),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("reason", Text),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
    Column("sealed_at", DateTime()),
    Column("verified_at", DateTime()),
    # The local file's identity (st_dev, st_ino) at registration: a file replaced by another
    # inode is changed bytes, whatever it holds (NULL for rows registered before 0002).
    Column("file_device", BigInteger),
    Column("file_inode", BigInteger),
    # The ETag of an object at the key that the lease holder decided to remove (it failed
    # verification), recorded before the conditional delete is sent: the intent of the one
    # destructive remote call, naming the exact object it means.
    Column("remove_etag", String(64)),
    # When the remote object was last found matching (verify, the scrub, the deletion gate).
    Column("checked_at", DateTime()),
    # What proves the segment's bytes to the remote, fixed at registration for the segment's
    # whole life (see uploader.config.ChecksumMode): 'md5' (part MD5s, Content-MD5, the multipart
    # ETag; every row before 0006) or 'crc32c' (no MD5: the remote's CRC32C). A process
    # configured otherwise resumes the segment in its recorded mode, never a weaker one.
    Column("checksum", String(8), nullable=False, server_default=text("'md5'")),
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

COMMITS = Table(
    "commits",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column(
        "segment_id",
        BigInteger,
        ForeignKey("segments.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("part_number", Integer, nullable=False),
    Column("start_offset", BigInteger, nullable=False),
    Column("end_offset", BigInteger, nullable=False),
    # NULL for a part of a segment in the ``crc32c`` checksum mode (0006).
    Column("md5", String(32)),
    Column("crc32c", BigInteger, nullable=False),
    Column("etag", String(64)),
    Column("state", String(16), nullable=False),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text),
    Column("reason", Text),
    Column("created_at", DateTime(), nullable=False),
    Column("updated_at", DateTime(), nullable=False),
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

#: The audit trail: one row per successful state transition.
EVENTS = Table(
    "events",
    METADATA,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("at", DateTime(), nullable=False),
    Column(
        "segment_id",
        BigInteger,
        ForeignKey("segments.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("commit_id", BigInteger, ForeignKey("commits.id", ondelete="CASCADE")),
    Column("from_state", String(16)),
    Column("to_state", String(16), nullable=False),
    Column("worker", String(255), nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("detail", Text),
    Index("ix_events_segment_id", "segment_id", "id"),
)
