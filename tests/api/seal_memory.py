"""Seal one segment on S3 in this process and print the Python-allocated peak of the seal.

Run by tests/api/test_part_memory.py as ``python -m tests.api.seal_memory MANIFEST REMOTE
OPTIONS_JSON PATH PART_SIZE CONCURRENCY``: in a process of its own, because moto's server runs
inside the test process and keeps every part it receives in memory, which tracemalloc would count.
Prints one JSON line: the seal's result and ``peak`` (bytes allocated by Python at the peak of the
seal, the store already open, its imports and S3 client made).
"""

from __future__ import annotations

import json
import sys
import tracemalloc

import uploader


def main(argv: list[str]) -> int:
    manifest, remote, options, path, part_size, concurrency = argv
    store = uploader.open(
        manifest,
        remote,
        storage_options=json.loads(options),
        part_size=int(part_size),
        min_part_size=int(part_size),
        concurrency=int(concurrency),
    )
    with store:
        seg = store.segment("mem/0", path)
        # The S3 client and its probes are made by the store's first requests, outside the
        # measure: a tiny sealed segment first (one PUT, its probe, HEAD).
        warm = path + ".warm"
        with open(warm, "wb") as f:
            f.write(b"warm")
        store.segment("mem/warm", warm).seal().result(timeout=120)
        tracemalloc.start()
        result = seg.seal().result(timeout=300)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    print(json.dumps({"peak": peak, "parts": result.sent_parts, "verified": result.verified}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
