"""The digest pass of a commit's parts running ahead of their sends (``Transport.digest_ahead``).

A commit that covers several parts (a writer catching up, a watcher shipping a backlog) used to
hash them one after the other on its job thread; in the md5 mode that serial MD5 paced the sends.
Now the next part is hashed on a pool while the job thread hashes the current one: handed out in
order, never waiting for a busy pool, and nothing left running once the caller stops.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from concurrent.futures import wait
from pathlib import Path
from typing import cast

import pytest

from uploader.digest import Payload, digest_range
from uploader.errors import LocalFileError
from uploader.storage.base import Storage
from uploader.transport import Transport

PART = 64 * 1024
PARTS = [(n + 1, n * PART, (n + 1) * PART) for n in range(6)]


@pytest.fixture
def seg(tmp_path: Path) -> Path:
    path = tmp_path / "seg"
    path.write_bytes(random.Random(11).randbytes(6 * PART))
    return path


@pytest.fixture
def transport() -> Iterator[Transport]:
    # The digest never touches the storage.
    t = Transport(cast(Storage, object()), concurrency=4)
    yield t
    t.shutdown()


@pytest.mark.parametrize("md5", [True, False], ids=["md5-mode", "crc32c-mode"])
def test_hands_out_every_part_in_order_with_its_checksums(
    seg: Path, transport: Transport, md5: bool
) -> None:
    got = list(transport.digest_ahead(str(seg), PARTS, md5=md5))
    want = [digest_range(str(seg), start, end, md5=md5) for _n, start, end in PARTS]
    assert [(p.start, p.end, p.md5, p.crc32c) for p in got] == [
        (p.start, p.end, p.md5, p.crc32c) for p in want
    ]
    assert all(p.data is None for p in got)  # only checksums are kept
    assert all((p.md5 is not None) == md5 for p in got)


def test_parts_are_hashed_two_at_a_time(
    seg: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first two parts' digests wait for each other: a serial pass would time out here
    # (BrokenBarrierError) instead of handing out the first part.
    barrier = threading.Barrier(2, timeout=10)
    real = digest_range

    def meeting(path: str, start: int, end: int, *, md5: bool) -> Payload:
        if start < 2 * PART:
            barrier.wait()
        return real(path, start, end, md5=md5)

    monkeypatch.setattr("uploader.transport.digest_range", meeting)
    gen = transport.digest_ahead(str(seg), PARTS, md5=True)
    first = next(gen)
    assert (first.start, first.end) == (0, PART)
    gen.close()


def test_one_part_ahead_at_most(
    seg: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = threading.Lock()
    running = [0]
    most = [0]
    real = digest_range

    def counted(path: str, start: int, end: int, *, md5: bool) -> Payload:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return real(path, start, end, md5=md5)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr("uploader.transport.digest_range", counted)
    assert len(list(transport.digest_ahead(str(seg), PARTS, md5=True))) == len(PARTS)
    assert most[0] <= 2  # the part handed out next and the one after it, never more


def test_a_busy_pool_is_not_waited_for(seg: Path) -> None:
    # One worker, held by someone else's work: every look-ahead stays queued, and each part is
    # hashed on the caller's thread instead (the queued look-ahead cancelled).
    t = Transport(cast(Storage, object()), concurrency=1)
    release = threading.Event()
    blocker = t._ahead.submit(release.wait, 30)
    got: list[Payload] = []
    caller = threading.Thread(target=lambda: got.extend(t.digest_ahead(str(seg), PARTS, md5=True)))
    caller.start()
    caller.join(20)
    finished = not caller.is_alive()
    release.set()
    blocker.result(timeout=10)
    t.shutdown()
    assert finished, "the caller waited for a busy pool"
    want = [digest_range(str(seg), start, end, md5=True) for _n, start, end in PARTS]
    assert [(p.start, p.md5, p.crc32c) for p in got] == [(p.start, p.md5, p.crc32c) for p in want]


def test_a_caller_that_stops_leaves_nothing_running(
    seg: Path, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    running = threading.Semaphore(0)
    closing = threading.Event()
    started: list[int] = []
    finished: list[int] = []
    real_digest, real_wait = digest_range, wait

    def held(path: str, start: int, end: int, *, md5: bool) -> Payload:
        started.append(start)
        if start > 0:
            running.release()
            assert release.wait(10)
        out = real_digest(path, start, end, md5=md5)
        finished.append(start)
        return out

    def waiting(fs: object) -> object:
        closing.set()
        return real_wait(fs)  # type: ignore[arg-type]

    monkeypatch.setattr("uploader.transport.digest_range", held)
    monkeypatch.setattr("uploader.transport.wait", waiting)
    gen = transport.digest_ahead(str(seg), PARTS, md5=True)
    assert next(gen).start == 0
    assert running.acquire(timeout=10)  # the next part's digest is under way
    closer = threading.Thread(target=gen.close)
    closer.start()
    assert closing.wait(10)  # the close waits for what it could not cancel...
    release.set()
    closer.join(10)
    assert not closer.is_alive()
    # ...so when it returns every digest that started has ended, and none started after it.
    assert sorted(finished) == sorted(started)
    assert len(started) <= 2  # the part handed out and the one ahead of it


def test_a_part_past_the_end_of_the_file_raises_when_reached(
    seg: Path, transport: Transport
) -> None:
    parts = [*PARTS, (7, 6 * PART, 7 * PART)]
    gen = transport.digest_ahead(str(seg), parts, md5=True)
    assert len([next(gen) for _ in PARTS]) == len(PARTS)
    with pytest.raises(LocalFileError, match="shorter"):
        next(gen)
