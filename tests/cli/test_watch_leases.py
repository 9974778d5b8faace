"""``uploader watch`` and its leases, in real processes: frozen (SIGSTOP) past its lease it takes
the lease again and seals the file that rolled meanwhile; its shutdown with ``--seal-on-exit``
seals the newest file and waits for it to be verified; ``--once`` says when a pass failed."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.cli.conftest import Run, uploader_cmd, uploader_env
from tests.cli.test_lifecycle import _read_until
from tests.cli.test_watch import _wait_for
from tests.conftest import TEST_MIN_PART_SIZE

PART = TEST_MIN_PART_SIZE
SIZES = ("--part-size", str(PART), "--min-part-size", str(PART))


def row(home: Path, key: str) -> dict[str, Any] | None:
    db = home / "manifest.db"
    if not db.exists():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            conn.row_factory = sqlite3.Row
            r = conn.execute(
                "SELECT s.state, s.fence, s.lease_expires, s.lease_pid, "
                "(SELECT max(end_offset) FROM commits c WHERE c.segment_id = s.id) AS committed "
                "FROM segments s WHERE key = ?",
                (key,),
            ).fetchone()
    except sqlite3.OperationalError:  # not created yet
        return None
    return None if r is None else dict(r)


def must(home: Path, key: str) -> dict[str, Any]:
    r = row(home, key)
    assert r is not None, f"{key} is not in the manifest"
    return r


def lease_expired(home: Path, key: str) -> bool:
    r = row(home, key)
    assert r is not None
    expires = r["lease_expires"]
    if expires is None:
        return False
    at = datetime.fromisoformat(str(expires)).replace(tzinfo=UTC)
    return at < datetime.now(UTC)


def _start(home: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        uploader_cmd(*args),
        env=uploader_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_watch_frozen_past_its_lease_seals_once_the_file_rolled(home: Path, tmp_path: Path) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    first, second = d / "00000000000000000000", d / "00000000000000100000"
    data = random.Random(1).randbytes(PART + 100)
    first.write_bytes(data)
    key = "commitlog/" + first.name
    interval = 0.1
    proc = _start(
        home, *SIZES, "--lease-seconds", "1", "watch", str(d), "--interval", str(interval)
    )
    try:
        _wait_for(lambda: (row(home, key) or {}).get("committed") == PART)
        fence = must(home, key)["fence"]
        # --lease-seconds reached the store: the lease runs about 1 s, not the default 30.
        expires = datetime.fromisoformat(str(must(home, key)["lease_expires"]))
        assert (expires.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() < 5
        proc.send_signal(signal.SIGSTOP)
        # Frozen until its lease ran out (the manifest says so), then the broker rolls the file.
        _wait_for(lambda: lease_expired(home, key), timeout=30)
        second.write_bytes(b"next")
        proc.send_signal(signal.SIGCONT)
        resumed = time.monotonic()
        _wait_for(lambda: must(home, key)["state"] == "verified", timeout=60)
        lag = time.monotonic() - resumed
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    finally:
        proc.send_signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    # Within a few intervals (loosely: two loaded cores), not never.
    assert lag < 20, lag
    after = row(home, key)
    assert after is not None and int(after["fence"]) > int(fence)
    assert (home / "remote" / "commitlog" / first.name).read_bytes() == data


def test_a_restarted_watcher_takes_its_killed_predecessors_segment_at_once(
    home: Path, tmp_path: Path
) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    f = d / "00000000000000000000"
    rng = random.Random(3)
    f.write_bytes(rng.randbytes(PART + 10))
    key = "commitlog/" + f.name
    first = _start(home, *SIZES, "watch", str(d), "--interval", "0.1")  # the default 30 s lease
    try:
        _wait_for(lambda: (row(home, key) or {}).get("committed") == PART)
        before = must(home, key)
        first.kill()
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    held_until = datetime.fromisoformat(str(before["lease_expires"])).replace(tzinfo=UTC)
    assert before["lease_pid"] == first.pid
    with f.open("ab") as out:
        out.write(rng.randbytes(PART))
    second = _start(home, *SIZES, "watch", str(d), "--interval", "0.1")
    try:
        # It commits the new part: it holds the lease, long before the dead one's ran out.
        _wait_for(lambda: (row(home, key) or {}).get("committed") == 2 * PART)
        taken_at = datetime.now(UTC)
        after = must(home, key)
        second.send_signal(signal.SIGTERM)
        _out, err = second.communicate(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert second.returncode == 0, err
    assert taken_at < held_until, (taken_at, held_until)
    assert after["lease_pid"] == second.pid and after["fence"] > before["fence"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_seal_on_exit_seals_the_newest_file_and_waits_for_verified(
    run: Run, home: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    first, newest = d / "00000000000000000000", d / "00000000000000001000"
    rng = random.Random(2)
    first.write_bytes(rng.randbytes(1000))
    newest.write_bytes(rng.randbytes(PART * 2 + 5))  # the open file: parts committed, a tail
    proc = _start(home, *SIZES, "watch", str(d), "--interval", "0.1", "--seal-on-exit")
    try:
        _wait_for(lambda: (row(home, "logs/" + first.name) or {}).get("state") == "verified")
        _wait_for(lambda: (row(home, "logs/" + newest.name) or {}).get("committed") == 2 * PART)
        assert must(home, "logs/" + newest.name)["state"] == "open"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "sealing the open files" in err
    assert f"sealed and verified logs/{newest.name}" in out
    assert must(home, "logs/" + newest.name)["state"] == "verified"
    assert (home / "remote" / "logs" / newest.name).read_bytes() == newest.read_bytes()


def test_seal_on_exit_is_refused_for_a_preallocated_format(run: Run, tmp_path: Path) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    res = run("watch", str(d), "--format", "rocketmq", "--seal-on-exit", "--once")
    assert res.returncode == 2, res.stderr
    assert "--seal-on-exit cannot be used with --format rocketmq" in res.stderr


def test_once_exits_1_when_a_seal_failed(run: Run, home: Path, tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    first = d / "00000000000000000000"
    first.write_bytes(b"a" * 1000)
    (d / "00000000000000001000").write_bytes(b"b" * 10)
    # The remote cannot take the object: a file stands where the key's directory must be.
    blocker = home / "remote" / "logs"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("not a directory")
    failed = run(*SIZES, "watch", str(d), "--once")
    assert failed.returncode == 1, (failed.stdout, failed.stderr)
    assert f"failed: logs/{first.name}" in failed.stderr
    # Fixed: the next pass finishes the seal the failed one recorded.
    blocker.unlink()
    ok = run(*SIZES, "watch", str(d), "--once")
    assert ok.returncode == 0, ok.stderr
    assert must(home, "logs/" + first.name)["state"] == "verified"
    assert (home / "remote" / "logs" / first.name).read_bytes() == first.read_bytes()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_second_signal_during_seal_on_exit_exits_at_once(
    run: Run, home: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """The seal at exit waits on a part the remote never answers: the first signal started it,
    the second ends the process at once, with what it recorded consistent; recover finishes."""
    d = tmp_path / "logs"
    d.mkdir()
    newest = d / "00000000000000000000"
    newest.write_bytes(random.Random(3).randbytes(PART * 2 + 5))
    # tests/cli/slow_ship.py: the two whole parts the watcher commits pass; the seal's last part
    # is held (it says "in flight part 3") until the process gets SIGUSR1, which never comes.
    helper = Path(__file__).with_name("slow_ship.py")
    args = [*SIZES, "watch", str(d), "--interval", "0.1", "--seal-on-exit"]
    proc = subprocess.Popen(
        [sys.executable, str(helper), *args],
        env=uploader_env(home, PYTHONPATH=str(Path(__file__).parents[2]), SLOW_SHIP_FREE="2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        key = "logs/" + newest.name
        _wait_for(lambda: (row(home, key) or {}).get("committed") == 2 * PART)
        proc.send_signal(sig)
        _read_until(proc, "in flight part 3")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, err
    assert f"{sig.name} again: exiting now" in err
    assert must(home, key)["state"] == "sealed"  # recorded before the part was sent, and kept
    # The same node takes the dead process's lease over at once.
    rec = run(*SIZES, "recover")
    assert rec.returncode == 0, rec.stdout + rec.stderr
    assert must(home, key)["state"] == "verified"
    assert (home / "remote" / key).read_bytes() == newest.read_bytes()
