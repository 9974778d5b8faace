"""What one drive of a segment knows and where it leaves the segment (see :mod:`uploader.driver`).

:class:`Learned` is what a drive learned from the remote and from the local file, forgotten when the
drive ends (nothing remote is trusted from an earlier drive); :class:`DriveResult` is what the
caller gets back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from uploader.config import DEFAULT_MAX_REUPLOADS as DEFAULT_MAX_REUPLOADS
from uploader.config import VerifyMode
from uploader.digest import Payload
from uploader.records import CommitRecord, PutFailed, PutProven
from uploader.states import SegmentState
from uploader.storage.base import ObjectInfo, PartRef, PutAnswer

#: The verify modes by name (the enum is :class:`~uploader.config.VerifyMode`).
VERIFY_MODES = tuple(m.value for m in VerifyMode)


@dataclass(frozen=True, slots=True)
class DriveResult:
    """Where one drive left a segment."""

    key: str
    state: SegmentState
    detail: str = ""
    blocked: str | None = None  # why this worker could go no further (None: not blocked)
    object_etag: str | None = None

    @property
    def verified(self) -> bool:
        return self.state is SegmentState.VERIFIED


@dataclass
class Learned:
    """What one drive learned; forgotten when it ends (nothing remote is trusted from before)."""

    parts_known: bool = False
    parts: dict[int, PartRef] | None = None
    #: Part number -> listed ETag: crc32c-mode parts listed without a CRC32C whose local bytes
    #: have that MD5 (:mod:`uploader.listed_proof`); learned with the listing. Each entry is a
    #: fact about an ETag, not about that listing (the plan uses it only where a part is listed
    #: with that very ETag), so it stays true when the parts are learned again or reset.
    md5_proven: dict[int, str] = field(default_factory=dict)
    object_known: bool = False
    obj: ObjectInfo | None = None
    checked: set[int] = field(default_factory=set)  # part numbers read and found equal
    local_checked: bool = False
    deep_checked: bool = False  # the object read back, every part equal
    read_back_differs: str | None = None  # the object read back: what differed
    unlistable: bool = False  # the remote answered ListParts "not supported"
    fresh: dict[int, Payload | None] = field(default_factory=dict)  # commit id -> bytes read
    put_ack: tuple[CommitRecord, str] | None = None  # a PUT acknowledged, not yet recorded
    deferred: Deferred | None = None  # a group commit writes this drive's PUT outcome itself
    answered: dict[int, PutAnswer] = field(default_factory=dict)  # commit id -> PUT sent already

    def object_changed(self) -> None:
        self.object_known = False
        self.obj = None
        self.deep_checked = False
        self.read_back_differs = None


@dataclass
class Deferred:
    """The outcome of one drive's single PUT, kept for the group commit
    (:mod:`uploader.group`) to write with the rest of its batch in one transaction.

    Only these two outcomes wait: the plan decided them exactly as for a drive that writes them
    at once (the proof is the same), and until they are written the segment stays ``sealed``
    with its part ``pending``, which recovery finishes. Every other step's outcome is written
    by the driver right away, as always.
    """

    proven: PutProven | None = None
    failed: PutFailed | None = None
