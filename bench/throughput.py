"""Throughput benchmarks, each measured side by side with boto3 and s3fs against one S3 server.

* seal: 4 x 64 MiB segments, 8 MiB parts, concurrency 8 (boto3 ``upload_file`` with the same part
  size and concurrency; s3fs ``put_file``). Target >= 1.0x boto3.
* small: 2,000 segments of 64 KiB shipped with ``store.ship_many`` (the group commit) vs a
  sequential s3fs ``pipe_file`` loop. Target >= 2x. Also timed: the same files sealed one at a
  time (``store.segment(...).seal()`` each). The same run also measures the server's ceiling:
  the same PUTs (and PUT + HEAD) sent 8 at a time with nothing recorded and nothing verified,
  which no client of this server can beat, and boto3 doing the same bare PUTs from 8 threads
  (the issue's second yardstick: >= 1.0x), and once more with the headers our PUT carries
  (If-None-Match, the proof of the bytes, our metadata): what those cost the server.

Each comparison runs ``rounds`` times, the clients' order rotated from round to round; ratios are
the median of the rounds' ratios, shown with their [min..max].

Every client is set up before its clock starts (boto3 client created, s3fs and our store opened)
and has made one request, so the timed part is the shipping alone; opening our store (an SQLite
manifest created and migrated) is reported on its own line.
* appends: one segment fed by 1 MiB appends with ``commit()`` after each, 256 MiB in all: manifest
  rows per second and the overhead against boto3 uploading the same bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fsspec.asyn import sync

from bench.common import (
    MiB,
    Result,
    alternate,
    boto3_client,
    empty_bucket,
    manifest_url,
    new_bucket,
    s3_options,
    timed_both,
    workdir,
    write_file,
)


def _store(tmp: Path, endpoint: str, bucket: str, part: int, concurrency: int):  # type: ignore[no-untyped-def]
    """Our store (its manifest as ``--manifest`` says), opened and warmed by one request (like
    the other clients before their clock)."""
    import uploader

    store = uploader.open(
        manifest_url(tmp, bucket),
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


def bench_seal(
    endpoint: str, *, segments: int = 4, size: int = 64 * MiB, rounds: int = 3
) -> Result:
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

        def boto(_r: int) -> None:
            # boto3 runs one file at a time with `conc` threads per file: give it the same total
            # concurrency by running the files one after the other (its usual use).
            for p in files:
                client.upload_file(str(p), bucket, f"boto/{p.name}", Config=config)

        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))

        def s3fs_put(_r: int) -> None:
            for p in files:
                fs.put_file(str(p), f"{bucket}/s3fs/{p.name}", chunksize=part)

        _warm(client, fs, bucket)
        t_open = time.perf_counter()
        store = _store(tmp, endpoint, bucket, part, conc)
        t_open = time.perf_counter() - t_open

        def ours(r: int) -> None:
            futures = [store.segment(f"seg{r}/{p.name}", p).seal() for p in files]
            for f in futures:
                assert f.result().verified

        try:
            m = alternate(
                {"boto3": boto, "s3fs": s3fs_put, "ours": ours},
                rounds,
                between=lambda: empty_bucket(endpoint, bucket),
            )
            md5_mode = not store.manifest.segment(f"seg0/{files[0].name}").by_crc32c
        finally:
            store.close()
        md5_cpu = _md5_cpu(files)
    gib = total / (1024 * MiB)
    res.measurements = {
        f"boto3 upload_file (s, median of {rounds})": m.median("boto3"),
        "s3fs put_file (s)": m.median("s3fs"),
        "uploader seal + verify (s)": m.median("ours"),
        "server CPU during boto3 (s)": m.median("boto3", "server"),
        "server CPU during s3fs (s)": m.median("s3fs", "server"),
        "server CPU during uploader (s)": m.median("ours", "server"),
        "client CPU per GiB, boto3 (s)": m.median("boto3", "client") / gib,
        "client CPU per GiB, s3fs (s)": m.median("s3fs", "client") / gib,
        "client CPU per GiB, uploader (s)": m.median("ours", "client") / gib,
        "uploader MiB/s": total / MiB / m.median("ours"),
        "uploader store open, new manifest (s, not in the above)": t_open,
    }
    m.ratio(res, "vs boto3 (boto3 time / ours)", "boto3", "ours")
    m.ratio(res, "vs s3fs", "s3fs", "ours")
    m.ratio(res, "client CPU per GiB (ours / boto3)", "ours", "boto3", "client")
    res.measurements["MD5 of every byte on this machine, one core (s per GiB)"] = md5_cpu / gib
    if md5_mode:
        # The remote keeps no additional checksum (Ceph RGW 16): the MD5 is the only proof it
        # gives of the bytes, so no client that proves them can spend less than this.
        m.client["ours without the MD5"] = [c - md5_cpu for c in m.client["ours"]]
        m.ratio(
            res,
            "client CPU per GiB without the MD5 (md5 mode) / boto3",
            "ours without the MD5",
            "boto3",
            "client",
        )
        res.notes.append(
            "this remote ran the md5 mode (it keeps no CRC32C): the MD5 of every byte is the "
            "only proof of the bytes it offers"
        )
    res.targets = {
        "vs boto3 (boto3 time / ours)": "target >= 1.0",
        "client CPU per GiB (ours / boto3)": "target <= 1.0",
    }
    return res


def _md5_cpu(files: list[Path]) -> float:
    """CPU seconds of the MD5 of every byte of ``files`` (read from the page cache, 8 MiB at a
    time), in this process: what the md5 mode must spend whatever else it does."""
    import hashlib

    start = time.process_time()
    for p in files:
        h = hashlib.md5(usedforsecurity=False)
        with p.open("rb", buffering=0) as f:
            while block := f.read(8 * MiB):
                h.update(block)
    return time.process_time() - start


def bench_small(
    endpoint: str, *, count: int = 2000, size: int = 64 * 1024, rounds: int = 3
) -> Result:
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

        def pipe_loop(r: int) -> None:
            for p in files:
                fs.pipe_file(f"{bucket}/s3fs{r}/{p.name}", p.read_bytes())

        def bare(head: bool) -> Callable[[int], None]:
            """The server's ceiling: 8 requests at a time, nothing recorded, nothing checked."""

            async def run(r: int) -> None:
                sem = asyncio.Semaphore(8)

                async def one(p: Path) -> None:
                    async with sem:
                        key = f"bare{int(head)}-{r}/{p.name}"
                        await fs._call_s3("put_object", Bucket=bucket, Key=key, Body=p.read_bytes())
                        if head:
                            await fs._call_s3("head_object", Bucket=bucket, Key=key)

                await asyncio.gather(*(one(p) for p in files))

            return lambda r: sync(fs.loop, run, r)

        client = boto3_client(endpoint)
        _warm(client, fs, bucket)
        store = _store(tmp, endpoint, bucket, 8 * MiB, 8)
        # boto3 clients are thread-safe; the pool exists before the clock starts, as ours does.
        boto_pool = ThreadPoolExecutor(8, thread_name_prefix="bench-boto3")

        def boto_threads(r: int) -> None:
            """The issue's other yardstick: boto3, 8 threads, bare PUTs (nothing recorded or
            checked beyond what boto3 itself does)."""

            def one(p: Path) -> None:
                client.put_object(Bucket=bucket, Key=f"boto{r}/{p.name}", Body=p.read_bytes())

            list(boto_pool.map(one, files))

        # What our PUT of a small segment carries beyond boto3's bare one, for boto3 to send too:
        # If-None-Match (never over another's object), the proof of the bytes (Content-MD5, or
        # the CRC32C where the remote keeps it) and our metadata (objectmeta, format 2).
        by_crc32c = store.new_segment_checksum() == "crc32c"

        def boto_like_ours(r: int) -> None:
            """boto3, 8 threads, each PUT with the headers ours carries (nothing recorded): the
            server's cost of what our PUT must say, apart from our client's."""

            def one(p: Path) -> None:
                body = p.read_bytes()
                client.put_object(
                    Bucket=bucket,
                    Key=f"like{r}/{p.name}",
                    Body=body,
                    IfNoneMatch="*",
                    Metadata=_metadata_like_ours(p, body, by_crc32c),
                    **_proof_like_ours(body, by_crc32c),
                )

            list(boto_pool.map(one, files))

        def ours(r: int) -> None:
            # The group commit: intents and outcomes of up to 256 segments per transaction.
            futures = store.ship_many([(f"small{r}/{p.name}", p) for p in files])
            for f in futures:
                assert f.result().verified

        def one_by_one() -> None:
            futures = [store.segment(f"single/{p.name}", p).seal() for p in files]
            for f in futures:
                assert f.result().verified

        try:
            m = alternate(
                {
                    "s3fs": pipe_loop,
                    "put": bare(head=False),
                    "put+head": bare(head=True),
                    "boto3 threads": boto_threads,
                    "boto3 like ours": boto_like_ours,
                    "ours": ours,
                },
                rounds,
                between=lambda: empty_bucket(endpoint, bucket),
            )
            t_single, _c_single, k_single = timed_both(one_by_one)
        finally:
            boto_pool.shutdown()
            store.close()
    res.measurements = {
        f"s3fs pipe_file loop (s, median of {rounds})": m.median("s3fs"),
        "server CPU during the s3fs loop (s)": m.median("s3fs", "server"),
        "server CPU during uploader (s)": m.median("ours", "server"),
        "client CPU per segment, uploader (ms)": 1000 * m.median("ours", "client") / count,
        "bare PUTs, 8 at a time (s)": m.median("put"),
        "client CPU per segment, bare PUTs (ms)": 1000 * m.median("put", "client") / count,
        "boto3 bare PUTs, 8 threads (s)": m.median("boto3 threads"),
        "client CPU per segment, boto3 bare PUTs (ms)": 1000
        * m.median("boto3 threads", "client")
        / count,
        "boto3 PUTs with our headers, 8 threads (s)": m.median("boto3 like ours"),
        "server CPU per segment, boto3 bare PUTs (ms)": 1000
        * m.median("boto3 threads", "server")
        / count,
        "server CPU per segment, boto3 with our headers (ms)": 1000
        * m.median("boto3 like ours", "server")
        / count,
        "server CPU per segment, uploader (ms)": 1000 * m.median("ours", "server") / count,
        "bare PUT + HEAD, 8 at a time (s)": m.median("put+head"),
        "uploader ship_many, concurrency 8 (s)": m.median("ours"),
        "uploader segments/s": count / m.median("ours"),
        "uploader seals one at a time, concurrency 8 (s, once)": t_single,
        "client CPU per segment, one at a time (ms)": 1000 * k_single / count,
    }
    m.ratio(res, "vs sequential s3fs", "s3fs", "ours")
    m.ratio(res, "vs bare PUTs 8 at a time", "put", "ours")
    m.ratio(res, "vs boto3 bare PUTs, 8 threads", "boto3 threads", "ours")
    m.ratio(res, "vs boto3 PUTs with our headers, 8 threads", "boto3 like ours", "ours")
    m.ratio(
        res,
        "server's cost of our headers: boto3 bare vs with them",
        "boto3 like ours",
        "boto3 threads",
    )
    m.ratio(res, "server ceiling, bare PUTs vs sequential s3fs", "s3fs", "put")
    m.ratio(res, "server ceiling, bare PUT + HEAD vs sequential s3fs", "s3fs", "put+head")
    res.ratios["one at a time vs sequential s3fs"] = m.median("s3fs") / t_single
    res.targets = {
        "vs sequential s3fs": "target >= 2.0",
        "vs boto3 bare PUTs, 8 threads": "target >= 1.0",
    }
    return res


def _proof_like_ours(body: bytes, by_crc32c: bool) -> dict[str, str]:
    """The proof of the bytes our PUT sends: the CRC32C where the remote keeps it, else
    Content-MD5."""
    from uploader.digest import checksum, crc32c_b64

    md5, crc = checksum(body)
    if by_crc32c:
        return {"ChecksumCRC32C": crc32c_b64(crc)}
    return {"ContentMD5": base64.b64encode(bytes.fromhex(md5)).decode()}


def _metadata_like_ours(p: Path, body: bytes, by_crc32c: bool) -> dict[str, str]:
    """Metadata of the size and shape ours writes for a one-part segment (objectmeta format 2)."""
    import hashlib
    from urllib.parse import quote

    from uploader import objectmeta
    from uploader.digest import checksum

    md5, crc = checksum(body)
    P = objectmeta.P
    parts = f"{'-' if by_crc32c else md5}:{crc:08x}"
    fields = {
        P + "part-size": str(8 * MiB),
        P + "node": "bench",
        P + "path": quote(str(p), safe="/"),
        **({P + "checksum": "crc32c"} if by_crc32c else {}),
        P + "size": str(len(body)),
        P + "crc32c": f"{crc:08x}",
        **({} if by_crc32c else {P + "etag": md5}),
        P + "mode": "put",
        P + "parts-sha256": hashlib.sha256(parts.encode()).hexdigest(),
        P + "parts": parts,
    }
    # S3 metadata names go without their x-amz-meta- prefix here, as boto3 takes them.
    return objectmeta.encode(fields)


def bench_appends(
    endpoint: str, *, total: int = 256 * MiB, chunk: int = 1 * MiB, rounds: int = 3
) -> Result:
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

        def boto(_r: int) -> None:
            client.upload_file(str(src), bucket, "boto/appends", Config=config)

        _warm(client, None, bucket)
        store = _store(tmp, endpoint, bucket, part, 4)
        rows: list[int] = []

        def ours(r: int) -> None:
            seg = tmp / f"segment{r}"
            with src.open("rb") as f:
                s = store.segment(f"appends/{r}", seg)
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
                rows.append(len(store.manifest.commits(store.manifest.segment(f"appends/{r}").id)))

        def appends_alone(r: int) -> None:
            # The broker's own work, the same in both worlds: the appends with nothing shipped.
            with src.open("rb") as f, (tmp / f"plain{r}").open("ab") as out:
                while block := f.read(chunk):
                    out.write(block)
                    out.flush()

        for p in (tmp / f"segment{r}" for r in range(rounds)):
            p.write_bytes(b"")
        try:
            m = alternate(
                {"boto3": boto, "ours": ours, "alone": appends_alone},
                rounds,
                between=lambda: empty_bucket(endpoint, bucket),
            )
        finally:
            store.close()
    t_ours = m.median("ours")
    res.measurements = {
        f"boto3 upload_file of the same bytes (s, median of {rounds})": m.median("boto3"),
        "uploader appends + commits + seal (s)": t_ours,
        "the appends alone, nothing shipped (s)": m.median("alone"),
        "commit() calls per second": (total // chunk) / t_ours,
        "manifest rows (commits) per segment": float(rows[-1]),
        "manifest rows per second": rows[-1] / t_ours,
    }
    # The ratio: our appends, commits and seal against boto3 uploading a file that
    # already exists. Beside it, like for like: a broker shipping with boto3 appends first and
    # uploads the finished file (appends alone + upload_file), against ours, which ships while
    # it appends.
    m.ratio(res, "overhead (ours / boto3)", "ours", "boto3")
    m.wall["boto3+alone"] = [a + b for a, b in zip(m.wall["boto3"], m.wall["alone"], strict=True)]
    m.ratio(res, "like for like (ours / (appends alone + boto3))", "ours", "boto3+alone")
    res.targets = {"overhead (ours / boto3)": "target <= 1.10"}
    return res
