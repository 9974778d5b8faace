"""The library's daemon loops ride out real manifest outages (SQLite and PostgreSQL), in process.

``recover_loop``, ``Watcher.run`` and ``scrub_loop`` each meet an outage made for real: on SQLite
another connection holds ``BEGIN EXCLUSIVE`` past the manifest's busy timeout; on PostgreSQL a
table lock makes the loop's next statement wait and its connections are terminated while they
wait. Time is injected through the stop event (its ``wait`` records each delay and returns at
once) and the backoff's random draw, so the delays asserted are exact and nothing sleeps.
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import uploader
from tests.api.conftest import PART
from tests.cli.outage_helpers import PgLock, SqliteLock, wait_for
from uploader.manifest import db
from uploader.outage import Backoff, OutageGuard
from uploader.recovery import RecoveryReport, recover_loop
from uploader.states import SegmentState
from uploader.storage import Fault, FaultyStorage, open_storage
from uploader.verify import VerifyReport, scrub_loop
from uploader.watch import Watcher

FIRST, CAP = 0.05, 0.2
EXPECTED = [0.05, 0.1, 0.2, 0.2]  # first * 2**n capped, the jitter's draw injected as 1.0


class RecordingStop(threading.Event):
    """A stop event whose waits are recorded and cut short: time passes only in the record."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        return super().wait(min(timeout or 0.0, 0.005))


def _url(manifest_url: str) -> str:
    # SQLite: a short busy timeout, so a write meets the lock as "database is locked" at once.
    return manifest_url + "?timeout=0.05" if manifest_url.startswith("sqlite") else manifest_url


@contextmanager
def _outage(manifest_url: str, table: str) -> Iterator[None]:
    """A real outage until the block ends."""
    if manifest_url.startswith("sqlite"):
        lock = SqliteLock(Path(db.parse_url(manifest_url).database or ""))
        try:
            yield
        finally:
            lock.release()
        return
    pg = PgLock(manifest_url, table)
    done = threading.Event()

    def terminate() -> None:  # whenever a statement of the loop waits on the lock
        while not done.wait(0.01):
            if pg.waiting():
                pg.terminate_all()

    t = threading.Thread(target=terminate, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(10)
        pg.release()


def _unavailable(caplog: pytest.LogCaptureFixture) -> int:
    return sum("manifest unavailable" in r.getMessage() for r in caplog.records)


def _backoff_waits(stop: RecordingStop) -> list[float]:
    return [w for w in stop.waits if w in EXPECTED]


def _run(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def body() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, errors


def _sealed_work(url: str, remote: str, tmp_path: Path, n: int) -> None:
    failing = FaultyStorage(open_storage(remote, {}, min_part_size=PART), [Fault(op="upload_part")])
    store = uploader.open(url, remote, storage=failing, part_size=PART, min_part_size=PART)
    try:
        futures = []
        for i in range(n):
            path = tmp_path / f"seg{i}"
            path.write_bytes(random.Random(i).randbytes(2 * PART + 7))
            futures.append(store.segment(f"k/{i}", path).seal())
        for fut in futures:
            assert fut.exception(timeout=60) is not None
    finally:
        store.close()


@pytest.fixture
def setup(manifest_url: str, at_head: None, tmp_path: Path) -> tuple[str, str]:
    return _url(manifest_url), f"memory://outage-{uuid.uuid4().hex[:12]}"


def test_recover_loop_rides_out_an_outage_then_finishes(
    setup: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uploader.outage")
    url, remote = setup
    _sealed_work(url, remote, tmp_path, 3)
    store = uploader.open(url, remote, part_size=PART, min_part_size=PART)
    stop = RecordingStop()
    reports: list[RecoveryReport] = []
    try:
        with _outage(url, "events"):
            t, errors = _run(
                lambda: recover_loop(
                    store.crew,
                    interval=0.01,
                    stop=stop,
                    on_report=reports.append,
                    backoff=Backoff(first=FIRST, cap=CAP, rng=lambda: 1.0),
                )
            )
            wait_for(lambda: _unavailable(caplog) >= 4 or errors, "four failed passes")
        wait_for(
            lambda: sum(len(r.verified) for r in reports) == 3 or errors, "every segment verified"
        )
        stop.set()
        t.join(30)
        counts = {k: n for k, n in store.status().segments.items() if n}
    finally:
        stop.set()
        store.close()
    assert not errors, errors
    assert _backoff_waits(stop)[:4] == EXPECTED  # bounded, growing, then capped
    assert sum("reachable again" in r.getMessage() for r in caplog.records) >= 1
    assert counts == {SegmentState.VERIFIED.value: 3}


def test_watcher_run_rides_out_an_outage_then_finishes(
    setup: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uploader.outage")
    url, remote = setup
    d = tmp_path / "logs"
    d.mkdir()
    first = d / "00000000000000000000"
    data = random.Random(5).randbytes(2 * PART + 3)
    first.write_bytes(data)
    store = uploader.open(url, remote, part_size=PART, min_part_size=PART)
    stop = RecordingStop()
    watcher = Watcher(store, d)
    key = watcher.key_prefix + first.name
    try:
        with _outage(url, "events"):  # the registration of the file fails
            t, errors = _run(
                lambda: watcher.run(
                    interval=0.01,
                    stop=stop,
                    recover_every=0.2,
                    backoff=Backoff(first=FIRST, cap=CAP, rng=lambda: 1.0),
                )
            )
            wait_for(lambda: _unavailable(caplog) >= 4 or errors, "four failed ticks")
        (d / "00000000000000100000").write_bytes(b"next")  # the first file rolled

        def verified() -> bool:
            rec = store.manifest.segment(key)
            return bool(errors) or (rec is not None and rec.state is SegmentState.VERIFIED)

        wait_for(verified, "the rolled file verified")
        stop.set()
        t.join(30)
    finally:
        stop.set()
        store.close()
    assert not errors, errors
    assert _backoff_waits(stop)[:4] == EXPECTED


def _two_verified(store: uploader.Store, tmp_path: Path, name: str) -> None:
    """Two small segments ``<name>/0`` and ``<name>/1``, sealed and verified."""
    for i in range(2):
        path = tmp_path / f"{name}{i}"
        path.write_bytes(name.encode() * (100 + i))
        assert store.segment(f"{name}/{i}", path).seal().result(timeout=60).verified


def test_scrub_loop_rides_out_an_outage(
    setup: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uploader.outage")
    url, remote = setup
    store = uploader.open(url, remote, part_size=PART, min_part_size=PART)
    stop = RecordingStop()
    reports: list[VerifyReport] = []
    try:
        _two_verified(store, tmp_path, "v")
        # PostgreSQL: the scrub's first statement reads the segments (the events are not read).
        with _outage(url, "segments"):
            t, errors = _run(
                lambda: scrub_loop(
                    store.crew,
                    interval=0.01,
                    stop=stop,
                    limit=10,
                    on_report=reports.append,
                    backoff=Backoff(first=FIRST, cap=CAP, rng=lambda: 1.0),
                )
            )
            wait_for(lambda: _unavailable(caplog) >= 2 or errors, "two failed passes")
        wait_for(lambda: any(len(r.checks) == 2 and r.ok for r in reports) or errors, "a pass")
        stop.set()
        t.join(30)
    finally:
        stop.set()
        store.close()
    assert not errors, errors
    assert _backoff_waits(stop)[:2] == EXPECTED[:2]


def test_scrub_loop_rides_out_a_remote_error(setup: tuple[str, str], tmp_path: Path) -> None:
    """A remote failing a check (past its retries) ends that pass, not the scrub: the segment is
    not judged (no drift), and the next pass checks everything."""
    url, remote = setup
    faulty = FaultyStorage(open_storage(remote, {}, min_part_size=PART, retry=None))
    store = uploader.open(url, remote, storage=faulty, part_size=PART, min_part_size=PART)
    stop = RecordingStop()
    reports: list[VerifyReport] = []
    try:
        _two_verified(store, tmp_path, "r")
        faulty.add(Fault(op="head", times=1))  # the first check's HEAD fails
        t, errors = _run(
            lambda: scrub_loop(
                store.crew, interval=0.01, stop=stop, limit=10, on_report=reports.append
            )
        )
        wait_for(lambda: any(r.ok and len(r.checks) == 2 for r in reports) or errors, "a pass")
        stop.set()
        t.join(30)
        assert {s.state for s in store.manifest.segments()} == {SegmentState.VERIFIED}
    finally:
        stop.set()
        store.close()
    assert not errors, errors
    [failed] = reports[0].checks  # the pass stopped at the remote's error
    assert not failed.ok and not failed.drift and reports[0].drifted == (), failed
    assert "not judged: remote error" in (failed.problem or ""), failed


def test_an_error_that_is_not_an_outage_ends_the_loop(
    setup: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "uploader.outage")
    url, remote = setup
    d = tmp_path / "gone"
    d.mkdir()
    store = uploader.open(url, remote, part_size=PART, min_part_size=PART)
    try:
        watcher = Watcher(store, d)
        d.rmdir()  # a tick cannot list it: not the manifest's outage, nothing to wait out
        with pytest.raises(FileNotFoundError):
            watcher.run(interval=0.01, stop=RecordingStop())
    finally:
        store.close()
    assert _unavailable(caplog) == 0


def test_backoff_is_bounded_and_jittered() -> None:
    draws = iter([0.0, 1.0, 0.5] + [1.0] * 20)
    b = Backoff(first=1.0, cap=8.0, rng=lambda: next(draws))
    delays = [b.next() for _ in range(8)]
    # Between half and all of first * 2**n, never above the cap.
    assert delays[:3] == [0.5, 2.0, 3.0]
    assert delays[3:] == [8.0] * 5
    b.reset()
    assert b.next() == 1.0
    real = Backoff(first=0.5, cap=30.0)
    for n in range(40):
        ceiling = min(30.0, 0.5 * 2**n)
        assert ceiling / 2 <= real.next() <= ceiling
    with pytest.raises(ValueError):
        Backoff(first=0.0)


def test_the_guard_re_raises_what_is_not_an_outage() -> None:
    guard = OutageGuard("test", clock=lambda: 0.0)
    stop = RecordingStop()
    assert guard.survive(ValueError("a bug"), stop) is False
    assert guard.survive(uploader.UsageError("bad URL"), stop) is False
    assert stop.waits == []  # no wait for an error that ends the loop
    guard.ok()  # no outage going on: nothing to say
    assert guard.outages == 0
