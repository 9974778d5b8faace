"""Peak RSS while sealing a 1 GiB segment (target <= 64 MiB + concurrency x part_size).

The seal runs in a child process so its peak resident set (``ru_maxrss``) is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench.common import MiB, Result, new_bucket, s3_options, workdir, write_file

CHILD = r"""
import json, sys, uploader

def hwm():
    # VmHWM: this process's own peak (ru_maxrss would start from the parent's at fork).
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

manifest, remote, options, path, part, conc = sys.argv[1:7]
base = hwm()
with uploader.open(manifest, remote, storage_options=json.loads(options), part_size=int(part),
                   concurrency=int(conc)) as store:
    store.storage.head("warm-up")  # the S3 client exists: botocore's models are loaded
    warm = rss()
    assert store.segment("big/0", path).seal().result().verified
print(json.dumps({"peak_kib": hwm(), "after_import_kib": base, "warm_kib": warm}))
"""


def bench_rss(
    endpoint: str, *, size: int = 1024 * MiB, part: int = 8 * MiB, conc: int = 4
) -> Result:
    res = Result(
        f"peak RSS sealing a {size // MiB} MiB segment ({part // MiB} MiB parts, concurrency {conc})"
    )
    with workdir() as tmp:
        path = tmp / "big"
        write_file(path, size, seed=3)
        bucket = new_bucket(endpoint)
        # The manifest exists already, as for a sidecar restarted against its manifest (or after
        # `uploader db upgrade`): creating one also loads Alembic (+12 MiB) in the child.
        from uploader.manifest.repo import Manifest

        Manifest.open(f"sqlite:///{tmp / 'm.db'}").close()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD,
                f"sqlite:///{tmp / 'm.db'}",
                f"s3://{bucket}/rss",
                json.dumps(s3_options(endpoint)),
                str(path),
                str(part),
                str(conc),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    peak = data["peak_kib"] / 1024
    warm = data["warm_kib"] / 1024
    budget = 64 + conc * part / MiB
    slots = conc * part / MiB
    res.measurements = {
        "peak RSS (MiB)": peak,
        "RSS after imports (MiB)": data["after_import_kib"] / 1024,
        "RSS with the store open and its S3 client made, before the seal (MiB)": warm,
        "growth during the seal (MiB)": peak - warm,
        "concurrency x part (MiB)": slots,
        "budget 64 MiB + concurrency x part (MiB)": budget,
    }
    res.ratios = {
        "peak / budget": peak / budget,
        "growth during the seal / (concurrency x part)": (peak - warm) / slots,
    }
    res.targets = {"peak / budget": "target <= 1.0"}
    res.notes = [
        "the fixed cost (Python, SQLAlchemy Core, fsspec, botocore/aiobotocore/aiohttp and the S3 "
        "client's service model) is the RSS before the seal; the seal's own growth is the rest"
    ]
    return res
