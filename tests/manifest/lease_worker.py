"""A claiming worker for test_leases, run as its own OS process.

    python -m tests.manifest.lease_worker URL OWNER NODE GO_FILE SECONDS

Prints ``ready`` once connected, waits for GO_FILE to exist (so every worker starts at once), then
for SECONDS: claims the next segment with ``claim_next``, and while holding it does guarded
read-modify-writes (reads the last part, appends the next one with ``add_commits``, renews), then
releases it. Prints one JSON document: every hold with its segment, fence, time window (monotonic
clock, shared by the processes of one machine) and the parts it appended.
"""

from __future__ import annotations

import json
import os
import sys
import time

from uploader.digest import checksum
from uploader.manifest.repo import Manifest
from uploader.records import NewCommit

WRITES_PER_HOLD = 2
HOLD_SECONDS = 0.02
PART = 4


def main(argv: list[str]) -> int:
    url, owner, node, go_file, seconds = argv[0], argv[1], argv[2], argv[3], float(argv[4])
    manifest = Manifest.open(url, auto_upgrade=False)
    print("ready", flush=True)
    while not os.path.exists(go_file):
        time.sleep(0.005)
    holds: list[dict[str, object]] = []
    empty = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            claimed = manifest.claim_next(owner, node=node, ttl=60)
            if claimed is None:
                empty += 1
                time.sleep(0.002)
                continue
            lease, seg = claimed
            start = time.monotonic()
            assert seg.lease_owner == owner and seg.fence == lease.fence
            parts: list[int] = []
            for _ in range(WRITES_PER_HOLD):
                last = manifest.commits(seg.id)[-1]  # read ...
                data = f"{owner}:{lease.fence}:{last.part_number + 1}".encode()[:PART].ljust(PART)
                md5, crc = checksum(data)
                manifest.add_commits(  # ... modify, write: refused if anyone else holds it
                    lease, [NewCommit(last.part_number + 1, last.end, last.end + PART, md5, crc)]
                )
                parts.append(last.part_number + 1)
                # Hold a little longer than the writes take: with every segment held for a while,
                # the other workers' claims meet held segments (the contention the test needs)
                # even when a loaded machine runs the workers one after the other.
                time.sleep(HOLD_SECONDS)
            lease = manifest.renew(lease, ttl=60)
            end = time.monotonic()
            released = manifest.release(lease)
            holds.append(
                {
                    "segment": seg.id,
                    "fence": lease.fence,
                    "owner": owner,
                    "start": start,
                    "end": end,
                    "parts": parts,
                    "released": released,
                }
            )
    finally:
        manifest.close()
    print(json.dumps({"owner": owner, "holds": holds, "empty": empty}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
