"""Atomic multipart uploads for any fsspec filesystem without them (``file://``, ``memory://``, ...).

Where each file lives under the root (the reserved ``.uploader/`` area), and how a part is staged
so that a listed part is always whole and a resend wins by part number: :mod:`.layout`.

``complete`` assembles the parts in order into a temporary file, streaming (never the whole object
in memory), writes its ETag sidecar, then publishes the object at its key in one exclusive step:

* on a local disk with ``os.link`` (atomic, and fails if the key exists: a conditional write),
  after ``fsync`` of the file; the directory is fsynced after the link, so a crash leaves either
  no object or the whole one;
* elsewhere with the filesystem's ``mv`` after an existence check, both under one process-wide
  lock (for ``memory://`` the move is a single dictionary assignment, so readers see nothing or
  everything, and the filesystem lives in this process, so the lock makes it exclusive).

Plain filesystems have no ETags: a sidecar keeps the multipart ETag S3 would have given, named by
the identity of the object file it describes, so ``head`` never reports ours for bytes we did not
publish (:mod:`.etags` says how, and what remains).

A publish that loses the race to another object (the exclusive step fails) removes its own file and
sidecar and then judges the object at the key by ``head`` alone: accepted only if it provably
matches what was expected, else ObjectExistsError.

``delete_if_match`` is compare-and-unlink (there is no unconditional delete), see its docstring.
"""

from __future__ import annotations

from uploader.storage.staged.layout import (
    CHUNK,
    HIDDEN,
    KEY_NAME_OVERHEAD,
    LOCK_STRIPES,
    OBJECT_NAME_BYTES,
    fsync_dir,
)
from uploader.storage.staged.parts import StagedParts
from uploader.storage.staged.sweep import StagedSweep

__all__ = [
    "CHUNK",
    "HIDDEN",
    "KEY_NAME_OVERHEAD",
    "LOCK_STRIPES",
    "OBJECT_NAME_BYTES",
    "StagedStorage",
    "fsync_dir",
]


class StagedStorage(StagedParts, StagedSweep):
    """Parts staged under ``<root>/.uploader/``, objects published whole by an atomic step.

    Each concern has its module: :mod:`.layout` (paths, locks, atomic writes), :mod:`.etags`
    (sidecars and ``head``), :mod:`.publish` (the exclusive publish, compare-and-unlink),
    :mod:`.parts` (uploads), :mod:`.sweep` (leftovers).
    """
