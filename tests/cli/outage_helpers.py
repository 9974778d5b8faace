"""Helpers of the manifest-outage tests: daemons in subprocesses whose stderr is read as it comes,
work left for recovery, and locks that make a daemon's next statement wait (a PostgreSQL cluster
of the test's own: :mod:`tests.cli.private_pg`)."""

from __future__ import annotations

import contextlib
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

import uploader
from uploader.manifest.repo import Manifest
from uploader.storage import Fault, FaultyStorage, open_storage

PART = 64 * 1024
UNAVAILABLE = "manifest unavailable"
BACK = "manifest reachable again"


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


class Daemon:
    """``uploader ...`` in a subprocess; its stderr lines collected by a thread as they come."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uploader.cli", *args],
            # SIGABRT dumps every thread's stack on stderr (a daemon that does not stop, below).
            env={**env, "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            into.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def count(self, text: str) -> int:
        return sum(text in line for line in list(self.lines))

    def wait_lines(self, text: str, n: int, timeout: float = 30.0) -> None:
        def seen() -> bool:
            assert self.proc.poll() is None, f"the daemon exited:\n{self.stderr}"
            return self.count(text) >= n

        try:
            wait_for(seen, f"{n} line(s) with {text!r}", timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr so far:\n{self.stderr}") from None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code; a daemon still running ``timeout`` seconds later fails
        the test with its stderr (what it was doing when told to stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)  # its threads' stacks, then it dies
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            for t in self._readers:
                t.join(timeout=10)
            raise AssertionError(
                f"the daemon did not stop within {timeout:g} s of SIGTERM; its stderr, with "
                "its threads' stacks at the end:\n"
                f"{self.stderr}"
            ) from None
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=10)
        return self.proc.returncode


def sealed_work(
    manifest_url: str,
    remote_url: str,
    tmp: Path,
    n: int,
    *,
    options: dict[str, Any] | None = None,
    prefix: str = "rec",
    parts: int = 3,
    seed: int = 11,
    worker: str = "w",
) -> dict[str, bytes]:
    """``n`` sealed segments (``parts`` whole parts and a tail each) whose every part send failed
    (the writer's lease released): all their work is left to recovery. Returns key -> the
    file's bytes."""
    failing = FaultyStorage(
        open_storage(remote_url, dict(options or {}), min_part_size=PART), [Fault(op="upload_part")]
    )
    store = uploader.open(
        manifest_url,
        remote_url,
        storage=failing,
        part_size=PART,
        min_part_size=PART,
        worker=worker,
    )
    rng = random.Random(seed)
    blobs: dict[str, bytes] = {}
    try:
        futures = []
        for i in range(n):
            key = f"{prefix}/{i:03d}"
            blobs[key] = rng.randbytes(parts * PART + rng.randint(1, PART))
            path = tmp / f"{prefix}{i}"
            path.write_bytes(blobs[key])
            futures.append(store.segment(key, path).seal())
        for fut in futures:
            assert fut.exception(timeout=60) is not None
    finally:
        store.close()
    return blobs


def states(manifest_url: str) -> dict[str, int]:
    m = Manifest.open(manifest_url)
    try:
        return dict(m.status().segments)
    finally:
        m.close()


def verified_keys(manifest_url: str) -> set[str]:
    m = Manifest.open(manifest_url)
    try:
        with m.engine.connect() as conn:
            from sqlalchemy import text

            rows = conn.execute(text("SELECT key FROM segments WHERE state = 'verified'")).all()
        return {r[0] for r in rows}
    finally:
        m.close()


# --- PostgreSQL: a lock the daemon waits on, then its connections terminated --------------------


def pg_conninfo(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://").split("?", 1)[0]


class PgLock:
    """Holds ``LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE`` in an open transaction: the daemon's
    next statement on that table waits, so a termination is sure to hit it mid-statement (a
    pooled idle connection would merely be replaced by the pool's ping)."""

    def __init__(self, url: str, table: str = "events") -> None:
        self.conn = psycopg.connect(pg_conninfo(url))
        self.conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        self.db = pg_conninfo(url).rsplit("/", 1)[1]

    def waiting(self) -> int:
        """Backends of the database waiting for a lock (the daemon's, blocked by ours)."""
        # Inside a transaction pg_stat_activity is a snapshot taken once: take a fresh one.
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            self.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
                (self.db,),
            ).fetchone()[0]  # type: ignore[index]
        )

    def terminate_all(self) -> int:
        """What an operator (or a failover) does: every other connection to the database ends."""
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        rows = self.conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (self.db,),
        ).fetchall()
        return len(rows)

    def hurt(self, daemon: Daemon, n: int, timeout: float = 30.0) -> None:
        """Terminate the daemon's connections whenever one waits on our lock, until it reported
        ``n`` failed attempts. A pass runs segments in parallel and ends only when all of them
        did: the threads that reconnected and wait again are terminated again."""

        def reported() -> bool:
            if self.waiting():
                self.terminate_all()
            return daemon.count(UNAVAILABLE) >= n

        wait_for(reported, f"{n} failed attempt(s) reported:\n{daemon.stderr}", timeout)

    def release(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()
        self.conn.close()


# --- SQLite: another process's exclusive lock ------------------------------------------------


class SqliteLock:
    """``BEGIN EXCLUSIVE`` on another connection: every write of the daemon waits its busy timeout
    and fails with "database is locked" until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(str(path), isolation_level=None, timeout=10)
        self.conn.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()
