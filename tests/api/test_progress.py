"""Progress: ``Store.on_bytes`` reports each part as the remote acknowledges it (bytes advance
part by part, never 0 then everything), for a seal and for recovery."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import uploader
from tests.api.conftest import PART
from uploader.storage import Fault, FaultyStorage, open_storage


class HoldPart:
    """Holds ``upload_part`` number ``held`` until ``go`` is set; says when it is held."""

    def __init__(self, inner: Any, held: int) -> None:
        self.inner = inner
        self.held = held
        self.reached = threading.Event()
        self.go = threading.Event()

    def upload_part(self, key: str, upload_id: str, number: int, payload: Any) -> Any:
        if number == self.held:
            self.reached.set()
            assert self.go.wait(60)
        return self.inner.upload_part(key, upload_id, number, payload)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_bytes_advance_as_parts_are_acknowledged(
    manifest_url: str, at_head: None, tmp_path: Path
) -> None:
    remote = f"file://{tmp_path}/remote"
    (tmp_path / "remote").mkdir()
    held = HoldPart(open_storage(remote, {}, min_part_size=PART), held=4)
    data = random.Random(3).randbytes(4 * PART + 123)  # parts 1-4 whole, part 5 the tail
    path = tmp_path / "seg"
    path.write_bytes(data)
    calls: list[tuple[str, int]] = []
    with uploader.open(manifest_url, remote, storage=held, part_size=PART, concurrency=1) as store:
        store.on_bytes = lambda key, n: calls.append((key, n))
        fut = store.segment("k/seg", path).seal()
        assert held.reached.wait(60)
        # Part 4 is still at the remote: the three before it are already counted, one by one.
        assert calls == [("k/seg", PART)] * 3
        assert not fut.done()
        held.go.set()
        assert fut.result(timeout=60).verified
    assert calls == [("k/seg", PART)] * 4 + [("k/seg", 123)]
    totals = [sum(n for _, n in calls[: i + 1]) for i in range(len(calls))]
    assert totals == sorted(set(totals)) and totals[-1] == len(data)  # growing, to the size


def test_recovery_reports_the_bytes_it_sends(
    manifest_url: str, at_head: None, tmp_path: Path
) -> None:
    remote = f"file://{tmp_path}/remote"
    (tmp_path / "remote").mkdir()
    data = random.Random(4).randbytes(3 * PART + 5)
    path = tmp_path / "seg"
    path.write_bytes(data)
    faulty = FaultyStorage(open_storage(remote, {}, min_part_size=PART))
    faulty.add(Fault(op="upload_part", when="before", after_calls=1))  # part 1 only lands
    with uploader.open(
        manifest_url, remote, storage=faulty, part_size=PART, concurrency=1
    ) as writer:
        assert writer.segment("k/seg", path).seal().exception(timeout=60) is not None
    calls: list[int] = []
    with uploader.open(manifest_url, remote, part_size=PART, min_part_size=PART) as store:
        store.on_bytes = lambda _key, n: calls.append(n)
        report = store.recover()
    assert report.ok and list(report.verified) == ["k/seg"]
    assert sorted(calls) == [5, PART, PART]  # the three missing parts, each as it landed
    assert sum(calls) == report.bytes_sent == 2 * PART + 5
    # A partial resend: part 1 was at the remote already and is reported reused (was "0 reused").
    assert (report.bytes_reused, report.parts_reused) == (PART, 1)
    assert report.bytes_sent + report.bytes_reused == len(data)
