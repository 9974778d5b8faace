"""The long version of the suite's watcher kill test: a live RocketMQ-format commit log (the test
producer, preallocated files written in place, one file a second) beside ``uploader watch
--format rocketmq`` with the default 30 s lease, which is SIGKILLed after a random 10-30 s of life
(once it made progress), then restarted; at the end every rolled file must be verified,
byte-identical, and every record's CRC must check on the remote copy. Reports the lag from a file
rolling to its segment verified (p50, p95, max): a restarted watcher takes its killed
predecessor's leases at once, so the lag does not include the lease (issue 11: p95 <= 2 s)."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import MiB, Result, workdir

ROOT = Path(__file__).resolve().parent.parent


def bench_watch_kill(*, kills: int, files: int, life: tuple[float, float] = (10.0, 30.0)) -> Result:
    sys.path.insert(0, str(ROOT))
    from tests.cli.test_watch_rocketmq_kill import kill_watchers_beside_a_producer

    res = Result(f"watch --format rocketmq SIGKILLed {kills} times beside a live commit log")
    with workdir() as tmp:
        home = tmp / "home"
        home.mkdir()
        res.measurements = kill_watchers_beside_a_producer(
            home,
            tmp / "store" / "commitlog",
            kills=kills,
            files=files,
            file_size=1 * MiB,
            life=life,
        )
    res.notes.append("target (issue 11): file rolled to verified lag p95 <= 2 s")
    res.notes.append("nothing committed past a complete record; every rolled file verified")
    return res
