"""Open segments whose local file vanished or shrank below the committed end are reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.api.conftest import PART, StoreFactory


@pytest.mark.parametrize("remote", ["file"], indirect=True)
def test_status_reports_stalled_open_segments_of_this_node(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    shrunk, gone, intact = (tmp_path / n for n in ("shrunk", "gone", "intact"))
    for p in (shrunk, gone, intact):
        p.write_bytes(b"s" * (PART + 3))
    with make_store(node="here") as store:
        for key, p in (("log/shrunk", shrunk), ("log/gone", gone), ("log/intact", intact)):
            res = store.segment(key, p).commit().result(timeout=60)
            assert res.committed == PART  # a whole part committed; the file is still open
        assert store.status().stalled == ()
        assert not store.manifest.status().all_verified  # open segments: not verified anyway

        # Another node's open segment whose path is missing here: not this node's to judge.
        other = tmp_path / "other"
        other.write_bytes(b"o")
        with make_store(node="elsewhere") as there:
            there.segment("log/other", other)
        other.unlink()

        with open(shrunk, "r+b") as f:
            f.truncate(10)
        gone.unlink()
        status = store.status()
        assert dict(status.stalled) == {
            "log/shrunk": f"local file shorter: {shrunk} has 10 bytes, {PART} committed",
            "log/gone": f"local file missing: {gone}",
        }
        assert not status.all_verified
        # Shrinking but still at or past the committed end is not stalled.
        with open(intact, "r+b") as f:
            f.truncate(PART)
        assert {k for k, _ in store.status().stalled} == {"log/shrunk", "log/gone"}


def test_recovery_fails_stalled_open_segments_once_their_writer_is_gone(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    import uploader

    gone, alive, intact = (tmp_path / n for n in ("gone", "alive", "intact"))
    for p in (gone, alive, intact):
        p.write_bytes(b"s" * (PART + 3))
    writer = make_store(node="here")
    for key, p in (("log/gone", gone), ("log/intact", intact)):
        writer.segment(key, p).commit().result(timeout=60)
    writer.close()  # the writer is gone: its leases are given back
    live = make_store(node="here")
    live.segment("log/alive", alive).commit().result(timeout=60)  # a live writer holds this one
    gone.unlink()
    alive.unlink()
    worker = make_store(node="here")
    report = worker.recover()
    assert [(k, r) for k, r in report.failed] == [
        ("log/gone", f"local bytes unusable: local file missing: {gone}; the open segment can "
         "never be sealed"),
    ]  # fmt: skip
    assert not report.ok
    states = {s.key: s.state for s in worker.manifest.segments()}
    assert states == {
        "log/gone": uploader.SegmentState.FAILED,
        "log/intact": uploader.SegmentState.OPEN,
        "log/alive": uploader.SegmentState.OPEN,  # its writer's lease is live: left to it
    }
    assert worker.recover().failed == ()  # nothing more to judge
