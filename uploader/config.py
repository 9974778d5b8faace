"""One typed configuration for a store: what ``uploader.open``, :class:`~uploader.store.Store` and
the CLI's options all build, checked once.

:class:`StoreConfig` is frozen: a store's settings do not change under its running jobs. Its
:meth:`StoreConfig.check` refuses bad values with a :class:`~uploader.errors.UsageError` naming the
setting, before a manifest is opened or a remote is touched. The part-size bounds that depend on
the remote (S3's 5 MiB minimum, or a test server's lower one) are checked by the store, which knows
the remote.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from uploader.errors import UsageError
from uploader.storage.retry import RetryPolicy

MiB = 1024 * 1024

#: Default part size: 8 MiB, the size boto3 and the AWS CLI use.
DEFAULT_PART_SIZE = 8 * MiB
#: Default lease length: a writer or worker that stops renewing loses its segments after this.
DEFAULT_LEASE_SECONDS = 30.0
#: Default number of parts in flight (and of part-sized memory slots).
DEFAULT_CONCURRENCY = 4
#: The manifest's columns for a node's and a worker's name (``VARCHAR(255)``: PostgreSQL refuses
#: a longer one mid-transaction, so a store refuses it when it opens).
MAX_NAME_CHARS = 255
#: A node's name goes into every object's metadata (``uploader.objectmeta``), percent-encoded;
#: S3 allows 2 KB of it in all. At most this much of it is the node's, so the fields a rebuild
#: needs always fit beside it (what else goes there is about 250 bytes, a path aside, and a path
#: that does not fit goes to the record sidecar instead).
MAX_NODE_METADATA_BYTES = 1536
#: An upload is started before its id is recorded (the id comes from the remote): the sweep leaves
#: orphans younger than this alone so it cannot abort an upload whose id is about to be recorded.
#: (Here, not in ``uploader.sweep``: the CLI's option default, read without loading the manifest.)
DEFAULT_SWEEP_AGE = 3600.0
#: How many times a completed object that failed verification is uploaded again before the
#: segment is declared ``failed``.
DEFAULT_MAX_REUPLOADS = 3
#: A segment whose recovery passes end on the same error retrying cannot cure (a call the
#: remote does not support, a refused request) this many times in a row becomes ``failed`` with
#: that error: `uploader status` shows it and `uploader retry` takes it up once the cause is fixed.
#: (These two here too: the CLI's option defaults, read without loading the manifest.)
DEFAULT_STUCK_PASSES = 3


class VerifyMode(StrEnum):
    """How a seal proves the remote object before ``verified``.

    * ``etag``: one HEAD; the object's ETag (or checksum) must be what the recorded part digests
      give;
    * ``deep``: also read every byte back and compare each part's CRC32C.
    """

    ETAG = "etag"
    DEEP = "deep"


class ChecksumMode(StrEnum):
    """What proves the bytes of a segment's parts and object to the remote.

    * ``md5``: Content-MD5 on every part and PUT, the part ETags and the multipart ETag (the MD5
      of every byte, on the client);
    * ``crc32c``: no MD5: a part counts as uploaded only when the remote echoes its CRC32C, a
      listed part is reused only with its CRC32C and size, the object is proven by the checksum
      its HEAD reports (or read back where it reports none);
    * ``auto`` (a setting only, never recorded): ``crc32c`` where the remote proved that it keeps
      and echoes CRC32C, else ``md5``.

    The mode a segment was registered with is recorded on its row and used for its whole life,
    whatever the process that resumes it is configured with.
    """

    AUTO = "auto"
    MD5 = "md5"
    CRC32C = "crc32c"


def parse_checksum(value: str | ChecksumMode) -> ChecksumMode:
    try:
        return ChecksumMode(str(value).lower())
    except ValueError:
        known = ", ".join(repr(m.value) for m in ChecksumMode)
        raise UsageError(f"checksum must be one of {known}, not {value!r}") from None


class UploadMode(StrEnum):
    """How a sealed segment's bytes are sent: one PUT (small segments) or a multipart upload."""

    PUT = "put"
    MULTIPART = "multipart"


def parse_verify(value: str | VerifyMode) -> VerifyMode:
    try:
        return VerifyMode(value)
    except ValueError:
        known = ", ".join(repr(m.value) for m in VerifyMode)
        raise UsageError(f"verify must be one of {known}, not {value!r}") from None


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """A store's settings. Build it with keywords; :meth:`check` is called by the store.

    ``min_part_size`` lowers S3's 5 MiB part minimum, for test servers only. ``node`` and
    ``worker`` default to this host's name and ``host:pid`` (see :mod:`uploader.leases`).
    """

    part_size: int = DEFAULT_PART_SIZE
    concurrency: int = DEFAULT_CONCURRENCY
    verify: VerifyMode = VerifyMode.ETAG
    checksum: ChecksumMode = ChecksumMode.AUTO
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    min_part_size: int | None = None
    node: str | None = None
    worker: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def __post_init__(self) -> None:
        # Accept the plain strings of the CLI and of older callers; store the enum.
        if not isinstance(self.verify, VerifyMode):
            object.__setattr__(self, "verify", parse_verify(self.verify))
        if not isinstance(self.checksum, ChecksumMode):
            object.__setattr__(self, "checksum", parse_checksum(self.checksum))

    def check(self) -> StoreConfig:
        """Refuse values that cannot work; return ``self`` for chaining."""
        if self.concurrency < 1:
            raise UsageError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.part_size <= 0:
            raise UsageError(f"part_size must be positive, got {self.part_size}")
        if not (isinstance(self.lease_seconds, int | float) and 0 < self.lease_seconds < math.inf):
            raise UsageError(
                f"lease_seconds must be a positive number of seconds (default "
                f"{DEFAULT_LEASE_SECONDS:g}; the CLI's --lease-seconds), got {self.lease_seconds!r}"
            )
        if self.min_part_size is not None and self.min_part_size <= 0:
            raise UsageError(f"min_part_size must be positive, got {self.min_part_size}")
        if self.retry.attempts < 1:
            raise UsageError(f"retry attempts must be at least 1, got {self.retry.attempts}")
        for name, value in (("node", self.node), ("worker", self.worker)):
            if value is not None:
                check_name(name, value)
        return self

    def with_(self, **changes: Any) -> StoreConfig:
        """A copy with ``changes`` applied (a frozen record's update); None values are ignored,
        so callers can pass their optional keyword arguments straight through."""
        given = {k: v for k, v in changes.items() if v is not None}
        return replace(self, **given) if given else self


def fit_name(head: str, tail: str) -> str:
    """``head + tail`` within :data:`MAX_NAME_CHARS`, ``head`` cut where it must be: a name made
    up here (a default worker, the CLI's ``user@host (pid N)``) keeps the ``tail`` that makes it
    unique."""
    return head[: MAX_NAME_CHARS - len(tail)] + tail


def check_name(setting: str, value: str, *, where: str | None = None) -> None:
    """A node's or worker's name that the manifest (and, for a node, every object's metadata)
    can hold; else a :class:`~uploader.errors.UsageError` naming it and what to do (``where``:
    what gave the name, when not a store's setting)."""
    if where is None:
        where = "node= or UPLOADER_NODE" if setting == "node" else "worker="
        if setting == "node":
            # An earlier version did not refuse it, and SQLite does not enforce VARCHAR(255):
            # its segments may be recorded under this name, which no store can open any more.
            where += (
                "; segments an earlier version recorded under this name move to the new one "
                "with `uploader db rename-node OLD NEW`"
            )
    if len(value) > MAX_NAME_CHARS:
        raise UsageError(
            f"{setting} name {value[:40]!r}... is {len(value)} characters; the manifest holds "
            f"at most {MAX_NAME_CHARS}: give a shorter one ({where})"
        )
    if setting == "node" and len(quote(value, safe="")) > MAX_NODE_METADATA_BYTES:
        raise UsageError(
            f"node name {value[:40]!r}... takes {len(quote(value, safe=''))} bytes "
            f"percent-encoded in every object's metadata; at most {MAX_NODE_METADATA_BYTES} fit "
            f"beside the fields a rebuild needs (S3 allows 2 KB): give a shorter one ({where})"
        )


def resolve(config: StoreConfig | None = None, **overrides: Any) -> StoreConfig:
    """``config`` (or the defaults) with the keyword arguments a caller gave, checked."""
    return (config or StoreConfig()).with_(**overrides).check()
