"""A real writer for the kill test and benchmark: run until SIGKILLed.

``python kill_workload.py MANIFEST REMOTE OPTIONS_JSON DATA_DIR SEED``

It appends random blocks to segment files, commits after each append, and seals a segment once it
passed its target size, then starts the next one. Everything it knows is in the manifest and the
files, so a checker can tell afterwards what must be on the remote.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

PART = 64 * 1024


def main() -> None:
    manifest, remote, options, data_dir, seed = sys.argv[1:6]
    import uploader

    rng = random.Random(int(seed))
    run = f"{os.getpid()}"
    segs = Path(data_dir) / "segments"
    segs.mkdir(parents=True, exist_ok=True)
    store = uploader.open(
        manifest,
        remote,
        storage_options=json.loads(options),
        part_size=PART,
        min_part_size=PART,
        concurrency=4,
    )
    # Set up before saying so: the S3 client made and the remote asked once which checksum mode
    # new segments take (what the first registration would otherwise do inside the kill window).
    store.new_segment_checksum()
    print("ready", flush=True)
    n = 0
    while True:
        n += 1
        path = segs / f"{run}-{n:04d}"
        path.write_bytes(b"")
        seg = store.segment(f"kill/{run}/{n:04d}", path)
        target = rng.choice([0, 1, PART - 1, PART, 3 * PART + 5, 5 * PART])
        while path.stat().st_size < target:
            with path.open("ab") as f:
                f.write(rng.randbytes(rng.randint(1, PART)))
            seg.commit().result()
        seg.seal().result()


if __name__ == "__main__":
    main()
