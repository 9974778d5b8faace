"""Invariant 11: leases are judged by the manifest database's clock, never by a client's.

On PostgreSQL, clients whose clocks are minutes off neither take a live lease nor lose their
own. (SQLite is one host: its clock is the database's; the skewed-client cases need a server.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest

from tests.manifest.conftest import open_manifest
from uploader.errors import SegmentBusyError
from uploader.manifest.repo import Manifest, utcnow


def skewed(minutes: float) -> datetime:
    return utcnow() + timedelta(minutes=minutes)


@pytest.fixture
def db(pg_url: str) -> Iterator[tuple[Manifest, str]]:
    m = open_manifest(pg_url)
    try:
        yield m, pg_url
    finally:
        m.close()


def _writer(m: Manifest, key: str) -> None:
    m.register(key, f"/data/{key}", node="n1", part_size=4, worker="writer")


def test_a_client_clock_ahead_takes_no_live_lease(db: tuple[Manifest, str]) -> None:
    m, url = db
    _writer(m, "k/ahead")
    lease = m.acquire("k/ahead", "writer", 30)
    ahead = Manifest.open(url, clock=lambda: skewed(+5), lease_clock="database")
    try:
        with pytest.raises(SegmentBusyError):
            ahead.acquire("k/ahead", "thief", 30)
        assert ahead.claim("thief", node="n1", limit=10) == []
        m.renew(lease, 30)  # still ours
    finally:
        ahead.close()
    # The check can fail: judged by the skewed client's own clock, the lease looks expired.
    naive = Manifest.open(url, clock=lambda: skewed(+5), lease_clock="client")
    try:
        assert naive.acquire("k/ahead", "thief", 30).owner == "thief"
    finally:
        naive.close()


def test_a_client_clock_behind_keeps_its_own_lease(db: tuple[Manifest, str]) -> None:
    m, url = db
    behind = Manifest.open(url, clock=lambda: skewed(-2), lease_clock="database")
    try:
        _writer(behind, "k/behind")
        lease = behind.acquire("k/behind", "writer", 30)
        # Its lease runs 30 s of the database's time, not of its own.
        assert abs((lease.expires - utcnow()).total_seconds() - 30) < 10
        renewed = behind.renew(lease, 30)
        renewed_all, lost = behind.renew_many([renewed], 30)
        assert [r.segment_id for r in renewed_all] == [lease.segment_id] and lost == []
        with pytest.raises(SegmentBusyError):  # and nobody else takes it meanwhile
            m.acquire("k/behind", "other", 30)
    finally:
        behind.close()


def test_the_real_clock_uses_the_database_on_postgres(db: tuple[Manifest, str]) -> None:
    m, _url = db
    assert m._db_leases()  # the default: PostgreSQL's now()
    assert not Manifest(m.engine, clock=lambda: utcnow())._db_leases()  # a test's time travel
