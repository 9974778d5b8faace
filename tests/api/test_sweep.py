"""The sweep: orphans go, live and young uploads stay, dry runs change nothing."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.api.conftest import PART, StoreFactory
from tests.conftest import rgw_options
from uploader.manifest.repo import utcnow
from uploader.sweep import PROBE_MIN_AGE


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


def _metaless_upload(staged: Any, started: float, touched: float) -> str:
    """An upload directory without meta.json holding one part, as a crash inside abort/complete
    or an older version's late part leaves it: its id says ``started``, its files ``touched``."""
    upload_id = f"{int(started * 1000):013d}-{uuid.uuid4().hex}"
    directory = staged._upload_dir(upload_id)
    part = f"{directory}/00001.{time.time_ns()}.{'0' * 32}"
    staged._write_new(part, [b"a late part"])
    if staged.local:
        os.utime(part, (touched, touched))
        os.utime(directory, (touched, touched))
    else:
        staged.fs.store[part].created = datetime.fromtimestamp(touched, UTC)
    return upload_id


@pytest.mark.parametrize("remote", ["file", "memory"], indirect=True)
def test_sweep_removes_old_upload_directories_without_metadata(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    hour_ago = time.time() - 3600 - 60
    with make_store() as store:
        staged = store.storage.inner  # type: ignore[attr-defined]
        old = _metaless_upload(staged, started=hour_ago, touched=hour_ago)
        young = _metaless_upload(staged, started=time.time(), touched=time.time())
        # An old upload with a part that landed just now: alive a moment ago, kept for now.
        late = _metaless_upload(staged, started=hour_ago, touched=time.time())
        live = staged.start_upload("live/1")  # has meta.json: never touched by this cleaning

        def present() -> set[str]:
            staged.fs.invalidate_cache()
            return {
                str(p).rstrip("/").rsplit("/", 1)[-1]
                for p in staged.fs.ls(staged._p(".uploader", "uploads"), detail=False)
            }

        assert present() == {old, young, late, live}
        dry = store.sweep(older_than=3600, dry_run=True)
        assert dry.tmp_removed == (f"uploads/{old}",)
        assert present() == {old, young, late, live}  # a dry run removes nothing

        real = store.sweep(older_than=3600)
        assert real.tmp_removed == (f"uploads/{old}",)
        assert present() == {young, late, live}
        assert real.aborted == ()  # the live upload is young, not an orphan yet
        assert [u.upload_id for u in staged.list_uploads()] == [live]
        # A second sweep finds nothing more.
        assert store.sweep(older_than=3600).tmp_removed == ()


@pytest.mark.parametrize("remote", ["s3", "rgw"], indirect=True)
def test_sweep_aborts_an_old_probe_upload_left_by_a_killed_process(
    make_store: StoreFactory, remote: tuple[str, dict[str, Any]]
) -> None:
    """A capability probe's own upload (under ``.uploader/probe/``) is aborted by its probe
    within seconds and never listed; one left by a process killed mid-probe is aborted by the
    sweep once it is older than the cutoff, never before (it may be a running probe's)."""
    with make_store() as store:
        s3: Any = store.storage.inner  # type: ignore[attr-defined]
        key = f".uploader/probe/{uuid.uuid4().hex}"
        killed = s3._call("create_multipart_upload", key, Bucket=s3.bucket, Key=s3._key(key))[
            "UploadId"
        ]
        assert [u.upload_id for u in s3.probe_uploads()] == [killed]
        assert store.storage.list_uploads() == []

        if remote[1] == rgw_options():
            # Ceph RGW reports when the upload began (moto says 2010-11-10 for every upload):
            # younger than the cutoff, or than PROBE_MIN_AGE with a cutoff of 0, it stays.
            for older_than in (3600, 0):
                young = store.sweep(older_than=older_than)
                assert young.aborted == () and young.kept_young == 1
            store.manifest.clock = lambda: utcnow() + timedelta(seconds=PROBE_MIN_AGE + 60)

        dry = store.sweep(older_than=0, dry_run=True)
        assert dry.aborted == ((key, killed),) and dry.dry_run
        assert [u.upload_id for u in s3.probe_uploads()] == [killed]

        real = store.sweep(older_than=0)
        assert real.aborted == ((key, killed),)
        assert s3.probe_uploads() == [] and store.storage.list_uploads() == []
