"""Run the benchmarks: ``python -m bench [--quick] [NAME ...]``.

Every ratio is measured in the same run against the same moto server (boto3 and s3fs side by
side). ``--quick`` shrinks the sizes for a smoke run; the numbers in docs/benchmarks.md come from a
full run. Results are also written as JSON (``--out``, default ``bench/results.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.common import MiB, Result, moto_server, save

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", choices=[*NAMES, []], default=[])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results.json")
    parser.add_argument("--kills", type=int, default=200, help="SIGKILLs for the kill benchmark")
    args = parser.parse_args(argv)
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
    with moto_server() as endpoint:
        for name in names:
            if name == "seal":
                r = bench_seal(endpoint, size=(16 if quick else 64) * MiB)
            elif name == "small":
                r = bench_small(endpoint, count=200 if quick else 2000)
            elif name == "appends":
                r = bench_appends(endpoint, total=(32 if quick else 256) * MiB)
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
            r.show()
            sys.stdout.flush()
            results.append(r)
    save(results, args.out)
    print(f"\nresults written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
