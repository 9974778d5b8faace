"""The cost of the whole-file check: every local byte read again (CRC32C) before ``verified``.

Measured on a file of ``size`` bytes in 8 MiB parts, from the page cache (the usual case: the
segment was just written) and next to a plain sequential read of the same bytes, so the ratio
says what the CRC adds to the reading.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from datetime import datetime

from bench.common import MiB, Result
from uploader.digest import crc32c_of
from uploader.records import CommitRecord, SegmentRecord
from uploader.states import CommitState, SegmentState
from uploader.transport import check_local


def bench_local_check(size: int) -> Result:
    part = 8 * MiB
    rng = random.Random(1)
    block = rng.randbytes(part)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "segment")
        commits = []
        with open(path, "wb") as f:
            for n, start in enumerate(range(0, size, part), 1):
                f.write(block)
                commits.append(
                    CommitRecord(
                        id=n,
                        segment_id=1,
                        part_number=n,
                        start=start,
                        end=start + part,
                        md5="",
                        crc32c=crc32c_of(block),
                        etag="x",
                        state=CommitState.UPLOADED,
                        attempts=0,
                        last_error=None,
                        reason=None,
                    )
                )
        st = os.stat(path)
        now = datetime.now()
        seg = SegmentRecord(
            id=1,
            key="bench/check",
            path=path,
            node="n",
            state=SegmentState.UPLOADED,
            part_size=part,
            size=size,
            crc32c=0,
            expected_etag="x",
            upload_mode="multipart",
            upload_id=None,
            object_etag=None,
            fence=1,
            lease_owner=None,
            lease_expires=None,
            attempts=0,
            last_error=None,
            reason=None,
            created_at=now,
            updated_at=now,
            sealed_at=now,
            verified_at=None,
            file_device=st.st_dev,
            file_inode=st.st_ino,
        )
        with open(path, "rb") as f:  # warm the page cache
            while f.read(16 * MiB):
                pass
        t0 = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(4 * MiB):
                pass
        plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_local(seg, commits, set())
        checked = time.perf_counter() - t0
    gib = size / (1024 * MiB)
    r = Result(f"whole-file check before verified ({size // MiB} MiB, page cache)")
    r.measurements["check_local seconds per GiB"] = checked / gib
    r.measurements["plain sequential read seconds per GiB"] = plain / gib
    r.ratios["check / plain read"] = checked / plain
    r.notes.append("CRC32C only (hardware); MD5 is not recomputed: the remote checked it")
    return r
