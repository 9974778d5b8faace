"""``Manifest.retry_failed``: the one way out of ``failed``, guarded and audited (SQLite, PostgreSQL)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest

from tests.conftest import md5
from uploader.digest import checksum, multipart_etag
from uploader.errors import InvalidStateError, LeaseLostError, SegmentBusyError, UsageError
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit
from uploader.states import CommitState, SegmentState


def _part(number: int, data: bytes, start: int) -> NewCommit:
    md5, crc = checksum(data)
    return NewCommit(number, start, start + len(data), md5, crc)


def _sealed_then_failed(manifest: Manifest, key: str) -> int:
    seg = manifest.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
    lease = manifest.acquire(key, "w")
    [first] = manifest.add_commits(lease, [_part(1, b"abcd", 0)])
    manifest.commit_uploaded(lease, first, md5(first))
    final = _part(2, b"ef", 4)
    manifest.seal(
        lease,
        [final],
        size=6,
        crc32c=checksum(b"abcdef")[1],
        expected_etag=multipart_etag([md5(first), md5(final)]),
        upload_mode="multipart",
    )
    manifest.fail_segment(lease, "local bytes unusable: file missing")
    manifest.release(lease)
    return seg.id


def test_retry_of_a_sealed_segment_goes_back_to_sealed_with_parts_pending(
    manifest: Manifest,
) -> None:
    seg_id = _sealed_then_failed(manifest, "log/1")
    before = manifest.segment_by_id(seg_id)
    assert before.state is SegmentState.FAILED

    after = manifest.retry_failed(
        "log/1", who="alice@host", why="file restored from backup", identity=(7, 99)
    )
    assert after.state is SegmentState.SEALED
    assert after.reason is None
    assert (after.size, after.crc32c, after.expected_etag) == (
        before.size,
        before.crc32c,
        before.expected_etag,
    )  # the seal's checksums are kept: the bytes must still be those
    assert after.fence == before.fence + 1
    assert after.lease_owner is None
    assert (after.file_device, after.file_inode) == (7, 99)
    assert {c.state for c in manifest.commits(seg_id)} == {CommitState.PENDING}
    assert all(c.etag is None for c in manifest.commits(seg_id))

    retried = [e for e in manifest.events(seg_id) if e.from_state == "failed"]
    assert [(e.commit_id is None, e.to_state) for e in retried] == [
        (True, "sealed"),
        (False, "pending"),
        (False, "pending"),
    ]
    assert all(e.worker == "alice@host" for e in retried)
    assert "file restored from backup" in (retried[0].detail or "")
    assert "file missing" in (retried[0].detail or "")  # what it had failed of
    assert "inode" in (retried[0].detail or "")
    assert manifest.status().failed == ()

    # Not failed any more: a second retry is refused, and so is a stale lease's write.
    with pytest.raises(InvalidStateError, match="not failed"):
        manifest.retry_failed("log/1", who="bob", why="again")


def test_retry_of_a_segment_never_sealed_goes_back_to_open(manifest: Manifest) -> None:
    seg = manifest.register("log/2", "/data/2", node="n1", part_size=4, worker="w")
    lease = manifest.acquire("log/2", "w")
    manifest.add_commits(lease, [_part(1, b"abcd", 0)])
    manifest.fail_segment(lease, "local file shrank")
    manifest.release(lease)
    after = manifest.retry_failed("log/2", who="ops", why="fixed")
    assert after.state is SegmentState.OPEN
    assert [c.state for c in manifest.commits(seg.id)] == [CommitState.PENDING]
    # The fence moved on: the worker that failed it can write nothing more.
    with pytest.raises(LeaseLostError):
        manifest.add_commits(lease, [_part(2, b"efgh", 4)])


def test_retry_refuses_a_leased_segment_an_unknown_key_and_no_reason(manifest: Manifest) -> None:
    _sealed_then_failed(manifest, "log/3")
    manifest.acquire("log/3", "other", ttl=60)
    with pytest.raises(SegmentBusyError, match="leased by other"):
        manifest.retry_failed("log/3", who="ops", why="fixed")
    with pytest.raises(UsageError, match="not in the manifest"):
        manifest.retry_failed("log/nope", who="ops", why="fixed")
    with pytest.raises(UsageError, match="reason"):
        manifest.retry_failed("log/3", who="ops", why="  ")


def test_retry_takes_an_expired_lease(manifest: Manifest) -> None:
    _sealed_then_failed(manifest, "log/4")
    manifest.acquire("log/4", "dead", ttl=60)
    later = manifest.clock() + timedelta(seconds=120)
    manifest.clock = lambda: later
    assert manifest.retry_failed("log/4", who="ops", why="fixed").state is SegmentState.SEALED
    assert manifest.failed_keys() == []


def test_retry_refuses_a_name_the_audit_cannot_hold_and_the_cli_name_fits(
    manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit row's worker column holds 255 characters: a longer ``who`` is refused before
    anything is written (PostgreSQL would refuse it mid-transaction), and the CLI's own name
    (``user@host (pid N)``) is cut to fit, keeping the pid."""
    from uploader.cli.app import caller_name

    seg_id = _sealed_then_failed(manifest, "log/5")
    with pytest.raises(UsageError, match="256 characters; the manifest holds at most 255"):
        manifest.retry_failed("log/5", who="o" * 256, why="fixed")
    assert manifest.segment_by_id(seg_id).state is SegmentState.FAILED
    monkeypatch.setenv("LOGNAME", "u" * 300)
    monkeypatch.setenv("USER", "u" * 300)
    who = caller_name()
    assert len(who) == 255 and who.endswith(f" (pid {os.getpid()})"), who
    manifest.retry_failed("log/5", who=who, why="fixed")
    assert manifest.segment_by_id(seg_id).state is not SegmentState.FAILED
    assert manifest.events(seg_id)[-1].worker == who
