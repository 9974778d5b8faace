"""Bad input is refused at once, with a clear error, and nothing is recorded or sent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

import uploader
from tests.api.conftest import PART, StoreFactory, remote_bytes, visible_keys
from uploader.errors import InvalidKeyError, KeyConflictError
from uploader.manifest.rowmap import COMMITS as commits_table
from uploader.manifest.rowmap import EVENTS as events_table
from uploader.manifest.rowmap import SEGMENTS as segments_table


def _rows(store: uploader.Store) -> tuple[int, int, int]:
    with store.manifest.engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (segments_table, commits_table, events_table)
        )


def test_commit_and_seal_after_seal_are_refused(make_store: StoreFactory, tmp_path: Path) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    with make_store() as store:
        seg = store.segment("log/a", path)
        seg.seal().result(timeout=60)
        before = _rows(store)
        with pytest.raises(uploader.SegmentSealedError, match=r"log/a.*verified"):
            seg.commit()
        with pytest.raises(uploader.SegmentSealedError, match="log/a"):
            seg.seal()
        # Reopening the key in a new store gives the same answer.
        again = store.segment("log/a", path)
        with pytest.raises(uploader.SegmentSealedError):
            again.commit()
        assert _rows(store) == before


@pytest.mark.parametrize(
    "key",
    ["../escape", "/abs/key", "a//b", "a/./b", "tab\there", "", "x" * 1025, ".uploader/x"],
)
def test_invalid_keys_are_refused(make_store: StoreFactory, tmp_path: Path, key: str) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    with make_store() as store:
        before = _rows(store)
        with pytest.raises(InvalidKeyError) as info:
            store.segment(key, path)
        assert info.value.exit_code == 2
        assert _rows(store) == before


def test_missing_local_file_is_refused(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    with make_store() as store:
        before = _rows(store)
        with pytest.raises(uploader.LocalFileError, match="no such local file"):
            store.segment("log/missing", tmp_path / "nope")
        assert _rows(store) == before
    assert visible_keys(remote) == []


def test_same_key_for_another_path_is_refused(make_store: StoreFactory, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    with make_store() as store:
        store.segment("log/k", a)
    with make_store() as store:
        before = _rows(store)
        with pytest.raises(KeyConflictError, match="log/k"):
            store.segment("log/k", b)
        assert _rows(store) == before
        # The same path is idempotent.
        assert store.segment("log/k", a).key == "log/k"
        # Within the store that holds the segment, the same error, not a plain UsageError.
        with pytest.raises(KeyConflictError, match="log/k"):
            store.segment("log/k", b)
        assert _rows(store) == before


def test_shrunk_file_is_refused_before_anything_is_recorded(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"z" * (PART + 5))
    with make_store() as store:
        seg = store.segment("log/shrink", path)
        seg.commit().result(timeout=60)
        path.write_bytes(b"z" * 10)  # truncated and rewritten below what was committed
        before = _rows(store)
        for call in (seg.commit, seg.seal):
            with pytest.raises(
                uploader.LocalFileError, match=r"fewer than the \d+ already committed"
            ):
                call()
        assert _rows(store) == before
        assert seg.state is uploader.SegmentState.OPEN
    assert remote_bytes(remote, "log/shrink") is None


def test_closed_store_refuses_everything(make_store: StoreFactory, tmp_path: Path) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"abc")
    store = make_store()
    seg = store.segment("log/c", path)
    store.close()
    for call in (lambda: store.segment("log/d", path), seg.commit, seg.seal, store.recover):
        with pytest.raises(uploader.StoreClosedError, match="closed"):
            call()


def test_bad_options_are_refused(manifest_url: str, at_head: None, tmp_path: Path) -> None:

    remote = f"file://{tmp_path}"
    with pytest.raises(uploader.UsageError, match="verify"):
        uploader.open(manifest_url, remote, verify="sometimes")
    with pytest.raises(uploader.UsageError, match="part_size"):
        uploader.open(manifest_url, remote, part_size=1024)
    with pytest.raises(uploader.UsageError, match="concurrency"):
        uploader.open(manifest_url, remote, concurrency=0)
