"""Three ``uploader recover --loop`` processes on one PostgreSQL manifest; one frozen past its lease.

Unlike ``test_workers.py`` (library-level worker scripts), the workers here are the real CLI command
(``recover --loop --interval 0.2 --worker wN``, configured through ``UPLOADER_*`` variables), so
its loop, its graceful SIGTERM stop and its exit code are what is tested. Two test-scale knobs are
the CLI's own options: ``--lease-seconds 1`` (instead of the default 30 s, so "frozen past its
lease" fits in seconds) and ``--min-part-size`` (moto is started with 64 KiB parts; the CLI's
storage would otherwise refuse to complete them).

The frozen worker (``w0``) is stopped with SIGSTOP while it holds leases on unverified segments and
no write transaction is open on its database connection (a frozen open transaction would hold row
locks, which ``SKIP LOCKED`` claimers rightly skip). Once the others took those segments over with
new fences, it is continued with SIGCONT: every write it then attempts with its stale fence must be
refused, and its report must say that another worker took the segment over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

import uploader
from tests.api.conftest import PART, remote_bytes
from tests.cli.outage_helpers import sealed_work
from tests.conftest import migrate
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import EVENTS as E
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.states import SegmentState

SEGMENTS = 30
LEASE = 1.0


def _prepare(pg_url: str, remote: tuple[str, dict[str, Any]], tmp_path: Path) -> dict[str, bytes]:
    """Sealed segments whose every part send failed: all of their work is left to recovery."""
    url, options = remote
    return sealed_work(
        pg_url, url, tmp_path, SEGMENTS, options=options, prefix="cli", parts=5, seed=7,
        worker="writer",
    )  # fmt: skip


def _start(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    worker_env = dict(env, UPLOADER_MANIFEST=f"{env['UPLOADER_MANIFEST']}?application_name={name}")
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uploader.cli",
            "--lease-seconds",
            str(LEASE),
            "--min-part-size",
            str(PART),
            "--part-size",
            str(PART),
            "recover",
            "--loop",
            "--interval",
            "0.2",
            "--worker",
            name,
        ],
        stdout=(log_dir / f"{name}.out").open("wb"),
        stderr=(log_dir / f"{name}.err").open("wb"),
        env=worker_env,
    )


def _held(m: Manifest, owner: str) -> dict[int, int]:
    """{segment id: fence} of unfinished segments ``owner`` holds a lease on."""
    with m.engine.connect() as conn:
        rows = conn.execute(
            select(S.c.id, S.c.fence).where(
                S.c.lease_owner == owner,
                S.c.state.in_([SegmentState.SEALED.value, SegmentState.UPLOADED.value]),
            )
        ).all()
    return {r.id: r.fence for r in rows}


def _writing(m: Manifest, name: str) -> bool:
    """Whether a backend of worker ``name`` is inside a transaction that wrote (holds row locks)."""
    with m.engine.connect() as conn:
        n = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = :name AND backend_xid IS NOT NULL"
            ),
            {"name": name},
        ).scalar_one()
    return bool(n)


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def _wait(cond: Any, timeout: float, what: str, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(step)


def test_three_cli_workers_one_frozen_past_its_lease(
    pg_url: str, s3_remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    migrate(pg_url)
    blobs = _prepare(pg_url, s3_remote, tmp_path)
    url, options = s3_remote
    env = dict(
        os.environ,
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
        PYTHONUNBUFFERED="1",
        UPLOADER_MANIFEST=pg_url,
        UPLOADER_REMOTE=url,
        UPLOADER_STORAGE_OPTIONS=json.dumps(options),
    )
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    m = Manifest.open(pg_url)

    def log(name: str) -> str:
        out = (logs / f"{name}.out").read_text(errors="replace")
        err = (logs / f"{name}.err").read_text(errors="replace")
        return f"--- {name} stdout\n{out}\n--- {name} stderr\n{err}"

    try:
        procs["w0"] = _start("w0", env, logs)
        frozen = procs["w0"]
        held: dict[int, int] = {}
        for _attempt in range(100):
            _wait(
                lambda: bool(_held(m, "w0")) or frozen.poll() is not None,
                30,
                "w0 never held a lease",
            )
            assert frozen.poll() is None, log("w0")
            if len(procs) == 1:  # the others start now: they share the rest of the work
                for name in ("w1", "w2"):
                    procs[name] = _start(name, env, logs)
            frozen.send_signal(signal.SIGSTOP)
            _wait(lambda: _stopped(frozen.pid), 5, "w0 did not stop", step=0.001)
            # Frozen mid-segment, and not inside a write transaction (see the module doc).
            held = _held(m, "w0")
            if held and not _writing(m, "w0"):
                break
            frozen.send_signal(signal.SIGCONT)
            held = {}
        assert held, "could not freeze w0 while it held a lease"

        # Past its lease, the others claim w0's segments with new fences.
        def taken_over() -> bool:
            with m.engine.connect() as conn:
                rows = conn.execute(
                    select(S.c.id, S.c.fence, S.c.state).where(S.c.id.in_(list(held)))
                ).all()
            return all(r.fence > held[r.id] and r.state == "verified" for r in rows)

        _wait(taken_over, 30, f"w0's segments {held} were not taken over", step=0.05)
        with m.engine.connect() as conn:
            last_event = conn.execute(select(func.max(E.c.id))).scalar_one()
        frozen.send_signal(signal.SIGCONT)

        # Everything ends verified; then each worker runs at least one more pass and is stopped.
        _wait(lambda: m.status().all_verified, 40, "not everything was verified", step=0.1)
        held_keys = {m.segment_by_id(i).key for i in held}
        # w0 finishes the pass it was frozen in: it reports the takeover instead of a result.
        _wait(
            lambda: all(f"{k}: " in (logs / "w0.out").read_text() for k in held_keys),
            20,
            f"w0 did not report on {held_keys} after SIGCONT",
            step=0.1,
        )
        time.sleep(0.6)
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for name, p in procs.items():
            try:
                rc = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} did not stop on SIGTERM\n{log(name)}") from None
            assert rc == 0, f"{name} exited {rc}\n{log(name)}"

        # The frozen worker's late writes were refused, and it said so.
        w0_out = (logs / "w0.out").read_text()
        for key in held_keys:
            lines = [ln for ln in w0_out.splitlines() if ln.startswith(f"{key}: ")]
            assert lines and "another worker took it over" in lines[-1], (key, log("w0"))
        with m.engine.connect() as conn:
            events = conn.execute(select(E).order_by(E.c.id)).all()
        late = [
            e for e in events if e.id > last_event and e.worker == "w0" and e.segment_id in held
        ]
        assert late == [], late
        stale = [e for e in events if e.segment_id in held and e.fence == held[e.segment_id]]
        assert all(e.worker == "w0" and e.id <= last_event for e in stale), stale

        # Every segment verified exactly once, byte-identical; nothing left unfinished remotely.
        status = m.status()
        assert status.segments.get("verified") == SEGMENTS and status.all_verified, status
        workers: dict[str, int] = {}
        for key, blob in blobs.items():
            rec = m.segment(key)
            assert rec is not None and rec.state is SegmentState.VERIFIED, rec
            verified = [
                e
                for e in events
                if e.segment_id == rec.id
                and e.commit_id is None
                and (e.from_state, e.to_state) == ("uploaded", "verified")
            ]
            assert len(verified) == 1, (key, verified)
            workers[verified[0].worker] = workers.get(verified[0].worker, 0) + 1
            assert remote_bytes(s3_remote, key) == blob, key
        assert set(workers) <= {"w0", "w1", "w2"} and len(workers) >= 2, workers
        store = uploader.open(pg_url, url, storage_options=dict(options), min_part_size=PART)
        try:
            store.sweep(older_than=0)
            assert store.storage.list_uploads() == []
        finally:
            store.close()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait(timeout=10)
        m.close()
