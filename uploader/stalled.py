"""Open segments that cannot go on: their local file vanished or shrank below the committed end.

``seal()`` refuses such a segment and records nothing, so without this nothing would say so: the
segment stays ``open`` forever. The manifest cannot stat files, so whoever holds the node's files
(the store, the CLI on that host) asks here: one ``stat`` per open segment of this node, and one
query for the committed end of those whose file is still there.
"""

from __future__ import annotations

import os

from uploader.manifest.repo import Manifest
from uploader.states import SegmentState

MISSING = "local file missing"
SHORTER = "local file shorter"


def find_stalled(manifest: Manifest, node: str) -> tuple[tuple[str, str], ...]:
    """(key, why) of the open segments of ``node`` whose file is gone or below its committed end.

    A file that cannot be stat'ed for another reason (EACCES, ...) is not judged: that may pass.
    """
    out: list[tuple[str, str]] = []
    for seg in manifest.segments([SegmentState.OPEN]):
        if seg.node != node:
            continue
        try:
            size = os.stat(seg.path).st_size
        except (FileNotFoundError, NotADirectoryError):
            out.append((seg.key, f"{MISSING}: {seg.path}"))
            continue
        except OSError:
            continue
        committed = manifest.progress(seg.id).committed
        if size < committed:
            out.append((seg.key, f"{SHORTER}: {seg.path} has {size} bytes, {committed} committed"))
    return tuple(out)
