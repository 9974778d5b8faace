"""Leases and fencing: exclusive claims across OS processes, expiry and takeover, renew, release,
and which node may claim what. On SQLite (one file) and PostgreSQL."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.conftest import md5
from uploader.digest import checksum
from uploader.errors import LeaseLostError, SegmentBusyError, UsageError
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import COMMITS as C
from uploader.manifest.rowmap import EVENTS as E
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.records import Lease, NewCommit
from uploader.states import CommitState, SegmentState

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2031, 6, 1, 8, 0, 0)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def part(number: int, start: int, size: int = 4) -> NewCommit:
    data = bytes([number % 256]) * size
    md5, crc = checksum(data)
    return NewCommit(number, start, start + size, md5, crc)


def snapshot(m: Manifest) -> tuple[Any, ...]:
    with m.engine.connect() as conn:
        return (
            [tuple(r) for r in conn.execute(select(S).order_by(S.c.id))],
            [tuple(r) for r in conn.execute(select(C).order_by(C.c.id))],
            [tuple(r) for r in conn.execute(select(E).order_by(E.c.id))],
        )


# --- several processes claiming at once ---------------------------------------------------------

WORKERS = 4
SEGMENTS = 2
SECONDS = 2.0


def test_processes_never_hold_the_same_segment_at_once(manifest: Manifest, tmp_path: Path) -> None:
    url = manifest.engine.url.render_as_string(hide_password=False)
    ids = []
    for i in range(SEGMENTS):
        seg = manifest.register(f"race/{i}", f"/data/race/{i}", node="n1", part_size=4, worker="t")
        lease = manifest.acquire(seg.key, "setup", ttl=60)
        manifest.add_commits(lease, [part(1, 0)])  # a pending part: claimable on n1
        assert manifest.release(lease)
        ids.append(seg.id)

    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.manifest.lease_worker",
                url,
                f"worker-{n}",
                "n1",
                str(go),
                str(SECONDS),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(WORKERS)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", (line, p.stderr.read() if p.stderr else "")
        go.touch()
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    holds = [h for r in results for h in r["holds"]]
    assert all(h["released"] for h in holds), "a holder lost its lease while holding it"
    # Real contention, or the test proves nothing: several owners, and claims that found every
    # segment held by someone else.
    assert len({h["owner"] for h in holds}) >= 2
    assert sum(r["empty"] for r in results) > 0

    by_segment: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for h in holds:
        by_segment[h["segment"]].append(h)
    assert set(by_segment) <= set(ids)
    for seg_id, seg_holds in by_segment.items():
        seg_holds.sort(key=lambda h: h["start"])
        # Time windows of holders of one segment never overlap, and each claim got a new fence.
        for a, b in itertools.pairwise(seg_holds):
            assert a["end"] <= b["start"], f"segment {seg_id}: {a} overlaps {b}"
            assert a["fence"] < b["fence"]
        fences = [h["fence"] for h in seg_holds]
        # Every claim incremented the fence exactly once: no two claims got the same token.
        seg = manifest.segment_by_id(seg_id)
        assert fences == list(range(2, 2 + len(fences)))
        assert seg.fence == 1 + len(fences)
        assert seg.lease_owner is None  # every holder released it

        # The guarded read-modify-writes formed one unbroken chain: no lost or doubled append.
        commits = manifest.commits(seg_id)
        assert [c.part_number for c in commits] == list(range(1, len(commits) + 1))
        assert all(c.start == 4 * (c.part_number - 1) and c.size == 4 for c in commits)
        appended = sorted(p for h in seg_holds for p in h["parts"])
        assert appended == list(range(2, len(commits) + 1))
        # The audit trail: each part's event carries the fence and owner of the hold that wrote it,
        # and in event order the fences never go back (holds did not interleave).
        owner_of = {h["fence"]: h["owner"] for h in seg_holds}
        part_events = [e for e in manifest.events(seg_id) if e.commit_id is not None]
        assert len(part_events) == len(commits)
        trail = [e.fence for e in part_events[1:]]
        assert trail == sorted(trail)
        for e in part_events[1:]:
            assert e.worker == owner_of[e.fence]
        for h in seg_holds:
            assert trail.count(h["fence"]) == len(h["parts"])


# --- expiry and takeover -------------------------------------------------------------------------


@pytest.fixture
def two_workers(manifest: Manifest) -> Iterator[tuple[Manifest, Manifest, Clock]]:
    """Two workers (own engines, one database), sharing an injected clock."""
    clock = Clock()
    url = manifest.engine.url.render_as_string(hide_password=False)
    a = Manifest.open(url, clock=clock)
    b = Manifest.open(url, clock=clock)
    yield a, b, clock
    a.close()
    b.close()


def test_expired_lease_is_taken_over_and_old_writes_are_refused(
    two_workers: tuple[Manifest, Manifest, Clock],
) -> None:
    a, b, clock = two_workers
    seg = a.register("take/1", "/data/take/1", node="n1", part_size=4, worker="a")
    old = a.acquire(seg.key, "a", ttl=10)
    [c1] = a.add_commits(old, [part(1, 0)])
    a.commit_uploaded(old, c1, md5(c1))
    a.add_commits(old, [part(2, 4)])

    clock.advance(5)
    with pytest.raises(SegmentBusyError, match=r"take/1.*leased by a"):
        b.acquire(seg.key, "b", ttl=10)
    assert b.claim_next("b", node="n1", ttl=10) is None  # held and not expired

    clock.advance(6)  # past a's expiry: not yet taken over, still refused
    before = snapshot(a)
    with pytest.raises(LeaseLostError, match="expired"):
        a.add_commits(old, [part(3, 8)])
    with pytest.raises(LeaseLostError):
        a.renew(old)
    assert snapshot(a) == before

    claimed = b.claim_next("b", node="n1", ttl=10)
    assert claimed is not None
    new, seg_b = claimed
    assert (new.segment_id, new.fence, new.owner) == (seg.id, old.fence + 1, "b")
    assert seg_b.lease_owner == "b"

    commits = a.commits(seg.id)
    before = snapshot(a)
    writes: dict[str, Callable[[], object]] = {
        "add_commits": lambda: a.add_commits(old, [part(3, 8)]),
        "seal": lambda: a.seal(
            old, [], size=8, crc32c=1, expected_etag="x" * 32, upload_mode="multipart"
        ),
        "transition_segment": lambda: a.transition_segment(old, "open", "failed", reason="r"),
        "transition_commit": lambda: a.transition_commit(
            old, commits[1].id, "pending", "uploaded", etag=commits[1].md5
        ),
        "commit_uploaded": lambda: a.commit_uploaded(old, commits[1], md5(commits[1])),
        "commit_attempt_failed": lambda: a.commit_attempt_failed(old, commits[1], "boom"),
        "record_error": lambda: a.record_error(old, "boom"),
        "set_upload": lambda: a.set_upload(old, "upload-x"),
        "reset_commits": lambda: a.reset_commits(old, "gone"),
        "fail_segment": lambda: a.fail_segment(old, "gone"),
        "renew": lambda: a.renew(old, ttl=100),
    }
    for name, write in writes.items():
        with pytest.raises(LeaseLostError) as info:
            write()
        assert "take/1" in str(info.value), name
        assert (info.value.token, info.value.current) == (old.fence, new.fence), name
        assert snapshot(a) == before, f"{name} by the old holder changed the manifest"
    assert a.release(old) is False  # not ours any more: nothing happens
    assert snapshot(a) == before

    # The new holder is unaffected and can do all of it.
    b.add_commits(new, [part(3, 8)])
    assert [c.state for c in b.commits(seg.id)] == [
        CommitState.UPLOADED,
        CommitState.PENDING,
        CommitState.PENDING,
    ]
    assert b.segment_by_id(seg.id).lease_owner == "b"


def test_old_holder_cannot_move_a_sealed_segment(
    two_workers: tuple[Manifest, Manifest, Clock],
) -> None:
    a, b, clock = two_workers
    seg = a.register("take/2", "/data/take/2", node="n1", part_size=4, worker="a")
    old = a.acquire(seg.key, "a", ttl=10)
    a.seal(old, [part(1, 0)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    [c] = a.commits(seg.id)
    a.commit_uploaded(old, c, md5(c))
    a.segment_uploaded(old, "e" * 32)
    clock.advance(11)
    new = b.acquire(seg.key, "b", ttl=10)
    before = snapshot(a)
    refused: list[Callable[[], object]] = [
        lambda: a.segment_verified(old, "ok"),
        lambda: a.reupload(old, "mismatch"),
        lambda: a.transition_segment(old, "uploaded", "verified"),
        lambda: a.fail_segment(old, "gone"),
    ]
    for write in refused:
        with pytest.raises(LeaseLostError):
            write()
        assert snapshot(a) == before
    b.segment_verified(new, "ok")
    assert b.segment_by_id(seg.id).state is SegmentState.VERIFIED


def test_tiny_ttl_expires_in_real_time(manifest: Manifest) -> None:
    seg = manifest.register("ttl/1", "/data/ttl/1", node="n1", part_size=4, worker="w")
    # Long enough that a loaded machine still sees it held; then waited out on the database's
    # own clock (polled: the expiry is the event, there is no clock to inject here).
    old = manifest.acquire(seg.key, "a", ttl=1.0)
    manifest.add_commits(old, [part(1, 0)])
    with pytest.raises(SegmentBusyError):
        manifest.acquire(seg.key, "b", ttl=1.0)
    deadline = time.monotonic() + 30
    while (claimed := manifest.claim_next("b", node="n1", ttl=30)) is None:
        assert time.monotonic() < deadline, "a 1 s lease was still held after 30 s"
        time.sleep(0.05)
    assert claimed[0].fence == old.fence + 1
    with pytest.raises(LeaseLostError):
        manifest.add_commits(old, [part(2, 4)])
    assert len(manifest.commits(seg.id)) == 1


def test_renew_extends_the_lease(two_workers: tuple[Manifest, Manifest, Clock]) -> None:
    a, b, clock = two_workers
    seg = a.register("renew/1", "/data/renew/1", node="n1", part_size=4, worker="a")
    lease = a.acquire(seg.key, "a", ttl=10)
    assert lease.expires == T0 + timedelta(seconds=10)
    clock.advance(8)
    renewed = a.renew(lease, ttl=10)
    assert (renewed.fence, renewed.owner) == (lease.fence, "a")  # same token, later expiry
    assert renewed.expires == T0 + timedelta(seconds=18)
    assert a.segment_by_id(seg.id).lease_expires == renewed.expires

    clock.advance(7)  # 15 s: past the first expiry, within the renewed one
    a.add_commits(lease, [part(1, 0)])  # the old Lease object still carries the current fence
    with pytest.raises(SegmentBusyError):
        b.acquire(seg.key, "b")
    assert b.claim_next("b", node="n1") is None

    clock.advance(4)  # 19 s: expired
    with pytest.raises(LeaseLostError, match="expired"):
        a.renew(renewed)
    taken = b.acquire(seg.key, "b", ttl=10)
    assert taken.fence == lease.fence + 1


def test_release_frees_the_segment_and_fences_the_releaser(manifest: Manifest) -> None:
    seg = manifest.register("rel/1", "/data/rel/1", node="n1", part_size=4, worker="w")
    lease = manifest.acquire(seg.key, "a")
    manifest.add_commits(lease, [part(1, 0)])
    assert manifest.release(lease) is True
    row = manifest.segment_by_id(seg.id)
    assert (row.lease_owner, row.lease_expires, row.fence) == (None, None, lease.fence)
    assert manifest.release(lease) is False  # twice: no error, nothing to give back
    with pytest.raises(LeaseLostError):
        manifest.add_commits(lease, [part(2, 4)])  # a released lease writes nothing
    # Free at once for anyone, with a new token.
    other = manifest.acquire(seg.key, "b")
    assert other.fence == lease.fence + 1
    assert manifest.release(lease) is False
    assert manifest.segment_by_id(seg.id).lease_owner == "b"


def test_reacquiring_our_own_lease_fences_the_older_token(manifest: Manifest) -> None:
    seg = manifest.register("own/1", "/data/own/1", node="n1", part_size=4, worker="w")
    first = manifest.acquire(seg.key, "a")
    second = manifest.acquire(seg.key, "a")
    assert second.fence == first.fence + 1
    with pytest.raises(LeaseLostError):
        manifest.add_commits(first, [part(1, 0)])
    manifest.add_commits(second, [part(1, 0)])


def test_acquire_unknown_segment(manifest: Manifest) -> None:
    with pytest.raises(UsageError, match="nope/1"):
        manifest.acquire("nope/1", "a")


# --- node affinity -------------------------------------------------------------------------------


def _claimable(m: Manifest, node: str) -> list[str]:
    """Keys ``node`` can claim, in order (claims and releases each one)."""
    keys: list[str] = []
    after = 0
    while (got := m.claim_next(f"probe-{node}", node=node, ttl=30, after_id=after)) is not None:
        lease, seg = got
        keys.append(seg.key)
        assert m.release(lease)
        after = seg.id
    return keys


def test_claim_next_respects_node_affinity(manifest: Manifest) -> None:
    m = manifest

    def seg_with(key: str, node: str) -> Lease:
        m.register(key, f"/data/{key}", node=node, part_size=4, worker="w")
        return m.acquire(key, "setup")

    # open, no parts at all: nothing to do anywhere
    m.release(seg_with("a-open-empty", "n1"))
    # open with a pending part: only its node has the bytes
    lease = seg_with("b-open-pending", "n1")
    m.add_commits(lease, [part(1, 0)])
    m.release(lease)
    # open, every part uploaded: nothing to do until it is sealed
    lease = seg_with("c-open-uploaded", "n1")
    [c] = m.add_commits(lease, [part(1, 0)])
    m.commit_uploaded(lease, c, md5(c))
    m.release(lease)
    # sealed with a pending part: needs the local bytes
    lease = seg_with("d-sealed-pending", "n1")
    m.seal(lease, [part(1, 0)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    m.release(lease)
    # sealed, all parts uploaded: completing needs no local bytes, any node may
    lease = seg_with("e-sealed-uploaded", "n1")
    [c] = m.seal(lease, [part(1, 0)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    m.commit_uploaded(lease, c, md5(c))
    m.release(lease)
    # uploaded: verifying reads every local byte again: only its node may
    lease = seg_with("f-uploaded", "n1")
    [c] = m.seal(lease, [part(1, 0)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    m.commit_uploaded(lease, c, md5(c))
    m.segment_uploaded(lease, "e" * 32)
    m.release(lease)
    # verified and failed: finished, nobody claims them
    lease = seg_with("g-verified", "n1")
    [c] = m.seal(lease, [part(1, 0)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put")
    m.commit_uploaded(lease, c, md5(c))
    m.segment_uploaded(lease, "e" * 32)
    m.segment_verified(lease, "ok")
    m.release(lease)
    lease = seg_with("h-failed", "n1")
    m.add_commits(lease, [part(1, 0)])
    m.fail_segment(lease, "local file vanished")
    m.release(lease)
    # a pending part on another node
    lease = seg_with("i-open-pending-n2", "n2")
    m.add_commits(lease, [part(1, 0)])
    m.release(lease)

    assert _claimable(m, "n1") == [
        "b-open-pending",
        "d-sealed-pending",
        "e-sealed-uploaded",
        "f-uploaded",
    ]
    assert _claimable(m, "n2") == ["e-sealed-uploaded", "i-open-pending-n2"]
    assert _claimable(m, "n3") == ["e-sealed-uploaded"]


def test_claim_next_skips_held_segments_and_takes_expired_ones(
    two_workers: tuple[Manifest, Manifest, Clock],
) -> None:
    a, b, clock = two_workers
    for key in ("s/1", "s/2"):
        a.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
        lease = a.acquire(key, "setup")
        a.add_commits(lease, [part(1, 0)])
        a.release(lease)
    first = a.claim_next("a", node="n1", ttl=10)
    second = b.claim_next("b", node="n1", ttl=10)
    assert first is not None and second is not None
    assert (first[1].key, second[1].key) == ("s/1", "s/2")
    assert a.claim_next("c", node="n1", ttl=10) is None
    clock.advance(10)  # exactly at expiry: not yet free
    assert a.claim_next("c", node="n1", ttl=10) is None
    clock.advance(1)
    third = a.claim_next("c", node="n1", ttl=10)
    assert third is not None
    assert (third[1].key, third[0].fence) == ("s/1", first[0].fence + 1)
    with a.engine.connect() as conn:
        owners = dict(conn.execute(select(S.c.key, S.c.lease_owner)).all())
        assert conn.execute(select(func.count()).select_from(E)).scalar_one() == 4
    assert owners == {"s/1": "c", "s/2": "b"}
