"""Fast takeover on the same node: a lease names its holder process (node, pid, start time, pid
space); a worker on the same node whose holder process is gone takes the lease at once, a live
holder or one on another node keeps it until it expires. On SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from uploader import holders
from uploader.digest import checksum
from uploader.errors import LeaseLostError, SegmentBusyError
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.records import NewCommit

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2031, 6, 1, 8, 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def part(number: int, start: int, size: int = 4) -> NewCommit:
    md5, crc = checksum(bytes([number]) * size)
    return NewCommit(number, start, start + size, md5, crc)


def held_by_a_dead_process(m: Manifest, key: str, node: str) -> int:
    """A child process acquires ``key``'s lease on ``node`` (60 s) and exits; its pid."""
    url = m.engine.url.render_as_string(hide_password=False)
    code = (
        "import os, sys\n"
        "from uploader.manifest.repo import Manifest\n"
        "m = Manifest.open(sys.argv[1])\n"
        "m.acquire(sys.argv[2], f'dead:{os.getpid()}', 60, node=sys.argv[3])\n"
        "m.close()\n"
        "print(os.getpid())\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, url, key, node],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(res.stdout.strip())  # run() reaped it: no such process any more


def register(m: Manifest, key: str) -> None:
    m.register(key, f"/data/{key}", node="n1", part_size=4, worker="setup")


def test_a_dead_holder_on_this_node_is_taken_over_at_once(
    manifest: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    register(manifest, "t/dead")
    pid = held_by_a_dead_process(manifest, "t/dead", "n1")
    before = manifest.segment("t/dead")
    assert before is not None and before.lease_owner == f"dead:{pid}"
    with caplog.at_level(logging.INFO, logger="uploader"):
        lease = manifest.acquire("t/dead", "heir", 30, node="n1")
    assert lease.owner == "heir" and lease.fence == before.fence + 1
    assert any(
        "t/dead" in r.message and f"pid {pid}" in r.message and r.levelno == logging.INFO
        for r in caplog.records
    ), caplog.text
    # The heir's lease names this process; the dead holder's late writes are refused.
    after = manifest.segment_by_id(lease.segment_id)
    assert after.lease_owner == "heir"
    dead = type(lease)(lease.segment_id, lease.key, f"dead:{pid}", before.fence, lease.expires)
    with pytest.raises(LeaseLostError):
        manifest.add_commits(dead, [part(1, 0)])


def test_a_live_holder_keeps_its_lease(manifest: Manifest) -> None:
    register(manifest, "t/live")
    mine = manifest.acquire("t/live", "alive", 30, node="n1")  # this (live) process holds it
    with pytest.raises(SegmentBusyError):
        manifest.acquire("t/live", "heir", 30, node="n1")
    manifest.renew(mine, 30)  # still the holder's


def test_a_reused_pid_is_a_dead_holder(manifest: Manifest) -> None:
    register(manifest, "t/reused")
    lease = manifest.acquire("t/reused", "old", 30, node="n1")
    me = holders.this_process()
    assert me is not None
    # The recorded holder has this live pid but started at another time: the pid was reused.
    with manifest.engine.begin() as conn:
        conn.execute(
            update(S).where(S.c.id == lease.segment_id).values(lease_started=me.started - 1)
        )
    taken = manifest.acquire("t/reused", "heir", 30, node="n1")
    assert taken.fence == lease.fence + 1


def test_another_node_or_pid_space_waits_for_expiry(manifest: Manifest) -> None:
    clock = Clock()
    m = Manifest(manifest.engine, clock=clock)  # client clock: time travel
    register(m, "t/far")
    register(m, "t/ns")
    # Both holders are dead processes, but not ones this worker can judge.
    far = m.acquire("t/far", "remote", 30, node="n2")
    ns = m.acquire("t/ns", "container", 30, node="n1")
    with m.engine.begin() as conn:
        conn.execute(
            update(S)
            .where(S.c.id.in_([far.segment_id, ns.segment_id]))
            .values(lease_pid=_dead_pid())
        )
        conn.execute(
            update(S).where(S.c.id == ns.segment_id).values(lease_pid_space="other-boot/pid:[1]")
        )
    for key in ("t/far", "t/ns"):
        with pytest.raises(SegmentBusyError):
            m.acquire(key, "heir", 30, node="n1")
    clock.now += timedelta(seconds=31)  # expired: anyone may take it
    for key in ("t/far", "t/ns"):
        assert m.acquire(key, "heir", 30, node="n1").owner == "heir"


def test_a_lease_naming_no_process_waits_for_expiry(manifest: Manifest) -> None:
    register(manifest, "t/old")
    manifest.acquire("t/old", "old-client", 30)  # no node: a client from before 0005
    with pytest.raises(SegmentBusyError):
        manifest.acquire("t/old", "heir", 30, node="n1")


def test_recovery_claims_a_dead_holders_segment_at_once(
    manifest: Manifest, caplog: pytest.LogCaptureFixture
) -> None:
    for key in ("c/dead", "c/live"):
        register(manifest, key)
        lease = manifest.acquire(key, "setup", 30)
        manifest.add_commits(lease, [part(1, 0)])  # a pending part: claimable on n1
        manifest.release(lease)
    held_by_a_dead_process(manifest, "c/dead", "n1")
    manifest.acquire("c/live", "alive", 30, node="n1")
    with caplog.at_level(logging.INFO, logger="uploader"):
        claimed = manifest.claim("worker", node="n1", limit=10)
    assert [seg.key for _, seg in claimed] == ["c/dead"]
    assert "c/dead" in caplog.text and "takes the lease over" in caplog.text


def _dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    pid = int(proc.stdout)
    assert not os.path.exists(f"/proc/{pid}")
    return pid


# --- the process check itself --------------------------------------------------------------------


def test_gone_tells_live_dead_zombie_and_reused() -> None:
    me = holders.this_process()
    assert me is not None
    assert not holders.gone(me.pid, me.started, me.space)  # alive
    assert holders.gone(me.pid, me.started + 1, me.space)  # the pid reused
    assert not holders.gone(me.pid, me.started + 1, "another/boot")  # cannot judge: alive
    assert not holders.gone(None, None, None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = holders._stat(child.pid)
        assert started is not None
        assert not holders.gone(child.pid, started[1], me.space)
        child.kill()
        # Killed but not reaped yet: a zombie holds nothing.
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
        assert holders.gone(child.pid, started[1], me.space)
    finally:
        child.kill()
        child.wait()
    assert holders.gone(child.pid, started[1], me.space)  # reaped: no such process


def test_leases_of_dead_holders_on_this_node_are_not_reported_as_held(manifest: Manifest) -> None:
    """``recover`` names work another process holds; a dead holder on this node holds nothing
    (any process here takes it over at once), so it is left out there; elsewhere it is listed."""
    register(manifest, "t/dead-report")
    register(manifest, "t/live-report")
    pid = held_by_a_dead_process(manifest, "t/dead-report", "n1")
    manifest.acquire("t/live-report", "alive", 30, node="n1")
    everyone = manifest.leased_unfinished()
    assert {(k, o) for k, o, _ in everyone} == {
        ("t/dead-report", f"dead:{pid}"),
        ("t/live-report", "alive"),
    }
    here = manifest.leased_unfinished(node="n1")
    assert [k for k, _, _ in here] == ["t/live-report"]
    elsewhere = manifest.leased_unfinished(node="n2")
    assert sorted(k for k, _, _ in elsewhere) == ["t/dead-report", "t/live-report"]
