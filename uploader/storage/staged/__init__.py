"""Atomic multipart uploads for any fsspec filesystem without them (``file://``, ``memory://``, ...).

Layout under the root (the first key component ``.uploader`` is reserved, so no key reaches it)::

    .uploader/uploads/<upload id>/meta.json                 key and start time of the upload
    .uploader/uploads/<upload id>/<part>.<seq>.<md5>        a staged part; the name carries its ETag
    .uploader/etags/<h[:2]>/<h>.<identity>.json            ETag of the object file <identity>
    .uploader/tmp/<random>                                 an object being assembled
    .uploader/aside/<random>(.json)                        an object being compared for a delete
    .uploader/locks/<nn>                                   flock stripes (local disk)

(``h`` is the SHA-256 of the key.) A part is written to a temporary name and renamed into place,
so a listed part is always whole. Sending a part number again stages a newer ``seq``; the newest
wins (idempotent by part number). A part renamed into an upload whose ``meta.json`` is gone (a
stale writer after ``abort`` or ``complete``) is removed again and refused with NoSuchUploadError:
``abort`` removes ``meta.json`` first, so the directory is never re-created or left half-alive.

``complete`` assembles the parts in order into a temporary file, streaming (never the whole object
in memory), writes its ETag sidecar, then publishes the object at its key in one exclusive step:

* on a local disk with ``os.link`` (atomic, and fails if the key exists: a conditional write),
  after ``fsync`` of the file; the directory is fsynced after the link, so a crash leaves either
  no object or the whole one;
* elsewhere with the filesystem's ``mv`` after an existence check, both under one process-wide
  lock (for ``memory://`` the move is a single dictionary assignment, so readers see nothing or
  everything, and the filesystem lives in this process, so the lock makes it exclusive).

ETags, and why ``head`` never reports ours for bytes we did not publish. Plain filesystems have no
ETags: a sidecar keeps the multipart ETag S3 would have given, so one ``head`` verifies like on S3.
A sidecar is named by the *identity of the object file* it describes, and ``head`` looks up only
the sidecar of the identity it finds at the key; without one it reports the MD5 of the bytes (the
ETag of a single PUT, never a multipart ETag). So the ETag and the bytes become visible together:

* local disk: identity = ``(st_dev, st_ino, st_mtime_ns, st_size)`` of the assembled temporary
  file, taken after its last write and fsync. ``os.link`` publishes that very inode, so the
  published object has the same identity. A writer killed after the sidecar and before the link
  leaves a sidecar naming an inode that is not at the key: a foreign object written there later
  (another inode, or the same inode number reused with another mtime) gets no ETag from it. A
  foreign writer rewriting our published file in place changes its mtime: it loses our ETag too.
  (Residual: a reused inode number with the same size *and* the same nanosecond mtime.)
* other filesystems (no inodes): identity = the MD5 of the whole content, taken while assembling;
  ``head`` reads the object to compute it. Exact (identical bytes are the same object), but
  ``head`` costs a full read there.

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
