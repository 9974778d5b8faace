"""Peak RSS while sealing a 1 GiB segment, next to boto3's ``upload_file`` of the same file with
the same part size and concurrency (issue 15's target: peak <= 1.2x boto3's).

Each upload runs in a child process of its own so its peak resident set (``VmHWM``) is its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

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

#: boto3's managed upload of the same file: its client made first, as ours is.
BOTO3_CHILD = (
    CHILD.split("manifest, remote")[0]
    + r"""
import boto3
from boto3.s3.transfer import TransferConfig

endpoint, bucket, path, part, conc = sys.argv[1:6]
base = hwm()
client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")  # keys: env
client.head_bucket(Bucket=bucket)
warm = rss()
client.upload_file(path, bucket, "boto3/0", Config=TransferConfig(
    multipart_threshold=int(part), multipart_chunksize=int(part), max_concurrency=int(conc)))
print(json.dumps({"peak_kib": hwm(), "after_import_kib": base, "warm_kib": warm}))
"""
)

#: The required stack alone, none of our code: SQLAlchemy Core with an SQLite connection that ran a
#: statement, s3fs (fsspec, aiobotocore, aiohttp) with its S3 client made and one request sent.
#: No store can be smaller than this; our store's own RSS before the seal is compared with it.
STACK_CHILD = (
    CHILD.split("manifest, remote")[0].replace("import json, sys, uploader", "import json, sys")
    + r"""
import sqlalchemy, s3fs

manifest, options = sys.argv[1:3]
base = hwm()
engine = sqlalchemy.create_engine(manifest)
with engine.connect() as conn:
    conn.execute(sqlalchemy.text("SELECT count(*) FROM segments")).scalar()
opts = json.loads(options)
fs = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
fs.exists("no-such-bucket-for-rss/warm-up")
warm = rss()
print(json.dumps({"peak_kib": hwm(), "after_import_kib": base, "warm_kib": warm}))
"""
)


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
        data = _child(
            CHILD,
            f"sqlite:///{tmp / 'm.db'}",
            f"s3://{bucket}/rss",
            json.dumps(s3_options(endpoint)),
            str(path),
            str(part),
            str(conc),
        )
        opts = s3_options(endpoint)
        boto = _child(
            BOTO3_CHILD,
            str(opts.get("endpoint_url", endpoint)),
            bucket,
            str(path),
            str(part),
            str(conc),
            env=_boto3_env(opts),
        )
        stack = _child(STACK_CHILD, f"sqlite:///{tmp / 'm.db'}", json.dumps(s3_options(endpoint)))
    peak = data["peak_kib"] / 1024
    warm = data["warm_kib"] / 1024
    boto_peak = boto["peak_kib"] / 1024
    budget = 64 + conc * part / MiB
    slots = conc * part / MiB
    res.measurements = {
        "peak RSS (MiB)": peak,
        "RSS after imports (MiB)": data["after_import_kib"] / 1024,
        "RSS with the store open and its S3 client made, before the seal (MiB)": warm,
        "growth during the seal (MiB)": peak - warm,
        "concurrency x part (MiB)": slots,
        "budget 64 MiB + concurrency x part (MiB)": budget,
        "boto3 upload_file peak RSS (MiB)": boto_peak,
        "boto3 RSS with its client made, before the upload (MiB)": boto["warm_kib"] / 1024,
        "the required stack alone: SQLAlchemy + SQLite, s3fs with its S3 client (MiB)": (
            stack["warm_kib"] / 1024
        ),
    }
    res.ratios = {
        "peak / boto3 peak": peak / boto_peak,
        "peak / budget": peak / budget,
        "growth during the seal / (concurrency x part)": (peak - warm) / slots,
        # The floor: the required stack's RSS before any byte, plus our seal's own growth. Above
        # 1.2 here, the target is out of reach of any store built on this stack.
        "floor: (stack alone + our growth) / boto3 peak": (stack["warm_kib"] / 1024 + peak - warm)
        / boto_peak,
    }
    res.targets = {"peak / boto3 peak": "target <= 1.2", "peak / budget": "target <= 1.0"}
    res.notes = [
        "the fixed cost (Python, SQLAlchemy Core, fsspec, botocore/aiobotocore/aiohttp and the S3 "
        "client's service model) is the RSS before the seal; the seal's own growth is the rest"
    ]
    return res


def _child(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (its own peak RSS); the JSON of its last line."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def _boto3_env(options: dict[str, Any]) -> dict[str, str]:
    """The child's environment with the server's credentials (RGW checks them; moto does not)."""
    env = dict(os.environ)
    env["AWS_ACCESS_KEY_ID"] = str(options.get("key", "testing"))
    env["AWS_SECRET_ACCESS_KEY"] = str(options.get("secret", "testing"))
    return env
