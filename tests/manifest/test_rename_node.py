"""``Manifest.rename_node``: a node's segments moved to its new name, whole or not at all,
guarded and audited (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from tests.manifest.conftest import waiting_on_a_lock
from uploader.digest import checksum
from uploader.errors import SegmentBusyError, UsageError
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import SEGMENTS
from uploader.records import NewCommit
from uploader.states import CommitState

OLD = "中" * 200  # 1,800 bytes percent-encoded: an earlier version took it, this one refuses it
NEW = "host-7"


def _part(number: int, data: bytes, start: int) -> NewCommit:
    md5, crc = checksum(data)
    return NewCommit(number, start, start + len(data), md5, crc)


def _with_pending_parts(manifest: Manifest, key: str, node: str) -> int:
    """A writer under ``node`` recorded two parts and stopped before sending them (its lease
    is left as it was: a crashed process releases nothing)."""
    seg = manifest.register(key, f"/data/{key}", node=node, part_size=4, worker=f"{node}:1")
    lease = manifest.acquire(key, f"{node}:1", node=node)
    manifest.add_commits(lease, [_part(1, b"abcd", 0), _part(2, b"efgh", 4)])
    return seg.id


def _later(manifest: Manifest, seconds: float) -> None:
    then = manifest.clock() + timedelta(seconds=seconds)
    manifest.clock = lambda: then


def test_a_rename_moves_every_segment_of_the_node_and_no_other(manifest: Manifest) -> None:
    now = manifest.clock()
    manifest.clock = lambda: now  # one client clock for leases on both manifests
    ids = [_with_pending_parts(manifest, f"log/{i}", OLD) for i in range(3)]
    other = _with_pending_parts(manifest, "other/1", "host-9")
    before = {i: manifest.segment_by_id(i) for i in ids}
    _later(manifest, 60)  # the crashed writer's leases (30 s) have run out

    moved = manifest.rename_node(OLD, NEW, who="ops@admin", why="host renamed")

    assert [r.id for r in moved] == ids
    for i in ids:
        seg = manifest.segment_by_id(i)
        assert seg.node == NEW
        assert seg.fence == before[i].fence + 1  # whatever the old name held is fenced off
        assert (seg.lease_owner, seg.lease_expires) == (None, None)
        assert [c.state for c in manifest.commits(i)] == [CommitState.PENDING] * 2
        last = manifest.events(i)[-1]
        assert (last.worker, last.fence, last.from_state, last.to_state) == (
            "ops@admin",
            seg.fence,
            seg.state.value,
            seg.state.value,
        )
        assert "host renamed" in (last.detail or "") and repr(NEW) in (last.detail or "")
    assert manifest.segment_by_id(other).node == "host-9"
    # A worker under the new name claims them now (they have pending parts: only their node may).
    assert manifest.claim("w-old", node=OLD, limit=10) == []
    claimed = manifest.claim("w-new", node=NEW, limit=10)
    assert sorted(lease.key for lease, _ in claimed) == ["log/0", "log/1", "log/2"]


def test_a_live_lease_refuses_the_whole_rename(manifest: Manifest) -> None:
    now = manifest.clock()
    manifest.clock = lambda: now
    free = _with_pending_parts(manifest, "log/free", OLD)
    _later(manifest, 60)
    busy = _with_pending_parts(manifest, "log/busy", OLD)  # its writer is still running
    with pytest.raises(SegmentBusyError, match=r"'log/busy'.*leased by .*nothing was renamed"):
        manifest.rename_node(OLD, NEW, who="ops", why="host renamed")
    assert {manifest.segment_by_id(i).node for i in (free, busy)} == {OLD}
    assert all("renamed" not in (e.detail or "") for e in manifest.events(free))
    _later(manifest, 60)
    assert len(manifest.rename_node(OLD, NEW, who="ops", why="host renamed")) == 2


def test_a_rename_onto_a_node_that_has_segments_needs_merge(manifest: Manifest) -> None:
    now = manifest.clock()
    manifest.clock = lambda: now
    mine = _with_pending_parts(manifest, "log/1", OLD)
    theirs = _with_pending_parts(manifest, "log/2", NEW)
    _later(manifest, 60)
    with pytest.raises(UsageError, match=r"node 'host-7' already has 1 segments.*--merge"):
        manifest.rename_node(OLD, NEW, who="ops", why="host renamed")
    assert manifest.segment_by_id(mine).node == OLD
    assert [
        r.id for r in manifest.rename_node(OLD, NEW, who="ops", why="same box", merge=True)
    ] == [mine]
    assert {manifest.segment_by_id(i).node for i in (mine, theirs)} == {NEW}


@pytest.mark.parametrize(
    ("old", "new", "who", "why", "says"),
    [
        (OLD, "n" * 256, "ops", "x", "node name 'n+'... is 256 characters"),
        (OLD, "中" * 171, "ops", "x", r"takes 1539 bytes percent-encoded.*\(the new name\)$"),
        (NEW, NEW, "ops", "x", "already called that"),
        ("", NEW, "ops", "x", "give the old node's name"),
        ("nobody", NEW, "ops", "x", "no segment is recorded under node 'nobody'"),
        (OLD, NEW, "ops", "  ", "a rename needs a reason"),
        (OLD, NEW, "o" * 256, "x", "256 characters; the manifest holds at most 255"),
    ],
)
def test_bad_renames_are_refused_and_change_nothing(
    manifest: Manifest, old: str, new: str, who: str, why: str, says: str
) -> None:
    now = manifest.clock()
    manifest.clock = lambda: now
    seg = _with_pending_parts(manifest, "log/1", OLD)
    _later(manifest, 60)
    events = len(manifest.events(seg))
    with pytest.raises(UsageError, match=says):
        manifest.rename_node(old, new, who=who, why=why)
    assert manifest.segment_by_id(seg).node == OLD
    assert len(manifest.events(seg)) == events


def test_a_segment_registered_under_the_old_name_meanwhile_waits_and_is_renamed_too(
    manifest: Manifest,
) -> None:
    """PostgreSQL (READ COMMITTED): a row registered under the old name while the rename runs
    could be missed by its UPDATE and then seen by the check after it. The rename locks the
    table against writers first: the register's transaction, open before it, is waited for."""
    if not manifest.is_postgres:
        pytest.skip("SQLite write transactions are exclusive from BEGIN: no such interleaving")
    now = manifest.clock()
    manifest.clock = lambda: now
    first = _with_pending_parts(manifest, "log/1", OLD)
    _later(manifest, 60)
    late = manifest._write()
    tx = late.__enter__()
    result: dict[str, Any] = {}
    try:
        # An earlier version's register, not yet committed: a row with no lease.
        tx.insert_segment(
            key="log/late", path="/data/log/late", node=OLD, state="open", part_size=4,
            fence=0, attempts=0, created_at=tx.now, updated_at=tx.now,
        )  # fmt: skip

        def rename() -> None:
            try:
                result["moved"] = manifest.rename_node(OLD, NEW, who="ops", why="renamed")
            except Exception as exc:  # reported by the assertion below
                result["error"] = exc

        t = threading.Thread(target=rename)
        t.start()
        assert waiting_on_a_lock(manifest, time.monotonic() + 30), "the rename never waited"
    finally:
        late.__exit__(None, None, None)  # the register commits
    t.join(30)
    assert not t.is_alive()
    assert sorted(r.key for r in result["moved"]) == ["log/1", "log/late"], result
    assert manifest.segment_by_id(first).node == NEW
    assert manifest.segments() and {s.node for s in manifest.segments()} == {NEW}


def test_leases_are_judged_by_the_manifests_lease_clock(manifest: Manifest) -> None:
    """No clock injected: the database's clock on PostgreSQL, the client's on SQLite. A lease
    taken now is live; once its expiry is in the past (moved back in the row), the rename goes."""
    _with_pending_parts(manifest, "log/1", OLD)
    with pytest.raises(SegmentBusyError, match="'log/1'"):
        manifest.rename_node(OLD, NEW, who="ops", why="renamed")
    seg = manifest.segment("log/1")
    assert seg is not None and seg.lease_expires is not None
    with manifest.engine.begin() as conn:
        conn.execute(
            update(SEGMENTS)
            .where(SEGMENTS.c.id == seg.id)
            .values(lease_expires=seg.lease_expires - timedelta(hours=1))
        )
    assert [r.key for r in manifest.rename_node(OLD, NEW, who="ops", why="renamed")] == ["log/1"]
