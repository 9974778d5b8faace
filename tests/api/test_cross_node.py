"""Node affinity end to end: a worker on a node without the segment's file never re-sends, reads
or judges its local bytes; it leaves the segment as it found it, and the owning node verifies it.

The scenario of the issue: every part was uploaded, the writer on node A died before COMPLETE,
and the multipart upload was then aborted remotely (a lifecycle rule). Resuming needs the local
bytes again, which only node A has.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from uploader.manifest.repo import utcnow
from uploader.states import CommitState, SegmentState
from uploader.storage import open_storage
from uploader.storage.faults import Fault, FaultyStorage


class Crash(BaseException):
    """The writer dies here (not an Exception: no handler in the library catches it)."""


@pytest.mark.parametrize("remote", ["s3", "file"], indirect=True)
def test_recovery_on_a_node_without_the_file_releases_it_and_the_owner_verifies(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    url, options = remote
    path = tmp_path / "seg"
    data = bytes(range(256)) * ((3 * PART + 7) // 256 + 1)
    data = data[: 3 * PART + 7]
    path.write_bytes(data)

    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="complete", when="before", error=lambda: Crash("writer dies")))
    writer = make_store(node="a", storage=faulty)
    with contextlib.suppress(Crash):
        writer.segment("log/0", path).seal().result(timeout=60)
    writer.abandon()  # died: its lease is not given back

    seg = writer_view = None
    with make_store(node="a") as probe:
        writer_view = probe.manifest.segment("log/0")
        assert writer_view is not None and writer_view.upload_id is not None
        assert writer_view.state is SegmentState.SEALED
        parts = probe.manifest.commits(writer_view.id)
        assert [c.state for c in parts] == [CommitState.UPLOADED] * 4
        # A lifecycle rule aborts the upload: the uploaded parts are gone remotely.
        probe.storage.abort("log/0", writer_view.upload_id)

    # Node B, after the dead writer's lease expired, cannot see the file (it is elsewhere).
    hidden = tmp_path / "elsewhere"
    path.rename(hidden)
    b = make_store(node="b")
    b.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    report = b.recover()
    assert report.failed == ()
    seg = b.manifest.segment("log/0")
    assert seg is not None and seg.state is SegmentState.SEALED, seg
    assert seg.lease_owner is None or seg.lease_expires is None or seg.lease_owner != b.worker
    after_b = b.manifest.commits(seg.id)
    # Untouched: node B neither reset the parts (it could not re-send them) nor failed them.
    assert [c.state for c in after_b] == [CommitState.UPLOADED] * 4
    assert remote_bytes(remote, "log/0") is None
    b.close()

    # The owning node sees its file again and finishes: everything re-sent, then verified.
    hidden.rename(path)
    a = make_store(node="a")
    a.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
    report = a.recover()
    assert report.failed == (), report
    final = a.manifest.segment("log/0")
    assert final is not None and final.state is SegmentState.VERIFIED
    assert remote_bytes(remote, "log/0") == data
    assert final.state == uploader.SegmentState.VERIFIED
