"""The happy path of one segment through the manifest, on SQLite and PostgreSQL."""

from __future__ import annotations

from tests.conftest import md5
from uploader.digest import checksum, multipart_etag
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit
from uploader.states import CommitState, SegmentState


def _part(number: int, data: bytes, start: int) -> NewCommit:
    md5, crc = checksum(data)
    return NewCommit(number, start, start + len(data), md5, crc)


def test_segment_lifecycle_records_every_transition(manifest: Manifest) -> None:
    seg = manifest.register("log/0001", "/data/0001", node="n1", part_size=4, worker="w")
    assert seg.state is SegmentState.OPEN
    lease = manifest.acquire("log/0001", "w")
    assert lease.fence == 1

    first = manifest.add_commits(lease, [_part(1, b"abcd", 0)])
    assert [c.state for c in first] == [CommitState.PENDING]
    manifest.commit_uploaded(lease, first[0], md5(first[0]))

    final = _part(2, b"ef", 4)
    md5s = [md5(first[0]), md5(final)]
    commits = manifest.seal(
        lease,
        [final],
        size=6,
        crc32c=checksum(b"abcdef")[1],
        expected_etag=multipart_etag(md5s),
        upload_mode="multipart",
    )
    assert [c.state for c in commits] == [CommitState.UPLOADED, CommitState.PENDING]
    manifest.commit_uploaded(lease, commits[1], md5(commits[1]))
    manifest.segment_uploaded(lease, multipart_etag(md5s))
    manifest.segment_verified(lease, "size and etag match")

    done = manifest.segment("log/0001")
    assert done is not None
    assert done.state is SegmentState.VERIFIED
    assert done.size == 6
    assert {c.state for c in manifest.commits(done.id)} == {CommitState.VERIFIED}
    transitions = [(e.from_state, e.to_state) for e in manifest.events(done.id)]
    assert transitions[0] == (None, "open")
    assert ("open", "sealed") in transitions
    assert ("sealed", "uploaded") in transitions
    assert transitions.count(("uploaded", "verified")) == 3  # two commits and the segment
    assert [s.key for s in manifest.deletable()] == ["log/0001"]
    assert manifest.status().all_verified


def test_progress_and_pending_parts_are_read_without_the_whole_part_list(
    manifest: Manifest,
) -> None:
    seg = manifest.register("log/0002", "/data/0002", node="n1", part_size=4, worker="w")
    lease = manifest.acquire("log/0002", "w")
    empty = manifest.progress(seg.id)
    assert (empty.segment.key, empty.committed, empty.parts) == ("log/0002", 0, 0)
    assert manifest.pending_commits(seg.id) == []

    first, second, third = manifest.add_commits(
        lease, [_part(1, b"abcd", 0), _part(2, b"efgh", 4), _part(3, b"ijkl", 8)]
    )
    manifest.commit_uploaded(lease, second, md5(second))
    progress = manifest.progress(seg.id)
    assert (progress.committed, progress.parts) == (12, 3)
    assert progress.segment.state is SegmentState.OPEN
    assert [c.part_number for c in manifest.pending_commits(seg.id)] == [1, 3]
    assert {c.id for c in manifest.pending_commits(seg.id)} == {first.id, third.id}
