"""``uploader status`` reports open segments whose local file vanished or shrank, and exits 1."""

from __future__ import annotations

import json
from pathlib import Path

import uploader
from tests.api.conftest import PART
from tests.cli.conftest import Run


def test_status_prints_stalled_segments_and_exits_1(run: Run, home: Path, tmp_path: Path) -> None:
    (home / "remote").mkdir(exist_ok=True)
    gone, shrunk = tmp_path / "gone", tmp_path / "shrunk"
    for p in (gone, shrunk):
        p.write_bytes(b"g" * (PART + 1))
    store = uploader.open(
        f"sqlite:///{home}/manifest.db",
        f"file://{home}/remote",
        part_size=PART,
        min_part_size=PART,
    )
    with store:
        for key, p in (("log/gone", gone), ("log/shrunk", shrunk)):
            assert store.segment(key, p).commit().result(timeout=60).committed == PART

    healthy = run("status", "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert json.loads(healthy.stdout)["stalled"] == []

    gone.unlink()
    shrunk.write_bytes(b"g" * 7)
    data = run("status", "--json")
    assert data.returncode == 1, data.stdout + data.stderr
    report = json.loads(data.stdout)
    assert report["stalled"] == [
        {"key": "log/gone", "why": f"local file missing: {gone}"},
        {"key": "log/shrunk", "why": f"local file shorter: {shrunk} has 7 bytes, {PART} committed"},
    ]
    assert report["failed"] == [] and report["all_verified"] is False

    table = run("status")
    assert table.returncode == 1
    text = " ".join(table.stdout.split())  # rich may wrap long lines
    assert "stalled: local file missing" in text and "log/gone" in text
    assert "stalled: local file shorter" in text and "log/shrunk" in text
