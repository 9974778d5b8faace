"""``/metrics`` over real HTTP: each collector fails on its own (the endpoint still answers 200
with the other series and counts the failure), and the "stuck" gauge leaves open segments out."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import md5
from tests.manifest.conftest import open_manifest
from uploader.digest import checksum, multipart_etag
from uploader.errors import StorageError
from uploader.manifest.repo import Manifest
from uploader.metrics import Metrics, serve
from uploader.records import NewCommit
from uploader.storage import open_storage
from uploader.store import Store

T0 = datetime(2031, 3, 1)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def at(self, seconds: float) -> None:
        self.now = T0 + timedelta(seconds=seconds)


class ListingFails:
    """A remote whose ListMultipartUploads fails while ``failing`` (e.g. a 501 from the server)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failing = True

    def list_uploads(self, prefix: str = "") -> list[Any]:
        if self.failing:
            raise StorageError("ListMultipartUploads: 501 Not Implemented")
        return list(self.inner.list_uploads(prefix))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def setup(manifest_url: str, tmp_path: Path) -> Iterator[tuple[Store, ListingFails, Clock, str]]:
    base = open_manifest(manifest_url)
    clock = Clock()
    manifest = Manifest(base.engine, clock=clock)
    (tmp_path / "remote").mkdir()
    storage = ListingFails(open_storage(f"file://{tmp_path}/remote", {}))
    store = Store(manifest, storage, part_size=8 * 2**20)
    server = serve(Metrics(store, listing_ttl=0), 0)
    try:
        yield store, storage, clock, f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        store.close()
        base.close()


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as res:
        assert res.status == 200
        text = res.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def test_a_failing_collector_leaves_the_others_answering(
    setup: tuple[Store, ListingFails, Clock, str], caplog: pytest.LogCaptureFixture
) -> None:
    store, storage, _clock, url = setup
    with caplog.at_level(logging.INFO, logger="uploader.metrics"):
        first = _scrape(url)
        second = _scrape(url)
    for series in (first, second):
        assert series['uploader_segments{state="verified"}'] == 0.0  # the manifest's gauges
        assert "uploader_bytes_uploaded_total" in series  # this process's counters
        assert "uploader_unfinished_uploads" not in series  # the failing one is left out
    assert first['uploader_collector_errors_total{collector="remote"}'] == 1.0
    assert second['uploader_collector_errors_total{collector="remote"}'] == 2.0
    assert second['uploader_collector_errors_total{collector="manifest"}'] == 0.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]  # once, not per scrape
    assert "remote collector failed" in warnings[0].getMessage()
    assert "501" in warnings[0].getMessage() and warnings[0].exc_info is None

    storage.failing = False  # the remote answers again: the series is back, the count stays
    third = _scrape(url)
    assert third["uploader_unfinished_uploads"] == 0.0
    assert third['uploader_collector_errors_total{collector="remote"}'] == 2.0

    def manifest_down() -> Any:
        raise ConnectionError("manifest unreachable")

    store.status = manifest_down  # type: ignore[method-assign]
    fourth = _scrape(url)
    assert 'uploader_segments{state="verified"}' not in fourth
    assert fourth["uploader_unfinished_uploads"] == 0.0
    assert fourth['uploader_collector_errors_total{collector="manifest"}'] == 1.0


def _part(number: int, start: int, size: int) -> NewCommit:
    md5, crc = checksum(bytes([number]) * size)
    return NewCommit(number, start, start + size, md5, crc)


def test_the_stuck_gauge_ignores_open_segments(
    setup: tuple[Store, ListingFails, Clock, str],
) -> None:
    store, storage, clock, url = setup
    storage.failing = False
    m = store.manifest
    # A quiet writer's open segment, created at 0 with one part committed: not stuck.
    m.register("quiet/1", "/elsewhere/1", node="another-node", part_size=4, worker="w")
    m.add_commits(m.acquire("quiet/1", "w", ttl=10_000), [_part(1, 0, 4)])
    clock.at(5000)
    assert m.status().oldest_unverified_age == pytest.approx(5000.0)  # status still shows it
    assert _scrape(url)["uploader_oldest_unverified_seconds"] == 0.0

    # A segment sealed at 6000 and not verified: its age counts from the seal.
    clock.at(3000)
    m.register("stuck/1", "/elsewhere/2", node="another-node", part_size=4, worker="w")
    clock.at(6000)
    lease = m.acquire("stuck/1", "w", ttl=10_000)
    final = _part(1, 0, 4)
    m.seal(
        lease,
        [final],
        size=4,
        crc32c=final.crc32c,
        expected_etag=multipart_etag([md5(final)]),
        upload_mode="multipart",
    )
    clock.at(6100)
    assert _scrape(url)["uploader_oldest_unverified_seconds"] == pytest.approx(100.0)
