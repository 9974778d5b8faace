"""Three recovery workers on one PostgreSQL manifest; one is frozen (SIGSTOP) past its lease.

Every segment must be verified exactly once, byte-identical, and the frozen worker's late writes
must be refused when it wakes up (SIGCONT): its fence is stale.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

import uploader
from tests.api.conftest import PART, remote_bytes
from tests.conftest import migrate
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import EVENTS as E
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.states import SegmentState
from uploader.storage import Fault, FaultyStorage, open_storage

# A worker: recovery passes until every segment is verified (or 90 s), then one JSON line.
WORKER = r"""
import json, sys, time, uploader
from uploader.storage import Fault, FaultyStorage, open_storage
manifest, remote, options, name, delay, part = sys.argv[1:7]
storage = FaultyStorage(
    open_storage(remote, json.loads(options), min_part_size=int(part)),
    [Fault(op="upload_part", kind="delay", seconds=float(delay))],
)
store = uploader.open(manifest, remote, storage=storage, part_size=int(part),
                      min_part_size=int(part), worker=name, lease_seconds=1.0, concurrency=2)
print("ready", flush=True)
outcomes = []
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    report = store.recover()
    outcomes += [[o.key, o.before, o.after, o.detail] for o in report.outcomes]
    if store.status().all_verified:
        break
    time.sleep(0.1)
ok = store.status().all_verified
store.close()
print(json.dumps({"worker": name, "outcomes": outcomes, "ok": ok}), flush=True)
sys.exit(0 if ok else 1)
"""

SEGMENTS = 24


def _prepare(pg_url: str, remote: tuple[str, dict[str, Any]], tmp_path: Path) -> dict[str, bytes]:
    """Sealed segments whose every part send failed: all of their work is left to recovery."""
    url, options = remote
    failing = FaultyStorage(
        open_storage(url, dict(options), min_part_size=PART), [Fault(op="upload_part")]
    )
    store = uploader.open(
        pg_url, url, storage=failing, part_size=PART, min_part_size=PART, worker="writer"
    )
    rng = random.Random(5)
    blobs: dict[str, bytes] = {}
    futures = []
    for i in range(SEGMENTS):
        key = f"w/{i:03d}"
        blobs[key] = rng.randbytes(3 * PART + rng.randint(1, PART))
        path = tmp_path / f"seg{i}"
        path.write_bytes(blobs[key])
        futures.append(store.segment(key, path).seal())
    for fut in futures:
        assert fut.exception(timeout=60) is not None
    store.close()
    return blobs


def test_three_workers_one_frozen_past_its_lease(
    pg_url: str, s3_remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    migrate(pg_url)
    blobs = _prepare(pg_url, s3_remote, tmp_path)
    url, options = s3_remote
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs = {}
    for name, delay in (("frozen", "1.0"), ("w1", "0.01"), ("w2", "0.01")):
        procs[name] = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                pg_url,
                url,
                json.dumps(options),
                name,
                delay,
                str(PART),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    m = Manifest.open(pg_url)
    try:
        for p in procs.values():
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        # Freeze the slow worker while it holds a lease.
        deadline = time.monotonic() + 30
        held: tuple[int, int] | None = None
        while time.monotonic() < deadline and held is None:
            with m.engine.connect() as conn:
                row = conn.execute(
                    select(S.c.id, S.c.fence).where(S.c.lease_owner == "frozen").limit(1)
                ).first()
            if row is not None:
                held = (row.id, row.fence)
            else:
                time.sleep(0.01)
        assert held is not None, "the slow worker never held a lease"
        procs["frozen"].send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        # Past its lease (1 s): the others take the segment over with a new fence.
        taken = False
        while time.monotonic() - frozen_at < 30 and not taken:
            seg = m.segment_by_id(held[0])
            taken = seg.fence > held[1]
            time.sleep(0.1)
        assert taken, "nobody took over the frozen worker's segment"
        # Wake it only once the new holder verified the segment (an event, not a pause): its
        # stale writes would then land on a finished segment, the case that matters most.
        deadline = time.monotonic() + 60
        while m.segment_by_id(held[0]).state is not SegmentState.VERIFIED:
            assert time.monotonic() < deadline, "the taken-over segment was never verified"
            time.sleep(0.05)
        procs["frozen"].send_signal(signal.SIGCONT)

        results = {}
        for name, p in procs.items():
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, (name, out, err)
            results[name] = json.loads(out.strip().splitlines()[-1])

        # Every segment verified exactly once, with bytes identical.
        status = m.status()
        assert status.segments["verified"] == SEGMENTS and status.all_verified
        with m.engine.connect() as conn:
            events = conn.execute(select(E).order_by(E.c.id)).all()
        for key, blob in blobs.items():
            assert remote_bytes(s3_remote, key) == blob
            rec = m.segment(key)
            assert rec is not None
            verified = [
                e
                for e in events
                if e.segment_id == rec.id and e.commit_id is None and e.to_state == "verified"
            ]
            assert len(verified) == 1, key
        # The frozen worker wrote nothing with its stale fence after the takeover.
        seg_id, stale = held
        takeover = min(
            e.id
            for e in events
            if e.segment_id == seg_id and e.fence > stale and e.worker != "frozen"
        )
        late = [
            e
            for e in events
            if e.segment_id == seg_id
            and e.worker == "frozen"
            and e.fence == stale
            and e.id > takeover
        ]
        assert late == []
        # And it was told so: its pass over that segment ended with the takeover, not a write.
        held_key = m.segment_by_id(seg_id).key
        mine = [o for o in results["frozen"]["outcomes"] if o[0] == held_key]
        assert mine, results["frozen"]
        trail = [
            (e.id, e.from_state, e.to_state, e.worker, e.fence, e.commit_id)
            for e in events
            if e.segment_id == seg_id
        ]
        assert "took it over" in mine[0][3], (mine, held, trail)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        m.close()


@pytest.fixture(autouse=True)
def _quiet_moto_logs() -> None:
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
