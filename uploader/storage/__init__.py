"""Storage backends behind one interface; see :mod:`uploader.storage.base`."""

from uploader.storage.base import (
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    Expected,
    ObjectInfo,
    PartRef,
    Storage,
    UploadRef,
)

__all__ = [
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "Expected",
    "ObjectInfo",
    "PartRef",
    "Storage",
    "UploadRef",
]
