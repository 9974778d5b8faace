"""``recover --loop`` and ``watch`` ride out manifest outages, then finish the work.

Real outages, in subprocesses: PostgreSQL connections terminated again and again
(``pg_terminate_backend``), a restart of a PostgreSQL cluster the test starts itself (own data
directory, port and socket directory; never the shared server), and an SQLite file locked by
another connection past the daemon's busy timeout. Each time the daemon must log the outage,
back off, carry on, and end with every segment verified (byte-identical at the remote) and exit 0
on SIGTERM.

So that a termination hits a daemon mid-work (not an idle pooled connection, which the pool's
ping would merely replace), the test first takes a table lock the daemon's next write waits on,
waits until ``pg_stat_activity`` shows the daemon waiting, and then terminates every other
connection to the database.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.cli.conftest import uploader_env
from tests.cli.outage_helpers import (
    BACK,
    PART,
    UNAVAILABLE,
    Daemon,
    PgLock,
    SqliteLock,
    pg_conninfo,
    sealed_work,
    states,
    verified_keys,
    wait_for,
)
from tests.cli.private_pg import OWNER, PrivateCluster, _pg_bin, private_cluster, reap_orphans
from tests.conftest import migrate
from uploader.manifest.repo import Manifest

__all__ = ["private_cluster"]  # the fixture, imported for this module

ROUNDS = 3


def _remote(home: Path) -> str:
    (home / "remote").mkdir(exist_ok=True)
    return f"file://{home}/remote"


def _args(manifest: str, remote: str, *command: str) -> list[str]:
    return [
        "--manifest",
        manifest,
        "--remote",
        remote,
        "--part-size",
        str(PART),
        "--min-part-size",
        str(PART),
        "--lease-seconds",
        "3",
        *command,
    ]


def _recover(manifest: str, remote: str, home: Path) -> Daemon:
    args = _args(manifest, remote, "recover", "--loop", "--interval", "0.2")
    return Daemon(args, uploader_env(home))


def _watch(manifest: str, remote: str, home: Path, directory: Path) -> Daemon:
    args = _args(
        manifest, remote, "watch", str(directory), "--interval", "0.1", "--recover-every", "1"
    )
    return Daemon(args, uploader_env(home))


def _remote_ok(home: Path, blobs: dict[str, bytes]) -> None:
    for key, data in blobs.items():
        assert (home / "remote" / key).read_bytes() == data, key


class _Log:
    """A growing segment file and what was written to it."""

    def __init__(self, directory: Path, name: str) -> None:
        self.path = directory / name
        self.data = b""
        self.path.write_bytes(b"")

    def append(self, n: int) -> None:
        import os

        chunk = os.urandom(n)
        self.data += chunk
        with self.path.open("ab") as f:
            f.write(chunk)


def _log_dir(tmp_path: Path) -> tuple[Path, _Log]:
    d = tmp_path / "logs"
    d.mkdir()
    first = _Log(d, "00000000000000000000")
    first.append(PART // 2)
    return d, first


def _finish_watch(daemon: Daemon, manifest: str, home: Path, d: Path, first: _Log) -> None:
    """Roll the file (a later one begins): the watcher seals and verifies the first."""
    (d / "00000000000000100000").write_bytes(b"next")
    key = "logs/" + first.path.name
    wait_for(lambda: key in verified_keys(manifest), f"{key} verified", timeout=60)
    assert daemon.stop() == 0, daemon.stderr
    _remote_ok(home, {key: first.data})


# --- pg_terminate_backend, again and again ------------------------------------------------------


def test_recover_loop_survives_terminated_connections(
    pg_url: str, home: Path, tmp_path: Path
) -> None:
    migrate(pg_url)
    remote = _remote(home)
    blobs = sealed_work(pg_url, remote, tmp_path, 4)
    lock = PgLock(pg_url)  # the daemon claims, then its first audited write waits
    daemon = _recover(pg_url, remote, home)
    try:
        for n in range(1, ROUNDS + 1):
            lock.hurt(daemon, n)
    finally:
        lock.release()
    daemon.wait_lines(BACK, 1)
    wait_for(lambda: verified_keys(pg_url) == set(blobs), "every segment verified", timeout=60)
    assert daemon.stop() == 0, daemon.stderr
    _remote_ok(home, blobs)
    assert "Traceback" not in daemon.stderr
    assert "error:" not in daemon.stderr


def test_watch_survives_terminated_connections(pg_url: str, home: Path, tmp_path: Path) -> None:
    migrate(pg_url)
    d, first = _log_dir(tmp_path)
    daemon = _watch(pg_url, _remote(home), home, d)
    try:
        wait_for(lambda: states(pg_url).get("open") == 1, "the file registered")
        lock = PgLock(pg_url)
        try:
            first.append(2 * PART)  # two whole parts: the commit's audited write waits
            for n in range(1, ROUNDS + 1):
                lock.hurt(daemon, n)
        finally:
            lock.release()
        daemon.wait_lines(BACK, 1)
        _finish_watch(daemon, pg_url, home, d, first)
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr


# --- a server restart -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["recover", "watch"])
def test_daemon_rides_out_a_server_restart(
    private_cluster: PrivateCluster, kind: str, home: Path, tmp_path: Path
) -> None:
    url = private_cluster.create_database(f"restart_{kind}")
    migrate(url)
    remote = _remote(home)
    blobs: dict[str, bytes] = {}
    if kind == "recover":
        blobs = sealed_work(url, remote, tmp_path, 4)
        lock = PgLock(url)
        daemon = _recover(url, remote, home)
    else:
        d, first = _log_dir(tmp_path)
        daemon = _watch(url, remote, home, d)
        wait_for(lambda: states(url).get("open") == 1, "the file registered")
        lock = PgLock(url)
        first.append(2 * PART)
    try:
        wait_for(lambda: lock.waiting() > 0, "the daemon waiting on the lock, mid-work")
        private_cluster.stop()  # -m fast: every session ends, ours (the lock) too
        daemon.wait_lines(UNAVAILABLE, 2)  # it kept trying while the server was down
        lock.release()
        private_cluster.start()
        daemon.wait_lines(BACK, 1)
        if kind == "recover":
            wait_for(lambda: verified_keys(url) == set(blobs), "every segment verified", 60)
            assert daemon.stop() == 0, daemon.stderr
            _remote_ok(home, blobs)
        else:
            _finish_watch(daemon, url, home, d, first)
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr


# --- SQLite locked past the busy timeout ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["recover", "watch"])
def test_daemon_rides_out_a_locked_sqlite_file(kind: str, home: Path, tmp_path: Path) -> None:
    path = home / "manifest.db"
    url = f"sqlite:///{path}?timeout=0.3"  # the busy timeout: 0.3 s instead of 30
    remote = _remote(home)
    Manifest.open(url).close()  # created at head before the lock
    if kind == "recover":
        blobs = sealed_work(url, remote, tmp_path, 4)
        lock = SqliteLock(path)
        daemon = _recover(url, remote, home)
    else:
        d, first = _log_dir(tmp_path)
        first.append(2 * PART)
        lock = SqliteLock(path)  # the watcher's registration of the file waits, then fails
        daemon = _watch(url, remote, home, d)
    try:
        daemon.wait_lines(UNAVAILABLE, 2)
        assert "database is locked" in daemon.stderr
    finally:
        lock.release()
    try:
        daemon.wait_lines(BACK, 1)
        if kind == "recover":
            wait_for(lambda: verified_keys(url) == set(blobs), "every segment verified", 60)
            assert daemon.stop() == 0, daemon.stderr
            _remote_ok(home, blobs)
        else:
            _finish_watch(daemon, url, home, d, first)
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.stderr


# --- private clusters left by a killed run ------------------------------------------------------


def test_a_private_cluster_whose_test_run_died_is_stopped_and_removed() -> None:
    """A run killed before its fixture's teardown leaves its cluster running: the next run's
    fixture stops and removes it, whether the dead run is gone or a zombie (killed, its exit
    not collected: this machine's init collects none), and keeps any live run's own."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no initdb (PostgreSQL server binaries) on this machine")
    orphan, stopped, live = PrivateCluster(bindir), PrivateCluster(bindir), PrivateCluster(bindir)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        orphan.init()
        orphan.start()
        psycopg.connect(pg_conninfo(orphan.url("postgres")), connect_timeout=5).close()
        stat = Path(f"/proc/{zombie.pid}/stat")
        wait_for(lambda: stat.read_text().rpartition(")")[2].split()[0] == "Z", "a zombie")
        (orphan.root / OWNER).write_text(str(zombie.pid))  # its run killed, not collected
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (stopped.root / OWNER).write_text(str(gone.pid))  # its run killed and gone
        removed = reap_orphans(bindir)
        assert {orphan.root, stopped.root} <= set(removed)
        assert not orphan.root.exists() and not stopped.root.exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg_conninfo(orphan.url("postgres")), connect_timeout=5)
        assert live.root not in removed and live.root.exists()  # this run's own: kept
    finally:
        zombie.wait()
        for cluster in (orphan, stopped, live):
            cluster.destroy()
