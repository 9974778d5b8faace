"""Explicit commit ends for files written in place (a preallocated RocketMQ commit log, a WAL).

``commit(upto=N)`` and ``seal(size=N)`` ship ``[0, N)`` of a file whose size says nothing about
how much is written: bytes past ``N`` are never read or sent, refused ends leave the manifest
untouched, and the writer's seal and recovery use the recorded ends, never the file size.
"""

from __future__ import annotations

import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes
from tests.api.test_bad_input import _rows
from uploader.errors import UsageError
from uploader.storage import Fault, FaultyStorage, open_storage


def _preallocated(tmp_path: Path, size: int, written: int) -> tuple[Path, bytes]:
    path = tmp_path / "00000000000000000000"
    data = random.Random(written).randbytes(written)
    path.write_bytes(data + b"\0" * (size - written))
    return path, data


def test_bytes_past_upto_are_never_sent(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path, data = _preallocated(tmp_path, 4 * PART, 2 * PART + 300)
    store = make_store()
    seg = store.segment("ends/a", path)
    first = seg.commit(upto=PART + 10).result(timeout=60)
    assert (first.sent_parts, first.committed, first.carried_bytes) == (1, PART, 10)
    # The broker writes more, in place; the zeros past the valid end are never shipped.
    result = seg.seal(size=len(data)).result(timeout=60)
    assert result.verified and result.committed == len(data)
    assert remote_bytes(remote, "ends/a") == data
    rec = store.manifest.segment("ends/a")
    assert rec is not None and rec.size == len(data)


@pytest.mark.parametrize(
    ("what", "end", "message"),
    [
        ("commit", 4 * PART + 1, "past the end"),
        ("seal", 4 * PART + 1, "past the end"),
        ("commit", PART - 1, "below the"),
        ("seal", PART - 1, "below the"),
        ("commit", -1, "non-negative"),
        ("seal", True, "non-negative"),
    ],
)
def test_refused_ends_leave_the_manifest_untouched(
    make_store: StoreFactory, tmp_path: Path, what: str, end: Any, message: str
) -> None:
    path, _data = _preallocated(tmp_path, 4 * PART, 2 * PART)
    store = make_store()
    seg = store.segment("ends/bad", path)
    seg.commit(upto=PART).result(timeout=60)
    before = _rows(store)
    with pytest.raises(UsageError, match=message) as info:
        getattr(seg, what)(end)
    assert info.value.exit_code == 2
    assert _rows(store) == before
    assert seg.state is uploader.SegmentState.OPEN


def test_recovery_uses_the_recorded_end_not_the_file_size(
    make_store: StoreFactory,
    remote: tuple[str, dict[str, Any]],
    manifest_url: str,
    tmp_path: Path,
) -> None:
    """The writer seals at the valid end and dies before sending; the file keeps its preallocated
    size; recovery ships exactly the sealed bytes and verifies them."""
    path, data = _preallocated(tmp_path, 4 * PART, 2 * PART + 777)
    url, options = remote
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="upload_part"))  # every send of the writer fails
    writer = make_store(storage=faulty)
    seg = writer.segment("ends/rec", path)
    assert seg.seal(size=len(data)).exception(timeout=60) is not None
    writer.close()
    worker = make_store()
    clock = worker.manifest.clock
    worker.manifest.clock = lambda: clock() + timedelta(seconds=120)
    report = worker.recover()
    assert report.verified == ("ends/rec",), report
    assert remote_bytes(remote, "ends/rec") == data
    rec = worker.manifest.segment("ends/rec")
    assert rec is not None and rec.size == len(data)
    assert path.stat().st_size == 4 * PART  # the file is still preallocated
