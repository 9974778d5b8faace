"""Read-back throughput: a segment read whole through ``store.open_read`` (every part's CRC32C
checked against the manifest as it passes) next to boto3 ``download_file`` of the same object,
in the same run, against the same moto server."""

from __future__ import annotations

import time

from bench.common import MiB, Result, boto3_client, new_bucket, workdir, write_file
from bench.throughput import _store, _warm


def bench_readback(endpoint: str, *, size: int = 1024 * MiB) -> Result:
    from boto3.s3.transfer import TransferConfig

    part, conc = 8 * MiB, 4
    res = Result(f"read back a {size // MiB} MiB segment ({part // MiB} MiB parts)")
    with workdir() as tmp:
        src = tmp / "seg"
        write_file(src, size, seed=3)
        bucket = new_bucket(endpoint)
        store = _store(tmp, endpoint, bucket, part, conc)
        try:
            assert store.segment("read/seg", src).seal().result().verified
            client = boto3_client(endpoint)
            _warm(client, None, bucket)
            config = TransferConfig(multipart_chunksize=part, max_concurrency=conc)
            dest = tmp / "boto"
            t0 = time.perf_counter()
            client.download_file(bucket, "ours/read/seg", str(dest), Config=config)
            t_boto = time.perf_counter() - t0
            dest.unlink()
            t0 = time.perf_counter()
            with store.open_read("read/seg") as f, (tmp / "ours").open("wb") as out:
                while block := f.read(part):
                    out.write(block)
            t_ours = time.perf_counter() - t0
            assert (tmp / "ours").stat().st_size == size
        finally:
            store.close()
    res.measurements = {
        "boto3 download_file (s)": t_boto,
        "uploader open_read, every part checked (s)": t_ours,
        "uploader MiB/s": size / MiB / t_ours,
    }
    res.ratios = {"vs boto3 (boto3 time / ours)": t_boto / t_ours}
    res.notes.append("ours reads one part at a time (no prefetch) and checks each CRC32C")
    return res
