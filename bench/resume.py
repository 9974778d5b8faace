"""Resume efficiency and the long kill run.

* resume: a 40-part segment whose seal is cut off after a random half of its parts arrived;
  recovery must re-send exactly the missing bytes (ratio bytes re-sent / bytes missing = 1.0).
* kill: the kill test's workload SIGKILLed many times (``--kills``), then recovery; every byte
  compared.
"""

from __future__ import annotations

import contextlib
import random
import sys
from datetime import timedelta
from pathlib import Path

from bench.common import MiB, Result, new_bucket, s3_options, workdir, write_file

ROOT = Path(__file__).resolve().parent.parent


class _Cut(BaseException):
    """The writer dies here."""


def bench_resume(endpoint: str, *, parts: int = 40, part: int = 5 * MiB) -> Result:
    import uploader
    from uploader.manifest.repo import utcnow
    from uploader.storage import Fault, FaultyStorage, open_storage

    res = Result(f"resume a {parts}-part segment cut off half way")
    with workdir() as tmp:
        path = tmp / "seg"
        write_file(path, parts * part + 12345, seed=5)
        bucket = new_bucket(endpoint)
        remote = f"s3://{bucket}/resume"
        manifest = f"sqlite:///{tmp / 'm.db'}"
        faulty = FaultyStorage(open_storage(remote, s3_options(endpoint)))
        # Let a random half of the part uploads through, then cut every later one.
        rng = random.Random(1)
        allowed = rng.randint(parts // 3, 2 * parts // 3)
        faulty.add(
            Fault(op="upload_part", when="before", after_calls=allowed, error=lambda: _Cut("cut"))
        )
        store = uploader.open(
            manifest,
            remote,
            storage_options=s3_options(endpoint),
            storage=faulty,
            part_size=part,
            concurrency=4,
        )
        with contextlib.suppress(BaseException):
            store.segment("resume/0", path).seal().result()
        store.abandon()
        held = open_storage(remote, s3_options(endpoint))
        seg_upload = None
        m = uploader.open(manifest, remote, storage_options=s3_options(endpoint), part_size=part)
        rec = m.manifest.segment("resume/0")
        assert rec is not None
        seg_upload = rec.upload_id
        assert seg_upload is not None
        have = {p.number for p in held.list_parts("resume/0", seg_upload)}
        commits = m.manifest.commits(rec.id)
        missing = sum(c.size for c in commits if c.part_number not in have)
        m.manifest.clock = lambda: utcnow() + timedelta(minutes=10)
        report = m.recover()
        m.close()
        held.close()
    assert report.ok, report
    res.measurements = {
        "parts held by the remote before recovery": float(len(have)),
        "bytes missing (MiB)": missing / MiB,
        "bytes re-sent by recovery (MiB)": report.bytes_sent / MiB,
        "bytes reused (MiB)": report.bytes_reused / MiB,
    }
    res.ratios = {"re-sent / missing": report.bytes_sent / missing if missing else float("nan")}
    res.targets = {"re-sent / missing": "target 1.0"}
    return res


def bench_kill(*, kills: int = 200) -> Result:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import migrate
    from tests.recovery.test_kill import finish_and_check, run_kills

    res = Result(f"SIGKILL a writer {kills} times (SQLite manifest, file remote), then recover")
    with workdir() as tmp:
        manifest = f"sqlite:///{tmp / 'm.db'}"
        root = tmp / "remote"
        root.mkdir()
        remote: tuple[str, dict[str, str]] = (f"file://{root}", {})
        migrate(manifest)
        hit = run_kills(manifest, remote, tmp / "data", kills=kills, seed=7)
        segments, nbytes = finish_and_check(manifest, remote, tmp / "data")
    res.measurements = {
        "kills that hit a running writer": float(hit),
        "segments verified and byte-identical": float(segments),
        "bytes compared (MiB)": nbytes / MiB,
    }
    res.notes.append("every segment verified, remote bytes identical to the local files")
    return res
