"""The sweep: orphans go, live and young uploads stay, dry runs change nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory


def test_sweep_aborts_orphans_only(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "seg"
    path.write_bytes(b"p" * (PART + 3))
    with make_store() as store:
        seg = store.segment("live/1", path)
        seg.commit().result(timeout=60)  # an open segment: its upload is live
        live = store.manifest.segment("live/1")
        assert live is not None and live.upload_id is not None
        orphan = store.storage.start_upload("orphan/1")

        if not remote[0].startswith("s3://"):
            # moto reports every upload as initiated on 2010-11-10, so only the staged backends
            # can show that a young orphan (maybe about to be recorded) is left alone.
            young = store.sweep(older_than=3600)
            assert young.aborted == () and young.kept_young == 1 and young.kept_live == 1

        dry = store.sweep(older_than=0, dry_run=True)
        assert dry.aborted == (("orphan/1", orphan),) and dry.dry_run
        assert {u.upload_id for u in store.storage.list_uploads()} == {orphan, live.upload_id}

        real = store.sweep(older_than=0)
        assert real.aborted == (("orphan/1", orphan),) and real.kept_live == 1
        assert [u.upload_id for u in store.storage.list_uploads()] == [live.upload_id]
        # The live segment still finishes.
        assert seg.seal().result(timeout=60).verified


@pytest.mark.parametrize("remote", ["file", "memory"], indirect=True)
def test_sweep_removes_leftover_assembly_files(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]]
) -> None:
    with make_store() as store:
        staged = store.storage.inner  # type: ignore[attr-defined]
        leftover = staged._tmp()
        staged._write_new(leftover, [b"half an object"])
        assert store.sweep(older_than=3600).tmp_removed == ()
        dry = store.sweep(older_than=0, dry_run=True)
        assert len(dry.tmp_removed) == 1 and staged.fs.exists(leftover)
        assert len(store.sweep(older_than=0).tmp_removed) == 1
        staged.fs.invalidate_cache()
        assert not staged.fs.exists(leftover)
