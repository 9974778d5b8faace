"""``watch --format rocketmq``: a live commit log (the test producer) shipped record by record.

The tests that ship need ``Segment.commit(upto)`` / ``Segment.seal(size)`` (the store's explicit
ends); without them they are skipped with that reason, never passed vacuously.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import uploader
from tests.cli.conftest import Run
from tests.conftest import TEST_MIN_PART_SIZE
from tests.formats.producer import CommitLogProducer, encode_message
from uploader.formats import Scan
from uploader.formats.rocketmq import RocketMQFormat, check_message
from uploader.states import SegmentState
from uploader.watch import Watcher

PART = TEST_MIN_PART_SIZE  # 64 KiB
FILE = 4 * PART


@pytest.fixture
def store(tmp_path: Path) -> Iterator[uploader.Store]:
    (tmp_path / "remote").mkdir()
    s = uploader.open(
        f"sqlite:///{tmp_path / 'manifest.db'}",
        f"file://{tmp_path / 'remote'}",
        part_size=PART,
        min_part_size=PART,
        concurrency=2,
    )
    with s:
        yield s


def _committed(store: uploader.Store, key: str) -> int:
    rec = store.manifest.segment(key)
    return 0 if rec is None else store.manifest.progress(rec.id).committed


def _check_shipped(store: uploader.Store, producer: CommitLogProducer, remote: Path) -> int:
    """Every sealed file: remote == local, and every record of the remote copy checks."""
    sealed = 0
    for name in producer.names:
        rec = store.manifest.segment("commitlog/" + name)
        assert rec is not None
        if rec.state is SegmentState.OPEN:
            continue
        assert rec.state is SegmentState.VERIFIED, (name, rec.state, rec.reason)
        copy = remote / "commitlog" / name
        data = copy.read_bytes()
        assert data == (producer.directory / name).read_bytes()
        assert RocketMQFormat().scan(str(copy), 0, rolled=True) == Scan(FILE, True, None)
        for offset, length in producer.records[name]:
            assert check_message(data[offset : offset + length]).ok
        sealed += 1
    return sealed


def test_commits_only_complete_records_and_seals_at_the_blank(
    store: uploader.Store, tmp_path: Path
) -> None:
    """Deterministic interleaving: before each tick the producer leaves a record half written."""
    d = tmp_path / "commitlog"
    producer = CommitLogProducer(d, file_size=FILE, seed=7, max_body=3000)
    watcher = Watcher(store, d, format="rocketmq")
    try:
        while len(producer.names) < 4:
            for _ in range(producer.rng.randrange(1, 40)):
                producer.write_one()
            record = producer.next_record()
            producer.write_partial(record, 8, producer.rng.randrange(0, len(record) - 8))
            report = watcher.tick()
            assert not report.errors, report.errors
            for name in producer.names:
                assert _committed(store, "commitlog/" + name) <= producer.written[name], name
            current = "commitlog/" + producer.current
            assert current not in report.sealed
            producer.finish(record)
    finally:
        producer.close()
    # The preallocated next file (all zeros) never made the live one look rolled.
    assert len(list(d.iterdir())) == len(producer.names) + 1
    report = watcher.tick()
    assert not report.errors
    assert _check_shipped(store, producer, tmp_path / "remote") == len(producer.names) - 1
    live = store.manifest.segment("commitlog/" + producer.current)
    assert live is not None and live.state is SegmentState.OPEN


def test_racing_producer_thread(store: uploader.Store, tmp_path: Path) -> None:
    """The producer writes through mmap in a thread while the watcher ticks."""
    d = tmp_path / "commitlog"
    producer = CommitLogProducer(d, file_size=FILE, seed=11, max_body=2000)
    done, ticked = threading.Event(), threading.Event()

    def produce() -> None:
        """Write while the watcher ticks; every 50 messages, let at least one tick end (the
        producer keeps writing during the ticks: it only waits for one to finish)."""
        try:
            while len(producer.names) <= 5:
                for _ in range(50):
                    producer.write_one()
                ticked.clear()
                if not ticked.wait(timeout=60):
                    raise AssertionError("the watcher stopped ticking")
        finally:
            done.set()

    watcher = Watcher(store, d, format="rocketmq")
    thread = threading.Thread(target=produce)
    thread.start()
    try:
        ticks = 0
        while not done.is_set():
            report = watcher.tick()
            ticked.set()
            ticks += 1
            assert not report.errors, report.errors
            for name in list(producer.written):
                committed = _committed(store, "commitlog/" + name)
                assert committed <= producer.written[name], name
    finally:
        thread.join()
        producer.close()
    watcher.tick()
    assert _check_shipped(store, producer, tmp_path / "remote") == len(producer.names) - 1
    assert ticks > 1


def test_a_rolled_file_whose_chain_broke_is_reported_not_sealed(
    store: uploader.Store, tmp_path: Path
) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    good = [encode_message(b"g" * 1000) for _ in range(80)]  # ~ 1.6 parts
    bad = bytearray(encode_message(b"b" * 100))
    bad[4:8] = struct.pack(">I", 0x12345678)
    first = d / f"{0:020d}"
    first.write_bytes(b"".join(good) + bytes(bad) + b"\0" * (FILE - sum(map(len, good)) - len(bad)))
    second = d / f"{FILE:020d}"
    second.write_bytes(encode_message(b"next") + b"\0" * (FILE - 200))
    problems: list[tuple[str, str]] = []
    watcher = Watcher(store, d, format="rocketmq", on_problem=lambda k, p: problems.append((k, p)))
    key = "commitlog/" + first.name
    for _ in range(2):
        report = watcher.tick()
        assert key not in report.sealed
        assert "unknown MAGICCODE 0x12345678" in report.problems[key]
        assert (key, report.problems[key]) in report.errors
    assert len(problems) == 1  # said once
    assert key in watcher.problems
    valid = sum(map(len, good))
    assert PART <= _committed(store, key) <= valid  # the good records' whole parts, never past
    rec = store.manifest.segment(key)
    assert rec is not None and rec.state is SegmentState.OPEN


def test_an_incomplete_record_becomes_a_problem_once_a_later_file_begun(
    store: uploader.Store, tmp_path: Path
) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    rec = encode_message(b"x" * 500, properties=b"KEYS\x01k")
    first = d / f"{0:020d}"
    first.write_bytes(rec + rec[:300] + b"\0" * (FILE - len(rec) - 300))
    second = d / f"{FILE:020d}"
    second.write_bytes(b"\0" * FILE)  # preallocated, not begun
    watcher = Watcher(store, d, format="rocketmq")
    assert not watcher.tick().problems  # the live file: wait
    second.write_bytes(encode_message(b"y") + b"\0" * (FILE - 200))
    report = watcher.tick()
    key = "commitlog/" + first.name
    assert "a later file has begun" in report.problems[key]
    assert key not in report.sealed


def test_segment_size_means_nothing_for_rocketmq(store: uploader.Store, tmp_path: Path) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    (d / f"{0:020d}").write_bytes(b"\0" * 1024)
    with pytest.raises(uploader.UsageError, match="segment-size"):
        Watcher(store, d, format="rocketmq", segment_size=1024)


def test_cli_refuses_an_unknown_format(run: Run, tmp_path: Path) -> None:
    d = tmp_path / "commitlog"
    d.mkdir()
    (d / f"{0:020d}").write_bytes(b"x")
    res = run("watch", str(d), "--once", "--format", "kafka")
    assert res.returncode == 2, res.stderr
    assert "unknown segment format 'kafka'" in res.stderr
    res = run("watch", str(d), "--once", "--format", "rocketmq", "--segment-size", "10")
    assert res.returncode == 2 and "--segment-size" in res.stderr


def test_cli_watch_once_ships_rolled_files_and_exits_1_on_a_problem(
    run: Run, home: Path, tmp_path: Path
) -> None:
    d = tmp_path / "commitlog"
    producer = CommitLogProducer(d, file_size=FILE, seed=5)
    try:
        while len(producer.names) < 3:
            producer.write_one()
    finally:
        producer.close()
    part = ("--part-size", str(5 * 1024 * 1024))
    res = run(*part, "watch", str(d), "--once", "--format", "rocketmq")
    assert res.returncode == 0, res.stderr
    assert "format rocketmq" in res.stderr
    for name in producer.names[:-1]:
        assert (home / "remote" / "commitlog" / name).read_bytes() == (d / name).read_bytes()
    assert not (home / "remote" / "commitlog" / producer.current).exists()
    # Damage the live file's next record head, then let the broker move on: exit 1, reported.
    live = d / producer.current
    with live.open("r+b") as f:
        f.seek(producer.written[producer.current])
        f.write(struct.pack(">iI", 200, 0x0BADF00D))
    later = d / f"{int(producer.current) + FILE:020d}"
    later.write_bytes(encode_message(b"z") + b"\0" * (FILE - 200))
    res = run(*part, "watch", str(d), "--once", "--format", "rocketmq")
    assert res.returncode == 1, res.stderr
    assert "unknown MAGICCODE 0x0badf00d" in res.stderr
    assert f"unresolved: commitlog/{producer.current}" in res.stderr
    assert not (home / "remote" / "commitlog" / producer.current).exists()
    # `uploader status` shows it too, and exits 1.
    status = run("status", "--json")
    assert status.returncode == 1, status.stdout + status.stderr
    [problem] = [
        e for e in json.loads(status.stdout)["errors"] if e["key"].endswith(producer.current)
    ]
    assert "format problem: " in problem["last_error"] and "0x0badf00d" in problem["last_error"]


def test_append_on_a_commit_log_fails_loudly(store: uploader.Store, tmp_path: Path) -> None:
    d = tmp_path / "commitlog"
    producer = CommitLogProducer(d, file_size=FILE, seed=3)
    watcher = Watcher(store, d, format="append")
    try:
        while len(producer.names) < 3:
            for _ in range(30):
                producer.write_one()
            watcher.tick()
    finally:
        producer.close()
    watcher.tick()
    states = [store.manifest.segment("commitlog/" + n) for n in producer.names[:-1]]
    failed = [s for s in states if s is not None and s.state is SegmentState.FAILED]
    assert failed and all("changed after they were committed" in (s.reason or "") for s in failed)
    # A file sealed while the broker had not yet written into it (append thinks a preallocated
    # newer file means rolled) was consistent when it was verified; the broker then wrote into
    # it. The deletion gate must not offer it: its bytes are not all in the remote copy.
    deletable = {r.key for r in store.deletable()}
    for s in states:
        assert s is not None and s.state in (SegmentState.FAILED, SegmentState.VERIFIED)
        if s.state is SegmentState.VERIFIED:
            remote = (tmp_path / "remote" / s.key).read_bytes()
            if remote != Path(s.path).read_bytes():
                assert s.key not in deletable, s.key
