"""Issue 4 benchmarks, each measured side by side with boto3 and s3fs against one moto server.

* seal: 4 x 64 MiB segments, 8 MiB parts, concurrency 8 (boto3 ``upload_file`` with the same part
  size and concurrency; s3fs ``put_file``). Target >= 1.0x boto3.
* small: 2,000 segments of 64 KiB (a sequential s3fs ``pipe_file`` loop). Target >= 2x.
* appends: one segment fed by 1 MiB appends with ``commit()`` after each, 256 MiB in all: manifest
  rows per second and the overhead against boto3 uploading the same bytes.
"""

from __future__ import annotations

import random
from pathlib import Path

from bench.common import (
    MiB,
    Result,
    boto3_client,
    new_bucket,
    s3_options,
    timed,
    workdir,
    write_file,
)


def _store(tmp: Path, endpoint: str, bucket: str, part: int, concurrency: int):  # type: ignore[no-untyped-def]
    import uploader

    return uploader.open(
        f"sqlite:///{tmp / f'manifest-{bucket}.db'}",
        f"s3://{bucket}/ours",
        storage_options=s3_options(endpoint),
        part_size=part,
        concurrency=concurrency,
    )


def bench_seal(endpoint: str, *, segments: int = 4, size: int = 64 * MiB) -> Result:
    import s3fs
    from boto3.s3.transfer import TransferConfig

    part, conc = 8 * MiB, 8
    res = Result(
        f"seal {segments} x {size // MiB} MiB, {part // MiB} MiB parts, concurrency {conc}"
    )
    with workdir() as tmp:
        files = []
        for i in range(segments):
            p = tmp / f"seg{i}"
            write_file(p, size, seed=i)
            files.append(p)
        total = segments * size

        bucket = new_bucket(endpoint)
        client = boto3_client(endpoint)
        config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=conc
        )

        def boto() -> None:
            # boto3 runs one file at a time with `conc` threads per file: give it the same total
            # concurrency by running the files one after the other (its usual use).
            for p in files:
                client.upload_file(str(p), bucket, f"boto/{p.name}", Config=config)

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))

        def s3fs_put() -> None:
            for p in files:
                fs.put_file(str(p), f"{bucket}/s3fs/{p.name}", chunksize=part)

        def ours() -> None:
            with _store(tmp, endpoint, bucket, part, conc) as store:
                futures = [store.segment(f"seg/{p.name}", p).seal() for p in files]
                for f in futures:
                    assert f.result().verified

        t_boto = timed(boto)
        t_s3fs = timed(s3fs_put)
        t_ours = timed(ours)
    res.measurements = {
        "boto3 upload_file (s)": t_boto,
        "s3fs put_file (s)": t_s3fs,
        "uploader seal + verify (s)": t_ours,
        "uploader MiB/s": total / MiB / t_ours,
    }
    res.ratios = {"vs boto3 (boto3 time / ours)": t_boto / t_ours, "vs s3fs": t_s3fs / t_ours}
    res.targets = {"vs boto3 (boto3 time / ours)": "target >= 1.0"}
    return res


def bench_small(endpoint: str, *, count: int = 2000, size: int = 64 * 1024) -> Result:
    import s3fs

    res = Result(f"{count} segments of {size // 1024} KiB")
    with workdir() as tmp:
        rng = random.Random(1)
        files = []
        for i in range(count):
            p = tmp / f"s{i:05d}"
            p.write_bytes(rng.randbytes(size))
            files.append(p)
        bucket = new_bucket(endpoint)
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))

        def pipe_loop() -> None:
            for p in files:
                fs.pipe_file(f"{bucket}/s3fs/{p.name}", p.read_bytes())

        def ours() -> None:
            with _store(tmp, endpoint, bucket, 8 * MiB, 8) as store:
                futures = [store.segment(f"small/{p.name}", p).seal() for p in files]
                for f in futures:
                    assert f.result().verified

        t_s3fs = timed(pipe_loop)
        t_ours = timed(ours)
    res.measurements = {
        "s3fs pipe_file loop (s)": t_s3fs,
        "uploader seals, concurrency 8 (s)": t_ours,
        "uploader segments/s": count / t_ours,
    }
    res.ratios = {"vs sequential s3fs": t_s3fs / t_ours}
    res.targets = {"vs sequential s3fs": "target >= 2.0"}
    return res


def bench_appends(endpoint: str, *, total: int = 256 * MiB, chunk: int = 1 * MiB) -> Result:
    from boto3.s3.transfer import TransferConfig

    part = 8 * MiB
    res = Result(
        f"{total // MiB} MiB fed by {chunk // MiB} MiB appends, commit() after each (not awaited)"
    )
    with workdir() as tmp:
        src = tmp / "source"
        write_file(src, total, seed=9)
        bucket = new_bucket(endpoint)
        client = boto3_client(endpoint)
        config = TransferConfig(
            multipart_threshold=part, multipart_chunksize=part, max_concurrency=4
        )

        def boto() -> None:
            client.upload_file(str(src), bucket, "boto/appends", Config=config)

        seg = tmp / "segment"
        seg.write_bytes(b"")

        def ours() -> None:
            with _store(tmp, endpoint, bucket, part, 4) as store, src.open("rb") as f:
                s = store.segment("appends/0", seg)
                # A broker commits after every append and does not block on it (the futures are
                # checked at the end): consecutive commits overlap on the network.
                futures = []
                with seg.open("ab") as out:
                    while block := f.read(chunk):
                        out.write(block)
                        out.flush()
                        futures.append(s.commit())
                sealed = s.seal()
                for fut in futures:
                    fut.result()
                assert sealed.result().verified
                res.measurements["manifest rows (commits)"] = len(
                    store.manifest.commits(store.manifest.segment("appends/0").id)  # type: ignore[union-attr]
                )

        t_boto = timed(boto)
        t_ours = timed(ours)
    res.measurements.update(
        {
            "boto3 upload_file of the same bytes (s)": t_boto,
            "uploader appends + commits + seal (s)": t_ours,
            "commit() calls per second": (total // chunk) / t_ours,
            "manifest rows per second": res.measurements["manifest rows (commits)"] / t_ours,
        }
    )
    res.ratios = {"overhead (ours / boto3)": t_ours / t_boto}
    return res
