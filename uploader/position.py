"""The vocabulary of the one decision (:mod:`uploader.plan`): the :class:`Position` the driver
knows before each step, the :class:`Act` it may take and the :class:`Step` that names it.

Plain data, no logic: :func:`uploader.plan.next_step` maps a position to a step;
:mod:`uploader.driver` builds the position and takes the step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from uploader.records import CommitRecord, SegmentRecord
from uploader.storage.base import ObjectInfo, PartRef


class Act(StrEnum):
    LIST_PARTS = "list parts"  # learn what the upload holds
    HEAD = "head"  # learn what is at the key
    PROBE = "probe"  # learn whether the remote honours conditional deletes
    RESET_UPLOAD = "reset upload"  # the upload is gone: every part pending, no upload id
    ADOPT_PARTS = "adopt parts"  # pending parts the remote holds with their MD5: uploaded
    UNSEND_PARTS = "unsend parts"  # uploaded parts the remote does not hold: pending
    START_UPLOAD = "start upload"
    SEND = "send"  # pending parts, re-read and checked (or as the caller read them)
    PUT = "put"  # a single-PUT segment's one object
    CHECK_LOCAL = "check local"  # the whole-file check
    COMPLETE = "complete"
    ADOPT_OBJECT = "adopt object"  # an object matching the seal is at the key: uploaded
    DEEP_READ = "deep read"  # read the object back, part by part
    VERIFY = "verify"  # uploaded -> verified
    VERIFY_PUT = "verify put"  # sealed -> uploaded -> verified for a single PUT, at once
    REUPLOAD = "reupload"  # uploaded -> sealed, with the intent to remove the bad object
    REMOVE = "remove"  # the conditional delete of the object named by the intent
    FORGET_REMOVE = "forget remove"  # the named object is no longer at the key
    FAIL = "fail"
    BLOCK = "block"  # nothing this worker can do now; the reason says why
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Step:
    act: Act
    commits: tuple[CommitRecord, ...] = ()
    reason: str = ""
    etag: str | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """What the driver knows before each step."""

    seg: SegmentRecord
    commits: Sequence[CommitRecord]  # all of them, or (open segments) the pending ones
    parts_known: bool = False
    parts: Mapping[int, PartRef] | None = None  # None when known: the upload is unknown
    object_known: bool = False
    obj: ObjectInfo | None = None
    local_checked: bool = False
    local_here: bool = True  # this worker can read the segment's local file
    deep: bool = False
    deep_checked: bool = False  # the object was read back in this drive and every part is equal
    read_back_differs: str | None = None  # ... or what differed
    parts_listable: bool = True  # False: the remote answered ListParts "not supported"
    fresh: frozenset[int] = frozenset()  # commit ids
    inflight: frozenset[int] = frozenset()  # commit ids a writer's job is sending right now
    conditional_delete: bool | None = None  # None: not learned yet
    reuploads: int = 0
    max_reuploads: int = 3
    #: Part number -> listed ETag, the MD5 of our local bytes (uploader.listed_proof).
    md5_proven: Mapping[int, str] | None = None
