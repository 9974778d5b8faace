"""Throughput benchmarks, each measured side by side with boto3 and s3fs against one S3 server.

* seal: 4 x 64 MiB segments, 8 MiB parts, concurrency 8 (boto3 ``upload_file`` with the same part
  size and concurrency; s3fs ``put_file``). Target >= 1.0x boto3.
* small: 2,000 segments of 64 KiB shipped with ``store.ship_many`` (the group commit) vs a
  sequential s3fs ``pipe_file`` loop. Target >= 2x. Also timed: the same files sealed one at a
  time (``store.segment(...).seal()`` each). The same run also measures the server's ceiling:
  the same PUTs (and PUT + HEAD) sent 8 at a time with nothing recorded and nothing verified,
  which no client of this server can beat.

Every client is set up before its clock starts (boto3 client created, s3fs and our store opened)
and has made one request, so the timed part is the shipping alone; opening our store (an SQLite
manifest created and migrated) is reported on its own line.
* appends: one segment fed by 1 MiB appends with ``commit()`` after each, 256 MiB in all: manifest
  rows per second and the overhead against boto3 uploading the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from pathlib import Path

from fsspec.asyn import sync

from bench.common import (
    MiB,
    Result,
    boto3_client,
    new_bucket,
    s3_options,
    timed,
    timed_both,
    timed_cpu,
    workdir,
    write_file,
)


def _store(tmp: Path, endpoint: str, bucket: str, part: int, concurrency: int):  # type: ignore[no-untyped-def]
    """Our store, opened and warmed by one request (like the other clients before their clock)."""
    import uploader

    store = uploader.open(
        f"sqlite:///{tmp / f'manifest-{bucket}.db'}",
        f"s3://{bucket}/ours",
        storage_options=s3_options(endpoint),
        part_size=part,
        concurrency=concurrency,
    )
    store.storage.head("warm-up")
    return store


def _warm(client, fs, bucket: str) -> None:  # type: ignore[no-untyped-def]
    """One request through each baseline client before its clock starts."""
    from botocore.exceptions import ClientError

    with contextlib.suppress(ClientError):
        client.head_object(Bucket=bucket, Key="warm-up")
    if fs is not None:
        fs.exists(f"{bucket}/warm-up")


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

        _warm(client, fs, bucket)
        t_open = time.perf_counter()
        store = _store(tmp, endpoint, bucket, part, conc)
        t_open = time.perf_counter() - t_open

        def ours() -> None:
            futures = [store.segment(f"seg/{p.name}", p).seal() for p in files]
            for f in futures:
                assert f.result().verified

        try:
            t_boto, c_boto, k_boto = timed_both(boto)
            t_s3fs, c_s3fs, k_s3fs = timed_both(s3fs_put)
            t_ours, c_ours, k_ours = timed_both(ours)
        finally:
            store.close()
    gib = total / (1024 * MiB)
    res.measurements = {
        "boto3 upload_file (s)": t_boto,
        "s3fs put_file (s)": t_s3fs,
        "uploader seal + verify (s)": t_ours,
        "server CPU during boto3 (s)": c_boto,
        "server CPU during s3fs (s)": c_s3fs,
        "server CPU during uploader (s)": c_ours,
        "client CPU per GiB, boto3 (s)": k_boto / gib,
        "client CPU per GiB, s3fs (s)": k_s3fs / gib,
        "client CPU per GiB, uploader (s)": k_ours / gib,
        "uploader MiB/s": total / MiB / t_ours,
        "uploader store open, new manifest (s, not in the above)": t_open,
    }
    res.ratios = {
        "vs boto3 (boto3 time / ours)": t_boto / t_ours,
        "vs s3fs": t_s3fs / t_ours,
        "client CPU per GiB (ours / boto3)": k_ours / k_boto,
    }
    res.targets = {
        "vs boto3 (boto3 time / ours)": "target >= 1.0",
        "client CPU per GiB (ours / boto3)": "target <= 1.0",
    }
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

        def bare(head: bool) -> Callable[[], None]:
            """The server's ceiling: 8 requests at a time, nothing recorded, nothing checked."""

            async def run() -> None:
                sem = asyncio.Semaphore(8)

                async def one(p: Path) -> None:
                    async with sem:
                        key = f"bare{int(head)}/{p.name}"
                        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=p.read_bytes())
                        if head:
                            await fs._call_s3("head_object", Bucket=bucket, Key=key)

                await asyncio.gather(*(one(p) for p in files))

            return lambda: sync(fs.loop, run)

        client = boto3_client(endpoint)
        _warm(client, fs, bucket)
        store = _store(tmp, endpoint, bucket, 8 * MiB, 8)

        def ours() -> None:
            # The group commit: intents and outcomes of up to 256 segments per transaction.
            futures = store.ship_many([(f"small/{p.name}", p) for p in files])
            for f in futures:
                assert f.result().verified

        def one_by_one() -> None:
            futures = [store.segment(f"single/{p.name}", p).seal() for p in files]
            for f in futures:
                assert f.result().verified

        try:
            t_s3fs, c_s3fs = timed_cpu(pipe_loop)
            t_put = timed(bare(head=False))
            t_put_head = timed(bare(head=True))
            t_ours, c_ours, k_ours = timed_both(ours)
            t_single, _c_single, k_single = timed_both(one_by_one)
        finally:
            store.close()
    res.measurements = {
        "s3fs pipe_file loop (s)": t_s3fs,
        "server CPU during the s3fs loop (s)": c_s3fs,
        "server CPU during uploader (s)": c_ours,
        "client CPU per segment, uploader (ms)": 1000 * k_ours / count,
        "bare PUTs, 8 at a time (s)": t_put,
        "bare PUT + HEAD, 8 at a time (s)": t_put_head,
        "uploader ship_many, concurrency 8 (s)": t_ours,
        "uploader segments/s": count / t_ours,
        "uploader seals one at a time, concurrency 8 (s)": t_single,
        "client CPU per segment, one at a time (ms)": 1000 * k_single / count,
    }
    res.ratios = {
        "vs sequential s3fs": t_s3fs / t_ours,
        "one at a time vs sequential s3fs": t_s3fs / t_single,
        "server ceiling, bare PUTs vs sequential s3fs": t_s3fs / t_put,
        "server ceiling, bare PUT + HEAD vs sequential s3fs": t_s3fs / t_put_head,
    }
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

        _warm(client, None, bucket)
        store = _store(tmp, endpoint, bucket, part, 4)

        def ours() -> None:
            with store, src.open("rb") as f:
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
                    store.manifest.commits(store.manifest.segment("appends/0").id)
                )

        plain = tmp / "plain"

        def appends_alone() -> None:
            # The broker's own work, the same in both worlds: the appends with nothing shipped.
            with src.open("rb") as f, plain.open("ab") as out:
                while block := f.read(chunk):
                    out.write(block)
                    out.flush()

        t_boto = timed(boto)
        t_ours = timed(ours)
        t_alone = timed(appends_alone)
    res.measurements.update(
        {
            "boto3 upload_file of the same bytes (s)": t_boto,
            "uploader appends + commits + seal (s)": t_ours,
            "the appends alone, nothing shipped (s)": t_alone,
            "commit() calls per second": (total // chunk) / t_ours,
            "manifest rows per second": res.measurements["manifest rows (commits)"] / t_ours,
        }
    )
    # The ratio: our appends, commits and seal against boto3 uploading a file that
    # already exists. Beside it, like for like: a broker shipping with boto3 appends first and
    # uploads the finished file (appends alone + upload_file), against ours, which ships while
    # it appends.
    res.ratios = {
        "overhead (ours / boto3)": t_ours / t_boto,
        "like for like (ours / (appends alone + boto3))": t_ours / (t_alone + t_boto),
    }
    res.targets = {"overhead (ours / boto3)": "target <= 1.10"}
    return res
