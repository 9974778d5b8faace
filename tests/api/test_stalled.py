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
