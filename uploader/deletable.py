"""The deletion gate: which local files may be deleted now (``Store.deletable``).

Only a verified segment's file is offered, and only if it is still the file that was verified
(same inode, size, not modified since) and the object is still at its key as verified (one
``HEAD``, no read). A verified object found missing or changed is drift, recorded through
:func:`uploader.verify.drift`; its file is not offered.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from uploader import verify as verify_mod
from uploader.errors import ObjectChangedError
from uploader.records import SegmentRecord

if TYPE_CHECKING:
    from uploader.crew import Crew

log = logging.getLogger("uploader")


def deletable(crew: Crew) -> list[SegmentRecord]:
    """Segments whose local file may now be deleted: verified ones, and only those.

    The gate looks at the local files of this node once more (a ``stat``, no read): a file
    replaced by another inode, of another size than the verified object, or modified after
    it was verified is not offered (it holds bytes the remote does not have; ``uploader
    status`` and the log say which). Files already gone are still listed (nothing to lose).
    """
    out = []
    for rec in crew.manifest.deletable():
        problem = changed_since_verified(rec) if rec.node == crew.node else None
        if problem is not None:
            log.error("segment %r is verified but not deletable: %s", rec.key, problem)
            continue
        # The object itself, at the time of the question (one HEAD): a verified object
        # that vanished or changed since is drift, recorded, and the file is not offered.
        try:
            remote = crew.driver.check_object(rec, deep=False)
        except ObjectChangedError as exc:
            log.error("segment %r is not deletable now: %s", rec.key, exc)
            continue
        if remote is not None:
            log.error("segment %r is not deletable: %s", rec.key, remote)
            verify_mod.drift(crew, rec, remote, repair=False)
            continue
        out.append(rec)
    return out


def changed_since_verified(rec: SegmentRecord) -> str | None:
    try:
        st = os.stat(rec.path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot stat {rec.path}: {exc.strerror or exc}"
    if rec.file_inode is not None and (st.st_dev, st.st_ino) != (
        rec.file_device,
        rec.file_inode,
    ):
        return f"{rec.path} was replaced by another file after it was verified"
    if rec.size is not None and st.st_size != rec.size:
        return (
            f"{rec.path} has {st.st_size} bytes, the verified object {rec.size}: it was "
            "written after it was sealed (a file written in place needs --format or "
            "commit(upto=...))"
        )
    verified_at = rec.verified_at
    if verified_at is not None:
        modified = datetime.fromtimestamp(st.st_mtime, UTC).replace(tzinfo=None)
        if modified > verified_at:
            return (
                f"{rec.path} was modified at {modified:%Y-%m-%d %H:%M:%S.%f} UTC, after it "
                f"was verified ({verified_at:%Y-%m-%d %H:%M:%S.%f} UTC): the remote copy "
                "does not have those bytes"
            )
    return None
