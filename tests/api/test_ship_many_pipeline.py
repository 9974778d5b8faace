"""The group commit's pipeline and its bounds: the outcomes lag the PUTs by one batch at most,
the bytes of failed PUTs are not kept alive by their errors, and an item that fails alone fails
alone (the others are answered as the manifest has them). Every manifest, every remote."""

from __future__ import annotations

import gc
import tracemalloc
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import uploader
from tests.api.conftest import PART, StoreFactory
from tests.api.test_ship_many import _files
from uploader import group
from uploader.errors import StorageError
from uploader.storage import Fault, FaultyStorage, open_storage


def test_a_batch_is_sent_only_once_the_outcomes_two_batches_back_are_written(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``_next_batch`` for batch k+1: batch k's PUTs answered, and batch k-1's outcomes written,
    before batch k+1 goes to the sender (so a slow manifest slows the sending instead of letting
    sent-but-unrecorded segments pile up)."""
    store = make_store()
    order: list[str] = []

    class Watched(Future[None]):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name
            self.set_result(None)

        def result(self, timeout: float | None = None) -> None:
            order.append(f"waited for {self.name}")
            return super().result(timeout)

    class Sender:
        def submit(self, *_args: Any) -> Future[Future[None]]:
            order.append("batch k+1 sent")
            done: Future[Future[None]] = Future()
            done.set_result(Watched("batch k+1's outcomes"))
            return done

    answered: Future[Future[None]] = Future()
    answered.set_result(Watched("batch k's outcomes"))  # batch k's PUTs: answered
    settling: list[Future[None]] = [Watched("batch k-1's outcomes")]
    monkeypatch.setattr(group, "_register", lambda _store, batch: [None] * len(batch))
    sent = group._next_batch(store, Sender(), None, answered, [], settling)  # type: ignore[arg-type]
    assert sent is not None
    assert order == ["waited for batch k-1's outcomes", "batch k+1 sent"]
    assert [f.name for f in settling] == ["batch k-1's outcomes", "batch k's outcomes"]  # type: ignore[attr-defined]


def test_failed_puts_do_not_keep_their_bytes(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    """A remote that refuses every PUT: each item fails with its error, kept by its future (as
    ``uploader ship`` keeps them all), and the error must not keep the file's bytes alive."""
    url, options = remote
    files = _files(tmp_path / "seg", [PART // 2] * 48)  # 1.5 MiB of bytes read in all
    faulty = FaultyStorage(open_storage(url, dict(options), min_part_size=PART))
    faulty.add(Fault(op="put", error=lambda: StorageError("injected: refused", retryable=False)))
    store = make_store(storage=faulty)
    tracemalloc.start()
    try:
        futures = store.ship_many([(f"seg/{p.name}", p) for p, _ in files])
        errors = [f.exception(timeout=60) for f in futures]
        gc.collect()
        # What is still allocated by the reads of the files (uploader.digest: the bytes).
        traces = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, "*uploader/digest.py")]
        )
        held = sum(stat.size for stat in traces.statistics("filename"))
    finally:
        tracemalloc.stop()
    assert all(isinstance(e, StorageError) and "injected" in str(e) for e in errors), errors
    assert held < 2 * PART, f"{held} bytes of the files still held after every PUT failed"


def test_an_item_that_fails_alone_leaves_the_others_answered_as_recorded(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file bigger than a part takes the one-at-a-time seal; the manifest failing there (not
    an uploader error: a driver's own exception) fails that item alone, never the items whose
    outcomes the batches wrote."""
    small = _files(tmp_path / "small", [100, 200, 300, 400])
    [(big, _)] = _files(tmp_path / "big", [PART + 1], seed=9)
    store = make_store()
    segment = store.segment

    def failing(key: str, path: Any, **kwargs: Any) -> Any:
        if key == "big":
            raise RuntimeError("the manifest's connection broke")
        return segment(key, path, **kwargs)

    monkeypatch.setattr(group, "BATCH", 2)
    monkeypatch.setattr(store, "segment", failing)
    items = [(f"s/{p.name}", p) for p, _ in small[:2]] + [("big", big)]
    items += [(f"s/{p.name}", p) for p, _ in small[2:]]
    futures = store.ship_many(items)
    big_error = futures[2].exception(timeout=60)
    assert isinstance(big_error, RuntimeError), big_error
    for (key, _p), f in zip(items, futures, strict=True):
        if key == "big":
            continue
        assert f.result(timeout=60).verified, key
        rec = store.manifest.segment(key)
        assert rec is not None and rec.state is uploader.SegmentState.VERIFIED, rec
        assert rec.lease_owner is None
    assert store.manifest.segment("big") is None
