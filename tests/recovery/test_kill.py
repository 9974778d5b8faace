"""SIGKILL a real writer at random moments, many times; then recover and compare every byte.

The writer (``kill_workload.py``) runs in its own process against a real manifest and remote;
it is killed at a random moment, restarted, killed again. Afterwards a restarted writer seals what
the dead ones left open (recovery never seals what it does not own), recovery finishes the rest,
and every segment must be verified with its remote object identical to its local file.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import remote_bytes
from tests.conftest import migrate
from uploader.manifest.repo import utcnow

WORKLOAD = Path(__file__).with_name("kill_workload.py")
PART = 64 * 1024


def run_kills(
    manifest_url: str,
    remote: tuple[str, dict[str, Any]],
    data_dir: Path,
    *,
    kills: int,
    seed: int = 0,
) -> int:
    """Start and SIGKILL the workload ``kills`` times; return how many kills hit a live writer."""
    rng = random.Random(seed)
    url, options = remote
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    hit = 0
    for i in range(kills):
        proc = subprocess.Popen(
            [
                sys.executable,
                str(WORKLOAD),
                manifest_url,
                url,
                json.dumps(options),
                str(data_dir),
                str(seed * 1000 + i),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        assert ready.strip() == b"ready", proc.stderr.read() if proc.stderr else ready
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is None:
            hit += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode in (-signal.SIGKILL, 0) or proc.returncode is None, (
            proc.returncode,
            proc.stderr.read() if proc.stderr else b"",
        )
    return hit


def finish_and_check(
    manifest_url: str, remote: tuple[str, dict[str, Any]], data_dir: Path
) -> tuple[int, int]:
    """Seal what the dead writers left open, recover, compare every byte. (segments, bytes)."""
    url, options = remote
    later = utcnow() + timedelta(minutes=10)  # every dead writer's lease has expired by then
    store = uploader.open(
        manifest_url, url, storage_options=dict(options), part_size=PART, min_part_size=PART
    )
    store.manifest.clock = lambda: later
    try:
        report = store.recover()
        assert not report.failed, report
        for rec in store.manifest.segments([uploader.SegmentState.OPEN]):
            seg = store.segment(rec.key, rec.path)
            with contextlib.suppress(uploader.UploaderError):  # recovery below finishes it
                seg.seal().result(timeout=120)
        report = store.recover()
        assert report.ok, report
        assert store.recover().resumed == 0
        store.sweep(older_than=0)
        assert store.storage.list_uploads() == []
        records = store.manifest.segments()
        assert records, "the workload registered nothing"
        total = 0
        for rec in records:
            assert rec.state is uploader.SegmentState.VERIFIED, rec
            local = Path(rec.path).read_bytes()
            assert remote_bytes(remote, rec.key) == local, rec.key
            total += len(local)
            events = store.manifest.events(rec.id)
            # The audit trail ends in verified for the segment and each of its commits.
            assert [e.to_state for e in events if e.commit_id is None][-1] == "verified"
        return len(records), total
    finally:
        store.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", [("sqlite", "file"), ("postgresql", "s3")], ids=["sqlite-file", "postgresql-s3"]
)
def test_sigkill_at_random_moments_loses_nothing(
    backend: tuple[str, str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    db, storage = backend
    if db == "sqlite":
        manifest_url = f"sqlite:///{tmp_path}/manifest.db"
    else:
        manifest_url = request.getfixturevalue("pg_url")
    if storage == "file":
        root = tmp_path / "remote"
        root.mkdir()
        remote: tuple[str, dict[str, Any]] = (f"file://{root}", {})
    else:
        remote = request.getfixturevalue("s3_remote")
    migrate(manifest_url)
    hit = run_kills(manifest_url, remote, tmp_path / "data", kills=20, seed=len(db))
    assert hit >= 15, f"only {hit} of 20 kills hit a running writer"
    segments, _nbytes = finish_and_check(manifest_url, remote, tmp_path / "data")
    assert segments >= 20
