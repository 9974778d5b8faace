"""Upgrading past the name checks: segments an earlier version recorded under a node name this
version refuses are moved with ``uploader db rename-node`` and shipped under the new name, every
byte compared (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import random
from datetime import timedelta
from pathlib import Path

import uploader
from tests.cli.conftest import Run, uploader_env
from tests.conftest import migrate
from uploader.digest import checksum
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit
from uploader.states import CommitState, SegmentState
from uploader.transport import file_identity

PART = 64 * 1024
NEW = "broker-1"


def _old_name(manifest_url: str) -> str:
    # SQLite never enforced VARCHAR(255): an earlier version took 300 characters there. On
    # PostgreSQL, 200 CJK characters: within 255, but 1,800 bytes percent-encoded.
    return "n" * 300 if manifest_url.startswith("sqlite") else "中" * 200


def _earlier_version_wrote(manifest_url: str, path: Path, old: str) -> int:
    """What an earlier version left: a segment under ``old`` with two whole parts recorded and
    not sent, its writer gone an hour ago (its lease long expired)."""
    migrate(manifest_url)
    m = Manifest.open(manifest_url)
    hour_ago = m.clock() - timedelta(hours=1)
    m.clock = lambda: hour_ago
    try:
        data = path.read_bytes()
        seg = m.register(
            "log/0", str(path), node=old, part_size=PART, worker="old:1",
            identity=file_identity(str(path)),
        )  # fmt: skip
        lease = m.acquire("log/0", "old:1", node=old)
        parts = []
        for n in (1, 2):
            md5, crc = checksum(data[(n - 1) * PART : n * PART])
            parts.append(NewCommit(n, (n - 1) * PART, n * PART, md5, crc))
        m.add_commits(lease, parts)
        return seg.id
    finally:
        m.close()


def test_segments_under_a_refused_node_name_are_renamed_and_shipped(
    run: Run, home: Path, tmp_path: Path, manifest_url: str
) -> None:
    old = _old_name(manifest_url)
    remote = tmp_path / "remote"
    remote.mkdir()
    path = tmp_path / "seg0"
    path.write_bytes(random.Random(5).randbytes(2 * PART + 777))
    seg_id = _earlier_version_wrote(manifest_url, path, old)
    base = ("--manifest", manifest_url, "--remote", f"file://{remote}")
    sizes = ("--part-size", str(PART), "--min-part-size", str(PART))

    # This version refuses the old name, and says where its segments go.
    refused = run(*base, *sizes, "recover", env=uploader_env(home, UPLOADER_NODE=old))
    assert refused.returncode == 2, refused.stderr
    assert "uploader db rename-node OLD NEW" in refused.stderr
    # Under the new name, before the rename, the segment is stranded: its parts wait for a
    # worker on its node (only there are its bytes).
    run(*base, *sizes, "recover", env=uploader_env(home, UPLOADER_NODE=NEW))
    m = Manifest.open(manifest_url)
    try:
        assert [c.state for c in m.commits(seg_id)] == [CommitState.PENDING] * 2
    finally:
        m.close()

    renamed = run(
        *base, "db", "rename-node", old, NEW, "--reason", "upgrade: name refused", "--json"
    )
    assert renamed.returncode == 0, renamed.stderr
    assert json.loads(renamed.stdout)["renamed"] == ["log/0"]
    again = run(*base, "db", "rename-node", old, NEW)
    assert again.returncode == 2 and "no segment is recorded under node" in again.stderr

    # The recovery job under the new name sends the pending parts now ...
    run(*base, *sizes, "recover", env=uploader_env(home, UPLOADER_NODE=NEW))
    m = Manifest.open(manifest_url)
    try:
        assert [c.state for c in m.commits(seg_id)] == [CommitState.UPLOADED] * 2
        rename = [e for e in m.events(seg_id) if "node renamed" in (e.detail or "")]
        assert len(rename) == 1 and "upgrade: name refused" in (rename[0].detail or "")
    finally:
        m.close()
    # ... and the writer, reopened under it, seals: the whole file verified, byte for byte.
    with uploader.open(
        manifest_url, f"file://{remote}", node=NEW, part_size=PART, min_part_size=PART
    ) as store:
        result = store.segment("log/0", path).seal().result()
        assert result.verified
        seg = store.manifest.segment("log/0")
        assert seg is not None and seg.state is SegmentState.VERIFIED and seg.node == NEW
    assert (remote / "log/0").read_bytes() == path.read_bytes()


def test_rename_node_with_no_manifest_yet_creates_nothing(run: Run, home: Path) -> None:
    done = run("db", "rename-node", "a", "b")
    assert done.returncode == 2 and "no manifest yet" in done.stderr
    assert not any(home.rglob("*.db"))
