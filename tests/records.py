"""A manifest row made by hand, for the pure tests (plans, proofs, object metadata)."""

from __future__ import annotations

import dataclasses
from datetime import datetime

from uploader.records import SegmentRecord
from uploader.states import SegmentState

NOW = datetime(2026, 1, 1)

_BASE = SegmentRecord(
    id=1, key="k", path="/p", node="n", state=SegmentState.SEALED, part_size=10, size=None,
    crc32c=None, expected_etag=None, upload_mode="multipart", upload_id=None, object_etag=None,
    fence=1, lease_owner="w", lease_expires=NOW, attempts=0, last_error=None, reason=None,
    created_at=NOW, updated_at=NOW, sealed_at=NOW, verified_at=None,
)  # fmt: skip


def segment_record(**kw: object) -> SegmentRecord:
    """A segment row: segment 1, key ``k``, ``/p`` on node ``n``, sealed, held by ``w``; ``kw``
    replaces any field."""
    return dataclasses.replace(_BASE, **kw)  # type: ignore[arg-type]
