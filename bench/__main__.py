"""Run the benchmarks: ``python -m bench [--quick] [NAME ...]``.

Every ratio is measured in the same run against the same S3 server (boto3 and s3fs side by
side). The comparisons that talk to S3 run on moto and on Ceph RGW (``--server``; RGW is started by
../shared/s3/start-rgw.sh when it is not up); the local ones (recovery, check, kill, watchkill) run
once. ``--quick`` shrinks the sizes for a smoke run; the numbers in docs/benchmarks.md come from a
full run. Results are also written as JSON (``--out``, default ``bench/results.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from bench import common
from bench.common import MiB, Result, drop_buckets, drop_pg_databases, moto_server, rgw_server, save

NAMES = (
    "seal",
    "small",
    "appends",
    "rss",
    "recovery",
    "resume",
    "kill",
    "check",
    "watchkill",
    "readback",
)
#: The benchmarks that talk to an S3 server (run once per server); the others run once.
REMOTE = ("seal", "small", "appends", "rss", "resume", "readback")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*NAMES, []], default=[])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the seal, small and appends comparisons (each ratio: median [min..max])",
    )
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs for the kill benchmark")
    parser.add_argument(
        "--server",
        choices=("moto", "rgw", "both"),
        default="both",
        help="S3 server(s) for the comparisons that talk to S3 (default: both)",
    )
    parser.add_argument(
        "--manifest",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="our stores' manifest in the seal, small, appends and readback comparisons: an "
        "SQLite file (default) or a new database on the local PostgreSQL server",
    )
    args = parser.parse_args(argv)
    common.MANIFEST = args.manifest
    names = args.names or list(NAMES)
    quick = args.quick
    # Imported after the environment is set: moto reads it at import.
    os.environ.setdefault("S3_UPLOAD_PART_MIN_SIZE", str(5 * MiB))
    from bench.local_check import bench_local_check
    from bench.memory import bench_rss
    from bench.readback import bench_readback
    from bench.recovery_scale import bench_recovery_scale
    from bench.resume import bench_kill, bench_resume
    from bench.throughput import bench_appends, bench_seal, bench_small
    from bench.watch_kill import bench_watch_kill

    results: list[Result] = []

    def run(name: str, endpoint: str, server: str) -> None:
        if name == "seal":
            r = bench_seal(endpoint, size=(16 if quick else 64) * MiB, rounds=args.rounds)
        elif name == "small":
            r = bench_small(endpoint, count=200 if quick else 2000, rounds=args.rounds)
        elif name == "appends":
            r = bench_appends(endpoint, total=(32 if quick else 256) * MiB, rounds=args.rounds)
        elif name == "rss":
            r = bench_rss(endpoint, size=(128 if quick else 1024) * MiB)
        elif name == "recovery":
            r = bench_recovery_scale(verified=100_000 if quick else 1_000_000)
        elif name == "resume":
            r = bench_resume(endpoint)
        elif name == "check":
            r = bench_local_check(size=(128 if quick else 1024) * MiB)
        elif name == "readback":
            r = bench_readback(endpoint, size=(64 if quick else 1024) * MiB)
        elif name == "watchkill":
            r = (
                bench_watch_kill(kills=3, files=20, life=(2.0, 5.0))
                if quick
                else bench_watch_kill(kills=12, files=400)
            )
        else:
            r = bench_kill(kills=20 if quick else args.kills)
        if name in REMOTE:
            manifest = ", PostgreSQL manifest" if common.MANIFEST == "postgresql" else ""
            r.name = f"{r.name} [{server}{manifest}]"
        r.show()
        sys.stdout.flush()
        results.append(r)

    try:
        _run_all(args, names, run)
    finally:
        drop_pg_databases()
    save(results, args.out)
    print(f"\nresults written to {args.out}")
    return 0


def _run_all(args: argparse.Namespace, names: list[str], run: Any) -> None:
    servers = ["moto", "rgw"] if args.server == "both" else [args.server]
    remote = [n for n in names if n in REMOTE]
    local = [n for n in names if n not in REMOTE]
    for server in servers:
        if not remote:
            break
        with moto_server() if server == "moto" else rgw_server() as endpoint:
            print(f"\n##### S3 server: {server} ({endpoint})")
            for name in remote:
                try:
                    run(name, endpoint, server)
                finally:
                    # After each benchmark: Ceph RGW's memstore (4 GiB) fills up within one run
                    # otherwise, and a full OSD makes RGW stop answering.
                    drop_buckets(endpoint)
    if local:
        # The local benchmarks start what they need themselves (kill: its own moto server).
        with moto_server() as endpoint:
            for name in local:
                run(name, endpoint, "moto")


if __name__ == "__main__":
    raise SystemExit(main())
