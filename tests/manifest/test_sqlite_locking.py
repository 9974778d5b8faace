"""SQLite: writes take the write lock at BEGIN; reads are WAL snapshots that take none."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from uploader.errors import ManifestError
from uploader.manifest.repo import Manifest
from uploader.states import SegmentState


@pytest.fixture
def sqlite_manifest(tmp_path: Path) -> Manifest:
    m = Manifest.open(f"sqlite:///{tmp_path / 'm.db'}")
    m.register("log/1", "/data/1", node="n", part_size=4, worker="w")
    return m


def test_reads_do_not_wait_for_another_process_holding_the_write_lock(
    sqlite_manifest: Manifest, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "m.db", isolation_level=None)  # another process's writer
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("UPDATE segments SET attempts = attempts + 1")
        # A read that took the write lock would sit in the busy handler (30 s) and then fail.
        seg = sqlite_manifest.segment("log/1")
        assert seg is not None and seg.state is SegmentState.OPEN
        assert seg.attempts == 0  # the snapshot: the other writer has not committed
        progress = sqlite_manifest.progress(seg.id)
        assert (progress.segment.key, progress.committed, progress.parts) == ("log/1", 0, 0)
        assert sqlite_manifest.status().segments["open"] == 1
        other.execute("COMMIT")
        after = sqlite_manifest.segment("log/1")
        assert after is not None and after.attempts == 1
    finally:
        other.close()
        sqlite_manifest.close()


def test_writes_take_the_write_lock_at_begin(sqlite_manifest: Manifest, tmp_path: Path) -> None:
    """A write transaction begins IMMEDIATE: while it is open, another writer cannot start."""
    probe = sqlite3.connect(tmp_path / "m.db", isolation_level=None, timeout=0)
    try:
        with sqlite_manifest._begin() as conn:
            conn.exec_driver_sql("SELECT 1")  # nothing written yet: only BEGIN IMMEDIATE ran
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                probe.execute("BEGIN IMMEDIATE")
        probe.execute("BEGIN IMMEDIATE")  # released at commit
        probe.execute("ROLLBACK")
    finally:
        probe.close()
        sqlite_manifest.close()


def test_a_failed_write_leaves_no_transaction_open(
    sqlite_manifest: Manifest, tmp_path: Path
) -> None:
    """Connections go back to the pool without a reset: a failed write must have rolled back."""
    with pytest.raises(ManifestError), sqlite_manifest._begin() as conn:
        conn.exec_driver_sql("UPDATE segments SET attempts = 7")
        raise ManifestError("boom")
    probe = sqlite3.connect(tmp_path / "m.db", isolation_level=None, timeout=0)
    try:
        probe.execute("BEGIN IMMEDIATE")  # nobody holds the lock
        probe.execute("ROLLBACK")
    finally:
        probe.close()
    seg = sqlite_manifest.segment("log/1")
    assert seg is not None and seg.attempts == 0
    sqlite_manifest.close()
