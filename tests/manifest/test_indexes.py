"""Finding unfinished work does not scan finished rows, and the overview (status, deletable) is right.

The plans are taken for the exact statements the manifest sends: they are captured from the engine
while ``claim_next``, ``live_upload_ids`` and ``status`` run, then EXPLAINed on the same connection
type (``EXPLAIN`` on PostgreSQL after ``ANALYZE``, ``EXPLAIN QUERY PLAN`` on SQLite).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert

from tests.conftest import md5
from uploader.digest import checksum, multipart_etag
from uploader.manifest.models import UNFINISHED_SEGMENTS_SQL
from uploader.manifest.repo import Manifest
from uploader.manifest.rowmap import COMMITS as C
from uploader.manifest.rowmap import SEGMENTS as S
from uploader.records import NewCommit
from uploader.states import SegmentState

T0 = datetime(2031, 3, 1, 0, 0, 0)
VERIFIED = 4000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


def part(number: int, start: int, size: int) -> NewCommit:
    md5, crc = checksum(bytes([number]) * size)
    return NewCommit(number, start, start + size, md5, crc)


def bulk_verified(m: Manifest, n: int) -> None:
    """``n`` verified segments with one verified part each, written directly (fast)."""
    seg_rows = [
        {
            "key": f"done/{i:08d}",
            "path": f"/data/done/{i:08d}",
            "node": "n1",
            "state": "verified",
            "part_size": 4,
            "size": 4,
            "crc32c": 1,
            "expected_etag": "e" * 32,
            "upload_mode": "put",
            "fence": 1,
            "attempts": 0,
            "created_at": T0,
            "updated_at": T0,
            "sealed_at": T0,
            "verified_at": T0,
        }
        for i in range(n)
    ]
    with m.engine.begin() as conn:
        conn.execute(insert(S), seg_rows)
        ids = [r[0] for r in conn.exec_driver_sql("SELECT id FROM segments ORDER BY id")]
        conn.execute(
            insert(C),
            [
                {
                    "segment_id": seg_id,
                    "part_number": 1,
                    "start_offset": 0,
                    "end_offset": 4,
                    "md5": "m" * 32,
                    "crc32c": 1,
                    "etag": "m" * 32,
                    "state": "verified",
                    "attempts": 0,
                    "created_at": T0,
                    "updated_at": T0,
                }
                for seg_id in ids
            ],
        )


@contextmanager
def captured(m: Manifest) -> Iterator[list[tuple[str, Any]]]:
    statements: list[tuple[str, Any]] = []

    def before(
        conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool
    ) -> None:
        statements.append((statement, parameters))

    event.listen(m.engine, "before_cursor_execute", before)
    try:
        yield statements
    finally:
        event.remove(m.engine, "before_cursor_execute", before)


def plan(m: Manifest, statement: str, parameters: Any) -> str:
    prefix = "EXPLAIN " if m.is_postgres else "EXPLAIN QUERY PLAN "
    with m.engine.connect() as conn:
        rows = conn.exec_driver_sql(prefix + statement, parameters).all()
    return "\n".join(" ".join(str(col) for col in row) for row in rows)


def unfinished_queries(m: Manifest, call: Callable[[], object]) -> list[tuple[str, Any]]:
    with captured(m) as statements:
        call()
    found = [
        (s, p)
        for s, p in statements
        # The claim picks in a CTE and takes in the same statement (WITH ... UPDATE).
        if s.lstrip().upper().startswith(("SELECT", "WITH")) and UNFINISHED_SEGMENTS_SQL in s
    ]
    assert found, f"no statement with the unfinished predicate among {statements}"
    return found


@pytest.fixture
def crowded(manifest: Manifest) -> Manifest:
    """Thousands of verified segments and a handful of unfinished ones, statistics up to date."""
    bulk_verified(manifest, VERIFIED)
    for i in range(3):
        key = f"todo/{i}"
        manifest.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
        lease = manifest.acquire(key, "w")
        manifest.add_commits(lease, [part(1, 0, 4)])
        if i == 2:
            manifest.set_upload(lease, "upload-2")
        manifest.release(lease)
    with manifest.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    # SQLite reads its statistics when a connection loads the schema: pooled connections opened
    # before the ANALYZE would plan without them (and pick either plan). Fresh ones see them.
    manifest.engine.dispose()
    return manifest


def _uses_index_not_scan(m: Manifest, text: str, index: str) -> None:
    if m.is_postgres:
        assert "Seq Scan on segments" not in text, text
        assert index in text, text
        return
    assert "SCAN segments" not in text, text
    # SQLite reads unfinished rows only through the partial index, or through the state index
    # looking up each unfinished state; never by walking the table in id order (which reads
    # every verified row it passes). A point lookup by rowid (the claim's UPDATE of the rows its
    # CTE picked) reads one row each.
    walks = [
        line
        for line in text.splitlines()
        if "USING INTEGER PRIMARY KEY" in line and "(rowid=?)" not in line
    ]
    assert not walks, text
    assert index in text or "ix_segments_state (state=?" in text, text


def test_claiming_uses_the_partial_index(crowded: Manifest) -> None:
    m = crowded
    got: dict[str, Any] = {}
    # Two lookups: this node's live leases whose holder may be gone (fast takeover), the claim.
    found = unfinished_queries(m, lambda: got.setdefault("claim", m.claim_next("probe", node="n1")))
    assert got["claim"] is not None and got["claim"][1].key == "todo/0"
    assert len(found) == 2, found
    if m.is_postgres:
        assert sum("FOR UPDATE SKIP LOCKED" in s for s, _ in found) == 1
    for statement, params in found:
        _uses_index_not_scan(m, plan(m, statement, params), "ix_segments_unfinished")
    # The check can fail: a lookup no index serves is reported as a scan.
    control = plan(
        m, "SELECT id FROM segments WHERE length(path) > 0", () if not m.is_postgres else {}
    )
    assert ("Seq Scan on segments" if m.is_postgres else "SCAN segments") in control


def test_claiming_with_a_cursor_uses_the_partial_index(crowded: Manifest) -> None:
    m = crowded
    first = m.segment("todo/0")
    assert first is not None
    for statement, params in unfinished_queries(
        m, lambda: m.claim_next("probe", node="n1", after_id=first.id)
    ):
        _uses_index_not_scan(m, plan(m, statement, params), "ix_segments_unfinished")


def test_other_unfinished_lookups_do_not_scan_finished_rows(crowded: Manifest) -> None:
    m = crowded
    ids: dict[str, Any] = {}
    for name, call in {
        "live_upload_ids": lambda: ids.setdefault("live", m.live_upload_ids()),
        "status": m.status,
    }.items():
        for statement, params in unfinished_queries(m, call):
            text = plan(m, statement, params)
            # SQLite may pick the state index for these; either index keeps verified rows out.
            assert "ix_segments_unfinished" in text or "ix_segments_state" in text, (name, text)
            if m.is_postgres:
                assert "Seq Scan on segments" not in text, (name, text)
            else:
                # A scan *of the partial index* reads unfinished rows only; a bare table scan
                # ("SCAN segments" without an index) would read the verified ones too.
                assert not re.search(r"SCAN segments(?! USING (COVERING )?INDEX)", text), (
                    name,
                    text,
                )
    assert ids["live"] == {"upload-2"}


def test_status_and_deletable_at_scale(crowded: Manifest) -> None:
    m = crowded
    st = m.status()
    assert st.segments["verified"] == VERIFIED and st.segments["open"] == 3
    assert st.commits["verified"] == VERIFIED and st.commits["pending"] == 3
    assert st.unverified_bytes == 12
    page = m.deletable(limit=500)
    assert len(page) == 500 and {s.state for s in page} == {SegmentState.VERIFIED}
    rest = m.deletable(after_id=page[-1].id)
    assert len(page) + len(rest) == VERIFIED
    assert not {s.key for s in page + rest} & {"todo/0", "todo/1", "todo/2"}


# --- status and deletable, exactly ---------------------------------------------------------------


def _verified(m: Manifest, key: str) -> int:
    m.register(key, f"/data/{key}", node="n1", part_size=4, worker="w")
    lease = m.acquire(key, "w")
    [c1] = m.add_commits(lease, [part(1, 0, 4)])
    m.commit_uploaded(lease, c1, md5(c1))
    final = part(2, 4, 2)
    etag = multipart_etag([md5(c1), md5(final)])
    commits = m.seal(lease, [final], size=6, crc32c=1, expected_etag=etag, upload_mode="multipart")
    m.commit_uploaded(lease, commits[1], md5(commits[1]))
    m.segment_uploaded(lease, etag)
    m.segment_verified(lease, "ok")
    m.release(lease)
    return lease.segment_id


def test_status_counts_bytes_and_oldest_age(manifest: Manifest) -> None:
    clock = Clock()
    m = Manifest(manifest.engine, clock=clock)

    empty = m.status()
    assert set(empty.segments.values()) == {0} and set(empty.commits.values()) == {0}
    assert set(empty.segments) == {s.value for s in SegmentState}
    assert (empty.unverified_bytes, empty.oldest_unverified_age, empty.failed) == (0, None, ())
    assert empty.all_verified

    _verified(m, "a/verified")  # at T0
    only_verified = m.status()
    assert only_verified.all_verified
    assert only_verified.oldest_unverified_age is None
    assert only_verified.oldest_sealed_age is None
    assert only_verified.commit_bytes["verified"] == 6

    clock.at(10)
    m.register("d/failed", "/data/d", node="n1", part_size=4, worker="w")
    lease = m.acquire("d/failed", "w")
    m.add_commits(lease, [part(1, 0, 4)])
    m.fail_segment(lease, "local file vanished")

    clock.at(60)
    m.register("b/sealed", "/data/b", node="n1", part_size=4, worker="w")
    lease = m.acquire("b/sealed", "w")
    [c1] = m.add_commits(lease, [part(1, 0, 4)])
    m.commit_uploaded(lease, c1, md5(c1))
    m.seal(
        lease, [part(2, 4, 2)], size=6, crc32c=1, expected_etag="e" * 32, upload_mode="multipart"
    )

    clock.at(120)
    m.register("c/open-empty", "/data/c", node="n1", part_size=4, worker="w")
    clock.at(130)
    m.register("e/open", "/data/e", node="n1", part_size=8, worker="w")
    lease = m.acquire("e/open", "w")
    m.add_commits(lease, [part(1, 0, 8)])

    clock.at(300)
    st = m.status()
    assert st.segments == {
        "open": 2,
        "sealed": 1,
        "uploaded": 0,
        "verified": 1,
        "failed": 1,
        "unknown": 0,
    }
    assert st.commits == {"pending": 2, "uploaded": 1, "verified": 2, "failed": 1}
    assert st.commit_bytes == {"pending": 10, "uploaded": 4, "verified": 6, "failed": 4}
    assert st.unverified_bytes == 14
    assert st.oldest_unverified_age == pytest.approx(240.0)  # b/sealed, created at 60 s
    assert st.oldest_sealed_age == pytest.approx(240.0)  # b/sealed, sealed at 60 s
    assert st.failed == (("d/failed", "local file vanished"),)
    assert not st.all_verified

    clock.at(1000)
    assert m.status().oldest_unverified_age == pytest.approx(940.0)
    assert m.status().oldest_sealed_age == pytest.approx(940.0)


def test_deletable_returns_only_verified_segments(manifest: Manifest) -> None:
    m = manifest
    first = _verified(m, "v/1")
    # Every other state, each a segment whose local file must stay.
    m.register("o/open", "/data/o", node="n1", part_size=4, worker="w")
    lease = m.acquire("o/open", "w")
    m.add_commits(lease, [part(1, 0, 4)])
    m.register("s/sealed", "/data/s", node="n1", part_size=4, worker="w")
    lease = m.acquire("s/sealed", "w")
    [c] = m.seal(
        lease, [part(1, 0, 4)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put"
    )
    m.register("u/uploaded", "/data/u", node="n1", part_size=4, worker="w")
    lease = m.acquire("u/uploaded", "w")
    [c] = m.seal(
        lease, [part(1, 0, 4)], size=4, crc32c=1, expected_etag="e" * 32, upload_mode="put"
    )
    m.commit_uploaded(lease, c, md5(c))
    m.segment_uploaded(lease, "e" * 32)
    m.register("f/failed", "/data/f", node="n1", part_size=4, worker="w")
    lease = m.acquire("f/failed", "w")
    m.fail_segment(lease, "checksum mismatch")
    second = _verified(m, "v/2")

    assert [s.key for s in m.deletable()] == ["v/1", "v/2"]
    assert all(s.state is SegmentState.VERIFIED and s.verified_at for s in m.deletable())
    assert [s.id for s in m.deletable(limit=1)] == [first]
    assert [s.id for s in m.deletable(after_id=first)] == [second]
    assert m.deletable(after_id=second) == []
    # The others are all still there, unfinished or failed: none of their files may go.
    assert {s.key for s in m.segments(states=["open", "sealed", "uploaded", "failed"])} == {
        "o/open",
        "s/sealed",
        "u/uploaded",
        "f/failed",
    }
