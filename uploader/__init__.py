"""segment-uploader: ship append-only segment files to object storage without losing the tail.

>>> import uploader
>>> store = uploader.open("sqlite:///uploader.db", "s3://bucket/prefix")  # doctest: +SKIP
>>> seg = store.segment("commitlog/0000", "/data/commitlog/0000")       # doctest: +SKIP
>>> seg.commit().result(); seg.seal().result()                           # doctest: +SKIP

See ``docs/`` for the words, the states and the guarantees.
"""

from typing import TYPE_CHECKING, Any

from uploader.errors import (
    CorruptObjectError,
    LocalFileError,
    ManifestError,
    SegmentFailedError,
    SegmentSealedError,
    StateError,
    StorageError,
    StoreClosedError,
    UnverifiedObjectError,
    UploaderError,
    UsageError,
    VerificationError,
)
from uploader.records import CommitRecord, Event, SegmentRecord, Status
from uploader.states import CommitState, SegmentState

if TYPE_CHECKING:
    from uploader.config import ChecksumMode, StoreConfig, UploadMode, VerifyMode
    from uploader.futures import CommitResult, UploadFuture
    from uploader.readback import ObjectReader, RangeRead
    from uploader.rebuild import RebuildReport
    from uploader.recovery_report import RecoveryReport, SegmentOutcome
    from uploader.segment import Segment
    from uploader.store import Store, open
    from uploader.sweep import SweepReport

#: The one place the version is written (pyproject.toml reads it: dynamic version).
__version__ = "0.1.0"

# The store, recovery and rebuild (SQLAlchemy, fsspec) are imported on first use, so that
# importing a submodule (the CLI, which installs its signal handlers first) does not pay for them
# up front: ``python -m uploader.cli`` imports this package before the CLI's first line runs.
_LAZY = {
    "StoreConfig": "uploader.config",
    "UploadMode": "uploader.config",
    "VerifyMode": "uploader.config",
    "ChecksumMode": "uploader.config",
    "ObjectReader": "uploader.readback",
    "RangeRead": "uploader.readback",
    "RebuildReport": "uploader.rebuild",
    "RecoveryReport": "uploader.recovery_report",
    "SegmentOutcome": "uploader.recovery_report",
    "SweepReport": "uploader.sweep",
    "CommitResult": "uploader.futures",
    "Segment": "uploader.segment",
    "Store": "uploader.store",
    "UploadFuture": "uploader.futures",
    "open": "uploader.store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'uploader' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ChecksumMode",
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
    "StateError",
    "Status",
    "StorageError",
    "Store",
    "StoreClosedError",
    "StoreConfig",
    "SweepReport",
    "UnverifiedObjectError",
    "UploadFuture",
    "UploadMode",
    "UploaderError",
    "UsageError",
    "VerificationError",
    "VerifyMode",
    "__version__",
    "open",
]
