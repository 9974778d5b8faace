"""segment-uploader: ship append-only segment files to object storage without losing the tail.

>>> import uploader
>>> store = uploader.open("sqlite:///uploader.db", "s3://bucket/prefix")  # doctest: +SKIP
>>> seg = store.segment("commitlog/0000", "/data/commitlog/0000")       # doctest: +SKIP
>>> seg.commit().result(); seg.seal().result()                           # doctest: +SKIP

See ``docs/`` for the words, the states and the guarantees.
"""

from uploader.errors import (
    CorruptObjectError,
    LocalFileError,
    ManifestError,
    SegmentFailedError,
    SegmentSealedError,
    StorageError,
    StoreClosedError,
    UnverifiedObjectError,
    UploaderError,
    UsageError,
    VerificationError,
)
from uploader.readback import ObjectReader, RangeRead
from uploader.rebuild import RebuildReport
from uploader.records import CommitRecord, Event, SegmentRecord, Status
from uploader.recovery import RecoveryReport, SegmentOutcome, SweepReport
from uploader.states import CommitState, SegmentState
from uploader.store import CommitResult, Segment, Store, UploadFuture, open

__version__ = "0.1.0"

__all__ = [
    "CommitRecord",
    "CommitResult",
    "CommitState",
    "CorruptObjectError",
    "Event",
    "LocalFileError",
    "ManifestError",
    "ObjectReader",
    "RangeRead",
    "RebuildReport",
    "RecoveryReport",
    "Segment",
    "SegmentFailedError",
    "SegmentOutcome",
    "SegmentRecord",
    "SegmentSealedError",
    "SegmentState",
    "Status",
    "StorageError",
    "Store",
    "StoreClosedError",
    "SweepReport",
    "UnverifiedObjectError",
    "UploadFuture",
    "UploaderError",
    "UsageError",
    "VerificationError",
    "__version__",
    "open",
]
