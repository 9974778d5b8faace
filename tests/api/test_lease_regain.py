"""A writer that lost its lease (paused past it: GC, SIGSTOP) takes it again when it is free and
goes on; while another process holds it, it says so and tries again later. Time is an injected
clock; the fence moves on every re-acquisition, so the old lease's writes stay refused."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from tests.api.conftest import PART
from uploader.digest import checksum
from uploader.errors import LeaseLostError, SegmentBusyError
from uploader.manifest.repo import Manifest, utcnow
from uploader.records import NewCommit
from uploader.states import SegmentState
from uploader.storage import open_storage
from uploader.store import Store
from uploader.watch import Watcher

#: Long enough that the real heartbeat (every third of it) never beats during a test: the
#: injected clock alone decides when the lease is lost.
LEASE = 300.0


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def env(
    manifest_url: str, at_head: None, tmp_path: Path
) -> Iterator[tuple[Store, Clock, Manifest]]:
    """A store on an injected clock, and a second manifest (another process) on the same clock."""
    clock = Clock()
    remote = tmp_path / "remote"
    remote.mkdir()
    store = Store(
        Manifest.open(manifest_url, clock=clock),
        open_storage(f"file://{remote}", min_part_size=PART),
        part_size=PART,
        node="n1",
        lease_seconds=LEASE,
    )
    other = Manifest.open(manifest_url, clock=clock)
    try:
        yield store, clock, other
    finally:
        store.close()
        other.close()


def data(n: int) -> bytes:
    return random.Random(n).randbytes(n)


def fences(m: Manifest, segment_id: int) -> list[int]:
    return sorted({e.fence for e in m.events(segment_id)})


@pytest.mark.parametrize("noticed", [True, False], ids=["heartbeat-noticed", "write-refused"])
def test_seal_after_the_lease_expired_takes_it_again(
    env: tuple[Store, Clock, Manifest], tmp_path: Path, noticed: bool
) -> None:
    store, clock, other = env
    path = tmp_path / "seg"
    path.write_bytes(data(PART + 100))
    seg = store.segment("regain/a", path)
    assert seg.commit().result(timeout=60).sent_parts == 1
    old = seg.lease
    clock.advance(LEASE + 1)  # paused past the lease; nobody took it
    if noticed:
        store.keeper.renew_now()  # the heartbeat finds it lost and forgets it
        assert store.keeper.get(old.segment_id) is None
    else:
        assert store.keeper.get(old.segment_id) is old  # the seal's write will be refused
    result = seg.seal().result(timeout=60)
    assert result.verified
    rec = other.segment("regain/a")
    assert rec is not None and rec.state is SegmentState.VERIFIED
    assert max(fences(other, rec.id)) == old.fence + 1  # re-acquired: a new fence
    # The old lease's late writes are refused.
    md5, crc = checksum(b"late")
    with pytest.raises(LeaseLostError):
        other.add_commits(old, [NewCommit(9, 0, 4, md5, crc)])


def test_a_lost_lease_held_by_another_is_reported_then_taken_back(
    env: tuple[Store, Clock, Manifest], tmp_path: Path
) -> None:
    store, clock, other = env
    path = tmp_path / "seg"
    path.write_bytes(data(PART + 7))
    seg = store.segment("regain/b", path)
    clock.advance(LEASE + 1)
    thief = other.acquire("regain/b", "thief", LEASE)  # e.g. a recovery worker
    with pytest.raises(SegmentBusyError, match="thief"):
        seg.seal().result(timeout=60)
    assert other.segment_by_id(thief.segment_id).state is SegmentState.OPEN  # not given up
    with pytest.raises(SegmentBusyError):
        store.segment("regain/b", path)  # never handed out without a live lease
    other.release(thief)
    again = store.segment("regain/b", path)
    assert again is seg and store.keeper.get(seg.lease.segment_id) is not None
    assert seg.lease.fence == thief.fence + 1
    assert seg.seal().result(timeout=60).verified


def test_watch_seals_a_rolled_file_after_a_pause_past_its_lease(
    env: tuple[Store, Clock, Manifest], tmp_path: Path
) -> None:
    store, clock, other = env
    d = tmp_path / "log"
    d.mkdir()
    first, second = d / "00000000000000000000", d / "00000000000000001000"
    first.write_bytes(data(PART + 10))
    w = Watcher(store, d, key_prefix="log/")
    assert w.tick().committed == {"log/00000000000000000000": PART}
    clock.advance(LEASE + 1)  # frozen past the lease ...
    thief = other.acquire("log/00000000000000000000", "recovery", LEASE)
    second.write_bytes(b"x")  # ... and meanwhile the file rolled
    busy = w.tick()  # another process holds it: reported, tried again next tick
    # The seal's write was refused, taking the lease back found the thief: the seal failed.
    assert busy.sealed == [] and [k for k, _ in busy.errors] == ["log/00000000000000000000"]
    assert w.tick().busy == ["log/00000000000000000000"]  # the store will not hand it out
    assert other.segment_by_id(thief.segment_id).state is SegmentState.OPEN
    other.release(thief)
    report = w.tick()
    assert report.sealed == ["log/00000000000000000000"], report
    rec = other.segment("log/00000000000000000000")
    assert rec is not None and rec.state is SegmentState.VERIFIED
    assert first.read_bytes() == (tmp_path / "remote" / "log" / first.name).read_bytes()


def test_watch_retries_a_seal_refused_for_a_lost_lease(
    env: tuple[Store, Clock, Manifest], tmp_path: Path
) -> None:
    store, clock, _other = env
    d = tmp_path / "log"
    d.mkdir()
    (d / "00000000000000000000").write_bytes(data(300))
    w = Watcher(store, d, key_prefix="log/")
    w.tick()
    clock.advance(LEASE + 1)
    (d / "00000000000000000001").write_bytes(b"y")
    report = w.tick()  # the seal's write is refused, the lease taken again, the seal retried
    assert report.sealed == ["log/00000000000000000000"], report
    assert report.errors == []


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "30"])
def test_lease_seconds_must_be_a_positive_number(tmp_path: Path, bad: object) -> None:
    import uploader
    from uploader.errors import UsageError

    with pytest.raises(UsageError, match="lease_seconds must be a positive number"):
        uploader.open(f"sqlite:///{tmp_path}/m.db", f"file://{tmp_path}", lease_seconds=bad)  # type: ignore[arg-type]
