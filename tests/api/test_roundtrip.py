"""Byte-for-byte round trips through commit and seal, around the part boundaries."""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory, append, remote_bytes, visible_keys
from uploader import CommitState, SegmentState

SIZES = [0, 1, PART - 1, PART, PART + 1, 3 * PART + 17]


@pytest.mark.parametrize("size", SIZES)
def test_remote_equals_local_after_random_commits(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    tmp_path: Path,
    size: int,
) -> None:
    rng = random.Random(size)
    data = rng.randbytes(size)
    # Random commit points: the file grows between commits the way a broker appends.
    points = sorted({0, size, *(rng.randrange(size + 1) for _ in range(3))})
    path = tmp_path / "seg"
    path.write_bytes(b"")
    key = f"log/{size:08d}"
    with make_store() as store:
        seg = store.segment(key, path)
        committed = 0
        for a, b in itertools.pairwise(points):
            append(path, data[a:b])
            result = seg.commit().result(timeout=60)
            assert result.committed % PART == 0
            assert result.committed + result.carried_bytes == b
            assert result.committed >= committed
            committed = result.committed
            # Invariant 4: nothing at the key before the seal completes it.
            assert remote_bytes(remote, key) is None
            assert visible_keys(remote) == []
        assert (path.stat().st_size) == size
        sealed = seg.seal().result(timeout=60)
        assert sealed.sealed and sealed.verified
        assert sealed.committed == size
        assert remote_bytes(remote, key) == data
        assert visible_keys(remote) == [key]

        record = store.manifest.segment(key)
        assert record is not None
        assert record.state is SegmentState.VERIFIED
        assert record.size == size
        commits = store.manifest.commits(record.id)
        assert commits, "even an empty segment has one (empty) commit"
        assert {c.state for c in commits} == {CommitState.VERIFIED}
        assert sum(c.size for c in commits) == size
        assert [s.key for s in store.deletable()] == [key]
        assert store.status().all_verified
        # Intent before action: every commit's first event is its pending row.
        events = store.manifest.events(record.id)
        for c in commits:
            mine = [e.to_state for e in events if e.commit_id == c.id]
            assert mine[0] == "pending"
            assert mine[-1] == "verified"
        assert store.storage.list_uploads() == []


def test_commit_sends_only_whole_parts_and_reports_the_carry(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"x" * (2 * PART + 10))
    with make_store() as store:
        seg = store.segment("log/carry", path)
        first = seg.commit().result(timeout=60)
        assert (first.sent_parts, first.sent_bytes, first.carried_bytes) == (2, 2 * PART, 10)
        again = seg.commit().result(timeout=60)  # nothing new: nothing sent
        assert (again.sent_parts, again.sent_bytes, again.carried_bytes) == (0, 0, 10)
        final = seg.seal().result(timeout=60)
        assert (final.sent_parts, final.sent_bytes, final.carried_bytes) == (1, 10, 0)
    assert remote_bytes(remote, "log/carry") == b"x" * (2 * PART + 10)


def test_many_segments_in_parallel(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    rng = random.Random(7)
    blobs = {
        f"par/{i:03d}": rng.randbytes(rng.choice([0, 5, PART, 2 * PART + 3])) for i in range(8)
    }
    with make_store(concurrency=3) as store:
        futures = []
        for key, blob in blobs.items():
            path = tmp_path / key.replace("/", "_")
            path.write_bytes(blob)
            futures.append(store.segment(key, path).seal())
        for fut in futures:
            assert fut.result(timeout=120).verified
    for key, blob in blobs.items():
        assert remote_bytes(remote, key) == blob


def test_commits_fired_without_waiting_send_each_part_once(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """Commits overlap on the network (the next records while the previous sends); still every
    part is sent exactly once and the seal waits for all of them."""
    data = random.Random(11).randbytes(6 * PART + 5)
    path = tmp_path / "seg"
    path.write_bytes(b"")
    with make_store(concurrency=4) as store:
        seg = store.segment("log/pipelined", path)
        futures = []
        for i in range(6):
            append(path, data[i * PART : (i + 1) * PART])
            futures.append(seg.commit())
        append(path, data[6 * PART :])
        sealed = seg.seal()
        results = [f.result(timeout=60) for f in futures]
        final = sealed.result(timeout=60)
        assert final.verified
        record = store.manifest.segment("log/pipelined")
        assert record is not None
        events = store.manifest.events(record.id)
    assert sum(r.sent_parts for r in results) + final.sent_parts == 7
    uploads = [e for e in events if e.from_state == "pending" and e.to_state == "uploaded"]
    assert len(uploads) == 7 and len({e.commit_id for e in uploads}) == 7
    assert remote_bytes(remote, "log/pipelined") == data
