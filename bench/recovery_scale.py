"""Recovery at scale: 1,000,000 verified segments and 100 unfinished ones.

Measures how long recovery takes to find and claim the 100 (``claim_next`` until it returns
None) on SQLite and on PostgreSQL (target <= 100 ms), and the resident memory while doing it
(flat: nothing is loaded per verified row). The verified rows are generated in SQL (a recursive
CTE on SQLite, ``generate_series`` on PostgreSQL) so building the manifest takes seconds.
"""

from __future__ import annotations

import resource
import time

from sqlalchemy import text

from bench.common import Result, drop_pg_database, new_pg_database, upgrade_schema, workdir
from uploader.config import DEFAULT_CONCURRENCY

COLUMNS = (
    "key, path, node, state, part_size, size, crc32c, expected_etag, upload_mode, fence, "
    "attempts, created_at, updated_at, sealed_at, verified_at"
)


def _fill(manifest, verified: int, unfinished: int) -> None:  # type: ignore[no-untyped-def]
    now = "'2026-01-01 00:00:00'"
    values = (
        "'verified/' || {n}, '/data/v' || {n}, 'node-a', 'verified', 8388608, 1, 1, "
        f"'e', 'put', 1, 0, {now}, {now}, {now}, {now}"
    )
    with manifest.engine.begin() as conn:
        if manifest.is_postgres:
            conn.execute(
                text(
                    f"INSERT INTO segments ({COLUMNS}) SELECT "
                    + values.format(n="g")
                    + f" FROM generate_series(1, {verified}) AS g"
                )
            )
        else:
            conn.execute(
                text(
                    f"WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < {verified}) "
                    f"INSERT INTO segments ({COLUMNS}) SELECT " + values.format(n="n") + " FROM c"
                )
            )
        # The unfinished ones: sealed, all parts uploaded (claimable from any node).
        for i in range(unfinished):
            seg_id = conn.execute(
                text(
                    f"INSERT INTO segments ({COLUMNS}) VALUES ('todo/{i}', '/data/t{i}', 'node-a', "
                    f"'sealed', 8388608, 1, 1, 'e', 'put', 1, 0, {now}, {now}, {now}, NULL) RETURNING id"
                )
            ).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO commits (segment_id, part_number, start_offset, end_offset, md5, "
                    f"crc32c, etag, state, attempts, created_at, updated_at) VALUES ({seg_id}, 1, 0, 1, "
                    f"'e', 1, 'e', 'uploaded', 0, {now}, {now})"
                )
            )
        if manifest.is_postgres:
            conn.execute(text("ANALYZE segments"))
            conn.execute(text("ANALYZE commits"))
        else:
            conn.execute(text("ANALYZE"))


def _claim_all(manifest, batch: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """What a recovery pass does to find its work: claim batches until none is left."""
    start = time.perf_counter()
    claimed = 0
    after = 0
    while True:
        got = manifest.claim("bench-worker", node="node-b", ttl=60, after_id=after, limit=batch)
        if not got:
            break
        claimed += len(got)
        after = got[-1][1].id
    return time.perf_counter() - start, claimed


def _one(url: str, label: str, verified: int, unfinished: int, res: Result) -> None:
    from uploader.manifest.repo import Manifest

    upgrade_schema(url)
    m = Manifest.open(url)
    try:
        t0 = time.perf_counter()
        _fill(m, verified, unfinished)
        res.measurements[f"{label}: build manifest (s)"] = time.perf_counter() - t0
        # recover claims as many as it drives at once (its concurrency, default
        # DEFAULT_CONCURRENCY): that is the target; one claim per transaction is shown beside it.
        for batch in (DEFAULT_CONCURRENCY, 8, 1):
            # Each round finds the same 100: release them by expiring the leases in SQL.
            with m.engine.begin() as conn:
                conn.execute(text("UPDATE segments SET lease_owner = NULL, lease_expires = NULL"))
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            elapsed, claimed = _claim_all(m, batch)
            rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            assert claimed == unfinished, (claimed, unfinished)
            what = f"{label}, batches of {batch}"
            res.measurements[f"{what}: find and claim {unfinished} (ms)"] = elapsed * 1000
            res.measurements[f"{what}: peak RSS growth (MiB)"] = rss1 - rss0
            if batch == DEFAULT_CONCURRENCY:
                res.ratios[f"{what}: claim time / 100 ms"] = elapsed * 1000 / 100
                res.targets[f"{what}: claim time / 100 ms"] = "target <= 1.0"
    finally:
        m.close()


def bench_recovery_scale(*, verified: int = 1_000_000, unfinished: int = 100) -> Result:
    res = Result(f"recovery: find and claim {unfinished} among {verified:,} verified segments")
    with workdir() as tmp:
        _one(f"sqlite:///{tmp / 'scale.db'}", "SQLite", verified, unfinished, res)
    import psycopg

    try:
        url = new_pg_database()
    except psycopg.OperationalError as exc:
        res.notes.append(f"PostgreSQL skipped: {exc}")
        return res
    try:
        _one(url, "PostgreSQL", verified, unfinished, res)
    finally:
        drop_pg_database(url)
    return res
